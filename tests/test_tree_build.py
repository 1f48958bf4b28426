"""Behaviour of the tree builders and tree reports (tdm/tree_build.py, Sec. 3.5)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tdm.tree import Tree
from tdm.tree_build import (
    _assign_greedy,
    _assign_two,
    category_tree,
    is_balanced,
    item_order_from_tree,
    kmeans_order,
    kmeans_tree,
    moved_fraction,
    subtree_leaf_counts,
    tree_purity,
)

EMPTY_PADS = (np.array([], dtype=np.int64), np.array([], dtype=np.int64))


def _items(n: int) -> np.ndarray:
    """Distinct, non-contiguous, unsorted item ids."""
    return np.random.default_rng(n).permutation(1000 + 7 * np.arange(n))


def _ordered(items: np.ndarray, arity: int, seed: int) -> Tree:
    return Tree.from_ordered_items(np.random.default_rng(seed).permutation(items), arity)


def _by_category(items: np.ndarray, arity: int, seed: int) -> Tree:
    cats = np.random.default_rng(len(items)).integers(0, 5, len(items))
    return category_tree(items, cats, arity=arity, seed=seed)


def _by_kmeans(items: np.ndarray, arity: int, seed: int) -> Tree:
    emb = np.random.default_rng(len(items)).standard_normal((len(items), 6)).astype(np.float32)
    return kmeans_tree(items, emb, arity=arity, seed=seed)


BUILDERS: dict[str, Callable[[np.ndarray, int, int], Tree]] = {
    "from_ordered_items": _ordered,
    "category_tree": _by_category,
    "kmeans_tree": _by_kmeans,
}


def _assert_balanced(tree: Tree) -> None:
    """Leaf depths within one; every inner node's children hold leaf counts within one."""
    depths = tree.level[tree.leaf_nodes]
    assert depths.max() - depths.min() <= 1
    counts = subtree_leaf_counts(tree)
    assert counts[0] == tree.n_items
    for v in np.flatnonzero(~tree.is_leaf):
        kids = counts[tree.child_offsets[v] : tree.child_offsets[v + 1]]
        assert kids.max() - kids.min() <= 1
        assert kids.sum() == counts[v]


# ------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("builder", BUILDERS.values(), ids=BUILDERS.keys())
@pytest.mark.parametrize("arity", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, "arity+1", 7, 13, 31, 97, 1000])
def test_builder_contract(builder, arity: int, n) -> None:
    n = arity + 1 if n == "arity+1" else n
    items = _items(n)
    tree = builder(items, arity, 3)
    # every item exactly once
    assert tree.n_items == n
    assert np.array_equal(np.sort(tree.leaf_items), np.sort(items))
    # balanced, with exactly the near-complete shape of from_ordered_items
    _assert_balanced(tree)
    assert is_balanced(tree)
    assert np.array_equal(tree.parent, Tree.from_ordered_items(items, arity).parent)
    assert tree.max_arity <= arity
    # deterministic for a seed
    assert builder(items, arity, 3) == tree


# ------------------------------------------------------------------------------------ category
def test_category_tree_keeps_each_category_contiguous() -> None:
    rng = np.random.default_rng(0)
    items = _items(500)
    cats = rng.integers(0, 17, 500) * 3 + 100
    category_of = dict(zip(items.tolist(), cats.tolist(), strict=True))
    for seed in range(3):
        order = item_order_from_tree(category_tree(items, cats, arity=2, seed=seed))
        seq = np.array([category_of[i] for i in order])
        runs = 1 + np.count_nonzero(seq[1:] != seq[:-1])
        assert runs == len(np.unique(cats))


