"""The ``vlm_judge`` reward (densegrpo_fast/rewards/vlm_judge.py) against a stand-in OpenAI-compatible server
on loopback, which reads each PNG it is sent: the scores prove the image and the prompt made the trip."""

import base64
import collections
import io
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from densegrpo_fast.rewards import build_reward, kwargs_problems
from densegrpo_fast.rewards.vlm_judge import JudgeError


class Judge:
    """A stand-in server: ``/v1/models`` lists ``models``; ``/v1/chat/completions`` answers from the image's
    mean red (r in [0, 1]): "Final Score: {1 + 4 r}" in score mode, P(yes) = r spread over " Yes" and "yes"
    in logprob mode. ``fail``: statuses to answer first, one per request; ``reply``: a fixed answer text."""

    def __init__(self, models=("judge-7b",), fail=(), reply=None, logprobs=True):
        self.models, self.fail, self.reply, self.logprobs = list(models), list(fail), reply, logprobs
        self.delay_s = 0.0  # per completion: requests in flight together overlap
        self.raw = None  # an answer to send as it is, in place of a completion
        self.redirect_to = ""  # where a 30x in ``fail`` points
        self.bias = 0.0  # vlm_pairwise: the judge's leaning to the first image, in logits
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path != "/v1/models":
                    return self.answer(404, {"error": "not found"})
                self.answer(
                    200, {"object": "list", "data": [{"id": m, "object": "model"} for m in judge.models]}
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append(body)
                    judge.headers.append(dict(self.headers))
                    code = judge.fail.pop(0) if judge.fail else 200
                    judge.in_flight += 1
                    judge.most_in_flight = max(judge.most_in_flight, judge.in_flight)
                time.sleep(judge.delay_s)
                out = judge.complete(body) if code == 200 else {"error": {"message": f"status {code}"}}
                with judge.lock:  # (before the answer goes: its client may send the next request at once)
                    judge.in_flight -= 1
                if code in (301, 302, 307):
                    self.send_response(code)
                    self.send_header("Location", judge.redirect_to)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.answer(code, out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def complete(self, body: dict) -> dict:
        from PIL import Image

        if self.raw is not None:
            return self.raw

        import numpy as np

        def mean_red(image: dict) -> float:
            png = base64.b64decode(image["image_url"]["url"].removeprefix("data:image/png;base64,"))
            return float(
                np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)[..., 0].mean() / 255
            )

        *_, image, text = body["messages"][0]["content"]  # (an edit's source image comes before it)
        if (
            "Image 1" in text["text"]
        ):  # vlm_pairwise: the last two images are the pair, P(first) from their reds
            first, second = map(mean_red, body["messages"][0]["content"][-3:-1])
            p = 1 / (1 + math.exp(-(8 * (first - second) + self.bias)))
            if body.get("logprobs") and not self.logprobs:
                return {"choices": [{"message": {"content": "1"}, "logprobs": None}]}
            if body.get("logprobs"):
                top = [{"token": "1", "logprob": math.log(p)}, {"token": " 2", "logprob": math.log(1 - p)},
                       {"token": "Image", "logprob": -6.0}]  # fmt: skip
                return {"choices": [{"message": {"content": "1"}, "logprobs": {"content": [{"token": "1",
                        "logprob": top[0]["logprob"], "top_logprobs": top}]}}]}  # fmt: skip
            verdict = self.reply if self.reply is not None else f"Image {1 if p >= 0.5 else 2} is better"
            return {
                "choices": [{"message": {"content": f"Both show it. {verdict}."}, "finish_reason": "stop"}]
            }
        red = mean_red(image)
        if body.get("logprobs"):
            if not self.logprobs:
                return {"choices": [{"message": {"content": "Yes"}, "logprobs": None}]}
            half = math.log(red / 2) if red > 0 else -1e9
            top = [{"token": " Yes", "logprob": half}, {"token": "yes", "logprob": half},
                   {"token": "No", "logprob": math.log(1 - red) if red < 1 else -1e9}, {"token": "Maybe", "logprob": -1}]  # fmt: skip
            return {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": " Yes",
                    "logprob": half, "top_logprobs": top}]}}]}  # fmt: skip
        content = (
            self.reply
            if self.reply is not None
            else f"The caption is {text!r}. Final Score: {1 + 4 * red:.6f}"
        )
        return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge():
    j = Judge()
    yield j
    j.stop()


