"""Prompt sources: the toy world's splits or a text file, sampled deterministically per iteration.

Iteration ``i`` of stream ``s`` draws from ``numpy.random.default_rng([seed, s, i])``, so a resumed run
draws exactly the prompts it would have drawn: the sampler position is the iteration number.
:meth:`PromptSource.heldout` is the fixed evaluation list instead (the same prompts every call).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STREAMS = {"train": 0, "calibration": 1, "eval": 2}


class PromptSource:
    def __init__(self, dataset: str, seed: int = 0):
        self.dataset = dataset
        self.seed = seed
        self._lines: list[str] | None = None
        if dataset.startswith("toy:"):
            split = dataset.split(":", 1)[1]
            if split not in ("train", "test"):
                raise ValueError(f"prompts.dataset={dataset!r}: the toy splits are toy:train and toy:test")
        else:
            path = Path(dataset)
            if not path.is_file():
                raise ValueError(
                    f"prompts.dataset={dataset!r} is neither toy:train / toy:test nor an existing file: pass a "
                    "text file with one prompt per line"
                )
            self._lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            if not self._lines:
                raise ValueError(f"prompts.dataset={dataset!r} holds no prompt: put one prompt per line")

    def sample(self, n: int, iteration: int, stream: str = "train") -> list[str]:
        rng = np.random.default_rng([self.seed, STREAMS[stream], iteration])
        if self._lines is None:
            from densegrpo_fast.toy import world

            return [p.text for p in world.sample_prompts(self.dataset.split(":", 1)[1], n, rng)]
        idx = rng.choice(len(self._lines), size=n, replace=len(self._lines) < n)
        return [self._lines[i] for i in idx]

    def heldout(self, n: int | None) -> list[str]:
        """The evaluation list: ``n`` prompts, the same every call. Toy splits: balanced over categories
        (:func:`densegrpo_fast.toy.world.eval_prompts` with this source's seed, as the eval command uses;
        None = as many as the split has); a file: its first ``n`` lines (None = all), cycled if it has fewer."""
        if self._lines is None:
            from densegrpo_fast.toy import world

            split = self.dataset.split(":", 1)[1]
            n = sum(map(len, world.prompt_split()[split].values())) if n is None else n
            return [p.text for p in world.eval_prompts(n, self.seed, split)]
        n = len(self._lines) if n is None else n
        return [self._lines[i % len(self._lines)] for i in range(n)]
