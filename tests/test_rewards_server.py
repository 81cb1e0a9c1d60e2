"""The reward server and its client on loopback: exact round trips, timeouts, retries, malformed and
oversize requests, a server that is down, and a body that is never unpickled."""

import contextlib
import http.client
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save

from densegrpo_fast.rewards import build_reward, remote
from densegrpo_fast.rewards.remote import RemoteRewardError, encode_request
from densegrpo_fast.rewards.server import RewardServer, kwargs_digest, load_reward

FAST = {"timeout_s": 5.0, "retries": 1, "backoff_s": 0.01}
HEALTH = b'{"status": "ok", "reward": "r", "protocol": 1, "max_request_bytes": 1000000}'


@contextlib.contextmanager
def serving(reward, **kw):
    server = RewardServer(reward, port=0, **kw).start()
    try:
        yield server
    finally:
        server.stop()


def _images(b, h=16, w=12, seed=0):
    """uint8-representable floats: the round trip's 8-bit quantisation is then exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8).float() / 255


def _post(url, body, headers=None):
    """Raw POST /score: (status, JSON answer)."""
    req = urllib.request.Request(url + "/score", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["redness", "jpeg_compressibility"])
def test_round_trip_equals_the_local_reward_exactly(name, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY"):  # a cluster proxy must not capture the loopback requests
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    local = build_reward(name)
    images, prompts = _images(7), [f"prompt {i} “ü”" for i in range(7)]
    with serving(local, name=name) as server:
        client = build_reward("remote", url=server.url, max_batch=3, **FAST)  # 3 requests: 3 + 3 + 1
        assert client.health() == {
            "status": "ok", "reward": name, "protocol": 1, "max_request_bytes": 512 << 20,
            "kwargs_digest": kwargs_digest(None),
        }  # fmt: skip
        assert torch.equal(client(images, prompts), local(images, prompts))


def test_client_splits_requests_to_fit_the_server_limit():
    local = build_reward("redness")
    images, prompts = _images(6), ["p"] * 6
    one = len(encode_request((images[:1] * 255).round().to(torch.uint8), ["p"]))
    with serving(local, max_request_bytes=2 * one) as server:  # fits 2 images, not 6
        client = build_reward("remote", url=server.url, **FAST)
        assert client.max_request_bytes == 2 * one
        assert torch.equal(client(images, prompts), local(images, prompts))
        status, answer = _post(server.url, encode_request((images * 255).round().to(torch.uint8), prompts))
        assert status == 413 and f"limit of {2 * one} bytes" in answer["error"]
        unchecked = build_reward("remote", url=server.url, check=False, **FAST)  # does not know the limit
        with pytest.raises(RemoteRewardError, match=r"too large \(413: .*\): lower reward.kwargs.max_batch"):
            unchecked(images, prompts)
    too_big = pytest.raises(RemoteRewardError, match="restart the server with a larger --max-request-mb")
    with serving(local, max_request_bytes=one // 2) as server, too_big:
        build_reward("remote", url=server.url, **FAST)(images, prompts)


def _slow(images, prompts):
    time.sleep(1.5)
    return torch.zeros(len(prompts))


def test_a_slow_reward_times_out_once_not_retried():
    """A /score whose answer does not come in time is not sent again: the server has it, and each retry would
    queue another copy of the batch behind it (a 1.5 s reward with 3 retries was scored 4 times)."""
    calls = []

    def slow(images, prompts):
        calls.append(len(prompts))
        return _slow(images, prompts)

    with serving(slow) as server:
        client = build_reward("remote", url=server.url, timeout_s=0.3, retries=3, backoff_s=0.01)
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError) as e:
            client(_images(2), ["a", "b"])
        assert time.perf_counter() - t0 < 1.0  # one 0.3 s attempt, not the reward's 1.5 s
        msg = str(e.value)
        assert "did not answer within reward.kwargs.timeout_s=0.3 s" in msg and "not retried" in msg
    assert calls == [2]  # (stop() waited for the batch in flight)


def test_a_batch_whose_client_hung_up_while_it_waited_is_not_scored():
    calls = []
    with serving(lambda images, prompts: calls.append(1) or torch.zeros(len(prompts))) as server:
        client = build_reward("remote", url=server.url, timeout_s=0.3, retries=0)
        with server._lock:  # another batch is scoring
            with pytest.raises(RemoteRewardError, match="did not answer within"):
                client(_images(2), ["a", "b"])
            time.sleep(0.1)  # (the client's close reaches the server)
        assert client(_images(1), ["c"]).tolist() == [0.0]  # the server goes on serving
    assert calls == [1]  # the abandoned batch was dropped when its turn came, the next one scored


def test_a_body_that_trickles_in_gets_408_and_an_oversize_claim_413():
    with serving(build_reward("redness"), body_deadline_s=0.5, max_request_bytes=1000) as server:
        with socket.create_connection(server.server_address[:2], timeout=5) as sock:
            sock.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n")
            t0 = time.perf_counter()
            answer = b""
            while b"408" not in answer and time.perf_counter() - t0 < 3:
                sock.sendall(b"x")  # a byte every 0.1 s: each read succeeds, the whole body never comes
                time.sleep(0.1)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer += sock.recv(4096)
                sock.setblocking(True)
        assert answer.startswith(b"HTTP/1.0 408") and b"longer than 0.5 s" in answer
        assert time.perf_counter() - t0 < 1.5
        # a client claiming 10^15 bytes: at most the limit is drained, then 413 and the connection closes
        with socket.create_connection(server.server_address[:2], timeout=5) as sock:
            sock.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000000000000000\r\n\r\n" + b"x" * 1000)
            answer = sock.makefile("rb").read()  # read to the end: the server closes
        assert answer.startswith(b"HTTP/1.0 413")


def test_a_client_that_does_not_know_the_limit_still_reads_the_413():
    """A client with check=false (no limit known) sends a body over the limit: it reads the 413, not a
    transport failure it would retry. (Loopback's buffers also let it read the answer when the server closes
    after draining less; over a network the full drain up to 4x the limit is what keeps the answer readable.)"""
    with serving(build_reward("redness"), max_request_bytes=1 << 20) as server:
        client = build_reward("remote", url=server.url, check=False, retries=0)
        with pytest.raises(RemoteRewardError, match=r"refused a \d+-byte request as too large \(413"):
            client(_images(2, 800, 800), ["a", "b"])  # (3.8 MB)


@pytest.mark.parametrize("room_for", [1, 2])
def test_bodies_past_the_waiting_cap_wait_unread(room_for, caplog):
    """With room for one body, a second request waits unread while the first scores, and one whose client
    hangs up while it waits is dropped; with room for two, the second is read while the first scores."""
    started, go, calls = threading.Event(), threading.Event(), []

    def reward(images, prompts):
        calls.append(len(prompts))
        started.set()
        go.wait(5)
        return torch.zeros(len(prompts))

    body = encode_request((_images(2, 80, 80) * 255).round().to(torch.uint8), ["a", "b"])  # (38 kB: past the
    # handler's 8 kB read buffer, so unread bytes wait in the socket while a request waits for room)
    answers = []  # (a body counts twice until it is decoded, then once: room for n is n + 1 bodies)
    kw = {"max_request_bytes": len(body), "max_waiting_bytes": (room_for + 1) * len(body)}
    with serving(reward, **kw) as server:
        first = threading.Thread(target=lambda: answers.append(_post(server.url, body)))
        first.start()
        assert started.wait(5)
        second = threading.Thread(target=lambda: answers.append(_post(server.url, body)))
        second.start()
        with socket.create_connection(server.server_address[:2], timeout=5) as sock:  # hangs up while waiting
            sock.sendall(b"POST /score HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.5)
            assert server._waiting_bytes == room_for * len(body)
        time.sleep(0.5)  # (the waiting request sees the hang-up)
        go.set()
        first.join(5), second.join(5)
    assert [status for status, _ in answers] == [200, 200]
    if room_for == 1:
        assert calls == [2, 2]  # the third was dropped unscored
        assert "hung up while its request waited to be read" in caplog.text
    assert server._waiting_bytes == 0


def test_a_waiting_cap_below_the_request_limit_is_refused():
    with pytest.raises(
        ValueError, match=r"max_waiting_bytes=10 is below max_request_bytes=100: .*give at least"
    ):
        RewardServer(build_reward("redness"), max_request_bytes=100, max_waiting_bytes=10)


def test_a_port_in_use_is_a_clear_error():
    with serving(build_reward("redness")) as server:
        port = server.server_address[1]
        with pytest.raises(ValueError, match=rf"cannot serve at 127.0.0.1:{port} .*choose another --port"):
            RewardServer(build_reward("redness"), port=port)


def test_backoff_doubles_is_capped_and_jittered():
    import random

    rng = random.Random(0)
    waits = [[remote.backoff(1.0, a, rng) for _ in range(200)] for a in (1, 2, 3, 10)]
    for wait, base in zip(waits, (1.0, 2.0, 4.0, remote.MAX_BACKOFF_S), strict=True):
        assert base <= min(wait) and max(wait) < 1.5 * base and max(wait) - min(wait) > 0.4 * base


@contextlib.contextmanager
def _fake_server(answers):
    """An HTTP server answering each request with the next (status, body bytes) of ``answers``."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            if self.command == "POST":
                self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answers.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    "health, score, reason",
    [
        (b"[1, 2]", None, "expected a JSON object"),
        (HEALTH, b"\xff\xfe not utf-8", "not JSON"),
        (HEALTH, b"<html>proxy error</html>", "not JSON"),
        (HEALTH, b'{"scores": [null, "x"]}', "one number per image"),
        (HEALTH, b'{"scores": [true, 1.0]}', "one number per image"),
        (HEALTH, b'{"scores": [1.0]}', "one number per image"),
    ],
)
def test_answers_that_are_not_the_protocol_are_clear_errors(health, score, reason):
    answers = [(200, health)] + ([(200, score)] if score is not None else [])
    with _fake_server(answers) as url, pytest.raises(RemoteRewardError, match=reason):
        build_reward("remote", url=url, **FAST)(_images(2), ["a", "b"])


