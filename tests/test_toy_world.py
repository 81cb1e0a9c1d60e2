"""Toy world: vocabulary, prompt grammar, the held-out split and the renderer."""

import numpy as np
import pytest
import torch

from densegrpo_fast.toy import world
from densegrpo_fast.toy.world import (
    CATEGORIES,
    HELD_OUT_PAIRINGS,
    HELD_OUT_RELATIONS,
    eval_prompts,
    make_prompt,
    parse_prompt,
    prompt_split,
    render,
    sample_prompts,
)


def test_every_prompt_parses_back_to_itself_and_uses_the_vocabulary():
    split = prompt_split()
    for part in ("train", "test"):
        for cat in CATEGORIES:
            assert split[part][cat], f"{part}/{cat} is empty"
            for p in split[part][cat]:
                assert p.category == cat
                assert parse_prompt(p.text) == p
                assert set(p.text.split()) <= set(world.VOCAB)


def test_test_split_holds_only_unseen_combinations():
    split = prompt_split()
    train_texts = {p.text for ps in split["train"].values() for p in ps}
    for cat in CATEGORIES:
        if cat == "single_object":  # three prompts, nothing to hold out: the same in both parts
            assert {p.text for p in split["test"][cat]} <= train_texts
            continue
        for p in split["test"][cat]:
            assert p.text not in train_texts, p.text
    # No training prompt names a held-out colour-shape pairing or a held-out relation.
    for ps in split["train"].values():
        for p in ps:
            assert not any((c, s) in HELD_OUT_PAIRINGS for s, c in p.objects if c), p.text
            if p.relation:
                assert (p.objects[0][0], p.relation, p.objects[1][0]) not in HELD_OUT_RELATIONS
    # ...but each held-out relation's converse is trained (same picture, other words).
    converse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    trained = {(p.objects[0][0], p.relation, p.objects[1][0]) for p in split["train"]["position"]}
    for a, rel, b in HELD_OUT_RELATIONS:
        assert (b, converse[rel], a) in trained


@pytest.mark.parametrize(
    "text",
    [
        "a circle circle",
        "five circles",
        "a red circle and a red",
        "a circle left of a circle",
        "a pink square",
        "",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt(text)


def test_requirements_per_category():
    kinds = {c: [r.kind for r in prompt_split()["test"][c][0].requirements] for c in CATEGORIES}
    assert kinds == {
        "single_object": ["present"],
        "two_object": ["present", "present"],
        "counting": ["present", "count"],
        "colors": ["present", "color"],
        "position": ["present", "present", "relation"],
        "color_attr": ["present", "present", "color", "color"],
    }


def test_render_is_deterministic_by_seed_and_draws_the_palette():
    ps = sample_prompts("train", 16, np.random.default_rng(3))
    assert [p.text for p in ps] == [p.text for p in sample_prompts("train", 16, np.random.default_rng(3))]
    a = render(ps, np.random.default_rng(7))
    b = render(ps, np.random.default_rng(7))
    c = render(ps, np.random.default_rng(8))
    assert a.shape == (16, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    palette = torch.tensor([world.BACKGROUND, *world.COLORS.values()])
    pixels = a.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.cdist(pixels, palette).min(1).values.max() < 1e-3  # only palette colours, no blending


def test_position_render_places_objects_by_the_relation():
    for rel in world.RELATIONS:
        p = make_prompt("position", (("circle", None), ("square", None)), rel)
        fg = render([p] * 8, np.random.default_rng(0)).sum(1) > 0  # [8, H, W]
        halves = (
            (fg[:, : world.CELL], fg[:, world.CELL :])
            if rel in ("above", "below")
            else (
                fg[:, :, : world.CELL],
                fg[:, :, world.CELL :],
            )
        )
        for half in halves:  # one object in each half along the relation's axis, in every image
            assert half.flatten(1).any(1).all(), rel


def test_eval_prompts_are_balanced_and_deterministic():
    ps = eval_prompts(60, seed=1)
    assert [p.category for p in ps[:6]] == list(CATEGORIES)
    assert all(sum(p.category == c for p in ps) == 10 for c in CATEGORIES)
    assert ps == eval_prompts(60, seed=1)
    test_texts = {p.text for v in prompt_split()["test"].values() for p in v}
    assert {p.text for p in ps} <= test_texts
