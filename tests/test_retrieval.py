import time
import tracemalloc
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdm.metrics import complement, csr_rows, layerwise_recall
from tdm.retrieval import SearchStats, beam_search, brute_force, tree_tensors
from tdm.tree import Tree


class TableScorer(torch.nn.Module):
    """Scorer whose user state is the user index (hist[:, 0]) and whose logits are a table.

    Args:
        node_table: (U, n_nodes) logits per user and node.
        tree: the tree, to map embedding rows back to nodes.
    """

    def __init__(self, node_table: np.ndarray, tree: Tree):
        super().__init__()
        rows = tree.embedding_rows()
        table = np.zeros((node_table.shape[0], tree.n_nodes), dtype=np.float32)
        table[:, rows] = node_table
        self.table = torch.nn.Parameter(torch.as_tensor(table), requires_grad=False)
        self.state_calls: list[int] = []

    def user_state(self, hist, windows):
        self.state_calls.append(hist.shape[0])
        return hist[:, 0]  # (B,)

    def score(self, state, node_rows):
        return self.table[state.unsqueeze(1), node_rows]  # (B, N)

    def forward(self, hist, windows, node_rows):
        return self.score(self.user_state(hist, windows), node_rows)


def inputs(n_users):
    hist = np.stack([np.arange(n_users), -np.ones(n_users, dtype=np.int64)], 1)  # (U, 2)
    return hist, np.zeros_like(hist)


def max_heap(tree: Tree, n_users: int, seed: int) -> np.ndarray:
    """(U, n_nodes): random leaf values, each inner node the max over its subtree (Eq. 2)."""
    rng = np.random.default_rng(seed)
    values = np.full((n_users, tree.n_nodes), -np.inf)
    values[:, tree.is_leaf] = rng.standard_normal((n_users, int(tree.is_leaf.sum())))
    for v in range(tree.n_nodes - 1, 0, -1):
        p = tree.parent[v]
        values[:, p] = np.maximum(values[:, p], values[:, v])
    return values


def expected_top(leaf_scores: np.ndarray, tree: Tree, k: int):
    """Brute-force reference: (U, n_nodes) scores -> top-k item ids and scores.

    k is capped at the number of items, as retrieval does; -inf scores keep their item id.
    """
    k = min(k, tree.n_items)
    leaves = tree.leaf_nodes
    order = np.argsort(-leaf_scores[:, leaves], axis=1, kind="stable")[:, :k]
    items = tree.node_item[leaves][order]
    scores = np.take_along_axis(leaf_scores[:, leaves], order, 1)
    pad = k - items.shape[1]
    items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
    scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return items, scores


def uneven_tree() -> Tree:
    """Leaves at depths 1 to 4; level 1 has 3 nodes."""
    parent = [-1, 0, 0, 0, 2, 2, 3, 3, 5, 5, 6, 6, 10, 10]
    node_item = [-1, 0, -1, -1, 1, -1, -1, 2, 3, 4, -1, 5, 6, 7]
    return Tree(np.array(parent), np.array(node_item))


def random_tree(seed: int, max_depth: int = 5) -> Tree:
    """Random BFS tree: nodes become leaves at random, fan-out 1..4."""
    rng = np.random.default_rng(seed)
    parent, leaf = [-1], [False]
    frontier, level = [0], 0
    while frontier:
        level += 1
        nxt = []
        for v in frontier:
            if leaf[v]:
                continue
            for _ in range(rng.integers(1, 5)):
                parent.append(v)
                leaf.append(level == max_depth or rng.random() < 0.3)
                nxt.append(len(parent) - 1)
        frontier = nxt
    has_child = np.bincount(np.array(parent[1:]), minlength=len(parent)) > 0
    leaf = ~has_child
    node_item = np.full(len(parent), -1)
    node_item[leaf] = rng.permutation(int(leaf.sum()))
    return Tree(np.array(parent), node_item)


TREES = {
    "binary_13": lambda: Tree.from_ordered_items(np.random.default_rng(0).permutation(13), 2),
    "ternary_20": lambda: Tree.from_ordered_items(np.random.default_rng(1).permutation(20), 3),
    "uneven": uneven_tree,
    "random_a": lambda: random_tree(2),
    "random_b": lambda: random_tree(3),
}


