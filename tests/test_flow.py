"""The Prefect flow end to end on tiny synthetic data, in a temporary git + DVC project, tracked
in a temporary MLflow store: tasks, MLflow runs (metrics, PNGs, a model that loads back, names),
the outputs recorded in DVC, a run with overrides in its own folder, the root lock, bad input as
one line without tracebacks, and one task through ``.fn()``.

The module's flow run and its project are shared and read-only: a test that changes files works
on its own copy (``_copy_project``)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from tiny import TINY

from flows.pipeline import closing_text, run_label, tdm_pipeline
from tasks.steps import config_task, init_tree_task, prepare_task
from tasks.tracking import PARENT_TAG, summary_markdown, tracked_run
from tasks.versioning import file_md5, locked_outs, unrecordable
from tdm.config import load_config
from tdm.tree import Tree
from tdm.tree_build import tree_purity

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")
LEVEL_KEY = re.compile(r"level_\d{2}$")


def _sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        cmd, cwd=cwd, env={**env, "DVC_NO_ANALYTICS": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):  # busy 2-core machines
        yield


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """A git + DVC project (the repo's dvc.yaml, .dvc/config, .gitignore, code) whose params.yaml
    is the tiny configuration reading raw data a user brought: the tiny synthetic set as
    data/UserBehavior.csv, tracked by data.dvc (`dvc add data`). The embedded default data is
    generated too, by `dvc repro generate` as `make pipeline` does (`make data`)."""
    root = tmp_path_factory.mktemp("flow")
    for package in ("tdm", "tasks"):
        shutil.copytree(
            ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    own_data = ["data.source=userbehavior", "data.path=data/UserBehavior.csv"]
    cfg = load_config(PARAMS, [*TINY, *own_data])  # read from a file, as DVC's prepare does
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "config", "user.email", "ci@example.invalid")
    _sh(root, "git", "config", "user.name", "ci")
    _sh(root, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", root / ".dvc/config")
    _sh(root, "tdm", "generate", "--out", cfg.data.path)
    _sh(root, "dvc", "add", "-q", "data")
    _sh(root, "dvc", "repro", "-q", "generate")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "commit", "-qm", "init")
    return root


def _run_flow(cwd: Path, **parameters):
    """The flow's final state, run from ``cwd`` (as `make pipeline` does)."""
    threads = torch.get_num_threads()  # train.num_threads=1 is process-wide: give it back
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(cwd)
            return tdm_pipeline(**parameters, return_state=True)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flow_run(harness, dvc_project):
    """The flow on the project's own params.yaml (run from the project, as `make pipeline`)."""
    root = dvc_project
    uri = f"sqlite:///{root / 'mlflow.db'}"
    state = _run_flow(root, params=str(root / "params.yaml"), root=str(root), tracking_uri=uri)
    return root, uri, state


def _copy_project(root: Path, tmp_path: Path) -> Path:
    """A copy of the module's project after its flow run (git, DVC cache, outputs, MLflow store),
    for a test that changes files; its DVC remote is ``tmp_path/tdm-flow-dvc-remote``."""
    copy = tmp_path / "project"
    shutil.copytree(root, copy, symlinks=True)
    return copy


def _flow_run_name(state) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def _tracebacks(text: str) -> int:
    """Tracebacks in the output, Python's and the ``NoneType: None`` of a log record whose
    ``exc_info`` holds no exception. (In this process Prefect's console handler writes to the
    stream it found at start-up, which ``capfd`` does not see: ``caplog.text`` holds the same
    records, formatted with their tracebacks.)"""
    return text.count("Traceback (most recent call last)") + text.count("NoneType: None")


def _item_categories(prepared: Path) -> np.ndarray:
    """Category of each item index, (n_items,), as the tree stages read it."""
    items = pd.read_parquet(prepared / "items.parquet")
    categories = np.zeros(int(items["item_index"].max()) + 1, dtype=np.int64)
    categories[items["item_index"].to_numpy()] = items["category_id"].to_numpy()
    return categories


def _logged_purity(metrics: dict) -> list[float]:
    keys = sorted(k for k in metrics if k.startswith("tree.purity."))
    assert keys and all(LEVEL_KEY.search(k) for k in keys), keys
    return [metrics[k] for k in keys]


def _round_runs(uri: str, parent_id: str) -> dict:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tdm-pipeline")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'"
    )
    return {int(c.data.params["round"]): c for c in children}


