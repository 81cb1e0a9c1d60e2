"""Device memory of a training run, estimated on the CPU before any GPU is rented.

Users of Flow-GRPO and its peers find out that a recipe does not fit when it dies of out-of-memory an hour
in. ``densegrpo-fast memory --config ...`` answers first, in a few minutes on a CPU, by running the trainer's
own code (``trainer.setup``, then one ``collect`` + ``update`` iteration) at the config's full size, with
fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage, no arithmetic) wherever
the data do not steer the code:

- **Weights are fake**: every model is built from its config (the checkpoint's, or the built-in
  architecture of SD3.5-Medium / FLUX.1-dev when the checkpoint is not on disk). Their bytes are exact.
  So are the model rewards' (PickScore, HPS, CLIP score, aesthetic, ImageReward): their models come from
  their configs, or from built-in architectures when those are not on disk (CLIP ViT-H/14 and ViT-L/14 of
  the default hub ids, ImageReward's released BLIP: :func:`densegrpo_fast.rewards.clip.architectures_only`);
  no reward weights are read.
- **Each large module call is profiled once per input signature.** The transformer, the text encoders, the
  VAE's decoder and the reward's models are replaced by :class:`Stub`: its first call with a given signature
  (shapes, dtypes, gradients on or off, adapters on or off) runs the real ``forward`` on fake inputs while
  :class:`LiveBytes` counts every storage it creates. That gives the call's transient peak, the activations
  a call with gradients keeps for its backward, and the backward's own peak. Every call then returns fake
  outputs of the real shapes and books the profiled bytes.
- **Everything else runs as written**: the rollout's latents and log-probs, the in-flight completions, prompt
  embeddings, the decoded images, the log-prob recompute, the loss and its backward, the gradients, AdamW's
  state and the EMA, on fake tensors; the rewards are real random numbers, so the advantages and the plan of
  the update are the trainer's own. The few buffers the trainer allocates from scratch (the initial and SDE
  noise, the rollout's latent and log-prob buffers) are real CPU tensors, written only through their fake
  views: they cost virtual memory, and resident memory only where random numbers are drawn (about 5 GB for
  the recipes). :class:`LiveBytes` follows each storage from allocation to release.
- **Repeats are skipped**: the update runs the first, second and last micro-batch of each optimizer step;
  those between repeat the second (:func:`_repeats_skipped`).

The estimate is the peak, per phase, of (weights + live storages + the current call's transient). The
phases: setup (the trainer's set-up of a fresh run: LoRA adapters or the KL reference's copy, FSDP2's
sharding, the optimizer, the EMA; a resumed run also loads AdamW's state there, which is not estimated),
prompt encoding (the text encoders' calls, at the start of each rollout), rollout + reward, update,
then the end of a run: sample grid (16 samples decoded while the rollout is alive), evaluation (one held-out
batch, as the run's last evaluation makes it: EMA weights swapped in, LoRA merged) and export (EMA weights
swapped in while the transformer is copied to host memory, where LoRA is merged and the file written: host
work, not counted; no file is written here). Text encoders kept in host memory
(``model.offload_text_encoders``) count during prompt encoding and evaluation only. AdamW's state, created
by the first optimizer step, is added where the first iteration did not have it yet, so the figures are
those of every later iteration. It is allocated memory as ``torch.cuda.max_memory_allocated`` counts it, less what the GPU's libraries allocate through the same allocator (cuBLAS workspaces); the CUDA
context (~0.5 GiB) and the caching allocator's fragmentation come on top. Hence the verdict's 10 % headroom.
``--breakdown`` books every counted storage to its origin (a model's weights; a profiled call's kept
activations, outputs, gradients and transients; AdamW's state; else the line of this package that allocated
it) and shows what the peak phase holds at its peak (``--json``: every phase, ``Estimate.origins``).
A torchrun job (``--nproc N``) is estimated per process: the trainer runs as rank 0 of a simulated job
(:func:`densegrpo_fast.distributed.simulated_job`) whose other ranks mirror it, so it rolls out, scores and
trains its share of the rows through the job's own gathers and gradient sums, and evaluates its share of the
held-out prompts. Full fine-tuning there (and LoRA with ``model.sharding=fsdp``) shards the transformer and
its KL reference with FSDP2 on torch's fake process group: each block is then profiled on its own (it is
FSDP's unit), and FSDP's gathers, frees (in-place storage resizes, which :class:`LiveBytes` follows) and
gradient reductions run around it as in the job, on fake buffers (:func:`_fsdp_on_fake`); a sharded weight
counts its local shard. The transformer of a sharded run loads into host memory: its shards count from when
FSDP2 cuts them, and the largest block's whole bytes as the set-up's transient (the unit on its way). The model rewards of
``eval.rewards`` (other than the training reward, whose model scores for it) are built in the evaluation
phase, as the trainer builds them for each held-out evaluation, and counted while they live. Not estimated:
``eval.rewards`` of other kinds (served, on the host, or not loadable here: a note names them), fp16's fp32
T5 layers (``_keep_in_fp32_modules``), and AdamW's foreach temporaries on CUDA (the CPU takes its
per-tensor path).

What it cannot see: kernels that allocate differently on the GPU than on the CPU (attention is forced to the
flash kernel, which keeps no S x S matrix on either; the fused Triton SDE kernels allocate less than the
CPU reference path counted here), and the reward waves' overlap (``sampling.reward_waves`` > 1 scores a wave
while the next rolls out, so their transients add up; the phases are estimated one after the other).
tests/test_memory.py checks the estimate against the same run executed with real weights on the CPU;
benchmarks/gpu_suite.sh compares it with ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import linecache
import os
import re
import sys
import types
import warnings
import weakref
from collections.abc import Set

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from densegrpo_fast.rewards.clip import architectures_only
from densegrpo_fast.rewards.pairwise import is_pairwise, pointwise_view, score
from densegrpo_fast.rewards.remote import SERVED  # (scored by a server: nothing of them on this device)
from densegrpo_fast.rewards.video import FrameMean

GIB = 2**30


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def storage_of(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage that holds ``t``'s bytes on this process: a DTensor's (a sharded weight's) is its local
    shard's; its own wrapper reports the whole tensor's size and is not memory."""
    local = getattr(t, "_local_tensor", None)
    return (t if local is None else local).untyped_storage()


_ACTIVE: list[LiveBytes] = []  # the trackers entered, innermost last


def _counted_storage_clone(storage):
    """``UntypedStorage.clone`` while a tracker is active: it makes its storage through the constructor, which
    no op announces (a plain tensor's deepcopy copies its storage this way), so the trackers are told here."""
    new = _STORAGE_CLONE(storage)
    for tracker in _ACTIVE:
        if not tracker.paused:
            tracker.track_storage(new)
    return new


def _counted_storage_resize(storage, nbytes):
    """``UntypedStorage.resize_`` while a tracker is active: FSDP2 frees a gathered weight by resizing its
    storage to 0 and gathers it into the same storage again, which no op announces either."""
    out = _STORAGE_RESIZE(storage, nbytes)
    for tracker in _ACTIVE:
        if not tracker.paused:
            tracker.resized(storage)
    return out


