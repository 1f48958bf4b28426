"""The evaluation protocol of paper Sec. 5.1 and the prepared-data files (DESIGN.md).

``prepare`` turns a behaviour table into the ``prepare`` stage's output directory:

1. users with fewer than ``min_user_behaviors`` behaviours are dropped;
2. ``n_test_users`` test users and ``n_valid_users`` validation users are drawn at random
   (seeded by ``cfg.seed``), disjoint; every other user is a training user;
3. the corpus is every item left in the data (so every ground-truth item has a leaf), with dense
   item indices in sorted ``item_id`` order;
4. each user's behaviours are sorted by timestamp (stable: ties keep the input row order); an
   evaluation user's first ``floor(n / 2)`` behaviours are the known history and the rest the
   ground truth; training users keep their whole sequence;
5. the time-window boundaries are quantiles of the ages the training samples see, measured as
   ``data.window_mode`` measures them (``tdm.data.features``), or fixed position bounds for
   ``position`` (:func:`position_window_bounds`).

Everything stays CSR in flat int64 arrays: no (samples, history) matrix is ever built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tdm.config import DataConfig
from tdm.data.features import history_ages, history_index
from tdm.data.schema import DataError, check_table
from tdm.io import IntegrityError, atomic_dir, recover_dir, verify_manifest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WINDOW_SAMPLE = 20_000
TRAIN_KEYS = ("users", "items", "times", "offsets")
EVAL_KEYS = ("users", "hist_items", "hist_times", "hist_offsets", "truth_items", "truth_offsets")
ITEM_COLUMNS = ("item_index", "item_id", "category_id", "train_count")


@dataclass(frozen=True)
class TrainSplit:
    """Training users' behaviours in CSR form, sorted by (user, timestamp).

    Attributes:
        users: (U,) int64 raw user ids, ascending.
        items: (N,) int64 item indices.
        times: (N,) int64 timestamps.
        offsets: (U+1,) int64; user u's behaviours are ``[offsets[u], offsets[u+1])``.
    """

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    offsets: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class EvalSplit:
    """Validation or test users: known history and ground truth, both CSR, in time order.

    Attributes:
        users: (U,) int64 raw user ids, ascending.
        hist_items, hist_times: (H,) int64 the first ``floor(n/2)`` behaviours of each user.
        hist_offsets: (U+1,) int64.
        truth_items: (T,) int64 the latter half, in time order (an item may repeat).
        truth_offsets: (U+1,) int64.
    """

    users: np.ndarray
    hist_items: np.ndarray
    hist_times: np.ndarray
    hist_offsets: np.ndarray
    truth_items: np.ndarray
    truth_offsets: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.users)

    def truth_of(self, row: int) -> np.ndarray:
        """Ground-truth item indices of user row ``row``."""
        return self.truth_items[self.truth_offsets[row] : self.truth_offsets[row + 1]]


@dataclass(frozen=True)
class Prepared:
    """The contents of a prepared-data directory.

    Attributes:
        items: the ``items.parquet`` frame (item_index, item_id, category_id, train_count).
        train: training users.
        valid: validation users.
        test: test users.
        meta: ``meta.json``.
    """

    items: pd.DataFrame
    train: TrainSplit
    valid: EvalSplit
    test: EvalSplit
    meta: dict[str, Any]

    @property
    def n_items(self) -> int:
        return int(self.meta["n_items"])

    @property
    def window_bounds(self) -> np.ndarray:
        """(W-1,) int64 age boundaries in seconds."""
        return np.asarray(self.meta["window_bounds"], dtype=np.int64)

    def split(self, name: str) -> EvalSplit:
        """The ``"valid"`` or ``"test"`` split."""
        if name not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {name!r}")
        return self.valid if name == "valid" else self.test


def n_samples(train: TrainSplit, min_history: int) -> int:
    """Number of training samples: positions with at least ``min_history`` earlier behaviours."""
    counts = np.diff(train.offsets)
    return int(np.maximum(counts - min_history, 0).sum())


def training_positions(
    train: TrainSplit, min_history: int, sample_index: np.ndarray | None = None
) -> np.ndarray:
    """Positions ``p`` of the training samples (DESIGN.md "Prepared data").

    A sample is every position with at least ``min_history`` earlier behaviours of the same user;
    its target is ``train.items[p]``. Samples are numbered user by user in time order.

    Args:
        train: the training split.
        min_history: the least number of earlier behaviours.
        sample_index: (B,) optional sample numbers in ``[0, n_samples)``; without it all samples.

    Returns:
        (B,) or (S,) int64 positions into ``train.items``.
    """
    min_history = max(int(min_history), 0)
    starts = train.offsets[:-1] + min_history
    per_user = np.maximum(np.diff(train.offsets) - min_history, 0)
    first_sample = np.concatenate([[0], np.cumsum(per_user)])  # (U+1,)
    if sample_index is None:
        users = np.repeat(np.arange(len(per_user)), per_user)
        return np.arange(first_sample[-1], dtype=np.int64) - first_sample[users] + starts[users]
    sample_index = np.asarray(sample_index, dtype=np.int64)
    users = np.searchsorted(first_sample, sample_index, side="right") - 1
    return sample_index - first_sample[users] + starts[users]


sample_positions = training_positions


def window_bounds_from_ages(ages: np.ndarray, n_windows: int) -> list[int]:
    """W-1 strictly increasing integer age boundaries splitting ``ages`` into equal-mass windows.

    Window i holds ages in ``[bound[i-1], bound[i])`` (the window of an age is
    ``searchsorted(bounds, age, side="right")``). Bound k is the k/W quantile, rounded up to a
    whole second; then each bound is raised to at least 1 s and to at least the previous bound
    + 1 s.
    When ages collapse (MovieLens users often rate many movies within the same second or
    minute, so a large share of ages are 0 or tiny), several quantiles coincide and the nudged
    bounds sit one second apart: those windows are (nearly) empty and the model effectively sees
    fewer windows, but the list keeps its W-1 length and the order of the windows stays meaningful.
    With no ages at all, the bounds are 1 h, 2 h, 4 h, ...

    Args:
        ages: (M,) non-negative ages in seconds.
        n_windows: W.

    Returns:
        The W-1 bounds.
    """
    if n_windows <= 1:
        return []
    if len(ages) == 0:
        logger.warning("no training ages to derive window bounds from; using 1 h * 2^k")
        return [3600 * 2**k for k in range(n_windows - 1)]
    quantiles = np.quantile(ages.astype(np.float64), np.arange(1, n_windows) / n_windows)
    bounds = np.ceil(quantiles).astype(np.int64)
    previous = 0
    for k in range(len(bounds)):
        bounds[k] = max(bounds[k], previous + 1)
        previous = bounds[k]
    n_distinct = len(np.unique(np.ceil(quantiles)))
    if n_distinct < n_windows - 1:
        logger.warning(
            "time windows: only %d distinct age quantiles for %d bounds (many equal ages); "
            "the nudged windows are nearly empty",
            n_distinct,
            n_windows - 1,
        )
    return [int(b) for b in bounds]


# The public TDM code's position windows (UserBehavior, 69 behaviours): groups of 20, 20, 10, 10,
# 2, 2, 2, 1, 1, 1 from the oldest, i.e. cumulative counts from the most recent behaviour:
POSITION_PROFILE = (0, 1, 2, 3, 5, 7, 9, 19, 29, 49, 69)


def position_window_bounds(max_history: int, n_windows: int) -> list[int]:
    """W-1 strictly increasing position bounds for ``data.window_mode = position``.

    A behaviour's position is its rank from the most recent (0 = the most recent); its window is
    ``searchsorted(bounds, position, side="right")``. Rule: the public TDM code's split of 69
    behaviours into 10 windows (:data:`POSITION_PROFILE`: 1, 1, 1, 2, 2, 2, 10, 10, 20, 20 from
    the most recent) as a piecewise-linear curve F from the share of windows (k/10) to the share
    of positions covered; bound k = round(max_history * F(k / W)), raised to at least the
    previous bound + 1 (so every window holds at least one position; with W > max_history the
    oldest windows stay empty). At max_history = 69, W = 10 it is the public split exactly:
    [1, 2, 3, 5, 7, 9, 19, 29, 49].

    Args:
        max_history: L, behaviours in a history.
        n_windows: W.

    Returns:
        The W-1 bounds.
    """
    if n_windows <= 1:
        return []
    profile = np.asarray(POSITION_PROFILE, dtype=np.float64)
    grid = np.linspace(0.0, 1.0, len(profile))  # share of windows
    share = np.interp(np.arange(1, n_windows) / n_windows, grid, profile / profile[-1])
    bounds = np.floor(max_history * share + 0.5).astype(np.int64)
    previous = 0
    for k in range(len(bounds)):
        bounds[k] = max(bounds[k], previous + 1)
        previous = bounds[k]
    return [int(b) for b in bounds]


def prepare(df: pd.DataFrame, cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """Split ``df`` by the paper's protocol and write ``out_dir`` atomically.

    Writes ``items.parquet``, ``train.npz``, ``valid.npz``, ``test.npz`` and ``meta.json``
    (DESIGN.md "Prepared data") into a temporary folder next to ``out_dir``, then renames it over
    ``out_dir``: a failure leaves a previous ``out_dir`` intact.

    Args:
        df: a canonical behaviour table (any row order).
        cfg: the ``data`` section (min_user_behaviors, n_test_users, n_valid_users, max_history,
            min_history, time_windows, seed).
        out_dir: the output folder.

    Returns:
        The ``meta.json`` contents (read the arrays back with :func:`load_prepared`).

    Raises:
        DataError: a bad table, or too few users for the requested evaluation users.
    """
    check_table(df, "behaviour table")
    rng = np.random.default_rng(cfg.seed)

    # Drop users with too few behaviours (Sec. 5.1).
    user_codes, user_ids = pd.factorize(df["user_id"].to_numpy(), sort=True)
    counts = np.bincount(user_codes, minlength=len(user_ids))
    keep_user = counts >= cfg.min_user_behaviors
    keep = keep_user[user_codes]
    dropped = int((~keep_user).sum())
    remap = np.cumsum(keep_user) - 1
    users = remap[user_codes[keep]]
    del user_codes
    user_ids = np.asarray(user_ids)[keep_user].astype(np.int64)
    n_users = len(user_ids)
    item_raw = df["item_id"].to_numpy()[keep]
    category_raw = df["category_id"].to_numpy()[keep].astype(np.int64)
    times = df["timestamp"].to_numpy()[keep].astype(np.int64)
    del keep
    logger.info(
        "prepare: %d users kept, %d dropped (< %d behaviours), %d behaviours",
        n_users,
        dropped,
        cfg.min_user_behaviors,
        len(users),
    )
    if n_users < cfg.n_test_users + cfg.n_valid_users + 1:
        raise DataError(
            f"{n_users} users with >= {cfg.min_user_behaviors} behaviours: too few for "
            f"{cfg.n_test_users} test + {cfg.n_valid_users} validation users and a training set",
            "behaviour table",
        )

    # Items: every item left, dense indices in sorted item_id order.
    item_index, item_ids = pd.factorize(item_raw, sort=True)
    del item_raw
    item_ids = np.asarray(item_ids).astype(np.int64)
    n_items = len(item_ids)
    item_category = _item_categories(item_index, category_raw, n_items)
    del category_raw

    # Sort by (user, timestamp), stable so equal timestamps keep the input order.
    order = _user_time_order(users, times)
    users = users[order]
    items = item_index[order].astype(np.int64)
    times = times[order]
    del order, item_index
    offsets = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=n_users))])

    # Random disjoint test and validation users; the rest train.
    role = np.zeros(n_users, dtype=np.int8)  # 0 train, 1 valid, 2 test
    chosen = rng.permutation(n_users)[: cfg.n_test_users + cfg.n_valid_users]
    role[chosen[: cfg.n_test_users]] = 2
    role[chosen[cfg.n_test_users :]] = 1
    row_role = role[users]
    del users

    train = _train_split(role == 0, row_role == 0, user_ids, offsets, items, times)
    valid = _eval_split(role == 1, row_role == 1, user_ids, offsets, items, times)
    test = _eval_split(role == 2, row_role == 2, user_ids, offsets, items, times)
    del row_role, items, times

    train_count = np.bincount(train.items, minlength=n_items).astype(np.int64)
    items_frame = pd.DataFrame(
        {
            "item_index": np.arange(n_items, dtype=np.int64),
            "item_id": item_ids,
            "category_id": item_category,
            "train_count": train_count,
        },
        columns=list(ITEM_COLUMNS),
    )
    total_samples = n_samples(train, cfg.min_history)
    if cfg.window_mode == "position":
        bounds = position_window_bounds(cfg.max_history, cfg.time_windows)
    else:
        bounds = window_bounds_from_ages(
            _sample_ages(
                train, cfg.min_history, cfg.max_history, total_samples, rng, cfg.window_mode
            ),
            cfg.time_windows,
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "n_items": n_items,
        "n_train_users": train.n_users,
        "n_valid_users": valid.n_users,
        "n_test_users": test.n_users,
        "max_history": cfg.max_history,
        "time_windows": cfg.time_windows,
        "window_mode": cfg.window_mode,
        "window_bounds": bounds,
        "data": dataclasses.asdict(cfg),
        "n_users": n_users,
        "n_dropped_users": dropped,
        "n_behaviors": int(offsets[-1]),
        "n_train_behaviors": len(train.items),
        "n_train_samples": total_samples,
        "n_categories": int(len(np.unique(item_category))),
    }
    logger.info(
        "prepare: %d items, %d/%d/%d train/valid/test users, %d training samples, windows %s",
        n_items,
        train.n_users,
        valid.n_users,
        test.n_users,
        total_samples,
        bounds,
    )
    prepared = Prepared(items=items_frame, train=train, valid=valid, test=test, meta=meta)
    _write_atomic(prepared, Path(out_dir))
    return meta


def _user_time_order(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Stable argsort by (user, time), through one int64 key when it cannot overflow."""
    if len(times) == 0:
        return np.zeros(0, dtype=np.int64)
    t_min, t_max = int(times.min()), int(times.max())
    span = t_max - t_min + 1
    if (int(users.max()) + 1) * span < 2**62:
        key = users.astype(np.int64) * span + (times - t_min)
        return np.argsort(key, kind="stable")
    return np.lexsort((times, users))


