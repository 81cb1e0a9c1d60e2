"""The reward server: one reward hosted over HTTP (``densegrpo-fast serve-reward``).

Protocol, commands and the GenEval set-up are in :mod:`densegrpo_fast.rewards.remote`. The reward is a
registry name (``--reward pickscore``) or a user factory ``package.module:callable`` called with
``--kwargs`` (so a GenEval scorer can run where mmdetection is installed; ``geneval_detector`` is one).

Built on the standard library's ``ThreadingHTTPServer``: requests are read and validated in their own
threads (``/health`` answers while a batch scores), and one lock lets one batch score at a time, so the
reward's model never runs two batches at once. Requests larger than ``max_request_bytes`` get 413 before
their body is read into memory (it is drained in 1 MiB pieces so that the client still receives the answer;
a claimed length past 4x the limit is drained only up to the limit, then the connection closes). A body must
keep arriving, or the request gets 408 and its connection closes: no read may wait more than ``body_stall_s``
(30 s) for the next bytes, and past the first ``body_stall_s`` the body must have come at ``min_body_rate``
(1 MiB/s) on average, within ``body_deadline_s`` (600 s) in all. So a client that declares a large body and
trickles it holds its share of the memory cap below for about ``body_stall_s``, not for minutes. A request
whose client has hung up (its timeout ran out) while the request waited for the reward is dropped unscored:
an abandoned batch does not hold up the ones behind it. A client must keep its sending side open until the
answer comes (HTTP/1.0 as urllib, requests and curl speak it): one that half-closes after its body (``nc -N``,
``socat``) cannot be told from one that hung up, and is dropped the same way.

Memory. The bodies held at once are capped by ``max_waiting_bytes`` (default 4x the request limit): a request
past the cap waits before its body is read, and its client's send waits with it, so many ranks cannot fill
the host's memory with queued batches. Reading and decoding a body holds it twice for a moment (the bytes and
the decoded images), so a request counts twice its length against the cap until it is decoded, then once:
while it waits its turn it holds its 8-bit images only (B x 3 x H x W bytes). The batch being scored adds its
float copy (4x its images), made in its turn, and the reward's own memory.

No authentication: bind to 127.0.0.1 (the default) or a trusted network. Bodies are parsed as safetensors and
JSON only, never unpickled (see the protocol's docstring for why). ``/health`` reports a digest of the
``--kwargs`` with the reward's name, so clients can tell two servers of one reward with other settings apart.
Ctrl-C (or :meth:`RewardServer.stop`) closes the connections whose request has not been read whole (their
clients retry or fail) and waits for the requests read, being scored or waiting their turn to score.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import select
import socket
import sys
import threading
import time
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
    from densegrpo_fast.rewards.pairwise import is_pairwise

    kwargs = dict(kwargs or {})
    if ":" in reward:
        factory = load_object(reward)
        if not callable(factory):
            raise ValueError(f"--reward {reward!r} is not callable: give a factory (**kwargs) -> reward")
        fn = factory(**kwargs)
    else:
        try:
            fn = build_reward(reward, **kwargs)
        except ValueError as e:  # (worded for the config: here the values came from the flags)
            raise ValueError(
                str(e).replace("reward.name=", "--reward ").replace("reward.kwargs=", "--kwargs ")
            ) from None
    if is_pairwise(fn):
        raise ValueError(
            f"--reward {reward!r} compares the images of a group, which the server's requests (a batch of images "
            "with their prompts) do not carry: serve its pointwise reward, or let the trainer build the pairwise "
            "reward around a remote one (e.g. win_rate with reward: {name: remote, kwargs: {...}})"
        )
    return fn


class RewardContractError(RuntimeError):
    """The reward broke its contract (e.g. returned the wrong shape): answered 500 with ``retry: false``, since
    the same request would fail the same way."""


class ClientGone(Exception):
    """The client hung up before its request's turn came: nobody is waiting for the scores."""


#: Keyword arguments that place a reward or size its batches, not what it scores: left out of the digest, so
#: one server per GPU of a node (``"device": "cuda:N"``) answers the digest of its peers.
PLACEMENT_KEYS = frozenset({"device", "gpu", "batch_size", "max_batch"})