def images(n=5):
    """Images of distinct, known mean red (a uint8 level per image, so the PNG holds it exactly)."""
    x = torch.rand(n, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    return (x * 255).round() / 255


def red(x):
    return (x[:, 0] * 255).round().double().mean((1, 2)) / 255


def test_score_mode_reads_the_verdict_of_each_image_in_order(judge):
    x = images()
    prompts = [f"prompt {i} with {{braces}}" for i in range(5)]
    fn = build_reward("vlm_judge", url=judge.url, model="judge-7b", concurrency=3)
    judge.delay_s = 0.2
    got = fn(x, prompts)
    judge.delay_s = 0.0
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), 1 + 4 * red(x), rtol=0, atol=1e-6)
    texts = sorted(r["messages"][0]["content"][1]["text"] for r in judge.requests)
    assert all(f'caption "prompt {i} with {{braces}}"' in t for i, t in enumerate(texts))
    assert {r["model"] for r in judge.requests} == {"judge-7b"} and judge.requests[0]["temperature"] == 0
    assert judge.requests[0]["max_tokens"] == 512 and 1 < judge.most_in_flight <= 3
    ranged = build_reward("vlm_judge", url=judge.url, model="judge-7b", score_range=[1, 5])(x, prompts)
    torch.testing.assert_close(ranged.double(), red(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["score", "yes_prob"])
def test_an_edit_sends_its_source_image_first_with_the_edit_template(judge, tmp_path, mode):
    """An EditPrompt's request holds the source image before the edited one, as the policy took it at the
    edited image's size (16 x 10 resized to cover 8 x 12, Lanczos, and centre-cropped), and the mode's edit
    template (or ``edit_template``) with the instruction; a plain prompt keeps ``template``. The score is the
    edited image's."""
    import numpy as np
    from PIL import Image

    from densegrpo_fast.prompts import EditPrompt

    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 10, 3), dtype=np.uint8))
    source.save(tmp_path / "source.png")
    cover = np.asarray(source.resize((12, 19), Image.LANCZOS).crop((0, 5, 12, 13)))
    x = images(2)  # 8 x 12
    prompts = [EditPrompt("make the sky pink", str(tmp_path / "source.png")), "a plain caption"]
    for kwargs in ({}, {"edit_template": "Edited per {prompt}?", "template": "Shows {prompt}?"}):
        judge.requests.clear()
        fn = build_reward(
            "vlm_judge", url=judge.url, model="judge-7b", mode=mode, score_range=[1, 5], **kwargs
        )
        torch.testing.assert_close(fn(x, prompts).double(), red(x), rtol=0, atol=1e-6)
        edit, plain = sorted(judge.requests, key=lambda r: len(r["messages"][0]["content"]), reverse=True)
        (src, edited, text), (_, plain_text) = edit["messages"][0]["content"], plain["messages"][0]["content"]
        sent = base64.b64decode(src["image_url"]["url"].removeprefix("data:image/png;base64,"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sent)).convert("RGB")), cover)
        assert edited["type"] == "image_url"
        if kwargs:
            assert (text["text"], plain_text["text"]) == (
                "Edited per make the sky pink?",
                "Shows a plain caption?",
            )
        else:
            assert text["text"].startswith("The first image is a source image")
            assert (
                'instruction "make the sky pink"' in text["text"] and "a plain caption" in plain_text["text"]
            )


def test_yes_prob_mode_sums_the_spellings_of_yes_and_no(judge):
    x = images()
    fn = build_reward("vlm_judge", url=judge.url, model="judge-7b", mode="yes_prob")
    got = fn(x, ["a cat"] * 5)
    torch.testing.assert_close(got.double(), red(x), rtol=0, atol=1e-6)  # (r/2 + r/2) / (r + 1 - r)
    body = judge.requests[0]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"][0]["content"][1]["text"] == 'Does this image show "a cat"? Answer with Yes or No.'
    judge.logprobs = False
    with pytest.raises(JudgeError, match="returned no logprobs: mode yes_prob needs them"):
        fn(x[:1], ["a cat"])