@pytest.mark.parametrize("name", sorted(TREES))
@pytest.mark.parametrize("k", [1, 2, 3, 5, 40])
def test_beam_search_equals_brute_force_on_max_heap(name, k):
    tree = TREES[name]()
    n_users = 7
    values = max_heap(tree, n_users, seed=k)
    model = TableScorer(values, tree)
    hist, windows = inputs(n_users)
    items, scores, stats = beam_search(model, tree, hist, windows, k, batch_size=3, with_stats=True)
    want_items, want_scores = expected_top(values, tree, k)
    assert items.shape == (n_users, min(k, tree.n_items))  # k = 40 > every tree's items
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_allclose(scores, want_scores.astype(np.float32))
    bf_items, bf_scores = brute_force(model, tree, hist, windows, k, node_chunk=4)
    np.testing.assert_array_equal(bf_items, want_items)
    np.testing.assert_allclose(bf_scores, want_scores.astype(np.float32))
    assert stats.max_nodes_scored <= k * tree.max_arity * tree.depth
    assert stats.max_nodes_scored <= tree.n_nodes - 1  # the root is never scored
    assert stats.nodes_scored == stats.nodes_scored_per_user.sum()
    assert stats.max_nodes_scored == stats.nodes_scored_per_user.max()


def test_algorithm_1_by_hand_leaves_do_not_take_beam_slots():
    tree = uneven_tree()
    # node:      0  1  2  3  4  5   6  7  8   9  10  11 12 13 (items: 1->0, 4->1, 7->2, 8->3,
    node_logit = [0, 5, 1, 0, 3, 2, -1, 6, 4, 10, -2, -3, 7, 8]  # 9->4, 11->5, 12->6, 13->7)
    model = TableScorer(np.array([node_logit], dtype=float), tree)
    items, scores, stats = beam_search(model, tree, *inputs(1), 1, with_stats=True)
    # level 1: leaf 1 goes to A, beam {2}; level 2: leaf 4 to A, beam {5}; level 3: leaves 8, 9
    assert items.tolist() == [[4]] and scores.tolist() == [[10.0]]
    assert stats.nodes_scored == 3 + 2 + 2 and stats.nodes_scored_per_user.tolist() == [7]
    items, scores = beam_search(model, tree, *inputs(1), 2)
    assert items.tolist() == [[4, 7]] and scores.tolist() == [[10.0, 8.0]]
    # with k=1 the subtree of node 3 (items 2, 6, 7) is pruned: item 7 (8.0) is never seen
    items, _ = beam_search(model, tree, *inputs(1), 3)
    assert items.tolist() == [[4, 7, 6]]


def test_nodes_scored_within_paper_bound():
    tree = Tree.from_ordered_items(np.arange(1024), 2)  # complete binary, depth 10
    values = max_heap(tree, 4, seed=0)
    *_, stats = beam_search(TableScorer(values, tree), tree, *inputs(4), k=8, with_stats=True)
    assert stats.max_nodes_scored <= 2 * 8 * tree.depth  # Sec. 3.3: at most 2k log|C|
    # levels 1-3 hold 2, 4 and 8 <= k inner nodes: all kept whatever their scores, not scored
    assert stats.nodes_scored_per_user.tolist() == [16 * (tree.depth - 3)] * 4
    assert stats.score_calls == tree.depth - 3 and stats.user_state_calls == 1
    # the HS ranking needs every level's scores (a node's rank is its path's)
    *_, stats = beam_search(
        TableScorer(values, tree), tree, *inputs(4), k=8, ranking="path", with_stats=True
    )
    assert stats.score_calls == tree.depth
    *_, stats = brute_force(
        TableScorer(values, tree), tree, *inputs(4), 8, node_chunk=100, with_stats=True
    )
    assert stats.nodes_scored_per_user.tolist() == [1024] * 4
    assert stats.score_calls == 11 and stats.user_state_calls == 1  # ceil(1024 / 100) chunks


@pytest.mark.parametrize("name", ["binary_13", "uneven", "random_a"])
def test_path_ranking_equals_exhaustive_product_of_probabilities(name):
    tree = TREES[name]()
    rng = np.random.default_rng(5)
    n_users = 5
    logits = rng.standard_normal((n_users, tree.n_nodes)) * 2
    model = TableScorer(logits, tree)
    k = int(tree.level_sizes.max())  # exhaustive beam
    items, scores = beam_search(model, tree, *inputs(n_users), k, ranking="path")
    # Sec. 5.4: rank by the product of P(y=1) over the node and its ancestors below the root
    log_p = F.logsigmoid(torch.as_tensor(logits)).numpy()
    anc = tree.ancestors(np.arange(tree.n_nodes))[:, 1:]  # (n_nodes, depth)
    path = np.where(anc >= 0, log_p[:, np.maximum(anc, 0)], 0.0).sum(-1)  # (U, n_nodes)
    want_items, want_scores = expected_top(path, tree, k)
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    # the node ranking with an exhaustive beam is brute force over the leaves' own logits
    items, _ = beam_search(model, tree, *inputs(n_users), k, ranking="node")
    np.testing.assert_array_equal(items, expected_top(logits, tree, k)[0])


