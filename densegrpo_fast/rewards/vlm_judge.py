"""A vision-language model as the judge, behind an OpenAI-compatible chat-completions server: ``vlm_judge``.

Any server that speaks OpenAI's ``/v1/chat/completions`` with images (vLLM's ``vllm serve``, SGLang, a hosted
API) hosts the judge: UnifiedReward, a Qwen2.5/3-VL, or any model the server holds, in its own environment
and on its own GPUs. Each image goes out as a PNG data URL beside the text of ``template``, with the image's
prompt put in place of ``{prompt}``; requests run ``concurrency`` at a time, and the server batches them.

Two ways to read a score from the answer (``mode``):

- ``score``: the model writes its verdict, and the last match of ``score_pattern`` in the answer (one regex
  group, a number) is the score, mapped from ``score_range`` ``[lo, hi]`` to [0, 1] when that is given. The
  default template asks for "Final Score: X" on 1 to 5.
- ``yes_prob``: a yes/no question; the score is P(yes) / (P(yes) + P(no)) from the first answer token's
  ``top_logprobs`` (VQAScore's reading, and the smooth one: the probability moves with the image where a
  written score moves in steps). The server must return logprobs (vLLM does; some hosted APIs do not).

Editing (an :class:`~densegrpo_fast.prompts.EditPrompt`, FLUX.1 Kontext's prompts): the source image goes
first, the edited one second, and the text is ``edit_template`` (the mode's own by default) with the
instruction in place of ``{prompt}``: the judge sees what was asked of which image, as the editing judges
(EditScore, UnifiedReward's editing mode, a GPT-4o rubric) are asked. The source is sent as the policy took
it, at the edited image's size (cropped to its aspect; a few recent sources are kept encoded), so the judge
compares like with like and a large photo does not fill the judge's context.

An answer with no score in it (the pattern not found, no yes or no among the top tokens) is an error naming
the answer and the fix, unless ``unparsed_score`` gives a value to use instead, which is then counted in a
warning. With ``temperature`` 0 (the default) the judge is as deterministic as the server makes it.

Example: serve Qwen2.5-VL-7B with vLLM and train against it::

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000 --max-model-len 8192   # in its own environment
    densegrpo-fast train --config configs/X.yaml reward.name=vlm_judge \\
        reward.kwargs='{url: "http://127.0.0.1:8000/v1", model: Qwen/Qwen2.5-VL-7B-Instruct, mode: yes_prob}'

An API key, where the server wants one, is read from the environment variable ``api_key_env`` names (never
from the config, which the run directory keeps), and is sent to ``url``'s host only: a redirect is refused,
not followed (urllib would carry the key to wherever it points), and a key sent over plain http to another
machine is warned about. A server on this machine is reached directly; another one through the environment's
proxy settings (``http_proxy``, ``no_proxy``), as any HTTP client reaches it. Connection errors, 429 (a rate
limit) and 5xx answers are retried ``retries`` times with exponential backoff (``backoff_s``, doubling, at
most 30 s, plus up to half at random); other 4xx answers are not (the same request would be refused again),
nor is a request whose answer did not come within ``timeout_s`` (the server may still be generating it: a
resent request would queue behind it). An answer must come whole within ``timeout_s`` once it begins, and
hold at most 8 MiB; its fields are checked (a finite score, log-probabilities <= 0).
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from densegrpo_fast.prompts import EditPrompt, load_source
from densegrpo_fast.rewards import count_problems, register
from densegrpo_fast.rewards.images import check_batch, to_uint8
from densegrpo_fast.rewards.remote import _read_within, backoff, pick_url, url_problems

#: Written for this project. The score mode's: a verdict that ends with a number on 1 to 5.
SCORE_TEMPLATE = (
    'An image was generated from the caption "{prompt}". Judge how faithfully the image shows everything the '
    "caption asks for (objects, counts, colours, positions, text) and how good it looks. Explain briefly, then "
    "end with a line of the form 'Final Score: X', where X is a number from 1 (poor) to 5 (excellent)."
)
#: The yes_prob mode's: a question whose first answer token is yes or no.
YES_TEMPLATE = 'Does this image show "{prompt}"? Answer with Yes or No.'
#: Written for this project. An edit's, in each mode: the source image first, then the edited one.
EDIT_SCORE_TEMPLATE = (
    'The first image is a source image; the second is the result of editing it by the instruction "{prompt}". '
    "Judge how well the second image carries out the instruction, how well it keeps what the instruction does "
    "not ask to change, and how good it looks. Explain briefly, then end with a line of the form "
    "'Final Score: X', where X is a number from 1 (poor) to 5 (excellent)."
)
EDIT_YES_TEMPLATE = (
    'The first image is a source image and the second an edit of it by the instruction "{prompt}". Does the '
    "second image carry out the instruction and keep the rest of the source unchanged? Answer with Yes or No."
)
SCORE_PATTERN = r"Final Score:\s*\**\s*([-+]?\d+(?:\.\d+)?)"
MODES = ("score", "yes_prob")
TOP_LOGPROBS = 20
MAX_ANSWER_BYTES = 8 << 20  #: a judge's answer is text and at most 20 logprobs a token: far below this
VLLM_HINT = "vllm serve MODEL --port 8000 (then reward.kwargs.url: http://HOST:8000/v1)"


def _png_url(image) -> str:
    """A PIL image as a PNG data URL."""
    png = io.BytesIO()
    image.save(png, format="PNG", compress_level=1)  # (4x faster than 6, 40 % larger)
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


@functools.lru_cache(maxsize=256)  # (an iteration's dense completions send each source (T+1) x G times)
def _source_url(path: str, height: int, width: int) -> str:
    """An edit's source image as the editing policy took it at the edit's size (cropped to its aspect, at its
    pixel count: :func:`~densegrpo_fast.prompts.load_source`), as a PNG data URL."""
    return _png_url(load_source(path, height, width))


def _pattern_problems(key: str, pattern: object, group: str) -> list[str]:
    """``reward.kwargs.<key>``: a regex string with exactly one group (what it captures: ``group``)."""
    if not isinstance(pattern, str):
        return [f"reward.kwargs.{key}={pattern!r} must be a string (a regex with one group)"]
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        groups = f"not a regex ({e})"
    if groups != 1:
        return [f"reward.kwargs.{key}={pattern!r}: {groups} groups; it needs one, {group}"]
    return []


class JudgeError(ValueError):
    """The judge could not score: its server down or refusing, or an answer with no score in it. A
    ValueError, the project's kind for problems the user fixes: the command line prints it without a
    traceback."""


def _problems(
    url: object = None,
    model: object = None,
    mode: object = "score",
    template: object = None,
    edit_template: object = None,
    score_pattern: object = SCORE_PATTERN,
    score_range: object = None,
    max_tokens: object = None,
    temperature: object = 0.0,
    concurrency: object = 16,
    timeout_s: object = 120.0,
    retries: object = 3,
    backoff_s: object = 1.0,
    api_key_env: object = None,
    unparsed_score: object = None,
    check: object = True,
) -> list[str]:
    """What is wrong with ``reward.kwargs`` of ``vlm_judge``, each with its rule; no server is asked."""
    out = url_problems(url) if url is not None else ["reward.kwargs.url is required: the server's /v1 URL"]
    num = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not isinstance(model, str) or not model:
        out.append(
            f"reward.kwargs.model={model!r}: give the model name the server serves (its GET /v1/models)"
        )
    if mode not in MODES:
        out.append(f"reward.kwargs.mode={mode!r} must be one of {list(MODES)}")
    for name, t in (("template", template), ("edit_template", edit_template)):
        if t is not None and (not isinstance(t, str) or "{prompt}" not in t):
            out.append(f"reward.kwargs.{name}={str(t)[:60]!r} must be a string holding {{prompt}}")
    out += _pattern_problems("score_pattern", score_pattern, "the number")
    if score_range is not None and not (
        isinstance(score_range, list | tuple) and len(score_range) == 2 and all(map(num, score_range))
        and score_range[0] < score_range[1]
    ):  # fmt: skip
        out.append(f"reward.kwargs.score_range={score_range!r} must be [lo, hi] with lo < hi (or null: raw)")
    if max_tokens is not None:
        out += [f"{p} (or null)" for p in count_problems(max_tokens=max_tokens)]
    for name, v, low in [
        ("temperature", temperature, 0),
        ("timeout_s", timeout_s, 1e-9),
        ("backoff_s", backoff_s, 0),
    ]:
        if not num(v) or v < low:
            out.append(f"reward.kwargs.{name}={v!r} must be a number >= {low:g}")
    out += count_problems(concurrency=concurrency)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        out.append(f"reward.kwargs.retries={retries!r} must be a whole number >= 0")
    if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env):
        out.append(
            f"reward.kwargs.api_key_env={api_key_env!r}: the name of an environment variable (or null)"
        )
    if unparsed_score is not None and not num(unparsed_score):
        out.append(
            f"reward.kwargs.unparsed_score={unparsed_score!r} must be a finite number (or null: an error)"
        )
    if not isinstance(check, bool):
        out.append(f"reward.kwargs.check={check!r} must be true or false")
    return out


@register("vlm_judge")
class VLMJudge:
    """A vision-language model behind an OpenAI-compatible server (vLLM, SGLang, an API) scores each image
    with its prompt (see the module doc).

    kwargs: ``url`` (the server's ``/v1`` base, e.g. ``http://127.0.0.1:8000/v1``; or a list, one per GPU of a
    node, of which process ``LOCAL_RANK`` takes entry ``LOCAL_RANK % len``), ``model`` (as the server names
    it), ``mode`` (``score`` or ``yes_prob``), ``template`` (with ``{prompt}``; the mode's own by default),
    ``edit_template`` (the same for an edit, whose source image goes before the edited one),
    ``score_pattern``, ``score_range`` (``[lo, hi]`` to map to [0, 1]; null: the raw number), ``max_tokens``
    (default 512 for ``score``, 1 for ``yes_prob``), ``temperature``, ``concurrency`` (requests in flight),
    ``timeout_s`` per request, ``retries``, ``backoff_s``, ``api_key_env`` (the environment variable holding
    an API key), ``unparsed_score`` (the score of an answer without one; null: an error), ``check`` (ask the
    server's ``/models`` when built, so a server that is down or does not serve ``model`` fails before the
    policy loads).
    """

    #: It shows the judge an edit's source image (:func:`densegrpo_fast.prompts.source_blind`).
    sees_sources = True
    #: The two first tokens the logprob mode weighs (lower case, stripped), and the modes' names in messages.
    answers = ("yes", "no")
    mode_name, text_mode_name = "mode yes_prob", "mode score"
    #: The settings an unreadable answer's error and the scale's warning name (a subclass's own keys).
    unparsed_fix = (
        "adjust reward.kwargs.template / score_pattern (or raise max_tokens where the answer was cut), or set "
        "reward.kwargs.unparsed_score to score such answers"
    )
    unparsed_key, range_key = "reward.kwargs.unparsed_score", "reward.kwargs.score_range"

    def __init__(
        self,
        url: str | list[str],
        model: str,
        mode: str = "score",
        template: str | None = None,
        edit_template: str | None = None,
        score_pattern: str = SCORE_PATTERN,
        score_range: list[float] | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        concurrency: int = 16,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        api_key_env: str | None = None,
        unparsed_score: float | None = None,
        check: bool = True,
    ):
        if problems := _problems(url, model, mode, template, edit_template, score_pattern, score_range, max_tokens, temperature,
                                 concurrency, timeout_s, retries, backoff_s, api_key_env, unparsed_score, check):  # fmt: skip
            raise ValueError("; ".join(problems))
        self.url = pick_url(url).rstrip("/")
        parsed = urllib.parse.urlparse(self.url)
        local = (parsed.hostname or "") in ("localhost", "::1") or (parsed.hostname or "").startswith("127.")
        # a server on this machine is reached directly (a cluster's http_proxy would carry even loopback
        # requests to the proxy); another one through the environment's proxy settings, as any client. No
        # redirect is followed: urllib would send the request's headers, the API key among them, along.
        handlers = [_NoRedirect()] + ([urllib.request.ProxyHandler({})] if local else [])
        self._opener = urllib.request.build_opener(*handlers)
        self.model, self.mode = model, mode
        self.template = template or (SCORE_TEMPLATE if mode == "score" else YES_TEMPLATE)
        self.edit_template = edit_template or (EDIT_SCORE_TEMPLATE if mode == "score" else EDIT_YES_TEMPLATE)
        self.pattern = re.compile(score_pattern)
        self.score_range = tuple(map(float, score_range)) if score_range is not None else None
        self.max_tokens = max_tokens or (512 if mode == "score" else 1)
        self.temperature, self.concurrency = float(temperature), int(concurrency)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.unparsed_score = unparsed_score
        self.headers = {"Content-Type": "application/json"}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"reward.kwargs.api_key_env={api_key_env!r} names an environment variable that is not set: "
                    f"export {api_key_env}=<the server's key> (the key stays out of the config, which the run "
                    "directory keeps), or set api_key_env to null for a server without one"
                )
            if not key.isascii():
                raise ValueError(
                    f"the API key in {api_key_env} holds characters other than ASCII, which an HTTP header cannot "
                    "carry: check the variable's value"
                )
            self.headers["Authorization"] = f"Bearer {key}"
            if parsed.scheme == "http" and not local:
                warnings.warn(
                    f"reward.kwargs.url {self.url!r} is plain http to another machine: the API key from "
                    f"{api_key_env} crosses the network unencrypted; use https where the server offers it",
                    stacklevel=2,
                )
        self.served_models: list[str] | None = None
        if check:
            self.served_models = self._models()
            if model not in self.served_models:
                raise JudgeError(
                    f"the server at {self.url} serves {self.served_models}, not reward.kwargs.model={model!r}: "
                    "give one of those names (or start the server with this model)"
                )

    def _models(self) -> list[str]:
        answer = self._request("/models", None)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
        ):
            raise JudgeError(
                f"{self.url}/models answered {str(answer)[:200]!r}, not an OpenAI-compatible list of models: is "
                f"reward.kwargs.url the server's /v1 base? Start one with: {VLLM_HINT}"
            )
        return [m["id"] for m in data]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts))))
        try:
            answers = list(pool.map(self._judge, pixels, prompts))
        finally:  # (on an error, the requests not yet sent are not sent)
            pool.shutdown(cancel_futures=True)
        scores, unparsed, clamped = [], [], 0
        for i, (score, why) in enumerate(answers):
            if score is None:
                if self.unparsed_score is None:
                    raise JudgeError(
                        f"the judge's answer to prompt {prompts[i]!r} holds no score ({why}): {self.unparsed_fix}"
                    )
                score = float(self.unparsed_score)
                unparsed.append(i)
            elif self.score_range is not None and not 0 <= score <= 1:  # (a judge that left the scale)
                score, clamped = min(max(score, 0.0), 1.0), clamped + 1
            scores.append(score)
        if clamped:
            warnings.warn(
                f"{clamped} of {len(prompts)} judge scores fell outside {self.range_key}="
                f"{list(self.score_range)} and were clamped to it: check that the template states the scale",
                stacklevel=2,
            )
        if unparsed:
            warnings.warn(
                f"{len(unparsed)} of {len(prompts)} judge answers held no score and were scored "
                f"{self.unparsed_key}={self.unparsed_score:g} (the first: {answers[unparsed[0]][1]})",
                stacklevel=2,
            )
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _judge(self, pixels, prompt: str) -> tuple[float | None, str]:
        """One image's request and its score, or (None, why there is none)."""
        from PIL import Image

        return self._ask([_png_url(Image.fromarray(pixels))], prompt, pixels.shape[:2])

    def _ask(self, images: list[str], prompt: str, size: tuple[int, int]) -> tuple[float | None, str]:
        """The request for ``images`` (PNG data URLs, of ``size`` (H, W)) with ``prompt`` in the template (an edit:
        its source image first, and the edit template), and the score read from its answer."""
        template = self.template
        if isinstance(prompt, EditPrompt):  # the source first, then the edit
            images = [_source_url(prompt.image, *size), *images]
            template = self.edit_template
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                *({"type": "image_url", "image_url": {"url": url}} for url in images),
                {"type": "text", "text": template.replace("{prompt}", prompt)},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }  # fmt: skip
        if self.mode == "yes_prob":
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        answer = self._request("/chat/completions", json.dumps(body).encode())
        try:
            choice = answer["choices"][0]
            return self._read_yes(choice) if self.mode == "yes_prob" else self._read_score(choice)
        except JudgeError:
            raise
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):  # (fields missing, or mistyped)
            raise JudgeError(
                f"{self.url}/chat/completions answered {str(answer)[:300]!r}: not an OpenAI-compatible chat "
                "completion (choices[0].message / logprobs)"
            ) from None

    def _read_score(self, choice: dict) -> tuple[float | None, str]:
        text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError("content is not text")
        found = self.pattern.findall(text)
        if not found:
            cut = " (cut at max_tokens)" if choice.get("finish_reason") == "length" else ""
            return None, f"no match of {self.pattern.pattern!r} in {text[-200:]!r}{cut}"
        try:
            value = float(found[-1])
        except ValueError:
            return None, f"{found[-1]!r} matched {self.pattern.pattern!r} but is not a number"
        if not math.isfinite(value):
            return None, f"{found[-1][:40]!r} is not a finite number"
        if self.score_range is not None:
            lo, hi = self.score_range
            value = (value - lo) / (hi - lo)
        return value, ""

    def _read_yes(self, choice: dict) -> tuple[float | None, str]:
        """P(first answer) / (P(first) + P(second)) of ``self.answers`` from the first token's top logprobs."""
        logprobs = choice.get("logprobs")
        if not logprobs or not logprobs.get("content"):
            raise JudgeError(
                f"the server at {self.url} returned no logprobs: {self.mode_name} needs them (vLLM returns them; "
                f"some hosted APIs do not): use {self.text_mode_name} there"
            )
        top = logprobs["content"][0]["top_logprobs"]
        yes, no = self.answers
        p = {yes: 0.0, no: 0.0}
        for t in top:
            word, logprob = t["token"].strip().lower(), float(t["logprob"])
            if math.isnan(logprob) or logprob > 0:
                return None, f"the token {t['token']!r} has logprob {logprob}, not a log-probability"
            if word in p:
                p[word] += math.exp(logprob)
        if p[yes] + p[no] == 0:
            return (
                None,
                f"neither {yes} nor {no} among the first token's top {len(top)}: {[t['token'] for t in top][:8]}",
            )
        return p[yes] / (p[yes] + p[no]), ""

    def _request(self, path: str, body: bytes | None) -> dict:
        """GET (no body) or POST ``path`` under the server's base URL; the JSON object answered. Retries
        connection errors, 429 and 5xx with backoff; not a POST whose answer did not come in time."""
        url = self.url + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(backoff(self.backoff_s, attempt))
            request = urllib.request.Request(
                url, data=body, headers=self.headers, method="POST" if body else "GET"
            )
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    out = json.loads(_read_within(response, self.timeout_s, MAX_ANSWER_BYTES))
            except urllib.error.HTTPError as e:
                try:
                    message = e.read(300).decode(errors="replace")
                except (OSError, ValueError, http.client.HTTPException):  # (the error's body broke off)
                    message = ""
                if 300 <= e.code < 400:
                    raise JudgeError(
                        f"the server at {url} redirects ({e.code}) to {e.headers.get('Location')!r}, which is not "
                        "followed (it would carry the API key along): give that URL as reward.kwargs.url"
                    ) from None
                if e.code != 429 and e.code < 500:
                    raise JudgeError(
                        f"the server at {url} refused the request ({e.code}: {message})"
                    ) from None
                last = f"{e.code}: {message}"
            except TimeoutError:  # (raised bare once connected: the answer did not come in time)
                if body is not None:
                    raise JudgeError(
                        f"the judge at {url} did not answer within reward.kwargs.timeout_s={self.timeout_s:g} s (the "
                        "request is not resent: the server may still be generating it): raise timeout_s, or lower "
                        "reward.kwargs.concurrency or max_tokens"
                    ) from None
                last = f"timed out after {self.timeout_s:g} s"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
            except (
                ValueError,
                RecursionError,
            ) as e:  # not JSON, past the size limit, or nested past Python's
                raise JudgeError(
                    f"the server at {url} answered something that is not a chat answer ({e})"
                ) from None
            else:
                if not isinstance(out, dict):
                    raise JudgeError(
                        f"the server at {url} answered {str(out)[:200]!r}: expected a JSON object"
                    )
                return out
        raise JudgeError(
            f"no answer from the judge's server at {url} after {self.retries + 1} attempt(s) (last: {last}). Is it "
            f"running? Start one with: {VLLM_HINT}; a slow judge needs a larger reward.kwargs.timeout_s"
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the HTTP error it is, not followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


VLMJudge.check = staticmethod(_problems)  # (read by the config's checks: no server is asked)


#: Written for this project. The pairwise judge's templates: two images of one caption (an edit: its source first).
PAIR_VERDICT_TEMPLATE = (
    'Image 1 and Image 2 were both generated from the caption "{prompt}". Compare them: which shows everything '
    "the caption asks for (objects, counts, colours, positions, text) more faithfully, and looks better? Explain "
    "briefly, then end with a line that reads either 'Image 1 is better' or 'Image 2 is better'."
)
PAIR_PROB_TEMPLATE = (
    'Image 1 and Image 2 were both generated from the caption "{prompt}". Which one shows the caption more '
    "faithfully and looks better? Answer with 1 or 2 only."
)
EDIT_PAIR_VERDICT_TEMPLATE = (
    "The first image is a source image; Image 1 and Image 2, the second and third, are two edits of it by the "
    'instruction "{prompt}". Which edit carries out the instruction better while keeping what it does not ask to '
    "change, and looks better? Explain briefly, then end with a line that reads either 'Image 1 is better' or "
    "'Image 2 is better'."
)
EDIT_PAIR_PROB_TEMPLATE = (
    "The first image is a source image; Image 1 and Image 2, the second and third, are two edits of it by the "
    'instruction "{prompt}". Which edit carries out the instruction better and keeps the rest of the source? '
    "Answer with 1 or 2 only."
)
VERDICT_PATTERN = r"Image\s*([12])\s+is\s+(?:the\s+)?better"
PAIR_MODES = ("prob", "verdict")
EVAL_MODES = ("score", "yes_prob")


def _pair_problems(
    mode: object = "prob",
    verdict_pattern: object = VERDICT_PATTERN,
    both_orders: object = True,
    opponents: object = None,
    unparsed_tie: object = False,
    eval_mode: object = "score",
    eval_template: object = None,
    eval_edit_template: object = None,
    eval_max_tokens: object = None,
    eval_unparsed_score: object = None,
    **judge: object,
) -> list[str]:
    """What is wrong with ``reward.kwargs`` of ``vlm_pairwise``, each with its rule; no server is asked. The keys it
    shares with ``vlm_judge`` (``judge``: the server, the templates, the transport) are checked as ``vlm_judge``'s."""
    from densegrpo_fast.rewards.pairwise import opponents_problems

    out = _problems(**judge)
    out += _pattern_problems("verdict_pattern", verdict_pattern, "the winner (1 or 2)")
    if mode not in PAIR_MODES:
        out.append(f"reward.kwargs.mode={mode!r} must be one of {list(PAIR_MODES)}")
    if eval_mode not in EVAL_MODES:
        out.append(
            f"reward.kwargs.eval_mode={eval_mode!r} must be one of {list(EVAL_MODES)}: how the held-out "
            "evaluation asks the same judge of one image (win rates average 1/2, so it scores images alone)"
        )
    for name, t in (("eval_template", eval_template), ("eval_edit_template", eval_edit_template)):
        if t is not None and (not isinstance(t, str) or "{prompt}" not in t):
            out.append(f"reward.kwargs.{name}={str(t)[:60]!r} must be a string holding {{prompt}}")
    if eval_unparsed_score is not None and (
        isinstance(eval_unparsed_score, bool) or not isinstance(eval_unparsed_score, int | float)
        or not math.isfinite(eval_unparsed_score)
    ):  # fmt: skip
        out.append(
            f"reward.kwargs.eval_unparsed_score={eval_unparsed_score!r} must be a finite number (or null: an error)"
        )
    if eval_max_tokens is not None:
        out += [f"{p} (or null)" for p in count_problems(eval_max_tokens=eval_max_tokens)]
    for name, v in (("both_orders", both_orders), ("unparsed_tie", unparsed_tie)):
        if not isinstance(v, bool):
            out.append(f"reward.kwargs.{name}={v!r} must be true or false")
    return out + opponents_problems(opponents)


@register("vlm_pairwise")
class VLMPairwise(VLMJudge):
    """A vision-language judge behind an OpenAI-compatible server compares two images of a group at a time;
    each image's reward is its win rate in its group (Pref-GRPO's reward; see
    :mod:`densegrpo_fast.rewards.pairwise`).

    kwargs, beside ``vlm_judge``'s transport ones (``url``, ``model``, ``max_tokens``, ``temperature``,
    ``concurrency``, ``timeout_s``, ``retries``, ``backoff_s``, ``api_key_env``, ``check``): ``mode`` (``prob``:
    P("1") / (P("1") + P("2")) from the first answer token's logprobs, the server must return them; ``verdict``:
    the last match of ``verdict_pattern`` in a written answer, "Image 1 is better" by default, as
    UnifiedReward-Think writes it, a win or a loss), ``template`` / ``edit_template`` (with ``{prompt}``),
    ``both_orders`` (ask each pair in both orders and average, which cancels a judge's leaning to the first or
    the second image, at twice the requests), ``opponents`` (null: every pair of a group; an even m: m per
    image), ``unparsed_tie`` (an answer naming no winner counts as a tie, with a warning; false: an error).
    The held-out evaluation (and the noise's calibration) asks the same server of one image, as ``vlm_judge``
    with ``eval_mode`` (``score``, a 1 to 5 verdict mapped to [0, 1], or ``yes_prob``), ``eval_template`` and
    ``eval_edit_template`` (null: the mode's own), ``eval_max_tokens`` (null: 512 for ``score``, 1 for
    ``yes_prob``) and ``eval_unparsed_score`` (the score of an answer without one; null: an error).
    """

    pairwise = True
    answers = ("1", "2")
    mode_name, text_mode_name = "mode prob", "mode verdict"

    def __init__(
        self,
        url: str | list[str],
        model: str,
        mode: str = "prob",
        template: str | None = None,
        edit_template: str | None = None,
        verdict_pattern: str = VERDICT_PATTERN,
        both_orders: bool = True,
        opponents: int | None = None,
        unparsed_tie: bool = False,
        eval_mode: str = "score",
        eval_template: str | None = None,
        eval_edit_template: str | None = None,
        eval_max_tokens: int | None = None,
        eval_unparsed_score: float | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        concurrency: int = 16,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        api_key_env: str | None = None,
        check: bool = True,
    ):
        given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if problems := _pair_problems(**given):
            raise ValueError("; ".join(problems))
        prob = mode == "prob"
        super().__init__(
            url, model, mode="yes_prob" if prob else "score",
            template=template or (PAIR_PROB_TEMPLATE if prob else PAIR_VERDICT_TEMPLATE),
            edit_template=edit_template or (EDIT_PAIR_PROB_TEMPLATE if prob else EDIT_PAIR_VERDICT_TEMPLATE),
            score_pattern=verdict_pattern, max_tokens=max_tokens, temperature=temperature, concurrency=concurrency,
            timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, api_key_env=api_key_env, check=check,
        )  # fmt: skip
        self.pair_mode, self.both_orders, self.opponents, self.unparsed_tie = (
            mode,
            both_orders,
            opponents,
            unparsed_tie,
        )
        #: The held-out evaluation's judge: the same server asked of one image.
        with warnings.catch_warnings():  # (the API key's plain-http warning was given above)
            warnings.simplefilter("ignore", UserWarning)
            self.pointwise = _HeldOutJudge(**{**view_kwargs(given), "url": self.url, "check": False})

    def _read_score(self, choice: dict) -> tuple[float | None, str]:
        """The verdict: 1.0 where image 1 wins, 0.0 where image 2 does."""
        value, why = super()._read_score(choice)
        if value is None or value in (1.0, 2.0):
            return (None if value is None else 2.0 - value), why
        return None, f"the verdict names image {value:g}, neither 1 nor 2"

    def __call__(
        self, images: torch.Tensor, prompts: list[str], group_size: int | None = None
    ) -> torch.Tensor:
        from PIL import Image

        from densegrpo_fast.rewards.pairwise import check_groups, win_rates

        check_groups(images, prompts, group_size)
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        size = pixels.shape[1:3]
        pool = ThreadPoolExecutor(max_workers=self.concurrency)  # (a group's pairs outnumber its rows)
        unparsed: list[str] = []
        try:
            urls = list(pool.map(lambda x: _png_url(Image.fromarray(x)), pixels))  # each image encoded once

            def ask(pair: tuple[int, int]) -> float:
                i, j = pair
                p, why = self._ask([urls[i], urls[j]], prompts[i], size)
                if p is None:
                    if not self.unparsed_tie:
                        template = "edit_template" if isinstance(prompts[i], EditPrompt) else "template"
                        fix = (
                            f"adjust reward.kwargs.{template} so that the answer starts with 1 or 2"
                            if self.pair_mode == "prob"
                            else f"adjust reward.kwargs.{template} / verdict_pattern (or raise max_tokens where the "
                            "answer was cut)"
                        )
                        raise JudgeError(
                            f"the judge's answer comparing two images of prompt {prompts[i]!r} names no winner "
                            f"({why}): {fix}, or set reward.kwargs.unparsed_tie: true to count it a tie"
                        )
                    unparsed.append(why)
                    p = 0.5
                return p

            def prefer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                pairs = list(zip(a.tolist(), b.tolist(), strict=True))
                asked = pairs + ([(j, i) for i, j in pairs] if self.both_orders else [])  # in flight together
                p = torch.tensor(list(pool.map(ask, asked)))
                return (p[: len(pairs)] + 1 - p[len(pairs) :]) / 2 if self.both_orders else p

            out = win_rates(prefer, len(prompts), group_size, self.opponents)
        finally:  # (on an error, the requests not yet sent are not sent)
            pool.shutdown(cancel_futures=True)
        if unparsed:
            warnings.warn(
                f"{len(unparsed)} of the judge's comparisons named no winner and count as ties "
                f"(reward.kwargs.unparsed_tie; the first: {unparsed[0]})",
                stacklevel=2,
            )
        return out.to(images.device)


def view_kwargs(kwargs: dict) -> dict:
    """The ``vlm_judge`` kwargs of ``vlm_pairwise``'s pointwise view, from its own ``kwargs``: the same server and
    model asked of one image, with its ``eval_*`` settings (the defaults left out, as a config would leave them)."""
    mode = kwargs.get("eval_mode", "score")
    out = {"url": kwargs.get("url"), "model": kwargs.get("model"), "mode": mode}
    if mode == "score":
        out["score_range"] = [1, 5]
    for own, key in [("eval_template", "template"), ("eval_edit_template", "edit_template"),
                     ("eval_max_tokens", "max_tokens"), ("eval_unparsed_score", "unparsed_score")]:  # fmt: skip
        if kwargs.get(own) is not None:
            out[key] = kwargs[own]
    for key in ("temperature", "concurrency", "timeout_s", "retries", "backoff_s", "api_key_env", "check"):
        if key in kwargs:
            out[key] = kwargs[key]
    return out


class _HeldOutJudge(VLMJudge):
    """``vlm_pairwise``'s held-out view: ``vlm_judge`` on the same server, whose errors name the keys that set it."""

    mode_name, text_mode_name = "eval_mode yes_prob", "eval_mode score"
    unparsed_fix = (
        "adjust reward.kwargs.eval_template / eval_edit_template (or raise eval_max_tokens where the answer was "
        "cut), or set reward.kwargs.eval_unparsed_score to score such answers"
    )
    unparsed_key, range_key = "reward.kwargs.eval_unparsed_score", "eval_mode score's scale"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        try:
            return super().__call__(images, prompts)
        except JudgeError as e:
            raise JudgeError(
                f"vlm_pairwise's judge, asked of one image (reward.kwargs.eval_mode={self.mode!r}): {e}"
            ) from None


VLMPairwise.check = staticmethod(_pair_problems)
