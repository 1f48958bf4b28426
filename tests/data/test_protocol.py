import json

import numpy as np
import pandas as pd
import pytest

import tdm.data.protocol as protocol
from tdm.config import DataConfig, SyntheticConfig
from tdm.data.protocol import (
    load_prepared,
    n_samples,
    prepare,
    training_positions,
    window_bounds_from_ages,
)
from tdm.data.schema import DataError
from tdm.data.synthetic import generate

CFG = DataConfig(min_user_behaviors=10, n_test_users=20, n_valid_users=15, seed=3)


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    frame = generate(SyntheticConfig(n_users=300, n_items=500, n_categories=20, n_departments=4))
    # shuffle the rows: prepare must sort by time itself
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "prepared"
    meta = prepare(raw, CFG, out)
    return meta, load_prepared(out)


def test_files_and_meta(prepared, raw):
    meta, data = prepared
    assert meta == data.meta
    for key in ("n_items", "n_train_users", "n_valid_users", "n_test_users", "max_history"):
        assert isinstance(meta[key], int)
    assert meta["data"]["seed"] == 3 and meta["time_windows"] == CFG.time_windows
    assert (meta["n_valid_users"], meta["n_test_users"]) == (15, 20)
    counts = raw.groupby("user_id").size()
    assert meta["n_users"] == int((counts >= 10).sum())
    assert meta["n_train_users"] == meta["n_users"] - 35
    assert list(data.items.columns) == ["item_index", "item_id", "category_id", "train_count"]
    assert all(data.items[c].dtype == np.int64 for c in data.items.columns)
    for array in (data.train.items, data.train.offsets, data.test.truth_offsets):
        assert array.dtype == np.int64


def test_users_filtered_and_splits_disjoint(prepared, raw):
    _, data = prepared
    counts = raw.groupby("user_id").size()
    kept = set(counts.index[counts >= 10])
    train, valid, test = set(data.train.users), set(data.valid.users), set(data.test.users)
    assert train | valid | test == kept
    assert not (train & valid or train & test or valid & test)
    assert counts.min() < 10  # the filter had something to do


def test_items_are_every_remaining_item_in_sorted_id_order(prepared, raw):
    _, data = prepared
    counts = raw.groupby("user_id").size()
    remaining = raw[raw["user_id"].isin(counts.index[counts >= 10])]
    assert data.items["item_id"].tolist() == sorted(remaining["item_id"].unique())
    assert data.items["item_index"].tolist() == list(range(len(data.items)))
    category = remaining.groupby("item_id")["category_id"].first()
    assert data.items["category_id"].tolist() == category.loc[data.items["item_id"]].tolist()
    train_rows = remaining[remaining["user_id"].isin(data.train.users)]
    expected = train_rows["item_id"].value_counts()
    got = data.items.set_index("item_id")["train_count"]
    assert got[expected.index].tolist() == expected.tolist()
    assert got.sum() == len(train_rows)


