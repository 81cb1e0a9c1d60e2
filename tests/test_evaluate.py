"""The resumable evaluation of any policy (densegrpo_fast/evaluate.py), on a tiny random toy model."""

import json

import pytest
import torch

from densegrpo_fast.evaluate import evaluate, read_prompts
from densegrpo_fast.policies.toy import ToyArch, ToyPolicy
from densegrpo_fast.rewards import build_reward
from densegrpo_fast.schedule import sigma_grid

PROMPTS = ["a red circle", "two squares", "a blue triangle", "a circle left of a square", "three circles"]


def tiny_policy():
    torch.manual_seed(0)
    return ToyPolicy(ToyArch(num_layers=2, num_heads=2, head_dim=16, text_dim=32, pooled_dim=32))


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def run(policy, out, **kw):
    args = dict(guidance_scale=1.5, images_per_prompt=2, batch_size=3, seed=1, output_dir=out, progress=False)
    args.update(kw)
    return evaluate(policy, PROMPTS, {"redness": build_reward("redness")}, sigma_grid(4, 1.0), **args)


def rows(out):
    return [json.loads(ln) for ln in (out / "scores.jsonl").read_text().splitlines()]


def test_scores_do_not_depend_on_batch_size(policy, tmp_path):
    a = run(policy, tmp_path / "a", batch_size=3)
    b = run(policy, tmp_path / "b", batch_size=10)
    ra = {r["index"]: r["redness"] for r in rows(tmp_path / "a")}
    rb = {r["index"]: r["redness"] for r in rows(tmp_path / "b")}
    assert sorted(ra) == list(range(len(PROMPTS)))
    for i in ra:
        assert ra[i] == pytest.approx(rb[i], abs=1e-5)
    assert len(set(ra[0])) == 2  # two images of one prompt get different noise
    assert a["scores"]["redness"] == pytest.approx(b["scores"]["redness"], abs=1e-6)
    assert a["num_prompts"] == 5 and a["images_per_prompt"] == 2


def test_each_seed_draws_its_own_noise_and_seed_0_what_it_always_has(policy):
    """A CPU generator keeps its seed's low 32 bits: with the seed shifted past them (as before), every
    eval.seed drew seed 0's noise."""
    from densegrpo_fast.evaluate import noise_for

    draws = [noise_for(policy, s, 3, 1) for s in (0, 1, 5, 2**23 - 1)]  # (eval.seed: up to 2**23 - 1)
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])
    g = torch.Generator().manual_seed((3 << 8) + 1)  # seed 0's noise of old, which recorded figures used
    assert torch.equal(draws[0], torch.randn(*policy.latent_shape, generator=g))


def test_each_score_is_its_images_reward_and_the_summary_their_mean(policy, tmp_path):
    """The protocol, image by image: image j of prompt i starts from the noise seeded seed * 0x9E3779B1 +
    (i << 8) + j (mod 2^64), runs the Euler ODE of the grid with CFG, and is scored; the summary is the mean
    over every image (the tests above compare runs with each other, which share any bug of this)."""
    out = run(policy, tmp_path / "a")
    every = [s for r in rows(tmp_path / "a") for s in r["redness"]]
    assert len(every) == 10 and out["scores"]["redness"] == pytest.approx(sum(every) / 10, rel=1e-6)
    g = torch.Generator().manual_seed(0x9E3779B1 + (3 << 8) + 1)  # seed 1, prompt 3, image 1
    x = torch.randn(1, *policy.latent_shape, generator=g)
    sig = sigma_grid(4, 1.0)
    cond = policy.encode_prompts([PROMPTS[3]], with_negative=True)
    with torch.no_grad():
        for k in range(len(sig) - 1):
            x = x + policy.velocity(x, sig[k].expand(1), cond, 1.5) * (sig[k + 1] - sig[k])
        want = build_reward("redness")(policy.decode(x), [PROMPTS[3]]).item()
    (row,) = [r for r in rows(tmp_path / "a") if r["index"] == 3]
    assert row["redness"][1] == pytest.approx(want, abs=1e-6) and row["redness"][0] != pytest.approx(want)