def test_an_answer_without_a_score_is_named_or_scored_as_told(judge):
    judge.reply = "A lovely picture, I would say four."
    fn = build_reward("vlm_judge", url=judge.url, model="judge-7b")
    with pytest.raises(
        JudgeError, match=r"answer to prompt 'a cat' holds no score \(no match of .*four.*score_pattern"
    ):
        fn(images(1), ["a cat"])
    lenient = build_reward("vlm_judge", url=judge.url, model="judge-7b", unparsed_score=0.0)
    with pytest.warns(
        UserWarning, match=r"2 of 2 judge answers held no score and were scored .*unparsed_score=0"
    ):
        assert lenient(images(2), ["a", "b"]).tolist() == [0.0, 0.0]
    judge.reply = "**Final Score:** 3.5"  # (markdown bold, as chat models write it)
    assert fn(images(1), ["a"]).tolist() == [3.5]
    custom = build_reward("vlm_judge", url=judge.url, model="judge-7b", score_pattern=r"(\d+)/10")
    judge.reply = "I give it 7/10, then 8/10 on reflection."
    assert custom(images(1), ["a"]).tolist() == [8.0]  # the last match


@pytest.mark.parametrize(
    "raw, said",
    [
        ({"choices": []}, "not an OpenAI-compatible chat completion"),
        ({"choices": [{"message": {"content": ["a", "list"]}}]}, "not an OpenAI-compatible chat completion"),
        ({"choices": [{"message": {"content": "Final Score: " + "9" * 400}}]}, "is not a finite number"),
        (
            {
                "choices": [
                    {"logprobs": {"content": [{"top_logprobs": [{"token": "Yes", "logprob": "NaN"}]}]}}
                ]
            },
            "logprob nan, not a log-probability",
        ),
        (
            {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": 7, "logprob": -1}]}]}}]},
            "not an OpenAI-compatible chat completion",
        ),
        (
            {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "Yes", "logprob": 2.0}]}]}}]},
            "logprob 2.0, not a log-probability",
        ),
        ({"pad": "x" * (9 << 20)}, "an answer of more than 8388608 bytes"),
    ],
)
def test_an_answer_of_the_wrong_shape_is_refused_with_what_came(judge, raw, said):
    judge.raw = raw
    mode = "yes_prob" if "logprobs" in json.dumps(raw)[:300] else "score"
    fn = build_reward("vlm_judge", url=judge.url, model="judge-7b", mode=mode, retries=0)
    with pytest.raises(JudgeError, match=re.escape(said)):
        fn(images(1), ["a"])


def test_a_redirect_is_refused_and_the_key_goes_nowhere_else(judge, monkeypatch):
    """urllib would follow a redirect with every header, the API key's among them: it is refused instead."""
    elsewhere = Judge()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sk-secret")
        fn = build_reward(
            "vlm_judge", url=judge.url, model="judge-7b", api_key_env="JUDGE_KEY", backoff_s=0.0
        )
        judge.fail, judge.redirect_to = [302], elsewhere.url + "/chat/completions"
        with pytest.raises(
            JudgeError, match=r"redirects \(302\) to '.*/v1/chat/completions', which is not followed"
        ):
            fn(images(1), ["a"])
        assert elsewhere.requests == [] and len(judge.requests) == 1
    finally:
        elsewhere.stop()
    with pytest.warns(UserWarning, match="is plain http to another machine: the API key from JUDGE_KEY"):
        build_reward(
            "vlm_judge", url="http://10.9.8.7:8000/v1", model="m", api_key_env="JUDGE_KEY", check=False
        )


