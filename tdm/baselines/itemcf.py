"""Item-based collaborative filtering (Sarwar et al., WWW 2001), the paper's item-CF (Sec. 5.2).

Item-item cosine similarity of the binary user-item matrix X (users x items):
``sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|)`` with ``U_i`` the users who interacted with item
i, i.e. ``X^T X`` normalised. Each item (a *trigger*) keeps its ``neighbours`` most similar
items; a user's score for item i is the sum of ``sim(j, i)`` over the distinct triggers j of
their known history that have i among their neighbours. All sparse matrix products, no loop
over item pairs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from tdm.baselines import interactions, top_k_sparse, user_item_matrix

if TYPE_CHECKING:
    from tdm.data.protocol import Prepared

logger = logging.getLogger(__name__)


def cosine_similarity(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Column-column cosine similarity of a binary (U, n) matrix, zero diagonal.

    Returns:
        (n, n) float32 CSR with the non-zero similarities.
    """
    cooc = (matrix.T @ matrix).tocsr()  # (n, n) co-occurrence counts
    cooc.sum_duplicates()
    norm = np.sqrt(np.asarray(cooc.diagonal(), dtype=np.float64))  # (n,) sqrt |U_i|
    cooc.setdiag(0)
    cooc.eliminate_zeros()
    rows = np.repeat(np.arange(cooc.shape[0]), np.diff(cooc.indptr))
    cooc.data = (cooc.data / (norm[rows] * norm[cooc.indices])).astype(np.float32)
    return cooc


def keep_top_per_row(matrix: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """The ``n`` largest entries of every row (ties: smaller column), the rest dropped."""
    matrix = matrix.tocsr()
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    order = np.lexsort((matrix.indices, -matrix.data, rows))
    rank = np.arange(len(order)) - matrix.indptr[rows[order]]
    keep = order[rank < n]
    return sp.csr_matrix(
        (matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape
    )


class ItemCF:
    """Item-CF with top-N neighbours per item.

    Args:
        neighbours: N, the most similar items each item keeps (Sec. 5.2 tunes it).
        with_eval_history: also count co-occurrences in the validation and test users' known
            first halves (as the paper adds them to its baselines' training data).
    """

    def __init__(self, neighbours: int = 100, with_eval_history: bool = True) -> None:
        if neighbours < 1:
            raise ValueError("neighbours must be >= 1")
        self.neighbours = int(neighbours)
        self.with_eval_history = with_eval_history
        self.similarity: sp.csr_matrix | None = None

    def fit(self, data: Prepared, seed: int = 0) -> ItemCF:
        """Similarities from ``data``'s known behaviours (``seed`` is unused: deterministic)."""
        known = interactions(data, self.with_eval_history)
        matrix = user_item_matrix(known.offsets, known.items, data.n_items)  # (U, n)
        similarity = cosine_similarity(matrix)  # (n, n)
        self.similarity = keep_top_per_row(similarity, self.neighbours)  # row: trigger
        logger.info(
            "item-CF: %d similar pairs, %d kept (%d neighbours)",
            similarity.nnz,
            self.similarity.nnz,
            self.neighbours,
        )
        return self

    def score(self, split, rows: np.ndarray) -> sp.csr_matrix:
        """(B, n_items) sparse scores of ``split``'s users ``rows`` from their known history."""
        if self.similarity is None:
            raise RuntimeError("ItemCF.fit was not called")
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = split.hist_offsets[rows], split.hist_offsets[rows + 1]
        lengths = ends - starts
        index = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        items = split.hist_items[np.arange(int(lengths.sum())) + index]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        triggers = user_item_matrix(offsets, items, self.similarity.shape[0])  # (B, n)
        return (triggers @ self.similarity).tocsr()  # (B, n)

    def ranker(self):
        """A ranker for ``tdm.evaluation.evaluate_split``: items with a positive score only
        (the evaluator complements short lists by popularity)."""

        def rank(split, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]):
            return top_k_sparse(self.score(split, rows), k, exclude)

        return rank