def test_flow_completes_and_writes_cli_artefacts(flow_run):
    root, _, state = flow_run
    assert state.is_completed()
    summary = state.result()
    assert [row["round"] for row in summary["rounds"]] == [0, 1]
    for r in (0, 1):
        assert (root / f"trees/round_{r}.tree").exists()
        assert (root / f"models/round_{r}/model.pt").exists()
        assert (root / f"embeddings/round_{r}.npy").exists()
        report = json.loads((root / f"metrics/round_{r}.json").read_text())
        assert summary["rounds"][r]["tdm/none/recall"] == report["tdm"]["none"]["recall"]
    assert not (root / "trees/round_2.tree").exists()  # no relearn after the last round
    for name in ("raw", "prepared"):  # Great Expectations ran and its result is kept
        assert json.loads((root / f"reports/validation_{name}.json").read_text())["success"]
    assert summary["artefact_root"] == str(root) and not (root / "runs").exists()


def test_failing_validation_stops_before_training_without_tracebacks(harness, tmp_path, caplog):
    from tasks.validation import ValidationFailed
    from tdm.config import SyntheticConfig
    from tdm.data.synthetic import generate, write_userbehavior_csv

    frame = generate(SyntheticConfig(n_users=200, n_items=150, n_categories=10))
    broken = frame.iloc[list(range(len(frame))) + list(range(0, len(frame), 5))]  # 20% copies
    path = write_userbehavior_csv(broken, tmp_path / "UserBehavior.csv")
    overrides = [*TINY, "data.source=userbehavior", f"data.path={path}"]
    caplog.clear()
    state = tdm_pipeline(
        params=PARAMS,
        overrides=overrides,
        root=str(tmp_path / "run"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        return_state=True,
    )
    output = caplog.text
    assert state.is_failed()
    assert state.message.startswith(f"validation of {path} failed: 1 of ")
    assert (
        "expect_compound_columns_to_be_unique" in state.message
        and "at rows [0, 5," in state.message
    )
    assert "\n" not in state.message
    assert state.message in output  # shown, as the flow run's final state
    assert _tracebacks(output) == 0, output
    with pytest.raises(ValidationFailed):
        state.result()
    run = tmp_path / "run/runs" / _flow_run_name(state)  # overrides: the run's own folder
    report = json.loads((run / "reports/validation_raw.json").read_text())
    assert not report["success"]
    failed = [r for r in report["results"] if not r["success"]]
    assert [r["expectation"] for r in failed] == ["expect_compound_columns_to_be_unique"]
    assert not (run / "prepared").exists() and not (run / "models").exists()


def test_bad_config_fails_in_one_line(harness, tmp_path, caplog):
    caplog.clear()
    state = tdm_pipeline(
        params=PARAMS,
        overrides=["train.epochs=abc"],
        root=str(tmp_path),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        return_state=True,
    )
    output = caplog.text
    assert state.is_failed()
    assert state.message == f"{PARAMS}: train.epochs: expected an integer, got 'abc'"
    assert state.message in output and _tracebacks(output) == 0, output


def test_a_locked_root_fails_at_once_naming_the_holder(harness, dvc_project, tmp_path, caplog):
    from tdm.io import root_lock

    root = _copy_project(dvc_project, tmp_path)  # runs on its params.yaml: writes to the root
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with root_lock(root, "tdm pipeline (another run)"):
        caplog.clear()
        state = _run_flow(root, params=str(root / "params.yaml"), root=str(root), tracking_uri=uri)
        output = caplog.text
    assert state.is_failed()
    assert state.message.startswith(f"{root}: in use by pid {os.getpid()} ")
    assert "(tdm pipeline (another run), started " in state.message
    assert state.message in output and _tracebacks(output) == 0, output
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("tdm-pipeline")
    assert experiment is None  # nothing started: no MLflow run


def test_entry_point_exits_2_with_one_line_on_bad_data(harness, tmp_path):
    """``python -m flows.pipeline`` on a CSV with a bad row: the row, file and column in one
    line, exit status 2, and not one traceback (task, flow or entry point) in the output."""
    from prefect.settings import PREFECT_API_URL

    csv = tmp_path / "UserBehavior.csv"
    csv.write_text("1,2,3,pv,1511593493\n1,5,3,pv,1511593494\n3,x,41,cart,1511593493\n")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's server
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.pipeline",
            "--params",
            PARAMS,
            "--set",
            "data.source=userbehavior",
            "--set",
            f"data.path={csv}",
            "--root",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    line = f"{csv}, line 3, column 'item_id': cannot read 'x' as an integer"
    errors = [x for x in done.stderr.splitlines() if x.startswith("tdm-pipeline: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"tdm-pipeline: error: {line}"), output
    assert _tracebacks(output) == 0, output


def test_flow_tracks_parent_and_round_runs(flow_run):
    root, uri, state = flow_run
    summary = state.result()
    name = _flow_run_name(state)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tdm-pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == summary["mlflow"]["parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"tdm-pipeline {name}"  # no overrides
    assert parent.data.params["train.epochs"] == "1"
    assert parent.data.tags["artefact_root"] == parent.data.params["artefact_root"] == str(root)
    assert parent.data.tags["prefect.flow_run_name"] == name
    assert "data.md5" in parent.data.tags
    for key in ("tdm.none.recall", "tdm.categories.precision", "most_popular.items.recall"):
        who, mode, metric = key.split(".")
        history = client.get_metric_history(parent.info.run_id, key)
        per_round = [row[f"{who}/{mode}/{metric}"] for row in summary["rounds"]]
        assert [(m.step, m.value) for m in history] == list(enumerate(per_round))
        assert parent.data.metrics[key] == per_round[-1]  # the last round's, as the value
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_id for c in children) == sorted(summary["mlflow"]["round_run_ids"])
    assert len(children) == 2
    categories = _item_categories(root / "prepared")
    for child in children:
        metrics, params = child.data.metrics, child.data.params
        assert child.info.run_name == f"round-{params['round']} {name}"
        for name_ in ("tdm.none.recall", "tdm.items.precision", "most_popular.items.precision"):
            assert 0.0 <= metrics[name_] <= 1.0
        assert metrics["tree.depth"] >= 1
        # the purity of each level of the round's tree, level 00 (root) first
        expected = tree_purity(Tree.load(root / f"trees/round_{params['round']}.tree"), categories)
        assert _logged_purity(metrics) == pytest.approx(expected, abs=5e-5)
        report = json.loads((root / f"metrics/round_{params['round']}.json").read_text())
        for grouping in ("category", "department"):  # the generator's taxonomy
            for figure in ("purity", "nmi"):
                value = report["tree"]["truth"][grouping][figure]
                assert metrics[f"tree.truth.{grouping}_{figure}"] == pytest.approx(value)
        layerwise = [k for k in metrics if k.startswith("layerwise.")]
        assert layerwise and all(LEVEL_KEY.search(k) for k in layerwise), layerwise
        assert params["model.hidden"] == "[16, 8]" and "round" in params
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history] == [0]  # train.epochs=1
        assert client.get_metric_history(child.info.run_id, "valid_recall")
        r = child.data.params["round"]
        files = {f.path for f in client.list_artifacts(child.info.run_id, "tree")}
        assert f"tree/round_{r}.tree" in files
        assert "tree/levels.json" in files
        assert {f.path for f in client.list_artifacts(child.info.run_id, "metrics")} == {
            f"metrics/round_{r}.json"
        }
    rounds = {c.data.params["round"]: c for c in children}
    assert rounds["0"].data.metrics["tree.moved_fraction"] == 0.0  # the initial tree
    assert 0.0 < rounds["1"].data.metrics["tree.moved_fraction"] <= 1.0


def test_train_task_logs_each_epoch(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    flow_run_id = flow_run[2].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    epochs = [log.message for log in logs if log.message.startswith("epoch ")]
    assert len(epochs) == 2  # train.epochs=1, two rounds
    assert all(
        re.match(r"epoch 1/1: loss \d+\.\d{4}, validation Recall@10 0\.\d{4}", m) for m in epochs
    )
    assert all(log.task_run_id for log in logs if log.message.startswith("epoch "))


def test_tasks_through_fn(tmp_path):
    cfg = config_task.fn(PARAMS, TINY, rounds=1)
    assert cfg.rounds.count == 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepared = prepare_task.fn(cfg, str(tmp_path))
    assert Path(prepared) == tmp_path / "prepared"
    with tracked_run(uri, "fn", tmp_path) as run:
        tree_path = init_tree_task.fn(cfg, str(tmp_path), prepared, run=run)
    assert Path(tree_path) == tmp_path / "trees/round_0.tree"
    assert Tree.load(tree_path).n_items > 0
    logged = MlflowClient(tracking_uri=uri).get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    expected = tree_purity(Tree.load(tree_path), _item_categories(Path(prepared)))
    assert _logged_purity(logged.data.metrics) == pytest.approx(expected, abs=5e-5)
    assert len(expected) == Tree.load(tree_path).depth + 1 and expected[0] < 1.0


def test_flow_publishes_metrics_artifact(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    summary = flow_run[2].result()
    with get_client(sync_client=True) as client:  # the module's server holds other flow runs
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["tdm-pipeline-metrics"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run[2].state_details.flow_run_id]),
            )
        )
    assert len(artifacts) == 1
    markdown = artifacts[0].data
    assert "| round | method |" in markdown and "most-popular" in markdown
    assert f"`{flow_run[0]}`" in markdown  # where the artefacts are
    assert summary["mlflow"]["parent_run_id"] in markdown
    for run_id in summary["mlflow"]["round_run_ids"]:
        assert f"[{run_id}](http://127.0.0.1:5000/" in markdown  # no code span in the link
    assert "[`" not in markdown


def test_compare_trees_lists_every_round(flow_run, capsys):
    from tdm.cli import run

    root, uri, state = flow_run
    assert run(["compare-trees", "--root", str(root), "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "round", "depth", "nodes"]
    rows = [line.split() for line in table[2:]]
    parent = state.result()["mlflow"]["parent_run_id"][:8]
    assert [r[:2] for r in rows] == [[parent, "0"], [parent, "1"]]
    assert rows[0][4] == "0.000" and 0.0 < float(rows[1][4]) <= 1.0  # moved fraction
    assert table[0].split()[5] == "purity@3" and all(r[5] != "-" for r in rows)
    # the data is the generator's (`tdm generate`, same params): trees against its taxonomy
    assert table[0].split()[6:10] == ["cat.purity", "cat.NMI", "dept.purity", "dept.NMI"]
    assert all(0.0 <= float(x) <= 1.0 for r in rows for x in r[6:10])


def test_flow_writes_the_dvc_plot_data(flow_run):
    root = flow_run[0]
    for r in (0, 1):
        assert (root / f"plots/loss/round_{r}.csv").read_text().startswith("epoch,loss,")
        assert (root / f"plots/layerwise/round_{r}.csv").exists()
    assert len((root / "plots/rounds.csv").read_text().splitlines()) == 3  # header + 2 rounds


def test_flow_outputs_are_recorded_in_dvc(flow_run, tmp_path):
    root, uri, state = flow_run
    summary = state.result()
    assert summary["dvc"]["recorded"], summary["dvc"]["reason"]
    assert "up to date" in _sh(root, "dvc", "status")
    outs = locked_outs(root)
    assert {"prepared", "trees/round_1.tree", "models/round_1", "embeddings/round_1.npy"} <= set(
        outs
    )
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.tags["dvc.recorded"] == "true"
    assert parent.data.tags["dvc.lock.md5"] == file_md5(root / "dvc.lock")
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "dvc")} == {"dvc/dvc.lock"}
    for r, run in _round_runs(uri, parent.info.run_id).items():
        tags = run.data.tags
        tree = f"trees/round_{r}.tree"
        assert tags["dvc.tree.md5"] == outs[tree] == file_md5(root / tree) == tags["tree.md5"]
        assert tags["dvc.model.md5"] == outs[f"models/round_{r}"]
    copy = _copy_project(root, tmp_path)  # push, delete, pull: on a copy
    _sh(copy, "dvc", "push")  # ships them to the default local remote
    remote = copy.parent / "tdm-flow-dvc-remote/files/md5"
    tree_md5 = outs["trees/round_1.tree"]
    tree_bytes = (copy / "trees/round_1.tree").read_bytes()
    assert (remote / tree_md5[:2] / tree_md5[2:]).read_bytes() == tree_bytes

    # The tree of a round run comes back from MLflow + DVC: its pipeline run's dvc.lock, `dvc pull`
    lock = client.download_artifacts(parent.info.run_id, "dvc/dvc.lock", str(tmp_path))
    (copy / "trees/round_1.tree").unlink()
    (copy / ".dvc/cache/files/md5" / tree_md5[:2] / tree_md5[2:]).unlink()
    shutil.copy(lock, copy / "dvc.lock")
    _sh(copy, "dvc", "pull", "trees/round_1.tree")
    assert (copy / "trees/round_1.tree").read_bytes() == tree_bytes
    assert "up to date" in _sh(copy, "dvc", "status")


def test_dvc_tree_stages_rewrite_the_flow_trees_byte_for_byte(flow_run, tmp_path):
    """Both doors write the same trees: DVC re-running the tree stages on the flow's inputs."""
    root = _copy_project(flow_run[0], tmp_path)  # `dvc repro --force` rewrites: on a copy
    before = {r: (root / f"trees/round_{r}.tree").read_bytes() for r in (0, 1)}
    out = _sh(root, "dvc", "repro", "--force", "--single-item", "init_tree", "relearn_tree@1")
    assert "Running stage 'relearn_tree@1'" in out
    assert {r: (root / f"trees/round_{r}.tree").read_bytes() for r in (0, 1)} == before
    assert "up to date" in _sh(root, "dvc", "status")


def test_overrides_or_a_foreign_root_are_not_recorded(dvc_project, tmp_path):
    params = dvc_project / "params.yaml"
    assert unrecordable(load_config(params), params, dvc_project) == ""
    assert "overrides" in unrecordable(load_config(params, ["train.lr=0.5"]), params, dvc_project)
    assert "not a DVC project" in unrecordable(load_config(params), params, tmp_path)
    (tmp_path / ".dvc").mkdir()  # a project whose params.yaml asks for more rounds than dvc.yaml
    shutil.copy(dvc_project / "dvc.yaml", tmp_path / "dvc.yaml")
    raw = yaml.safe_load(params.read_text())
    raw["rounds"]["count"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    three = tmp_path / "params.yaml"
    assert "dvc.yaml runs 2 rounds" in unrecordable(load_config(three), three, tmp_path)


def test_round_runs_log_pngs_and_a_model_that_loads_back(flow_run, tmp_path):
    import mlflow
    import pandas as pd

    from tdm.data.protocol import load_prepared
    from tdm.recommender import Recommender

    root, uri, state = flow_run
    runs = _round_runs(uri, state.result()["mlflow"]["parent_run_id"])
    client = MlflowClient(tracking_uri=uri)
    for run in runs.values():
        pngs = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
        assert pngs == {f"plots/{n}.png" for n in ("loss", "layerwise_recall", "tree_balance")}
        for png in pngs:
            local = Path(client.download_artifacts(run.info.run_id, png, str(tmp_path)))
            assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    local = mlflow.artifacts.download_artifacts(
        run_id=runs[1].info.run_id,
        artifact_path="recommender",
        tracking_uri=uri,
        dst_path=str(tmp_path / "model"),
    )
    model = mlflow.pyfunc.load_model(local)
    test = load_prepared(root / "prepared").test
    rec = Recommender.load(root / "models/round_1", device="cpu")
    frames = []
    for user in range(3):
        lo, hi = test.hist_offsets[user], test.hist_offsets[user + 1]
        frames.append(
            pd.DataFrame(
                {
                    "user": user,
                    "item_id": rec.to_ids(test.hist_items[lo:hi]),
                    "timestamp": test.hist_times[lo:hi],
                }
            )
        )
    history = pd.concat(frames, ignore_index=True)
    predicted = model.predict(history, params={"k": 7})
    for user, frame in enumerate(frames):
        items, _ = rec.recommend(frame[["item_id", "timestamp"]], 7)
        got = predicted[predicted["user"] == user].sort_values("rank")["item_id"].tolist()
        assert got == items.tolist()


def test_closing_text_has_the_table_and_the_ui_commands(flow_run):
    text = closing_text(flow_run[2].result(), str(flow_run[0]))
    assert "TDM" in text and "most-popular" in text and "none P/R@10" in text
    assert "make prefect-ui" in text and "http://127.0.0.1:4200" in text
    assert "make mlflow-ui" in text and "http://127.0.0.1:5000" in text
    assert "dvc push" in text
    summary = flow_run[2].result()
    markdown = summary_markdown(summary)
    assert "DVC: recorded" in markdown
    exp = summary["mlflow"]["experiment_id"]
    for run_id in [summary["mlflow"]["parent_run_id"], *summary["mlflow"]["round_run_ids"]]:
        url = f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}"
        assert f"[{run_id}]({url}?workflowType=machine_learning)" in markdown
    assert f"artefacts: {flow_run[0]}/ " in text


def test_a_run_with_overrides_keeps_the_recorded_outputs(flow_run, tmp_path, monkeypatch):
    """A run whose config differs from params.yaml (overrides, ``rounds``) writes to
    ``<root>/runs/<flow run name>/``, holding that folder's lock: what dvc.lock describes stays."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    from tdm import stages
    from tdm.io import LockedError, root_lock

    root = _copy_project(flow_run[0], tmp_path)
    recorded = [
        "dvc.lock",
        "prepared/items.parquet",
        "trees/round_0.tree",
        "trees/round_1.tree",
        "models/round_0/model.pt",
        "embeddings/round_0.npy",
        "metrics/round_0.json",
        "plots/rounds.csv",
        "reports/validation_raw.json",
    ]
    before = {path: (root / path).read_bytes() for path in recorded}
    lock_errors = []
    train = stages.train

    def train_trying_the_lock(cfg, prepared_dir, tree_path, out_dir, **kwargs):
        try:  # out_dir: <run folder>/models/round_<r>
            with root_lock(Path(out_dir).parents[1], "test"):
                lock_errors.append(None)
        except LockedError as exc:
            lock_errors.append(str(exc))
        return train(cfg, prepared_dir, tree_path, out_dir, **kwargs)

    monkeypatch.setattr(stages, "train", train_trying_the_lock)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = _run_flow(
        root,
        params=str(root / "params.yaml"),
        overrides=["train.batch_size=64"],
        rounds=1,
        root=str(root),
        tracking_uri=uri,
    )
    assert state.is_completed()
    summary, name = state.result(), _flow_run_name(state)
    run_root = root / "runs" / name
    assert summary["artefact_root"] == str(run_root)
    assert {path: (root / path).read_bytes() for path in recorded} == before
    assert "up to date" in _sh(root, "dvc", "status")
    assert (run_root / "models/round_0/model.pt").exists()
    report = json.loads((run_root / "metrics/round_0.json").read_text())
    assert summary["rounds"][0]["tdm/none/recall"] == report["tdm"]["none"]["recall"]
    assert not (run_root / "trees/round_1.tree").exists()  # rounds=1
    assert json.loads((run_root / "flow_run.json").read_text()) == {
        "params": str(root / "params.yaml"),
        "flow_run_name": name,
        "flow_run_id": str(state.state_details.flow_run_id),
        "overrides": ["train.batch_size=64", "rounds.count=1"],
    }
    assert not summary["dvc"]["recorded"] and "overrides" in summary["dvc"]["reason"]

    # the run held its folder's lock while training, and let it go at the end
    assert len(lock_errors) == 1 and f"in use by pid {os.getpid()} " in lock_errors[0]
    assert f"Prefect flow run {name} " in lock_errors[0]
    with root_lock(run_root, "test"):
        pass

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.run_name == f"tdm-pipeline {name} train.batch_size=64 rounds.count=1"
    assert parent.data.tags["artefact_root"] == str(run_root.resolve())
    assert parent.data.params["artefact_root"] == str(run_root.resolve())
    assert parent.data.tags["dvc.recorded"] == "false"
    (round_0,) = _round_runs(uri, parent.info.run_id).values()
    assert round_0.info.run_name == f"round-0 {name}"

    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["tdm-pipeline-metrics"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert f"`{run_root}`" in artifact.data
    assert f"artefacts: {run_root}/ " in closing_text(summary, str(root))


def test_run_names_keep_to_one_line():
    assert run_label("tdm-pipeline", "crimson-fox", "train.epochs=1") == (
        "tdm-pipeline crimson-fox train.epochs=1"
    )
    assert run_label("round-0", "crimson-fox") == "round-0 crimson-fox"
    overrides = [f"section.key_{i:02d}=value" for i in range(20)]  # 20 of 19 characters
    assert run_label("tdm-pipeline", "crimson-fox", *overrides) == (
        "tdm-pipeline crimson-fox section.key_00=value section.key_01=value section.key_02=value"
        " (+17 more)"
    )


def test_artefact_root_of_a_run(tmp_path):
    from tasks.steps import artefact_root, write_run_file

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(load_config(PARAMS, TINY).to_dict(), sort_keys=False))
    same, other = load_config(params), load_config(params, ["train.lr=0.5"])
    assert artefact_root(same, params, tmp_path, "crimson-fox", "id-1") == tmp_path
    folder = artefact_root(other, params, tmp_path, "crimson-fox", "id-1")
    assert folder == tmp_path / "runs/crimson-fox"
    write_run_file(folder, flow_run_id="id-1")
    assert artefact_root(other, params, tmp_path, "crimson-fox", "id-1") == folder  # a retry
    # another flow run of the same name does not write into the first one's folder
    assert artefact_root(other, params, tmp_path, "crimson-fox", "abcdef123456") == (
        tmp_path / "runs/crimson-fox-abcdef12"
    )
    assert artefact_root(other, params, tmp_path, "my run/2", "id-2") == tmp_path / "runs/my-run-2"


def test_every_round_is_registered_and_the_best_is_champion(flow_run):
    """Each round's model is a version of the registered model `tdm`, tagged with its round and
    validation recall; the alias `champion` sits on the best one, which `models:/` resolves."""
    root, uri, state = flow_run
    summary = state.result()
    client = MlflowClient(tracking_uri=uri)
    versions = {
        int(v.tags["round"]): v
        for v in client.search_model_versions("name='tdm'")
        if v.run_id in summary["mlflow"]["round_run_ids"]
    }
    assert set(versions) == {0, 1}
    recalls = {}
    for r, version in versions.items():
        log = json.loads((root / f"models/round_{r}/train_log.json").read_text())
        recalls[r] = log["valid_recall"][log["best_epoch"]]
        assert float(version.tags["valid_recall"]) == pytest.approx(recalls[r])
        assert version.run_id == summary["mlflow"]["round_run_ids"][r]
    best = 1 if recalls[1] > recalls[0] else 0  # a tie keeps the first champion
    # the promotions as this run made them (later tests of this module register more versions)
    registered = summary["registered"]
    assert [r["version"] for r in registered] == [str(versions[r].version) for r in (0, 1)]
    assert registered[0]["promotion"]["promoted"]  # the store's first version
    assert registered[1]["promotion"]["promoted"] == (best == 1)
    assert str(registered[1]["promotion"]["champion"]) == str(versions[best].version)
    assert "models:/tdm/champion" in closing_text(summary, str(root))