def test_scores_outside_the_range_are_clamped_and_counted(judge):
    judge.reply = "Final Score: 7"
    fn = build_reward("vlm_judge", url=judge.url, model="judge-7b", score_range=[1, 5])
    with pytest.warns(
        UserWarning, match=r"2 of 2 judge scores fell outside reward.kwargs.score_range=\[1.0, 5.0\]"
    ):
        assert fn(images(2), ["a", "b"]).tolist() == [1.0, 1.0]


def test_a_completion_past_its_timeout_is_not_resent(judge):
    """The server may still be generating it: a resent request would queue behind it."""
    fn = build_reward("vlm_judge", url=judge.url, model="judge-7b", timeout_s=0.3, retries=3, backoff_s=0.0)
    judge.delay_s = 1.0
    with pytest.raises(
        JudgeError, match=r"did not answer within reward.kwargs.timeout_s=0.3 s \(the request is not resent"
    ):
        fn(images(1), ["a"])
    assert len(judge.requests) == 1


def test_the_server_is_checked_when_built():
    j = Judge(models=["other-model", "third"])
    try:
        with pytest.raises(
            JudgeError, match=r"serves \['other-model', 'third'\], not reward.kwargs.model='judge-7b'"
        ):
            build_reward("vlm_judge", url=j.url, model="judge-7b")
        build_reward("vlm_judge", url=j.url, model="judge-7b", check=False)  # (not asked)
    finally:
        j.stop()
    with pytest.raises(
        JudgeError, match=r"no answer from the judge's server at .*/models after 2 attempt.*vllm serve"
    ):
        build_reward("vlm_judge", url=j.url, model="judge-7b", retries=1, backoff_s=0.0)


def test_rate_limits_and_server_errors_are_retried_and_refusals_are_not(judge):
    fn = build_reward("vlm_judge", url=judge.url, model="judge-7b", backoff_s=0.0, concurrency=1)
    judge.fail = [429, 503]
    x = images(1)
    torch.testing.assert_close(fn(x, ["a"]).double(), 1 + 4 * red(x), rtol=0, atol=1e-6)
    assert len(judge.requests) == 3
    judge.fail = [400]
    with pytest.raises(JudgeError, match=r"refused the request \(400: .*status 400"):
        fn(x, ["a"])
    assert len(judge.requests) == 4
    judge.fail = [500] * 4
    with pytest.raises(JudgeError, match="after 4 attempt"):
        fn(x, ["a"])


