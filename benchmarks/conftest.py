"""Benchmark-tier setup: Triton mode, thread count, the device copy bandwidth, the CSV and the table.

Each benchmark reports its time through :func:`record`, which turns it into GB/s with the bytes-moved
formula written beside the benchmark and into a percentage of the device copy bandwidth measured once in
the same run. Times are the median of the timed rounds (one noisy round on a shared machine moves a mean,
not a median), for the kernels and the copy alike; the mean is kept beside it in the CSV. Rows are appended
to benchmarks/results.csv and printed as a table at the end of the run.
"""

import csv
import datetime
import os
import platform
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# benchmarks/gpu_suite.sh stops pytest with SIGINT (`timeout -s INT`) so that it still prints its summary; a
# shell without job control starts its background commands with SIGINT ignored, which Python keeps: take it back
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
HERE = Path(__file__).resolve().parent
CSV_PATH = Path(os.environ.get("DENSEGRPO_BENCH_CSV", HERE / "results.csv"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    torch.set_num_threads(int(os.environ.get("DENSEGRPO_BENCH_THREADS", "1")))
ROWS: list[dict] = []
# (median_ms came last, so that an older CSV only gains a column)
COLUMNS = [
    "utc", "git_sha", "device", "threads", "torch", "triton", "op", "impl", "shape", "dtype",
    "mean_ms", "gb_per_s", "pct_of_copy", "copy_gb_per_s", "median_ms",
]  # fmt: skip


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_sha() -> str:
    """The checkout's commit; $GIT_SHA first (the device machines get the tree without .git: gpu_suite.sh's
    header gives the command that passes it)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# On a GPU each timed loop cycles through copies of its inputs totalling this much (> 4x the L2 of an H100,
# 50 MB, or of an H200, 60 MB), so that every call reads its inputs from memory, as the copy it is compared with does; one
# set of SD3.5-M latents (12.6 MB in bf16) would otherwise stay in L2 from one call to the next.
ROTATE_BYTES = 256 * 2**20 if DEVICE.type == "cuda" else 0


def rotation(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """``tensors`` and enough copies of them to total :data:`ROTATE_BYTES` (just ``[tensors]`` on a CPU).
    A copy keeps ``requires_grad``."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    n = max(1, -(-ROTATE_BYTES // size))
    copies = [
        tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors) for _ in range(n - 1)
    ]
    return [tensors, *copies]


def _listed(fns) -> list:
    return list(fns) if isinstance(fns, (list, tuple)) else [fns]


def _cycle(fns: list, calls: int) -> list:
    """``calls`` calls (at least one per callable) cycling through ``fns``."""
    return [fns[i % len(fns)] for i in range(max(calls, len(fns)))]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the mean over the timed rounds."""

    median: float
    mean: float


def _per_call(benchmark, calls: int) -> Timing:
    stats = benchmark.stats.stats
    return Timing(stats.median / calls, stats.mean / calls)


def time_per_call(benchmark, fns, inner: int) -> Timing:
    """Run ``fns`` (one callable, or one per input set: cycled) under pytest-benchmark, at least ``inner``
    calls per timed round; seconds per call."""
    order = _cycle(_listed(fns), inner)

    def body():
        for fn in order:
            fn()
        sync()

    body()  # warm-up (compiles Triton kernels)
    benchmark.pedantic(body, rounds=int(os.environ.get("DENSEGRPO_BENCH_ROUNDS", "5")), warmup_rounds=1)
    return _per_call(benchmark, len(order))


def graph_time_per_call(benchmark, fns, calls: int = 100) -> Timing:
    """``fns`` (cycled as in :func:`time_per_call`) captured ``calls`` times in one CUDA graph, timed by
    replays; seconds per call.

    A replay launches the captured kernels back to back with no Python in between: this is the ops' device
    time (plus one replay launch and synchronisation per round, spread over ``calls``), the way a captured
    rollout step runs them. :func:`time_per_call` includes the host's dispatch and launch overhead, which
    at the SD3.5-M batch sizes can exceed the kernels' own time.
    """
    fns = _listed(fns)
    order = _cycle(fns, calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # warm-up outside the capture: compiles the kernels
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in order:
            fn()

    def body():
        graph.replay()
        sync()

    body()
    benchmark.pedantic(body, rounds=int(os.environ.get("DENSEGRPO_BENCH_ROUNDS", "5")), warmup_rounds=1)
    return _per_call(benchmark, len(order))


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Device copy bandwidth in GB/s (read + write bytes of a large copy), measured in this run: the median
    of 5 timed rounds, as the kernels' times are."""
    n = (256 if DEVICE.type == "cuda" else 32) * 2**20 // 4
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    inner = 20 if DEVICE.type == "cuda" else 3
    for _ in range(3):
        dst.copy_(src)
    sync()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(inner):
            dst.copy_(src)
        sync()
        rounds.append((time.perf_counter() - t0) / inner)
    return 2 * src.numel() * 4 / statistics.median(rounds) / 1e9


@pytest.fixture
def record(copy_bandwidth):
    def _record(op: str, impl: str, shape, dtype: torch.dtype, timing: Timing, bytes_moved: int):
        gbps = bytes_moved / timing.median / 1e9
        _append(
            {
                "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "git_sha": git_sha(),
                "device": device_name(),
                "threads": torch.get_num_threads() if DEVICE.type == "cpu" else "",
                "torch": torch.__version__,
                "triton": _triton_version(),
                "op": op,
                "impl": impl,
                "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).replace("torch.", ""),
                "mean_ms": f"{timing.mean * 1e3:.4f}",
                "median_ms": f"{timing.median * 1e3:.4f}",
                "gb_per_s": f"{gbps:.1f}",
                "pct_of_copy": f"{100 * gbps / copy_bandwidth:.1f}",
                "copy_gb_per_s": f"{copy_bandwidth:.1f}",
            }
        )

    return _record


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def _append(row: dict) -> None:
    """One row to the CSV at once, not at the session's end: a run stopped by a timeout keeps its rows."""
    if not ROWS:  # the session's first row: the header is checked (and migrated) once
        _migrate_header()
    ROWS.append(row)
    new = not CSV_PATH.exists() or CSV_PATH.stat().st_size == 0
    with CSV_PATH.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def _migrate_header() -> None:
    """An existing CSV written before a column was added gets the new header (its rows leave it empty); one
    with columns this version does not know is refused, so that nothing is lost."""
    if CSV_PATH.exists():
        with CSV_PATH.open(newline="") as f:
            reader = csv.DictReader(f)
            old = reader.fieldnames or []
            if old != COLUMNS:
                rows = list(reader)
        if old and old != COLUMNS[: len(old)]:
            raise ValueError(
                f"{CSV_PATH} has the columns {old}, which are not a start of this version's {COLUMNS}: write "
                "to another file (DENSEGRPO_BENCH_CSV=...) rather than lose columns"
            )
        if old != COLUMNS:
            with CSV_PATH.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section(f"densegrpo-fast kernels on {ROWS[0]['device']} (copy {ROWS[0]['copy_gb_per_s']} GB/s)")
    tr.write_line(
        f"{'op':<22}{'impl':<16}{'shape':<18}{'dtype':<10}{'median ms':>10}{'GB/s':>9}{'% copy':>8}"
    )
    for r in ROWS:
        tr.write_line(
            f"{r['op']:<22}{r['impl']:<16}{r['shape']:<18}{r['dtype']:<10}{r['median_ms']:>10}"
            f"{r['gb_per_s']:>9}{r['pct_of_copy']:>8}"
        )
    tr.write_line(f"rows appended to {CSV_PATH}")
