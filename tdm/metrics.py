"""Metrics (Sec. 5.2, Eq. 5-7), filtering modes (Sec. 5.3) and layer-wise recall (Fig. 4).

Pure numpy. Ragged per-user sets are CSR pairs ``(values, offsets)``: the set of user ``u`` is
``values[offsets[u]:offsets[u + 1]]``, ``offsets`` has ``U + 1`` entries and starts at 0.
Ranked lists are dense ``(U, M)`` int64 arrays padded with -1 at the end.

Everything is vectorised over users: a set membership test encodes ``(user, item)`` pairs as one
int64 key ``user * n + item`` and uses sorted searches, so 10k users x M=200 cost a few sorts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FILTER_MODES = ("none", "items", "categories")


# ----------------------------------------------------------------------------- CSR helpers
def csr_rows(offsets: np.ndarray) -> np.ndarray:
    """Row (user) index of every entry of a CSR set.

    Args:
        offsets: (U+1,) int64 CSR offsets.
    Returns:
        (offsets[-1],) int64 row of each value.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def csr_from_rows(
    rows: np.ndarray, values: np.ndarray, n_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(values, offsets)`` from entries already sorted by row.

    Args:
        rows: (N,) int64 row of each value, non-decreasing.
        values: (N,) int64 values.
        n_rows: number of rows U.
    Returns:
        values (N,) int64 and offsets (U+1,) int64.
    """
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
    return np.asarray(values, dtype=np.int64), offsets


def csr_slice(
    values: np.ndarray, offsets: np.ndarray, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of a CSR set, re-based to start at 0."""
    offsets = np.asarray(offsets, dtype=np.int64)
    sub = offsets[start : stop + 1]
    return np.asarray(values)[sub[0] : sub[-1]], sub - sub[0]


def _keys(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Sorted unique int64 keys ``row * n + value`` of the entries with ``value >= 0``."""
    rows = np.asarray(rows, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    keep = values >= 0
    return _sorted_unique(rows[keep] * n + values[keep])


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """``np.unique`` by sort and compare (faster than the hash path of recent numpy)."""
    keys = np.sort(keys)
    if len(keys) < 2:
        return keys
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))]


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``keys`` occur in the sorted array ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.searchsorted(sorted_keys, keys)
    return sorted_keys[np.minimum(pos, len(sorted_keys) - 1)] == keys


def _key_base(*arrays: np.ndarray) -> int:
    """One more than the largest value in any array (at least 1): the key multiplier."""
    top = 0
    for a in arrays:
        a = np.asarray(a)
        if a.size:
            top = max(top, int(a.max()))
    return top + 1


# ----------------------------------------------------------------------------- Eq. 5-7
def precision_recall_f_novelty(
    pred: np.ndarray,
    truth_items: np.ndarray,
    truth_offsets: np.ndarray,
    seen_items: np.ndarray,
    seen_offsets: np.ndarray,
    M: int | None = None,
    skip_empty_truth: bool = True,
) -> dict:
    """Precision@M, Recall@M, F-Measure@M and Novelty@M per user and averaged (Eq. 5-7).

    ``P_u`` is the set of distinct items in the first ``M`` columns of ``pred[u]`` (padding -1
    ignored, so a list shorter than M is penalised, the denominators stay M), ``G_u`` the ground
    truth set, ``S_u`` the items the user interacted with before recommending:
    Precision = |P∩G|/M, Recall = |P∩G|/|G| (Eq. 5), F = 2PR/(P+R), 0 when P = R = 0 (Eq. 6),
    Novelty = |P\\S|/M (Eq. 7).

    Users with an empty ground truth (e.g. after ``filter_truth`` removed all of it) have no
    recall: their per-user recall and F are NaN. With ``skip_empty_truth`` (default) they are left
    out of all four means (the means are over ``n_evaluated`` users); otherwise they count with
    precision, recall and F equal to 0. ``n_empty_truth`` reports how many there were.

    Args:
        pred: (U, M') int64 ranked item ids, padded with -1.
        truth_items, truth_offsets: ground truth CSR, U rows.
        seen_items, seen_offsets: interacted items CSR (the user's history), U rows.
        M: list size of the metrics (default M'); only the first M columns count.
        skip_empty_truth: leave users with empty ground truth out of the means.
    Returns:
        dict with floats ``precision``, ``recall``, ``f_measure``, ``novelty`` (user means),
        ints ``n_users``, ``n_evaluated``, ``n_empty_truth`` and (U,) float64 arrays
        ``precision_per_user``, ``recall_per_user``, ``f_measure_per_user``,
        ``novelty_per_user``.
    """
    pred = np.asarray(pred, dtype=np.int64)
    if pred.ndim != 2:
        raise ValueError(f"pred must be (U, M), got shape {pred.shape}")
    n_users = pred.shape[0]
    M = pred.shape[1] if M is None else int(M)
    if M <= 0:
        raise ValueError("M must be positive")
    pred = pred[:, :M]
    for name, off in (("truth_offsets", truth_offsets), ("seen_offsets", seen_offsets)):
        if len(off) != n_users + 1:
            raise ValueError(f"{name} has {len(off) - 1} rows, pred has {n_users}")
    n = _key_base(pred, truth_items, seen_items)

    pred_rows = np.repeat(np.arange(n_users, dtype=np.int64), pred.shape[1])
    p_keys = _keys(pred_rows, pred.ravel(), n)  # P_u, duplicates removed
    g_keys = _keys(csr_rows(truth_offsets), truth_items, n)  # G_u
    s_keys = _keys(csr_rows(seen_offsets), seen_items, n)  # S_u

    def count(keys: np.ndarray) -> np.ndarray:
        return np.bincount(keys // n, minlength=n_users).astype(np.float64)

    hits = count(p_keys[_in_sorted(p_keys, g_keys)])  # |P ∩ G|
    novel = count(p_keys[~_in_sorted(p_keys, s_keys)])  # |P \ S|
    n_truth = count(g_keys)  # |G|
    has_truth = n_truth > 0

    precision = hits / M  # Eq. 5
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(has_truth, hits / n_truth, np.nan)  # Eq. 5
        denom = precision + recall
        f_measure = np.where(denom > 0, 2 * precision * recall / denom, 0.0)  # Eq. 6
    f_measure = np.where(has_truth, f_measure, np.nan)
    novelty = novel / M  # Eq. 7

    if skip_empty_truth:
        use = has_truth
        means = [precision, recall, f_measure, novelty]
    else:
        use = np.ones(n_users, dtype=bool)
        means = [precision, np.nan_to_num(recall), np.nan_to_num(f_measure), novelty]
    n_eval = int(use.sum())

    def mean(x: np.ndarray) -> float:
        return float(x[use].mean()) if n_eval else float("nan")

    return {
        "precision": mean(means[0]),
        "recall": mean(means[1]),
        "f_measure": mean(means[2]),
        "novelty": mean(means[3]),
        "n_users": n_users,
        "n_evaluated": n_eval,
        "n_empty_truth": int((~has_truth).sum()),
        "precision_per_user": precision,
        "recall_per_user": recall,
        "f_measure_per_user": f_measure,
        "novelty_per_user": novelty,
    }


def recall_at_k(pred: Sequence[Sequence[int]], truth: Sequence[Sequence[int]], k: int) -> float:
    """Mean Recall@k over users with a non-empty ground truth (convenience, plain lists).

    Args:
        pred: per user, a ranked list (or a row of a (U, M) array; -1 entries are ignored).
        truth: per user, the ground truth items.
        k: cut-off.
    Returns:
        mean of |top-k ∩ truth| / |truth| over users whose truth is non-empty (NaN if none).
    """
    if len(pred) != len(truth):
        raise ValueError(f"{len(pred)} prediction lists for {len(truth)} users")
    values = []
    for p, g in zip(pred, truth, strict=True):
        g_set = {int(x) for x in g}
        if not g_set:
            continue
        top = {int(x) for x in list(p)[:k] if int(x) >= 0}
        values.append(len(top & g_set) / len(g_set))
    return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------- Sec. 5.3 filtering
def _check_mode(mode: str, item_category: np.ndarray | None) -> None:
    if mode not in FILTER_MODES:
        raise ValueError(f"filter mode {mode!r} is not one of {FILTER_MODES}")
    if mode == "categories" and item_category is None:
        raise ValueError("filter mode 'categories' needs item_category")


def _user_categories(
    seen_items: np.ndarray, seen_offsets: np.ndarray, cat_index: np.ndarray, n_cat: int
) -> np.ndarray:
    """Sorted unique keys ``user * n_cat + category`` of the categories each user saw."""
    return _keys(csr_rows(seen_offsets), cat_index[np.asarray(seen_items, dtype=np.int64)], n_cat)


def filter_truth(
    mode: str,
    truth_items: np.ndarray,
    truth_offsets: np.ndarray,
    seen_items: np.ndarray,
    seen_offsets: np.ndarray,
    item_category: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth under a filtering mode (Sec. 5.3).

    ``"none"`` keeps it; ``"items"`` drops truth items the user interacted with; ``"categories"``
    drops truth items whose category the user interacted with. Order within a user is kept.

    Args:
        mode: ``"none"`` | ``"items"`` | ``"categories"``.
        truth_items, truth_offsets: ground truth CSR, U rows.
        seen_items, seen_offsets: interacted items CSR, U rows.
        item_category: (n_items,) category of each item index (needed for ``"categories"``).
    Returns:
        the filtered ground truth CSR ``(items, offsets)``.
    """
    _check_mode(mode, item_category)
    truth_items = np.asarray(truth_items, dtype=np.int64)
    truth_offsets = np.asarray(truth_offsets, dtype=np.int64)
    n_users = len(truth_offsets) - 1
    if mode == "none":
        return truth_items.copy(), truth_offsets.copy()
    rows = csr_rows(truth_offsets)
    if mode == "items":
        n = _key_base(truth_items, seen_items)
        drop = _in_sorted(rows * n + truth_items, _keys(csr_rows(seen_offsets), seen_items, n))
    else:
        _, cat_index = np.unique(np.asarray(item_category), return_inverse=True)
        cat_index = cat_index.astype(np.int64).ravel()
        n_cat = int(cat_index.max()) + 1
        user_cats = _user_categories(seen_items, seen_offsets, cat_index, n_cat)
        drop = _in_sorted(rows * n_cat + cat_index[truth_items], user_cats)
    return csr_from_rows(rows[~drop], truth_items[~drop], n_users)


def excluded_items(
    mode: str,
    seen_items: np.ndarray,
    seen_offsets: np.ndarray,
    item_category: np.ndarray | None = None,
    n_items: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the items a filtering mode removes from the recommendations (Sec. 5.3).

    ``"none"``: nothing; ``"items"``: the interacted items; ``"categories"``: every item of every
    category the user interacted with (can be large: build it per batch of users with
    ``csr_slice`` on the seen CSR when memory matters).

    Args:
        mode: ``"none"`` | ``"items"`` | ``"categories"``.
        seen_items, seen_offsets: interacted items CSR, U rows.
        item_category: (n_items,) category of each item index (needed for ``"categories"``).
        n_items: corpus size (default ``len(item_category)`` or the largest seen item + 1).
    Returns:
        CSR ``(items, offsets)``, U rows, each row sorted and without duplicates.
    """
    _check_mode(mode, item_category)
    seen_offsets = np.asarray(seen_offsets, dtype=np.int64)
    n_users = len(seen_offsets) - 1
    if mode == "none":
        return np.zeros(0, dtype=np.int64), np.zeros(n_users + 1, dtype=np.int64)
    if n_items is None:
        n_items = len(item_category) if item_category is not None else _key_base(seen_items)
    if mode == "items":
        keys = _keys(csr_rows(seen_offsets), seen_items, n_items)
        return csr_from_rows(keys // n_items, keys % n_items, n_users)

    _, cat_index = np.unique(np.asarray(item_category)[:n_items], return_inverse=True)
    cat_index = cat_index.astype(np.int64).ravel()
    n_cat = int(cat_index.max()) + 1
    user_cats = _user_categories(seen_items, seen_offsets, cat_index, n_cat)
    pair_user, pair_cat = user_cats // n_cat, user_cats % n_cat
    # items grouped by category: CSR over categories
    by_cat = np.argsort(cat_index, kind="stable")
    cat_start = np.zeros(n_cat + 1, dtype=np.int64)
    np.cumsum(np.bincount(cat_index, minlength=n_cat), out=cat_start[1:])
    lengths = cat_start[pair_cat + 1] - cat_start[pair_cat]  # (P,)
    pair = np.repeat(np.arange(len(pair_cat)), lengths)  # (N,)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = by_cat[cat_start[pair_cat[pair]] + within]
    keys = np.sort(pair_user[pair] * n_items + items)  # categories are disjoint: no duplicates
    return csr_from_rows(keys // n_items, keys % n_items, n_users)


def complement(
    pred: np.ndarray,
    exclude_items: np.ndarray,
    exclude_offsets: np.ndarray,
    fallback_order: np.ndarray,
    M: int,
    scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Filter ranked lists and complement them back to M items (Sec. 5.3).

    Per user: drop excluded items, padding and repeats from ``pred`` keeping the rank order, keep
    at most M, then append the first items of ``fallback_order`` (e.g. by popularity) that are
    neither excluded nor already in the list until there are M. Fewer than M only when the corpus
    runs out. Cost O(U*M + total excluded), no loop over users.

    Args:
        pred: (U, K) int64 ranked item ids, padded with -1 (ask retrieval for K > M so that
            filtering leaves enough).
        exclude_items, exclude_offsets: excluded items CSR, U rows (``excluded_items``).
        fallback_order: (n_items,) int64 item ids in fallback order, most preferred first.
        M: list size.
        scores: optional (U, K) scores aligned with ``pred``; carried along, -inf for
            complemented entries and padding.
    Returns:
        items (U, M) int64 padded with -1, and scores (U, M) float (None when not given).
    """
    pred = np.asarray(pred, dtype=np.int64)
    n_users, width = pred.shape
    exclude_items = np.asarray(exclude_items, dtype=np.int64)
    exclude_offsets = np.asarray(exclude_offsets, dtype=np.int64)
    fallback_order = np.asarray(fallback_order, dtype=np.int64)
    if len(exclude_offsets) != n_users + 1:
        raise ValueError(f"exclude CSR has {len(exclude_offsets) - 1} rows, pred has {n_users}")
    # step 2 reads at most M + (a row's excluded items) of the fallback order: the rest of a
    # corpus-sized order is never looked at
    longest = int(np.diff(exclude_offsets).max()) if n_users else 0
    fallback_order = fallback_order[: M + longest]
    n = _key_base(pred, exclude_items, fallback_order)
    x_keys = _keys(csr_rows(exclude_offsets), exclude_items, n)

    # 1. filter pred, keeping the first occurrence of each item in rank order
    rows = np.repeat(np.arange(n_users, dtype=np.int64), width)  # (U*K,)
    flat = pred.ravel()
    keys = np.where(flat >= 0, rows * n + flat, -1 - np.arange(len(flat)))  # padding: unique
    keep = (flat >= 0) & ~_in_sorted(keys, x_keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    is_first = np.zeros(len(keys), dtype=bool)
    is_first[order] = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))[: len(keys)]
    keep = (keep & is_first).reshape(n_users, width)
    rank = np.cumsum(keep, axis=1) - 1  # (U, K) position in the filtered list
    keep &= rank < M
    out = np.full((n_users, M), -1, dtype=np.int64)
    out_scores = None
    r, c = np.nonzero(keep)
    out[r, rank[r, c]] = pred[r, c]
    if scores is not None:
        scores = np.asarray(scores)
        out_scores = np.full((n_users, M), -np.inf, dtype=np.result_type(scores.dtype, np.float32))
        out_scores[r, rank[r, c]] = scores[r, c]
    n_kept = keep.sum(axis=1)  # (U,)

    # 2. fill from the fallback order: a prefix of length need + kept + excluded always suffices
    need = M - n_kept
    n_excl = np.diff(np.searchsorted(x_keys, np.arange(n_users + 1, dtype=np.int64) * n))
    length = np.where(need > 0, np.minimum(need + n_kept + n_excl, len(fallback_order)), 0)
    f_rows = np.repeat(np.arange(n_users, dtype=np.int64), length)
    f_pos = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    f_items = fallback_order[f_pos]
    f_keys = f_rows * n + f_items
    kept_keys = np.sort(r * n + pred[r, c])
    ok = ~_in_sorted(f_keys, x_keys) & ~_in_sorted(f_keys, kept_keys)
    ok_rows = f_rows[ok]
    # rank among the accepted candidates of the same user
    ok_start = np.searchsorted(ok_rows, np.arange(n_users))
    f_rank = np.arange(len(ok_rows)) - ok_start[ok_rows]
    take = f_rank < need[ok_rows]
    dest_rows = ok_rows[take]
    out[dest_rows, n_kept[dest_rows] + f_rank[take]] = f_items[ok][take]
    return out, out_scores


# ----------------------------------------------------------------------------- Fig. 4
def layerwise_recall(
    level_nodes: Sequence[np.ndarray | None],
    truth_offsets: np.ndarray,
    truth_ancestors: np.ndarray,
) -> np.ndarray:
    """Layer-wise recall (Sec. 5.4, Fig. 4): the ground truth traced back to each level.

    At level j the retrieved set of user u is ``level_nodes[j][u]`` (e.g. the top k of that level
    from ``beam_search(..., return_levels=True)`` or ``brute_force(..., level=j)``) and the truth
    set is the distinct level-j ancestors of the user's ground truth leaves. Recall at level j is
    |retrieved ∩ truth| / |truth|, averaged over the users with a non-empty truth set there.

    Args:
        level_nodes: indexed by level; (U, k) int64 node ids padded with -1, or None to skip.
        truth_offsets: (U+1,) ground truth CSR offsets.
        truth_ancestors: (N_truth, n_levels) int64, row i the ancestors of the leaf of ground
            truth entry i, column j its level-j ancestor or -1, i.e.
            ``tree.ancestors(tree.item_to_leaf(truth_items))``.
    Returns:
        (len(level_nodes),) float64 mean recall per level, NaN where skipped or no truth.
    """
    truth_ancestors = np.asarray(truth_ancestors, dtype=np.int64)
    truth_rows = csr_rows(truth_offsets)
    n_users = len(truth_offsets) - 1
    out = np.full(len(level_nodes), np.nan)
    for j, nodes in enumerate(level_nodes):
        if nodes is None or j >= truth_ancestors.shape[1]:
            continue
        nodes = np.asarray(nodes, dtype=np.int64)
        if nodes.shape[0] != n_users:
            raise ValueError(f"level {j}: {nodes.shape[0]} rows for {n_users} users")
        n = _key_base(nodes, truth_ancestors[:, j])
        t_keys = _keys(truth_rows, truth_ancestors[:, j], n)
        r_keys = _keys(np.repeat(np.arange(n_users), nodes.shape[1]), nodes.ravel(), n)
        hits = np.bincount(r_keys[_in_sorted(r_keys, t_keys)] // n, minlength=n_users)
        n_truth = np.bincount(t_keys // n, minlength=n_users)
        has = n_truth > 0
        if has.any():
            out[j] = float((hits[has] / n_truth[has]).mean())
    return out
