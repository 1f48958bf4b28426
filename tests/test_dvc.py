"""A real `dvc repro` of dvc.yaml in temporary git repositories, on small synthetic data: plain
`dvc repro` in a fresh clone (the pipeline generates its default data and data.dvc imports it),
the rounds, no-op re-runs, plots, metrics, your own raw data tracked by data.dvc, the local remote
(push, fresh clone, pull) and `dvc exp run -S`. A test that changes a project works on its own
copy of it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import TINY

from tasks.versioning import dvc_rounds
from tdm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GENERATED = "synthetic/UserBehavior.csv"  # what the `generate` stage writes
DEFAULT_DATA = "data/UserBehavior.csv"  # what data.dvc imports from it: prepare's input
CACHED_OUTS = ("synthetic", "data", "prepared", "trees", "models", "embeddings")  # `dvc push`
# The files of the project that DVC reads, as a clone has them (no data, no outputs).
PROJECT_FILES = ("dvc.yaml", "data.dvc", ".gitignore", ".dvcignore")
integration = pytest.mark.integration


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


def _copy(project: Path, dest: Path) -> Path:
    """A private copy of ``project``: git history, DVC cache and workspace (not DVC's locks)."""

    def skip(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder) == project / ".dvc" else []

    shutil.copytree(project, dest, symlinks=True, ignore=skip)
    return dest


def _set_params(project: Path, **values) -> None:
    """Set ``section.key`` values (given as ``section__key=value``) in the project's params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, value in values.items():
        section, key = name.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """The project as a clone gets it: code, dvc.yaml, .dvc/config, ignore files and a tiny
    params.yaml (its data section as committed) in a git repo; no data (no `make data`), no
    outputs, no DVC cache."""
    origin = tmp_path_factory.mktemp("origin")
    for package in ("tdm", "tasks"):
        shutil.copytree(
            ROOT / package, origin / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in PROJECT_FILES:
        shutil.copy(ROOT / name, origin / name)
    committed = load_config(ROOT / "params.yaml").data
    tiny = [*TINY, f"data.source={committed.source}", f"data.path={committed.path}"]
    params = load_config(ROOT / "params.yaml", tiny).to_dict()
    (origin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(origin, "git", "init", "-q")
    _sh(origin, "git", "config", "user.email", "ci@example.invalid")
    _sh(origin, "git", "config", "user.name", "ci")
    _sh(origin, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", origin / ".dvc/config")  # the remote a fresh clone gets
    _sh(origin, "git", "add", "-A")
    _sh(origin, "git", "commit", "-qm", "init")
    return origin


@pytest.fixture(scope="module")
def fresh_repro(origin, tmp_path_factory):
    """A fresh clone of ``origin`` and the output of a plain `dvc repro` in it (the venv's bin on
    PATH, as `make setup` leaves it); the result is committed, so HEAD is a baseline for
    `metrics diff` and `exp run`."""
    clone = tmp_path_factory.mktemp("dvcrepo") / "project"
    _sh(origin.parent, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / DEFAULT_DATA).exists() and not (clone / ".dvc/cache").exists()
    out = _sh(clone, "dvc", "repro")
    _sh(clone, "git", "add", "-A")
    _sh(clone, "git", "commit", "-qm", "repro")
    return clone, out


@pytest.fixture(scope="module")
def repo(fresh_repro):
    """The reproduced project. Tests only read it (one that changes a project copies it), so
    it is as reproduced at the end: git and DVC both clean."""
    clone = fresh_repro[0]
    yield clone
    assert _sh(clone, "git", "status", "--porcelain") == ""
    assert "up to date" in _sh(clone, "dvc", "status")


def test_dvc_yaml_runs_the_rounds_of_params_yaml():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    later = next(v["later_rounds"] for v in spec["vars"] if "later_rounds" in v)
    assert {int(r): prev for r, prev in later.items()} == {
        r: r - 1 for r in range(1, len(later) + 1)
    }
    assert dvc_rounds(ROOT) == load_config(ROOT / "params.yaml").rounds.count


def test_the_default_data_is_the_generate_stage_output_everywhere():
    """dvc.yaml's `generate` stage writes the synthetic set from the `synthetic` section, data.dvc
    imports it into data/, `prepare` depends on whatever data.path names (that file by default),
    and `make data` makes the same file."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    generate = stages["generate"]
    assert generate["outs"] == [GENERATED] and generate["params"] == ["synthetic"]
    assert f"--out {GENERATED}" in generate["cmd"]
    assert "${data.path}" in stages["prepare"]["deps"]
    data_dvc = yaml.safe_load((ROOT / "data.dvc").read_text())
    assert [d["path"] for d in data_dvc["deps"]] == [GENERATED]
    assert [o["path"] for o in data_dvc["outs"]] == [DEFAULT_DATA]
    assert data_dvc["deps"][0]["md5"] == data_dvc["outs"][0]["md5"]  # an unchanged copy
    cfg = load_config(ROOT / "params.yaml")
    assert (cfg.data.source, cfg.data.path) == ("userbehavior", DEFAULT_DATA)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^DATA := (\S+)$", makefile, re.M).group(1) == DEFAULT_DATA
    assert "dvc repro -q data.dvc" in makefile
    # no stage writes under data/: it is data.dvc's, and a user's `dvc add data` replaces it
    outs = [
        out if isinstance(out, str) else next(iter(out))
        for stage in stages.values()
        for out in stage.get("do", stage).get("outs", [])
    ]
    assert GENERATED in outs and not [out for out in outs if out.split("/")[0] == "data"]


def test_the_committed_data_dvc_describes_the_default_data(tmp_path):
    """data.dvc's hashes are those of the data the default `synthetic` params generate, so
    `make data` leaves it unchanged and MLflow's `data.md5` tag names the data."""
    from tasks.versioning import file_md5

    _sh(tmp_path, "tdm", "generate", "--params", str(ROOT / "params.yaml"), "--out", "x.csv")
    data_dvc = yaml.safe_load((ROOT / "data.dvc").read_text())
    assert data_dvc["outs"][0]["md5"] == file_md5(tmp_path / "x.csv")
    assert data_dvc["outs"][0]["size"] == (tmp_path / "x.csv").stat().st_size


@integration
def test_plain_dvc_repro_in_a_fresh_clone_generates_the_data_and_runs_every_stage(fresh_repro):
    clone, out = fresh_repro
    for stage in ("generate", "prepare", "init_tree", "train_0", "train@1", "plot_summary"):
        assert f"Running stage '{stage}'" in out
    assert f"Importing '{GENERATED}' -> '{DEFAULT_DATA}'" in out
    assert (clone / DEFAULT_DATA).read_bytes() == (clone / GENERATED).read_bytes()
    assert (clone / "plots/rounds.csv").exists()
    assert "up to date" in _sh(clone, "dvc", "status")


@integration
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
    assert {"generate", "train_0", "train@1", "relearn_tree@1", "evaluate@0", "evaluate@1"} <= set(
        stages
    )


@integration
def test_second_repro_is_a_no_op(repo, tmp_path):
    project = _copy(repo, tmp_path / "project")
    before = (project / "trees/round_1.tree").stat().st_mtime_ns
    out = _sh(project, "dvc", "repro")
    assert "Running stage" not in out
    assert (project / "trees/round_1.tree").stat().st_mtime_ns == before
    assert "up to date" in _sh(project, "dvc", "status")


@integration
def test_model_param_change_reruns_training_not_preparation(repo, tmp_path):
    project = _copy(repo, tmp_path / "project")
    _set_params(project, train__lr=0.003)
    out = _sh(project, "dvc", "repro", "--dry")
    assert "Running stage 'train_0'" in out and "Running stage 'train@1'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'init_tree'" not in out
    assert "Running stage 'generate'" not in out


@integration
def test_cli_and_dvc_write_identical_data_and_trees(repo, tmp_path):
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    _sh(tmp_path, "tdm", "generate", "--out", DEFAULT_DATA)  # the CLI writes it where data.dvc does
    _sh(tmp_path, "tdm", "prepare")
    _sh(tmp_path, "tdm", "init-tree")
    assert (tmp_path / "trees/round_0.tree").read_bytes() == (
        repo / "trees/round_0.tree"
    ).read_bytes()
    assert (tmp_path / DEFAULT_DATA).read_bytes() == (repo / DEFAULT_DATA).read_bytes()


@integration
def test_your_own_data_tracked_by_data_dvc_feeds_prepare(repo, tmp_path):
    """Raw data a user brings goes in data/ and `dvc add data` makes data.dvc track it instead of
    importing the synthetic set: `prepare` then reads it and `generate` is no longer upstream."""
    project = _copy(repo, tmp_path / "project")
    (project / DEFAULT_DATA).unlink()
    _sh(project, "tdm", "generate", "--set", "synthetic.seed=1", "--out", "data/mine.csv")
    _sh(project, "dvc", "add", "-q", "data")
    assert [o["path"] for o in yaml.safe_load((project / "data.dvc").read_text())["outs"]] == [
        "data"
    ]
    _set_params(project, data__path="data/mine.csv")
    upstream = _sh(project, "dvc", "dag", "--md", "prepare")
    assert "data.dvc" in upstream and "generate" not in upstream
    dry = _sh(project, "dvc", "repro", "--dry")
    assert "Running stage 'prepare'" in dry and "Running stage 'generate'" not in dry
    _sh(project, "dvc", "repro", "prepare")
    meta = json.loads((project / "prepared/meta.json").read_text())
    assert meta["data"]["path"] == "data/mine.csv"
    _sh(project, "dvc", "commit", "--force", "--quiet")  # what the flow does after a run
    assert "data.dvc" not in _sh(project, "dvc", "status")


@integration
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


@integration
def test_push_then_pull_in_a_fresh_clone_restores_outputs_byte_for_byte(repo, tmp_path):
    """The default remote of .dvc/config (next to the clone) works without configuration."""
    project = _copy(repo, tmp_path / "project")  # its remote: tmp_path/tdm-flow-dvc-remote
    remotes = "".join(_sh(project, "dvc", "remote", "list").split())  # long paths are wrapped
    assert f"{tmp_path / 'tdm-flow-dvc-remote'}(default)" in remotes
    _sh(project, "dvc", "push")
    assert (tmp_path / "tdm-flow-dvc-remote").is_dir()
    clone = tmp_path / "clone"  # a sibling: same ../tdm-flow-dvc-remote
    _sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "models/round_1").exists() and not (clone / ".dvc/cache").exists()
    _sh(clone, "dvc", "pull")
    restored = _files(clone)
    assert restored == _files(project)
    assert {"trees/round_1.tree", "models/round_1/model.pt", DEFAULT_DATA} <= set(restored)
    assert "up to date" in _sh(clone, "dvc", "status")


@integration
def test_exp_run_with_a_changed_lr_and_metrics_diff(repo, tmp_path):
    """`dvc exp run -S train.lr=...` in a copy of the project, up to round 0's metrics."""
    project = _copy(repo, tmp_path / "project")
    out = _sh(project, "dvc", "exp", "run", "-S", "train.lr=0.02", "evaluate@0")
    assert "Running stage 'train_0'" in out and "Running stage 'prepare'" not in out
    assert "0.02" in _sh(project, "dvc", "params", "diff")
    diff = json.loads(_sh(project, "dvc", "metrics", "diff", "--all", "--json"))
    round_0 = diff["metrics/round_0.json"]
    assert "tdm.none.recall" in round_0 and "retrieval_seconds" in round_0
    assert round_0["retrieval_seconds"]["old"] is not None
    table = _sh(project, "dvc", "metrics", "diff", "--all", "--md")
    assert "metrics/round_0.json" in table and "tdm.none.recall" in table
    experiments = json.loads(_sh(project, "dvc", "exp", "show", "--json"))
    assert "0.02" in json.dumps(experiments)