def test_a_proxys_502_for_a_server_that_is_down_asks_whether_it_runs():
    answers = [
        (200, HEALTH),
        (502, b"<html>bad gateway</html>"),
        (502, b"<html>bad gateway</html>"),
    ]
    with _fake_server(answers) as url, pytest.raises(RemoteRewardError) as e:
        build_reward("remote", url=url, **FAST)(_images(2), ["a", "b"])
    assert "did not answer after 2 attempt(s) (last: 502: Bad Gateway). Is it running?" in str(e.value)


def test_health_gives_up_quickly_on_a_server_that_never_answers(monkeypatch):
    monkeypatch.setattr(remote, "HEALTH_TIMEOUT_S", 0.2)
    with socket.socket() as listener:  # connections are accepted by the kernel, never answered
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=r"after 2 attempt\(s\) \(last: timed out after 0.2 s\)"):
            build_reward("remote", url=url, timeout_s=3, retries=1, backoff_s=0.01)
        assert time.perf_counter() - t0 < 2  # not 2 x 3 s


def test_malformed_requests_get_400_and_the_client_says_why(monkeypatch):
    calls = []
    with serving(lambda images, prompts: calls.append(1) or torch.zeros(len(prompts))) as server:
        u8 = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
        meta = {"protocol": "1", "prompts": '["a", "b"]'}
        cases = [
            (b"not a safetensors file", "body is not a safetensors file"),
            (
                save({"images": u8}, metadata={"protocol": "1", "prompts": '["one"]'}),
                "2 images but 1 prompts",
            ),
            (save({"images": u8.float()}, metadata=meta), "torch.float32"),
            (save({"images": u8[:, :1].contiguous()}, metadata=meta), "[2, 1, 4, 4]"),
            (
                save({"images": u8, "x": u8.clone()}, metadata={"protocol": "1", "prompts": "[]"}),
                "exactly ['images']",
            ),
            (save({"images": u8}, metadata={"protocol": "1", "prompts": "[1, 2]"}), "JSON list of strings"),
            (save({"images": u8}, metadata={"protocol": "1"}), "prompts missing"),
            (save({"images": u8}, metadata={**meta, "protocol": "2"}), "speaks protocol 1"),
        ]
        for body, reason in cases:
            status, answer = _post(server.url, body)
            assert status == 400 and reason in answer["error"], (reason, answer)
        assert _post(server.url, b"")[0] == 400  # empty body
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + "/nothing", timeout=5)
        assert e.value.code == 404
        for length, status in [(None, 411), ("-1", 400), ("x", 411)]:  # the body size must be declared
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
            conn.putrequest("POST", "/score")
            if length is not None:
                conn.putheader("Content-Length", length)
            conn.endheaders()
            assert conn.getresponse().status == status
            conn.close()
        # the client's message for a 4xx, and no retry (the same request would fail again)
        monkeypatch.setattr(remote, "encode_request", lambda images, prompts: b"garbage")
        client = build_reward("remote", url=server.url, check=False, retries=3, backoff_s=5)
        opened, open_ = [], client._opener.open
        monkeypatch.setattr(client._opener, "open", lambda *a, **k: opened.append(1) or open_(*a, **k))
        with pytest.raises(
            RemoteRewardError, match=r"refused the request \(400: body is not a safetensors file"
        ):
            client(_images(2), ["a", "b"])
        assert len(opened) == 1
    assert calls == []  # no malformed request reached the reward


