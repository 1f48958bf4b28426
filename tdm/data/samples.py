"""Training samples derived from the prepared data: the trainer's sample source (``tdm.train``)
and the sequence baselines' (FM, YouTube product-DNN)."""

from __future__ import annotations

import numpy as np

from tdm.data.features import train_batch
from tdm.data.protocol import Prepared, TrainSplit, training_positions


class TrainSamples:
    """Training samples derived from the prepared CSR sequences (the trainer's sample source).

    Every position with at least ``min_history`` earlier behaviours of its user is a sample; its
    features are the at most ``max_history`` behaviours before it, split into time windows.
    """

    def __init__(
        self,
        data: Prepared,
        max_history: int,
        min_history: int,
        with_eval_history: bool = False,
    ) -> None:
        self.split = data.train
        if with_eval_history:  # the known first halves of the evaluation users join training
            evals = (data.valid, data.test)
            self.split = TrainSplit(
                users=np.concatenate([data.train.users, *(e.users for e in evals)]),
                items=np.concatenate([data.train.items, *(e.hist_items for e in evals)]),
                times=np.concatenate([data.train.times, *(e.hist_times for e in evals)]),
                offsets=_concat_offsets([data.train.offsets, *(e.hist_offsets for e in evals)]),
            )
        self.max_history = max_history
        self.window_bounds = data.window_bounds
        self.positions = training_positions(self.split, min_history)
        self.n_samples = len(self.positions)
        offsets = self.split.offsets
        self.users = np.searchsorted(offsets, self.positions, side="right") - 1  # (n_samples,)
        starts = offsets[:-1][self.users]
        self.lengths = np.minimum(self.positions - starts, max_history)  # (n_samples,)

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histories (right-aligned) trimmed to the longest one in the batch."""
        hist, windows, targets = train_batch(
            self.split, self.positions[index], self.max_history, self.window_bounds
        )
        width = max(int(self.lengths[index].max()), 1)
        return hist[:, -width:], windows[:, -width:], targets


def _concat_offsets(parts: list[np.ndarray]) -> np.ndarray:
    """CSR offsets of the concatenation of several CSR arrays."""
    out, base = [np.zeros(1, dtype=np.int64)], 0
    for offsets in parts:
        out.append(offsets[1:] + base)
        base += offsets[-1]
    return np.concatenate(out)
