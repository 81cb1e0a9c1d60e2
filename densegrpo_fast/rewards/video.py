"""Image rewards on videos.

A video family's ``decode`` (:data:`densegrpo_fast.policies.VIDEO`: Wan) gives videos [B, 3, F, H, W] where the
image families give images [B, 3, H, W]. :func:`frame_mean` lets every reward of the registry score them: it
scores ``frames`` frames of each video, evenly spaced from the first to the last, and averages the scores,
as video RL work scores with image reward models (PickScore, HPS, CLIP score) when no video reward model is
at hand. Each frame's batch keeps the rows' order, so a weighted sum's components (``stack``) are averaged each
on their own, and a pairwise reward still compares the videos of a group, frame by frame: a video's win rate is
the mean of its win rates at each frame scored. That can rank two videos otherwise than their mean scores do (a
video a little better at three frames of four beats one much better at the fourth), and the held-out evaluation
scores a pairwise reward's pointwise view, which is the mean score.

A reward that scores a video whole says so with a true ``video`` attribute and gets the 5-d tensor as it is.
"""

from __future__ import annotations

import torch

#: The frame count :func:`scoring_decode` sizes its chunks by when the decode does not say (WanPipeline's default).
UNKNOWN_FRAMES = 81


def frame_indices(total: int, frames: int | None) -> list[int]:
    """The frames of a ``total``-frame video that are scored: ``frames`` of them, evenly spaced from the first to
    the last (one: the middle one), each once; every frame for None or ``frames >= total``."""
    if frames is None or frames >= total:
        return list(range(total))
    if frames == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (frames - 1)) for i in range(frames)})


class FrameMean:
    """``reward`` on videos: the mean of its scores of :func:`frame_indices`' frames, [B] (or [B, C] for a weighted
    sum's ``stack``). Images [B, 3, H, W] go to ``reward`` unchanged. Everything else (``pairwise``, ``weights``,
    ``combine``, ``check_prompts``, ...) is the reward's own."""

    video = True
    #: The walkers that look for a reward's models and servers (:func:`densegrpo_fast.distributed.reachable`,
    #: :func:`densegrpo_fast.memory.reward_modules`) go through it without spending a level of their depth.
    transparent = True

    def __init__(self, reward, frames: int | None):
        self.image_reward = reward
        self.frames = frames

    def _per_frame(self, fn, images: torch.Tensor, prompts: list, **kwargs) -> torch.Tensor:
        if images.ndim != 5:
            return fn(images, prompts, **kwargs)
        scores = [
            fn(images[:, :, f].contiguous(), prompts, **kwargs).float()
            for f in frame_indices(images.shape[2], self.frames)
        ]
        return torch.stack(scores).mean(0)

    def __call__(self, images: torch.Tensor, prompts: list, **kwargs) -> torch.Tensor:
        return self._per_frame(self.image_reward, images, prompts, **kwargs)

    def stack(self, images: torch.Tensor, prompts: list, **kwargs) -> torch.Tensor:
        return self._per_frame(self.image_reward.stack, images, prompts, **kwargs)

    @property
    def wrapped(self):
        """The image reward (what the walkers go on to)."""
        return self.image_reward

    @property
    def pointwise(self):
        """A pairwise reward's pointwise view, on videos too (None where the reward has none)."""
        view = getattr(self.image_reward, "pointwise", None)
        return None if view is None else frame_mean(view, self.frames)

    def __getattr__(self, name: str):
        # (image_reward, frames: not set yet, a copy or unpickling in progress; dunders, e.g. a bound method's
        # __self__, are the wrapper's own, not the reward's)
        if name in ("image_reward", "frames") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.image_reward, name)

    def __repr__(self) -> str:
        return f"FrameMean({self.image_reward!r}, frames={self.frames})"


def frame_mean(reward, frames: int | None, video: bool = True):
    """``reward`` made to score videos (:class:`FrameMean`), where ``video`` (the policy makes videos) and the
    reward does not take videos whole already; else ``reward`` itself."""
    if not video or getattr(reward, "video", False):
        return reward
    return FrameMean(reward, frames)


def scoring_decode(decode, reward_fn, chunk: int):
    """``(decode, chunk)`` for scoring rows with ``reward_fn`` (or a bound method of it, ``WeightedSum.stack``'s):
    the decode and the rows per reward call of :func:`~densegrpo_fast.dense.latent_rewards`. For a
    :class:`FrameMean` (a video policy's reward) the decode keeps only the frames it scores, one video at a time
    (the VAE decodes one at a time anyway), so that a dense reward's batch of videos never sits decoded whole:
    [n, 3, k, H, W] for k frames scored, and ``chunk`` shrinks k-fold, so that a chunk holds as many frames as
    it held images (the reward is then called once per frame, on ``chunk / k`` images; a pairwise reward's
    calls take whole groups, which may hold more). ``decode``, ``chunk`` themselves otherwise."""
    wrapped = reward_fn if isinstance(reward_fn, FrameMean) else getattr(reward_fn, "__self__", None)
    if not isinstance(wrapped, FrameMean):
        return decode, chunk
    # (the frames of the video policy whose decode this is; unknown, e.g. a wrapped decode: the pipeline's 81)
    total = getattr(getattr(decode, "__self__", None), "frames", None) or UNKNOWN_FRAMES
    kept = len(frame_indices(total, wrapped.frames))

    def decode_scored(latents: torch.Tensor) -> torch.Tensor:
        out = []
        for row in latents.split(1):
            video = decode(row)
            out.append(video[:, :, frame_indices(video.shape[2], wrapped.frames)])
        return torch.cat(out)

    return decode_scored, max(1, chunk // kept)
