"""The benchmark CSV and its report: rows timed by their median, older CSVs gaining the column once."""

import csv
import subprocess
import sys
import types
from pathlib import Path

import conftest
import pytest
import torch

HERE = Path(__file__).resolve().parent
OLD = [c for c in conftest.COLUMNS if c != "median_ms"]


def _row(impl: str, mean_ms: str, median_ms: str | None = None) -> dict:
    row = {c: "x" for c in OLD}
    row.update(op="sde_step", impl=impl, shape="24x16x64x64", dtype="bfloat16", mean_ms=mean_ms,
               gb_per_s="1.0", pct_of_copy="2.0", copy_gb_per_s="50.0", utc="2026-12-05T00:00:00Z")  # fmt: skip
    if median_ms is not None:
        row["median_ms"] = median_ms
    return row


def test_an_older_csv_gains_the_median_column_once(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=OLD)
        w.writeheader()
        w.writerow(_row("flow-grpo", "3.0"))
    monkeypatch.setattr(conftest, "CSV_PATH", path)
    monkeypatch.setattr(conftest, "ROWS", [])
    conftest._append(_row("triton", "1.2", "1.0"))
    conftest._append(_row("reference", "2.2", "2.0"))
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == conftest.COLUMNS
    assert [(r["impl"], r["mean_ms"], r["median_ms"]) for r in rows] == [
        ("flow-grpo", "3.0", ""), ("triton", "1.2", "1.0"), ("reference", "2.2", "2.0"),
    ]  # fmt: skip
    assert path.read_text().count("op,impl") == 1  # one header


def test_the_report_times_rows_by_their_median(tmp_path):
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=conftest.COLUMNS)
        w.writeheader()
        w.writerow({**_row("flow-grpo", "3.0"), "median_ms": ""})  # a row from before the median: its mean
        w.writerow(_row("triton", "1.2", "1.0"))
    out = subprocess.run([sys.executable, str(HERE / "report.py"), "--csv", str(path)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "| sde_step | 24x16x64x64 | bfloat16 | triton | 1.0000 | 1.0 | 2.0 | 3.0x |" in out
    assert "| sde_step | 24x16x64x64 | bfloat16 | flow-grpo | 3.0000 |" in out


class FakeBenchmark:
    """pytest-benchmark's fixture as the timing helpers use it: rounds whose median is not their mean."""

    def __init__(self):
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=2.0, mean=3.0))

    def pedantic(self, body, rounds, warmup_rounds):
        body()


def test_timings_are_per_call_and_the_record_uses_the_median(tmp_path, monkeypatch):
    calls = []
    t = conftest.time_per_call(FakeBenchmark(), [lambda: calls.append(1)] * 2, inner=4)
    assert t == conftest.Timing(median=0.5, mean=0.75)  # 4 calls per round
    monkeypatch.setattr(conftest, "CSV_PATH", tmp_path / "r.csv")
    monkeypatch.setattr(conftest, "ROWS", [])
    record = conftest.record.__wrapped__(100.0)  # copy bandwidth 100 GB/s
    record("op", "triton", (2, 3), torch.float32, t, 10**9)  # 1 GB in 0.5 s
    row = conftest.ROWS[0]
    assert (row["gb_per_s"], row["pct_of_copy"], row["median_ms"], row["mean_ms"]) == (
        "2.0",
        "2.0",
        "500.0000",
        "750.0000",
    )


def test_a_csv_with_other_columns_is_not_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    path.write_text("utc,device,something_else\n1,2,3\n")
    monkeypatch.setattr(conftest, "CSV_PATH", path)
    monkeypatch.setattr(conftest, "ROWS", [])
    with pytest.raises(ValueError, match="not a start of this version's"):
        conftest._append(_row("triton", "1.2", "1.0"))
    assert path.read_text() == "utc,device,something_else\n1,2,3\n"
    path.write_text("")  # an empty file gets the header
    conftest._append(_row("triton", "1.2", "1.0"))
    assert path.read_text().splitlines()[0] == ",".join(conftest.COLUMNS)


def test_the_memory_table_keeps_the_measured_run_beside_the_merged_rollout_run(tmp_path):
    """gpu_suite.sh hands report.py the optional merged-rollout run's JSON after the SD3.5-M run's: it holds
    a set-up alone and must not replace the run's phases."""
    import json

    import report

    run = {"family": "sd3", "load": {"setup": {"peak_allocated_gib": 20.0}},
           "modes": {"dense": {"phases": {"rollout": {"peak_allocated_gib": 40.0}}}},
           "end_of_run": {"phases": {"export": {"peak_allocated_gib": 18.0}}}}  # fmt: skip
    merged = {"family": "sd3", "load": {"setup": {"peak_allocated_gib": 21.0}}, "merged_rollout": [{}]}
    estimate = {"phases": {k: 2**30 for k in ("setup", "rollout + reward", "export")}}  # (bytes)
    paths = []
    for name, obj in [("real_sd3.json", run), ("merged.json", merged), ("estimate_sd3.json", estimate)]:
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(obj))
    table = report.estimate_section([paths[2]], paths[:2])
    assert "40.0" in table and "18.0" in table and "20.0" in table and "21.0" not in table
