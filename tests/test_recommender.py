"""``Recommender.to_index``: raw item ids to item indices, dense table or sorted search."""

import numpy as np
import pandas as pd
import pytest
import torch

from tdm.recommender import Recommender
from tdm.tree import Tree


def recommender(item_ids: np.ndarray) -> Recommender:
    n = len(item_ids)
    items = pd.DataFrame(
        {"item_index": np.arange(n), "item_id": item_ids, "category_id": np.zeros(n, np.int64),
         "train_count": np.ones(n, np.int64)}
    )  # fmt: skip
    tree = Tree.from_ordered_items(np.arange(n), arity=2)
    meta = {"max_history": 5, "window_bounds": [10, 100], "time_windows": 3}
    return Recommender(torch.nn.Linear(1, 1), tree, items, meta, "cpu")


@pytest.mark.parametrize("spread", [3, 10**9])  # a dense id table; ids too sparse for one
def test_to_index_finds_every_id_and_marks_unknown_ones(spread):
    rng = np.random.default_rng(0)
    ids = rng.permutation(500) * spread + 1
    rec = recommender(ids)
    assert (rec._id_table is not None) == (spread == 3)
    queries = np.concatenate([ids, [0, -5, ids.max() + 1, 2, 10**12], ids[:7]])
    got = rec.to_index(queries)
    want = np.concatenate([np.arange(500), [-1] * 5, np.arange(7)])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(rec.to_ids(got[:500]), ids)
