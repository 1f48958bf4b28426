"""Training samples derived from the prepared data: the trainer's sample source (``tdm.train``)
and the sequence baselines' (FM, YouTube product-DNN)."""

from __future__ import annotations

import numpy as np

from tdm.data.features import train_batch, window_mode_of
from tdm.data.protocol import Prepared, TrainSplit, training_positions


class TrainSamples:
    """Training samples derived from the prepared CSR sequences (the trainer's sample source).

    Every position with at least ``min_history`` earlier behaviours of its user is a sample; its
    features are the at most ``max_history`` behaviours before it, split into time windows as
    the prepared data's ``window_mode`` says (``tdm.data.features``).
    Per sample it keeps three numpy arrays in the narrowest integer type that holds them
    (``positions``, ``users``, ``lengths``: 4 + 4 + 2 bytes a sample up to 2^31 rows), never a
    Python object: 100M samples take ~1 GB.
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
        self.window_mode = window_mode_of(data.meta)
        positions = training_positions(self.split, min_history)
        self.n_samples = len(positions)
        offsets = self.split.offsets
        users = np.searchsorted(offsets, positions, side="right") - 1  # (n_samples,)
        lengths = np.minimum(positions - offsets[:-1][users], max_history)  # (n_samples,)
        self.positions = _narrow(positions, len(self.split.items))
        self.users = _narrow(users, len(offsets))
        self.lengths = _narrow(lengths, max_history + 1)

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histories (right-aligned) trimmed to the longest one in the batch."""
        hist, windows, targets = train_batch(
            self.split,
            self.positions[index],
            self.max_history,
            self.window_bounds,
            self.window_mode,
        )
        width = max(int(self.lengths[index].max()), 1)
        return hist[:, -width:], windows[:, -width:], targets


def _narrow(values: np.ndarray, bound: int) -> np.ndarray:
    """``values`` (all in ``[0, bound)``) as int16, int32 or int64, the narrowest that fits."""
    for dtype in (np.int16, np.int32):
        if bound <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)


def _concat_offsets(parts: list[np.ndarray]) -> np.ndarray:
    """CSR offsets of the concatenation of several CSR arrays."""
    out, base = [np.zeros(1, dtype=np.int64)], 0
    for offsets in parts:
        out.append(offsets[1:] + base)
        base += offsets[-1]
    return np.concatenate(out)