def _item_categories(item_index: np.ndarray, categories: np.ndarray, n_items: int) -> np.ndarray:
    """Category of each item: its most frequent category (ties: smallest id) if it has several."""
    first = np.empty(n_items, dtype=np.int64)
    first[item_index] = categories  # one of each item's categories; all of them if consistent
    mismatch = categories != first[item_index]
    if not mismatch.any():
        return first
    odd = np.unique(item_index[mismatch])
    rows = np.isin(item_index, odd)
    pairs = pd.DataFrame({"item": item_index[rows], "category": categories[rows]})
    counted = pairs.value_counts().reset_index(name="n")
    counted = counted.sort_values(["item", "n", "category"], ascending=[True, False, True])
    best = counted.drop_duplicates("item")
    first[best["item"].to_numpy()] = best["category"].to_numpy()
    logger.warning("%d items have more than one category; each keeps its most frequent", len(odd))
    return first


def _train_split(
    user_mask: np.ndarray,
    row_mask: np.ndarray,
    user_ids: np.ndarray,
    offsets: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
) -> TrainSplit:
    counts = np.diff(offsets)[user_mask]
    return TrainSplit(
        users=user_ids[user_mask],
        items=items[row_mask],
        times=times[row_mask],
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )


def _eval_split(
    user_mask: np.ndarray,
    row_mask: np.ndarray,
    user_ids: np.ndarray,
    offsets: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
) -> EvalSplit:
    counts = np.diff(offsets)[user_mask]
    hist_counts = counts // 2  # Sec. 5.1: the first half along the timeline is known
    split_offsets = np.concatenate([[0], np.cumsum(counts)])
    rows = np.flatnonzero(row_mask)
    position = np.arange(len(rows)) - np.repeat(split_offsets[:-1], counts)
    is_hist = position < np.repeat(hist_counts, counts)
    return EvalSplit(
        users=user_ids[user_mask],
        hist_items=items[rows[is_hist]],
        hist_times=times[rows[is_hist]],
        hist_offsets=np.concatenate([[0], np.cumsum(hist_counts)]).astype(np.int64),
        truth_items=items[rows[~is_hist]],
        truth_offsets=np.concatenate([[0], np.cumsum(counts - hist_counts)]).astype(np.int64),
    )