def _scored_part(value):
    if isinstance(value, dict):
        return {k: _scored_part(v) for k, v in value.items() if k not in PLACEMENT_KEYS}
    if isinstance(value, (list, tuple)):
        return [_scored_part(v) for v in value]
    return value


def kwargs_digest(kwargs: dict | None) -> str:
    """A short digest of a reward's keyword arguments (JSON with sorted keys, at any depth without the
    :data:`PLACEMENT_KEYS`), for ``/health``: two servers of one reward with other settings (weights, a sum's
    weights, GenEval's metadata) answer other digests; a path written otherwise counts as another setting."""
    text = json.dumps(_scored_part(kwargs or {}), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    timeout = 120  # seconds a read may wait for the client's request line and headers (a body: body_stall_s)
    in_flight = False  # True once the whole request is read: Ctrl-C waits for it, not for an idle client

    def setup(self) -> None:
        super().setup()
        self.server.track(self, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self, False)

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._reply(404, {"error": f"no {self.path}: use GET /health or POST /score"})
        s = self.server
        answer = {
            "status": "ok",
            "reward": s.name,
            "protocol": PROTOCOL,
            "max_request_bytes": s.max_request_bytes,
            "kwargs_digest": s.kwargs_digest,
        }
        mode = getattr(s.reward, "mode", None)
        if isinstance(mode, str):  # (geneval_detector's partial / geneval / ...: a client can check it)
            answer["mode"] = mode
        self._reply(200, answer)

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
            # drained so that a client still sending reads the 413 (not a reset it would retry); a claim past 4x
            # the limit only up to the limit, then the connection closes
            self._drain(length if length <= 4 * limit else limit)
            self.close_connection = True
            return self._reply(
                413,
                {
                    "error": f"request of {length} bytes is over this server's limit of {limit} bytes "
                    "(--max-request-mb): send fewer images per request or raise the limit"
                },
            )
        # counted twice until decoded (the body and its images, a moment), then once (the images)
        self._held = min(2 * length, self.server.max_waiting_bytes)
        if not self.server.reserve(self._held, gone=self._client_gone):
            logger.warning("%s hung up while its request waited to be read: dropped", self.address_string())
            self.close_connection = True
            return
        try:
            self._score(length)
        finally:
            self.server.release(self._held)

    def _score(self, length: int) -> None:
        body = self._read_body(length)
        if body is None:
            return
        try:
            images, prompts = decode_request(body)
        except ProtocolError as e:
            return self._reply(400, {"error": str(e)})
        del body  # (a waiting request holds its uint8 images only)
        self.server.release(self._held - length)
        with self.server._room:  # (close_idle reads it under the lock)
            self._held, self.in_flight = length, True
        try:
            scores = self.server.score(images, prompts, gone=self._client_gone)
        except ClientGone:
            logger.warning(
                "%s hung up (or half-closed its end) before its %d images were scored (its timeout ran out while "
                "it waited?): dropped",
                self.address_string(),
                len(prompts),
            )
            self.close_connection = True
            return
        except ValueError as e:  # the reward refused this input (e.g. an OCR prompt without quotes)
            return self._reply(422, {"error": f"the reward refused the request: {e}"})
        except RewardContractError as e:
            logger.error("reward %s: %s", self.server.name, e)
            return self._reply(500, {"error": f"the reward failed: {e}", "retry": False})
        except Exception as e:  # the reward failed: the client may retry
            logger.exception("reward %s failed", self.server.name)
            return self._reply(500, {"error": f"the reward failed: {type(e).__name__}: {e}"})
        self._reply(200, {"scores": scores})

    def _read_body(self, length: int) -> bytes | None:
        """The body, read as it arrives (``read1``: one receive at a time, so the pace is checked between any
        two), or None after answering 400 (it ended short) or 408 (too slow: :meth:`_too_slow`)."""
        start, parts, got = time.monotonic(), [], 0
        self.connection.settimeout(self.server.body_stall_s)
        try:
            while got < length:
                if slow := self._too_slow(start, got, length):
                    return self._reply_slow(slow)
                try:
                    chunk = self.rfile.read1(min(length - got, _MIB))
                except TimeoutError:
                    return self._reply_slow(
                        f"no byte came for {self.server.body_stall_s:g} s ({got} of {length} bytes had come)"
                    )
                if not chunk:
                    self._reply(400, {"error": f"body ended after {got} of {length} bytes"})
                    return None
                parts.append(chunk)
                got += len(chunk)
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(parts)

    def _too_slow(self, start: float, got: int, length: int) -> str | None:
        """Why a body that began ``start`` and has ``got`` bytes comes too slowly (None: it is on pace)."""
        s = self.server
        elapsed = time.monotonic() - start
        if elapsed > s.body_deadline_s:
            return f"the body took longer than {s.body_deadline_s:g} s to arrive ({got} of {length} bytes)"
        if elapsed > s.body_stall_s and got < s.min_body_rate * (elapsed - s.body_stall_s):
            return (
                f"the body came at {got / elapsed / _MIB:.3g} MiB/s ({got} of {length} bytes in {elapsed:.0f} s), "
                f"below the server's {s.min_body_rate / _MIB:g} MiB/s"
            )
        return None

    def _reply_slow(self, why: str) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):  # (a client that stalls may not read its answer either)
            self._reply(408, {"error": why})

    def _drain(self, length: int) -> None:
        start, got = time.monotonic(), 0
        self.connection.settimeout(self.server.body_stall_s)
        try:
            while got < length and not self._too_slow(start, got, length):
                chunk = self.rfile.read1(min(length - got, _MIB))
                if not chunk:
                    break
                got += len(chunk)
        except TimeoutError:
            pass
        finally:
            self.connection.settimeout(self.timeout)

    def _client_gone(self) -> bool:
        """Whether the client has closed its end: it sends nothing after its body (HTTP/1.0), so a readable
        socket with nothing to read has been closed. Where the platform has ``POLLRDHUP`` (Linux) the close
        shows even while unread body bytes wait in the socket (a request waiting for room): once the whole
        body has reached this host. A larger body's client is found out when the body is read (it ends short:
        400, nothing scored)."""
        hangup = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
        try:
            poller = select.poll()  # (not select.select: it cannot watch a descriptor above 1023)
            poller.register(self.connection, select.POLLIN | hangup)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & hangup:
                return True
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset by the peer, or already closed
            return True

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
    request_queue_size = 128  # connections the kernel queues before accept (socketserver's 5 reset bursts)

    def __init__(
        self,
        reward: Reward,
        *,
        name: str = "reward",
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_bytes: int = 512 * _MIB,
        body_deadline_s: float = 600.0,
        body_stall_s: float = 30.0,
        min_body_rate: float = float(_MIB),
        max_waiting_bytes: int | None = None,
        device: str = "cpu",
        kwargs: dict | None = None,
    ):
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes={max_request_bytes} must be positive")
        max_waiting_bytes = 4 * max_request_bytes if max_waiting_bytes is None else int(max_waiting_bytes)
        if max_waiting_bytes < max_request_bytes:
            raise ValueError(
                f"max_waiting_bytes={max_waiting_bytes} is below max_request_bytes={max_request_bytes}: a "
                "request at the limit could never be read; give at least the request limit (--max-waiting-mb)"
            )
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            fix = (
                "another process listens there: choose another --port, or stop that process"
                if e.errno == errno.EADDRINUSE
                else "check --host (an address of this machine, e.g. 127.0.0.1 or 0.0.0.0) and --port"
            )
            raise ValueError(f"cannot serve at {host}:{port} ({e.strerror or e}): {fix}") from None
        self.reward, self.name, self.max_request_bytes = reward, name, int(max_request_bytes)
        self.device = torch.device(device)  # where the images go: a model reward follows them there
        self.body_deadline_s, self.body_stall_s = float(body_deadline_s), float(body_stall_s)
        self.min_body_rate = float(min_body_rate)
        self.kwargs_digest = kwargs_digest(kwargs)
        self._handlers: set[_Handler] = set()  # the open connections' handlers (close_idle)
        self.max_waiting_bytes, self._waiting_bytes = max_waiting_bytes, 0
        self._room = threading.Condition()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def track(self, handler: _Handler, open_: bool) -> None:
        with self._room:
            (self._handlers.add if open_ else self._handlers.discard)(handler)

    def close_idle(self) -> None:
        """Close the connections whose request has not been read whole (idle, a body still coming, or one
        waiting for room under the cap, unread): their threads end at once, and :meth:`server_close` waits
        only for the requests read and decoded, being scored or waiting for their turn to score."""
        with self._room:
            idle = [h for h in self._handlers if not h.in_flight]
        for h in idle:
            with contextlib.suppress(OSError):  # (already closed)
                h.connection.shutdown(socket.SHUT_RDWR)

    def reserve(self, nbytes: int, gone=None, poll_s: float = 0.2) -> bool:
        """Wait until ``nbytes`` more fit under ``max_waiting_bytes``, and count them held (:meth:`release`
        gives them back). False, holding nothing, if ``gone()`` says the client hung up while it waited."""
        with self._room:
            while self._waiting_bytes + nbytes > self.max_waiting_bytes:
                self._room.wait(poll_s)
                if gone is not None and gone():
                    return False
            self._waiting_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._room:
            self._waiting_bytes -= nbytes
            self._room.notify_all()

    def score(self, images: torch.Tensor, prompts: list[str], gone=None) -> list[float]:
        """Scores of uint8 [B, 3, H, W] images as floats, one batch at a time. ``gone``: called when the
        batch's turn comes; True (its client has hung up) raises :class:`ClientGone` instead of scoring."""
        with self._lock, torch.no_grad():
            if gone is not None and gone():
                raise ClientGone
            x = images.to(self.device).float().div_(255)  # the inverse of the client's round(255 * x)
            out = self.reward(x, prompts)
        out = torch.as_tensor(out)
        if out.shape != (len(prompts),):
            raise RewardContractError(
                f"reward {self.name} returned shape {tuple(out.shape)} for {len(prompts)} images"
            )
        return out.detach().float().cpu().tolist()

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # one line, no traceback
            logger.warning("%s hung up before its answer was sent (its timeout ran out?)", client_address[0])
            return
        logger.warning("request from %s failed", client_address, exc_info=True)

    def start(self) -> RewardServer:
        """Serve in a background thread (tests, notebooks); :meth:`stop` ends it."""
        self._thread = threading.Thread(
            target=self.serve_forever, args=(0.05,), name=f"reward-server-{self.name}", daemon=True
        )  # polls for stop() every 0.05 s (the default 0.5 s makes every stop slow)
        self._thread.start()
        return self

    def stop(self) -> None:
        # (shutdown() waits for serve_forever to end: it would wait forever for one that never ran)
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.close_idle()
        self.server_close()


