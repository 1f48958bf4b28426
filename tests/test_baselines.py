"""Baselines (tdm/baselines): behaviour on tiny data with known answers, exclusion, seeding and
validation-only tuning."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from tdm.baselines import BASELINES, GRIDS, fit, grid_points, tune
from tdm.baselines.itemcf import ItemCF, keep_top_per_row
from tdm.config import DataConfig, EvalConfig
from tdm.data.protocol import EvalSplit, load_prepared, prepare
from tdm.evaluation import evaluate_split

N_GROUPS, GROUP_ITEMS, USERS_PER_GROUP = 4, 8, 30
M = GROUP_ITEMS // 2  # an evaluation user's truth: the half of its group it has not seen yet
EVAL = EvalConfig(topk=M, filters=["none", "items"])
FAST = {  # small, quick settings of every baseline on the block data
    "popular": {},
    "itemcf": {"neighbours": 10},
    "bpr": {"factors": 8, "epochs": 40, "lr": 0.05, "reg": 0.01, "batch_size": 256},
    "fm": {"factors": 8, "epochs": 30, "lr": 0.02, "batch_size": 128},
    "youtube": {
        "embedding_dim": 8,
        "hidden": [16, 8],
        "epochs": 30,
        "lr": 0.01,
        "negatives": 10,
        "batch_size": 64,
        "with_eval_history": True,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # module scope: set before the module's data and models are built
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _table(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    user, item, time = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    return pd.DataFrame(
        {
            "user_id": user,
            "item_id": item,
            "category_id": item // GROUP_ITEMS,
            "behavior_type": pd.Categorical(
                ["pv"] * len(user), categories=["pv", "buy", "cart", "fav"]
            ),
            "timestamp": 1_500_000_000 + time,
        }
    )


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """Four groups of 8 items (one category each); every user rates all 8 items of its group in a
    random order. An evaluation user knows 4 of them and its truth is the other 4."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(N_GROUPS * USERS_PER_GROUP):
        group = user % N_GROUPS
        items = group * GROUP_ITEMS + rng.permutation(GROUP_ITEMS)
        rows += [(user, int(i), 3600 * n + int(rng.integers(0, 600))) for n, i in enumerate(items)]
    cfg = DataConfig(
        min_user_behaviors=4, n_test_users=16, n_valid_users=16, max_history=8, time_windows=3
    )
    out = tmp_path_factory.mktemp("blocks") / "prepared"
    prepare(_table(rows), cfg, out)
    return load_prepared(out)


@pytest.fixture(scope="module")
def fitted(blocks):
    return {name: fit(name, blocks, FAST[name], seed=0) for name in BASELINES}


def _rank(model, split, k, exclude=None):
    rows = np.arange(split.n_users)
    if exclude is None:
        exclude = (np.zeros(0, dtype=np.int64), np.zeros(len(rows) + 1, dtype=np.int64))
    return model.ranker()(split, rows, k, exclude)


def _seen(split):
    return split.hist_items, split.hist_offsets


# ------------------------------------------------------------------------- known answers
def test_itemcf_recommends_the_item_that_always_co_occurs(tmp_path):
    """Items come in pairs that every user takes together: a pair's partner is its most similar
    item (cosine 1), so a history of one item recommends its partner first."""
    rng = np.random.default_rng(1)
    n_pairs, rows = 15, []
    for user in range(120):
        pairs = rng.choice(n_pairs, size=3, replace=False)
        items = rng.permutation(np.concatenate([2 * pairs, 2 * pairs + 1]))
        rows += [(user, int(i), 60 * n) for n, i in enumerate(items)]
    cfg = DataConfig(min_user_behaviors=4, n_test_users=5, n_valid_users=5, max_history=6)
    prepare(_table(rows), cfg, tmp_path / "p")
    data = load_prepared(tmp_path / "p")
    triggers = np.arange(2 * n_pairs)
    probe = EvalSplit(
        users=triggers,
        hist_items=triggers,
        hist_times=np.zeros(len(triggers), dtype=np.int64),
        hist_offsets=np.arange(len(triggers) + 1),
        truth_items=triggers ^ 1,
        truth_offsets=np.arange(len(triggers) + 1),
    )
    # training users only: partners always co-occur, cosine exactly 1
    items, scores = _rank(ItemCF(neighbours=5, with_eval_history=False).fit(data), probe, 3)
    np.testing.assert_array_equal(items[:, 0], triggers ^ 1)  # the partner, first
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-6)
    assert np.all(scores[:, 1] < 1.0 - 1e-6)
    # with the evaluation users' known halves (which may split a pair) still first
    items, _ = _rank(ItemCF(neighbours=5).fit(data), probe, 3)
    np.testing.assert_array_equal(items[:, 0], triggers ^ 1)


def test_itemcf_keeps_top_n_neighbours(blocks):
    import scipy.sparse as sp

    dense = np.array([[0.0, 0.5, 0.9, 0.1], [0.3, 0.0, 0.3, 0.7], [0.0, 0.0, 0.0, 0.0]])
    kept = keep_top_per_row(sp.csr_matrix(dense), 2).toarray()
    np.testing.assert_array_equal(
        kept, [[0.0, 0.5, 0.9, 0.0], [0.3, 0.0, 0.0, 0.7], [0.0, 0.0, 0.0, 0.0]]
    )  # ties keep the smaller column
    model = ItemCF(neighbours=3).fit(blocks)
    assert np.diff(model.similarity.indptr).max() == 3


