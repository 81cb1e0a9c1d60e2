"""Prompt sources: the pool behind each draw, and priority sampling."""

import collections

import numpy as np
import pytest

from densegrpo_fast.prompts import PromptPriority, PromptSource
from densegrpo_fast.toy import world


def test_toy_pool_weights_draw_like_the_source_itself():
    src = PromptSource("toy:train", seed=0)
    texts, probs = src.pool()
    assert len(texts) == sum(map(len, world.prompt_split()["train"].values()))
    assert probs.sum() == pytest.approx(1.0)
    category = {p.text: c for c, ps in world.prompt_split()["train"].items() for p in ps}
    n = 6000
    plain = collections.Counter(category[t] for i in range(n // 4) for t in src.sample(4, i))
    pooled = collections.Counter(
        category[t] for i in range(n // 4) for t in src.sample(4, i, weights=np.ones(len(texts)))
    )
    for c in world.CATEGORIES:  # a uniform category either way (one standard error ~0.005)
        assert plain[c] / n == pytest.approx(1 / 6, abs=0.025)
        assert pooled[c] / n == pytest.approx(1 / 6, abs=0.025)


def test_file_pool_counts_repeated_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\na cat\n")
    texts, probs = PromptSource(str(path)).pool()
    assert texts == ["a cat", "a dog", "a cat"] and np.allclose(probs, 1 / 3)


def test_priority_sampling_follows_the_groups_signal(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\nprompt 3\n")
    pri = PromptPriority(PromptSource(str(path)), floor=1e-9)
    assert np.all(pri.signal == 1.0)  # unseen prompts first
    pri.observe([f"prompt {i}" for i in range(10) if i not in (3, 7)], [0.0] * 8)
    pri.observe(["prompt 3", "prompt 7"], [0.5, 1.0])
    assert pri.signal[3] == pri.signal[10] == 0.75 and pri.signal[7] == 1.0 and pri.signal[0] == 0.5
    pri.observe([f"prompt {i}" for i in range(10) if i not in (3, 7)], [0.0] * 8)  # 0.5 -> 0.25
    draws = collections.Counter(t for i in range(200) for t in pri.sample(4, i))
    # weights: prompt 3 twice (0.75 each) against prompt 7 (1.0) and eight prompts at 0.25
    assert draws["prompt 3"] > draws["prompt 7"] > draws["prompt 0"] > 0
    shares = {t: v / 800 for t, v in draws.items()}
    total = 1.5 + 1.0 + 8 * 0.25
    assert shares["prompt 3"] == pytest.approx(1.5 / total, abs=0.05)
    assert shares["prompt 7"] == pytest.approx(1.0 / total, abs=0.05)
    # the table is the sampler's whole state: a copy restored from it draws the same prompts
    other = PromptPriority(PromptSource(str(path)), floor=1e-9)
    other.load_state_dict(pri.state_dict())
    assert [other.sample(4, i) for i in range(5)] == [pri.sample(4, i) for i in range(5)]
    with pytest.raises(ValueError, match="11 prompts, the dataset 'toy:train' 127"):
        PromptPriority(PromptSource("toy:train"), 0.1).load_state_dict(pri.state_dict())


def test_lines_end_at_newlines_only(tmp_path):
    """A form feed, U+0085 or U+2028 inside a prompt (or a .jsonl string) does not split it, as
    str.splitlines would; Windows line ends are stripped."""
    import json

    from densegrpo_fast.prompts import prompt_records

    text = tmp_path / "p.txt"
    text.write_text("line\x0csplit\r\nend\x85nel\n\nlast\u2028one", encoding="utf-8")
    assert [p for p, _ in prompt_records(text, "eval.dataset")] == [
        "line\x0csplit",
        "end\x85nel",
        "last\u2028one",
    ]
    rows = tmp_path / "p.jsonl"
    rows.write_text(
        json.dumps({"prompt": "a\u2028b", "tag": "colors"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    assert prompt_records(rows, "eval.dataset") == [("a\u2028b", "colors")]
