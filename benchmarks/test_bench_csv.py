"""The benchmark CSV and its report: rows timed by their median, older CSVs gaining the column once."""

import csv
import subprocess
import sys
from pathlib import Path

import conftest

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
