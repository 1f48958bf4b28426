"""Tree quality against the truth: the generator's taxonomy (``true_taxonomy``), when evaluation
may use it (``synthetic_truth``), and the purity and NMI of a tree level against it
(``truth_agreement``)."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import normalized_mutual_info_score

from tdm.config import Config, DataConfig, SyntheticConfig
from tdm.data.synthetic import generate, true_taxonomy
from tdm.stages import synthetic_truth, tree_report, truth_groups
from tdm.tree import Tree
from tdm.tree_build import category_tree, closest_level, tree_purity, truth_agreement

SMALL = SyntheticConfig(n_users=200, n_items=300, n_categories=12, n_departments=3)


def _items(frame: pd.DataFrame) -> pd.DataFrame:
    """A prepared items table (item_index in sorted item_id order) of a behaviour table."""
    pairs = frame[["item_id", "category_id"]].drop_duplicates().sort_values("item_id")
    return pairs.assign(item_index=np.arange(len(pairs))).reset_index(drop=True)


@pytest.mark.parametrize("chunk_rows", [2_000_000, 1_000])  # one chunk, several chunks
def test_true_taxonomy_is_the_generated_data_s(chunk_rows):
    cfg = dataclasses.replace(SMALL, chunk_rows=chunk_rows)
    frame = generate(cfg)
    truth = true_taxonomy(cfg)
    assert len(truth) == cfg.n_items and truth["item_id"].is_unique
    seen = frame[["item_id", "category_id"]].drop_duplicates()
    joined = seen.merge(truth, on="item_id", how="left", suffixes=("", "_truth"))
    assert joined["category_id_truth"].notna().all()
    assert (joined["category_id"] == joined["category_id_truth"]).all()
    # a department holds whole categories; every department and category has items
    assert truth.groupby("category_id")["department"].nunique().max() == 1
    assert sorted(truth["department"].unique()) == list(range(cfg.n_departments))
    assert truth["category_id"].nunique() == cfg.n_categories


def test_a_tree_of_the_true_groups_scores_one():
    # 4 departments x 2 categories x 16 items, the leaves ordered by department and category
    items = np.arange(128)
    category = items // 16
    department = category // 2
    shuffled = np.random.default_rng(0).permutation(items)
    tree = Tree.from_ordered_items(shuffled[np.argsort(category[shuffled], kind="stable")], 2)
    for labels, level in ((category, 3), (department, 2)):
        got = truth_agreement(tree, labels)
        assert got == {
            "level": level,
            "nodes": len(np.unique(labels)),
            "groups": len(np.unique(labels)),
            "purity": 1.0,
            "nmi": pytest.approx(1.0),
        }
    # the category tree of the stage is such a tree when the categories fill whole subtrees
    tree = category_tree(items, category, arity=2, seed=3)
    assert truth_agreement(tree, category)["purity"] == 1.0
    assert truth_agreement(tree, category)["nmi"] == pytest.approx(1.0)


def test_a_random_balanced_tree_scores_near_chance():
    rng = np.random.default_rng(1)
    n, n_groups = 2048, 64
    labels = np.repeat(np.arange(n_groups), n // n_groups)
    random_tree = Tree.from_ordered_items(rng.permutation(n), 2)
    got = truth_agreement(random_tree, labels)
    assert got["level"] == 6 and got["nodes"] == 64
    # chance: the same level of any fixed tree against shuffled labels
    fixed = Tree.from_ordered_items(np.arange(n), 2)
    chance = [truth_agreement(fixed, rng.permutation(labels), level=6) for _ in range(20)]
    for key in ("nmi", "purity"):
        values = np.array([c[key] for c in chance])
        assert abs(got[key] - values.mean()) < 4 * values.std() + 1e-3, key
    # far from the 1.0 of the true groups; NMI chance ~ 63 * 63 / (2 * 2048 * ln 64) = 0.23
    assert got["nmi"] < 0.3 and got["purity"] < 0.2


def test_purity_is_tree_purity_s_and_nmi_sklearn_s_at_the_closest_level():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, 100)
    tree = Tree.from_ordered_items(np.argsort(labels + rng.random(100) * 1.5), 3)
    got = truth_agreement(tree, labels)
    assert list(tree.level_sizes[:3]) == [1, 3, 9]
    assert got["level"] == closest_level(tree, 5) == 1  # |3 - 5| < |9 - 5|
    assert got["purity"] == tree_purity(tree, labels)[got["level"]]
    groups = [tree.ancestors(tree.item_to_leaf(np.array([i])))[0, got["level"]] for i in range(100)]
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(labels, groups))


def test_closest_level_prefers_the_shallower_on_a_tie():
    tree = Tree.from_ordered_items(np.arange(8), 2)  # 1, 2, 4, 8 nodes
    assert [closest_level(tree, g) for g in (1, 2, 3, 5, 6, 7, 100)] == [0, 1, 1, 2, 2, 3, 3]


def test_synthetic_truth_only_for_the_generator_s_items():
    cfg = Config(data=DataConfig(source="userbehavior"), synthetic=SMALL)
    items = _items(generate(SMALL))
    truth = synthetic_truth(cfg, items)
    assert set(truth) == {"category", "department"}
    assert np.array_equal(truth["category"], items["category_id"].to_numpy())
    by_item = true_taxonomy(SMALL).set_index("item_id")["department"]
    assert np.array_equal(truth["department"], by_item[items["item_id"]].to_numpy())
    # other params, another category for one item, a MovieLens source: no truth
    other = dataclasses.replace(cfg, synthetic=dataclasses.replace(SMALL, seed=1))
    assert synthetic_truth(other, items) is None
    moved = items.copy()
    moved.loc[5, "category_id"] = items["category_id"].iloc[0] + items["category_id"].iloc[5]
    assert synthetic_truth(cfg, moved) is None
    movielens = dataclasses.replace(cfg, data=DataConfig(source="movielens"))
    assert synthetic_truth(movielens, items) is None
    far = items.assign(item_id=items["item_id"] + 10 * SMALL.n_items)  # out of the id range
    assert synthetic_truth(cfg, far) is None


def test_truth_groups_fall_back_to_the_data_s_own_categories():
    """Without the generator's taxonomy (MovieLens, other data) a tree is measured against the
    data's item categories alone; with it, against categories and departments."""
    items = _items(generate(SMALL))
    movielens = Config(data=DataConfig(source="movielens"), synthetic=SMALL)
    truth = truth_groups(movielens, items)
    assert set(truth) == {"category"}
    assert np.array_equal(truth["category"], items["category_id"].to_numpy())
    synthetic = Config(data=DataConfig(source="synthetic"), synthetic=SMALL)
    assert set(truth_groups(synthetic, items)) == {"category", "department"}


def test_tree_report_has_the_truth_per_grouping():
    items = _items(generate(SMALL))
    cfg = Config(data=DataConfig(source="synthetic"), synthetic=SMALL)
    truth = synthetic_truth(cfg, items)
    tree = category_tree(items["item_index"].to_numpy(), items["category_id"].to_numpy())
    report = tree_report(tree, items["category_id"].to_numpy(), truth)
    assert set(report["truth"]) == {"category", "department"}
    category = report["truth"]["category"]
    assert category["groups"] == items["category_id"].nunique()
    assert category["purity"] == round(report["category_purity"][category["level"]], 4)
    assert 0.5 < category["nmi"] <= 1.0
    assert "truth" not in tree_report(tree, items["category_id"].to_numpy())