def test_bpr_ranks_the_held_out_items_of_the_blocks_first(blocks, fitted):
    """Implicit's checkerboard test on blocks: with the known items left out, every user's top
    items are exactly its group's held-out items."""
    test = blocks.test
    items, _ = _rank(fitted["bpr"], test, M, _seen(test))
    for row in range(test.n_users):
        assert set(items[row]) == set(test.truth_of(row)), row


@pytest.mark.parametrize("name", ["itemcf", "bpr", "fm", "youtube"])
def test_learns_the_block_structure(blocks, fitted, name):
    """Users of a group get that group's unseen items at the top: far above chance (4 truth
    items among the 28 unseen ones: 1/7 precision) and above most-popular."""
    report = evaluate_split(fitted[name].ranker(), blocks, blocks.test, EVAL)
    popular = evaluate_split(fitted["popular"].ranker(), blocks, blocks.test, EVAL)
    assert report["items"]["precision"] >= 0.9
    assert report["items"]["precision"] > popular["items"]["precision"] + 0.5
    assert report["items"]["novelty"] == pytest.approx(1.0)


def test_per_user_metrics_average_to_the_reported_means(blocks, fitted):
    ranker = fitted["itemcf"].ranker()
    report = evaluate_split(ranker, blocks, blocks.test, EVAL, per_user=True)
    for mode in ("none", "items"):
        m = report[mode]
        recall, precision = m["recall_per_user"], m["precision_per_user"]
        assert len(recall) == len(precision) == blocks.test.n_users
        assert np.nanmean(recall) == pytest.approx(m["recall"])
        assert precision[~np.isnan(recall)].mean() == pytest.approx(m["precision"])
    popular = evaluate_split(fitted["popular"].ranker(), blocks, blocks.test, EVAL, per_user=True)
    assert popular["none"]["recall_per_user"].std() > 0  # per user, not a broadcast mean
    assert "recall_per_user" not in evaluate_split(ranker, blocks, blocks.test, EVAL)["none"]


# ------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", list(BASELINES))
def test_exclude_is_honoured(blocks, fitted, name):
    test = blocks.test
    full, _ = _rank(fitted[name], test, 6)
    # leave out each user's first three unfiltered picks and its known items
    rows = [
        np.unique(
            np.concatenate(
                [full[r, :3], test.hist_items[test.hist_offsets[r] : test.hist_offsets[r + 1]]]
            )
        )
        for r in range(test.n_users)
    ]
    exclude = (np.concatenate(rows), np.concatenate([[0], np.cumsum([len(r) for r in rows])]))
    items, scores = _rank(fitted[name], test, 6, exclude)
    assert items.shape == scores.shape == (test.n_users, 6)
    if name == "popular":  # MostPopular leaves filtering to the evaluator (documented)
        return
    for r in range(test.n_users):
        picked = items[r][items[r] >= 0]
        assert not set(picked) & set(rows[r])
        assert len(set(picked)) == len(picked)
        assert np.all(np.diff(scores[r][items[r] >= 0]) <= 1e-6)  # best first


@pytest.mark.parametrize("name", ["bpr", "fm", "youtube"])
def test_deterministic_for_a_seed(blocks, name):
    params = {**FAST[name], "epochs": 2}
    a = _rank(fit(name, blocks, params, seed=3), blocks.valid, 6)
    b = _rank(fit(name, blocks, params, seed=3), blocks.valid, 6)
    c = _rank(fit(name, blocks, params, seed=4), blocks.valid, 6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


# ------------------------------------------------------------------------- tuning
def _scrambled_test(data):
    """The same data with the test users' ground truth replaced by random items."""
    rng = np.random.default_rng(7)
    truth = rng.integers(0, data.n_items, size=len(data.test.truth_items))
    return dataclasses.replace(data, test=dataclasses.replace(data.test, truth_items=truth))


def test_tune_reads_the_validation_users_only(blocks):
    grid = {"neighbours": [1, 2, 5, 20]}
    best, table = tune("itemcf", blocks, grid, EVAL, mode="items")
    assert [row["params"] for row in table] == grid_points(grid)
    for row in table:  # each value is the validation metric of that point
        model = fit("itemcf", blocks, row["params"])
        valid = evaluate_split(model.ranker(), blocks, blocks.valid, EVAL)
        assert row["value"] == pytest.approx(valid["items"]["recall"])
    best_value = max(row["value"] for row in table)
    assert best == next(r["params"] for r in table if r["value"] == best_value)
    # a different test truth changes nothing
    best2, table2 = tune("itemcf", _scrambled_test(blocks), grid, EVAL, mode="items")
    assert best2 == best and [r["value"] for r in table2] == [r["value"] for r in table]


def test_tune_shares_one_run_across_epochs(blocks):
    """Points differing only in epochs are evaluated inside one run of the longest; the values
    equal separate fits."""
    base = {k: v for k, v in FAST["bpr"].items() if k != "epochs"}
    grid = [{**base, "epochs": e} for e in (3, 1, 6)]
    best, table = tune("bpr", blocks, grid, EVAL, seed=2)
    assert [row["params"]["epochs"] for row in table] == [3, 1, 6]
    for row in table:
        model = fit("bpr", blocks, row["params"], seed=2)
        valid = evaluate_split(model.ranker(), blocks, blocks.valid, EVAL)
        assert row["value"] == pytest.approx(valid["none"]["recall"])
    best2, table2 = tune("bpr", _scrambled_test(blocks), grid, EVAL, seed=2)
    assert best2 == best and [r["value"] for r in table2] == [r["value"] for r in table]


def test_registry_and_grids():
    assert set(GRIDS) == set(BASELINES)
    assert grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    with pytest.raises(ValueError, match="unknown baseline"):
        fit("nope", None)