def test_eval_users_split_in_halves_along_the_timeline(prepared, raw):
    _, data = prepared
    item_id = data.items["item_id"].to_numpy()
    for split in (data.valid, data.test):
        assert (np.diff(split.users) > 0).all()
        for row, user in enumerate(split.users):
            rows = raw[raw["user_id"] == user]
            ordered = rows.sort_values("timestamp", kind="stable")
            n = len(ordered)
            hist = split.hist_items[split.hist_offsets[row] : split.hist_offsets[row + 1]]
            truth = split.truth_of(row)
            assert len(hist) == n // 2 and len(truth) == n - n // 2
            assert item_id[hist].tolist() == ordered["item_id"].tolist()[: n // 2]
            assert item_id[truth].tolist() == ordered["item_id"].tolist()[n // 2 :]
        assert split.truth_items.min() >= 0 and split.truth_items.max() < len(item_id)


def test_train_sequences_sorted_and_samples_counted(prepared):
    _, data = prepared
    train = data.train
    for u in range(train.n_users):
        times = train.times[train.offsets[u] : train.offsets[u + 1]]
        assert (np.diff(times) >= 0).all()
    positions = training_positions(train, CFG.min_history)
    assert len(positions) == n_samples(train, CFG.min_history) == data.meta["n_train_samples"]
    assert len(positions) == len(train.items) - train.n_users
    bounds = data.window_bounds
    assert len(bounds) == CFG.time_windows - 1 and (np.diff(bounds) > 0).all()


def test_equal_timestamps_keep_input_order(tmp_path):
    # Per user: items 104..100 at t=1001 come first in the input, then 109..105 at t=1000;
    # users are interleaved. Sorted stably: 109..105 (history), then 104..100 (truth).
    later = [(104 - k, 1001) for k in range(5)]
    earlier = [(109 - k, 1000) for k in range(5)]
    rows = [(user, item, 0, "pv", t) for item, t in later + earlier for user in range(4)]
    df = pd.DataFrame(
        rows, columns=["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
    )
    cfg = DataConfig(min_user_behaviors=10, n_test_users=2, n_valid_users=1, seed=0)
    prepare(df, cfg, tmp_path / "p")
    data = load_prepared(tmp_path / "p")
    item_id = data.items["item_id"].to_numpy()
    for split in (data.test, data.valid):
        for row in range(split.n_users):
            hist = split.hist_items[split.hist_offsets[row] : split.hist_offsets[row + 1]]
            assert item_id[hist].tolist() == [109, 108, 107, 106, 105]
            assert item_id[split.truth_of(row)].tolist() == [104, 103, 102, 101, 100]
    train = data.train
    assert item_id[train.items[: train.offsets[1]]].tolist() == list(range(109, 99, -1))


def test_split_is_seeded(raw, tmp_path):
    a = prepare(raw, CFG, tmp_path / "a")
    b = prepare(raw, CFG, tmp_path / "b")
    c = prepare(raw, DataConfig(**{**CFG.__dict__, "seed": 4}), tmp_path / "c")
    assert a["window_bounds"] == b["window_bounds"]
    test_a, test_b = (load_prepared(tmp_path / n).test.users for n in "ab")
    assert test_a.tolist() == test_b.tolist()
    assert load_prepared(tmp_path / "c").test.users.tolist() != test_a.tolist()
    assert c["n_items"] == a["n_items"]


def test_too_few_users_is_an_error(raw, tmp_path):
    cfg = DataConfig(n_test_users=200, n_valid_users=200)
    with pytest.raises(DataError, match="too few"):
        prepare(raw, cfg, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_failed_prepare_leaves_previous_output_intact(raw, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare(raw, CFG, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = protocol._save_npz

    def failing(path, arrays):
        if path.name == "test.npz":
            raise OSError("disk full")
        original(path, arrays)

    monkeypatch.setattr(protocol, "_save_npz", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare(raw, DataConfig(**{**CFG.__dict__, "seed": 9}), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temp dir left
    monkeypatch.undo()
    prepare(raw, DataConfig(**{**CFG.__dict__, "seed": 9}), out)  # replaces the old output
    assert json.loads((out / "meta.json").read_text())["data"]["seed"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_window_bounds_quantiles_and_collapse():
    ages = np.arange(1000)
    assert window_bounds_from_ages(ages, 4) == [250, 500, 750]
    collapsed = window_bounds_from_ages(np.r_[np.zeros(900), np.arange(100) * 1000], 5)
    assert collapsed == [1, 2, 3, 4]  # all quantiles at 0: nudged, strictly increasing
    mixed = window_bounds_from_ages(np.r_[np.zeros(500), np.arange(500) * 10], 4)
    assert mixed[0] == 1 and np.all(np.diff(mixed) > 0)
    assert window_bounds_from_ages(ages, 1) == []
    assert window_bounds_from_ages(np.zeros(0), 3) == [3600, 7200]