def _sample_ages(
    train: TrainSplit,
    min_history: int,
    max_history: int,
    total_samples: int,
    rng: np.random.Generator,
    window_mode: str = "target_time",
) -> np.ndarray:
    """Ages over the history pairs of sampled training samples, as ``window_mode`` measures
    them (``tdm.data.features.history_ages``): from the target's time (``target_time``) or from
    the sample's own last history behaviour (``last_behaviour``)."""
    if total_samples == 0:
        return np.zeros(0, dtype=np.int64)
    size = min(WINDOW_SAMPLE, total_samples)
    picked = np.sort(rng.choice(total_samples, size=size, replace=False))
    positions = training_positions(train, min_history, picked)
    rows = np.searchsorted(train.offsets, positions, side="right") - 1
    index, valid = history_index(train.offsets[rows], positions, max_history)  # (B, L)
    ages = history_ages(train.times, index, positions, train.times[positions], window_mode)
    return ages[valid]


def _write_atomic(prepared: Prepared, out_dir: Path) -> None:
    """Write the files, with their manifest, into a temporary sibling of ``out_dir`` and swap it
    into place (``tdm.io.atomic_dir``)."""
    with atomic_dir(out_dir, manifest=True) as tmp:
        pq.write_table(
            pa.Table.from_pandas(prepared.items, preserve_index=False), tmp / "items.parquet"
        )
        _save_npz(tmp / "train.npz", {k: getattr(prepared.train, k) for k in TRAIN_KEYS})
        for name in ("valid", "test"):
            split = prepared.split(name)
            _save_npz(tmp / f"{name}.npz", {k: getattr(split, k) for k in EVAL_KEYS})
        (tmp / "meta.json").write_text(json.dumps(prepared.meta, indent=2) + "\n")
    logger.info("prepare: wrote %s", out_dir)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **{k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()})


