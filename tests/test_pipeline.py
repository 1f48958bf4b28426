"""End to end through the CLI on small synthetic data: artefacts, metrics, recommend, errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from tdm.cli import main, run
from tdm.recommender import Recommender
from tdm.tree import Tree

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.source=synthetic",
    "synthetic.n_users=400",
    "synthetic.n_items=300",
    "synthetic.n_categories=16",
    "synthetic.behaviors_per_user=30",
    "data.n_test_users=60",
    "data.n_valid_users=40",
    "data.max_history=20",
    "train.epochs=2",
    "train.batch_size=128",
    "train.progress=false",
    "sampler.total_negatives=30",
    "model.hidden=[32, 16]",
    "rounds.count=2",
]


def _cli(root: Path, *args: str, extra: tuple[str, ...] = ()) -> None:
    overrides = [a for s in (*SMALL, *extra) for a in ("--set", s)]
    assert run([*args, "--params", str(ROOT / "params.yaml"), "--root", str(root), *overrides]) == 0


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    _cli(root, "pipeline")
    return root


def test_pipeline_writes_every_round(pipeline_root):
    n_items = json.loads((pipeline_root / "prepared/meta.json").read_text())["n_items"]
    assert 250 < n_items <= 300
    for r in (0, 1):
        assert Tree.load(pipeline_root / f"trees/round_{r}.tree").n_items == n_items
        assert (pipeline_root / f"models/round_{r}/model.pt").exists()
        assert np.load(pipeline_root / f"embeddings/round_{r}.npy").shape[0] == n_items
        report = json.loads((pipeline_root / f"metrics/round_{r}.json").read_text())
        for who in ("tdm", "most_popular"):
            assert set(report[who]) == {"none", "items", "categories"}
            for values in report[who].values():
                assert 0.0 <= values["recall"] <= 1.0 and 0.0 <= values["precision"] <= 1.0
        assert report["users"] == 60
        # items/categories filtering: nothing recommended was seen before
        assert report["tdm"]["items"]["novelty"] == pytest.approx(1.0)
        lw = report["layerwise_recall"]
        assert len(lw["beam"]) == len(lw["brute_force"]) == len(lw["level"])
    # round 1 runs on the re-learnt tree, which differs from the category tree
    assert Tree.load(pipeline_root / "trees/round_1.tree") != Tree.load(
        pipeline_root / "trees/round_0.tree"
    )


def test_trained_model_beats_random(pipeline_root):
    report = json.loads((pipeline_root / "metrics/round_0.json").read_text())
    random_precision = 1.0 / 300 * 30 / 2  # ~15 truth items among 300: P(random hit) per slot
    assert report["tdm"]["none"]["precision"] > 3 * random_precision


def test_recommender_and_recommend_command(pipeline_root, capsys):
    rec = Recommender.load(pipeline_root / "models/round_1")
    known = rec.items["item_id"].to_numpy()[:5]
    history = [(int(i), 1_511_600_000 + 60 * n) for n, i in enumerate(known)]
    items, scores = rec.recommend(history, k=10, exclude_seen=True)
    assert len(items) == 10 and len(set(items.tolist())) == 10
    assert not set(items.tolist()) & set(known.tolist())
    assert np.all(np.diff(scores[np.isfinite(scores)]) <= 1e-6)
    kept, _ = rec.recommend(history, k=10, exclude_seen=False)
    assert len(kept) == 10
    text = ",".join(f"{i}:{t}" for i, t in history)
    assert (
        run(
            [
                "recommend",
                "--model",
                str(pipeline_root / "models/round_1"),
                "--history",
                text,
                "-k",
                "5",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out["items"]) == 5 and not set(out["items"]) & set(known.tolist())


def test_stages_one_by_one_match_pipeline_tree(pipeline_root, tmp_path):
    _cli(tmp_path, "prepare")
    _cli(tmp_path, "init-tree")
    assert (tmp_path / "trees/round_0.tree").read_bytes() == (
        pipeline_root / "trees/round_0.tree"
    ).read_bytes()


def test_bad_input_names_the_file_and_keeps_outputs(tmp_path, capsys):
    _cli(tmp_path, "prepare")
    before = (tmp_path / "prepared/meta.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "prepare",
                "--params",
                str(ROOT / "params.yaml"),
                "--root",
                str(tmp_path),
                "--set",
                "data.source=userbehavior",
                "--set",
                f"data.path={tmp_path}/missing.csv",
            ]
        )
    assert exc.value.code == 2
    assert "missing.csv" in capsys.readouterr().err
    assert (tmp_path / "prepared/meta.json").read_bytes() == before
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "--root",
                str(tmp_path),
                "--params",
                str(ROOT / "params.yaml"),
                "--tree",
                str(tmp_path / "nope.tree"),
            ]
        )
    assert "nope.tree" in capsys.readouterr().err


def test_train_samples_trim_padding_to_the_longest_history(pipeline_root):
    from tdm.data.features import train_batch
    from tdm.data.protocol import load_prepared
    from tdm.stages import TrainSamples

    data = load_prepared(pipeline_root / "prepared")
    source = TrainSamples(data, max_history=20, min_history=1)
    index = np.argsort(source.lengths)[:7]  # the shortest histories
    hist, windows, targets = source.batch(index)
    assert hist.shape[1] == source.lengths[index].max() < 20
    full, full_windows, full_targets = train_batch(data, source.positions[index], 20)
    np.testing.assert_array_equal(full[:, -hist.shape[1] :], hist)
    assert (full[:, : -hist.shape[1]] == -1).all()
    np.testing.assert_array_equal(targets, full_targets)
    assert ((hist >= 0).sum(axis=1) == source.lengths[index]).all()


def test_validation_monitor_keeps_best_epoch_and_stops_on_patience():
    import torch

    from tdm.config import config_from_dict
    from tdm.stages import ValidationMonitor

    class Scripted(ValidationMonitor):
        scores = iter([0.1, 0.3, 0.2, 0.25])

        def recall(self):
            return next(self.scores)

    model = torch.nn.Linear(2, 1)
    cfg = config_from_dict({"train": {"patience": 2}})
    data = type("D", (), {"valid": type("V", (), {"users": np.arange(3)})()})()
    seen = []
    monitor = Scripted(model, None, data, cfg, callback=lambda e, s: seen.append(s["valid_recall"]))
    stops = []
    for epoch in range(4):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        stops.append(monitor(epoch, {"loss": 1.0}))
    assert stops == [False, False, False, True]
    assert monitor.best_epoch == 1 and seen == [0.1, 0.3, 0.2, 0.25]
    assert torch.all(monitor.best_state["weight"] == 1.0)
