"""The benchmark as a Prefect flow on tiny synthetic data, tracked in a temporary MLflow store."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from tiny import TINY

from flows.benchmark import EXPERIMENT, tdm_benchmark
from tasks.tracking import PARENT_TAG

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):  # busy 2-core machines
        yield


@pytest.fixture(scope="module")
def flow_run(harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-flow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    report = tdm_benchmark(
        params=str(ROOT / "params.yaml"),
        overrides=[*TINY, "train.epochs=1"],
        dataset="tiny",
        seeds=[0, 1],
        baselines=["popular", "itemcf"],
        variants=["product_dnn"],
        rounds=2,
        root=str(root),
        tracking_uri=uri,
    )
    return root, uri, report


def test_flow_writes_the_report(flow_run):
    root, _, report = flow_run
    out = root / "reports" / "tiny"
    assert "Table 2" in (out / "tables.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["rows"].keys() == report["summary"]["rows"].keys()
    rows = {"popular", "itemcf", "product_dnn/round_0", "product_dnn/round_1"}
    assert set(report["summary"]["rows"]) == rows
    assert (out / "fig4.png").exists()


def test_mlflow_has_the_summary_and_one_run_per_seed(flow_run):
    _, uri, report = flow_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    stat = report["summary"]["rows"]["itemcf"]["items"]["recall"]
    assert parent.data.metrics["itemcf.items.recall.mean"] == pytest.approx(stat["mean"])
    assert parent.data.metrics["itemcf.items.recall.std"] == pytest.approx(stat["std"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {"report/results.json", "report/tables.md", "report/fig4.png"}
    seeds = {r.data.params["data.seed"]: r for r in runs if PARENT_TAG in r.data.tags}
    assert set(seeds) == {"0", "1"}
    for seed, run in seeds.items():
        test = report["per_seed"][int(seed)]["tdm"]["product_dnn"]["rounds"][1]["test"]
        value = run.data.metrics["product_dnn/round_1.none.precision"]
        assert value == pytest.approx(test["none"]["precision"])
        assert "itemcf.neighbours" in run.data.params


def test_bad_input_fails_in_one_line(harness, tmp_path, caplog):
    from tdm.config import ConfigError

    caplog.clear()
    state = tdm_benchmark(
        params=str(ROOT / "params.yaml"),
        overrides=["train.epochs=many"],
        root=str(tmp_path),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        return_state=True,
    )
    assert state.is_failed()
    assert state.message == f"{ROOT / 'params.yaml'}: train.epochs: expected an integer, got 'many'"
    assert "Traceback" not in caplog.text and state.message in caplog.text
    with pytest.raises(ConfigError):
        state.result()
