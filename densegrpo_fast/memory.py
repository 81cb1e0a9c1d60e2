"""Device memory of a training run, estimated on the CPU before any GPU is rented.

Users of Flow-GRPO and its peers find out that a recipe does not fit when it dies of out-of-memory an hour
in. ``densegrpo-fast memory --config ...`` answers first, in a few minutes on a CPU, by running the trainer's
own code (``trainer.setup``, then one ``collect`` + ``update`` iteration) at the config's full size, with
fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage, no arithmetic) wherever
the data do not steer the code:

- **Weights are fake**: every model is built from its config (the checkpoint's, or the built-in
  architecture of SD3.5-Medium / FLUX.1-dev when the checkpoint is not on disk). Their bytes are exact.
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

The estimate is the peak, per phase, of (weights + live storages + the current call's transient). The
phases: prompt encoding (the text encoders' calls, at the start of each rollout), rollout + reward, update,
then the end of a run: sample grid (16 samples decoded while the rollout is alive), evaluation (one held-out
batch, as the run's last evaluation makes it: EMA weights swapped in, LoRA merged) and export (EMA weights
swapped in while the transformer is copied to host memory, where LoRA is merged and the file written: host
work, not counted; no file is written here). Text encoders kept in host memory
(``model.offload_text_encoders``) count during prompt encoding and evaluation only. AdamW's state, created
by the first optimizer step, is added where the first iteration did not have it yet, so the figures are
those of every later iteration. It is allocated memory as ``torch.cuda.max_memory_allocated`` counts it, less what the GPU's libraries allocate through the same allocator (cuBLAS workspaces); the CUDA
context (~0.5 GiB) and the caching allocator's fragmentation come on top. Hence the verdict's 10 % headroom.
Not estimated: torchrun / FSDP jobs (the estimate is one process holding the whole batch), the models of
``eval.rewards`` other than the training reward, fp16's fp32 T5 layers (``_keep_in_fp32_modules``), and
AdamW's foreach temporaries on CUDA (the CPU takes its per-tensor path).

What it cannot see: kernels that allocate differently on the GPU than on the CPU (attention is forced to the
flash kernel, which keeps no S x S matrix on either; the fused Triton SDE kernels allocate less than the
CPU reference path counted here), and the reward waves' overlap (``sampling.reward_waves`` > 1 scores a wave
while the next rolls out, so their transients add up; the phases are estimated one after the other).
tests/test_memory.py checks the estimate against the same run executed with real weights on the CPU;
benchmarks/gpu_suite.sh compares it with ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


_ACTIVE: list[LiveBytes] = []  # the trackers entered, innermost last


def _counted_storage_clone(storage):
    """``UntypedStorage.clone`` while a tracker is active: it makes its storage through the constructor, which
    no op announces (a plain tensor's deepcopy copies its storage this way), so the trackers are told here."""
    new = _STORAGE_CLONE(storage)
    for tracker in _ACTIVE:
        if not tracker.paused:
            tracker.track_storage(new)
    return new


_STORAGE_CLONE = torch.UntypedStorage.clone


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while this mode is active and still alive, and their peak.

    Every op's output storage is counted once, from its creation to its release (a weak-reference
    finaliser), as the CUDA caching allocator counts ``memory_allocated``; views and in-place ops add
    nothing. ``paused`` stops the counting (a profiled call counts its own storages with another
    instance). :meth:`bump` raises the peak by a transient that happens outside the counted storages.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.paused = False
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.phase = ""
        self.phase_peaks: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and not func._schema.is_mutable:  # in-place and out= ops allocate nothing
            held = {
                id(a.untyped_storage())
                for a in tree_flatten((args, kwargs))[0]
                if isinstance(a, torch.Tensor)
            }
            for t in tree_flatten(out)[
                0
            ]:  # views and in-place results share an input's storage: no allocation
                if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in held:
                    self.track(t)
        return out

    def __enter__(self):
        if not _ACTIVE:
            torch.UntypedStorage.clone = _counted_storage_clone
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        if not _ACTIVE:
            del torch.UntypedStorage.clone  # (the inherited method again)
        return super().__exit__(*exc)

    def track(self, t: torch.Tensor) -> None:
        self.track_storage(t.untyped_storage())

    def track_storage(self, storage) -> None:
        if storage in self._seen:
            return
        n = storage.nbytes()
        self._seen[storage] = n
        self.add(n)
        weakref.finalize(storage, self.add, -n).atexit = False  # (nothing to count at exit)

    def add(self, n: int) -> None:
        self.live += n
        self.bump(0)

    def bump(self, transient: int) -> None:
        """A moment at which ``transient`` bytes beyond the live storages are allocated."""
        now = self.live + transient
        self.peak = max(self.peak, now)
        if self.phase:
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), now)

    def reset_peak(self) -> None:
        self.peak = self.live
        self.phase_peaks = {}


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


