"""The benchmark scripts run end to end at tiny sizes, and their checks catch what they claim to.

Timings are not asserted (these machines are shared); the numbers the scripts report are. Each
script runs in its own process, as ``make bench`` runs it (it sets OpenMP's wait policy before
torch loads).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import beam_search  # noqa: E402
from tdm.config import ModelConfig  # noqa: E402
from tdm.model import build_model  # noqa: E402


def run(script: str, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


class PerUserInScore(torch.nn.Module):
    """A scorer that wrongly redoes user-side work (a matmul per user) in every ``score`` call."""

    def __init__(self, n_embeddings: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(n_embeddings, 8)
        self.user = torch.nn.Linear(8, 8)

    def user_state(self, hist, windows):
        return self.embedding(hist.clamp_min(0)).mean(1)  # (B, 8)

    def score(self, state, node_rows):
        user = self.user(state)  # (B, 8): belongs in user_state
        return torch.einsum("bd,bnd->bn", user, self.embedding(node_rows))


def test_work_split_separates_per_node_from_per_user_work():
    dnn = build_model(ModelConfig(name="dnn"), 500, 10, seed=0).eval()
    split = beam_search.work_split(dnn, 500, "cpu")
    assert split["score_flop_per_user_per_call"] == 0
    # first FC layer's node part, then 128 -> 64 -> 24 -> 1: 2 * (24*128 + 128*64 + 64*24 + 24)
    assert split["score_flop_per_node"] == 2 * (24 * 128 + 128 * 64 + 64 * 24 + 24)
    assert split["user_state_flop_per_user"] > 0  # the window means and W_u u, once per user
    wrong = beam_search.work_split(PerUserInScore(500).eval(), 500, "cpu")
    assert wrong["score_flop_per_user_per_call"] == 2 * 8 * 8


def test_beam_search_benchmark(tmp_path):
    args = ["--leaves", "3000", "--models", "dnn,attention_dnn", "--ks", "4", "--batch", "16"]
    args += ["--budget", "0", "--max-batches", "2", "--min-single", "2", "--max-single", "2"]
    args += ["--brute-budget", "0", "--max-brute", "2", "--out", str(tmp_path)]
    run("beam_search", *args)
    (path,) = tmp_path.glob("beam_search_*.json")
    report = json.loads(path.read_text())
    assert report["machine"]["torch_threads"] == 2
    assert len(report["results"]) == 2 and set(report["profiles"]) == {"dnn", "attention_dnn"}
    for row in report["results"]:
        assert row["max_nodes_per_user"] <= row["nodes_bound"] <= row["bound_2k_depth"]
        assert row["user_state_rows"] == row["probe_users"]  # every user once
        assert row["score_flop_per_user_per_call"] == 0
        assert row["score_gflops"] > 0 and row["brute_ms_per_user"] > 0


def test_training_benchmark(tmp_path):
    args = ["--users", "300", "--items", "600", "--models", "dnn", "--budget", "0"]
    args += ["--max-batches", "3", "--no-profile", "--out", str(tmp_path)]
    run("training", *args)
    report = json.loads(next(tmp_path.glob("training_*.json")).read_text())
    for row in report["results"]:
        assert row["sampler_pairs_per_s"] > 0 and row["step_pairs_per_s"] > 0
        assert row["train_pairs_per_s"] > 0
        assert row["pairs_per_sample"] > report["settings"]["tree_depth"]  # negatives too


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    run("gpu_check", "--device", "cpu", "--leaves", "500", "--users", "8", "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("gpu_check_*.json")).read_text())
    assert report["ok"] and all(r["same_rows"] == 1.0 for r in report["beam_search"])


@pytest.mark.slow
def test_prepare_large_small_file(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("not the benchmark's")
    args = ["--rows", "30000", "--workdir", str(work), "--out", str(out)]
    run("prepare_large", *args)
    result = json.loads(next(out.glob("prepare_large_*.json")).read_text())["result"]
    assert result["rows"] == 30000 and [s["step"] for s in result["steps"]] == [
        "load",
        "split",
        "samples",
    ]
    assert [p.name for p in work.iterdir()] == ["keep.txt"]  # its CSV and output are deleted
