"""The benchmark scripts run end to end at tiny sizes, and their checks catch what they claim to.

Timings are not asserted (these machines are shared); the numbers the scripts report are: node
counts against Algorithm 1's bound, and rates that agree with each other (samples/s times ms per
batch is the batch size, and so on). Each script runs in its own process, as ``make bench`` runs
it (it sets OpenMP's wait policy before torch loads).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import beam_search  # noqa: E402
from tdm.config import ModelConfig  # noqa: E402
from tdm.model import build_model  # noqa: E402
from tdm.tree import Tree  # noqa: E402


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
    # the benchmark's tree: near-complete binary over 3000 leaves (leaves at levels 11 and 12)
    sizes = Tree.from_ordered_items(np.arange(3000), 2).level_sizes[1:]
    bound = int(np.minimum(sizes, 2 * 4).sum())  # Algorithm 1: at most k * arity per level
    for row in report["results"]:
        k = row["k"]
        assert (row["leaves"], k, row["depth"]) == (3000, 4, len(sizes))
        assert row["nodes_bound"] == bound and row["bound_2k_depth"] == 2 * k * len(sizes)
        assert row["nodes_per_user"] <= row["max_nodes_per_user"] <= bound
        # a full beam: only the last level (children of inner nodes among 2k) may fall short
        assert row["nodes_per_user"] >= bound - 2 * k
        assert row["user_state_rows"] == row["probe_users"] and row["user_state_calls"] == 1
        assert row["score_flop_per_user_per_call"] == 0
        # the rates are the same measurements read three ways
        assert (row["batches"], row["single_users"]) == (2, 2)  # --min/--max-* pin both
        assert row["users_per_s"] * row["ms_per_user_batched"] == pytest.approx(1e3)
        # two batches: the median batch is the mean one
        assert row["ms_per_user_batched"] == pytest.approx(row["batch_ms_p50"] / row["batch_users"])
        assert row["batch_ms_p50"] <= row["batch_ms_p99"]
        assert row["single_ms_p50"] <= row["single_ms_p99"]
        assert row["speedup_batched"] == pytest.approx(
            row["brute_ms_per_user"] / row["ms_per_user_batched"]
        )
        assert row["speedup_single_p50"] == pytest.approx(
            row["brute_ms_per_user"] / row["single_ms_p50"]
        )
        assert 1 <= row["brute_users_timed"] <= 2  # --max-brute 2
        # ``score`` runs inside the timed searches: a positive share of their time, at most all
        assert 0 < row["score_share_of_time"] <= 1 and 0 < row["single_score_share_of_time"] <= 1


def test_training_benchmark(tmp_path):
    args = ["--users", "300", "--items", "600", "--models", "dnn", "--budget", "0"]
    args += ["--max-batches", "3", "--no-profile", "--out", str(tmp_path)]
    run("training", *args)
    report = json.loads(next(tmp_path.glob("training_*.json")).read_text())
    depth = report["settings"]["tree_depth"]
    for row in report["results"]:
        negatives, batch = row["total_negatives"], row["batch"]
        assert len(row["negatives_per_level"]) == depth
        assert sum(row["negatives_per_level"]) == negatives == 100
        # a positive and its level's negatives per level, fewer where a leaf sits higher up
        assert depth < row["pairs_per_sample"] <= depth + negatives
        for kind in ("step", "train"):
            pairs_per_sample = row[f"{kind}_pairs_per_s"] / row[f"{kind}_samples_per_s"]
            assert depth < pairs_per_sample <= depth + negatives
        # rates agree with each other: every batch here is a full one
        sampler_pairs = row["sampler_samples_per_s"] * row["pairs_per_sample"]
        assert row["sampler_pairs_per_s"] == pytest.approx(sampler_pairs)
        for kind in ("sampler", "step"):
            samples_per_batch = row[f"{kind}_samples_per_s"] * row[f"{kind}_ms_per_batch"] / 1e3
            assert samples_per_batch == pytest.approx(batch)
        assert row["step_batches"] >= 16  # every device batch at least once
        assert row["sampler_over_step"] == pytest.approx(
            row["sampler_pairs_per_s"] / row["step_pairs_per_s"]
        )
        assert row["train_samples"] == 8 * batch  # --budget 0: the 8-batch minimum epoch


def test_allocator_benchmark_runs_each_path_with_and_without_the_settings(tmp_path):
    run("allocator", "--rounds", "1", "--smoke", "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("allocator_*.json")).read_text())
    runs = report["runs"]
    assert len(runs["tuned"]) == len(runs["glibc"]) == 1
    for path in ("beam", "jtm", "train"):  # each child process saw its own setting
        assert runs["tuned"][0][f"{path} malloc_tuned"] is True
        assert runs["glibc"][0][f"{path} malloc_tuned"] is False
    rows = {row["metric"]: row for row in report["rows"]}
    for model in ("dnn", "attention_dnn"):
        assert {f"{model} 1-user p50 ms", f"{model} ms/user", f"train {model} step ms"} <= set(rows)
    assert {"jtm attention_dnn s", "beam sys s", "jtm sys s", "train sys s"} <= set(rows)
    for row in rows.values():
        assert row["tuned"][0] > 0 and row["glibc"][0] > 0
        assert row["change"] == pytest.approx(row["tuned"][0] / row["glibc"][0] - 1)


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
