"""The Prefect flow end to end on tiny synthetic data, in a temporary git + DVC project, tracked
in a temporary MLflow store: tasks, MLflow runs (metrics, PNGs, a model that loads back), the
outputs recorded in DVC, and one task through ``.fn()``."""

import os
import tempfile

# Before prefect/mlflow are imported anywhere in this process: no telemetry, no ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tdm-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from tiny import TINY  # noqa: E402

from flows.pipeline import closing_text, tdm_pipeline  # noqa: E402
from tasks.steps import config_task, init_tree_task, prepare_task  # noqa: E402
from tasks.tracking import PARENT_TAG, summary_markdown, tracked_run  # noqa: E402
from tasks.versioning import file_md5, locked_outs, unrecordable  # noqa: E402
from tdm.config import load_config  # noqa: E402
from tdm.tree import Tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")


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
    """A git + DVC project (the repo's dvc.yaml, .dvc/config, code) whose params.yaml is the tiny
    configuration and whose raw data (tracked by data.dvc) is the tiny synthetic set."""
    root = tmp_path_factory.mktemp("flow")
    for package in ("tdm", "tasks"):
        shutil.copytree(
            ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    cfg = load_config(PARAMS, [*TINY, "data.source=userbehavior"])  # read from data/ as DVC does
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "config", "user.email", "ci@example.invalid")
    _sh(root, "git", "config", "user.name", "ci")
    _sh(root, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", root / ".dvc/config")
    _sh(root, "tdm", "generate", "--out", cfg.data.path)
    _sh(root, "dvc", "add", "-q", "data")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "commit", "-qm", "init")
    return root


@pytest.fixture(scope="module")
def flow_run(harness, dvc_project):
    """The flow on the project's own params.yaml (run from the project, as `make pipeline`)."""
    root = dvc_project
    uri = f"sqlite:///{root / 'mlflow.db'}"
    threads = torch.get_num_threads()  # train.num_threads=1 is process-wide: give it back
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(root)
            state = tdm_pipeline(
                params=str(root / "params.yaml"),
                root=str(root),
                tracking_uri=uri,
                return_state=True,
            )
    finally:
        torch.set_num_threads(threads)
    return root, uri, state


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
    _sh(root, "dvc", "push")  # ships them to the default local remote
    remote = root.parent / "tdm-flow-dvc-remote/files/md5"
    tree_md5 = outs["trees/round_1.tree"]
    tree_bytes = (root / "trees/round_1.tree").read_bytes()
    assert (remote / tree_md5[:2] / tree_md5[2:]).read_bytes() == tree_bytes

    # The tree of a round run comes back from MLflow + DVC: its pipeline run's dvc.lock, `dvc pull`
    lock = client.download_artifacts(parent.info.run_id, "dvc/dvc.lock", str(tmp_path))
    (root / "trees/round_1.tree").unlink()
    (root / ".dvc/cache/files/md5" / tree_md5[:2] / tree_md5[2:]).unlink()
    shutil.copy(lock, root / "dvc.lock")
    _sh(root, "dvc", "pull", "trees/round_1.tree")
    assert (root / "trees/round_1.tree").read_bytes() == tree_bytes
    assert "up to date" in _sh(root, "dvc", "status")


def test_dvc_tree_stages_rewrite_the_flow_trees_byte_for_byte(flow_run):
    """Both doors write the same trees: DVC re-running the tree stages on the flow's inputs."""
    root = flow_run[0]
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
        assert f"(http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id})" in markdown