def test_the_api_key_comes_from_the_environment(judge, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-tést")
    with pytest.raises(ValueError, match="JUDGE_KEY holds characters other than ASCII"):
        build_reward("vlm_judge", url=judge.url, model="judge-7b", api_key_env="JUDGE_KEY")
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(
        ValueError, match="api_key_env='JUDGE_KEY' names an environment variable that is not set"
    ):
        build_reward("vlm_judge", url=judge.url, model="judge-7b", api_key_env="JUDGE_KEY")
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    build_reward("vlm_judge", url=judge.url, model="judge-7b", api_key_env="JUDGE_KEY")(images(1), ["a"])
    assert judge.headers[-1]["Authorization"] == "Bearer sk-test"


@pytest.mark.parametrize(
    "kwargs, said",
    [
        ({"url": "127.0.0.1:8000", "model": "m"}, "not an http"),
        ({"url": "http://h/v1", "model": ""}, "reward.kwargs.model=''"),
        ({"url": "http://h/v1", "model": "m", "mode": "rank"}, "mode='rank' must be one of"),
        ({"url": "http://h/v1", "model": "m", "template": "Rate it."}, "must be a string holding {prompt}"),
        ({"url": "http://h/v1", "model": "m", "score_pattern": r"\d+"}, "0 groups; it needs one"),
        ({"url": "http://h/v1", "model": "m", "score_pattern": "("}, "not a regex"),
        ({"url": "http://h/v1", "model": "m", "score_range": [5, 1]}, "score_range=[5, 1] must be"),
        ({"url": "http://h/v1", "model": "m", "concurrency": 0}, "concurrency=0 must be a whole number >= 1"),
        ({"url": "http://h/v1", "model": "m", "timeout_s": 0}, "timeout_s=0 must be a number"),
        ({"url": "http://h/v1", "model": "m", "unparsed_score": float("nan")}, "unparsed_score=nan"),
    ],
)
def test_bad_kwargs_are_named_before_any_server_is_asked(kwargs, said):
    problems = kwargs_problems("vlm_judge", kwargs)
    assert any(said in p for p in problems), problems
    with pytest.raises(ValueError, match=re.escape(said)):
        build_reward("vlm_judge", **kwargs)
    assert kwargs_problems("vlm_judge", {"url": "http://h/v1", "model": "m"}) == []


def test_a_toy_run_trains_on_the_judge(judge, tiny_checkpoint, tmp_path):
    """One dense iteration of the toy with the judge as its reward: each latent a dense reward needs is
    completed and scored through the server, and the step rewards are the judge's probabilities."""
    from test_trainer import cfg_of, records

    from densegrpo_fast.trainer import train

    kwargs = f"reward.kwargs={{url: '{judge.url}', model: judge-7b, mode: yes_prob, concurrency: 4}}"
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=["reward.name=vlm_judge", kwargs,
                                                                                   "run.eval_every=0"]), progress=False)  # fmt: skip
    (step,) = [r for r in records(run_dir) if "reward_mean" in r]
    assert len(step["R_mean"]) == 5 and all(0 <= v <= 1 for v in step["R_mean"])
    counts = sorted(
        collections.Counter(r["messages"][0]["content"][1]["text"] for r in judge.requests).values()
    )
    # the toy config's SDE window of 3 of T = 4 steps: the completions of lat[0..2] and the final image of each
    # of the 4 samples of the 2 training prompts (4 x 4 each); then the 12 held-out prompts, one image each in
    # the run's two evaluations (before training and at its end)
    assert counts == [2] * 12 + [16, 16], counts


def pair_rates(r, G, p):
    """Each row's mean of ``p(r_i, r_j)`` over the other rows of its group: a win rate by brute force."""
    return [sum(p(r[i], r[j]) for j in range(g, g + G) if j != i) / (G - 1) for g in range(0, len(r), G)
            for i in range(g, g + G)]  # fmt: skip


def test_the_pairwise_judge_gives_win_rates_from_its_comparisons(judge):
    """prob mode: P("1") / (P("1") + P("2")) of each pair, asked in both orders; verdict mode: wins counted from
    "Image k is better". Each image is sent once per request it is in, the prompt of its group with it."""
    x = images(6)
    r = red(x).tolist()
    fn = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", concurrency=4)
    out = fn(x, ["a cat"] * 3 + ["a dog"] * 3, group_size=3)
    sigmoid = lambda d: 1 / (1 + math.exp(-8 * d))  # noqa: E731
    assert out.tolist() == pytest.approx(pair_rates(r, 3, lambda a, b: sigmoid(a - b)), abs=1e-5)
    assert len(judge.requests) == 2 * 2 * 3  # 2 groups x 3 pairs x both orders
    texts = collections.Counter(q["messages"][0]["content"][-1]["text"] for q in judge.requests)
    assert sorted(texts.values()) == [6, 6] and all("a cat" in t or "a dog" in t for t in texts)
    assert all(q["max_tokens"] == 1 and q["logprobs"] for q in judge.requests)
    verdict = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", mode="verdict", both_orders=False)
    out = verdict(x, ["a cat"] * 3 + ["a dog"] * 3, group_size=3)
    assert out.tolist() == pytest.approx(pair_rates(r, 3, lambda a, b: float(a > b)))
    assert fn.pointwise is not None and fn.pointwise.mode == "score"  # (the evaluation asks the same server)
    judge.requests.clear()  # ("Final Score: 1 + 4 r" mapped from [1, 5] to [0, 1]: the image's red)
    torch.testing.assert_close(fn.pointwise(x[:2], ["a cat"] * 2), red(x[:2]).float(), atol=1e-5, rtol=0)
    assert (
        len(judge.requests) == 2 and "Final Score" in judge.requests[0]["messages"][0]["content"][-1]["text"]
    )


