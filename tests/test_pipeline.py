"""End to end through the CLI on small synthetic data: artefacts, metrics, recommend, errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from tdm.cli import main, run
from tdm.recommender import Recommender
from tdm.tree import Tree

pytestmark = pytest.mark.integration
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


def test_trained_model_beats_most_popular(pipeline_root):
    for r in (0, 1):
        report = json.loads((pipeline_root / f"metrics/round_{r}.json").read_text())
        for mode in ("none", "items"):
            tdm, popular = report["tdm"][mode], report["most_popular"][mode]
            assert tdm["recall"] > 1.5 * popular["recall"], (r, mode)
            assert tdm["precision"] > 1.5 * popular["precision"], (r, mode)


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
    from tdm.data.samples import TrainSamples

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


# ------------------------------------------------------------------------ hardening: resume
def _train(root: Path, out: Path, *extra: str, fresh: bool = False, die_after: int | None = None):
    """``stages.train`` on the pipeline's data and category tree; with ``die_after`` the run
    is killed during epoch ``die_after + 1``, after epoch ``die_after``'s checkpoint."""
    from tdm import stages
    from tdm.config import load_config

    quick = ["train.num_threads=1", "train.max_samples_per_epoch=1024"]
    cfg = load_config(ROOT / "params.yaml", [*SMALL, *quick, *extra])

    class Killed(Exception):
        pass

    def kill(epoch, stats):
        if die_after is not None and epoch == die_after:
            raise Killed

    args = (cfg, root / "prepared", root / "trees/round_0.tree", out)
    if die_after is None:
        return stages.train(*args, fresh=fresh)
    with pytest.raises(Killed):
        stages.train(*args, callback=kill, fresh=fresh)
    return None


def test_resume_only_with_the_same_params_data_and_tree(pipeline_root, tmp_path, caplog):
    out = tmp_path / "model"
    _train(pipeline_root, out, die_after=1)  # killed in epoch 2: checkpoint of epoch 1
    assert (tmp_path / "model.ckpt/last.pt").exists() and not out.exists()
    with caplog.at_level("INFO"):
        log = _train(pipeline_root, out, "train.lr=0.001")
    assert "written by another run (params.train.lr 0.01 -> 0.001); starting fresh" in caplog.text
    assert log["epochs_run"] == 2
    caplog.clear()

    _train(pipeline_root, out, die_after=1)
    with caplog.at_level("INFO"):
        log = _train(pipeline_root, out, "train.epochs=1")
    assert "params.train.epochs 2 -> 1" in caplog.text
    assert log["epochs_run"] == 1 and len(log["losses"]) == 1  # not the 2-epoch weights
    caplog.clear()

    _train(pipeline_root, out, die_after=1)
    with caplog.at_level("INFO"):
        resumed = _train(pipeline_root, out)
    assert "resumed from" in caplog.text and "after epoch 1" in caplog.text
    assert not (tmp_path / "model.ckpt").exists()  # removed once the model is published
    uninterrupted = _train(pipeline_root, tmp_path / "other")
    assert resumed["losses"] == uninterrupted["losses"]
    assert resumed["valid_recall"] == uninterrupted["valid_recall"]

    _train(pipeline_root, out, die_after=1)
    caplog.clear()
    with caplog.at_level("INFO"):
        log = _train(pipeline_root, out, fresh=True)
    assert "resumed" not in caplog.text and log["losses"] == uninterrupted["losses"]


