import numpy as np
import pytest

from tdm.metrics import (
    complement,
    csr_rows,
    excluded_items,
    filter_truth,
    layerwise_recall,
    precision_recall_f_novelty,
    recall_at_k,
)
from tdm.tree import Tree


def csr(rows):
    values = np.array([x for r in rows for x in r], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return values, offsets


def to_lists(values, offsets):
    return [values[offsets[u] : offsets[u + 1]].tolist() for u in range(len(offsets) - 1)]


# Three users, M = 3, items 0..9, category of item i = i // 2.
PRED = np.array([[1, 2, 3], [4, -1, -1], [5, 6, 7]])
TRUTH = csr([[2, 3, 4, 5], [4], [8]])
SEEN = csr([[1, 5], [], [5, 6, 7]])
CATEGORY = np.arange(10) // 2


def test_eq5_to_7_hand_computed():
    m = precision_recall_f_novelty(PRED, *TRUTH, *SEEN, M=3)
    # user 0: hits {2, 3}; user 1: hit {4} with a short list; user 2: no hit, nothing novel
    np.testing.assert_allclose(m["precision_per_user"], [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(m["recall_per_user"], [1 / 2, 1, 0])
    np.testing.assert_allclose(m["f_measure_per_user"], [4 / 7, 1 / 2, 0])
    np.testing.assert_allclose(m["novelty_per_user"], [2 / 3, 1 / 3, 0])
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f_measure"] == pytest.approx(5 / 14)
    assert m["novelty"] == pytest.approx(1 / 3)
    assert (m["n_users"], m["n_evaluated"], m["n_empty_truth"]) == (3, 3, 0)


def test_duplicates_count_once_and_only_first_m_columns():
    pred = np.array([[2, 2, 3, 4], [4, 4, 4, 4], [8, 0, 0, 0]])
    m = precision_recall_f_novelty(pred, *TRUTH, *SEEN, M=3)
    np.testing.assert_allclose(m["precision_per_user"], [2 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(m["recall_per_user"], [2 / 4, 1, 1])


def test_empty_truth_users_skipped_or_counted():
    truth = csr([[2], [], [8]])
    m = precision_recall_f_novelty(PRED, *truth, *SEEN, M=3)
    assert np.isnan(m["recall_per_user"][1]) and np.isnan(m["f_measure_per_user"][1])
    assert (m["n_evaluated"], m["n_empty_truth"]) == (2, 1)
    assert m["precision"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["recall"] == pytest.approx((1 + 0) / 2)
    assert m["novelty"] == pytest.approx((2 / 3 + 0) / 2)
    m = precision_recall_f_novelty(PRED, *truth, *SEEN, M=3, skip_empty_truth=False)
    assert m["n_evaluated"] == 3
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx((1 / 3 + 0 + 0) / 3)


def test_filter_truth_modes():
    assert to_lists(*filter_truth("none", *TRUTH, *SEEN)) == [[2, 3, 4, 5], [4], [8]]
    assert to_lists(*filter_truth("items", *TRUTH, *SEEN)) == [[2, 3, 4], [4], [8]]
    # user 0 saw categories {0, 2}: items 4 and 5 (category 2) go
    got = filter_truth("categories", *TRUTH, *SEEN, item_category=CATEGORY)
    assert to_lists(*got) == [[2, 3], [4], [8]]
    with pytest.raises(ValueError, match="item_category"):
        filter_truth("categories", *TRUTH, *SEEN)
    with pytest.raises(ValueError, match="filter mode"):
        filter_truth("brands", *TRUTH, *SEEN)


def test_excluded_items_modes():
    assert to_lists(*excluded_items("none", *SEEN, CATEGORY)) == [[], [], []]
    assert to_lists(*excluded_items("items", *SEEN, CATEGORY)) == [[1, 5], [], [5, 6, 7]]
    got = excluded_items("categories", *SEEN, CATEGORY)
    assert to_lists(*got) == [[0, 1, 4, 5], [], [4, 5, 6, 7]]


def test_complement_hand_computed():
    fallback = np.arange(9, -1, -1)  # 9, 8, ..., 0
    scores = np.array([[3.0, 2.0, 1.0], [5.0, -np.inf, -np.inf], [1.0, 0.5, 0.2]])
    items, sc = complement(PRED, *excluded_items("items", *SEEN), fallback, 3, scores=scores)
    assert items.tolist() == [[2, 3, 9], [4, 9, 8], [9, 8, 4]]
    np.testing.assert_array_equal(sc[0], [2.0, 1.0, -np.inf])
    np.testing.assert_array_equal(sc[1], [5.0, -np.inf, -np.inf])
    items, sc = complement(PRED, *excluded_items("categories", *SEEN, CATEGORY), fallback, 3)
    assert sc is None
    assert items.tolist() == [[2, 3, 9], [4, 9, 8], [9, 8, 3]]
    # nothing to exclude: the list is only cut to M
    items, _ = complement(np.array([[4, 3, 2, 1]]), *csr([[]]), fallback, 2)
    assert items.tolist() == [[4, 3]]


def test_complement_matches_reference_loop():
    rng = np.random.default_rng(0)
    n_users, n_items, width, M = 50, 30, 12, 8
    pred = rng.integers(-1, n_items, size=(n_users, width))
    excl = [sorted(rng.choice(n_items, rng.integers(0, 25), replace=False)) for _ in range(n_users)]
    fallback = rng.permutation(n_items)
    items, _ = complement(pred, *csr(excl), fallback, M)
    for u in range(n_users):
        kept = [x for x in dict.fromkeys(pred[u].tolist()) if x >= 0 and x not in excl[u]][:M]
        fill = [x for x in fallback.tolist() if x not in excl[u] and x not in kept]
        want = (kept + fill)[:M]
        want += [-1] * (M - len(want))
        assert items[u].tolist() == want


def test_layerwise_recall_on_a_tree():
    tree = Tree.from_ordered_items(np.arange(8), arity=2)  # levels: 1, 2, 4, 8 nodes
    truth = csr([[0, 1, 2], [7]])  # user 0: leaves 7, 8, 9; user 1: leaf 14
    ancestors = tree.ancestors(tree.item_to_leaf(truth[0]))
    level_nodes = [
        np.array([[0], [0]]),
        np.array([[1, -1], [1, -1]]),  # user 1's ancestor at level 1 is 2
        np.array([[3, 5], [5, 6]]),  # user 0's level-2 truth is {3, 4}
        np.array([[7, 9], [14, 13]]),
    ]
    got = layerwise_recall(level_nodes, truth[1], ancestors)
    np.testing.assert_allclose(got, [1.0, 0.5, 0.75, (2 / 3 + 1) / 2])
    got = layerwise_recall([None, level_nodes[1]], truth[1], ancestors)
    assert np.isnan(got[0]) and got[1] == pytest.approx(0.5)


def test_recall_at_k_lists():
    assert recall_at_k([[1, 2, 3], [4, 5]], [[3, 9], [5]], k=2) == pytest.approx(0.5)
    assert recall_at_k([[1, 2, 3], [4, 5], [1]], [[3, 9], [5], []], k=3) == pytest.approx(0.75)


def test_large_inputs_agree_with_a_per_user_reference():
    rng = np.random.default_rng(1)
    n_users, n_items, M = 2_000, 5_000, 50
    pred = rng.integers(0, n_items, size=(n_users, M))
    lengths = rng.integers(1, 60, size=n_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    truth = rng.integers(0, n_items, size=offsets[-1])
    seen = rng.integers(0, n_items, size=offsets[-1])
    got = precision_recall_f_novelty(pred, truth, offsets, seen, offsets, M=M)
    p, r, nov = [], [], []
    for u in range(n_users):
        P, G = set(pred[u].tolist()), set(truth[offsets[u] : offsets[u + 1]].tolist())
        S = set(seen[offsets[u] : offsets[u + 1]].tolist())
        p.append(len(P & G) / M)
        r.append(len(P & G) / len(G))
        nov.append(len(P - S) / M)
    assert got["precision"] == pytest.approx(np.mean(p))
    assert got["recall"] == pytest.approx(np.mean(r))
    assert got["novelty"] == pytest.approx(np.mean(nov))
    assert len(csr_rows(offsets)) == offsets[-1]
