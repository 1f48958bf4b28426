"""A real `dvc repro` of dvc.yaml in a temporary git repository, on small synthetic data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = {
    "synthetic": {"n_users": 300, "n_items": 200, "n_categories": 12, "behaviors_per_user": 25},
    "data": {"n_test_users": 40, "n_valid_users": 30, "max_history": 15},
    "train": {"epochs": 1, "batch_size": 128, "progress": False},
    "sampler": {"total_negatives": 20},
    "model": {"hidden": [16, 8]},
}


def _sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dvcrepo")
    shutil.copytree(ROOT / "tdm", repo / "tdm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(repo, "git", "init", "-q")
    _sh(repo, "git", "config", "user.email", "ci@example.invalid")
    _sh(repo, "git", "config", "user.name", "ci")
    _sh(repo, "dvc", "init", "-q")
    _sh(repo, "tdm", "generate", "--out", "data/synthetic/UserBehavior.csv")
    _sh(repo, "dvc", "add", "-q", "data")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "init")
    _sh(repo, "dvc", "repro")
    return repo


def test_repro_builds_every_round(repo):
    for r in (0, 1):
        assert (repo / f"trees/round_{r}.tree").exists()
        assert (repo / f"models/round_{r}/model.pt").exists()
        report = json.loads((repo / f"metrics/round_{r}.json").read_text())
        assert set(report["tdm"]) == {"none", "items", "categories"}
    shown = _sh(repo, "dvc", "metrics", "show")
    assert "metrics/round_1.json" in shown and "tdm.none.recall" in shown


def test_second_repro_is_a_no_op(repo):
    before = (repo / "trees/round_1.tree").stat().st_mtime_ns
    out = _sh(repo, "dvc", "repro")
    assert "Running stage" not in out
    assert (repo / "trees/round_1.tree").stat().st_mtime_ns == before
    assert "up to date" in _sh(repo, "dvc", "status")


def test_model_param_change_reruns_training_not_preparation(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.003
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh(repo, "dvc", "repro", "--dry")
    assert "Running stage 'train_0'" in out and "Running stage 'train_1'" in out
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