def test_a_pickled_body_is_rejected_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # unpickling runs open(marker, "w"): a file appears if anyone unpickles
            return (open, (str(marker), "w"))

    body = pickle.dumps({"images": Exploit(), "prompts": ["a"]})
    with serving(build_reward("redness")) as server:
        status, answer = _post(server.url, body)
    assert status == 400 and "not a safetensors file" in answer["error"]
    assert not marker.exists()


def test_reward_errors_4xx_are_final_5xx_are_retried_unless_the_server_says_not():
    def refuses(images, prompts):
        raise ValueError("prompt 'x' has no quotes")

    with serving(refuses) as server:
        client = build_reward("remote", url=server.url, retries=3, backoff_s=5)  # a retry would take 5 s
        with pytest.raises(RemoteRewardError, match=r"\(422: the reward refused the request: prompt 'x'"):
            client(_images(1), ["x"])

    failures = [RuntimeError("CUDA hiccup")]

    def flaky(images, prompts):
        if failures:
            raise failures.pop()
        return torch.full((len(prompts),), 7.0)

    with serving(flaky) as server:
        client = build_reward("remote", url=server.url, **FAST)
        assert client(_images(2), ["a", "b"]).tolist() == [7.0, 7.0]  # 500, then success
        failures[:] = [RuntimeError("CUDA out of memory")] * 2  # 500 on every attempt: the server runs
        with pytest.raises(RemoteRewardError) as e:
            client(_images(2), ["a", "b"])
        assert "failed after 2 attempt(s) (the last answered 500: " in str(
            e.value
        ) and "Is it running" not in str(e.value)
        assert "CUDA out of memory" in str(e.value) and "see the server's log" in str(e.value)

    calls = []  # a reward that breaks its contract fails the same way every time: not retried
    with serving(lambda images, prompts: calls.append(1) or torch.zeros(len(prompts) + 1)) as server:
        client = build_reward("remote", url=server.url, retries=3, backoff_s=5)  # a retry would take 5 s
        with pytest.raises(
            RemoteRewardError, match=r"\(500: .*returned shape \(3,\) for 2 images\); not retried"
        ):
            client(_images(2), ["a", "b"])
    assert calls == [1]


