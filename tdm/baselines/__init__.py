"""Baselines evaluated with the same protocol, metrics and filter modes as TDM (Sec. 5.2-5.3).

Every baseline is a class with ``__init__(**hyperparameters)``, ``fit(data, seed=0)`` (returns
itself) and ``ranker()`` (a ranker for :func:`tdm.evaluation.evaluate_split`):

- ``popular``: :class:`~tdm.baselines.popular.MostPopular` (nothing to fit but the counts).
- ``itemcf``: :class:`~tdm.baselines.itemcf.ItemCF`, item-based CF (Sarwar et al. 2001).
- ``bpr``: :class:`~tdm.baselines.bpr.BPR`, BPR-MF (Rendle et al. 2009) in torch.
- ``fm``: :class:`~tdm.baselines.fm.FM`, a factorisation machine (Rendle 2010) on implicit
  feedback, trained with sampled negatives.
- ``youtube``: :class:`~tdm.baselines.youtube.YouTubeDNN`, YouTube product-DNN (Covington et al.
  2016) on TDM's inputs, sampled softmax, exact kNN.

:func:`fit` builds one by name, :func:`tune` picks its hyper-parameters on the validation users
(the test users are never evaluated there). :data:`GRIDS` are the documented default grids.

As in the paper (Sec. 5.2), the known first halves of the validation and test users may join the
training data (``with_eval_history``; the user-id models need it, item-CF gets more co-occurrences
from it). Their second halves, the ground truth, are never read by ``fit``.

The helpers below are shared by the baselines: the combined interaction CSR, top-k selection that
honours a ranker's ``exclude`` CSR, from dense torch scores or from a sparse score matrix.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp
    import torch

    from tdm.config import EvalConfig
    from tdm.data.protocol import EvalSplit, Prepared, TrainSplit

logger = logging.getLogger(__name__)

BASELINES: dict[str, str] = {
    "popular": "tdm.baselines.popular:MostPopular",
    "itemcf": "tdm.baselines.itemcf:ItemCF",
    "bpr": "tdm.baselines.bpr:BPR",
    "fm": "tdm.baselines.fm:FM",
    "youtube": "tdm.baselines.youtube:YouTubeDNN",
}
"""Baseline name -> ``"module:Class"`` (imported on use, see :func:`baseline_class`)."""

GRIDS: dict[str, dict[str, list[Any]]] = {
    "popular": {},
    # Sec. 5.2: the number of neighbours of item-CF
    "itemcf": {"neighbours": [10, 20, 50, 100, 200, 500]},
    # Sec. 5.2: the number of factors and of iterations of BPR-MF and FM; BPR-MF's L2 weight too
    # (on ml-latest-small it matters more than the factors)
    "bpr": {"factors": [32, 64], "reg": [0.003, 0.01, 0.03], "epochs": [10, 30, 60]},
    "fm": {"factors": [16, 32, 64], "epochs": [5, 10, 20]},
    # the paper fixes dim 24 and layers 128-64-24 (Sec. 5.2); the training length is tuned
    "youtube": {"lr": [0.001, 0.003], "epochs": [5, 10, 20]},
}
"""Default tuning grids: every combination is fitted and evaluated on the validation users."""

_CLASS_NAMES = {
    "MostPopular": "popular",
    "ItemCF": "itemcf",
    "BPR": "bpr",
    "FM": "fm",
    "YouTubeDNN": "youtube",
}

DENSE_BUDGET = 1 << 24  # scores per chunk when ranking against every item (64 MiB of float32)


def __getattr__(name: str) -> Any:
    """``from tdm.baselines import ItemCF`` etc. without importing torch for the helpers."""
    if name in _CLASS_NAMES:
        return baseline_class(_CLASS_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def baseline_class(name: str) -> type:
    """The class of baseline ``name`` (a key of :data:`BASELINES`).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    module_name, _, class_name = BASELINES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def fit(name: str, data: Prepared, params: Mapping[str, Any] | None = None, seed: int = 0) -> Any:
    """Build baseline ``name`` with ``params`` and fit it on ``data``.

    Args:
        name: a key of :data:`BASELINES`.
        data: the prepared data.
        params: hyper-parameters for the class (none for ``popular``).
        seed: seed of initialisation and sampling.
    Returns:
        The fitted baseline (call ``.ranker()`` for ``evaluate_split``).
    """
    params = dict(params or {})
    if name == "popular":
        if params:
            raise ValueError(f"popular takes no hyper-parameters, got {sorted(params)}")
        return baseline_class(name)(data.items["train_count"].to_numpy())
    return baseline_class(name)(**params).fit(data, seed=seed)


