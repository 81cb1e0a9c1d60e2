"""The pieces of merged_lora_bf16.py on a tiny-width SD3 (1 layer, 2 heads), where they can be checked."""

from __future__ import annotations

import copy

import merged_lora_bf16 as mlb
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, text_tokens = mlb.build(layers=1, width_heads=2, text_tokens=8)
    yield model, mlb.inputs(model, text_tokens, resolution=32)
    torch.set_num_threads(threads)


def test_every_adapter_gets_the_asked_ratio_and_the_base_is_on_the_bf16_grid(tiny):
    base, _ = tiny
    for p in base.parameters():
        assert torch.equal(p, p.to(torch.bfloat16).float())
    model = mlb.add_adapters(copy.deepcopy(base), 0.02)
    layers = _lora_layers(model)
    assert len(layers) == 7  # Flow-GRPO's attention projections of the one (last: no to_add_out) block
    for m in layers:
        w, delta = m.get_base_layer().weight, m.get_delta_weight("default")
        assert (delta.pow(2).mean() / w.pow(2).mean()).sqrt().item() == pytest.approx(0.02, rel=1e-4)


def test_merging_in_fp32_is_the_exact_policy_and_in_bf16_drops_what_is_below_half_a_step(tiny):
    base, x = tiny
    v_base = mlb.velocity(base, x)
    with mlb.bf16_base(base):
        v_base_bf16 = mlb.velocity(base, x)
    model = mlb.add_adapters(copy.deepcopy(base), 0.05)
    v_exact = mlb.velocity(model, x)
    with mlb.merged(model):
        torch.testing.assert_close(mlb.velocity(model, x), v_exact, rtol=1e-5, atol=1e-5)
    assert (v_exact - v_base).abs().max() > 1e-3  # the adapters do change the velocity
    fp32 = {n: p.clone() for n, p in model.named_parameters()}
    with mlb.bf16_base(model):
        layers = _lora_layers(model)
        weights = [m.get_base_layer().weight.detach().clone() for m in layers]
        for (name, p), q in zip(model.named_parameters(), fp32.values(), strict=True):
            assert p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16)
            assert torch.equal(p.float(), q)  # the base exactly (it is on the grid), the adapters unrounded
        with mlb.merged(model):
            for m, w in zip(layers, weights, strict=True):
                expected = (w.float() + m.get_delta_weight("default")).to(torch.bfloat16)
                assert torch.equal(m.get_base_layer().weight, expected)
    assert all(torch.equal(p, fp32[n]) for n, p in model.named_parameters())  # all back in fp32
    assert torch.equal(mlb.velocity(model, x), v_exact)
    # adapters far below half a bf16 step of their weights round away whole: the merged model is the base
    mlb.add_adapters(model, 1e-5)
    with mlb.bf16_base(model), mlb.merged(model):
        assert torch.equal(mlb.velocity(model, x), v_base_bf16)


def test_large_adapters_are_kept_by_both_samplers_and_tiny_ones_lost_by_both(tiny):
    large, tiny_rho = mlb.measure(1, 32, rhos=(1.0, 1e-5), width_heads=2, text_tokens=8)
    for key in ("kept_unmerged", "kept_merged"):
        assert large[key] == pytest.approx(1.0, abs=0.05)
    assert large["error_merged"] < 0.3 and large["error_unmerged"] < 0.3
    # unmerged, the fp32 adapter's output is added to the bf16 layer's and the sum cast back to bf16: an
    # output below half a bf16 step rounds away as the merged weight's delta does
    assert tiny_rho["kept_merged"] == tiny_rho["kept_unmerged"] == 0.0
    assert tiny_rho["merged_vs_unmerged"] == 0.0
    assert tiny_rho["error_unmerged"] > 1000  # bf16's own rounding dwarfs such adapters' effect
