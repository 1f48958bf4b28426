"""data.window_mode (issue 14): training, evaluation and recommendation windows agree, and the
prepared window bounds are quantiles of the ages of the chosen mode."""

import numpy as np
import pandas as pd
import pytest
import torch

from tdm.config import DataConfig, ModelConfig, SyntheticConfig
from tdm.data.features import eval_batch, history_index
from tdm.data.protocol import (
    load_prepared,
    position_window_bounds,
    prepare,
    training_positions,
    window_bounds_from_ages,
)
from tdm.data.samples import TrainSamples
from tdm.data.synthetic import generate
from tdm.model import build_model
from tdm.recommender import Recommender
from tdm.tree import Tree

torch.set_num_threads(1)

MODES = ("target_time", "last_behaviour", "position")
MAX_HISTORY = 12


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    cfg = SyntheticConfig(n_users=150, n_items=120, n_categories=8, n_departments=2)
    return generate(cfg)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = {}
    for mode in MODES:
        cfg = DataConfig(
            source="synthetic",
            path=None,
            n_test_users=20,
            n_valid_users=20,
            max_history=MAX_HISTORY,
            time_windows=4,
            window_mode=mode,
            seed=1,
        )
        folder = tmp_path_factory.mktemp(mode) / "prepared"
        prepare(raw, cfg, folder)
        out[mode] = load_prepared(folder)
    return out


def all_training_windows(data) -> np.ndarray:
    source = TrainSamples(data, MAX_HISTORY, 1)
    _, windows, _ = source.batch(np.arange(source.n_samples))
    return windows


def test_the_mode_is_recorded_and_the_default_is_position(prepared):
    for mode, data in prepared.items():
        assert data.meta["window_mode"] == mode == data.meta["data"]["window_mode"]
    assert DataConfig().window_mode == "position"  # chosen on validation users (RESULTS.md)
    assert prepared["position"].meta["window_bounds"] == position_window_bounds(MAX_HISTORY, 4)


def test_last_behaviour_puts_the_most_recent_behaviour_in_window_0_everywhere(prepared):
    for mode in ("last_behaviour", "position"):
        data = prepared[mode]
        windows = all_training_windows(data)
        assert np.all(windows[:, -1] == 0), mode  # every training sample (min_history 1)
        for split in (data.valid, data.test):
            rows = np.arange(split.n_users)
            _, ev = eval_batch(
                split, rows, MAX_HISTORY, data.window_bounds, data.meta["window_mode"]
            )
            assert np.all(ev[:, -1] == 0), mode  # every evaluation user
    # today's mode: evaluation always starts in window 0, training often does not
    target = all_training_windows(prepared["target_time"])
    assert 0 < np.mean(target[:, -1] == 0) < 1


def test_window_bounds_are_quantiles_of_the_modes_own_ages(prepared):
    for mode in ("target_time", "last_behaviour"):
        data = prepared[mode]
        train = data.train
        positions = training_positions(train, 1)  # fewer than WINDOW_SAMPLE: all of them
        rows = np.searchsorted(train.offsets, positions, side="right") - 1
        index, valid = history_index(train.offsets[rows], positions, MAX_HISTORY)
        reference = train.times[positions] if mode == "target_time" else train.times[positions - 1]
        ages = (reference[:, None] - train.times[index])[valid]
        assert data.meta["window_bounds"] == window_bounds_from_ages(ages, 4), mode
    assert (
        prepared["target_time"].meta["window_bounds"]
        != prepared["last_behaviour"].meta["window_bounds"]
    )


def test_recommender_features_follow_the_models_mode(prepared):
    torch.manual_seed(0)
    for mode, data in prepared.items():
        tree = Tree.from_ordered_items(np.arange(data.n_items), arity=2)
        model = build_model(ModelConfig(hidden=[8]), tree.n_nodes, 4, seed=0)
        rec = Recommender(model, tree, data.items, data.meta, device="cpu")
        assert rec.window_mode == mode
        split = data.valid
        hist_items = split.hist_items[split.hist_offsets[0] : split.hist_offsets[1]]
        hist_times = split.hist_times[split.hist_offsets[0] : split.hist_offsets[1]]
        ids = data.items["item_id"].to_numpy()[hist_items]
        query = rec.history(list(zip(ids.tolist(), hist_times.tolist(), strict=True)))
        hist, windows = rec.features([query])
        expected = eval_batch(split, np.array([0]), MAX_HISTORY, data.window_bounds, mode)
        np.testing.assert_array_equal(hist, expected[0])
        np.testing.assert_array_equal(windows, expected[1])
        if mode != "target_time":  # a later request time does not move the windows
            later = rec.history(
                list(zip(ids.tolist(), hist_times.tolist(), strict=True)),
                now=int(hist_times.max()) + 10**6,
            )
            np.testing.assert_array_equal(rec.features([later])[1], expected[1])