def grid_points(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every combination of a ``{param: [values]}`` grid (first key slowest), or a list as is."""
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())
        ]
    return [dict(point) for point in grid]


def tune(
    name: str,
    data: Prepared,
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]] | None,
    cfg_eval: EvalConfig,
    seed: int = 0,
    mode: str = "none",
    metric: str = "recall",
    fixed: Mapping[str, Any] | None = None,
    callback: Callable[[dict], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Pick hyper-parameters on the validation users only (Sec. 5.2).

    Each grid point is fitted on ``data`` (training users, plus the known halves where the
    baseline uses them) and scored by ``metric``@M of ``data.valid`` under filter ``mode``. The
    test users' ground truth is never read. Ties keep the earlier grid point.

    Points that differ only in ``epochs`` share one run of the longest: the model is evaluated
    after each requested epoch through ``fit``'s epoch callback. Nothing in training depends on
    the total number of epochs, so this gives the same models as separate runs, for less time.

    Args:
        name: a key of :data:`BASELINES`.
        data: the prepared data.
        grid: ``{param: [values]}`` (every combination) or a list of parameter dicts; None uses
            :data:`GRIDS`.
        cfg_eval: the ``eval`` section (``topk`` = M; its ``filters`` are replaced by ``mode``).
        seed: fit seed.
        mode: filter mode of the selection metric: none | items | categories.
        metric: precision | recall | f_measure | novelty.
        fixed: parameters added to every grid point (e.g. ``device``).
        callback: called with each row of the table as it is done.
    Returns:
        The best parameters (``fixed`` included) and the table: one row per grid point with
        ``params``, ``metric``, ``value`` and ``seconds`` (wall time of its run up to its
        evaluation), in grid order.
    """
    from tdm.evaluation import evaluate_split

    points = grid_points(GRIDS[name] if grid is None else grid) or [{}]
    eval_cfg = dataclasses.replace(cfg_eval, filters=[mode])
    label = f"{metric}@{cfg_eval.topk}/{mode}"
    rows: dict[int, dict] = {}

    def record(index: int, model: Any, t0: float) -> None:
        value = float(evaluate_split(model.ranker(), data, data.valid, eval_cfg)[mode][metric])
        row = {
            "params": points[index],
            "metric": label,
            "value": value,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        rows[index] = row
        logger.info("tune %s %s: valid %s %.4f", name, points[index], label, value)
        if callback is not None:
            callback(row)

    for group in _epoch_groups(name, points):
        params = {**(fixed or {}), **points[group[-1]]}
        t0 = time.perf_counter()
        if len(group) == 1:
            record(group[0], fit(name, data, params, seed=seed), t0)
            continue
        at_epoch = {int(points[i]["epochs"]) - 1: i for i in group}

        def on_epoch(epoch: int, model: Any, at_epoch=at_epoch, t0=t0) -> None:
            if epoch in at_epoch:
                record(at_epoch[epoch], model, t0)

        baseline_class(name)(**params).fit(data, seed=seed, callback=on_epoch)
    table = [rows[i] for i in range(len(points))]
    best = max(range(len(points)), key=lambda i: (table[i]["value"], -i))
    return {**(fixed or {}), **points[best]}, table


def _epoch_groups(name: str, points: list[dict]) -> list[list[int]]:
    """Grid point indices grouped by everything but ``epochs`` (for baselines whose ``fit``
    takes an epoch callback), each group sorted by epochs; other points alone."""
    if (
        name == "popular"
        or "callback" not in inspect.signature(baseline_class(name).fit).parameters
    ):
        return [[i] for i in range(len(points))]
    groups: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        if "epochs" not in point or int(point["epochs"]) < 1:
            groups[f"#{i}"] = [i]
            continue
        key = repr(sorted((k, repr(v)) for k, v in point.items() if k != "epochs"))
        groups.setdefault(key, []).append(i)
    out = []
    for group in groups.values():
        by_epochs: dict[int, int] = {}
        for i in group:  # a repeated point is evaluated once per run: keep it apart
            if int(points[i]["epochs"]) in by_epochs:
                out.append([i])
            else:
                by_epochs[int(points[i]["epochs"])] = i
        out.append(sorted(by_epochs.values(), key=lambda i: int(points[i]["epochs"])))
    return out


# ------------------------------------------------------------------------------------ helpers
def interactions(data: Prepared, with_eval_history: bool = True) -> TrainSplit:
    """All known behaviours as one CSR: the training users, then (``with_eval_history``) the
    known first halves of the validation users, then of the test users (the order of
    ``tdm.data.samples.TrainSamples``). Ground truth is never included.

    Returns:
        A :class:`~tdm.data.protocol.TrainSplit`; row ``r`` of split ``s`` is row
        ``split_row_start(data, s) + r``.
    """
    from tdm.data.protocol import TrainSplit

    if not with_eval_history:
        return data.train
    parts = [(data.train.users, data.train.items, data.train.times, data.train.offsets)]
    parts += [
        (s.users, s.hist_items, s.hist_times, s.hist_offsets) for s in (data.valid, data.test)
    ]
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for part in parts:
        offsets.append(part[3][1:] + base)
        base += int(part[3][-1])
    return TrainSplit(
        users=np.concatenate([p[0] for p in parts]),
        items=np.concatenate([p[1] for p in parts]),
        times=np.concatenate([p[2] for p in parts]),
        offsets=np.concatenate(offsets),
    )


def split_row_start(data: Prepared, split: EvalSplit) -> int:
    """First row of ``split``'s users in ``interactions(data, True)``.

    Raises:
        ValueError: when ``split`` is neither ``data.valid`` nor ``data.test``.
    """
    n_train, n_valid = data.train.n_users, data.valid.n_users
    for start, known in ((n_train, data.valid), (n_train + n_valid, data.test)):
        if split is known or np.array_equal(split.users, known.users):
            return start
    raise ValueError("the split is not the validation or test split of the fitted data")


def user_item_matrix(offsets: np.ndarray, items: np.ndarray, n_items: int) -> sp.csr_matrix:
    """(U, n_items) float32 binary CSR: 1 where the user interacted with the item (repeats once).

    Args:
        offsets: (U+1,) CSR offsets.
        items: (N,) item indices.
        n_items: number of columns.
    """
    import scipy.sparse as sp

    from tdm.metrics import csr_rows

    n_rows = len(offsets) - 1
    ones = np.ones(len(items), dtype=np.float32)
    matrix = sp.csr_matrix((ones, (csr_rows(offsets), items)), shape=(n_rows, n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _exclude_keys(exclude: tuple[np.ndarray, np.ndarray] | None, n_items: int) -> np.ndarray:
    """Sorted int64 keys ``row * n_items + item`` of an exclude CSR."""
    from tdm.metrics import csr_rows

    if exclude is None or len(exclude[0]) == 0:
        return np.zeros(0, dtype=np.int64)
    values, offsets = exclude
    return np.sort(csr_rows(offsets) * n_items + np.asarray(values, dtype=np.int64))


def top_k_sparse(
    scores: sp.csr_matrix, k: int, exclude: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns per row of a sparse score matrix, leaving out ``exclude``.

    Only stored entries are candidates (an item with no score is not recommended); ties go to the
    smaller item index.

    Args:
        scores: (B, n_items) CSR.
        k: items per row.
        exclude: CSR ``(items, offsets)`` with B rows, or None.
    Returns:
        items (B, k) int64 padded with -1, scores (B, k) float64 padded with -inf.
    """
    coo = scores.tocoo()
    n_rows, n_items = scores.shape
    rows, cols, vals = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    x_keys = _exclude_keys(exclude, n_items)
    if len(x_keys):
        keys = rows * n_items + cols
        pos = np.minimum(np.searchsorted(x_keys, keys), len(x_keys) - 1)
        keep = x_keys[pos] != keys
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))  # by row, best score first, then item index
    rows, cols, vals = rows[order], cols[order], vals[order]
    start = np.searchsorted(rows, np.arange(n_rows))
    rank = np.arange(len(rows)) - start[rows]
    take = rank < k
    items = np.full((n_rows, k), -1, dtype=np.int64)
    out = np.full((n_rows, k), -np.inf)
    items[rows[take], rank[take]] = cols[take]
    out[rows[take], rank[take]] = vals[take]
    return items, out


def top_k_dense(
    scores: torch.Tensor, k: int, exclude: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` items per row of a dense score matrix (exact kNN), leaving out ``exclude``.

    Args:
        scores: (B, n_items) float tensor (modified in place where excluded).
        k: items per row.
        exclude: CSR ``(items, offsets)`` with B rows, or None.
    Returns:
        items (B, k) int64 padded with -1 (when fewer than k items remain), scores (B, k) float64.
    """
    import torch

    from tdm.metrics import csr_rows

    n_rows, n_items = scores.shape
    if exclude is not None and len(exclude[0]):
        rows = torch.from_numpy(csr_rows(exclude[1])).to(scores.device)
        cols = torch.from_numpy(np.asarray(exclude[0], dtype=np.int64)).to(scores.device)
        scores[rows, cols] = -float("inf")
    top, index = torch.topk(scores, min(k, n_items), dim=1)  # (B, k)
    top, index = top.double().cpu().numpy(), index.cpu().numpy()
    index[np.isneginf(top)] = -1
    if index.shape[1] < k:
        index = np.pad(index, ((0, 0), (0, k - index.shape[1])), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-np.inf)
    return index.astype(np.int64), top


def rank_dense(
    score_chunk: Callable[[int, int], torch.Tensor],
    n_rows: int,
    k: int,
    exclude: tuple[np.ndarray, np.ndarray] | None,
    n_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` over all items for ``n_rows`` users, scored a chunk of rows at a time.

    Args:
        score_chunk: maps ``(start, stop)`` to the (stop - start, n_items) scores of those rows.
        n_rows: B, the number of rows.
        k: items per row.
        exclude: CSR ``(items, offsets)`` with B rows, or None.
        n_items: corpus size (sets the chunk size, ``DENSE_BUDGET`` scores per chunk).
    Returns:
        items (B, k) int64 padded with -1, scores (B, k) float64.
    """
    from tdm.metrics import csr_slice

    chunk = max(1, DENSE_BUDGET // max(n_items, 1))
    items, scores = [np.zeros((0, k), dtype=np.int64)], [np.zeros((0, k))]
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        part = None if exclude is None else csr_slice(*exclude, start, stop)
        i, s = top_k_dense(score_chunk(start, stop), k, part)
        items.append(i)
        scores.append(s)
    return np.concatenate(items), np.concatenate(scores)


def sample_negatives(
    rng: np.random.Generator,
    users: np.ndarray,
    n_items: int,
    positive_keys: np.ndarray,
    rounds: int = 20,
) -> np.ndarray:
    """One uniform item per user that the user has not interacted with (rejection sampling).

    Args:
        rng: the generator.
        users: (B,) user rows.
        n_items: corpus size.
        positive_keys: sorted int64 keys ``user * n_items + item`` of the positives.
        rounds: resampling rounds; a draw still positive after them is kept (vanishingly rare
            unless a user has interacted with most of the corpus).
    Returns:
        (B,) int64 item indices.
    """
    items = rng.integers(0, n_items, size=len(users))
    todo = np.arange(len(users))
    for _ in range(rounds):
        keys = users[todo] * n_items + items[todo]
        pos = np.minimum(np.searchsorted(positive_keys, keys), max(len(positive_keys) - 1, 0))
        bad = positive_keys[pos] == keys if len(positive_keys) else np.zeros(len(todo), bool)
        todo = todo[bad]
        if len(todo) == 0:
            break
        items[todo] = rng.integers(0, n_items, size=len(todo))
    return items.astype(np.int64)


def model_meta(data: Prepared) -> tuple[int, int, int]:
    """(max_history, min_history, time_windows) of the prepared data, as TDM uses them."""
    max_history = int(data.meta["max_history"])
    min_history = int(data.meta.get("data", {}).get("min_history", 1))
    return max_history, min_history, int(data.meta["time_windows"])