def test_category_tree_orders_categories_and_items_randomly_by_seed() -> None:
    items = np.arange(400)
    cats = items // 40  # 10 categories of 40 items
    orders = [item_order_from_tree(category_tree(items, cats, seed=s)) for s in range(4)]
    cat_orders = [tuple(dict.fromkeys((o // 40).tolist())) for o in orders]
    assert len(set(cat_orders)) > 1  # category order depends on the seed
    first = orders[0][orders[0] // 40 == 0]
    assert not np.array_equal(first, np.sort(first))  # intra-category order is shuffled


def test_category_tree_assigns_multi_category_item_to_one_random_category() -> None:
    # item 5 is listed in categories 1 and 2 (and the (5, 1) row twice); others once
    items = np.array([0, 1, 2, 3, 5, 5, 5, 4, 6, 7])
    cats = np.array([1, 1, 1, 2, 1, 2, 1, 2, 2, 2])
    chosen = set()
    for seed in range(20):
        tree = category_tree(items, cats, seed=seed)
        assert sorted(tree.leaf_items.tolist()) == [0, 1, 2, 3, 4, 5, 6, 7]
        order = item_order_from_tree(tree).tolist()
        block_one = set(order[:4]) if 0 in order[:4] else set(order[4:])
        assert {0, 1, 2} <= block_one
        chosen.add(1 if 5 in block_one else 2)
        assert len(block_one) == 4  # item 5 sits in exactly one category block
    assert chosen == {1, 2}  # both of its categories get picked for some seed


def test_category_tree_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        category_tree(np.arange(3), np.arange(4))
    with pytest.raises(ValueError):
        category_tree(np.array([], dtype=np.int64), np.array([], dtype=np.int64))


def test_category_tree_handles_many_items_quickly() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(0, 100_000, 200_000)  # with duplicates
    cats = rng.integers(0, 1000, 200_000)
    tree = category_tree(items, cats, seed=1)
    assert np.array_equal(np.sort(tree.leaf_items), np.unique(items))
    assert is_balanced(tree)


# ------------------------------------------------------------------------------------ k-means
def _gaussian_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, 8)) * 20.0
    label = np.repeat(np.arange(4), 64)
    emb = (centres[label] + rng.standard_normal((256, 8))).astype(np.float32)
    perm = rng.permutation(256)
    return emb[perm], label[perm]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_tree_separates_gaussian_clusters(seed: int) -> None:
    emb, label = _gaussian_clusters(seed)
    tree = kmeans_tree(np.arange(256), emb, arity=2, seed=seed)
    purity = tree_purity(tree, label)
    assert purity[0] == 0.25
    assert purity[1] == 0.5  # two clusters per half
    assert np.all(purity[2:] == 1.0)  # each cluster is one subtree at level 2


def test_kmeans_tree_arity_four_separates_clusters_at_level_one() -> None:
    emb, label = _gaussian_clusters(5)
    purity = tree_purity(kmeans_tree(np.arange(256), emb, arity=4, seed=0), label)
    assert np.all(purity[1:] == 1.0)


def test_balanced_two_means_moves_the_points_of_weakest_preference() -> None:
    # 1-D: six points near c0 = 2.5, two near c1 = 10.5. Nearest-centroid would give 6 / 2;
    # balance needs 4 / 4. The right move takes the two points closest to the boundary (4, 5),
    # not those nearest the big centroid (2, 3; the x-deeplearning bug).
    values = np.array([0.0, 1, 2, 3, 4, 5, 10, 11], dtype=np.float32)
    perm = np.random.default_rng(0).permutation(8)
    y = values[perm][None, :, None]  # (S=1, L=8, D=1)
    centroids = np.array([[[2.5], [10.5]]], dtype=np.float32)
    labels = _assign_two(y, centroids, np.array([[4, 4]]), EMPTY_PADS)[0]
    assert sorted(values[perm][labels == 0].tolist()) == [0, 1, 2, 3]
    assert sorted(values[perm][labels == 1].tolist()) == [4, 5, 10, 11]
    # unbalanced the other way: the cluster at 10.5 is over-full and gives up 9 and 8
    values = np.array([0.0, 8, 9, 10, 11, 12, 13, 14], dtype=np.float32)
    y = values[perm][None, :, None]
    centroids = np.array([[[0.0], [11.0]]], dtype=np.float32)
    labels = _assign_two(y, centroids, np.array([[4, 4]]), EMPTY_PADS)[0]
    assert sorted(values[perm][labels == 0].tolist()) == [0, 8, 9, 10]


def _leaves_below(tree: Tree, node: int) -> np.ndarray:
    """Item ids of the leaves below ``node``."""
    anc = tree.ancestors(tree.leaf_nodes)
    return tree.leaf_items[anc[:, tree.level[node]] == node]


def test_kmeans_tree_splits_unbalanced_1d_set_at_the_boundary() -> None:
    values = np.array([0.0, 1, 2, 3, 4, 5, 10, 11], dtype=np.float32)  # item i has values[i]
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(8)
        tree = kmeans_tree(perm, values[perm, None], arity=2, seed=seed)
        halves = sorted(sorted(values[_leaves_below(tree, v)].tolist()) for v in (1, 2))
        assert halves == [[0, 1, 2, 3], [4, 5, 10, 11]]


def test_greedy_assignment_equals_exact_rule_for_two_clusters() -> None:
    rng = np.random.default_rng(0)
    y = rng.standard_normal((5, 40, 3)).astype(np.float32)
    centroids = rng.standard_normal((5, 2, 3)).astype(np.float32)
    cap = np.array([[20, 20], [21, 19], [1, 39], [39, 1], [20, 20]])
    exact = _assign_two(y, centroids, cap, EMPTY_PADS)
    greedy = _assign_greedy(y, centroids, cap, EMPTY_PADS)
    assert np.array_equal(exact, greedy)
    assert np.array_equal((exact == 0).sum(1), cap[:, 0])


def test_greedy_assignment_for_three_clusters_respects_capacity_and_preference() -> None:
    values = np.array([0.0, 1, 2, 3, 4, 5, 10, 11, 20], dtype=np.float32)
    perm = np.random.default_rng(1).permutation(9)
    y = values[perm][None, :, None]
    centroids = np.array([[[0.0], [10.0], [20.0]]], dtype=np.float32)
    labels = _assign_greedy(y, centroids, np.array([[3, 3, 3]]), EMPTY_PADS)[0]
    groups = [sorted(values[perm][labels == c].tolist()) for c in range(3)]
    # c0 keeps the points that would lose most elsewhere (0, 1, 2); 3 is the best of the rest
    # for c1; 4 and 5 fill c2
    assert groups == [[0, 1, 2], [3, 10, 11], [4, 5, 20]]
    # an assignment that is already balanced is left alone
    values = np.array([0.0, 1, 9, 10, 19, 21], dtype=np.float32)
    labels = _assign_greedy(values[None, :, None], centroids, np.array([[2, 2, 2]]), EMPTY_PADS)
    assert labels[0].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("arity", [2, 3])
def test_kmeans_tree_with_identical_embeddings_is_valid_and_deterministic(arity: int) -> None:
    emb = np.ones((50, 4), dtype=np.float32)
    emb[25:] = 2.0  # two blocks of identical points
    trees = [kmeans_tree(np.arange(50), emb, arity=arity, seed=7) for _ in range(2)]
    assert trees[0] == trees[1]
    _assert_balanced(trees[0])
    all_same = kmeans_tree(np.arange(33), np.zeros((33, 3), np.float32), arity=arity)
    assert np.array_equal(np.sort(all_same.leaf_items), np.arange(33))
    _assert_balanced(all_same)


def test_kmeans_tree_handles_wide_embeddings() -> None:
    emb = np.random.default_rng(0).standard_normal((300, 128)).astype(np.float64)
    tree = kmeans_tree(np.arange(300), emb, arity=2)
    _assert_balanced(tree)


def test_kmeans_seed_changes_the_tree() -> None:
    emb = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    assert not np.array_equal(kmeans_order(emb, seed=0), kmeans_order(emb, seed=1))


@pytest.mark.parametrize(
    ("items", "emb", "kwargs"),
    [
        (np.arange(3), np.zeros((4, 2)), {}),
        (np.array([1, 1, 2]), np.zeros((3, 2)), {}),
        (np.arange(3), np.array([[0.0], [np.nan], [1.0]]), {}),
        (np.arange(3), np.array([[0.0], [np.inf], [1.0]]), {}),
        (np.arange(3), np.zeros((3, 2)), {"arity": 1}),
        (np.arange(3), np.zeros((3, 2)), {"iters": 0}),
    ],
)
def test_kmeans_tree_rejects_bad_input(items, emb, kwargs) -> None:
    with pytest.raises(ValueError):
        kmeans_tree(items, emb, **kwargs)


def test_kmeans_tree_of_200k_items_puts_each_cluster_in_one_subtree() -> None:
    # 16 well-separated Gaussian blobs of 12,500 items: exactly the leaf count of a level-4
    # subtree of the balanced binary tree over 200,000 items
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, 24)).astype(np.float32) * 10.0
    label = rng.permutation(np.repeat(np.arange(16), 12_500))
    emb = centres[label] + rng.standard_normal((200_000, 24), dtype=np.float32)
    tree = kmeans_tree(np.arange(200_000), emb, arity=2, iters=5)
    assert tree.n_items == 200_000
    assert is_balanced(tree)
    purity = tree_purity(tree, label)
    # above level 4 a subtree holds 16 / 2^j whole blobs; from level 4 down, one blob each
    # (five 2-means iterations leave about 1% of the items astray here; a random tree: ~0.07)
    assert purity[:4] == pytest.approx([1 / 16, 1 / 8, 1 / 4, 1 / 2], abs=0.01)
    assert np.all(purity[4:] >= 0.98)


# ------------------------------------------------------------------------------------ reports
def test_item_order_from_tree_inverts_from_ordered_items() -> None:
    for arity in (2, 3, 5):
        for n in (1, 2, 6, 23, 100):
            items = _items(n)
            tree = Tree.from_ordered_items(items, arity)
            assert np.array_equal(item_order_from_tree(tree), items)


def test_subtree_leaf_counts_on_hand_drawn_tree() -> None:
    tree = Tree.from_ordered_items(np.arange(5), arity=2)  # see tests/test_tree.py
    assert subtree_leaf_counts(tree).tolist() == [5, 3, 2, 2, 1, 1, 1, 1, 1]


def test_is_balanced_rejects_unbalanced_trees() -> None:
    # leaf depths 1, 2, 3, 3
    deep = Tree(np.array([-1, 0, 0, 1, 1, 3, 3]), np.array([-1, -1, 0, -1, 1, 2, 3]))
    assert not is_balanced(deep)
    # leaf depths all 2, but the root's children hold 3 and 1 leaves
    lopsided = Tree(np.array([-1, 0, 0, 1, 1, 1, 2]), np.array([-1, -1, -1, 0, 1, 2, 3]))
    assert not is_balanced(lopsided)
    assert is_balanced(Tree.from_ordered_items(np.arange(4), 3))


def test_tree_purity_hand_computed() -> None:
    tree = Tree.from_ordered_items(np.arange(4), arity=2)
    cats = np.array([7, 7, 8, 9])
    assert tree_purity(tree, cats).tolist() == [0.5, 0.75, 1.0]
    # uneven leaf depths: {0,1,2} | {3,4}, then {0,1} 2 | 3 | 4, then 0 | 1
    tree = Tree.from_ordered_items(np.arange(5), arity=2)
    purity = tree_purity(tree, np.array([0, 0, 1, 1, 1]))
    assert purity == pytest.approx([0.6, (2 / 3 + 1) / 2, 1.0, 1.0])


def test_moved_fraction() -> None:
    base = Tree.from_ordered_items(np.arange(4), 2)  # parent groups {0,1} {2,3}
    assert moved_fraction(base, base) == 0.0
    # same groups, different sibling order and numbering
    assert moved_fraction(base, Tree.from_ordered_items(np.array([3, 2, 1, 0]), 2)) == 0.0
    # groups {0,2} {1,3}: each item keeps 1 of the 3 items of old | new group
    regrouped = Tree.from_ordered_items(np.array([0, 2, 1, 3]), 2)
    assert moved_fraction(base, regrouped) == pytest.approx(2 / 3)
    assert moved_fraction(base, regrouped, level=0) == 0.0
    assert moved_fraction(base, regrouped, level=2) == 0.0  # singleton leaves
    with pytest.raises(ValueError):
        moved_fraction(base, Tree.from_ordered_items(np.arange(1, 5), 2))


def test_moved_fraction_is_large_for_unrelated_trees() -> None:
    items = np.arange(4096)
    old = Tree.from_ordered_items(items, 2)
    new = Tree.from_ordered_items(np.random.default_rng(0).permutation(items), 2)
    assert moved_fraction(old, new) > 0.6
    assert moved_fraction(old, new, level=4) > 0.8
