"""Fig. 5's test curve (``train.test_curve``, ``tdm.stages.TestCurveReporter``): reported after
every epoch, never read by training or by the choice of the kept epoch; logged to MLflow with a
plot by the train task."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY

from tdm import stages
from tdm.config import load_config
from tdm.paths import MODEL_FILE, TRAIN_LOG_FILE

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [*TINY, "train.epochs=2", "rounds.count=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One round trained twice on the same data and tree: plain, and with the test curve."""
    root = tmp_path_factory.mktemp("curve")
    cfg = load_config(ROOT / "params.yaml", SETTINGS)
    stages.prepare(cfg, root / "prepared")
    stages.init_tree(cfg, root / "prepared", root / "round_0.tree")
    plain = stages.train(cfg, root / "prepared", root / "round_0.tree", root / "plain")
    seen: list[dict] = []
    curve_cfg = load_config(ROOT / "params.yaml", [*SETTINGS, "train.test_curve=true"])
    curve = stages.train(
        curve_cfg,
        root / "prepared",
        root / "round_0.tree",
        root / "curve",
        callback=lambda epoch, stats: seen.append(stats),
    )
    return root, curve_cfg, plain, curve, seen


def _weights(model_dir: Path) -> dict:
    return torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=False)


def test_off_by_default():
    assert load_config(ROOT / "params.yaml").train.test_curve is False


def test_the_curve_changes_nothing_that_training_decides(runs):
    root, _, plain, curve, _ = runs
    assert "test_curve" not in plain
    for key in ("losses", "valid_recall", "best_epoch", "epochs_run", "steps"):
        assert curve[key] == plain[key], key
    a, b = _weights(root / "plain"), _weights(root / "curve")
    state_a, state_b = a["state_dict"], b["state_dict"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_the_curve_is_the_test_users_recall_and_loss_per_epoch(runs):
    root, cfg, _, curve, seen = runs
    got = curve["test_curve"]
    assert got["split"] == "test" and got["k"] == cfg.eval.topk and got["epoch"] == [1, 2]
    assert all(0.0 <= r <= 1.0 for r in got["recall"]) and all(x > 0 for x in got["loss"])
    assert json.loads((root / "curve" / TRAIN_LOG_FILE).read_text())["test_curve"] == got
    # the callback saw each epoch's values (the flow logs them as metrics)
    assert [s["test_recall"] for s in seen] == pytest.approx(got["recall"], abs=1e-6)
    assert [s["test_loss"] for s in seen] == pytest.approx(got["loss"], abs=1e-6)
    # the kept epoch's test recall is what evaluation reports for the saved model
    report = stages.evaluate(cfg, root / "prepared", root / "curve", root / "metrics.json")
    best = curve["best_epoch"]
    assert report["tdm"]["none"]["recall"] == pytest.approx(got["recall"][best], abs=1e-6)


def test_the_loss_scores_fixed_pairs_and_leaves_model_and_sampler_alone(runs):
    from tdm.checkpoint import load_model_dir
    from tdm.data.protocol import load_prepared
    from tdm.sampler import LayerwiseSampler, negatives_for_levels
    from tdm.tree import Tree

    root, cfg, _, _, _ = runs
    data = load_prepared(root / "prepared")
    model, _ = load_model_dir(root / "curve")
    tree = Tree.load(root / "round_0.tree")
    sampler = LayerwiseSampler(tree, negatives_for_levels(tree.level_sizes, 20), seed=0)
    sampler.reseed(0, 1)
    state = sampler.rng.bit_generator.state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    reporter = stages.TestCurveReporter(model, tree, data, cfg, sampler)
    users, items = reporter.pairs()
    truth = {(u, i) for u in range(data.test.n_users) for i in data.test.truth_of(u)}
    assert set(zip(users.tolist(), items.tolist(), strict=True)) == truth
    assert len(users) == len(truth)  # distinct pairs
    first, second = reporter.loss(), reporter.loss()
    assert first == second and np.isfinite(first)  # the same negatives every time
    assert model.training  # the mode it was in
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sampler.rng.bit_generator.state == state


def test_train_task_logs_the_curve_and_fig5(runs, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.steps import train_task
    from tasks.tracking import tracked_run

    root, cfg, _, _, _ = runs
    (tmp_path / "prepared").symlink_to(root / "prepared")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracked_run(uri, "curve", tmp_path) as run:
        train_task.fn(cfg, str(tmp_path), 0, str(root / "round_0.tree"), run=run)
    client = MlflowClient(tracking_uri=uri)
    logged = json.loads((tmp_path / "models/round_0" / TRAIN_LOG_FILE).read_text())["test_curve"]
    for key in ("test_loss", "test_recall"):
        history = client.get_metric_history(run.run_id, key)
        assert [m.step for m in history] == [0, 1]
        assert [m.value for m in history] == pytest.approx(logged[key[5:]], abs=1e-6)
    plots = {f.path for f in client.list_artifacts(run.run_id, "plots")}
    assert "plots/fig5.png" in plots
    png = Path(client.download_artifacts(run.run_id, "plots/fig5.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