def test_the_server_scores_on_its_device_and_refuses_one_this_machine_lacks():
    from densegrpo_fast.rewards.server import serve

    seen = []
    with serving(
        lambda images, prompts: seen.append(images.device) or torch.zeros(len(prompts)), device="cpu"
    ) as s:
        build_reward("remote", url=s.url)(_images(2), ["a", "b"])
    assert seen == [torch.device("cpu")]
    if not torch.cuda.is_available():  # (checked before the reward is built)
        with pytest.raises(ValueError, match=r"--device='cuda', but this torch .* sees no CUDA device"):
            serve("redness", {}, "127.0.0.1", 0, 1.0, device="cuda")


def test_a_server_never_started_stops_at_once():
    import threading

    server = RewardServer(lambda images, prompts: torch.zeros(len(prompts)), port=0)
    stopping = threading.Thread(target=server.stop, daemon=True)  # (it used to wait forever)
    stopping.start()
    stopping.join(timeout=5)
    assert not stopping.is_alive()


def test_server_down_is_a_clear_error_after_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError) as e:
        build_reward("remote", url=url, retries=2, backoff_s=0.05)  # checks /health when built
    assert time.perf_counter() - t0 >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s
    msg = str(e.value)
    assert f"reward server at {url}/health did not answer after 3 attempt(s)" in msg
    assert "ConnectionRefusedError" in msg and "densegrpo-fast serve-reward --reward NAME --port" in msg
    client = build_reward("remote", url=url, check=False, retries=0)
    with pytest.raises(RemoteRewardError, match="Is it running"):
        client(_images(1), ["a"])
    with pytest.raises(
        RemoteRewardError,
        match=r"--reward geneval_detector --kwargs .* --port \d+, in an environment with mmdetection",
    ):
        build_reward("geneval", url=url, retries=0)
    with pytest.raises(ValueError, match=r"is not an http\(s\) URL"):
        build_reward("remote", url="127.0.0.1:8085")


