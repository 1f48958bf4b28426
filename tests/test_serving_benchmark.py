"""``benchmarks/serving.py --smoke``: the load test runs end to end against real ``tdm serve``
processes and reports what it claims to (timings are not asserted: the machine is shared)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_the_serving_load_test_runs_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--smoke", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (result,) = tmp_path.glob("serving_smoke_*.json")
    payload = json.loads(result.read_text())
    rows = payload["rows"]
    assert {(r["mode"], r["concurrency"]) for r in rows} == {
        ("batched", 1),
        ("batched", 4),
        ("unbatched", 1),
        ("unbatched", 4),
        ("batched+swap", 4),
    }
    for row in rows:
        assert row["errors"] == 0, row["error_examples"]
        assert row["requests"] >= 40 and row["throughput_rps"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        if row["mode"] == "unbatched":
            assert row["mean_batch"] == 1.0
    swap = next(r for r in rows if r["mode"] == "batched+swap")
    assert len(swap["reloads"]) >= 1 and all(r["status"] == 200 for r in swap["reloads"])
    summary = payload["summary"]["dnn"]
    assert summary["swap_errors"] == 0 and summary["errors"] == 0
    assert payload["models"]["dnn"]["n_items"] == 2000


def test_the_in_process_answer_timing_runs_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving_inprocess.py"), "--items", "2000",
         "--users", "20", "--answers", "6", "--models", "dnn", "--work", str(tmp_path / "w"),
         "--out", str(tmp_path), "--http"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (result,) = tmp_path.glob("serving_inprocess_*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {(r["backend"], r["filter_beam"], r["mode"]) for r in rows} == {
        (backend, beam, mode) for backend in ("native", "torch") for beam in (0, 20)
        for mode in ("none", "items")
    } | {("native", 20, "http")}  # fmt: skip
    assert all(0 < r["median_ms"] <= r["p95_ms"] for r in rows)
