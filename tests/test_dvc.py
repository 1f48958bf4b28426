"""A real `dvc repro` of dvc.yaml in a temporary git repository, on small synthetic data: the
rounds, no-op re-runs, plots, metrics, the local remote (push, fresh clone, pull) and
`dvc exp run -S`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.versioning import dvc_rounds
from tdm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = {
    "synthetic": {"n_users": 300, "n_items": 200, "n_categories": 12, "behaviors_per_user": 25},
    "data": {"n_test_users": 40, "n_valid_users": 30, "max_history": 15},
    "train": {"epochs": 1, "batch_size": 128, "progress": False, "num_threads": 1},
    "sampler": {"total_negatives": 20},
    "model": {"hidden": [16, 8]},
}
CACHED_OUTS = ("data", "prepared", "trees", "models", "embeddings")  # what `dvc push` ships


def _sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _files(root: Path, folders=CACHED_OUTS) -> dict[str, bytes]:
    """Every file under ``folders`` (DVC's .gitignore files aside) -> its bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The project's dvc.yaml, .dvc/config and code in a new git repo, reproduced and committed
    (so HEAD is a baseline for `metrics diff` and `exp run`)."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    for package in ("tdm", "tasks"):
        shutil.copytree(
            ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.email", "ci@example.invalid")
    _sh(repo, "git", "config", "user.name", "ci")
    _sh(repo, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # the remote a fresh clone gets
    _sh(repo, "tdm", "generate", "--out", "data/synthetic/UserBehavior.csv")
    _sh(repo, "dvc", "add", "-q", "data")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "init")
    _sh(repo, "dvc", "repro")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "repro")
    return repo


def test_dvc_yaml_runs_the_rounds_of_params_yaml():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    later = next(v["later_rounds"] for v in spec["vars"] if "later_rounds" in v)
    assert {int(r): prev for r, prev in later.items()} == {
        r: r - 1 for r in range(1, len(later) + 1)
    }
    assert dvc_rounds(ROOT) == load_config(ROOT / "params.yaml").rounds.count


def test_repro_builds_every_round(repo):
    for r in (0, 1):
        assert (repo / f"trees/round_{r}.tree").exists()
        assert (repo / f"models/round_{r}/model.pt").exists()
        report = json.loads((repo / f"metrics/round_{r}.json").read_text())
        assert set(report["tdm"]) == {"none", "items", "categories"}
        assert (repo / f"plots/loss/round_{r}.csv").read_text().startswith("epoch,loss,")
        layerwise = (repo / f"plots/layerwise/round_{r}.csv").read_text().splitlines()
        assert layerwise[0] == "level,level_size,beam,brute_force"
        assert len(layerwise) - 1 == report["tree"]["depth"]
    rounds = (repo / "plots/rounds.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rounds] == ["round", "0", "1"]
    shown = _sh(repo, "dvc", "metrics", "show")
    assert "metrics/round_1.json" in shown and "tdm.none.recall" in shown
    stages = _sh(repo, "dvc", "stage", "list", "--name-only").split()
    assert {"train_0", "train@1", "relearn_tree@1", "evaluate@0", "evaluate@1"} <= set(stages)


def test_second_repro_is_a_no_op(repo):
    before = (repo / "trees/round_1.tree").stat().st_mtime_ns
    out = _sh(repo, "dvc", "repro")
    assert "Running stage" not in out
    assert (repo / "trees/round_1.tree").stat().st_mtime_ns == before
    assert "up to date" in _sh(repo, "dvc", "status")


def test_model_param_change_reruns_training_not_preparation(repo):
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["lr"] = 0.003
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _sh(repo, "dvc", "repro", "--dry")
    finally:
        (repo / "params.yaml").write_text(original)
    assert "Running stage 'train_0'" in out and "Running stage 'train@1'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'init_tree'" not in out


def test_cli_and_dvc_write_identical_trees(repo, tmp_path):
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    _sh(tmp_path, "tdm", "generate", "--out", "data/synthetic/UserBehavior.csv")
    _sh(tmp_path, "tdm", "prepare")
    _sh(tmp_path, "tdm", "init-tree")
    assert (tmp_path / "trees/round_0.tree").read_bytes() == (
        repo / "trees/round_0.tree"
    ).read_bytes()
    assert (tmp_path / "data/synthetic/UserBehavior.csv").read_bytes() == (
        repo / "data/synthetic/UserBehavior.csv"
    ).read_bytes()


def test_plots_show_renders_every_plot(repo, tmp_path):
    shown = json.loads(_sh(repo, "dvc", "plots", "show", "--json"))
    assert not shown.get("errors")
    expected = {f"plots/{kind}/round_{r}.csv" for kind in ("loss", "layerwise") for r in (0, 1)}
    assert set(shown["data"]) == expected | {"recall_per_round"}
    values = shown["data"]["recall_per_round"][0]["content"]["data"]["values"]
    assert {v["field"] for v in values} >= {"tdm_none_recall", "popular_none_recall"}
    _sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "html"))
    html = (tmp_path / "html/index.html").read_text()
    assert "plots/loss/round_0.csv" in html and "Recall@M per round" in html


def test_push_then_pull_in_a_fresh_clone_restores_outputs_byte_for_byte(repo):
    """The default remote of .dvc/config (next to the clone) works without configuration."""
    assert "tdm-flow-dvc-remote" in _sh(repo, "dvc", "remote", "list")
    _sh(repo, "dvc", "push")
    clone = repo.parent / f"{repo.name}-clone"  # a sibling: same ../tdm-flow-dvc-remote
    _sh(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/round_1").exists() and not (clone / ".dvc/cache").exists()
    _sh(clone, "dvc", "pull")
    restored = _files(clone)
    assert restored == _files(repo)
    assert {"trees/round_1.tree", "models/round_1/model.pt", "data/synthetic/UserBehavior.csv"} <= (
        set(restored)
    )
    assert "up to date" in _sh(clone, "dvc", "status")


def test_exp_run_with_a_changed_lr_and_metrics_diff(repo):
    """`dvc exp run -S train.lr=...` in a clone (sharing the cache), up to round 0's metrics."""
    clone = repo.parent / f"{repo.name}-exp"
    _sh(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    _sh(clone, "dvc", "cache", "dir", "--local", str(repo / ".dvc/cache"))
    _sh(clone, "dvc", "checkout")
    out = _sh(clone, "dvc", "exp", "run", "-S", "train.lr=0.02", "evaluate@0")
    assert "Running stage 'train_0'" in out and "Running stage 'prepare'" not in out
    assert "0.02" in _sh(clone, "dvc", "params", "diff")
    diff = json.loads(_sh(clone, "dvc", "metrics", "diff", "--all", "--json"))
    round_0 = diff["metrics/round_0.json"]
    assert "tdm.none.recall" in round_0 and "retrieval_seconds" in round_0
    assert round_0["retrieval_seconds"]["old"] is not None
    table = _sh(clone, "dvc", "metrics", "diff", "--all", "--md")
    assert "metrics/round_0.json" in table and "tdm.none.recall" in table
    experiments = json.loads(_sh(clone, "dvc", "exp", "show", "--json"))
    assert "0.02" in json.dumps(experiments)