def test_serves_a_user_factory_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(
        "import torch\n"
        "def make(offset=0.0):\n"
        "    return lambda images, prompts: images.mean((1, 2, 3)) + offset\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("my_scorer:make", {"offset": 1.0})
    images = _images(3)
    with serving(reward, name="my_scorer:make") as server:
        out = build_reward("remote", url=server.url, **FAST)(images, ["a"] * 3)
    assert torch.equal(out, images.mean((1, 2, 3)) + 1.0)
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_reward("no_such_module:make")
    with pytest.raises(ValueError, match="has no 'missing'"):
        load_reward("my_scorer:missing")
    # a registry reward's errors name the flags the values came from
    with pytest.raises(
        ValueError, match=r"--reward 'rednes' is not a registered reward: did you mean 'redness'"
    ):
        load_reward("rednes")
    with pytest.raises(ValueError, match=r"reward 'redness' does not take --kwargs \{'x': 1\}"):
        load_reward("redness", {"x": 1})


def test_serve_reward_command(tmp_path):
    """The real command in a subprocess: it starts, answers, and stops on SIGTERM."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "densegrpo_fast", "serve-reward", "--reward", "jpeg_incompressibility"]
    proc = subprocess.Popen(
        [*cmd, "--kwargs", '{"quality": 50}', "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        client = build_reward("remote", url=f"http://127.0.0.1:{port}", retries=8, backoff_s=0.1)  # <= 25 s
        images, prompts = _images(2), ["a", "b"]
        local = build_reward("jpeg_incompressibility", quality=50)
        assert torch.equal(client(images, prompts), local(images, prompts))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    where = "cuda" if torch.cuda.is_available() else "cpu"  # (the default: the GPU when there is one)
    assert f"serving reward 'jpeg_incompressibility' on {where} at http://127.0.0.1:{port}" in out
    bad = subprocess.run([*cmd, "--kwargs", "{quality: 50}", "--port", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not JSON" in bad.stderr


def test_the_geneval_client_checks_what_the_server_scores():
    """A geneval client pointed at another reward's server, or at the GenEval server of the other mode, is
    refused before any training (the server's /health names its reward and mode)."""

    class Geneval:
        mode = "partial"

        def __call__(self, images, prompts):
            return torch.zeros(len(prompts))

    wrong = pytest.raises(ValueError, match=r"hosts 'redness', not geneval_detector: is reward.kwargs.url")
    with serving(build_reward("redness"), name="redness") as other, wrong:
        build_reward("geneval", url=other.url, **FAST)
    with serving(Geneval(), name="geneval_detector") as server:
        assert (
            server
            and build_reward("geneval", url=server.url, mode="partial", **FAST).health()["mode"] == "partial"
        )
        with pytest.raises(
            ValueError, match=r"scores in mode 'partial', but reward.kwargs.mode asks for 'geneval'"
        ):
            build_reward("geneval", url=server.url, mode="geneval", **FAST)
    with serving(Geneval(), name="mypkg.scorer:build") as server:  # a user factory: not refused by name
        build_reward("geneval", url=server.url, **FAST)
    unchecked = pytest.warns(
        UserWarning, match=r"does not report its mode .*kwargs.mode='partial' is not checked"
    )
    older = serving(lambda images, prompts: torch.zeros(len(prompts)), name="geneval_detector")
    with older as server, unchecked:  # (a server of an older version: no mode in its /health)
        build_reward("geneval", url=server.url, mode="partial", **FAST)
    from densegrpo_fast.rewards import kwargs_problems
    from densegrpo_fast.rewards.geneval_detector import MODES

    assert kwargs_problems("geneval", {"mode": "strict"}) == [
        f"reward.kwargs.mode='strict' is not a geneval_detector mode: choose one of {list(MODES)}, or null"
    ]
    assert all(kwargs_problems("geneval", {"mode": m}) == [] for m in (*MODES, None))


def test_each_process_of_a_node_takes_its_own_server(monkeypatch):
    """``url`` as a list: process LOCAL_RANK of a torchrun job talks to entry LOCAL_RANK % len (one server
    per GPU, since a server scores one request at a time); a plain URL serves every process."""
    with serving(build_reward("redness")) as first, serving(build_reward("redness")) as second:
        urls = [first.url, second.url]
        for local_rank, want in [("0", first.url), ("1", second.url), ("2", first.url)]:
            monkeypatch.setenv("LOCAL_RANK", local_rank)
            assert build_reward("remote", url=urls).url == want
            assert build_reward("geneval", url=urls, check=False).url == want
        assert build_reward("remote", url=first.url).url == first.url
    with pytest.raises(ValueError, match=r"url=\[\] names no server"):
        build_reward("remote", url=[])


def _trickle(address, length, stop):
    """A client that declares ``length`` bytes and sends one every 0.05 s until ``stop`` is set."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % length)
        with contextlib.suppress(OSError):
            while not stop.wait(0.05):
                sock.sendall(b"x")


@pytest.mark.parametrize("silent", [False, True])
def test_a_trickling_or_silent_body_is_dropped_soon_and_frees_the_cap(silent):
    """A client that declares a body as large as the whole waiting cap and then trickles it (or sends nothing)
    holds the cap for about body_stall_s, not for the whole body deadline: the honest request behind it is
    scored within seconds."""
    kw = {"max_request_bytes": 100_000, "max_waiting_bytes": 200_000, "body_stall_s": 0.5}
    with serving(build_reward("redness"), **kw) as server:
        stop = threading.Event()
        if silent:
            sock = socket.create_connection(server.server_address[:2], timeout=5)
            sock.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 100000\r\n\r\n")
        else:
            thread = threading.Thread(target=_trickle, args=(server.server_address[:2], 100_000, stop))
            thread.start()
        time.sleep(0.2)
        assert server._waiting_bytes == 200_000  # (the declared body, counted twice until decoded)
        t0 = time.perf_counter()
        scores = build_reward("remote", url=server.url, timeout_s=10.0, retries=0)(_images(2), ["a", "b"])
        assert scores.shape == (2,) and time.perf_counter() - t0 < 3.0  # (600 s before: the body deadline)
        stop.set()
        if silent:
            sock.close()
        else:
            thread.join(5)


def test_a_body_counts_twice_until_decoded_then_once():
    started, go = threading.Event(), threading.Event()

    def reward(images, prompts):
        started.set()
        go.wait(5)
        return torch.zeros(len(prompts))

    body = encode_request((_images(2, 80, 80) * 255).round().to(torch.uint8), ["a", "b"])
    with serving(reward, max_request_bytes=len(body), max_waiting_bytes=3 * len(body)) as server:
        answers = []
        first = threading.Thread(target=lambda: answers.append(_post(server.url, body)))
        first.start()
        assert started.wait(5)
        assert server._waiting_bytes == len(body)  # decoded, scoring: its images only
        with socket.create_connection(server.server_address[:2], timeout=5) as sock:  # half a body sent
            sock.sendall(b"POST /score HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100])
            time.sleep(0.3)
            assert server._waiting_bytes == 3 * len(body)
        go.set()
        first.join(5)
        time.sleep(0.3)
    assert [status for status, _ in answers] == [200] and server._waiting_bytes == 0


def test_a_burst_of_connections_is_queued_not_refused():
    """Connections made while the server is busy wait in the kernel's queue (socketserver's default of 5
    would leave the rest unanswered until their connect times out), and each is answered once it serves."""
    server = RewardServer(build_reward("redness"), port=0)
    socks = []
    try:
        for _ in range(40):
            socks.append(socket.create_connection(server.server_address[:2], timeout=0.5))
        server.start()
        for sock in socks:
            sock.settimeout(5)
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert all(sock.makefile("rb").read().startswith(b"HTTP/1.0 200") for sock in socks)
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_stop_closes_idle_connections_at_once():
    """A connection that has sent half a request line (or half a body) does not hold up the stop: the old
    server waited for the handler's 120 s read timeout."""
    server = RewardServer(build_reward("redness"), port=0).start()
    idle = socket.create_connection(server.server_address[:2], timeout=5)
    idle.sendall(b"GET /hea")
    half = socket.create_connection(server.server_address[:2], timeout=5)
    half.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\nxx")
    time.sleep(0.2)
    t0 = time.perf_counter()
    server.stop()
    assert time.perf_counter() - t0 < 3.0
    idle.close(), half.close()


def test_health_reports_a_digest_of_the_kwargs():
    """Two servers of one reward with other settings (here a sum's weights of opposite signs) answer other
    digests, so the ranks of a job and a resumed evaluation tell them apart; key order does not matter."""
    from densegrpo_fast.rewards.server import kwargs_digest

    plus = {"rewards": {"red": {"name": "redness", "weight": 1.0}}, "other": 1}
    minus = {"rewards": {"red": {"name": "redness", "weight": -1.0}}, "other": 1}
    assert kwargs_digest(plus) == kwargs_digest(dict(reversed(list(plus.items()))))
    # where a reward runs and how it batches is not what it scores: one server per GPU shares a digest
    per_gpu = [{"metadata": "m.jsonl", "device": f"cuda:{i}", "batch_size": 8 * i} for i in (0, 1)]
    assert kwargs_digest(per_gpu[0]) == kwargs_digest(per_gpu[1]) == kwargs_digest({"metadata": "m.jsonl"})
    assert kwargs_digest({"rewards": {"a": {"kwargs": {"gpu": True}}}}) == kwargs_digest(
        {"rewards": {"a": {"kwargs": {}}}}
    )
    assert kwargs_digest(plus) != kwargs_digest(minus) and kwargs_digest(None) == kwargs_digest({})
    served = []
    for kwargs in (plus, minus):
        reward = build_reward("multi", rewards=kwargs["rewards"])
        with serving(reward, name="multi", kwargs=kwargs) as server:
            served.append(build_reward("remote", url=server.url).served)
    assert served[0] == {"reward": "multi", "kwargs_digest": kwargs_digest(plus)}
    assert served[1]["reward"] == "multi" and served[0] != served[1]


@pytest.mark.parametrize(
    "health, score, reason",
    [
        (b"{}", None, "not a densegrpo-fast reward server's answer"),
        (
            b'{"status": "ok", "reward": "r", "protocol": 2}',
            None,
            "speaks protocol 2, this client protocol 1",
        ),
        (
            b'{"status": "ok", "reward": "r", "protocol": 1, "max_request_bytes": "big"}',
            None,
            "not a positive",
        ),
        (HEALTH, b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (HEALTH, b'{"scores": [1e999999999, 1.0]}', None),  # (inf: a number, named later by the trainer)
        (HEALTH, b'{"scores": [1' + b"0" * 400 + b", 1.0]}", "one number per image"),
    ],
)
def test_health_and_answers_past_python_limits_are_clear_errors(health, score, reason):
    answers = [(200, health)] + ([(200, score)] if score is not None else [])
    with _fake_server(answers) as url:
        if reason is None:
            assert build_reward("remote", url=url, **FAST)(_images(2), ["a", "b"]).isinf()[0]
            return
        with pytest.raises(RemoteRewardError, match=reason):
            build_reward("remote", url=url, **FAST)(_images(2), ["a", "b"])


def test_an_answer_that_drips_in_times_out_as_a_whole():
    """Each byte of the answer comes within the read timeout, the whole does not: timeout_s bounds it."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(HEALTH, 0)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(b'{"scores": [1.0, 2.0]}' + b" " * 100, 0.1)

        def _send(self, body, pause):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)):
                with contextlib.suppress(OSError):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                time.sleep(pause)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = build_reward("remote", url=f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=1.0)
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError, match="did not answer within reward.kwargs.timeout_s=1 s"):
            client(_images(2), ["a", "b"])
        assert time.perf_counter() - t0 < 3.0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_hostile_prompts_metadata_gets_a_400():
    from safetensors.torch import save as save_tensors

    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    deep = save_tensors(
        {"images": images}, metadata={"protocol": "1", "prompts": "[" * 100_000 + "]" * 100_000}
    )
    with serving(build_reward("redness")) as server:
        status, answer = _post(server.url, deep)
    assert status == 400 and "prompts missing or not JSON" in answer["error"]


def test_timeout_s_bounds_each_wait_not_the_upload_and_the_scoring_together():
    """A slow link (the body takes about 1 s to upload) and a reward that takes 0.5 s: each wait is under
    timeout_s = 1.2 s, their sum is not, and the answer is read."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(b'{"status": "ok", "reward": "r", "protocol": 1, "max_request_bytes": 100000000}')

        def do_POST(self):
            n, got, t0 = int(self.headers["Content-Length"]), 0, time.monotonic()
            while got < n:  # at 12 MB/s
                got += len(self.rfile.read1(min(n - got, 1 << 18)))
                time.sleep(max(0.0, got / 12e6 - (time.monotonic() - t0)))
            time.sleep(0.5)
            self._send(b'{"scores": [0.0, 0.0, 0.0, 0.0]}')

        def _send(self, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def server_bind(self):  # (a small receive buffer: the client's send waits for the server's reads)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            super().server_bind()

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = build_reward("remote", url=f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=1.2)
        t0 = time.perf_counter()
        assert client(torch.rand(4, 3, 1024, 1024), ["p"] * 4).tolist() == [0.0] * 4  # (12.6 MB)
        assert time.perf_counter() - t0 > 1.2  # (the sum of the waits was past timeout_s)
    finally:
        httpd.shutdown()
        httpd.server_close()