def load_prepared(path: str | Path) -> Prepared:
    """Read a directory written by :func:`prepare`.

    Args:
        path: the prepared-data folder.

    Returns:
        The :class:`Prepared` data (arrays fully loaded, int64).

    Raises:
        DataError: naming the file when one is missing or lacks an array.
    """
    path = Path(path)
    recover_dir(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError("missing meta.json (not a prepared-data folder?)", meta_path)
    try:
        verify_manifest(path)
    except IntegrityError as exc:
        raise DataError(f"{exc}; run `tdm prepare` again") from None
    meta = json.loads(meta_path.read_text())
    items_path = path / "items.parquet"
    if not items_path.is_file():
        raise DataError("missing file", items_path)
    items = pd.read_parquet(items_path)
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise DataError("missing column", items_path, column=missing[0])
    train = TrainSplit(**_load_npz(path / "train.npz", TRAIN_KEYS))
    valid = EvalSplit(**_load_npz(path / "valid.npz", EVAL_KEYS))
    test = EvalSplit(**_load_npz(path / "test.npz", EVAL_KEYS))
    return Prepared(items=items, train=train, valid=valid, test=test, meta=meta)


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError("missing file", path)
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise DataError(f"missing array {missing[0]!r}", path)
        return {k: archive[k] for k in keys}
