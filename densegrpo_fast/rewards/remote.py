"""Rewards scored by another process over HTTP: the ``remote`` client, the ``geneval`` alias, the protocol.

Why a server: GenEval's detector (mmdet + mmcv) pins an old torch stack that cannot live in the training
environment, so the reward runs in its own environment and the trainer sends it images. Any registry
reward, or any user factory, can be served the same way (``densegrpo_fast.rewards.server``).

GenEval, step by step. The scorer is :mod:`densegrpo_fast.rewards.geneval_detector` (GenEval's detector,
colour classifier and rules, with each prompt's metadata looked up in GenEval's ``.jsonl`` files; its
docstring has the full command), or a user factory ``make_reward(**kwargs)`` returning ``reward(images [B,
3, H, W] float in [0, 1], prompts: list[str]) -> [B]``::

    # 1. in an environment with mmdetection (Python >= 3.10, torch, safetensors, numpy, transformers),
    #    install this package without its training dependencies:
    pip install --no-deps -e /path/to/densegrpo-fast
    # 2. start the server there (or --reward my_geneval:make_reward, with my_geneval.py on PYTHONPATH):
    densegrpo-fast serve-reward --reward geneval_detector --kwargs '{"metadata": [...], "detector_config":
        "...", "detector_checkpoint": "...", "class_names": ".../object_names.txt"}' --port 8085
    # 3. train against it with the alias (equivalently name: remote, kwargs: {url: ...}):
    densegrpo-fast train --config configs/X.yaml reward.name=geneval reward.kwargs='{url: "http://127.0.0.1:8085"}'

Any registry reward is served by name the same way, e.g. ``densegrpo-fast serve-reward --reward pickscore
--kwargs '{"model": "/w/PickScore_v1", "processor": "/w/CLIP-H"}' --port 8087 --device cuda:1`` (to score on
another GPU or machine; ``--device`` defaults to the GPU for a reward with a torch model), and used with
``reward: {name: remote, kwargs: {url: "http://127.0.0.1:8087"}}``.

Protocol (version 1). ``POST /score`` with a safetensors body: one tensor ``images`` uint8 [B, 3, H, W]
(8-bit pixels: 4x smaller than float32 and what any image reward sees in a PNG anyway), and the safetensors
metadata ``{"protocol": "1", "prompts": "<JSON list of B strings>"}``. The answer is JSON ``{"scores": [B
floats]}``; errors are JSON ``{"error": message}`` with 400 (malformed request), 404, 411, 413 (over the
server's ``--max-request-mb``), 408 (the body arrived too slowly), 422 (the reward rejected the input, e.g.
a ValueError), 500 (the reward failed; with ``"retry": false`` when the same request would fail again, e.g.
the reward returned the wrong shape). ``GET /health`` answers ``{"status": "ok", "reward": NAME, "protocol": 1,
"max_request_bytes": N, "kwargs_digest": D}`` (``D``: a digest of the server's ``--kwargs``), with ``"mode": M``
when the reward has a ``mode`` (``geneval_detector``). Never pickle: unpickling a request executes whatever code the sender put in it, so one pickled
payload would give anyone who can reach the port a shell on the GPU machine; safetensors and JSON are
parsed as data only.

Client behaviour: ``timeout_s`` per HTTP request, for each wait on the server (sending, and the answer's
first bytes) and for reading the whole answer once it begins (``/health``: at most 10 s, since it answers
while a batch scores); a ``/health`` that is not a
protocol-1 reward server's is refused; on connection errors and 5xx it retries ``retries`` times with exponential backoff (``backoff_s``,
2x, 4x, ..., each wait capped at 30 s and lengthened by up to half at random, so that processes sharing a
server do not retry in step); 4xx answers and ``"retry": false`` are not retried (the same request would fail
again), nor is a ``/score`` that timed out waiting for its answer: the server has the batch and a retry
would queue behind it (the server drops a batch whose client has hung up before its turn came). Requests carry at most ``max_batch`` images and are split further to stay
under the server's size limit (read from ``/health``). Scores come back bit-exact (float32 via JSON).
Environment proxy settings (``http_proxy``) are ignored: the server is reached directly.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

import torch

from densegrpo_fast.rewards import register
from densegrpo_fast.rewards.images import check_batch, to_uint8

PROTOCOL = 1
HEALTH_TIMEOUT_S = 10.0  #: at most this long for GET /health (answered while a batch scores)
MAX_BACKOFF_S = 30.0  #: the longest wait between two attempts, before the jitter


class ProtocolError(ValueError):
    """A request body that is not a well-formed protocol-1 request (the server answers 400 with it)."""


class RemoteRewardError(ValueError):
    """The reward server could not score: down, too slow, or it refused the request.

    A ValueError, the project's kind for problems the user fixes (start the server, fix the URL, raise a
    limit): the command line prints it without a traceback."""


def encode_request(images: torch.Tensor, prompts: list[str]) -> bytes:
    """The ``POST /score`` body: images uint8 [B, 3, H, W] and their prompts, as safetensors bytes."""
    from safetensors.torch import save

    return save(
        {"images": images.contiguous()},
        metadata={"protocol": str(PROTOCOL), "prompts": json.dumps(list(prompts))},
    )


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """Parse and validate a ``POST /score`` body as data only. Raises :class:`ProtocolError` with the reason."""
    from safetensors.torch import load

    rule = "the body must be safetensors with images uint8 [B, 3, H, W] and metadata prompts (JSON list)"
    try:
        tensors = load(bytes(body))
        n = int.from_bytes(body[:8], "little")  # safetensors: u64 header length, then the JSON header
        metadata = json.loads(body[8 : 8 + n]).get("__metadata__") or {}
    except Exception as e:  # any parse failure is the sender's problem, whatever the parser raised
        raise ProtocolError(f"body is not a safetensors file ({type(e).__name__}: {e}); {rule}") from None
    if set(tensors) != {"images"}:
        raise ProtocolError(f"tensors {sorted(tensors)}: expected exactly ['images']; {rule}")
    images = tensors["images"]
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or 0 in images.shape:
        raise ProtocolError(f"images {images.dtype} {list(images.shape)}: {rule}")
    if metadata.get("protocol") != str(PROTOCOL):
        raise ProtocolError(f"protocol {metadata.get('protocol')!r}: this server speaks protocol {PROTOCOL}")
    try:
        prompts = json.loads(metadata["prompts"])
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"metadata prompts missing or not JSON ({e}); {rule}") from None
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        raise ProtocolError(f"metadata prompts must be a JSON list of strings; {rule}")
    if len(prompts) != images.shape[0]:
        raise ProtocolError(f"{images.shape[0]} images but {len(prompts)} prompts: one prompt per image")
    return images, prompts


def _server_error(e: urllib.error.HTTPError) -> tuple[str, bool, bool]:
    """The error's message, whether a retry may help (``"retry": false`` in the body says it cannot), and
    whether a reward server wrote it (a JSON ``error``: not, e.g., a proxy's 502 for a server that is down)."""
    try:
        answer = json.loads(e.read())
        return str(answer["error"]), answer.get("retry", True) is not False, True
    except Exception:  # not our server, or no JSON body: the status line is all there is
        return e.reason or "", True, False


def backoff(first_s: float, attempt: int, rng: random.Random | None = None) -> float:
    """The wait before attempt ``attempt`` (1 = the first retry): ``first_s`` doubling per attempt, capped at
    :data:`MAX_BACKOFF_S`, then lengthened by a random 0-50 %."""
    base = min(first_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
    return base * (1.0 + 0.5 * (rng or random).random())


def _is_number(v) -> bool:
    """A JSON number a float32 holds (NaN and inf included: the trainer names a reward that gave them), not a
    bool nor an integer past float's range."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, float) or abs(v) < 2**1023


def _read_within(response, timeout: float, limit: int | None = None) -> bytes:
    """The whole answer of ``response``, whose headers have come, or TimeoutError when more of it is still to
    come ``timeout`` seconds on: a server that drips its answer byte by byte passes every single read's
    timeout. (Sending the request and waiting for the answer are bounded apart, each read by ``timeout``.)
    ``limit``: at most this many bytes, or a ValueError saying so."""
    deadline, parts, size = time.monotonic() + timeout, [], 0
    while True:
        if response.length != 0 and time.monotonic() > deadline:  # (length 0: all of it is here)
            raise TimeoutError
        chunk = response.read1(1 << 16)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if limit is not None and size > limit:
            raise ValueError(f"an answer of more than {limit} bytes")
        parts.append(chunk)


def health_problem(answer: dict) -> str | None:
    """What makes a ``/health`` answer not a protocol-1 reward server's (None: it is one)."""
    limit = answer.get("max_request_bytes")
    if answer.get("status") != "ok" or not isinstance(answer.get("reward"), str):
        return f'expected {{"status": "ok", "reward": NAME, ...}}, got {str(answer)[:200]!r}'
    if answer.get("protocol") != PROTOCOL:
        return (
            f"it speaks protocol {answer.get('protocol')!r}, this client protocol {PROTOCOL}: install the same "
            "densegrpo-fast version on both sides"
        )
    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0):
        return f"its max_request_bytes is {limit!r}, not a positive integer"
    return None


#: the rewards scored by a server: nothing of them on this process's device
SERVED = ("remote", "geneval", "vlm_judge", "vlm_pairwise")


@register("remote")
class RemoteReward:
    """Client of a reward server (see the module doc for the protocol and the server command).

    kwargs: ``url`` (e.g. ``http://127.0.0.1:8085``; or a list, of which process ``LOCAL_RANK`` of a
    torchrun job takes entry ``LOCAL_RANK % len``: one server per GPU of a node, since a server scores one
    request at a time), ``timeout_s`` per request (a ``/score`` past it is not retried: the server has the
    batch), ``retries`` after the first attempt, ``backoff_s`` (first wait; doubles, at most 30 s, plus up to
    half at random), ``max_batch`` images per request, ``check``: ask
    ``/health`` when built, so a server that is down fails before the policy loads. ``start_hint``: the
    command the error messages suggest.
    """

    def __init__(
        self,
        url: str | list[str],
        timeout_s: float = 300.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_batch: int = 64,
        check: bool = True,
        start_hint: str | None = None,
    ):
        url = pick_url(url)
        parsed = urllib.parse.urlparse(url)
        if not timeout_s > 0 or retries < 0 or backoff_s < 0 or max_batch < 1:
            raise ValueError(
                f"reward.kwargs timeout_s={timeout_s} (> 0), retries={retries} (>= 0), backoff_s={backoff_s} "
                f"(>= 0), max_batch={max_batch} (>= 1): a value is out of range"
            )
        self.url = str(url).rstrip("/")
        self.timeout_s, self.backoff_s = float(timeout_s), float(backoff_s)
        self.retries, self.max_batch = int(retries), int(max_batch)
        port = parsed.port or 8085
        self.start_hint = start_hint or f"densegrpo-fast serve-reward --reward NAME --port {port}"
        # no proxies: a cluster's http_proxy would otherwise carry even loopback requests to the proxy
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.max_request_bytes: int | None = None
        self.health_answer: dict | None = None  # (``check``: the server's /health, as it answered at start)
        if check:
            self.health_answer = self.health()
            self.max_request_bytes = self.health_answer.get("max_request_bytes")

    def health(self) -> dict:
        """The server's ``GET /health`` answer (with the client's retries), checked to be a protocol-1 reward
        server's."""
        answer = self._request("/health")
        if problem := health_problem(answer):
            raise RemoteRewardError(
                f"{self.url}/health is not a densegrpo-fast reward server's answer: {problem}. Is reward.kwargs.url "
                f"a reward server? Start one with: {self.start_hint}"
            )
        return answer

    @property
    def served(self) -> dict | None:
        """What the server said it hosts when this client was built: its ``reward``, ``mode`` if it has one,
        and the digest of its ``--kwargs`` (None without ``check``)."""
        if self.health_answer is None:
            return None
        keys = ("reward", "mode", "kwargs_digest")
        return {k: self.health_answer[k] for k in keys if k in self.health_answer}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        pixels = to_uint8(images)  # [B, 3, H, W] uint8
        scores: list[float] = []
        for i in range(0, len(prompts), self.max_batch):
            scores += self._score(pixels[i : i + self.max_batch], prompts[i : i + self.max_batch])
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> list[float]:
        body = encode_request(pixels, prompts)
        limit = self.max_request_bytes
        if limit is not None and len(body) > limit:
            if len(prompts) == 1:
                raise RemoteRewardError(
                    f"one {list(pixels.shape[1:])} image makes a {len(body)}-byte request, over the reward "
                    f"server's limit of {limit} bytes: restart the server with a larger --max-request-mb"
                )
            h = len(prompts) // 2  # split until each request fits
            return self._score(pixels[:h], prompts[:h]) + self._score(pixels[h:], prompts[h:])
        out = self._request("/score", body)
        scores = out.get("scores")
        if not (isinstance(scores, list) and len(scores) == len(prompts) and all(map(_is_number, scores))):
            raise RemoteRewardError(
                f"reward server at {self.url} answered {str(out)[:200]!r} to {len(prompts)} images: "
                'expected {"scores": [one number per image]}'
            )
        return scores

    def _request(self, path: str, body: bytes | None = None) -> dict:
        """GET (no body) or POST ``path``; the JSON object answered. Retries transport failures and 5xx with
        backoff; not a POST that timed out waiting for its answer (the server has it: a retry would queue
        behind it)."""
        url = self.url + path
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        timeout = self.timeout_s if body is not None else min(self.timeout_s, HEALTH_TIMEOUT_S)
        slow = (  # (a /score past its time is not retried: the server may still be scoring it)
            f"reward server at {url} did not answer within reward.kwargs.timeout_s={self.timeout_s:g} s (the "
            "request was sent: the server may still be scoring it, so it is not retried, which would queue "
            "behind it): raise reward.kwargs.timeout_s, or lower reward.kwargs.max_batch"
        )
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(backoff(self.backoff_s, attempt))
            answered = False  # (True: this attempt got an error from the reward server itself, which runs)
            request = urllib.request.Request(
                url, data=body, headers=headers, method="GET" if body is None else "POST"
            )
            try:
                with self._opener.open(request, timeout=timeout) as response:
                    out = json.loads(_read_within(response, timeout))
            except urllib.error.HTTPError as e:  # the server answered with an error status
                message, retry, ours = _server_error(e)
                if e.code == 413:
                    raise RemoteRewardError(
                        f"reward server at {url} refused a {len(body or b'')}-byte request as too large "
                        f"(413: {message}): lower reward.kwargs.max_batch or restart the server with a larger "
                        "--max-request-mb"
                    ) from None
                if e.code < 500:
                    raise RemoteRewardError(
                        f"reward server at {url} refused the request ({e.code}: {message})"
                    ) from None
                if not retry:
                    raise RemoteRewardError(
                        f"reward server at {url} failed ({e.code}: {message}); not retried: the same request "
                        "would fail again (fix the reward, see the server's log)"
                    ) from None
                last, answered = f"{e.code}: {message}", ours
            except TimeoutError:  # (raised bare once connected: the answer did not come in time)
                if body is not None:
                    raise RemoteRewardError(slow) from None
                last = f"timed out after {timeout:g} s"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                timed_out = isinstance(reason, TimeoutError)
                last = f"timed out after {timeout:g} s" if timed_out else f"{type(reason).__name__}: {reason}"
            except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's limit
                raise RemoteRewardError(
                    f"reward server at {url} answered something that is not JSON ({e}); is a densegrpo-fast "
                    "reward server listening there?"
                ) from None
            else:
                if not isinstance(out, dict):
                    raise RemoteRewardError(
                        f"reward server at {url} answered {str(out)[:200]!r}: expected a JSON object; is a "
                        "densegrpo-fast reward server listening there?"
                    )
                return out
        if answered:
            raise RemoteRewardError(
                f"reward server at {url} failed after {self.retries + 1} attempt(s) (the last answered {last}): "
                "the server runs, its reward fails; see the server's log for the cause"
            )
        raise RemoteRewardError(
            f"reward server at {url} did not answer after {self.retries + 1} attempt(s) (last: {last}). "
            f"Is it running? Start it with: {self.start_hint} (see densegrpo_fast/rewards/remote.py); "
            "a slow reward needs a larger reward.kwargs.timeout_s"
        )


def served_by(rewards: dict) -> dict[str, list]:
    """For each reward of ``rewards`` (name -> reward) scored by servers, what they host
    (:attr:`RemoteReward.served` of each client it holds: a sum of rewards may hold several; clients built
    without ``check`` did not ask and are left out)."""
    from densegrpo_fast.distributed import reachable

    found = {
        k: [c.served for c in reachable(r, RemoteReward) if c.served is not None] for k, r in rewards.items()
    }
    return {k: v for k, v in found.items() if v}


def check_same_servers(d, rewards: dict) -> dict[str, list]:
    """:func:`served_by`, compared across the ranks of ``d`` (each may reach its own entry of a ``url``
    list): every rank raises if one reaches a server that hosts another reward or mode. Returns it."""
    from densegrpo_fast.distributed import check_same

    served = served_by(rewards)
    fix = (
        "every process must score with the same reward: point each entry of the url list at a server started "
        "with the same --reward and --kwargs (kwargs_digest differs where only the --kwargs do; their device, "
        "gpu and batch-size keys are left out of it, so one server per GPU may differ there)"
    )
    check_same(d, served, "what the reward servers host (their GET /health)", fix)
    return served


GENEVAL_HINT = (
    "densegrpo-fast serve-reward --reward geneval_detector --kwargs '{...}' --port {port}, in an "
    "environment with mmdetection (the kwargs: densegrpo_fast/rewards/geneval_detector.py)"
)


def pick_url(url: str | list[str]) -> str:
    """``url`` itself, or this process's entry of a list (``LOCAL_RANK`` modulo its length)."""
    if problems := url_problems(url):
        raise ValueError(problems[0])
    if isinstance(url, str):
        return url
    return url[int(os.environ.get("LOCAL_RANK", "0")) % len(url)]


def url_problems(url: object = "http://127.0.0.1:8085", **_: object) -> list[str]:
    """What is wrong with ``reward.kwargs.url``: an http(s) URL, or a non-empty list of them."""
    urls = url if isinstance(url, list) else [url]
    if not urls:
        return ["reward.kwargs.url=[] names no server: give one URL, or one per GPU of a node"]
    bad = [u for u in urls if not isinstance(u, str) or urllib.parse.urlparse(u).scheme not in ("http", "https")
           or not urllib.parse.urlparse(u).netloc]  # fmt: skip
    if bad:
        return [
            f"reward.kwargs.url={url!r}: {bad[0]!r} is not an http(s) URL; give one such as "
            '"http://127.0.0.1:8085" (quoted), or a list of them, one per GPU of a node'
        ]
    return []


def _geneval_check(mode: str | None = None, url: object = "http://127.0.0.1:8085", **_: object) -> list[str]:
    from densegrpo_fast.rewards.geneval_detector import MODES  # (light: the registry imports it anyway)

    problems = url_problems(url)
    if mode is not None and mode not in MODES:
        problems.append(
            f"reward.kwargs.mode={mode!r} is not a geneval_detector mode: choose one of {list(MODES)}, or null"
        )
    return problems


@register("geneval")
def geneval(
    url: str | list[str] = "http://127.0.0.1:8085",
    timeout_s: float = 300.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    max_batch: int = 64,
    check: bool = True,
    mode: str | None = None,
) -> RemoteReward:
    """GenEval through the reward server: ``remote`` with GenEval's default URL and start command in its
    errors. The server hosts ``geneval_detector`` (or a user factory) in an environment with mmdetection
    (module doc). With ``check``, the server must host ``geneval_detector`` or a user factory (not another
    registry reward at a mistyped port), and, when ``mode`` is given, score in that mode (``partial`` for
    training, ``geneval`` for GenEval's 0/1 rule): two servers swapped are found before any training."""
    url = pick_url(url)
    port = urllib.parse.urlparse(str(url)).port or 8085
    hint = GENEVAL_HINT.replace("{port}", str(port))
    client = RemoteReward(url, timeout_s, retries, backoff_s, max_batch, check, start_hint=hint)
    if check:
        health = client.health_answer or {}
        name, served = str(health.get("reward")), health.get("mode")
        if name != "geneval_detector" and ":" not in name:
            raise ValueError(
                f"reward server at {client.url} hosts {name!r}, not geneval_detector: is reward.kwargs.url the "
                f"GenEval server's? Start one with: {hint}"
            )
        if mode is not None and served is None:
            warnings.warn(
                f"reward server at {client.url} does not report its mode (started by an older densegrpo-fast, or "
                f"a factory whose reward has no .mode): reward.kwargs.mode={mode!r} is not checked",
                stacklevel=2,
            )
        elif mode is not None and served != mode:
            raise ValueError(
                f"reward server at {client.url} scores in mode {served!r}, but reward.kwargs.mode asks for "
                f'{mode!r}: point reward.kwargs.url at the server started with "mode": "{mode}" (training '
                "uses partial, GenEval's tables geneval)"
            )
    return client


geneval.check = _geneval_check
RemoteReward.check = staticmethod(url_problems)  # (read by the config's checks: no server is asked)