@pytest.mark.parametrize("dense", [False, True])
def test_exclude_removes_items_and_still_fills_k(dense):
    tree = TREES["ternary_20"]()
    n_users, n_items = 6, tree.n_items
    values = max_heap(tree, n_users, seed=9)
    model = TableScorer(values, tree)
    rng = np.random.default_rng(0)
    excl = [np.sort(rng.choice(n_items, size=u * 2, replace=False)) for u in range(n_users)]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in excl])])
    if dense:
        exclude = np.zeros((n_users, n_items), dtype=bool)
        exclude[csr_rows(offsets), np.concatenate(excl)] = True
    else:
        exclude = (np.concatenate(excl), offsets)
    # exhaustive beam: exactly the top k of the items that remain
    k = int(tree.level_sizes.max())
    items, _ = beam_search(model, tree, *inputs(n_users), k, exclude=exclude)
    masked = values.copy()
    for u in range(n_users):
        masked[u, tree.item_to_leaf(excl[u])] = -np.inf
    want = expected_top(masked, tree, k)[0]
    want[np.isneginf(expected_top(masked, tree, k)[1])] = -1
    np.testing.assert_array_equal(items, want)
    bf_items, _ = brute_force(model, tree, *inputs(n_users), k, exclude=exclude)
    np.testing.assert_array_equal(bf_items, want)
    # a narrow beam: never an excluded item, and still k valid ones
    items, scores = beam_search(model, tree, *inputs(n_users), 4, exclude=exclude)
    for u in range(n_users):
        assert not set(items[u].tolist()) & set(excl[u].tolist())
    assert (items >= 0).all() and np.isfinite(scores).all()


def test_excluding_everything_pads():
    tree = uneven_tree()
    model = TableScorer(max_heap(tree, 2, 0), tree)
    exclude = np.ones((2, tree.n_items), dtype=bool)
    items, scores = beam_search(model, tree, *inputs(2), 3, exclude=exclude)
    assert (items == -1).all() and np.isneginf(scores).all()


