"""retrieval.filter_beam (issue 14): a wider beam for queries with excluded items, so excluded
leaves do not crowd out the items left to recommend; 0 keeps today's beam exactly."""

import numpy as np
import pandas as pd
import pytest
import torch

from tdm.config import EvalConfig, RetrievalConfig
from tdm.data.protocol import EvalSplit, Prepared, TrainSplit
from tdm.evaluation import evaluate_split
from tdm.metrics import excluded_items
from tdm.recommender import Recommender
from tdm.retrieval import beam_search
from tdm.tree import Tree

torch.set_num_threads(1)


class NodeTable(torch.nn.Module):
    """The same logit for every user: ``logits[node]`` (looked up by embedding row)."""

    def __init__(self, tree: Tree, logits: np.ndarray):
        super().__init__()
        table = np.zeros(tree.n_nodes, dtype=np.float32)
        table[tree.embedding_rows()] = logits
        self.table = torch.nn.Parameter(torch.as_tensor(table), requires_grad=False)

    def user_state(self, hist, windows):
        return torch.zeros(hist.shape[0], dtype=torch.long, device=hist.device)  # (B,)

    def score(self, state, node_rows):
        return self.table[node_rows]  # (B, N)

    def forward(self, hist, windows, node_rows):
        return self.score(self.user_state(hist, windows), node_rows)


def recommender(tree: Tree, logits: np.ndarray, filter_beam: int = 0) -> Recommender:
    n = tree.n_items
    items = pd.DataFrame(
        {
            "item_index": np.arange(n),
            "item_id": np.arange(n) + 100,
            "category_id": np.arange(n),  # one category per item: categories == items mode
            "train_count": np.arange(n)[::-1],
        }
    )
    meta = {"max_history": 5, "window_bounds": [10, 100], "time_windows": 3}
    return Recommender(NodeTable(tree, logits), tree, items, meta, "cpu", filter_beam=filter_beam)


def crowded() -> tuple[Tree, np.ndarray]:
    """8 items under a binary tree whose best-scored subtrees hold the seen items 0, 1, 2.

    Level 1: n1 (items 0-3) 5, n2 (items 4-7) 4; level 2: n3 (0, 1) 5, n4 (2, 3) 4, n5 (4, 5)
    3, n6 (6, 7) 2; leaves (items 0..7) 9, 8, 7, 1, 2, 3, 6, 0. With 0, 1, 2 excluded, a beam of
    2 keeps n4 and n5 (n3 has nothing left) and finds items 5 and 4; a beam of 3 also keeps n6
    and finds item 6, the best item left.
    """
    tree = Tree.from_ordered_items(np.arange(8), arity=2)
    assert tree.level_sizes.tolist() == [1, 2, 4, 8]
    logits = np.array([0, 5, 4, 5, 4, 3, 2, 9, 8, 7, 1, 2, 3, 6, 0], dtype=np.float32)
    assert tree.node_item[7:].tolist() == list(range(8))
    return tree, logits


def one_user_split(truth: list[int]) -> EvalSplit:
    return EvalSplit(
        users=np.array([1]),
        hist_items=np.array([0, 1, 2]),
        hist_times=np.array([1, 2, 3]),
        hist_offsets=np.array([0, 3]),
        truth_items=np.array(truth),
        truth_offsets=np.array([0, len(truth)]),
    )


def prepared(rec: Recommender, split: EvalSplit) -> Prepared:
    empty = TrainSplit(*(np.zeros(n, dtype=np.int64) for n in (0, 0, 0, 1)))
    return Prepared(items=rec.items, train=empty, valid=split, test=split, meta=rec.meta)


def test_a_wider_filtering_beam_finds_the_better_items_left():
    tree, logits = crowded()
    split = one_user_split([6])
    cfg = EvalConfig(topk=2, filters=["none", "items", "categories"])
    recall = {}
    for filter_beam in (0, 3):
        rec = recommender(tree, logits)
        retrieval = RetrievalConfig(beam_size=2, filter_beam=filter_beam)
        report = evaluate_split(rec.ranker(retrieval), prepared(rec, split), split, cfg)
        recall[filter_beam] = {mode: report[mode]["recall"] for mode in cfg.filters}
        # the ranker itself: items 5, 4 with today's beam, 6 and 5 with the wider one
        excl = excluded_items("items", split.hist_items, split.hist_offsets, np.arange(8), 8)
        items, _ = rec.ranker(retrieval)(split, np.array([0]), 2, excl)
        assert items[0, :2].tolist() == ([5, 4] if filter_beam == 0 else [6, 5])
    assert recall[0] == {"none": 0.0, "items": 0.0, "categories": 0.0}
    assert recall[3] == {"none": 0.0, "items": 1.0, "categories": 1.0}  # unfiltered: unchanged


def test_recommend_with_exclude_seen_uses_the_filtering_beam():
    tree, logits = crowded()
    history = [(100, 1), (101, 2), (102, 3)]  # items 0, 1, 2
    today = recommender(tree, logits).recommend(history, k=2, exclude_seen=True)
    wide = recommender(tree, logits, filter_beam=3).recommend(history, k=2, exclude_seen=True)
    assert today[0].tolist() == [105, 104] and wide[0].tolist() == [106, 105]
    for filter_beam in (0, 3):  # without exclusions the filtering beam plays no part
        kept = recommender(tree, logits, filter_beam).recommend(history, k=2, exclude_seen=False)
        assert kept[0].tolist() == [100, 101]
    assert recommender(tree, logits, filter_beam=1).filtering_width(2) == 2  # at least k


@pytest.mark.parametrize("filter_beam", [0, 7])
def test_zero_is_todays_beam_and_a_users_result_ignores_the_other_users(filter_beam):
    rng = np.random.default_rng(0)
    tree = Tree.from_ordered_items(rng.permutation(60), arity=3)
    rec = recommender(tree, rng.standard_normal(tree.n_nodes).astype(np.float32))
    n_users = 9
    lengths = rng.integers(0, 4, n_users)  # some users have nothing excluded
    offsets = np.r_[0, np.cumsum(lengths)]
    excluded = rng.integers(0, 60, offsets[-1])
    split = EvalSplit(
        users=np.arange(n_users),
        hist_items=excluded,
        hist_times=np.arange(len(excluded)),
        hist_offsets=offsets,
        truth_items=np.zeros(n_users, dtype=np.int64),
        truth_offsets=np.arange(n_users + 1),
    )
    retrieval = RetrievalConfig(beam_size=4, filter_beam=filter_beam)
    rows = np.arange(n_users)
    items, scores = rec.ranker(retrieval)(split, rows, 3, (excluded, offsets))
    if filter_beam == 0:  # exactly the single beam search of before
        from tdm.data.features import eval_batch

        hist, windows = eval_batch(split, rows, rec.max_history, rec.window_bounds)
        expected = beam_search(
            rec.model, tree, hist, windows, 4, exclude=(excluded, offsets), batch_size=256
        )
        np.testing.assert_array_equal(items, expected[0])
        np.testing.assert_array_equal(scores, expected[1])
        return
    assert items.shape == (n_users, filter_beam)
    for u in rows:  # alone, each user gets the same answer as in the batch
        alone = (excluded[offsets[u] : offsets[u + 1]], np.array([0, lengths[u]]))
        alone_items, _ = rec.ranker(retrieval)(split, np.array([u]), 3, alone)
        width = filter_beam if lengths[u] else 4
        np.testing.assert_array_equal(items[u, :width], alone_items[0, :width])
        assert np.all(items[u, width:] == -1)
