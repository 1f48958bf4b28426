"""The paper's evaluation protocol (Sec. 5.2-5.4) for any ranker: TDM, baselines, variants.

A *ranker* is ``rank(split, rows, k, exclude) -> (items (B, K), scores (B, K))``: the top
``K <= k`` item indices for the evaluation users ``rows`` of ``split`` (fewer columns than ``k``
when the corpus is smaller, as ``tdm.retrieval`` returns), padded with -1, leaving out the
per-user ``exclude`` CSR (a ranker may ignore it: filtering and complementing back to M happen
here anyway). TDM's ranker (``tdm.recommender.Recommender.ranker``) widens its beam for the
users with excluded items (``retrieval.filter_beam``), so excluded leaves do not crowd out the
items left to recommend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from tdm.config import Config, EvalConfig
from tdm.metrics import (
    complement,
    csr_slice,
    excluded_items,
    filter_truth,
    layerwise_recall,
    precision_recall_f_novelty,
)

if TYPE_CHECKING:  # annotations only: importing them here would load pandas/pyarrow and torch
    from tdm.data.protocol import EvalSplit, Prepared
    from tdm.recommender import Recommender


class Ranker(Protocol):
    """What ``evaluate_split`` calls (see the module docstring)."""

    def __call__(
        self, split: EvalSplit, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]: ...


EVAL_BATCH = 1024


def evaluate_split(
    ranker: Ranker,
    data: Prepared,
    split: EvalSplit,
    cfg: EvalConfig,
    batch_size: int = EVAL_BATCH,
    per_user: bool = False,
) -> dict:
    """Precision, Recall, F-Measure and Novelty @M (Eq. 5-7) for every filter mode (Sec. 5.3).

    Args:
        ranker: see the module docstring.
        data: the prepared data (``tdm.data.protocol.load_prepared``).
        split: its ``valid`` or ``test`` split.
        cfg: the ``eval`` section (``topk`` = M, ``filters``).
        per_user: also return each user's precision and recall (NaN recall: empty truth).
    Returns:
        ``{mode: {"precision", "recall", "f_measure", "novelty", "n_evaluated"}}``, with
        (U,) arrays ``precision_per_user`` and ``recall_per_user`` when ``per_user``.
    """
    item_category = data.items["category_id"].to_numpy()
    n_items = len(item_category)
    popular = np.lexsort((np.arange(n_items), -data.items["train_count"].to_numpy()))
    seen = (split.hist_items, split.hist_offsets)
    truth = (split.truth_items, split.truth_offsets)
    n_users = len(split.hist_offsets) - 1
    M = cfg.topk
    out = {}
    for mode in cfg.filters:
        preds = []
        for start in range(0, n_users, batch_size):
            rows = np.arange(start, min(start + batch_size, n_users))
            seen_b = csr_slice(*seen, start, rows[-1] + 1)
            excl = excluded_items(mode, *seen_b, item_category, n_items)
            items, scores = ranker(split, rows, M, excl)
            items = np.asarray(items)
            pred, _ = complement(items, *excl, popular, M)
            preds.append(pred)
        pred = np.concatenate(preds)
        truth_f = filter_truth(mode, *truth, *seen, item_category)
        m = precision_recall_f_novelty(pred, *truth_f, *seen, M)
        out[mode] = {
            "precision": m["precision"],
            "recall": m["recall"],
            "f_measure": m["f_measure"],
            "novelty": m["novelty"],
            "n_evaluated": m["n_evaluated"],
        }
        if per_user:
            out[mode]["precision_per_user"] = m["precision_per_user"]
            out[mode]["recall_per_user"] = m["recall_per_user"]
    return out


def layerwise_report(rec: Recommender, split: EvalSplit, cfg: Config) -> dict:
    """Layer-wise Recall@k of beam search vs brute force per level (Sec. 5.4, Fig. 4).

    The ground truth is traced back to each level's ancestors; at level j, beam search's top k
    (Algorithm 1) and brute force's top k over all nodes of the level are compared with it.
    """
    from tdm.data.features import eval_batch
    from tdm.retrieval import beam_search, brute_force

    tree = rec.tree
    k = max(cfg.eval.topk, cfg.retrieval.beam_size)
    rows = np.arange(len(split.hist_offsets) - 1)
    hist, windows = eval_batch(split, rows, rec.max_history, rec.window_bounds, rec.window_mode)
    _, _, levels = beam_search(
        rec.model,
        tree,
        hist,
        windows,
        k,
        device=rec.device,
        return_levels=True,
        batch_size=cfg.retrieval.batch_size,
    )
    brute = [None] + [
        brute_force(rec.model, tree, hist, windows, k, level=j, device=rec.device)[0]
        for j in range(1, tree.depth + 1)
    ]
    ancestors = tree.ancestors(tree.item_to_leaf(split.truth_items))
    beam_levels = [None] + [levels[j] for j in range(1, tree.depth + 1)]
    beam_recall = layerwise_recall(beam_levels, split.truth_offsets, ancestors)
    brute_recall = layerwise_recall(brute, split.truth_offsets, ancestors)
    return {
        "k": k,
        "level": list(range(1, tree.depth + 1)),
        "level_size": tree.level_sizes[1:].tolist(),
        "beam": [round(float(x), 6) for x in beam_recall[1:]],
        "brute_force": [round(float(x), 6) for x in brute_recall[1:]],
    }