def _peak_rss_since_reset() -> int | None:
    """Linux: the process's peak resident memory (bytes) since ``_reset_peak_rss``; else None."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def test_k_beyond_the_corpus_returns_every_item_without_allocating_k_columns():
    tree = TREES["binary_13"]()
    n_users, k = 7, 10**7  # k columns would be 7 * 10**7 * 12 bytes per result, levels on top
    values = max_heap(tree, n_users, seed=4)
    model = TableScorer(values, tree)
    beam_search(model, tree, *inputs(n_users), 2)  # warm up lazy initialisation
    rss_reset = _reset_peak_rss()
    rss_before = _peak_rss_since_reset()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        items, scores, levels, stats = beam_search(
            model, tree, *inputs(n_users), k, return_levels=True, with_stats=True
        )
        bf_items, bf_scores = brute_force(model, tree, *inputs(n_users), k)
        level_ids, _ = brute_force(model, tree, *inputs(n_users), k, level=2)
        host_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    assert seconds < 2.0 and host_peak < 1 << 20  # numpy results: n_items columns, not k
    if rss_reset and rss_before is not None:  # torch's buffers too
        assert _peak_rss_since_reset() - rss_before < 64 << 20
    assert items.shape == scores.shape == bf_items.shape == (n_users, tree.n_items)
    assert all(level.shape == (n_users, tree.n_items) for level in levels)
    want_items, want_scores = expected_top(values, tree, tree.n_items)  # every item, best first
    np.testing.assert_array_equal(items, want_items)  # a max-heap: the beam finds them all
    np.testing.assert_array_equal(bf_items, want_items)
    np.testing.assert_allclose(scores, want_scores.astype(np.float32))
    np.testing.assert_array_equal(scores, bf_scores)
    assert (items >= 0).all() and np.isfinite(scores).all()  # no padding without exclude
    # a level with fewer nodes than columns is padded; beam and brute force agree on it
    assert (levels[2][:, 4:] == -1).all() and (levels[2][:, :4] >= 0).all()
    np.testing.assert_array_equal(levels[2], level_ids)
    assert isinstance(stats, SearchStats) and stats.max_nodes_scored == tree.n_nodes - 1
    # complement (Sec. 5.3) takes the narrower lists and fills M from the fallback order
    seen = (np.array([want_items[0, 0]]), np.array([0, 1] + [1] * (n_users - 1)))
    fill, _ = complement(items, *seen, np.arange(tree.n_items), 15, scores=scores)
    n = tree.n_items
    assert fill.shape == (n_users, 15) and (fill[0, n - 1 :] == -1).all()  # the corpus ran out
    np.testing.assert_array_equal(fill[0, : n - 1], want_items[0, 1:])
    np.testing.assert_array_equal(fill[1:, :n], want_items[1:])
    assert (fill[1:, n:] == -1).all()


def test_exclude_pads_only_where_items_run_out():
    tree = TREES["binary_13"]()
    values = max_heap(tree, 2, seed=6)
    model = TableScorer(values, tree)
    exclude = np.zeros((2, tree.n_items), dtype=bool)
    exclude[0, :5] = True  # user 0: 8 items left of 13
    items, scores = beam_search(model, tree, *inputs(2), 100, exclude=exclude)
    assert items.shape == (2, tree.n_items)
    assert (items[0, :8] >= 0).all() and (items[0, 8:] == -1).all()
    assert np.isneginf(scores[0, 8:]).all() and set(items[0, :8].tolist()) == set(range(5, 13))
    assert (items[1] >= 0).all()
    bf_items, _ = brute_force(model, tree, *inputs(2), 100, exclude=exclude)
    np.testing.assert_array_equal(bf_items, items)


def test_single_item_tree():
    tree = Tree(np.array([-1]), np.array([0]))
    model = TableScorer(np.array([[0.5], [-1.0]]), tree)
    items, scores, levels = beam_search(model, tree, *inputs(2), 2, return_levels=True)
    assert items.tolist() == [[0], [0]]  # k is capped at the one item
    np.testing.assert_allclose(scores[:, 0], [0.5, -1.0])
    assert len(levels) == 1 and levels[0].tolist() == [[0], [0]]


def test_user_state_once_per_batch_and_mode_restored():
    tree = TREES["binary_13"]()
    model = TableScorer(max_heap(tree, 10, 0), tree)
    model.train()
    beam_search(model, tree, *inputs(10), 3, batch_size=4)
    assert model.state_calls == [4, 4, 2]
    assert model.training
    model.state_calls.clear()
    brute_force(model, tree, *inputs(10), 3, batch_size=4, node_chunk=5)
    assert model.state_calls == [4, 4, 2]


def test_return_levels_are_the_top_k_of_each_level():
    tree = Tree.from_ordered_items(np.random.default_rng(4).permutation(32), 2)
    n_users, k = 6, 3
    values = max_heap(tree, n_users, seed=1)
    model = TableScorer(values, tree)
    items, _, levels = beam_search(model, tree, *inputs(n_users), k, return_levels=True)
    assert len(levels) == tree.depth + 1
    assert (levels[0][:, 0] == 0).all() and (levels[0][:, 1:] == -1).all()
    level_1 = levels[1]  # only 2 nodes at level 1: padded
    assert (np.sort(level_1[:, :2], 1) == [1, 2]).all() and (level_1[:, 2] == -1).all()
    for j in range(1, tree.depth + 1):
        want, _ = brute_force(model, tree, *inputs(n_users), k, level=j)
        np.testing.assert_array_equal(levels[j], want)
    np.testing.assert_array_equal(tree.node_item[levels[-1]], items)
    # Fig. 4: the ground truth (here the best leaf) traced back is recalled at every level
    truth = items[:, 0]
    recall = layerwise_recall(
        levels, np.arange(n_users + 1), tree.ancestors(tree.item_to_leaf(truth))
    )
    np.testing.assert_allclose(recall, 1.0)


def test_torch_inputs_and_tree_cache():
    tree = TREES["binary_13"]()
    model = TableScorer(max_heap(tree, 3, 0), tree)
    hist, windows = inputs(3)
    a = beam_search(model, tree, torch.as_tensor(hist), torch.as_tensor(windows), 2)
    b = beam_search(model, tree, hist, windows, 2)
    np.testing.assert_array_equal(a[0], b[0])
    assert tree_tensors(tree, "cpu") is tree_tensors(tree, "cpu")
    with pytest.raises(ValueError, match="ranking"):
        beam_search(model, tree, hist, windows, 2, ranking="softmax")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_beam_search_on_cuda_matches_cpu():
    tree = random_tree(7)
    values = max_heap(tree, 16, seed=3)
    model = TableScorer(values, tree)
    hist, windows = inputs(16)
    excl = (np.array([0, 1, 2]), np.array([0, 3] + [3] * 15))
    cpu = beam_search(model, tree, hist, windows, 4, exclude=excl, ranking="path")
    gpu = beam_search(model.cuda(), tree, hist, windows, 4, exclude=excl, ranking="path")
    np.testing.assert_array_equal(cpu[0], gpu[0])
    np.testing.assert_allclose(cpu[1], gpu[1], rtol=1e-5)
    np.testing.assert_array_equal(
        brute_force(model, tree, hist, windows, 4)[0], expected_top(values, tree, 4)[0]
    )


def test_fully_excluded_subtrees_take_no_beam_slot():
    # Filtering interacted categories removes whole subtrees of a category tree: the beam must
    # spend its k slots on subtrees that still hold items, or it returns far fewer than k.
    tree = Tree.from_ordered_items(np.arange(16), 2)
    n_users = 20
    values = max_heap(tree, n_users, seed=3)
    level2 = np.arange(tree.level_offsets[2], tree.level_offsets[3])
    rows, items = [], []
    for u in range(n_users):
        best = level2[np.argmax(values[u, level2])]  # the most attractive quarter of the tree
        leaves = [v for v in tree.leaf_nodes if tree.ancestors(np.array([v]))[0, 2] == best]
        items.append(np.sort(tree.node_item[leaves]))
        rows.append(u)
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in items])])
    exclude = (np.concatenate(items), offsets)
    got, _ = beam_search(TableScorer(values, tree), tree, *inputs(n_users), 2, exclude=exclude)
    masked = values.copy()
    for u in range(n_users):
        masked[u, tree.item_to_leaf(items[u])] = -np.inf
    np.testing.assert_array_equal(got, expected_top(masked, tree, 2)[0])


class TupleStateScorer(TableScorer):
    """TableScorer whose state is a tuple (as AttentionDNN's), to exercise state slicing."""

    def user_state(self, hist, windows):
        user = super().user_state(hist, windows)
        return user, user.float().unsqueeze(1)  # (B,), (B, 1)

    def score(self, state, node_rows):
        user, copy = state
        assert torch.equal(user.float(), copy[:, 0])  # both sliced to the same users
        return super().score(user, node_rows)


class PartsState(NamedTuple):
    user: torch.Tensor
    copy: torch.Tensor
    extra: torch.Tensor | None = None


class NamedTupleStateScorer(TableScorer):
    """TableScorer whose state is a NamedTuple with an absent (None) part, as AttentionDNN's."""

    def user_state(self, hist, windows):
        user = super().user_state(hist, windows)
        return PartsState(user, user.float().unsqueeze(1))  # (B,), (B, 1), None

    def score(self, state, node_rows):
        assert isinstance(state, PartsState) and state.extra is None  # kept through slicing
        assert torch.equal(state.user.float(), state.copy[:, 0])
        return super().score(state.user, node_rows)


@pytest.mark.parametrize("scorer", [TableScorer, TupleStateScorer, NamedTupleStateScorer])
def test_cache_sized_score_chunks_change_nothing(scorer, monkeypatch):
    tree = TREES["random_a"]()
    n_users, k = 9, 5
    values = max_heap(tree, n_users, seed=11)
    want = beam_search(scorer(values, tree), tree, *inputs(n_users), k, ranking="path")
    monkeypatch.setattr("tdm.retrieval.CPU_SCORE_PAIRS", 7)  # a few users per score call
    got = beam_search(
        scorer(values, tree), tree, *inputs(n_users), k, ranking="path", with_stats=True
    )
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    stats = got[2]
    assert stats.score_calls > tree.depth and stats.user_state_calls == 1
    top = beam_search(scorer(values, tree), tree, *inputs(n_users), k)[0]
    np.testing.assert_array_equal(top, expected_top(values, tree, k)[0])