class _StubGrad(torch.autograd.Function):
    """Puts a stubbed call's outputs on the autograd graph: the backward books the profiled backward
    peak, releases the kept activations, and gives the trained weights their (fake) gradients."""

    @staticmethod
    def forward(ctx, anchor, stub, profile, inputs):
        ctx.stub, ctx.profile, ctx.inputs = stub, profile, inputs  # the saved inputs live until the backward
        return tuple(_empty(profile.out, stub.fake_mode))

    @staticmethod
    def backward(ctx, *grads):
        stub, profile = ctx.stub, ctx.profile
        for p in stub.module.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        stub.tracker.bump(profile.backward_peak)
        stub.tracker.add(-profile.kept)
        ctx.inputs = None
        return None, None, None, None


class Stub:
    """Replaces ``module.forward`` by a profiled stand-in (see the module docstring); :meth:`restore` undoes
    it."""

    def __init__(self, module: torch.nn.Module, name: str, tracker: LiveBytes, fake_mode):
        self.module, self.name, self.tracker, self.fake_mode = module, name, tracker, fake_mode
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

    def _adapter_state(self) -> tuple:
        """Whether the module's LoRA adapters are on and merged: a call with them off (the KL reference)
        allocates less than one with them on (in bf16, each adapter casts its input to fp32)."""
        if self._lora is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora = next((m for m in self.module.modules() if isinstance(m, BaseTunerLayer)), None)
        return () if self._lora is None else (self._lora.disable_adapters, self._lora.merged)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        key = (*_signature(args, kwargs), self._adapter_state())
        if key not in self.profiles:
            self.profiles[key] = self._profile(args, kwargs)
        profile = self.profiles[key]
        self.tracker.bump(profile.forward_peak)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            self.tracker.add(profile.kept)
            leaves = tree_flatten((args, kwargs))[0]
            tensors = _StubGrad.apply(self._anchor, self, profile, [leaves[i] for i in profile.saved_inputs])
        else:
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
                fake_args, fake_kwargs = tree_map(
                    lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) and not _is_fake(x) else x,
                    (args, kwargs),
                )
                trained = [p for p in self.module.parameters() if p.requires_grad] if grad else []
                saved_grads = [p.grad for p in trained]
                for p in trained:  # accumulate into existing gradients, as every micro-batch but the first
                    p.grad = torch.zeros_like(p)
                leaves = tree_flatten((fake_args, fake_kwargs))[0]
                where = {
                    id(x.untyped_storage()): i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)
                }
                saved: set[int] = set()

                def pack(t):  # which inputs the graph saves for the backward (it then holds them alive)
                    i = where.get(id(t.untyped_storage()))
                    if i is not None:
                        saved.add(i)
                    return t

                counter = LiveBytes()
                with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = self._forward(*fake_args, **fake_kwargs)
                outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
                out_bytes = sum(o.untyped_storage().nbytes() for o in outs)
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
        seen[t.untyped_storage()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def host_reads_zero():
    """``.item()`` of a fake tensor gives 0.0 instead of raising: the trainer logs a few values computed from
    the weights (the gradient norm), which fake weights do not have."""
    from torch._subclasses.fake_tensor import FakeTensor

    FakeTensor.item = lambda self: 0.0
    try:
        yield
    finally:
        del FakeTensor.item


def new_fake_mode():
    """The fake mode the estimate builds its models in: real tensors are accepted as inputs (converted),
    and the class-wide dispatch cache is off for it (with it on, a second estimate in the same process,
    LoRA then full fine-tuning, corrupted the heap at garbage collection: torch 2.13, seen under pytest)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False
    return mode


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


def reward_modules(obj, prefix: str = "reward", depth: int = 3) -> dict[str, torch.nn.Module]:
    """The models a reward holds (its attributes, their attributes, lists of them: a CLIP, an MLP head, the
    parts of a weighted sum), by dotted name."""
    found: dict[str, torch.nn.Module] = {}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        items = vars(obj).items() if hasattr(obj, "__dict__") else []
    for key, value in items:
        name = f"{prefix}.{key}"
        if isinstance(value, torch.nn.Module):
            found[name] = value
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


def _reward_targets(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """What to stub in a reward's models: their children (a CLIP model's towers and projections are called
    through ``get_image_features`` / ``get_text_features``, not ``forward``), or a childless model itself."""
    out = {}
    for name, module in modules.items():
        children = dict(module.named_children())
        out.update({f"{name}.{k}": c for k, c in children.items()} if children else {name: module})
    return out


def _stub_targets(parts: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    out = {}
    for name, module in parts.items():
        if name == "vae":  # decode() runs the decoder (and a post-quant conv, when there is one)
            out["vae.decoder"] = module.decoder
        else:
            out[name] = module
    return out


@dataclasses.dataclass
class Estimate:
    """The estimate, in bytes. ``phases``: the peak of each phase of the measured iteration and of the end of
    the run after it (weights included); ``weights``: every model's parameters and buffers; ``trained``:
    bytes of the trained weights; ``peak``: the largest phase; ``offloaded``: the models kept in host
    memory, on the device only while they run (their weights count there and then)."""

    weights: dict[str, int]
    trained: int
    phases: dict[str, int]
    peak: int
    calls: dict[str, int]
    profiles: dict[str, list[dict]]
    notes: list[str] = dataclasses.field(default_factory=list)
    offloaded: list[str] = dataclasses.field(default_factory=list)

    def table(self, capacity: int | None = None) -> str:
        rows = [
            f"{'weights ' + k:<32}{v / GIB:>9.2f} GiB"
            + ("  (host; on the device to encode and evaluate)" * (k in self.offloaded))
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
    """For the duration, ``policy.text_encoders_on_device`` (sd3/flux) books ``encoder_bytes`` (offloaded
    encoders' weights) on the device, once however deeply it is nested, as the policy moves them; its moves
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
            tracker.add(encoder_bytes)
        try:
            yield
        finally:
            depth -= 1
            if depth == 0:
                tracker.add(-encoder_bytes)
            tracker.phase = before

    policy.text_encoders_on_device = encoding
    try:
        yield
    finally:
        del policy.text_encoders_on_device


@contextlib.contextmanager
def _host_work(tracker: LiveBytes):
    """What a run does in host memory is not counted, and its files are not written (fake tensors have no
    values to write): the sample grid's PNG; the export's copy of the transformer, made on the host, and the
    merge and save done there (``trainer.host_copy``, ``trainer._write_export``)."""
    from densegrpo_fast import trainer

    saved = trainer.save_image_grid, trainer.host_copy, trainer._write_export

    def host_copy(policy):
        tracker.paused = True
        try:
            return saved[1](policy)
        finally:
            tracker.paused = False

    trainer.save_image_grid = lambda *args, **kwargs: None
    trainer.host_copy = host_copy
    trainer._write_export = lambda *args, **kwargs: None
    try:
        yield
    finally:
        trainer.save_image_grid, trainer.host_copy, trainer._write_export = saved


def _iterations(
    cfg,
    policy,
    tracker: LiveBytes,
    reward_fn,
    iterations: int,
    seed: int,
    notes: list[str] | None = None,
    encoder_bytes: int = 0,
) -> dict[str, int]:
    """``trainer.setup`` then ``iterations`` x (collect, update) under ``tracker``; the peak of each phase of
    the last iteration (live bytes, the weights that existed before not included). The reward's values
    are random (seeded), its calls are the real reward's (or ``reward_fn``'s).

    With one iteration, the phases are those of every later iteration: AdamW's state, created by the first
    optimizer step, is added to the rollout and to the part of the update that ran before that step. A
    reward that fails on fake images is dropped, with a line in ``notes``.

    Then the rest of a run, each a phase: the sample grid (``run.sample_grid_every`` > 0; in the last
    iteration, while its rollout is alive), the held-out evaluation (as the run's last one) and the export.

    Prompt encoding (sd3/flux) is a phase of its own, inside the rollout's: ``encoder_bytes``, the weights
    of offloaded text encoders, are on the device then, and through the evaluation, which holds them."""
    from densegrpo_fast import trainer

    with (
        _encoding_phase(policy, tracker, encoder_bytes),
        _host_work(tracker),
        tracker,
        host_reads_zero(),
    ):
        run = trainer.setup(cfg, progress=False, policy=policy)
        scorer = reward_fn or run.reward_fn
        gen = torch.Generator().manual_seed(seed)

        def reward(images, prompts):
            nonlocal scorer
            if scorer is not None:
                try:
                    scorer(images, prompts)
                except Exception as e:  # e.g. a reward that reads pixel values on the host (OCR)
                    scorer = None
                    if notes is not None:
                        notes.append(
                            f"the reward failed on fake images and is not counted ({type(e).__name__}: {e})"
                        )
            return torch.rand(images.shape[0], generator=gen)

        def stepping(*_):  # the first step allocates AdamW's state: it belongs to the stepped part
            if tracker.phase == "update":
                tracker.phase = "update, stepped"

        def phase(name: str) -> None:
            tracker.phase = name
            tracker.bump(0)

        run.reward_fn = reward
        hook = run.optimizer.register_step_pre_hook(stepping)
        for it in range(iterations):
            prompts = run.prompts.sample(cfg.prompts.prompts_per_iteration, it)
            tracker.reset_peak()
            phase("rollout + reward")
            ro, cond, R, _ = trainer.collect(run, prompts, it, overlap=False)
            phase("update")
            trainer.update(run, ro, cond, R, it)
            if cfg.run.sample_grid_every and it == iterations - 1:  # decoded while the rollout is alive
                phase("sample grid")
                trainer._sample_grid(run, ro, prompts, R)
            tracker.phase = ""
            del ro, cond, R
        hook.remove()
        phase("evaluation")  # the last one: AdamW's state exists
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
    peaks = tracker.phase_peaks
    late = state if iterations == 1 else 0
    phases = {"prompt encoding": peaks["prompt encoding"] + late} if "prompt encoding" in peaks else {}
    return {
        **phases,
        "rollout + reward": peaks["rollout + reward"] + late,
        "update": max(peaks.get("update", 0) + late, peaks.get("update, stepped", 0)),
        **{k: peaks[k] for k in ("sample grid", "evaluation", "export") if k in peaks},
    }


def measure_run(cfg, policy, *, reward_fn=None, iterations: int = 2, seed: int = 0) -> dict[str, int]:
    """What :func:`estimate_run` estimates, counted on a real run (real weights, every call executed): the
    phases' peaks, the policy's weights included (not ``reward_fn``'s). On the CPU this is how the estimate
    is checked (tests/test_memory.py)."""
    weights = storage_bytes(
        [t for m in policy_modules(policy).values() for t in (*m.parameters(), *m.buffers())]
    )
    phases = _iterations(cfg, policy, LiveBytes(), reward_fn, iterations, seed)
    return {k: v + weights for k, v in phases.items()}


def estimate_run(cfg, policy, *, reward_fn=None, iterations: int = 1, seed: int = 0) -> Estimate:
    """Estimate the device memory of training ``cfg`` with ``policy`` (built with fake weights; see the
    module docstring). ``cfg`` should name a throw-away ``run.output_dir`` and a prompt file;
    ``reward_fn`` stands in for the config's reward when given. Runs ``iterations`` trainer iterations
    (collect + update) and the end of a run (sample grid, evaluation, export), and reports the phases of the
    last iteration and of that end (with one iteration, AdamW's state is added where the first did not have it
    yet; see :func:`_iterations`)."""
    mode = fake_mode_of(policy.transformer)
    parts = policy_modules(policy)
    scored = reward_modules(reward_fn) if reward_fn is not None else {}
    for module in scored.values():
        make_fake(module, mode)
        module.requires_grad_(False)
        module.to = types.MethodType(lambda self, *args, **kwargs: self, module)  # (CLIP rewards move theirs)
    weights = {k: storage_bytes([*m.parameters(), *m.buffers()]) for k, m in {**parts, **scored}.items()}
    tracker = LiveBytes()
    targets = {**_stub_targets(parts), **_reward_targets(scored)}
    stubs = [Stub(m, k, tracker, mode) for k, m in targets.items()]
    transformer = policy.transformer
    add_adapter = transformer.add_adapter if hasattr(transformer, "add_adapter") else None

    # LoRA injected as usual, then its (real) weights made fake and counted
    def fake_adapter(*args, **kwargs):
        before = {id(p) for p in transformer.parameters()}
        out = add_adapter(*args, **kwargs)
        for m in transformer.modules():
            if any(id(p) not in before for p in m.parameters(recurse=False)):
                make_fake(m, mode)
        for p in transformer.parameters():  # (made by from_tensor, which the tracker does not see)
            if id(p) not in before:
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
    try:
        phases = _iterations(cfg, policy, tracker, reward_fn, iterations, seed, notes, host_bytes)
    finally:
        for s in stubs:
            s.restore()
        if add_adapter is not None:
            del transformer.add_adapter
    base = sum(weights.values()) - host_bytes
    trained = storage_bytes([p for p in transformer.parameters() if p.requires_grad])
    phases = {k: v + base for k, v in phases.items()}
    profiles = {
        s.name: [
            {"grad": key[2], "forward_peak": p.forward_peak, "kept": p.kept, "backward_peak": p.backward_peak}
            for key, p in s.profiles.items()
        ]
        for s in stubs
    }
    return Estimate(
        weights, trained, phases, max(phases.values()), {s.name: s.calls for s in stubs}, profiles,
        offloaded=host,
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


def _local_constructors(root, components: dict[str, str]) -> tuple[dict, dict]:
    """From a diffusers-format directory: constructors of its models built from their configs (no weights
    read), and its tokenizers and scheduler, loaded."""
    import json

    import diffusers
    import transformers

    index = json.loads((root / "model_index.json").read_text())
    models, others = {}, {}
    for name, kind in components.items():
        library, cls_name = index[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        folder = root / name
        if kind != "model":
            others[name] = cls.from_pretrained(folder)
        elif library == "diffusers":
            models[name] = lambda cls=cls, folder=folder: cls.from_config(cls.load_config(folder))
        else:
            config = transformers.AutoConfig.from_pretrained(folder)
            models[name] = lambda cls=cls, config=config: cls(config)
    return models, others


def _check_family(cfg) -> None:
    if cfg.model.family not in ("sd3", "flux"):
        raise ValueError(
            f"model.family={cfg.model.family!r}: the memory estimate is for the GPU models (sd3, flux); the toy "
            "runs on the CPU in a few hundred MiB"
        )


def fake_policy(cfg, mode):
    """The ``cfg.model`` policy (sd3 or flux) with fake weights: the models are built from the checkpoint's
    configs when it is on disk (a directory, or in the Hugging Face cache), from the built-in full-size
    architectures when it is the family's default repo and not on disk. Tokenizers and scheduler are
    the checkpoint's, or stand-ins with the real sequence lengths."""
    from densegrpo_fast.policies import architectures
    from densegrpo_fast.policies.pretrained import as_dtype, resolve_pretrained

    m = cfg.model
    _check_family(cfg)
    if m.family == "sd3":
        from densegrpo_fast.policies.sd3 import SD3Policy as Adapter
    else:
        from densegrpo_fast.policies.flux import FluxPolicy as Adapter
    import diffusers

    pipeline_cls = getattr(diffusers, Adapter.pipeline_name)
    checkpoint = m.checkpoint or Adapter.default_repo
    try:
        root = resolve_pretrained(
            checkpoint, pipeline_cls=pipeline_cls, components=Adapter.components,
            default_repo=Adapter.default_repo,
        )  # fmt: skip
        models, others = _local_constructors(root, Adapter.components)
        source = str(root)
    except ValueError:
        if checkpoint != Adapter.default_repo:
            raise
        models = architectures.full_size_models(m.family)
        others = {
            "scheduler": architectures.scheduler(m.family),
            **architectures.stand_in_tokenizers(m.family),
        }
        source = f"the built-in architecture of {checkpoint} (not on disk)"
    dtype = as_dtype(m.dtype)
    parts = {k: _fake_module(c, torch.float32 if k == "vae" else dtype, mode) for k, c in models.items()}
    pipe = pipeline_cls(**parts, **others)
    length = m.max_sequence_length or Adapter.default_max_sequence_length
    policy = Adapter(pipe, resolution=m.resolution, max_sequence_length=length)
    if m.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    policy.offload_text_encoders = m.offload_text_encoders  # (no move: see estimate_run)
    return policy, source


def _advice(phase: str, cfg) -> str:
    off = (
        ""
        if cfg.model.offload_text_encoders
        else "; model.offload_text_encoders=true frees the text encoders' weights"
    )
    if phase == "prompt encoding":
        return (
            "prompt encoding holds the text encoders and their activations for the iteration's distinct prompts: "
            "lower prompts_per_iteration or model.max_sequence_length"
        )
    if phase == "evaluation":
        return (
            "the held-out evaluation samples eval.batch_size prompts at a time (with CFG, twice the rows), with "
            "the EMA weights swapped in and LoRA merged, and the text encoders on the device throughout: lower "
            "eval.batch_size"
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
        + off
    )


SERVED = ("remote", "geneval")  # rewards scored by a server: nothing of them on this process's device


def run_memory(
    config: str, overrides: list[str], *, device_gib: float = 80.0, as_json: bool = False
) -> Estimate:
    """``densegrpo-fast memory``: estimate, print the table and the verdict for a ``device_gib`` GPU."""
    import json
    import shutil
    import sys
    import tempfile
    import time
    from pathlib import Path

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.rewards import build_reward

    cfg = load_config(TrainConfig, config, overrides)
    _check_family(cfg)  # before the reward loads
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if as_json else print
    work = Path(tempfile.mkdtemp(prefix="densegrpo_memory_"))
    prompts = work / "prompts.txt"  # what the prompts say does not matter: the encoders pad to their length
    batch = cfg.eval.largest_batch
    n = max(2 * cfg.prompts.prompts_per_iteration, batch)
    prompts.write_text("".join(f"a photo of thing number {i}\n" for i in range(n)))
    notes = []
    others = [k for k, r in cfg.eval.rewards.items() if r != cfg.reward and r.name not in SERVED]
    if others:  # (one equal to the training reward is scored by its model: trainer.heldout_rewards)
        notes.append(
            f"eval.rewards {others}: their models, built for each held-out evaluation, are not counted"
        )
    reward_fn = None
    if cfg.reward.name in SERVED:
        notes.append(f"reward {cfg.reward.name!r} is scored by its server: nothing on this device")
    else:
        try:
            reward_fn = build_reward(cfg.reward.name, **cfg.reward.kwargs)
        except Exception as e:  # weights or an extra not on this machine: the reward's model is not counted
            notes.append(f"reward {cfg.reward.name!r} not counted: it does not load here ({type(e).__name__}: "
                         f"{str(e)[:160]})")  # fmt: skip
    if reward_fn is not None and not reward_modules(reward_fn):  # JPEG sizes and the like: nothing on the GPU
        notes.append(f"reward {cfg.reward.name!r} holds no model on this process's device: not counted")
        reward_fn = None
    cfg = load_config(TrainConfig, config, [
        *overrides, f"prompts.dataset={prompts}", f"eval.dataset={prompts}", f"run.output_dir={work / 'run'}",
        "run.tensorboard=false", "noise.kind=uniform", "model.device=cpu", "reward.name=redness", "reward.kwargs={}",
        "eval.rewards={}", f"eval.num_prompts={batch}",  # one batch: the evaluation's peak
    ])  # fmt: skip
    if cfg.sampling.reward_waves > 1:
        notes.append(
            f"sampling.reward_waves={cfg.sampling.reward_waves}: a wave is scored while the next rolls out, so "
            "the reward's transient adds to the rollout's; the phases are estimated one after the other"
        )
    t0 = time.perf_counter()
    mode = new_fake_mode()
    say(f"building {cfg.model.family} with fake weights ...")
    policy, source = fake_policy(cfg, mode)
    say(f"  from {source}")
    say(
        f"running one iteration at full size ({cfg.rows_per_iteration} trajectories, T={cfg.sampling.num_steps}"
        f") with each model call profiled once per shape ..."
    )
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            est = estimate_run(cfg, policy, reward_fn=reward_fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"  done in {time.perf_counter() - t0:.0f} s")
    notes += est.notes
    notes.append("not estimated: FSDP / torchrun jobs (this is one process holding the whole batch)")
    capacity = int(device_gib * GIB)
    if as_json:
        print(
            json.dumps(
                {**dataclasses.asdict(est), "source": source, "notes": notes, "device_bytes": capacity}
            )
        )
        return est
    print(est.table(capacity))
    worst = max(est.phases, key=est.phases.get)
    if est.peak > 0.9 * capacity:
        print(f"DOES NOT FIT with 10 % headroom: {_advice(worst, cfg)}")
    else:
        print(f"fits, with {(capacity - est.peak) / GIB:.1f} GiB to spare (allocated; keep ~10 % for the CUDA "
              "context and fragmentation)")  # fmt: skip
    for note in notes:
        print(f"note: {note}")
    return est
