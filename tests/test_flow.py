"""The Prefect flow end to end on tiny synthetic data, tracked in a temporary MLflow store, and one
task through ``.fn()``."""

import os
import tempfile

# Before prefect/mlflow are imported anywhere in this process: no telemetry, no ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tdm-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from tiny import TINY  # noqa: E402

from flows.pipeline import tdm_pipeline  # noqa: E402
from tasks.steps import config_task, init_tree_task, prepare_task  # noqa: E402
from tasks.tracking import PARENT_TAG, tracked_run  # noqa: E402
from tdm.tree import Tree  # noqa: E402

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def flow_run(harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    threads = torch.get_num_threads()  # train.num_threads=1 is process-wide: give it back
    try:
        state = tdm_pipeline(
            params=PARAMS, overrides=TINY, root=str(root), tracking_uri=uri, return_state=True
        )
    finally:
        torch.set_num_threads(threads)
    return root, uri, state


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


def test_failing_validation_stops_before_training(harness, tmp_path):
    from tdm.config import SyntheticConfig
    from tdm.data.synthetic import generate, write_userbehavior_csv

    frame = generate(SyntheticConfig(n_users=200, n_items=150, n_categories=10))
    broken = frame.iloc[list(range(len(frame))) + list(range(0, len(frame), 5))]  # 20% copies
    path = write_userbehavior_csv(broken, tmp_path / "UserBehavior.csv")
    overrides = [*TINY, "data.source=userbehavior", f"data.path={path}"]
    state = tdm_pipeline(
        params=PARAMS,
        overrides=overrides,
        root=str(tmp_path / "run"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        return_state=True,
    )
    assert state.is_failed()
    report = json.loads((tmp_path / "run/reports/validation_raw.json").read_text())
    assert not report["success"]
    failed = [r for r in report["results"] if not r["success"]]
    assert [r["expectation"] for r in failed] == ["expect_compound_columns_to_be_unique"]
    assert not (tmp_path / "run/prepared").exists() and not (tmp_path / "run/models").exists()


def test_flow_tracks_parent_and_round_runs(flow_run):
    root, uri, state = flow_run
    summary = state.result()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tdm-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == summary["mlflow"]["parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "1"
    assert "data.md5" in parent.data.tags
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_id for c in children) == sorted(summary["mlflow"]["round_run_ids"])
    assert len(children) == 2
    for child in children:
        metrics, params = child.data.metrics, child.data.params
        for name in ("tdm.none.recall", "tdm.items.precision", "most_popular.items.precision"):
            assert 0.0 <= metrics[name] <= 1.0
        assert metrics["tree.depth"] >= 1 and "tree.purity.level_1" in metrics
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
    round_1 = next(c for c in children if c.data.params["round"] == "1")
    assert 0.0 <= round_1.data.metrics["tree.moved_fraction"] <= 1.0


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
    assert logged.data.metrics["tree.purity.level_0"] <= 1.0


def test_flow_publishes_metrics_artifact(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    summary = flow_run[2].result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tdm-pipeline-metrics"]))
        )
    assert len(artifacts) == 1
    markdown = artifacts[0].data
    assert "| round | method |" in markdown and "most-popular" in markdown
    assert summary["mlflow"]["parent_run_id"] in markdown
    for run_id in summary["mlflow"]["round_run_ids"]:
        assert run_id in markdown


def test_compare_trees_lists_every_round(flow_run, capsys):
    from tdm.cli import run

    root, uri, state = flow_run
    assert run(["compare-trees", "--root", str(root), "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "round", "depth", "nodes"]
    rows = [line.split() for line in table[2:]]
    parent = state.result()["mlflow"]["parent_run_id"][:8]
    assert [r[:2] for r in rows] == [[parent, "0"], [parent, "1"]]
    assert rows[0][4] == "-" and 0.0 <= float(rows[1][4]) <= 1.0  # moved fraction from round 1
