"""User features: the most recent behaviours before a point in time, with their time windows.

The model sees a user as their last ``max_len`` behaviours (item indices) right-aligned in a
fixed-width row, each tagged with the time window its age falls into (paper Sec. 3.4, Fig. 2:
behaviours are divided into time windows along the timeline). All functions are numpy in, numpy
out, vectorised over the batch.

A behaviour's *age* depends on ``data.window_mode`` (recorded in the prepared meta as
``window_mode``; every feature path -- training batches, evaluation batches,
``Recommender.recommend`` and serving -- goes through :func:`make_history` with it):

- ``target_time``: seconds from the row's reference time ``now`` -- the target's time for a
  training sample, the last known behaviour for an evaluation user, the request time for a
  recommendation. Training and evaluation measure from different points, so the most recent
  behaviour of a training sample is often not in window 0 (the original behaviour, kept for
  comparison).
- ``last_behaviour``: seconds from the row's own most recent behaviour, in training,
  evaluation and recommendation alike: the most recent behaviour is always age 0 (window 0).
- ``position``: the behaviour's rank from the most recent (0 = most recent), with fixed
  position bounds (``tdm.data.protocol.position_window_bounds``), by default the public TDM
  code's groups of 20, 20, 10, 10, 2, 2, 2, 1, 1, 1 of the last 69 behaviours (oldest first).

The window of an age is ``searchsorted(window_bounds, age, side="right")``: 0 is the most recent
window; ``window_bounds`` holds seconds (time modes) or positions (``position``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tdm.data.protocol import EvalSplit, Prepared, TrainSplit

logger = logging.getLogger(__name__)

WINDOW_MODES = ("target_time", "last_behaviour", "position")
DEFAULT_WINDOW_MODE = "target_time"


def window_mode_of(meta: dict) -> str:
    """The ``window_mode`` of a prepared (or model folder's) meta; ``target_time`` when the meta
    predates the setting (such data was prepared and trained that way)."""
    mode = meta.get("window_mode", DEFAULT_WINDOW_MODE)
    if mode not in WINDOW_MODES:
        raise ValueError(f"window_mode {mode!r} is not one of {', '.join(WINDOW_MODES)}")
    return mode


def history_ages(
    times: np.ndarray,
    index: np.ndarray,
    ends: np.ndarray,
    now: np.ndarray | None,
    window_mode: str = DEFAULT_WINDOW_MODE,
) -> np.ndarray:
    """Ages of the behaviours ``index`` of each row, as ``window_mode`` measures them.

    Args:
        times: (N,) timestamps of all behaviours.
        index: (B, L) behaviour indices (``history_index``; padding entries give junk ages).
        ends: (B,) one past each row's most recent behaviour.
        now: (B,) each row's reference time (``target_time`` only; may be None otherwise).
        window_mode: see the module docstring.

    Returns:
        (B, L) int64 ages: seconds (``target_time``, ``last_behaviour``) or positions from the
        most recent behaviour (``position``).
    """
    ends = np.asarray(ends, dtype=np.int64)
    if window_mode == "target_time":
        return np.asarray(now, dtype=np.int64)[:, None] - np.asarray(times)[index]  # (B, L)
    if window_mode == "last_behaviour":
        if len(times) == 0:
            return np.zeros(index.shape, dtype=np.int64)
        last = np.asarray(times)[np.maximum(ends - 1, 0)]  # (B,) the row's most recent time
        return last.astype(np.int64)[:, None] - np.asarray(times)[index]  # (B, L)
    if window_mode == "position":
        return (ends[:, None] - 1 - index).astype(np.int64)  # (B, L) 0 = most recent
    raise ValueError(f"window_mode {window_mode!r} is not one of {', '.join(WINDOW_MODES)}")


def history_index(
    starts: np.ndarray, ends: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the last ``max_len`` behaviours of each range, right-aligned.

    Args:
        starts: (B,) first index of each row's behaviours.
        ends: (B,) one past the last index (the behaviours are ``[starts[b], ends[b])``).
        max_len: L, the width of the result.

    Returns:
        index: (B, L) int64, ``index[b, c] = ends[b] - L + c`` where valid, 0 on padding.
        valid: (B, L) bool, True where ``index[b, c] >= max(starts[b], ends[b] - L)``.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    index = ends[:, None] - max_len + np.arange(max_len, dtype=np.int64)[None, :]  # (B, L)
    valid = index >= starts[:, None]  # (B, L)
    index[~valid] = 0
    return index, valid


def make_history(
    items: np.ndarray,
    times: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    now: np.ndarray,
    max_len: int,
    window_bounds: Sequence[int] | np.ndarray,
    window_mode: str = DEFAULT_WINDOW_MODE,
) -> tuple[np.ndarray, np.ndarray]:
    """The behaviours ``items[max(starts[b], ends[b] - max_len):ends[b]]`` of each row b.

    Right-aligned (oldest first, most recent last), left-padded with -1. The time window of a
    behaviour j is ``searchsorted(window_bounds, age_j, side="right")``: 0 is the most recent
    window; an age equal to a bound falls in the older window. The age is ``now[b] - times[j]``
    (``target_time``), ``times[ends[b] - 1] - times[j]`` (``last_behaviour``: ``now`` unused) or
    ``ends[b] - 1 - j`` (``position``: ``now`` and ``times`` unused).

    Args:
        items: (N,) item indices of all behaviours (CSR values).
        times: (N,) their timestamps in seconds.
        starts: (B,) first behaviour of each row.
        ends: (B,) one past the last behaviour of each row.
        now: (B,) the time each row's ages are measured from (``target_time`` only).
        max_len: L, the number of columns.
        window_bounds: (W-1,) increasing age boundaries (seconds, or positions for
            ``position``).
        window_mode: ``target_time`` | ``last_behaviour`` | ``position`` (module docstring).

    Returns:
        hist: (B, L) int64 item indices, -1 on padding.
        windows: (B, L) int64 window of each behaviour, -1 on padding.
    """
    index, valid = history_index(starts, ends, max_len)  # (B, L)
    bounds = np.asarray(window_bounds, dtype=np.int64)
    if len(items) == 0:
        empty = np.full(index.shape, -1, dtype=np.int64)
        return empty, empty.copy()
    hist = np.where(valid, np.asarray(items)[index], -1).astype(np.int64, copy=False)
    age = history_ages(times, index, ends, now, window_mode)  # (B, L)
    windows = np.where(valid, np.searchsorted(bounds, age, side="right"), -1).astype(np.int64)
    return hist, windows


def user_of_positions(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(B,) CSR row (user) of each behaviour position, given (U+1,) ``offsets``."""
    return np.searchsorted(offsets, positions, side="right") - 1


def train_batch(
    prepared: Prepared | TrainSplit,
    positions: np.ndarray,
    max_len: int | None = None,
    window_bounds: Sequence[int] | np.ndarray | None = None,
    window_mode: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features and targets of training samples (DESIGN.md "Prepared data").

    The sample at position p has target ``items[p]`` and as features the at most ``max_len``
    behaviours of the same user before p; ages are measured from the target's time ``times[p]``
    (``target_time``), from the sample's own last history behaviour ``times[p-1]``
    (``last_behaviour``), or are positions (``position``).

    Args:
        prepared: a :class:`~tdm.data.protocol.Prepared` (``max_len`` and ``window_bounds``
            default to its meta) or its ``train`` split.
        positions: (B,) sample positions, e.g. from :func:`tdm.data.protocol.training_positions`.
        max_len: L; default ``meta["max_history"]``.
        window_bounds: (W-1,); default ``meta["window_bounds"]``.
        window_mode: default the meta's (:func:`window_mode_of`), ``target_time`` without one.

    Returns:
        hist: (B, L) int64, windows: (B, L) int64 (as :func:`make_history`), targets: (B,) int64
        item indices.
    """
    train, max_len, window_bounds = _resolve(prepared, max_len, window_bounds, "train")
    if window_mode is None:
        meta = getattr(prepared, "meta", None)
        window_mode = DEFAULT_WINDOW_MODE if meta is None else window_mode_of(meta)
    positions = np.asarray(positions, dtype=np.int64)
    rows = user_of_positions(train.offsets, positions)
    hist, windows = make_history(
        train.items,
        train.times,
        train.offsets[rows],
        positions,
        train.times[positions],
        max_len,
        window_bounds,
        window_mode,
    )
    return hist, windows, train.items[positions].astype(np.int64, copy=False)


def eval_batch(
    split: EvalSplit,
    user_rows: np.ndarray,
    max_len: int,
    window_bounds: Sequence[int] | np.ndarray,
    window_mode: str = DEFAULT_WINDOW_MODE,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of evaluation users from their known history (the first half, Sec. 5.1).

    Ages are measured from the time of each user's last known behaviour (both time modes
    agree here), or are positions (``position``).

    Args:
        split: a validation or test split.
        user_rows: (B,) rows of ``split.users``.
        max_len: L.
        window_bounds: (W-1,).
        window_mode: the prepared data's (``window_mode_of(meta)``).

    Returns:
        hist: (B, L) int64, windows: (B, L) int64, as :func:`make_history`.
    """
    user_rows = np.asarray(user_rows, dtype=np.int64)
    starts = split.hist_offsets[user_rows]
    ends = split.hist_offsets[user_rows + 1]
    if len(split.hist_times):
        now = np.where(ends > starts, split.hist_times[np.maximum(ends - 1, 0)], 0)
    else:
        now = np.zeros(len(user_rows), dtype=np.int64)
    return make_history(
        split.hist_items, split.hist_times, starts, ends, now, max_len, window_bounds, window_mode
    )


def _resolve(
    prepared: Prepared | TrainSplit,
    max_len: int | None,
    window_bounds: Sequence[int] | np.ndarray | None,
    split: str,
) -> tuple[TrainSplit, int, Sequence[int] | np.ndarray]:
    meta = getattr(prepared, "meta", None)
    data = getattr(prepared, split) if meta is not None else prepared
    if max_len is None:
        if meta is None:
            raise ValueError("max_len is required when no Prepared meta is given")
        max_len = int(meta["max_history"])
    if window_bounds is None:
        if meta is None:
            raise ValueError("window_bounds is required when no Prepared meta is given")
        window_bounds = meta["window_bounds"]
    return data, max_len, window_bounds
