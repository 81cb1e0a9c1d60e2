"""The reward server: one reward hosted over HTTP (``densegrpo-fast serve-reward``).

Protocol, commands and the GenEval set-up are in :mod:`densegrpo_fast.rewards.remote`. The reward is a
registry name (``--reward pickscore``) or a user factory ``package.module:callable`` called with
``--kwargs`` (so a GenEval scorer can run where mmdetection is installed; ``geneval_detector`` is one).

Built on the standard library's ``ThreadingHTTPServer``: requests are read and validated in their own
threads (``/health`` answers while a batch scores), and one lock lets one batch score at a time, so the
reward's model never runs two batches at once. Requests larger than ``max_request_bytes`` get 413 before
their body is read into memory (it is drained in 1 MiB pieces so the client still receives the answer).
No authentication: bind to 127.0.0.1 (the default) or a trusted network. Bodies are parsed as safetensors
and JSON only, never unpickled (see the protocol's docstring for why).
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from densegrpo_fast.rewards import Reward, build_reward
from densegrpo_fast.rewards.remote import PROTOCOL, ProtocolError, decode_request

logger = logging.getLogger(__name__)
_MIB = 1 << 20


def load_object(spec: str):
    """The object named ``package.module:attr`` (``attr`` may be dotted), imported from the environment."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not 'package.module:callable'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{spec!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH here?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec!r}: {obj.__name__ if hasattr(obj, '__name__') else obj} has no {part!r}")
        obj = getattr(obj, part)
    return obj


def load_reward(reward: str, kwargs: dict | None = None) -> Reward:
    """A registry reward by name, or the reward a user factory ``package.module:callable`` returns."""
    kwargs = dict(kwargs or {})
    if ":" in reward:
        factory = load_object(reward)
        if not callable(factory):
            raise ValueError(f"--reward {reward!r} is not callable: give a factory (**kwargs) -> reward")
        return factory(**kwargs)
    return build_reward(reward, **kwargs)


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    timeout = 120  # seconds a client may take to send its request: a stalled one cannot hold a thread

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._reply(404, {"error": f"no {self.path}: use GET /health or POST /score"})
        s = self.server
        self._reply(
            200,
            {
                "status": "ok",
                "reward": s.name,
                "protocol": PROTOCOL,
                "max_request_bytes": s.max_request_bytes,
            },
        )

    def do_POST(self) -> None:
        if self.path != "/score":
            return self._reply(404, {"error": f"no {self.path}: use POST /score"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(411, {"error": "a POST /score needs a Content-Length header"})
        if length < 0:
            return self._reply(400, {"error": f"Content-Length {length} is negative"})
        limit = self.server.max_request_bytes
        if length > limit:
            self._drain(length)
            return self._reply(
                413,
                {
                    "error": f"request of {length} bytes is over this server's limit of {limit} bytes "
                    "(--max-request-mb): send fewer images per request or raise the limit"
                },
            )
        body = self.rfile.read(length)
        if len(body) != length:
            return self._reply(400, {"error": f"body ended after {len(body)} of {length} bytes"})
        try:
            images, prompts = decode_request(body)
        except ProtocolError as e:
            return self._reply(400, {"error": str(e)})
        try:
            scores = self.server.score(images, prompts)
        except ValueError as e:  # the reward refused this input (e.g. an OCR prompt without quotes)
            return self._reply(422, {"error": f"the reward refused the request: {e}"})
        except Exception as e:  # the reward failed: the client may retry
            logger.exception("reward %s failed", self.server.name)
            return self._reply(500, {"error": f"the reward failed: {type(e).__name__}: {e}"})
        self._reply(200, {"scores": scores})

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, _MIB))
            if not chunk:
                break
            length -= len(chunk)

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)


class RewardServer(ThreadingHTTPServer):
    """``reward`` served at ``host:port`` (port 0 picks a free one; see :attr:`url`)."""

    # server_close() (in stop()) waits for the requests in flight: a request thread left scoring while the
    # interpreter exits can abort the process inside torch ("terminate called without an active exception")
    daemon_threads = False

    def __init__(
        self,
        reward: Reward,
        *,
        name: str = "reward",
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_bytes: int = 512 * _MIB,
    ):
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes={max_request_bytes} must be positive")
        super().__init__((host, port), _Handler)
        self.reward, self.name, self.max_request_bytes = reward, name, int(max_request_bytes)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        """Scores of uint8 [B, 3, H, W] images as floats, one batch at a time."""
        x = images.float().div_(255)  # the inverse of the client's round(255 * x)
        with self._lock, torch.no_grad():
            out = self.reward(x, prompts)
        out = torch.as_tensor(out)
        if out.shape != (len(prompts),):
            raise RuntimeError(
                f"reward {self.name} returned shape {tuple(out.shape)} for {len(prompts)} images"
            )
        return out.detach().float().cpu().tolist()

    def handle_error(self, request, client_address) -> None:
        # e.g. a client that timed out and closed its end before the answer
        logger.warning("request from %s failed", client_address, exc_info=True)

    def start(self) -> RewardServer:
        """Serve in a background thread (tests, notebooks); :meth:`stop` ends it."""
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name=f"reward-server-{self.name}", daemon=True
        )  # polls for stop() every 0.05 s (the default 0.5 s makes every stop slow)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


def serve(reward: str, kwargs: dict, host: str, port: int, max_request_mb: float) -> None:
    """Build the reward and serve it until interrupted (the ``serve-reward`` command)."""
    if max_request_mb <= 0:
        raise ValueError(f"--max-request-mb={max_request_mb} must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    fn = load_reward(reward, kwargs)
    server = RewardServer(fn, name=reward, host=host, port=port, max_request_bytes=int(max_request_mb * _MIB))
    if host not in ("127.0.0.1", "localhost"):
        logger.warning("serving on %s: the reward server has no authentication; use a trusted network", host)
    print(
        f"serving reward {reward!r} at {server.url} (POST /score, GET /health); Ctrl-C stops once the requests "
        "in flight are answered",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