# ------------------------------------------------------------------------ hardening: artefacts
def test_a_flipped_byte_in_a_model_folder_is_found_at_load(pipeline_root, tmp_path, capsys):
    import shutil

    from tdm.io import IntegrityError

    for name in ("model.pt", "items.parquet"):
        model = tmp_path / name.replace(".", "_")
        shutil.copytree(pipeline_root / "models/round_1", model)
        Recommender.load(model)  # intact: loads
        data = bytearray((model / name).read_bytes())
        data[len(data) // 2] ^= 0x10  # a byte in the middle: tensor data / a parquet page
        (model / name).write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=f"{name}: sha256 differs"):
            Recommender.load(model)
        with pytest.raises(SystemExit) as exit_info:
            main(["recommend", "--model", str(model), "--history", "1:1"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}: sha256 differs" in err


def test_a_model_folder_stranded_by_a_crash_mid_swap_is_recovered(pipeline_root, tmp_path):
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(pipeline_root / "models/round_1", models / ".round_1.ab12.old")
    rec = Recommender.load(models / "round_1")  # the swap's old folder is put back
    assert rec.tree.n_items == len(rec.items) and (models / "round_1/model.pt").exists()


def test_k_is_capped_at_the_corpus_and_at_max_k(pipeline_root, capsys):
    from tdm.recommender import RequestError

    rec = Recommender.load(pipeline_root / "models/round_1", max_k=10**8)
    n_items = len(rec.items)
    history = [(int(i), 1_511_600_000) for i in rec.items["item_id"][:3]]
    items, scores = rec.recommend(history, k=10**7)
    assert (
        len(items) == n_items - 3 and (items >= 0).all() and len(set(items.tolist())) == len(items)
    )
    with pytest.raises(RequestError, match="above retrieval.max_k"):
        Recommender.load(pipeline_root / "models/round_1").recommend(history, k=5000)
    for k in ("-3", "0"):
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "recommend",
                    "--model",
                    str(pipeline_root / "models/round_1"),
                    "-k",
                    k,
                    "--history",
                    "1:1",
                ]
            )
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"tdm: error: k must be a positive integer, got {k}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--set", "train.device=cuda:7"], "train.device: 'cuda:7'"),
        (["train", "--set", "model.name=attention"], "model.name: 'attention' is not a built-in"),
        (
            ["recommend", "--history", "99999999999999999999:1"],
            "item id 99999999999999999999 is not",
        ),
        (["recommend", "--history", "1:99999999999999999999"], "timestamp 99999999999999999999 is"),
        (["recommend", "--history", "x:1"], "--history: 'x:1' is not item_id[:timestamp]"),
    ],
)
def test_expected_errors_are_one_line_and_exit_2(pipeline_root, tmp_path, capsys, argv, message):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(pipeline_root / "prepared", root / "prepared")
    shutil.copytree(pipeline_root / "trees", root / "trees")
    extra = ["--model", str(pipeline_root / "models/round_0")] if argv[0] == "recommend" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra, "--root", str(root), "--params", str(ROOT / "params.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tdm: error: ") and err.count("\n") == 1 and message in err, err


def test_a_corrupt_model_file_is_one_line(pipeline_root, tmp_path, capsys):
    import shutil

    from tdm.io import write_manifest

    model = tmp_path / "model"
    shutil.copytree(pipeline_root / "models/round_0", model)
    (model / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    write_manifest(model)  # the manifest agrees: the file itself is what is wrong
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", "--model", str(model), "--history", "1:1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.pt: not a readable model file" in err


HOLD = """
import sys, time
from tdm.io import root_lock
with root_lock(sys.argv[1], "tdm pipeline --set data.seed=1"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_one_root_fails_at_once_naming_the_first(pipeline_root, tmp_path, capsys):
    import shutil
    import signal
    import subprocess
    import sys

    root = tmp_path / "root"
    shutil.copytree(pipeline_root / "prepared", root / "prepared")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (["prepare"], ["pipeline"], ["train"], ["evaluate"]):
            with pytest.raises(SystemExit) as exit_info:
                main([*argv, "--root", str(root), "--params", str(ROOT / "params.yaml")])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert f"in use by pid {holder.pid}" in err and "data.seed=1" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (root / "prepared/meta.json").read_bytes() == (
        pipeline_root / "prepared/meta.json"
    ).read_bytes()