def test_killed_evaluation_resumes_to_the_same_scores(policy, tmp_path):
    full = run(policy, tmp_path / "full")
    out = tmp_path / "cut"
    run(policy, out, save_images=True)
    lines = (out / "scores.jsonl").read_text().splitlines()
    (out / "scores.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if killed after two prompts
    resumed = run(policy, out, save_images=True)
    assert [r["index"] for r in rows(out)] == list(range(len(PROMPTS)))
    assert resumed["scores"]["redness"] == pytest.approx(full["scores"]["redness"], abs=1e-6)
    assert len(list((out / "images").glob("*.png"))) == 2 * len(PROMPTS)


def test_a_score_line_cut_short_by_a_kill_is_scored_again(policy, tmp_path):
    full = run(policy, tmp_path / "full")
    out = tmp_path / "cut"
    run(policy, out)
    lines = (out / "scores.jsonl").read_text().splitlines()
    (out / "scores.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # killed mid-write
    resumed = run(policy, out)
    assert [r["index"] for r in rows(out)] == list(range(len(PROMPTS)))
    assert resumed["scores"]["redness"] == pytest.approx(full["scores"]["redness"], abs=1e-6)
    (out / "scores.jsonl").write_text(lines[0] + "\n{oops\n" + lines[2] + "\n")  # damage elsewhere: say where
    with pytest.raises(ValueError, match=r"scores.jsonl, line 2, is not a JSON object .*delete that line"):
        run(policy, out)


@pytest.mark.parametrize(
    "line",
    [
        '{"prompt": "a red circle", "redness": [0.1, 0.2]}',  # no index
        '{"index": -1, "prompt": "a red circle", "redness": [0.1, 0.2]}',
        '{"index": 0.0, "prompt": "a red circle", "redness": [0.1, 0.2]}',
        '{"index": true, "prompt": "a red circle", "redness": [0.1, 0.2]}',
        '{"index": 0, "redness": [0.1, 0.2]}',  # no prompt
        '{"index": 0, "prompt": "a red circle", "redness": [0.1]}',  # one image of two
        '{"index": 0, "prompt": "a red circle", "redness": 0.1}',
        '{"index": 0, "prompt": "a red circle", "redness": [0.1, "0.2"]}',
        '{"index": 0, "prompt": "a red circle", "redness": [0.1, 1'
        + "0" * 400
        + "]}",  # (past float's range)
    ],
)
def test_a_hand_damaged_score_line_is_named_with_the_rule(policy, tmp_path, line):
    out = tmp_path / "e"
    run(policy, out)
    lines = (out / "scores.jsonl").read_text().splitlines()
    (out / "scores.jsonl").write_text("\n".join([line, *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"scores.jsonl holds a line that is not a prompt's scores .*2 numbers.*"
                                         r"mend or delete that line"):  # fmt: skip
        run(policy, out)
    (out / "scores.jsonl").write_text("\n".join(lines[1:]) + "\n")  # deleted: that prompt is scored again
    assert [r["index"] for r in rows(out)] == list(range(1, len(PROMPTS)))
    run(policy, out)
    assert sorted(r["index"] for r in rows(out)) == list(range(len(PROMPTS)))


def test_the_protocol_leaves_out_how_a_reward_is_reached_at_any_depth():
    from densegrpo_fast.evaluate import scoring_settings

    multi = {"name": "multi", "kwargs": {"rewards": {"far": {"name": "remote", "kwargs": {"url": "http://x:1",
             "timeout_s": 5}}, "near": {"name": "pickscore", "kwargs": {"model": "/w/ps", "max_batch": 8}}}}}  # fmt: skip
    assert scoring_settings({"m": multi}) == {"m": {"name": "multi", "kwargs": {"rewards": {
        "far": {"name": "remote", "kwargs": {}}, "near": {"name": "pickscore", "kwargs": {"model": "/w/ps"}}}}}}  # fmt: skip


def test_an_evaluation_begun_by_an_older_version_resumes(policy, tmp_path):
    """Entries an older protocol held and this one no longer does (checkpoint_sample, a hash of an export's
    bytes; lora_identity, now lora_weights) are not compared."""
    out = tmp_path / "e"
    full = run(policy, out)
    saved = json.loads((out / "protocol.json").read_text())
    old = {**saved, "checkpoint_sample": "0" * 64, "lora_identity": {"file": "x", "sha256": "1" * 64}}
    (out / "protocol.json").write_text(json.dumps(old))
    lines = (out / "scores.jsonl").read_text().splitlines()
    (out / "scores.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert run(policy, out)["scores"]["redness"] == pytest.approx(full["scores"]["redness"], abs=1e-6)


def test_an_output_dir_or_scores_file_of_the_wrong_kind_is_named(policy, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="eval.output_dir .*file' is a file, not a directory"):
        run(policy, tmp_path / "file")
    (tmp_path / "e" / "scores.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError, match="scores.jsonl is not a file .*move it away"):
        run(policy, tmp_path / "e")


def test_scores_that_are_not_finite_enter_no_mean_and_are_counted(policy, tmp_path):
    """A reward that fails on some images (NaN) leaves the mean of the others, counted and warned about;
    a reward with no finite score has no mean (null), and the per-tag means follow."""

    def flaky(images, prompts):
        r = build_reward("redness")(images, prompts)
        return torch.where(torch.tensor(["two" in p for p in prompts]), torch.nan, r)

    rewards = {
        "redness": build_reward("redness"),
        "flaky": flaky,
        "dead": lambda i, p: torch.full((len(p),), torch.inf),
    }
    args = dict(guidance_scale=1.5, images_per_prompt=2, batch_size=3, seed=1, progress=False)
    tags = ["a", "b", "a", "b", "a"]
    with pytest.warns(
        UserWarning, match=r"not finite .*flaky: 2, prompts \[1\]; dead: 10, prompts \[0, 1, 2, 3, 4\]"
    ):
        out = evaluate(
            policy, PROMPTS, rewards, sigma_grid(4, 1.0), output_dir=tmp_path / "e", tags=tags, **args
        )
    every = {r["index"]: r for r in rows(tmp_path / "e")}
    good = [s for i, r in every.items() if i != 1 for s in r["redness"]]
    assert out["scores"]["flaky"] == pytest.approx(sum(good) / 8, rel=1e-6)
    assert out["scores"]["dead"] is None and out["nonfinite_scores"] == {"flaky": 2, "dead": 10}
    b = [s for i in (3,) for s in every[i]["redness"]]
    assert out["by_tag"]["flaky"]["b"] == pytest.approx(sum(b) / 2, rel=1e-6)
    assert out["tag_mean"]["dead"] is None and out["tag_mean"]["redness"] is not None
    text = (tmp_path / "e" / "summary.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))  # strict JSON
    assert saved["scores"]["dead"] is None


def test_resuming_with_other_rewards_is_an_error(policy, tmp_path):
    run(policy, tmp_path / "e")
    with pytest.raises(ValueError, match="new directory"):
        evaluate(policy, PROMPTS, {"other": build_reward("redness")}, sigma_grid(4, 1.0), guidance_scale=1.5,
                 output_dir=tmp_path / "e", progress=False)  # fmt: skip


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "tag": "x"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat"]
    with pytest.raises(ValueError, match="not shipped"):
        read_prompts(tmp_path / "missing.txt")


def test_per_tag_means_average_over_tasks_as_geneval_does(policy, tmp_path):
    tags = ["colors", "two_object", "colors", "position", "counting"]
    s = run(policy, tmp_path / "t", tags=tags)
    per_prompt = {r["index"]: sum(r["redness"]) / 2 for r in rows(tmp_path / "t")}
    by_tag = {t: [per_prompt[i] for i in range(5) if tags[i] == t] for t in dict.fromkeys(tags)}
    want = {t: sum(v) / len(v) for t, v in by_tag.items()}
    assert s["by_tag"]["redness"] == pytest.approx(want)
    assert s["tag_mean"]["redness"] == pytest.approx(sum(want.values()) / 4)  # over 4 tasks, not 5 prompts
    assert s["tag_mean"]["redness"] != pytest.approx(s["scores"]["redness"])
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["by_tag"] == s["by_tag"]
    assert "by_tag" not in run(policy, tmp_path / "u")
    with pytest.raises(ValueError, match="4 tags for 5 prompts"):
        run(policy, tmp_path / "v", tags=tags[:4])


def test_prompt_tags_of_a_jsonl_file(tmp_path):
    from densegrpo_fast.prompts import prompt_tags

    (tmp_path / "m.jsonl").write_text('{"prompt": "a", "tag": "colors"}\n\n{"prompt": "b"}\n')
    assert prompt_tags(tmp_path / "m.jsonl") == ["colors", None]
    (tmp_path / "M.JSONL").write_text('{"prompt": "a", "tag": "colors"}\n')
    assert prompt_tags(tmp_path / "M.JSONL") == ["colors"] and read_prompts(tmp_path / "M.JSONL") == ["a"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n[1]\n')
    with pytest.raises(ValueError, match="eval.dataset=.*line 2: a .jsonl prompt file holds one JSON object"):
        prompt_tags(tmp_path / "bad.jsonl")
    (tmp_path / "n.jsonl").write_text('{"prompt": "a"}\n')
    assert prompt_tags(tmp_path / "n.jsonl") is None
    (tmp_path / "p.txt").write_text("a\n")
    assert prompt_tags(tmp_path / "p.txt") is None


def test_tags_survive_a_resume_and_untagged_prompts_enter_no_task(policy, tmp_path):
    tags = ["colors", None, "colors", "position", None]
    first = run(policy, tmp_path / "t", tags=tags)
    assert set(first["by_tag"]["redness"]) == {"colors", "position"} and first["untagged_prompts"] == 2
    lines = (tmp_path / "t" / "scores.jsonl").read_text().splitlines()
    (tmp_path / "t" / "scores.jsonl").write_text("\n".join(lines[:3]) + "\n")  # as if killed after 3 prompts
    again = run(policy, tmp_path / "t", tags=tags)
    assert again["by_tag"] == first["by_tag"] and again["tag_mean"] == first["tag_mean"]
    only_untagged = run(
        policy, tmp_path / "u", tags=[None] * 5
    )  # e.g. the first lines of a partly tagged file
    assert "by_tag" not in only_untagged and only_untagged["untagged_prompts"] == 5


def test_a_changed_prompt_file_is_not_resumed_onto(policy, tmp_path):
    run(policy, tmp_path / "t")
    edited = [PROMPTS[1], PROMPTS[0], *PROMPTS[2:]]
    with pytest.raises(
        ValueError, match="holds scores of prompt 0 'a red circle', but the prompt file has 'two"
    ):
        evaluate(policy, edited, {"redness": build_reward("redness")}, sigma_grid(4, 1.0), guidance_scale=1.5,
                 images_per_prompt=2, batch_size=3, seed=1, output_dir=tmp_path / "t", progress=False)  # fmt: skip


def test_the_protocol_check_compares_what_changes_scores(policy, tmp_path, monkeypatch):
    from densegrpo_fast.evaluate import scoring_settings

    rewards = {"geneval": {"name": "geneval", "kwargs": {"url": "http://127.0.0.1:8085", "mode": "geneval"}}}
    moved = {"geneval": {"name": "geneval", "kwargs": {"url": "http://10.0.0.2:9000", "mode": "geneval"}}}
    assert scoring_settings(rewards) == scoring_settings(moved)  # another port: the same scores
    strict = {"geneval": {"name": "geneval", "kwargs": {"url": "http://127.0.0.1:8085", "mode": "exact"}}}
    assert scoring_settings(rewards) != scoring_settings(strict)
    # a dataset named relative or absolute is one file
    (tmp_path / "p.txt").write_text("a red circle\n")
    monkeypatch.chdir(tmp_path)
    run(policy, tmp_path / "ev", info={"dataset": "p.txt"})
    run(policy, tmp_path / "ev", info={"dataset": str(tmp_path / "p.txt")})
    with pytest.raises(ValueError, match="another protocol"):
        run(policy, tmp_path / "ev", info={"dataset": str(tmp_path / "other.txt")})
    # a protocol.json cut short when first written is named, with the fix
    (tmp_path / "ev" / "protocol.json").write_text('{"num_prompts": 5, "ima')
    with pytest.raises(ValueError, match=r"protocol.json is not JSON .*delete it"):
        run(policy, tmp_path / "ev")
    for other in ("null", '"seed"', "[]"):  # JSON, but not a protocol: none of it turns the checks off
        (tmp_path / "ev" / "protocol.json").write_text(other)
        with pytest.raises(
            ValueError, match=r"protocol.json holds \w+ .*not the JSON object an evaluation writes"
        ):
            run(policy, tmp_path / "ev")


def test_more_than_256_images_per_prompt_are_refused():
    from densegrpo_fast.config import ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match="eval.images_per_prompt = 257"):
        load_config(TrainConfig, None, ["eval.images_per_prompt=257"])


def test_a_resume_against_a_server_hosting_another_reward_is_refused(policy, tmp_path):
    """The url of a served reward may change on a resume (a restarted server), but not what it scores:
    the protocol records what each server said it hosts, and a digest of its --kwargs."""
    from densegrpo_fast.rewards.server import RewardServer, kwargs_digest

    servers = [
        RewardServer(build_reward(n), name=n).start() for n in ("redness", "redness", "jpeg_compressibility")
    ]
    servers.append(RewardServer(build_reward("redness"), name="redness", kwargs={"other": 1}).start())
    try:
        served = [{"remote": build_reward("remote", url=s.url)} for s in servers]
        sums = {
            "sum": build_reward(
                "multi", rewards={"jpeg": {"name": "remote", "kwargs": {"url": servers[2].url}}}
            )
        }
        args = dict(
            guidance_scale=1.5, images_per_prompt=1, batch_size=5, output_dir=tmp_path, progress=False
        )
        first = evaluate(policy, PROMPTS[:2], served[0], sigma_grid(2, 1.0), **args)
        protocol = json.loads((tmp_path / "protocol.json").read_text())
        assert protocol["served"] == {"remote": [{"reward": "redness"}]}
        assert protocol["served_kwargs"] == {"remote": [kwargs_digest(None)]}
        sampled = []  # (the resumed evaluation samples nothing; its wall time, a health check over loopback
        # included, is no measure of that on a loaded machine: it read 1 ms once)
        velocity = policy.velocity
        policy.velocity = lambda *a, **kw: sampled.append(1) or velocity(*a, **kw)
        try:
            again = evaluate(policy, PROMPTS[:2], served[1], sigma_grid(2, 1.0), **args)  # moved: resumed
        finally:
            del policy.velocity
        assert again["scores"] == first["scores"] and not sampled
        with pytest.raises(ValueError, match=r"another protocol \(served: \{'remote': \[\{'reward': 'redness'\}\]\} -> "
                           r"\{'remote': \[\{'reward': 'jpeg_compressibility'\}\]\}\)"):  # fmt: skip
            evaluate(policy, PROMPTS[:2], served[2], sigma_grid(2, 1.0), **args)
        with pytest.raises(
            ValueError, match=r"another protocol \(served_kwargs: \{'remote': \['[0-9a-f]{16}'\]\}"
        ):
            evaluate(policy, PROMPTS[:2], {"remote": build_reward("remote", url=servers[3].url)}, sigma_grid(2, 1.0),
                     **args)  # fmt: skip
        # an evaluation begun by a version whose protocol has no digests resumes
        old = json.loads((tmp_path / "protocol.json").read_text())
        del old["served_kwargs"]
        (tmp_path / "protocol.json").write_text(json.dumps(old))
        assert (
            evaluate(policy, PROMPTS[:2], served[1], sigma_grid(2, 1.0), **args)["scores"] == first["scores"]
        )
        unchecked = {"remote": build_reward("remote", url=servers[2].url, check=False)}  # (it did not ask)
        assert (
            evaluate(policy, PROMPTS[:2], unchecked, sigma_grid(2, 1.0), **args)["scores"] == first["scores"]
        )
    finally:
        for s in servers:
            s.stop()
    from densegrpo_fast.rewards.remote import served_by

    assert served_by({**sums, "local": build_reward("redness")}) == {
        "sum": [{"reward": "jpeg_compressibility", "kwargs_digest": kwargs_digest(None)}]
    }


def test_a_missing_checkpoint_is_named_before_anything_loads(tmp_path, monkeypatch):
    from pathlib import Path

    from densegrpo_fast import evaluate as ev
    from densegrpo_fast.evaluate import run_eval

    monkeypatch.setattr(
        ev.distributed, "check_device", lambda *a: pytest.fail("got past the checkpoint check")
    )
    flux = Path(__file__).parents[1] / "configs" / "flux_pickscore.yaml"
    with pytest.raises(ValueError, match=r"--checkpoint '.*policy_ema.safetnsors' does not exist"):
        run_eval(str(flux), [], checkpoint=str(tmp_path / "policy_ema.safetnsors"))
    with pytest.raises(
        ValueError, match=r"--checkpoint '.*' is a directory: give the policy_ema.safetensors"
    ):
        run_eval(str(flux), [], checkpoint=str(tmp_path))
