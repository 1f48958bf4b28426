"""Most-popular: every user gets the items most often interacted with by the training users."""

from __future__ import annotations

import numpy as np


class MostPopular:
    """Ranks items by training popularity (ties by item index).

    Args:
        counts: (n_items,) behaviours per item index among the training users.
    """

    def __init__(self, counts: np.ndarray) -> None:
        self.order = np.lexsort((np.arange(len(counts)), -np.asarray(counts)))  # (n_items,)
        self.counts = np.asarray(counts)

    def ranker(self):
        """A ranker for ``tdm.evaluation.evaluate_split``: the top ``k`` items for every user
        (filtering and complementing happen there, from the same popularity order)."""

        def rank(split, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]):
            items = np.broadcast_to(self.order[:k], (len(rows), min(k, len(self.order))))
            return items.copy(), np.broadcast_to(self.counts[items], items.shape).astype(float)

        return rank