def serve(
    reward: str,
    kwargs: dict,
    host: str,
    port: int,
    max_request_mb: float,
    max_waiting_mb: float | None = None,
    device: str | None = None,
) -> None:
    """Build the reward and serve it until interrupted (the ``serve-reward`` command). ``device``: where the
    images are scored (None: the GPU when there is one and the reward holds a torch model, else the CPU); a
    model reward without its own ``device`` keyword follows the images there."""
    from densegrpo_fast.distributed import check_device, weights_of

    if device is not None:
        check_device(device, "--device")  # (before the reward loads its weights)
    if max_request_mb <= 0:
        raise ValueError(f"--max-request-mb={max_request_mb} must be positive")
    if max_waiting_mb is None:
        max_waiting_mb = 4 * max_request_mb
    if max_waiting_mb < max_request_mb:
        raise ValueError(
            f"--max-waiting-mb={max_waiting_mb} is below --max-request-mb={max_request_mb}: a request at the "
            "limit could never be read; give at least --max-request-mb"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    fn = load_reward(reward, kwargs)
    if device is None:  # (a reward without a model, JPEG sizes or OCR's own, stays off the GPU)
        device = "cuda" if torch.cuda.is_available() and weights_of(fn) else "cpu"
    server = RewardServer(
        fn,
        name=reward,
        host=host,
        port=port,
        max_request_bytes=int(max_request_mb * _MIB),
        max_waiting_bytes=int(max_waiting_mb * _MIB),
        device=device,
        kwargs=kwargs,
    )
    if host not in ("127.0.0.1", "localhost"):
        logger.warning("serving on %s: the reward server has no authentication; use a trusted network", host)
    print(
        f"serving reward {reward!r} on {device} at {server.url} (POST /score, GET /health); Ctrl-C stops once "
        "the requests in flight are answered",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close_idle()
        server.server_close()
