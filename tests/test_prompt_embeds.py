"""PromptEmbeds: a table per field and a row index (one table row per distinct prompt)."""

import pytest
import torch

from densegrpo_fast.policies.base import PromptEmbeds

L, D, P = 5, 4, 3


def encoder(calls):
    """A stand-in text encoder: prompt -> a constant row determined by its text, and a log of its calls."""

    def encode(prompts):
        calls.append(list(prompts))
        code = torch.tensor([float(sum(map(ord, p)) % 97) for p in prompts])
        return code[:, None, None] + torch.arange(L * D).view(1, L, D), code[:, None] * torch.ones(1, P)

    return encode


def per_row(prompts, negative=None):
    """The plain construction the tables stand for: every row encoded on its own."""
    e, p = encoder([])(prompts)
    if negative is None:
        return e, p, None, None
    return e, p, negative[0].expand(len(prompts), L, D), negative[1].expand(len(prompts), P)


PROMPTS = ["a red circle", "a red circle", "two squares", "two squares", "a red circle", "a cat"]


def test_deduplicated_encodes_each_prompt_once_and_reads_per_row():
    calls = []
    neg = (torch.full((1, L, D), -1.0), torch.full((1, P), -2.0))
    cond = PromptEmbeds.deduplicated(encoder(calls), PROMPTS, neg)
    assert calls == [["a red circle", "two squares", "a cat"]]  # first-seen order, once each
    assert len(cond) == 6 and cond.tables["embeds"].shape == (3, L, D)
    for got, want in zip(
        (cond.embeds, cond.pooled, cond.neg_embeds, cond.neg_pooled), per_row(PROMPTS, neg), strict=True
    ):
        assert torch.equal(got, want)
    # the negative's one row is broadcast, not copied
    assert cond.neg_embeds.stride(0) == 0 and cond.neg_embeds.data_ptr() == neg[0].data_ptr()
    distinct = PromptEmbeds.deduplicated(encoder([]), ["x", "y"])
    assert distinct.rows is None and distinct.neg_embeds is None and len(distinct) == 2


def test_index_and_cat_share_the_tables():
    cond = PromptEmbeds.deduplicated(encoder([]), PROMPTS)
    e = per_row(PROMPTS)[0]
    idx = torch.tensor([5, 0, 3, 3])
    sub = cond.index(idx).index(slice(1, 4))  # indices compose
    assert sub.tables["embeds"] is cond.tables["embeds"]
    assert torch.equal(sub.embeds, e[idx][1:4])
    both = PromptEmbeds.cat([cond, cond.index(slice(0, 2))])
    assert both.tables["embeds"] is cond.tables["embeds"] and torch.equal(both.embeds, torch.cat([e, e[:2]]))
    # batches with tables of their own: their rows are gathered into new tables
    other = PromptEmbeds.deduplicated(encoder([]), ["a cat", "a dog"])
    mixed = PromptEmbeds.cat([cond, other])
    assert len(mixed) == 8 and torch.equal(mixed.embeds, torch.cat([e, per_row(["a cat", "a dog"])[0]]))


def test_plain_per_row_tensors_still_work():
    e, p, _, _ = per_row(PROMPTS)
    cond = PromptEmbeds(e, p)
    assert len(cond) == 6 and cond.embeds is e and torch.equal(cond.index(slice(2, 4)).pooled, p[2:4])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(pooled=torch.zeros(2, P)), "pooled has 2 rows and embeds 3"),
        (dict(neg_embeds=torch.zeros(1, L, D)), "give both"),
        (
            dict(neg_embeds=torch.zeros(2, L, D), neg_pooled=torch.zeros(2, P)),
            "neg_embeds has 2 rows: give 1",
        ),
        (dict(rows=torch.tensor([0.0, 1.0])), "1-d LongTensor"),
    ],
)
def test_bad_construction(kw, match):
    args = dict(embeds=torch.zeros(3, L, D), pooled=torch.zeros(3, P)) | kw
    with pytest.raises(ValueError, match=match):
        PromptEmbeds(**args)