_STORAGE_CLONE = torch.UntypedStorage.clone
_STORAGE_RESIZE = torch.UntypedStorage.resize_


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while this mode is active and still alive, and their peak.

    Every op's output storage is counted once, from its creation to its release (a weak-reference
    finaliser), as the CUDA caching allocator counts ``memory_allocated``, at its current size (FSDP2 resizes
    storages in place); views and in-place ops add nothing, and a DTensor counts its local shard. ``paused``
    stops the counting (a profiled call counts its own storages with another
    instance). :meth:`bump` raises the peak by a transient that happens outside the counted storages.

    With ``origins``, each storage is booked to where it was allocated (:attr:`label` when set, else the
    innermost code of this package that asked for it), and ``phase_origins`` holds, for each phase, the live
    bytes by origin at its peak (the transient among them).
    """

    def __init__(self, origins: bool = False):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.paused = False
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.phase = ""
        self.phase_peaks: dict[str, int] = {}
        self.origins = origins
        self.label: str | None = None
        self._by_origin: collections.Counter = collections.Counter()
        self.phase_origins: dict[str, dict[str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views, in-place and out= ops allocate nothing
        if not self.paused and not func.is_view and not func._schema.is_mutable:
            held = {id(storage_of(a)) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
            for t in tree_flatten(out)[0]:  # results that share an input's storage allocate nothing
                if isinstance(t, torch.Tensor) and id(storage_of(t)) not in held:
                    self.track(t)
        return out

    def __enter__(self):
        if not _ACTIVE:
            torch.UntypedStorage.clone = _counted_storage_clone
            torch.UntypedStorage.resize_ = _counted_storage_resize
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        if not _ACTIVE:
            del torch.UntypedStorage.clone, torch.UntypedStorage.resize_  # (the inherited methods again)
        return super().__exit__(*exc)

    def track(self, t: torch.Tensor) -> None:
        # a meta tensor is shapes only, no memory anywhere (a fake tensor reports its fake device)
        if t.device.type != "meta":
            self.track_storage(storage_of(t))

    def counted(self, storage) -> int:
        """The bytes this counter booked for ``storage`` (0 if it was not allocated under it)."""
        return self._seen[storage][0] if storage in self._seen else 0

    def track_storage(self, storage) -> None:
        if storage in self._seen:
            return
        # its current size (FSDP2 resizes storages in place) and its origin
        size = [storage.nbytes(), (self.label or _caller()) if self.origins else None]
        self._seen[storage] = size
        self.book(size[0], size[1])
        weakref.finalize(storage, lambda: self.book(-size[0], size[1])).atexit = False  # (none at exit)

    def book(self, n: int, origin: str | None) -> None:
        """``n`` bytes more are live (fewer if negative), allocated by ``origin``."""
        if self.origins:
            self._by_origin[origin] += n
        self.add(n)

    @contextlib.contextmanager
    def labelled(self, origin: str):
        """Within: what is allocated is booked to ``origin``."""
        outer, self.label = self.label, origin
        try:
            yield
        finally:
            self.label = outer

    def resized(self, storage) -> None:
        """``storage`` was resized in place: a counted one counts its new size, another one (allocated before
        this tracker) from now on."""
        size = self._seen.get(storage)
        if size is None:
            self.track_storage(storage)
        else:
            self.book(storage.nbytes() - size[0], size[1])
            size[0] = storage.nbytes()

    def release(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage as freed now, before it is (a stand-in whose bytes are released early)."""
        size = self._seen.get(storage_of(t))
        if size is not None:
            self.book(-size[0], size[1])
            size[0] = 0

    def add(self, n: int) -> None:
        self.live += n
        self.bump(0)

    def bump(self, transient: int, origin: str = "transient") -> None:
        """A moment at which ``transient`` bytes beyond the live storages are allocated (by ``origin``)."""
        now = self.live + transient
        self.peak = max(self.peak, now)
        if self.phase and now > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = now
            if self.origins:
                at_peak = {k: v for k, v in self._by_origin.items() if v}
                if transient:
                    at_peak[f"{origin} (transient)"] = transient
                self.phase_origins[self.phase] = at_peak

    def reset_peak(self) -> None:
        self.peak = self.live
        self.phase_peaks = {}
        self.phase_origins = {}


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller() -> str:
    """Where an allocation was asked for: the source line of the innermost frame of this package outside
    this module, then that frame and the next one of the package, e.g.
    ``latents = init_noise.new_empty(... (rollout.sample:109 < trainer.collect:456)``."""
    frame, names, line = sys._getframe(2), [], ""
    while frame is not None and len(names) < 2:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE) and path != __file__:
            if not names:
                line = linecache.getline(path, frame.f_lineno).strip()
                line = line if len(line) <= 60 else line[:57] + "..."
            names.append(
                f"{os.path.basename(path).removesuffix('.py')}.{frame.f_code.co_name}:{frame.f_lineno}"
            )
        frame = frame.f_back
    return f"{line} ({' < '.join(names)})" if names else "elsewhere"


@dataclasses.dataclass
class CallProfile:
    """What one call of a module with one input signature allocates (bytes)."""

    out: object  # the call's output (fake tensors), whose structure every call of the stub returns
    forward_peak: int  # transient above the inputs during the forward, the output included
    kept: int  # with gradients: activations the graph keeps for the backward (the output excluded)
    backward_peak: int = 0  # with gradients: transient above what is live when the backward starts
    saved_inputs: tuple[int, ...] = ()  # with gradients: the input leaves the graph keeps (full fine-tuning)


def _signature(args, kwargs) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    key = [
        (tuple(x.shape), x.dtype, x.requires_grad) if isinstance(x, torch.Tensor) else repr(x) for x in leaves
    ]
    return (str(spec), tuple(key), torch.is_grad_enabled())


def _autocast_state() -> tuple:
    """Whether autocast is on, and to what dtype, per device type: the rollout's calls run under
    ``model.autocast``, the KL reference's and the evaluation's (of the same shapes) do not, and allocate and
    return other dtypes."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu"))


class _StubGrad(torch.autograd.Function):
    """Puts a stubbed call's outputs on the autograd graph, after its tensor ``inputs`` (those the graph keeps,
    flagged in ``keep``, and those that need gradients, such as a transformer block's hidden states). ``kept``
    stands for the activations the call keeps for its backward: an allocation of their size, saved for the
    backward as they are (so that a gradient checkpoint around the call drops it, and its recomputation saves
    it again). The backward books the profiled backward peak, releases them, and gives the trained weights
    and the inputs that need them their (fake) gradients."""

    @staticmethod
    def forward(ctx, anchor, stub, profile, kept, keep, *inputs):
        ctx.stub, ctx.profile = stub, profile
        ctx.save_for_backward(kept, *[x for x, k in zip(inputs, keep, strict=True) if k])
        ctx.input_grads = [(x.shape, x.dtype, x.device) if x.requires_grad else None for x in inputs]
        return tuple(_empty(profile.out, stub.fake_mode))

    @staticmethod
    def backward(ctx, *grads):
        stub, profile = ctx.stub, ctx.profile
        kept = ctx.saved_tensors[0]  # (first: under a gradient checkpoint, this recomputes the forward)
        stub.tracker.bump(profile.backward_peak, f"{stub.origin}: backward")  # (incl. gradients it lacked)
        with stub.tracker.labelled(f"{stub.origin}: gradients"):
            for p in stub.module.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        stub.tracker.release(kept)  # the activations are freed before the inputs' gradients exist
        with stub.fake_mode, stub.tracker.labelled(f"{stub.origin}: input gradients"):
            inputs = [
                None if g is None else torch.zeros(g[0], dtype=g[1], device=g[2]) for g in ctx.input_grads
            ]
        return None, None, None, None, None, *inputs


class Stub:
    """Replaces ``module.forward`` by a profiled stand-in (see the module docstring); :meth:`restore` undoes
    it."""

    def __init__(self, module: torch.nn.Module, name: str, tracker: LiveBytes, fake_mode):
        self.module, self.name, self.tracker, self.fake_mode = module, name, tracker, fake_mode
        self.origin = re.sub(r"\.\d+$", ".*", name)  # (what its allocations are booked to: blocks together)
        self.profiles: dict[tuple, CallProfile] = {}
        self.calls = 0
        self._forward = module.forward
        self._anchor = torch.zeros((), requires_grad=True)
        self._lora = None
        module.forward = self

    def restore(self) -> None:
        self.module.forward = self._forward

    def __deepcopy__(self, memo):
        """The stub of a copy of the module (the trainer deep-copies the transformer for the KL reference of
        full fine-tuning): same tracker, fake mode and profiles, the copy's own forward."""
        module = memo.get(id(self.module))
        if module is None:
            raise RuntimeError("a Stub is copied only with its module")
        clone = copy.copy(self)
        clone.module, clone._forward = module, types.MethodType(self._forward.__func__, module)
        clone._lora = None
        return clone

    def _accumulates(self) -> bool:
        """Whether a backward would add to existing gradients (every micro-batch but the first; never for a
        block of an FSDP2-sharded model, whose gathered gradients are reduced and dropped after each)."""
        return torch.is_grad_enabled() and any(p.grad is not None for p in self.module.parameters())

    def _adapter_state(self) -> tuple:
        """Whether the module's LoRA adapters are on and merged: a call with them off (the KL reference)
        allocates less than one with them on (in bf16, each adapter casts its input to fp32)."""
        if self._lora is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora = next((m for m in self.module.modules() if isinstance(m, BaseTunerLayer)), None)
        return () if self._lora is None else (self._lora.disable_adapters, self._lora.merged)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        key = (*_signature(args, kwargs), self._adapter_state(), self._accumulates(), _autocast_state())
        if key not in self.profiles:
            self.profiles[key] = self._profile(args, kwargs)
        profile = self.profiles[key]
        self.tracker.bump(profile.forward_peak, f"{self.origin}: forward")
        leaves = tree_flatten((args, kwargs))[0]
        linked = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        if torch.is_grad_enabled() and (linked or any(p.requires_grad for p in self.module.parameters())):
            with self.fake_mode, self.tracker.labelled(f"{self.origin}: activations kept for the backward"):
                kept = torch.empty(profile.kept, dtype=torch.uint8)
            saved = [leaves[i] for i in profile.saved_inputs]
            inputs = list({id(x): x for x in [*saved, *linked]}.values())
            keep = tuple(any(x is y for y in saved) for x in inputs)
            with self.tracker.labelled(f"{self.origin}: outputs"):
                tensors = _StubGrad.apply(self._anchor, self, profile, kept, keep, *inputs)
        else:
            with self.tracker.labelled(f"{self.origin}: outputs"):
                tensors = _empty(profile.out, self.fake_mode)
        it = iter(tensors)
        return tree_map(lambda x: next(it) if isinstance(x, torch.Tensor) else x, profile.out)

    def _profile(self, args, kwargs) -> CallProfile:
        """Runs the real forward (and backward, with gradients) on fake inputs, counting its storages."""
        mode = self.fake_mode
        grad = torch.is_grad_enabled()
        self.tracker.paused = True
        try:
            with mode:
                fake_args, fake_kwargs = tree_map(  # (the profiled graph ends at the inputs: detached)
                    lambda x: (
                        (x if _is_fake(x) else mode.from_tensor(x)).detach().requires_grad_(x.requires_grad)
                        if isinstance(x, torch.Tensor)
                        else x
                    ),
                    (args, kwargs),
                )
                trained = [p for p in self.module.parameters() if p.requires_grad] if grad else []
                saved_grads = [p.grad for p in trained]
                for p in trained:  # (a copy: the profile's backward adds to it, not to the run's gradient)
                    p.grad = None if p.grad is None else torch.zeros_like(p)
                leaves = tree_flatten((fake_args, fake_kwargs))[0]
                where = {id(storage_of(x)): i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)}
                saved: set[int] = set()

                def pack(t):  # which inputs the graph saves for the backward (it then holds them alive)
                    i = where.get(id(storage_of(t)))
                    if i is not None:
                        saved.add(i)
                    return t

                counter = LiveBytes()
                with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = self._forward(*fake_args, **fake_kwargs)
                outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
                # each output storage once (FLUX's single blocks return two views of one tensor), and only
                # what the call allocated (an output may view an input)
                out_bytes = sum(
                    counter.counted(st) for st in {id(st): st for st in map(storage_of, outs)}.values()
                )
                forward_peak, kept = counter.peak, max(counter.live - out_bytes, 0)
                backward_peak = 0
                grads_out = [o for o in outs if o.requires_grad]
                if grads_out:
                    upstream = [torch.ones_like(o) for o in grads_out]
                    counter.reset_peak()
                    start = counter.live
                    with counter:
                        torch.autograd.backward(grads_out, upstream)
                    backward_peak = counter.peak - start
                for p, g in zip(trained, saved_grads, strict=True):
                    p.grad = g
                out = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, out)
        finally:
            self.tracker.paused = False
        return CallProfile(out, forward_peak, kept, backward_peak, tuple(sorted(saved)))


