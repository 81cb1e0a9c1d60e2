"""model.compile: the transformer's blocks under torch.compile (regional compilation).

On the CPU the compiled graphs run through a backend that runs each captured graph as it is, as torch's
``eager`` backend does (dynamo captures and guards each block as on a GPU, and the graph runs the same ops,
so results must not change at all), or, in the slow tier, through inductor's generated C++; the gpu tier
runs inductor's Triton kernels. What is checked: every block call runs a compiled graph (none falls back to
eager unnoticed), results are unchanged with adapters on and off and with gradients, the variants a run
needs stay within dynamo's cache, and a training run with it gives the metrics of one without it.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import cfg_of, records, without_timing

from densegrpo_fast.config import ConfigError, TrainConfig, load_config
from densegrpo_fast.policies.base import compile_blocks
from densegrpo_fast.policies.toy import ToyPolicy
from densegrpo_fast.trainer import train

GRAPHS: list[torch.fx.GraphModule] = []
GRAPH_CALLS = [0]  # calls of the captured graphs: one per block call that ran compiled


def _counting(gm, example_inputs):
    """A backend that records each graph dynamo captures and runs it as captured, counting its calls."""
    GRAPHS.append(gm)

    def run(*args):
        GRAPH_CALLS[0] += 1
        return gm.forward(*args)

    return run


if "densegrpo_counting" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(name="densegrpo_counting")(_counting)


@pytest.fixture
def fresh_dynamo():
    """No compiled code from earlier tests; a variant beyond dynamo's cache raises instead of running
    eagerly unnoticed."""
    torch._dynamo.reset()
    GRAPHS.clear()
    GRAPH_CALLS[0] = 0
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _transformer_calls(transformer) -> list[int]:
    """A counter of the transformer's calls (each calls every block once)."""
    calls = [0]
    transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _lora(transformer, targets=("attn.to_q", "attn.to_v")) -> None:
    """Adapters that change the output: peft starts lora_B at zero (an adapter that does nothing)."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))


def _velocities(policy, rows=(2, 3)):
    out = []
    for n in rows:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, *policy.latent_shape, generator=g)
        cond = policy.encode_prompts(["a red circle"] * n)
        out.append(policy.velocity(x, torch.full((n,), 0.6), cond, 1.5))
    return out


def test_compiled_blocks_give_the_eager_velocities_in_a_few_graphs(tiny_checkpoint, fresh_dynamo):
    policy = ToyPolicy.load(tiny_checkpoint)
    tr = policy.transformer
    _lora(tr)

    def variants(rows):  # the calls of a run: rollout (adapters on), KL reference (off), update (gradients)
        with torch.no_grad():
            on = _velocities(policy, rows)
            tr.disable_adapters()
            off = _velocities(policy, rows)
            tr.enable_adapters()
        v = _velocities(policy, rows[:1])[0]
        grads = torch.autograd.grad(v.square().mean(), [p for p in tr.parameters() if p.requires_grad])
        return on, off, grads

    eager = variants((2, 3))
    n = compile_blocks(tr, "densegrpo_counting")
    assert n == len(tr.transformer_blocks) == 2
    calls = _transformer_calls(tr)
    compiled = variants((2, 3))
    captured = len(GRAPHS)
    variants((5, 4))  # every variant again, at other batch sizes: nothing new to compile
    assert len(GRAPHS) == captured
    assert GRAPH_CALLS[0] == n * calls[0]  # every block call ran a compiled graph
    assert not torch.equal(eager[0][0], eager[1][0])  # the adapters change the velocity ...
    for a, b in zip(eager, compiled, strict=True):  # ... and the graphs run the blocks' own ops
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # a few variants of the block graph (8 on torch 2.13: the last layer's own, with and without gradients
    # and adapters, then with dynamic batch sizes), not one per layer and call
    assert 0 < captured <= 10, captured


@pytest.fixture
def counted_compile(monkeypatch):
    """The trainer's compile_blocks, counting the compiled transformers' calls and blocks."""
    import densegrpo_fast.trainer as trainer

    seen = []

    def compile_and_count(transformer, backend):
        seen.append((compile_blocks(transformer, backend), _transformer_calls(transformer)))

    monkeypatch.setattr(trainer, "compile_blocks", compile_and_count)
    return lambda: sum(n * calls[0] for n, calls in seen)


def test_a_run_with_compiled_blocks_has_the_metrics_of_one_without(
    tiny_checkpoint, tmp_path, fresh_dynamo, counted_compile
):
    base = records(train(cfg_of(tiny_checkpoint, tmp_path / "eager", iterations=2), progress=False))
    extra = ["model.compile=true", "model.compile_backend=densegrpo_counting"]
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "compiled", iterations=2, extra=extra), progress=False)
    assert GRAPH_CALLS[0] == counted_compile() > 0  # rollouts, update, evaluations: every block call compiled
    assert without_timing(records(run_dir)) == without_timing(base)


@pytest.mark.parametrize("backend", ["densegrpo_counting", pytest.param("inductor", marks=pytest.mark.slow)])
def test_an_fp32_compiled_run_is_on_policy(tiny_checkpoint, tmp_path, fresh_dynamo, backend):
    """In fp32 the update reuses the rollout's log-probs unless it recomputes them; with compiled blocks it
    recomputes (inductor's kernels at the update's batch sizes need not round as the rollout's did)."""
    extra = ["model.autocast=null", "lora.merge_for_sampling=false", "model.compile=true",
             f"model.compile_backend={backend}"]  # fmt: skip
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    (r,) = [r for r in records(run_dir) if "reward_mean" in r]
    # recomputed: the first ratio is 1 by construction (not reported), and in fp32 the rollout's log-probs
    # equal the update's to rounding
    assert r["ratio_dev_first"] is None and r["rollout_lp_dev"] < 1e-5


def test_a_copy_of_a_compiled_policy_runs_its_own_weights(tiny_checkpoint, fresh_dynamo):
    """The export deep-copies the policy: the copy's blocks must run the copy's weights (torch's copy of a
    module leaves its compiled wrapper behind, so the copy runs eagerly; one that kept the original's
    wrapper would run the original's weights)."""
    from densegrpo_fast.trainer import host_copy

    policy = ToyPolicy.load(tiny_checkpoint)
    compile_blocks(policy.transformer, "densegrpo_counting")
    with torch.no_grad():
        before = _velocities(policy, rows=(2,))[0]
        copied = host_copy(policy)
        for p in copied.transformer.transformer_blocks.parameters():
            p.zero_()
        assert not torch.equal(_velocities(copied, rows=(2,))[0], before)
        assert torch.equal(_velocities(policy, rows=(2,))[0], before)


def test_an_unknown_backend_is_refused_before_any_model_work(tmp_path):
    with pytest.raises(ConfigError, match="model.compile_backend='nope' is not a torch.compile backend"):
        load_config(TrainConfig, None, ["model.compile=true", "model.compile_backend=nope"])


def test_a_transformer_without_block_lists_is_refused():
    with pytest.raises(ValueError, match="has no block list"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
def test_inductor_on_the_cpu_gives_the_eager_velocities_closely(tiny_checkpoint, fresh_dynamo):
    policy = ToyPolicy.load(tiny_checkpoint)
    with torch.no_grad():
        eager = _velocities(policy)
        compile_blocks(policy.transformer, "inductor")
        compiled = _velocities(policy)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # fused kernels round differently


@pytest.mark.gpu
@pytest.mark.slow  # compiling takes a minute: not in gpu_suite.sh's test step (the kernels' minute or two)
def test_inductor_on_a_gpu_trains_with_the_eager_metrics_closely(tiny_checkpoint, tmp_path, fresh_dynamo):
    """Triton kernels generated for the blocks: the first iteration's rollout rewards of an fp32 run match
    the eager run's closely (fused kernels round differently), and the update is on-policy."""
    extra = ["model.device=cuda", "model.autocast=null", "lora.merge_for_sampling=false"]
    base = records(
        train(cfg_of(tiny_checkpoint, tmp_path / "eager", iterations=1, extra=extra), progress=False)
    )
    extra += ["model.compile=true"]
    comp = records(
        train(cfg_of(tiny_checkpoint, tmp_path / "compiled", iterations=1, extra=extra), progress=False)
    )
    (b,) = [r for r in base if "reward_mean" in r]
    (c,) = [r for r in comp if "reward_mean" in r]
    assert c["ratio_dev_first"] is None and c["rollout_lp_dev"] < 1e-5  # recomputed (see above)
    assert c["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-4)
    assert c["R_mean"] == pytest.approx(b["R_mean"], rel=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
@pytest.mark.parametrize("family", ["sd3.5", "flux", "z_image", "flux2_klein", "wan"])
def test_each_block_compiles_whole(family, checkpointing, fresh_dynamo):
    """No graph break in a block (``fullgraph=True`` raises at the first): the fused code covers each block
    from its first op to its last, with LoRA adapters and gradients, and under gradient checkpointing (which
    calls each block again in the backward). SD3.5-M's blocks at tiny widths (dual attention, RMS-normed q
    and k, the last block's context_pre_only), FLUX.1's double- and single-stream blocks, Z-Image's refiners
    and single-stream layers (captions of two lengths: the sequence is padded and masked), FLUX.2 [klein]'s
    blocks (the single-stream blocks' fused projection adapted). The output and the adapters' gradients are
    the uncompiled model's."""
    import copy

    from diffusers import SD3Transformer2DModel

    from densegrpo_fast.config import FLUX2_KLEIN_LORA_TARGETS, Z_IMAGE_LORA_TARGETS, LoRASection

    targets = LoRASection().target_modules
    if family == "z_image":
        import tiny_models

        t = tiny_models.z_image_pipeline().transformer
        targets = Z_IMAGE_LORA_TARGETS
        captions = [torch.randn(40, 16), torch.randn(19, 16)]
        call = (list(torch.randn(2, 4, 1, 16, 16).unbind(0)), torch.tensor([0.5, 0.3]), captions)

        def forward(model):
            return torch.stack(model(*call, return_dict=False)[0])
    elif family == "flux2_klein":
        import tiny_models
        from diffusers import Flux2KleinPipeline

        t = tiny_models.flux2_klein_pipeline().transformer
        targets = FLUX2_KLEIN_LORA_TARGETS
        latents, text = torch.randn(2, 16, 8, 8), torch.randn(2, 10, 48)
        klein = dict(
            hidden_states=Flux2KleinPipeline._pack_latents(latents), encoder_hidden_states=text,
            img_ids=Flux2KleinPipeline._prepare_latent_ids(latents), txt_ids=Flux2KleinPipeline._prepare_text_ids(text),
            timestep=torch.tensor([0.5, 0.3]), guidance=None,
        )  # fmt: skip

        def forward(model):
            return model(**klein, return_dict=False)[0]
    elif family == "wan":
        import tiny_models

        from densegrpo_fast.config import WAN_LORA_TARGETS

        t = tiny_models.wan_pipeline().transformer
        targets = WAN_LORA_TARGETS
        wan = dict(hidden_states=torch.randn(2, 16, 2, 4, 4), timestep=torch.tensor([500.0, 300.0]),
                   encoder_hidden_states=torch.randn(2, 24, 32))  # fmt: skip

        def forward(model):
            return model(**wan, return_dict=False)[0]
    elif family == "sd3.5":
        t = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
            pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
        )  # fmt: skip
        inputs = dict(hidden_states=torch.randn(2, 4, 16, 16), encoder_hidden_states=torch.randn(2, 10, 64))
    else:
        import tiny_models

        t = tiny_models.flux_pipeline().transformer
        inputs = dict(
            hidden_states=torch.randn(2, 64, 16), encoder_hidden_states=torch.randn(2, 10, 32),
            img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(10, 3), guidance=torch.full((2,), 3.5),
        )  # fmt: skip
    _lora(t, targets)
    if checkpointing:
        t.enable_gradient_checkpointing()
    if family not in ("z_image", "flux2_klein", "wan"):
        inputs.update(
            timestep=torch.tensor([0.5, 0.3]),
            pooled_projections=torch.randn(2, t.config.pooled_projection_dim),
        )

        def forward(model):
            return model(**inputs, return_dict=False)[0]

    def output_and_grads(model):
        out = forward(model)
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    compiled = copy.deepcopy(t)
    blocks = [b for child in compiled.children() if isinstance(child, torch.nn.ModuleList) for b in child]
    for block in blocks:
        block.compile(backend="densegrpo_counting", fullgraph=True)
    out, grads = output_and_grads(compiled)
    ref_out, ref_grads = output_and_grads(t)
    # every block ran compiled, once forward (and once more, recomputed, under checkpointing)
    assert GRAPH_CALLS[0] >= len(blocks)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_counting_a_rows_flops_leaves_the_blocks_compiled(tiny_checkpoint, fresh_dynamo):
    """real_model_iteration.py counts one row's FLOPs under FlopCounterMode after the trainer compiled the
    blocks. A compiled frame run under a dispatch mode is marked by dynamo to run eagerly for good, so the
    count runs under the ``force_eager`` stance; the calls after it must still run the compiled graphs."""
    import tiny_models
    from test_real_model_bench import _load_script

    from densegrpo_fast.policies.sd3 import SD3Policy

    bench = _load_script()
    opts = dict(resolution=tiny_models.RESOLUTION, max_sequence_length=tiny_models.MAX_T5_TOKENS)
    policy = SD3Policy(tiny_models.sd3_pipeline(), **opts)
    n = compile_blocks(policy.transformer, "densegrpo_counting")
    calls = _transformer_calls(policy.transformer)
    with torch.no_grad():
        _velocities(policy)  # 2 transformer calls (CFG in the batch)
        assert bench.transformer_row_flops(policy) > 0  # 1
        _velocities(policy)  # 2
    assert calls[0] == 5
    assert GRAPH_CALLS[0] == n * 4  # every call but the count's ran compiled


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_a_run_resumes_with_compiling_switched_on(tiny_checkpoint, tmp_path, fresh_dynamo):
    """model.compile changes how the blocks run, not what the run computes: --resume accepts it."""
    out = tmp_path / "run"
    train(cfg_of(tiny_checkpoint, out, iterations=1), progress=False)
    extra = ["model.compile=true", "model.compile_backend=densegrpo_counting"]
    train(cfg_of(tiny_checkpoint, out, iterations=2, extra=extra), resume=True, progress=False)
    assert [r["iteration"] for r in records(out) if "reward_mean" in r] == [1, 2]
    assert GRAPH_CALLS[0] > 0


@pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance: torch >= 2.6"
)
def test_an_evaluation_at_another_resolution_leaves_the_compiled_blocks_alone(fresh_dynamo, tmp_path):
    """eval.resolution with model.compile: the held-out evaluation at the other image size runs eagerly, so
    dynamo never meets a second sequence length (it would recompile the blocks shape-generic, and training
    would run those graphs too); the rollout at the training size then compiles as without an evaluation."""
    import tiny_models as tiny

    from densegrpo_fast.trainer import collect, heldout_rewards, setup

    tiny.sd3_pipeline(seed=0).save_pretrained(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    cfg = load_config(TrainConfig, None, [
        "model.family=sd3", f"model.checkpoint={tmp_path / 'sd3'}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", "model.compile=true",
        "model.compile_backend=densegrpo_counting", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=1",
        "sampling.num_steps=2", "sampling.group_size=2", "noise.kind=uniform", "reward.name=redness",
        "lora.rank=4", f"eval.dataset={prompts}", "eval.num_steps=2", "eval.resolution=48",
        f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false",
    ])  # fmt: skip
    run = setup(cfg, progress=False)
    heldout_rewards(run)
    assert GRAPHS == [] and GRAPH_CALLS[0] == 0  # the off-size evaluation: eager
    collect(run, run.prompts.sample(1, 0), 0)
    assert GRAPH_CALLS[0] > 0  # (the rollout at the training size: compiled)