def test_asking_both_orders_cancels_a_judge_that_prefers_the_first_image(judge):
    judge.reply = "Image 1 is better"  # whatever it is shown
    x = images(4)
    one_way = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", mode="verdict", both_orders=False)
    assert one_way(x, ["p"] * 4, group_size=4).tolist() == pytest.approx(
        [1, 2 / 3, 1 / 3, 0]
    )  # (row order decides)
    both = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", mode="verdict")
    assert both(x, ["p"] * 4, group_size=4).tolist() == [0.5] * 4


def test_opponents_limit_the_requests(judge):
    x = torch.cat([images(8)] * 2)
    fn = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", opponents=2, both_orders=False)
    out = fn(x, ["p"] * 8 + ["q"] * 8, group_size=8)
    assert len(judge.requests) == 2 * 8  # G m / 2 pairs a group, not 28
    r = red(x).tolist()
    sigmoid = lambda d: 1 / (1 + math.exp(-8 * d))  # noqa: E731
    want = [(sigmoid(r[i] - r[8 * (i // 8) + (i + 1) % 8]) + sigmoid(r[i] - r[8 * (i // 8) + (i - 1) % 8])) / 2
            for i in range(16)]  # fmt: skip
    assert out.tolist() == pytest.approx(want, abs=1e-5)


def test_a_verdict_without_a_winner_is_named_or_scored_as_told(judge):
    judge.reply = "They are equally good"
    x = images(3)
    fn = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", mode="verdict")
    with pytest.raises(JudgeError, match="names no winner .*set reward.kwargs.unparsed_tie: true"):
        fn(x, ["p"] * 3, group_size=3)
    tie = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", mode="verdict", unparsed_tie=True)
    with pytest.warns(UserWarning, match="6 of the judge's comparisons named no winner and count as ties"):
        assert tie(x, ["p"] * 3, group_size=3).tolist() == [0.5] * 3
    judge.reply = "Image 3 is better"  # (read by a pattern that takes any number)
    wide = build_reward(
        "vlm_pairwise", url=judge.url, model="judge-7b", mode="verdict", verdict_pattern=r"Image (\d+) is"
    )
    with pytest.raises(JudgeError, match="names image 3, neither 1 nor 2"):
        wide(x, ["p"] * 3, group_size=3)


@pytest.mark.parametrize(
    "kwargs,said",
    [
        ({"mode": "score"}, "reward.kwargs.mode='score' must be one of ['prob', 'verdict']"),
        ({"eval_mode": "verdict"}, "reward.kwargs.eval_mode='verdict' must be one of ['score', 'yes_prob']"),
        ({"verdict_pattern": "Image (1|2) (is)"}, "2 groups; it needs one, the winner"),
        ({"opponents": 5}, "opponents=5 must be an even whole number"),
        ({"unparsed_tie": 0.5}, "unparsed_tie=0.5 must be true or false"),
        ({"eval_mode": None}, "eval_mode=None must be one of ['score', 'yes_prob']: how the held-out"),
        ({"eval_template": "Rate it"}, "eval_template='Rate it' must be a string holding {prompt}"),
        ({"eval_max_tokens": 0}, "eval_max_tokens=0 must be a whole number >= 1 (or null)"),
        ({"both_orders": "yes"}, "both_orders='yes' must be true or false"),
    ],
)
def test_bad_pairwise_kwargs_are_named_before_any_server_is_asked(kwargs, said):
    full = {"url": "http://127.0.0.1:9/v1", "model": "m", **kwargs}
    assert any(said in p for p in kwargs_problems("vlm_pairwise", full)), kwargs_problems(
        "vlm_pairwise", full
    )
    with pytest.raises(ValueError, match=re.escape(said)):
        build_reward("vlm_pairwise", **full)
    assert kwargs_problems("vlm_pairwise", {"url": "http://h/v1", "model": "m"}) == []


def test_an_edit_pair_sends_the_source_first(judge, tmp_path):
    from PIL import Image

    from densegrpo_fast.prompts import EditPrompt

    Image.new("RGB", (16, 16), (10, 200, 30)).save(tmp_path / "src.png")
    edit = EditPrompt("make it red", str(tmp_path / "src.png"))
    x = images(2)
    fn = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", both_orders=False)
    out = fn(x, [edit, edit], group_size=2)
    (q,) = judge.requests
    content = q["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url"] * 3 + ["text"]
    assert (
        content[-1]["text"].startswith("The first image is a source image")
        and "make it red" in content[-1]["text"]
    )
    r = red(x).tolist()
    assert out.tolist() == pytest.approx(
        pair_rates(r, 2, lambda a, b: 1 / (1 + math.exp(-8 * (a - b)))), abs=1e-5
    )


def test_a_toy_run_trains_on_the_pairwise_judge(judge, tiny_checkpoint, tmp_path):
    """One dense iteration of the toy with the pairwise judge: every latent's completions are compared within
    their group, and the held-out evaluation asks the same server of one image at a time."""
    from test_trainer import cfg_of, records

    from densegrpo_fast.trainer import train

    kwargs = f"reward.kwargs={{url: '{judge.url}', model: judge-7b, both_orders: false, concurrency: 4}}"
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=["reward.name=vlm_pairwise", kwargs,
                                                                                   "run.eval_every=0"]), progress=False)  # fmt: skip
    (step,) = [r for r in records(run_dir) if "reward_mean" in r]
    assert step["R_mean"] == pytest.approx([0.5] * 5, abs=1e-6)
    pairs = [q for q in judge.requests if "Image 1" in q["messages"][0]["content"][-1]["text"]]
    alone = [q for q in judge.requests if "Image 1" not in q["messages"][0]["content"][-1]["text"]]
    # 2 prompts x 6 pairs of 4 images, at each of the 4 latents scored (lat[0..2]'s completions and the final)
    assert len(pairs) == 2 * 6 * 4
    assert len(alone) == 2 * 12  # the 12 held-out prompts, one image each, in the run's two evaluations


def test_both_orders_average_out_a_leaning_to_the_first_image(judge):
    """A judge whose P("1") carries a bias b in logits: one order gives row order a say; both orders give each
    pair (sigmoid(8 d + b) + sigmoid(8 d - b)) / 2, the same for every order of the rows."""
    judge.bias, judge.delay_s = 1.5, 0.05
    x = images(4)
    r = red(x).tolist()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    both = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", concurrency=16)
    out = both(x, ["p"] * 4, group_size=4)
    want = pair_rates(r, 4, lambda a, b: (sig(8 * (a - b) + 1.5) + sig(8 * (a - b) - 1.5)) / 2)
    assert out.tolist() == pytest.approx(want, abs=1e-5)
    flipped = both(x.flip(0), ["p"] * 4, group_size=4)
    assert flipped.flip(0).tolist() == pytest.approx(out.tolist(), abs=1e-6)
    assert judge.most_in_flight > 4  # (a group's 12 requests go out together, not a row's worth at a time)
    one_way = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", both_orders=False)
    assert one_way(x, ["p"] * 4, group_size=4).tolist() != pytest.approx(out.tolist(), abs=1e-2)


def test_the_held_out_view_takes_its_own_settings_and_names_them_in_its_errors(judge):
    template = 'Rate "{prompt}". Final Score: ?'
    fn = build_reward(
        "vlm_pairwise", url=judge.url, model="judge-7b", eval_template=template, eval_max_tokens=64
    )
    fn.pointwise(images(1), ["a fox"])
    (q,) = judge.requests
    assert q["max_tokens"] == 64 and q["messages"][0]["content"][-1]["text"] == 'Rate "a fox". Final Score: ?'
    judge.reply = "no number here"
    with pytest.raises(JudgeError, match=r"vlm_pairwise's judge, asked of one image \(reward.kwargs.eval_mode='score'\)"
                                         r".*holds no score .*: adjust reward.kwargs.eval_template / eval_edit_template "
                                         r"\(or raise eval_max_tokens .*\), or set reward.kwargs.eval_unparsed_score"):  # fmt: skip
        fn.pointwise(images(1), ["a fox"])
    lenient = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", eval_unparsed_score=0.25)
    with pytest.warns(UserWarning, match="scored reward.kwargs.eval_unparsed_score=0.25"):
        assert lenient.pointwise(images(2), ["a fox"] * 2).tolist() == [0.25, 0.25]
    yes = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", eval_mode="yes_prob")
    judge.logprobs = False
    with pytest.raises(JudgeError, match="eval_mode yes_prob needs them .* use eval_mode score there"):
        yes.pointwise(images(1), ["a fox"])
    with pytest.raises(JudgeError, match="mode prob needs them .* use mode verdict there"):
        yes(images(2), ["a fox"] * 2, group_size=2)


def test_an_unreadable_pair_answer_names_what_to_adjust_for_its_mode(judge, tmp_path):
    from PIL import Image

    from densegrpo_fast.prompts import EditPrompt

    judge.logprobs = True
    x = images(2)
    judge.raw = {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{"token": "The", "logprob": -0.1,
                 "top_logprobs": [{"token": "The", "logprob": -0.1}]}]}}]}  # fmt: skip
    prob = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", both_orders=False)
    with pytest.raises(
        JudgeError, match="adjust reward.kwargs.template so that the answer starts with 1 or 2"
    ):
        prob(x, ["p"] * 2, group_size=2)
    Image.new("RGB", (8, 8)).save(tmp_path / "s.png")
    edit = EditPrompt("make it red", str(tmp_path / "s.png"))
    with pytest.raises(JudgeError, match="adjust reward.kwargs.edit_template so that"):
        prob(x, [edit] * 2, group_size=2)