def _empty(out, mode) -> list[torch.Tensor]:
    """Fake tensors shaped as the tensors of the structure ``out``."""
    with mode:
        return [
            torch.empty(x.shape, dtype=x.dtype) for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)
        ]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (tied or shared weights once)."""
    seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
    for t in tensors:
        seen[storage_of(t)] = storage_of(t).nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def host_reads_zero():
    """``.item()`` of a fake tensor gives 0.0 instead of raising: the trainer logs a few values computed from
    the weights (the gradient norm), which fake weights do not have. (FakeTensor's own ``tolist`` reads its
    elements with ``.item()``, so it gives zeros too.)"""
    from torch._subclasses.fake_tensor import FakeTensor

    FakeTensor.item = lambda self: 0.0
    try:
        yield
    finally:
        del FakeTensor.item


def _deepcopy_fake(t: torch.Tensor, memo: dict) -> torch.Tensor:
    """``copy.deepcopy`` of a fake tensor: a clone in the same fake mode (a counted allocation, as a real
    tensor's copy is), with the tensor's own attributes (``_is_param``) and gradient copied. Each tensor is
    cloned on its own: views of one storage become separate storages of their own sizes (the models' weights
    and buffers are whole tensors)."""
    if id(t) in memo:
        return memo[id(t)]
    with torch.no_grad():
        out = t.clone()
    out.requires_grad_(t.requires_grad)
    memo[id(t)] = out  # (before the attributes: one that refers back finds the copy)
    memo.setdefault(id(t.fake_mode), t.fake_mode)  # (an attribute that holds the mode shares it)
    for key, value in vars(t).items():  # (the clone has the fake mode, device and memos of its own)
        if key not in vars(out):
            setattr(out, key, copy.deepcopy(value, memo))
    if t.grad is not None:
        out.grad = copy.deepcopy(t.grad, memo)
    return out


@contextlib.contextmanager
def fake_copies_keep_their_mode():
    """``copy.deepcopy`` of a fake tensor (the trainer copies the transformer for full fine-tuning's KL
    reference) makes a clone in the same fake mode. Torch's own deepcopy of a tensor subclass deep-copies
    its attributes, the fake mode among them: the copy then lives in a second mode, and the first mode's
    weak references to storages (``StorageWeakRef``) are copied with it, each freed twice when both are
    collected, which corrupted the heap (torch 2.13: a crash at a later allocation, in a second estimate
    or at exit)."""
    from torch._subclasses.fake_tensor import FakeTensor

    before = FakeTensor.__dict__.get("__deepcopy__")
    FakeTensor.__deepcopy__ = _deepcopy_fake
    try:
        yield
    finally:
        if before is None:
            del FakeTensor.__deepcopy__
        else:
            FakeTensor.__deepcopy__ = before


def new_fake_mode():
    """The fake mode the estimate builds its models in: real tensors are accepted as inputs (converted).
    Its dispatch cache (on by default) makes the full-size estimates 1.4-1.7x faster, to the same bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_mode_of(module: torch.nn.Module):
    """The FakeTensorMode that owns ``module``'s weights; a ValueError if they are real tensors."""
    for t in (*module.parameters(), *module.buffers()):
        if _is_fake(t):
            return t.fake_mode
    raise ValueError(
        f"{type(module).__name__}'s weights are not fake tensors: build the models under FakeTensorMode"
    )


def policy_modules(policy) -> dict[str, torch.nn.Module]:
    """The modules of ``policy`` whose calls are profiled (the transformer, the text encoders, the VAE's
    decoder) and every model it holds (for the weights' bytes)."""
    return {k: v for k, v in policy.pipe.components.items() if isinstance(v, torch.nn.Module)}


def host_only(policy) -> set[int]:
    """Ids of the weights that ``policy`` keeps in host memory whatever the settings: those of its
    ``unused_modules`` (Qwen-Image's vision tower and LM head), never counted on the device."""
    unused = policy.unused_modules(policy.pipe) if hasattr(policy, "unused_modules") else {}
    return {id(t) for m in unused.values() for t in (*m.parameters(), *m.buffers())}


def device_weights(module: torch.nn.Module, skip: set[int]) -> list[torch.Tensor]:
    """The parameters and buffers of ``module`` but those in ``skip`` (by id)."""
    return [t for t in (*module.parameters(), *module.buffers()) if id(t) not in skip]


def reward_modules(obj, prefix: str = "reward", depth: int = 3) -> dict[str, torch.nn.Module]:
    """The models a reward holds (its attributes, their attributes, lists of them: a CLIP, an MLP head, the
    parts of a weighted sum), by dotted name."""
    found: dict[str, torch.nn.Module] = {}
    if getattr(type(obj), "transparent", False):  # (a wrapper such as FrameMean: its reward's, by its name)
        return reward_modules(obj.wrapped, prefix, depth)
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        items = vars(obj).items() if hasattr(obj, "__dict__") else []
    for key, value in items:
        name = f"{prefix}.{key}"
        while getattr(
            type(value), "transparent", False
        ):  # (a wrapper such as FrameMean: its reward in its place)
            value = value.wrapped
        if isinstance(value, torch.nn.Module):
            found[name] = value
        elif isinstance(value, dict | list | tuple):  # (containers spend no depth: a weighted sum's parts)
            found.update(reward_modules(value, name, depth))
        elif depth > 0 and not isinstance(value, torch.Tensor | type | str):
            found.update(reward_modules(value, name, depth - 1))
    return found


def make_fake(module: torch.nn.Module, mode, dtype: torch.dtype | None = None) -> None:
    """Replace ``module``'s real weights by fake ones of the same shapes (floating-point ones in ``dtype`` if
    given), keeping ``requires_grad``. New tensors go into the modules' dicts: ``Module.to`` would swap
    fake tensors in place (``torch.utils.swap_tensors``), which the fake mode's weak references refuse."""

    def fake(t: torch.Tensor) -> torch.Tensor:
        if not _is_fake(t):
            t = mode.from_tensor(t.detach())
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            with mode:
                t = t.to(dtype)
        return t

    for m in module.modules():
        for key, p in m._parameters.items():
            if p is not None and (not _is_fake(p) or (dtype is not None and p.dtype != dtype)):
                m._parameters[key] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = fake(b)


def add_fake_adapter(transformer: torch.nn.Module, add_adapter, mode, dtype: torch.dtype | None = None):
    """Run ``add_adapter()`` (peft's injection, which builds real weights: the fake mode's tensors refuse
    the in-place moves it makes), then make the new weights fake, in ``dtype`` if given. Returns what
    ``add_adapter()`` returned and the ids of the new parameters."""
    before = {id(p) for p in transformer.parameters()}
    out = add_adapter()
    for m in transformer.modules():
        if any(id(p) not in before for p in m.parameters(recurse=False)):
            make_fake(m, mode, dtype)
    return out, {id(p) for p in transformer.parameters()} - before


def _reward_targets(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """What to stub in a reward's models: their children (a CLIP model's towers and projections are called
    through ``get_image_features`` / ``get_text_features``, not ``forward``), or a childless model itself."""
    out = {}
    for name, module in modules.items():
        children = dict(module.named_children())
        out.update({f"{name}.{k}": c for k, c in children.items()} if children else {name: module})
    return out


def _stub_targets(
    parts: dict[str, torch.nn.Module],
    sharded: bool = False,
    encoder_call: str | None = None,
    decode_call: torch.nn.Module | None = None,
) -> dict[str, torch.nn.Module]:
    """The modules whose calls are profiled. A transformer sharded with FSDP2 (``distributed.shard``) is
    profiled block by block, its units: FSDP's gathers, frees and gradient reductions around each block then
    run as in the job, only the block's own computation is profiled. ``encoder_call``: the submodule of the
    text encoder that the adapter calls (Qwen-Image's ``text_encoder_call``), profiled instead of it.
    ``decode_call``: a module that runs the VAE's whole decode (Wan's ``decode_call``: its decoder's calls
    share a cache), profiled instead of the decoder."""
    from densegrpo_fast.policies.base import block_lists
    from densegrpo_fast.policies.pretrained import is_text_encoder

    out = {}
    for name, module in parts.items():
        if name == "vae" and decode_call is not None:
            out["vae.decode"] = decode_call
        elif name == "vae":  # decode() runs the decoder (and a post-quant conv, when there is one)
            out["vae.decoder"] = module.decoder
        elif encoder_call is not None and is_text_encoder(name):
            out[f"{name}.{encoder_call}"] = getattr(module, encoder_call)
        elif name == "transformer" and sharded:  # (FSDP2's units: distributed.shard's block lists)
            for list_name, blocks in block_lists(module).items():
                out.update({f"transformer.{list_name}.{i}": block for i, block in enumerate(blocks)})
        else:
            out[name] = module
    return out


@dataclasses.dataclass
class Estimate:
    """The estimate, in bytes. ``phases``: the peak of each phase, the set-up, the measured iteration and the
    end of the run after it (weights included); ``weights``: every model's parameters and buffers on the device
    (not those the policy keeps on the host whatever the settings: :func:`host_only`); ``trained``:
    bytes of the trained weights; ``peak``: the largest phase; ``calls``: the calls each stub stood in for
    (the update's repeated micro-batches skipped: :func:`_repeats_skipped`); ``profiles``: each stub's
    profiled signatures; ``offloaded``: the models kept in host memory, on the device only while they run
    (their weights count there and then); ``origins`` (when asked for): each phase's peak by where its bytes
    were allocated (a stub's call, or the code of this package that asked), summing to the phase's figure."""

    weights: dict[str, int]
    trained: int
    phases: dict[str, int]
    peak: int
    calls: dict[str, int]
    profiles: dict[str, list[dict]]
    notes: list[str] = dataclasses.field(default_factory=list)
    offloaded: list[str] = dataclasses.field(default_factory=list)
    origins: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def breakdown(self, phase: str | None = None, rows: int = 12) -> str:
        """The largest parts of ``phase``'s peak (the peak phase's by default), by origin, in GiB (MiB for a
        phase under 1 GiB)."""
        if not self.origins:
            raise ValueError(
                "this estimate has no origins: estimate_run(..., origins=True) (--breakdown) books them"
            )
        phase = phase or max(self.phases, key=self.phases.get)
        unit, size = ("GiB", GIB) if self.phases[phase] >= GIB else ("MiB", 2**20)
        parts = sorted(self.origins[phase].items(), key=lambda kv: -kv[1])
        lines = [f"at the peak of {phase} ({self.phases[phase] / size:.2f} {unit}), by origin:"]
        lines += [f"{v / size:>9.2f} {unit}  {k}" for k, v in parts[:rows]]
        if len(parts) > rows:
            rest = sum(v for _, v in parts[rows:])
            lines.append(f"{rest / size:>9.2f} {unit}  {len(parts) - rows} others")
        return "\n".join(lines)

    def table(self, capacity: int | None = None) -> str:
        rows = [
            f"{'weights ' + k:<32}{v / GIB:>9.2f} GiB"
            + ("  (host; on the device to encode)" * (k in self.offloaded))
            for k, v in self.weights.items()
        ]
        rows.append(f"{'trained weights':<32}{self.trained / GIB:>9.2f} GiB")
        rows += [f"{'peak in ' + k:<32}{v / GIB:>9.2f} GiB" for k, v in self.phases.items()]
        rows.append(f"{'PEAK (allocated)':<32}{self.peak / GIB:>9.2f} GiB")
        if capacity:
            rows.append(f"{'device memory':<32}{capacity / GIB:>9.2f} GiB")
        return "\n".join(rows)


@contextlib.contextmanager
def _encoding_phase(policy, tracker: LiveBytes, encoder_bytes: int):
    """For the duration, ``policy.text_encoders_on_device`` (the pretrained families) books ``encoder_bytes``
    (offloaded encoders' weights) on the device, once however deeply it is nested, as the policy moves them; its moves
    have nothing to do here. Inside the rollout it is a phase of its own, "prompt encoding"; an evaluation,
    which holds the encoders around all its batches, keeps its own phase."""
    if not hasattr(policy, "text_encoders_on_device"):
        yield
        return
    depth = 0

    @contextlib.contextmanager
    def encoding():
        nonlocal depth
        before = tracker.phase
        if before == "rollout + reward":
            tracker.phase = "prompt encoding"
        depth += 1
        if depth == 1:
            tracker.book(encoder_bytes, "offloaded text encoders' weights")
        try:
            yield
        finally:
            depth -= 1
            if depth == 0:
                tracker.book(-encoder_bytes, "offloaded text encoders' weights")
            tracker.phase = before

    policy.text_encoders_on_device = encoding
    try:
        yield
    finally:
        del policy.text_encoders_on_device


#: The origin of what the optimizer's steps allocate (AdamW's state, from the first step on).
_ADAM = "AdamW's state (made by the first optimizer step)"

#: The trainer's functions that :func:`_host_work` replaces while an estimate runs.
_HOST_WORK = ("save_image_grid", "save_gif", "host_copy", "_write_export", "_export", "_meta_copy")


@contextlib.contextmanager
def _host_work(tracker: LiveBytes):
    """What a run does in host memory is not counted, and its files are not written (fake tensors have no
    values to write): the sample grid's PNG (and a video family's GIF); the export's copy of the transformer, made on the host, and the
    merge and save done there (``trainer.host_copy``, ``trainer._write_export``); a sharded run's whole
    weights, gathered to the host one tensor at a time (the largest is booked as the device's transient), and
    put together there (``distributed.full_model_state``, ``trainer._export``), into the shell made at setup
    (``trainer._meta_copy``: parameters on "meta", buffers on the host)."""
    from densegrpo_fast import distributed, trainer

    saved = {name: getattr(trainer, name) for name in _HOST_WORK}
    gather = distributed.full_model_state

    def paused(fn, *args, **kwargs):
        tracker.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.paused = False

    def full_model_state(module, **kwargs):  # whole tensors gathered one at a time and moved to the host
        largest = max((p.numel() * p.element_size() for p in module.parameters()), default=0)
        tracker.bump(largest, "a whole weight gathered on its way to the host")
        return paused(gather, module, **kwargs)

    def export(run, path, whole):  # a sharded run's export: the gathered weights are put together on the host
        return (
            paused(saved["_export"], run, path, whole)
            if whole is not None
            else saved["_export"](run, path, whole)
        )

    trainer.save_image_grid = lambda *args, **kwargs: None
    trainer.save_gif = lambda *args, **kwargs: None
    trainer.host_copy = lambda policy: paused(saved["host_copy"], policy)
    trainer._write_export = lambda *args, **kwargs: None
    trainer._export = export
    trainer._meta_copy = lambda module: paused(saved["_meta_copy"], module)
    distributed.full_model_state = full_model_state
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(trainer, name, fn)
        distributed.full_model_state = gather


#: The methods of FSDP2's parameter group that allocate: gathers, copy-outs, frees, gradient reductions.
_FSDP_WORK = ("unshard", "wait_for_unshard", "reshard", "pre_forward", "post_forward", "pre_backward",
              "post_backward", "finalize_backward")  # fmt: skip


@contextlib.contextmanager
def _fsdp_on_fake(mode):
    """Within: FSDP2's gathers and reductions allocate their buffers under ``mode``, fake as the shards they
    gather. Its buffers come from ``torch.empty`` with no tensor argument, so outside a fake mode they are
    real: a whole block's weights allocated, gathered and copied out at every block call of the estimate
    (over an hour of CPU for SD3.5-M over 8 processes). Sizes, and so the counts, are the same either way.
    (A method a later torch renames is left as it is: slower, not wrong.)"""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    saved = {name: getattr(FSDPParamGroup, name) for name in _FSDP_WORK if hasattr(FSDPParamGroup, name)}

    def on_fake(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with mode:
                return fn(*args, **kwargs)

        return call

    for name, fn in saved.items():
        setattr(FSDPParamGroup, name, on_fake(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(FSDPParamGroup, name, fn)


@contextlib.contextmanager
def _repeats_skipped():
    """Within: the update runs three micro-batches of each optimizer step (and of the old log-probs'
    recomputation): the first, which creates the gradients, the second, which adds to them, and the last,
    which may hold fewer pairs. Those between repeat the second shape for shape and state for state (the
    gradients exist, the graph of the one before is freed), so their peaks are its peak. A sharded process
    pads to as many calls as the busiest process's, so that count is cut alike. The SD3.5-M recipe's update
    makes ~160 micro-batches per process over 8 processes (~1300 in one); under FSDP each costs seconds of
    fake FSDP work. The stubs' call counts (:attr:`Estimate.calls`) are those of the calls made."""
    from densegrpo_fast import trainer

    batches, most = trainer._micro_batches, trainer._most_micro_batches

    def micro_batches(rows, steps, size):
        every = list(batches(rows, steps, size))
        return every[:2] + every[2:][-1:]

    trainer._micro_batches = micro_batches
    trainer._most_micro_batches = lambda *args, **kwargs: min(most(*args, **kwargs), 3)
    try:
        yield
    finally:
        trainer._micro_batches, trainer._most_micro_batches = batches, most


def _largest_unit(module: torch.nn.Module) -> int:
    """The bytes of ``module``'s largest FSDP2 unit (:func:`densegrpo_fast.distributed.shard`: each block, and
    the root's own parameters), whole, as FSDP2 moves it to the device before cutting its shards."""
    from densegrpo_fast.policies.base import block_lists

    blocks = [b for blocks in block_lists(module).values() for b in blocks]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in in_blocks)
    return max([root, *(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)])


def _track(tracker: LiveBytes, modules: dict[str, torch.nn.Module], skip: Set[int] = frozenset()) -> None:
    """Count the weights of ``modules`` (by name) as live, but those in ``skip`` (by id)."""
    for name, module in modules.items():
        with tracker.labelled(f"weights: {name}"):
            for t in device_weights(module, skip):
                tracker.track(t)


def _iterations(
    cfg,
    policy,
    tracker: LiveBytes,
    reward_fn,
    iterations: int,
    seed: int,
    notes: list[str] | None = None,
    encoder_bytes: int = 0,
    resident=dict,
    eval_rewards=contextlib.nullcontext,
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``trainer.setup`` then ``iterations`` x (collect, update) under ``tracker``; the peak of each phase of
    the last iteration (live bytes: the weights of the models ``resident()`` names, on the device before,
    included, counted until they are freed, as a sharded transformer's whole weights are), and each phase's
    peak by origin (empty unless ``tracker`` records origins). The reward's values are random (seeded), its
    calls are the real reward's (or ``reward_fn``'s).

    With one iteration, the phases are those of every later iteration: AdamW's state, created by the first
    optimizer step, is added to the rollout and to the part of the update that ran before that step. A
    reward that fails on fake images is dropped, with a line in ``notes``.

    Then the rest of a run, each a phase: the sample grid (``run.sample_grid_every`` > 0; in the last
    iteration, while its rollout is alive), the held-out evaluation (as the run's last one) and the export.

    Prompt encoding (the pretrained families) is a phase of its own, inside the rollout's: ``encoder_bytes``,
    the weights of offloaded text encoders, are on the device then, and through the evaluation, which holds them.
    ``eval_rewards()`` is the context the evaluation builds ``cfg.eval.rewards`` in."""
    from densegrpo_fast import distributed, trainer

    # (no reference kept: weights replaced by shards are freed). A sharded run loads its transformer into host
    # memory, and FSDP2 moves it to the device a unit at a time as it shards it: its shards are counted as they
    # are made, and the unit on its way as the setup's transient
    on_device = resident()
    sharded = trainer._shards(cfg, distributed.from_env(cfg.model.device))
    if sharded:
        on_device.pop("transformer", None)
    _track(tracker, on_device, host_only(policy))
    with (
        _encoding_phase(policy, tracker, encoder_bytes),
        _host_work(tracker),
        tracker,
        host_reads_zero(),
        fake_copies_keep_their_mode(),
    ):
        tracker.phase = "setup"  # (LoRA or the KL reference, FSDP2's sharding, the optimizer, the EMA)
        tracker.bump(0)
        with warnings.catch_warnings():  # (the estimate's stand-in reward is not the run's: no word on it)
            warnings.filterwarnings(
                "ignore", message=r"the prompts are edits of source images, and the rewards"
            )
            run = trainer.setup(cfg, progress=False, policy=policy)
            if sharded and cfg.lora.enabled:  # (full fine-tuning's is its fp32 upcast, counted as it is made)
                tracker.bump(_largest_unit(run.policy.transformer), "a block moved whole to be sharded")
        tracker.phase = ""
        setup_peak, setup_at = tracker.phase_peaks.get("setup", 0), tracker.phase_origins.get("setup", {})
        scorer = reward_fn or run.reward_fn
        gen = torch.Generator().manual_seed(seed)

        def counted(call, failed: str) -> bool:
            """Whether ``call()`` ran on the fake images; a note of ``failed`` where it did not (e.g. a reward
            that reads pixel values on the host, OCR)."""
            try:
                call()
                return True
            except Exception as e:
                if notes is not None:
                    notes.append(f"{failed} ({type(e).__name__}: {e})")
                return False

        def reward(images, prompts, group_size=None):
            nonlocal scorer
            if scorer is not None and not counted(
                lambda: score(scorer, images, prompts, group_size),
                "the reward's calls failed on fake images and are not counted, its weights are",
            ):
                scorer = None
            return torch.rand(images.shape[0], generator=gen)

        if scorer is not None and is_pairwise(scorer):  # called with the group size; evaluated by its view
            view = pointwise_view(scorer)

            def alone(images, prompts):
                nonlocal view
                if view is not None and not counted(
                    lambda: view(images, prompts),
                    "the reward's pointwise view failed on fake images in the evaluation and is not counted there",
                ):
                    view = None
                return torch.rand(images.shape[0], generator=gen)

            reward.pairwise, reward.pointwise = True, alone

        def stepping(*_):  # the first step allocates AdamW's state: it belongs to the stepped part
            if tracker.phase == "update":
                tracker.phase = "update, stepped"
            tracker.label = _ADAM

        def done_stepping(*_):
            tracker.label = None

        def phase(name: str) -> None:
            tracker.phase = name
            tracker.bump(0)

        if isinstance(
            run.reward_fn, FrameMean
        ):  # a video family's: as the trainer scores, frame by frame, one
            reward = FrameMean(reward, run.reward_fn.frames)  # video decoded at a time (scoring_decode)
        run.reward_fn = reward
        hooks = [
            run.optimizer.register_step_pre_hook(stepping),
            run.optimizer.register_step_post_hook(done_stepping),
        ]
        for it in range(iterations):
            prompts = run.prompts.sample(cfg.prompts.prompts_per_iteration, it)
            tracker.reset_peak()
            phase("rollout + reward")
            ro, cond, R, _ = trainer.collect(run, prompts, it, overlap=False)  # this rank's rows
            phase("update")
            R_all = distributed.gather_rows(run.dist, R)  # as trainer.train: the whole batch's advantages
            trainer.updater(cfg)(run, ro, cond, R, it, trainer._advantages(run, R_all))
            if cfg.run.sample_grid_every and it == iterations - 1:  # decoded while the rollout is alive
                phase("sample grid")
                trainer._sample_grid(run, ro, prompts, R_all)
            tracker.phase = ""
            del ro, cond, R, R_all
        for hook in hooks:
            hook.remove()
        phase("evaluation")  # the last one: AdamW's state exists
        with eval_rewards():  # (the models of eval.rewards are built in here, for this evaluation)
            trainer.ema_heldout_rewards(run)
        phase("export")
        trainer.export_policy(run, run.dir / "policy_ema.safetensors")
        tracker.phase = ""
        state = storage_bytes(  # (AdamW's step counts stay on the host unless it is fused or capturable)
            [
                t
                for st in run.optimizer.state.values()
                for k, t in st.items()
                if torch.is_tensor(t) and k != "step"
            ]
        )
    peaks, at = tracker.phase_peaks, tracker.phase_origins
    late = state if iterations == 1 else 0
    adam = {_ADAM: late} if late else {}
    phases = {"setup": setup_peak}
    phases.update({"prompt encoding": peaks["prompt encoding"] + late} if "prompt encoding" in peaks else {})
    phases["rollout + reward"] = peaks["rollout + reward"] + late
    origins = {k: {**at.get(k, {}), **adam} for k in phases if k != "setup"}
    origins["setup"] = setup_at
    stepped = peaks.get("update, stepped", 0) > peaks.get("update", 0) + late
    phases["update"] = peaks["update, stepped"] if stepped else peaks.get("update", 0) + late
    origins["update"] = at.get("update, stepped", {}) if stepped else {**at.get("update", {}), **adam}
    for k in ("sample grid", "evaluation", "export"):
        if k in peaks:
            phases[k], origins[k] = peaks[k], at.get(k, {})
    return phases, origins if tracker.origins else {}


def measure_run(cfg, policy, *, reward_fn=None, iterations: int = 2, seed: int = 0) -> dict[str, int]:
    """What :func:`estimate_run` estimates, counted on a real run (real weights, every call executed): the
    phases' peaks, the policy's weights included (not ``reward_fn``'s). On the CPU this is how the estimate
    is checked (tests/test_memory.py)."""

    return _iterations(
        cfg, policy, LiveBytes(), reward_fn, iterations, seed, resident=lambda: policy_modules(policy)
    )[0]


def estimate_run(
    cfg, policy, *, reward_fn=None, iterations: int = 1, seed: int = 0, origins: bool = False
) -> Estimate:
    """Estimate the device memory of training ``cfg`` with ``policy`` (built with fake weights; see the
    module docstring). ``cfg`` should name a throw-away ``run.output_dir`` and a prompt file;
    ``reward_fn`` stands in for the config's reward when given; the model rewards of ``cfg.eval.rewards`` are
    built for the evaluation from their configs, with fake weights counted while they live (other kinds
    are not built here: :func:`counted_rewards` picks which to leave in ``cfg``). Runs ``iterations``
    trainer iterations (collect + update) and the end of a run (sample grid, evaluation, export), and reports the phases of the
    last iteration and of that end (with one iteration, AdamW's state is added where the first did not have it
    yet; see :func:`_iterations`). With ``origins``, also each phase's peak by where its bytes were allocated
    (``Estimate.origins``)."""
    mode = fake_mode_of(policy.transformer)
    parts = policy_modules(policy)
    scored = reward_modules(reward_fn) if reward_fn is not None else {}
    for module in scored.values():
        make_fake(module, mode)
        module.requires_grad_(False)
        unmovable(module)  # (CLIP rewards move theirs)
    skip = host_only(policy)
    weights = {k: storage_bytes(device_weights(m, skip)) for k, m in {**parts, **scored}.items()}
    tracker = LiveBytes(origins)
    from densegrpo_fast import distributed, trainer

    sharded = trainer._shards(cfg, distributed.from_env(cfg.model.device))  # (in a simulated job)
    encoder_call = getattr(policy, "text_encoder_call", None)
    decode_call = getattr(policy, "decode_call", None)
    targets = {**_stub_targets(parts, sharded, encoder_call, decode_call), **_reward_targets(scored)}
    stubs = [Stub(m, k, tracker, mode) for k, m in targets.items()]
    transformer = policy.transformer
    add_adapter = transformer.add_adapter if hasattr(transformer, "add_adapter") else None

    # LoRA injected as usual, then its (real) weights made fake and counted
    def fake_adapter(*args, **kwargs):
        out, new = add_fake_adapter(transformer, lambda: add_adapter(*args, **kwargs), mode)
        with tracker.labelled("LoRA adapters"):
            for p in transformer.parameters():  # (made by from_tensor, which the tracker does not see)
                if id(p) in new:
                    tracker.track(p)
        return out

    if add_adapter is not None:
        transformer.add_adapter = fake_adapter
    # offloaded text encoders: on the device only while the policy encodes (see _iterations)
    from densegrpo_fast.policies.pretrained import is_text_encoder

    on_host = getattr(policy, "offload_text_encoders", False)
    host = [k for k in parts if is_text_encoder(k)] if on_host else []
    host_bytes = sum(weights[k] for k in host)
    notes: list[str] = []

    def resident():
        return {k: m for k, m in {**parts, **scored}.items() if k not in host}

    try:
        with _repeats_skipped(), _fsdp_on_fake(mode) if sharded else contextlib.nullcontext():
            phases, at_peaks = _iterations(
                cfg, policy, tracker, reward_fn, iterations, seed, notes, host_bytes, resident,
                eval_rewards=lambda: architectures_only(reward_builder(mode, tracker)),
            )  # fmt: skip
    finally:
        for s in stubs:
            s.restore()
        if add_adapter is not None:
            del transformer.add_adapter
    trained = storage_bytes([p for p in transformer.parameters() if p.requires_grad])
    profiles = {
        s.name: [
            {"grad": key[2], "forward_peak": p.forward_peak, "kept": p.kept, "backward_peak": p.backward_peak}
            for key, p in s.profiles.items()
        ]
        for s in stubs
    }
    return Estimate(
        weights, trained, phases, max(phases.values()), {s.name: s.calls for s in stubs}, profiles,
        notes=notes, offloaded=host, origins=at_peaks,
    )  # fmt: skip


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fake_module(ctor, dtype: torch.dtype, mode) -> torch.nn.Module:
    """``ctor()`` built with fake weights in ``dtype`` (buffers computed in fp32 follow)."""
    with mode, _default_dtype(dtype):
        module = ctor()
    make_fake(module, mode, dtype)
    return module


def unmovable(module: torch.nn.Module) -> None:
    """``module.to(...)`` returns it as it is (fake weights cannot be moved). Through a weak reference: a
    bound method in its own ``__dict__`` would make a cycle, and keep a model built for one evaluation
    alive (and counted) until the garbage collector runs."""
    ref = weakref.ref(module)
    module.to = lambda *args, **kwargs: ref()


def reward_builder(mode, tracker: LiveBytes | None = None):
    """The ``build`` of :func:`densegrpo_fast.rewards.clip.architectures_only` for the estimate: a reward's
    model with fake weights, which stays where it is (a CLIP reward moves its model to the images' device; a
    fake model cannot be moved). With ``tracker``, its weights are counted from now until they are freed (an
    evaluation reward, built for each held-out evaluation)."""

    def build(constructor, dtype: torch.dtype) -> torch.nn.Module:
        module = _fake_module(constructor, dtype, mode)
        unmovable(module)
        if tracker is not None:
            with tracker.labelled("weights: eval.rewards"):
                for t in [*module.parameters(), *module.buffers()]:
                    tracker.track(t)
        return module

    return build


def _local_constructors(root, components: dict[str, str]) -> tuple[dict, dict]:
    """From a diffusers-format directory: constructors of its models built from their configs (no weights
    read), and its tokenizers and scheduler, loaded, with the pipeline's own settings (FLUX.2 [klein]'s
    ``is_distilled``), as ``from_pretrained`` passes them."""
    import json

    import diffusers
    import transformers

    index = json.loads((root / "model_index.json").read_text())
    models, others = {}, {}
    for name, kind in components.items():
        library, cls_name = index[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        folder = root / name
        if kind == "processor":  # (Qwen-Image-Edit: not loaded, see QwenImageEditPolicy.skip_components)
            others[name] = None
        elif kind != "model":
            others[name] = cls.from_pretrained(folder)
        elif library == "diffusers":
            models[name] = lambda cls=cls, folder=folder: cls.from_config(cls.load_config(folder))
        else:
            config = transformers.AutoConfig.from_pretrained(folder)
            models[name] = lambda cls=cls, config=config: cls(config)
    others |= {  # (a setting, not a component: a component's entry is [library, class])
        k: v for k, v in index.items()
        if not k.startswith("_") and k not in components and not (isinstance(v, list) and len(v) == 2)
    }  # fmt: skip
    return models, others


def _with_optimizer_state(est: Estimate, counted: int, instead: int) -> Estimate:
    """``est`` with ``instead`` bytes of optimizer state where AdamW's ``counted`` bytes were counted: in every
    phase but the set-up (each holds the state, from the first optimizer step on, as every later iteration
    does), and in the phases' breakdown by origin."""
    delta = counted - instead
    phases = {k: v if k == "setup" else v - delta for k, v in est.phases.items()}
    origins = {
        k: {**o, _ADAM: o[_ADAM] - delta} if _ADAM in o and k != "setup" else o
        for k, o in est.origins.items()
    }
    return dataclasses.replace(est, phases=phases, peak=max(phases.values()), origins=origins)


def eight_bit_adam_bytes(params, min_8bit_size: int = 4096, blocksize: int = 256) -> int:
    """Bytes of bitsandbytes' ``AdamW8bit`` state for ``params`` (its defaults): a tensor of at least
    ``min_8bit_size`` weights keeps its two moments in 8 bits with an fp32 scale per block of ``blocksize``;
    a smaller one keeps fp32 moments. (Its two 256-value code books, shared by every tensor, are left out.)"""
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * n + 8 * -(-n // blocksize) if n >= min_8bit_size else 8 * n
    return total


def _check_family(cfg) -> None:
    from densegrpo_fast.policies import PRETRAINED

    if cfg.model.family not in PRETRAINED:
        raise ValueError(
            f"model.family={cfg.model.family!r}: the memory estimate is for the GPU models "
            f"({', '.join(PRETRAINED)}); the toy runs on the CPU in a few hundred MiB"
        )


def _vl_call_sized(policy, body, inputs: dict) -> torch.Tensor:
    """Qwen-Image-Edit's text encoder call as the estimate runs it (``_vl_call``): the language model on the
    token embeddings of the whole prompt, the source's image tokens included (their count is a static shape),
    at text positions. The vision tower sizes its work from the values of the patch grid, which fake tensors
    do not hold: its weights are counted, its activations (the source's patches through its blocks, within
    the encode) are not."""
    embeds = body.get_input_embeddings()(inputs["input_ids"])
    lm = body.language_model  # (no key-value cache, as the policy's call)
    return lm(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=False
    ).last_hidden_state


def _check_processes(cfg, processes: int) -> None:
    """A torchrun job the trainer accepts: ``processes`` dividing the rows."""
    from densegrpo_fast import trainer

    if processes < 1:
        raise ValueError(f"--nproc {processes}: a job has at least one process; give a count of 1 or more")
    if processes > 1:
        try:
            trainer._check_world(cfg, processes)
        except ValueError as e:
            raise ValueError(f"--nproc {processes}: {e}") from None


def fake_policy(cfg, mode):
    """The ``cfg.model`` policy (a pretrained family) with fake weights: the models are built from the
    checkpoint's configs when it is on disk (a directory, or in the Hugging Face cache), from the built-in
    full-size architectures when it is the family's default repo or another built in
    (``architectures.BUILT_IN_REPOS``) and not on disk. Tokenizers and scheduler are the checkpoint's, or
    stand-ins with the real sequence lengths."""
    import diffusers

    from densegrpo_fast.policies import adapter_class, architectures
    from densegrpo_fast.policies.pretrained import as_dtype

    m = cfg.model
    _check_family(cfg)
    Adapter = adapter_class(m.family)

    pipeline_cls = getattr(diffusers, Adapter.pipeline_name)
    checkpoint = m.checkpoint or Adapter.default_repo
    try:
        root, components = Adapter.resolve(checkpoint)
        models, others = _local_constructors(root, components)
        source = str(root)
    except ValueError:
        family, key = architectures.BUILT_IN_REPOS.get(checkpoint, (None, m.family))
        if checkpoint != Adapter.default_repo and family != m.family:  # (no architecture built in)
            raise
        root = None  # (not on disk)
        models = architectures.full_size_models(key)
        others = {
            "scheduler": architectures.scheduler(key),
            **architectures.stand_in_tokenizers(key),
            **architectures.PIPELINE_SETTINGS.get(key, {}),
        }
        source = f"the built-in architecture of {checkpoint} (not on disk)"
    dtype = as_dtype(m.dtype)
    parts = {k: _fake_module(c, torch.float32 if k == "vae" else dtype, mode) for k, c in models.items()}
    pipe = pipeline_cls(**parts, **others)
    length = m.max_sequence_length or Adapter.default_max_sequence_length
    policy = Adapter(
        pipe, resolution=m.resolution, max_sequence_length=length, **Adapter.shape_options(m.frames)
    )
    if Adapter.text_reads_sources:  # (Qwen-Image-Edit: the text encoder's vision tower, see _vl_call_sized)
        policy._vl_call = types.MethodType(_vl_call_sized, policy)
    if "processor" in Adapter.components:  # (Qwen-Image-Edit reads the processor's image processor)
        policy.vl_images = (
            architectures.stand_in_image_processor() if root is None else Adapter.image_processor(root)
        )
    if m.guidance_scale_2 is not None:  # (Wan 2.2 A14B's low-noise expert's scale, as load_policy sets it)
        policy.set_guidance_scale_2(m.guidance_scale_2)
    if m.negative_prompt is not None:  # (its length counts where a tokenizer pads to the batch's longest)
        policy.set_negative_prompt(m.negative_prompt)
    if m.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    # (no move: see estimate_run). A prompt cache's run loads no text encoder: counted as offloaded ones
    policy.offload_text_encoders = m.offload_text_encoders or m.prompt_cache is not None
    return policy, source


def _advice(phase: str, cfg) -> str:
    off = (
        ""
        if cfg.model.offload_text_encoders or cfg.model.prompt_cache is not None
        else "; model.offload_text_encoders=true (or a prompt cache, model.prompt_cache) frees the text encoders' "
        "weights"
    )
    if phase == "setup":
        return (
            "set-up holds the whole transformer in model.dtype (under FSDP2 its shards and one whole block at a "
            "time, from host memory), and in full fine-tuning with a KL weight (grpo.beta, nft.kl or awm.kl) its KL "
            "reference (whole in one process, shards and one whole block at a time under FSDP2) and under "
            "grpo.objective=nft or awm a lagged copy of the trained weights, and, resumed, "
            "AdamW's state as it is loaded: train LoRA adapters, or set the KL weight to 0 (no reference)"
            + off
        )
    if phase == "prompt encoding":
        return (
            "prompt encoding holds the text encoders and their activations for the iteration's distinct prompts: "
            "lower prompts_per_iteration or model.max_sequence_length"
        )
    if phase == "evaluation":
        return (
            "the held-out evaluation samples eval.batch_size prompts at a time (with CFG, twice the rows; at most "
            "sampling.max_rows_per_call per transformer call), at eval.resolution where it is set, with the EMA "
            "weights swapped in and LoRA merged, and the text encoders on the device while they encode (a group "
            "of batches' prompts at a time): lower "
            "eval.batch_size or sampling.max_rows_per_call, or evaluate at a smaller eval.resolution"
        )
    if phase == "sample grid":
        return "the sample grid decodes 16 samples while the rollout is alive: run.sample_grid_every=0 turns it off"
    if phase == "export":
        return (
            "the export swaps the EMA weights in (a copy of the trained weights is kept meanwhile: in full "
            "fine-tuning, of the whole transformer) while it copies the transformer to the host" + off
        )
    if phase == "update":
        gc = "" if cfg.model.gradient_checkpointing else " or model.gradient_checkpointing=true"
        return f"the update's micro-batches hold the activations: lower grpo.train_batch_size{gc}{off}"
    return (
        "the rollout holds the batch and its calls: lower sampling.max_rows_per_call or prompts_per_iteration"
        " (under torchrun each process holds its share: --nproc N)" + off
    )


def counted_rewards(cfg, mode, notes: list[str]) -> tuple[object | None, dict[str, dict]]:
    """What the estimate counts of ``cfg``'s rewards, built inside
    :func:`~densegrpo_fast.rewards.clip.architectures_only` (the model rewards from their configs, fake
    weights, nothing read), with a line in ``notes`` for each one not counted or stood in for:

    - the training reward, or None when nothing of it is on the device (served, weight-free, or not loadable
      here); :func:`estimate_run` makes any real weights of it fake and drops it if it fails on fake images;
    - the ``eval.rewards`` to build in the evaluation phase (key -> ``{name, kwargs}``), as the trainer
      builds them for each held-out evaluation: those other than the training reward (whose model scores
      for it) whose models are all fake here and which score a fake image (the model rewards, alone or in a
      weighted sum of such)."""
    from densegrpo_fast.rewards import build_reward

    def built(where: str, r):
        """``r`` built (None when nothing of it is on the device: with a note) and what was stood in for."""
        if r.name in SERVED:
            notes.append(f"{where} {r.name!r} is scored by its server: nothing on this device")
            return None, []
        try:
            with architectures_only(reward_builder(mode)) as stood_in:
                fn = r.for_policy(build_reward(r.name, **r.kwargs), cfg.model.video)
        except Exception as e:  # weights or an extra not on this machine: the reward's model is not counted
            notes.append(f"{where} {r.name!r} not counted: it does not load here ({type(e).__name__}: "
                         f"{str(e)[:300]})")  # fmt: skip
            return None, []
        if not reward_modules(fn):  # JPEG sizes and the like: nothing on the GPU
            notes.append(f"{where} {r.name!r} holds no model on this process's device: not counted")
            return None, []
        if getattr(fn, "estimate_note", None):  # what the reward says of its own estimate (VQAScore's)
            notes.append(f"{where} {r.name!r}: {fn.estimate_note}")
        return fn, stood_in

    def counted(where: str, r, stood_in: list[str]) -> None:
        if stood_in:
            notes.append(f"{where} {r.name!r}: not on disk, counted with the built-in architecture (stand-in "
                         f"tokenizer and image settings of the same sizes): {', '.join(stood_in)}")  # fmt: skip

    reward_fn, stood_in = built("reward", cfg.reward)
    counted("reward", cfg.reward, stood_in)
    evaluated = {}
    for key, r in cfg.eval_rewards_built().items():  # (the others are scored by the training reward's model)
        where = f"eval.rewards.{key}"
        fn, stood_in = built(where, r)
        if fn is None:
            continue
        tensors = [t for m in reward_modules(fn).values() for t in [*m.parameters(), *m.buffers()]]
        if not all(_is_fake(t) for t in tensors):  # real weights (OCR's): the estimate cannot rebuild them
            notes.append(f"{where} {r.name!r}: its models load real weights, not counted")
            continue
        try:
            with mode:
                pointwise_view(fn, where)(torch.rand(1, 3, 64, 64), ["a prompt"])
        except Exception as e:  # e.g. a part that reads pixel values on the host (JPEG sizes in a sum)
            notes.append(f"{where} {r.name!r} fails on fake images, not counted ({type(e).__name__}: {e})")
            continue
        counted(where, r, stood_in)
        evaluated[key] = {"name": r.name, "kwargs": r.kwargs, "frames": r.frames}
    return reward_fn, evaluated


def fits(est: Estimate, device_gib: float) -> bool:
    """Whether the estimate's peak fits a ``device_gib`` GPU with 10 % headroom (module doc)."""
    return est.peak <= 0.9 * int(device_gib * GIB)


def run_memory(
    config: str,
    overrides: list[str],
    *,
    device_gib: float = 80.0,
    as_json: bool = False,
    processes: int = 1,
    breakdown: bool = False,
) -> Estimate:
    """``densegrpo-fast memory``: estimate, print the table and the verdict for a ``device_gib`` GPU. With
    ``processes`` > 1, for each process of a torchrun job of that many, as rank 0 of a simulated job
    (:func:`densegrpo_fast.distributed.simulated_job`); the transformer is sharded with FSDP2 there as the
    trainer shards it (``model.sharding``: full fine-tuning by default, LoRA with fsdp). With ``breakdown``, what the peak holds by origin."""
    import json
    import shutil
    import tempfile
    import time
    from pathlib import Path

    import yaml
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast import distributed, trainer
    from densegrpo_fast.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, config, overrides)
    _check_family(cfg)  # before the reward loads
    compiled = cfg.model.compile
    calibrated = cfg.noise.kind == "calibrated"
    calibration_rows = (
        cfg.noise.calibration.prompts or cfg.prompts.prompts_per_iteration
    ) * cfg.sampling.group_size
    _check_processes(cfg, processes)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if as_json else print
    # with --json, stdout holds the JSON alone: what the reward's, the models' and the trainer's code print
    # (the FSDP2 line) goes to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    work = Path(tempfile.mkdtemp(prefix="densegrpo_memory_"))
    try:  # (the folder goes whatever stops the estimate: an error, Ctrl-C during the build)
        # what the prompts say does not matter where the encoders pad to their length (SD3, FLUX.1, FLUX.2
        # [klein]); where they pad to the batch's longest prompt (Qwen-Image, Z-Image), each prompt reaches
        # model.max_sequence_length (the most memory): Qwen's tokenizer, like the byte-level stand-in, makes a
        # token of each digit
        from densegrpo_fast.policies import adapter_class
        from densegrpo_fast.prompts import PromptSource

        Adapter = adapter_class(cfg.model.family)
        length = cfg.model.max_sequence_length or Adapter.default_max_sequence_length
        tail = "" if Adapter.pads_prompts else " " + "1" * length
        batch = cfg.eval.largest_batch(processes)  # the largest of a process's held-out batches
        n = max(2 * cfg.prompts.prompts_per_iteration, batch * processes)
        texts = [f"a photo of thing number {i}{tail}" for i in range(n)]
        edits, notes = Adapter.edits == "required", []
        if Adapter.edits == "optional":  # (FLUX.2 [klein]: edits where the run's prompt files hold them)
            for field, dataset in (
                ("prompts.dataset", cfg.prompts.dataset),
                ("eval.dataset", cfg.eval.dataset),
            ):
                try:
                    edits = edits or PromptSource(dataset, 0, field).edits
                except (ValueError, OSError):
                    notes.append(
                        f"{field}={dataset!r} is not readable here: estimated as text prompts; edit records "
                        "need more (each call holds the source's tokens as well): estimate where the file is"
                    )
        if edits:  # an editing model's prompts: a source image each (read, resized, encoded together)
            from PIL import Image

            for i in range(n):
                Image.new("RGB", (64, 64), (i % 256, 96, 64)).save(work / f"source{i}.png")
            prompts = work / "prompts.jsonl"
            records = [json.dumps({"prompt": t, "image": f"source{i}.png"}) for i, t in enumerate(texts)]
            prompts.write_text("".join(r + "\n" for r in records))
        else:
            prompts = work / "prompts.txt"
            prompts.write_text("".join(t + "\n" for t in texts))
        mode = new_fake_mode()
        eight_bit = cfg.optim.name == "adamw8bit"  # (estimated as torch's AdamW, then noted: see below)
        trainer.check_optimizer(cfg, trainer._shards(cfg, distributed.Dist(0, processes)))

        with quiet:
            reward_fn, evaluated = counted_rewards(cfg, mode, notes)
        cfg = load_config(TrainConfig, config, [
            *overrides, f"prompts.dataset={prompts}", f"eval.dataset={prompts}",
            f"run.output_dir={work / 'run'}",
            "run.tensorboard=false", "run.wandb.enabled=false", "noise.kind=uniform", "model.device=cpu",
            "reward.name=redness", "reward.kwargs={}", "dense.multi_reward=sum",
            "eval.rewards=" + yaml.safe_dump(evaluated, default_flow_style=True, width=1 << 30).strip(),
            # one batch of `batch` images each: the evaluation's peak
            f"eval.num_prompts={-(-batch * processes // cfg.eval.images_per_prompt)}",
            "model.compile=false",  # fake tensors run eagerly
            "lora.init=null",  # a warm start's adapters have the run's shapes: its file is not read
            "lora.init_2=null",
            "optim.name=adamw",  # (bitsandbytes' optimizer does not step fake tensors)
        ])  # fmt: skip
        if compiled:
            notes.append("model.compile: the blocks are counted as they run eagerly (not measured compiled)")
        if Adapter.text_reads_sources:
            notes.append(
                "the text encoder's vision tower: its weights are counted, not its activations while it encodes "
                "the sources (prompt encoding and the evaluation read a little low)"
            )
        if cfg.model.prompt_cache is not None:
            notes.append(
                "model.prompt_cache: the run loads no text encoder; prompt encoding and the evaluation count them "
                "as offloaded ones (model.offload_text_encoders), an upper bound of those two phases"
            )
        if calibrated and calibration_rows > cfg.rows_per_iteration:
            notes.append(
                f"noise.kind=calibrated: the calibration before training rolls out {calibration_rows} "
                "trajectories at once (noise.calibration.prompts x group size), more than an iteration's "
                f"{cfg.rows_per_iteration}; not estimated: its rollout needs more than the rollout phase "
                "shows"
            )
        if cfg.sampling.reward_waves > 1:
            notes.append(
                f"sampling.reward_waves={cfg.sampling.reward_waves}: a wave is scored while the next rolls "
                "out, so the reward's transient adds to the rollout's; the phases are estimated one after "
                "the other"
            )
        t0 = time.perf_counter()
        say(f"building {cfg.model.family} with fake weights ...")
        with quiet:
            policy, source = fake_policy(cfg, mode)
        say(f"  from {source}")
        share = (
            f"{cfg.rows_per_iteration // processes} of {cfg.rows_per_iteration} trajectories (rank 0 of "
            f"{processes} processes)"
            if processes > 1
            else f"{cfg.rows_per_iteration} trajectories"
        )
        say(f"running one iteration at full size ({share}, T={cfg.sampling.num_steps}) with each model call "
            "profiled once per shape ...")  # fmt: skip
        sharded = trainer._shards(cfg, distributed.Dist(0, processes))  # (the trainer's own rule)
        job = distributed.simulated_job(processes) if processes > 1 else contextlib.nullcontext()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), job, quiet, warnings.catch_warnings():
            # (FSDP2 asks a fake weight for its data pointer, which torch warns about: nothing is read)
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            est = estimate_run(cfg, policy, reward_fn=reward_fn, origins=breakdown)
        say(f"  done in {time.perf_counter() - t0:.0f} s")
        notes += est.notes
        informative = []  # notes that explain the table, not something it leaves out
        if sharded:
            kl = " and its KL reference" if trainer._kl_weight(cfg) > 0 and not cfg.lora.enabled else ""
            informative.append(
                f"the weights rows are the whole models' but for the trained weights row, this process's fp32 "
                f"shard; this process holds its FSDP2 shards of the transformer{kl}, and the phases count those"
            )
            notes.append(informative[-1])
            params = list(policy.transformer.parameters())
            trained = sum(p.numel() for p in params if p.requires_grad)
            whole = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
            per = 16 if cfg.ema.enabled else 12  # (fp32 weights, AdamW's two moments, the EMA)
            ema = " and the EMA" if cfg.ema.enabled else ""
            exported = (  # (LoRA: the frozen base in its dtype, for the merge, and the fp32 adapters)
                whole + 4 * trained if cfg.lora.enabled else 4 * trained
            )
            from densegrpo_fast.policies.pretrained import as_dtype

            base = [p for p in params if not (cfg.lora.enabled and p.requires_grad)]  # (in model.dtype)
            loaded = sum(p.numel() for p in base) * as_dtype(cfg.model.dtype).itemsize
            notes.append(
                f"host memory, not counted above: each process loads the whole transformer into host memory "
                f"({loaded / GIB:.1f} GiB) before FSDP2 moves its shards to the device; each checkpoint gathers "
                f"the whole trained fp32 weights, AdamW's two moments{ema} on rank 0's host, about "
                f"{per * trained / GIB:.1f} GiB ({trained / 1e9:.3f} B trained parameters x {per} bytes); the "
                f"export at the end gathers {exported / GIB:.1f} GiB there"
            )
        if eight_bit:
            trained = [p for p in policy.transformer.parameters() if p.requires_grad]
            # (torch's AdamW keeps its moments in the weights' dtype; bitsandbytes' in 8 bits or fp32)
            full, eight = (
                2 * sum(p.numel() * p.element_size() for p in trained),
                eight_bit_adam_bytes(trained),
            )
            est = _with_optimizer_state(est, full, eight)
            unit, size = ("GiB", GIB) if full >= GIB else ("MiB", 2**20)
            informative.append(
                f"optim.name=adamw8bit: the phases count bitsandbytes' 8-bit moments ({eight / size:.2f} {unit}) "
                f"in place of torch AdamW's ({full / size:.2f} {unit}), which the estimate ran (bitsandbytes' "
                "optimizer does not run on fake tensors)"
            )
            notes.append(informative[-1])
        if processes == 1:
            informative.append(
                "one process holding the whole batch; for a torchrun job, --nproc N gives each process's peak"
            )
            notes.append(informative[-1])
        capacity = int(device_gib * GIB)
        worst = max(est.phases, key=est.phases.get)
        ok = fits(est, device_gib)
        if as_json:
            print(
                json.dumps(
                    {
                        **dataclasses.asdict(est),
                        "source": source,
                        "notes": notes,
                        "device_bytes": capacity,
                        "processes": processes,
                        "fits": ok,  # (with the 10 % headroom)
                        "advice": None if ok else _advice(worst, cfg),
                    }
                )
            )
            return est
        if processes > 1:
            print(f"each of {processes} processes (rank 0; the others hold as much):")
        print(est.table(capacity))
        if breakdown:
            print(est.breakdown())
        if not ok:
            print(f"DOES NOT FIT with 10 % headroom: {_advice(worst, cfg)}")
        else:
            caveat = " (not counting what the notes below name)" if len(notes) > len(informative) else ""
            print(f"fits{caveat}: the peak allocation is {(0.9 * capacity - est.peak) / GIB:.1f} GiB under 90 % of "
                  f"{capacity / GIB:.1f} GiB, the rest kept for the CUDA context, NCCL and fragmentation")  # fmt: skip
        for note in notes:
            print(f"note: {note}")
        return est
    finally:
        shutil.rmtree(work, ignore_errors=True)