def test_the_held_out_view_of_an_edit_takes_eval_edit_template(judge, tmp_path):
    from PIL import Image

    from densegrpo_fast.prompts import EditPrompt

    Image.new("RGB", (8, 8)).save(tmp_path / "s.png")
    edit = EditPrompt("make it red", str(tmp_path / "s.png"))
    template = 'Edited by "{prompt}". Final Score: ?'
    fn = build_reward("vlm_pairwise", url=judge.url, model="judge-7b", eval_edit_template=template)
    fn.pointwise(images(1), [edit])
    (q,) = judge.requests
    content = q["messages"][0]["content"]
    assert len(content) == 3 and content[-1]["text"] == 'Edited by "make it red". Final Score: ?'


def test_an_evaluation_entry_that_scores_as_the_pairwise_view_is_not_built_twice():
    """eval.rewards entries equal to a pairwise training reward's pointwise view are scored by it; psi's record
    is the view's, so settings of the comparisons alone (opponents, both orders) do not count as another reward."""
    from densegrpo_fast.calibration import calibrated_for
    from densegrpo_fast.config import TrainConfig, load_config

    judge = "{url: 'http://127.0.0.1:9/v1', model: m, mode: score, score_range: [1, 5], concurrency: 64}"
    pair = "{url: 'http://127.0.0.1:9/v1', model: m, opponents: 4, check: false}"
    cfg = load_config(TrainConfig, None, [
        "reward.name=vlm_pairwise", f"reward.kwargs={pair}",
        f"eval.rewards={{judge: {{name: vlm_judge, kwargs: {judge}}}, asked: {{name: vlm_judge, kwargs: {{url: 'http://h/v1', model: m, mode: yes_prob}}}}}}",
    ])  # fmt: skip
    assert sorted(cfg.eval_rewards_built()) == ["asked"]
    other = load_config(TrainConfig, None, ["reward.name=vlm_pairwise",
                                            "reward.kwargs={url: 'http://127.0.0.1:9/v1', model: m, both_orders: false}"])  # fmt: skip
    assert calibrated_for(cfg)["reward"] == calibrated_for(other)["reward"]
    assert calibrated_for(cfg)["reward"]["name"] == "vlm_judge"
    wins = load_config(TrainConfig, None, [
        "reward.name=win_rate", "reward.kwargs={reward: {name: redness}}", "eval.rewards={red: {name: redness}}",
    ])  # fmt: skip
    assert wins.eval_rewards_built() == {}
