"""Tree builders and tree reports (Sec. 3.5, "Tree Construction and Learning").

Every builder only computes an *order* of the items and hands it to ``Tree.from_ordered_items``:
that function splits the ordered list recursively into ``arity`` near-equal parts (first parts one
larger), so a recursive clustering whose every split is adjusted to exactly those part sizes gives
the same tree as ``from_ordered_items`` over the items in cluster order.

- ``category_tree``: the initial tree (categories in random order, items of a category together in
  random order).
- ``kmeans_tree``: the learnt tree (recursive balanced k-means on the leaf embeddings), computed
  level by level for all segments of a level at once.
- ``tree_purity``, ``truth_agreement``, ``moved_fraction``, ``item_order_from_tree``,
  ``subtree_leaf_counts``, ``is_balanced``: reports and checks.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from tdm.tree import Tree

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- initial tree
def category_tree(
    item_ids: np.ndarray, category_ids: np.ndarray, arity: int = 2, seed: int = 0
) -> Tree:
    """Initial tree from item categories (Sec. 3.5, "Tree initialization").

    Categories are put in a random order, the items of one category are placed together in a
    random intra-category order, and the ranked list is split recursively into ``arity`` near-equal
    parts. An item listed with several categories is assigned to one of its distinct categories
    uniformly at random; repeated (item, category) rows collapse.

    Args:
        item_ids: (N,) int item ids, may repeat.
        category_ids: (N,) int category of each row.
        arity: children per inner node (>= 2).
        seed: seed of all random choices.
    Returns:
        Tree over the distinct item ids, each category a contiguous run of leaves.
    """
    items = np.asarray(item_ids, dtype=np.int64).ravel()
    cats = np.asarray(category_ids, dtype=np.int64).ravel()
    if len(items) != len(cats):
        raise ValueError(f"{len(items)} item ids but {len(cats)} category ids")
    if len(items) == 0:
        raise ValueError("cannot build a tree over no items")
    rng = np.random.default_rng(seed)
    if _has_duplicates(items):
        items, cats = _one_category_per_item(items, cats, rng)
    # items grouped by category id, in random order inside each category
    shuffled = rng.permutation(len(items))
    by_cat = shuffled[np.argsort(cats[shuffled], kind="stable")]
    sorted_cats = cats[by_cat]
    starts = np.flatnonzero(np.r_[True, sorted_cats[1:] != sorted_cats[:-1]])
    lengths = np.diff(np.r_[starts, len(items)])
    # Sec. 3.5: "we sort all categories randomly": the category blocks in random order
    block = rng.permutation(len(starts))
    new_starts = np.cumsum(lengths[block]) - lengths[block]
    shift = np.repeat(starts[block] - new_starts, lengths[block])
    order = by_cat[np.arange(len(items)) + shift]
    return Tree.from_ordered_items(items[order], arity)


def _has_duplicates(values: np.ndarray) -> bool:
    """True when ``values`` (1-D) holds some value twice (sort-based; fast for many values)."""
    ordered = np.sort(values)
    return bool(np.any(ordered[1:] == ordered[:-1]))


def _one_category_per_item(
    items: np.ndarray, cats: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(distinct items, one of each item's distinct categories chosen uniformly at random)."""
    order = np.lexsort((cats, items))
    items, cats = items[order], cats[order]
    first = np.ones(len(items), dtype=bool)
    first[1:] = (items[1:] != items[:-1]) | (cats[1:] != cats[:-1])
    items, cats = items[first], cats[first]  # distinct (item, category) pairs, sorted
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
    counts = np.diff(np.r_[starts, len(items)])
    pick = starts + np.minimum((rng.random(len(starts)) * counts).astype(np.int64), counts - 1)
    return items[pick], cats[pick]


# --------------------------------------------------------------------------------- learnt tree
def kmeans_tree(
    item_ids: np.ndarray,
    embeddings: np.ndarray,
    arity: int = 2,
    seed: int = 0,
    iters: int = 10,
) -> Tree:
    """Learnt tree: recursive balanced k-means on the item embeddings (Sec. 3.5, "Tree learning").

    See ``kmeans_order`` for the algorithm.

    Args:
        item_ids: (N,) distinct int item ids.
        embeddings: (N, D) embedding of each item (float32; other dtypes are converted).
        arity: children per inner node (>= 2); k-means with k = arity at every split.
        seed: seed of the centroid initialisation.
        iters: at most this many assignment steps per level.
    Returns:
        Tree whose every split is a balanced k-means split of the items below it.
    """
    items = np.asarray(item_ids, dtype=np.int64).ravel()
    if len(items) != len(embeddings):
        raise ValueError(f"{len(items)} item ids but {len(embeddings)} embeddings")
    if _has_duplicates(items):
        raise ValueError("item ids must be distinct")
    order = kmeans_order(embeddings, arity=arity, seed=seed, iters=iters)
    return Tree.from_ordered_items(items[order], arity)


def kmeans_order(
    embeddings: np.ndarray, arity: int = 2, seed: int = 0, iters: int = 10
) -> np.ndarray:
    """Leaf order of the balanced recursive k-means tree over the rows of ``embeddings``.

    Sec. 3.5: items are clustered into ``arity`` subsets by k-means, the subsets are adjusted to
    (near-)equal size, and the recursion goes on until single items are left. Here the recursion
    runs level by level: all segments of one level are held in a padded (S, L, D) array (segment
    sizes of a level differ by at most one, so the padding is at most one row per segment) and
    clustered together with array operations. Per level and for every segment at once:

    1. initial centroids: ``arity`` distinct random points, one from each of ``arity`` equal
       strata of the segment (seeded);
    2. up to ``iters`` constrained Lloyd steps: a *balanced* assignment to the current centroids
       that gives cluster r exactly the part size ``from_ordered_items`` will cut (near-equal,
       first parts one larger), then the centroid update; stop early when no point changes;
    3. the segment is reordered cluster by cluster (stable), giving the next level's segments.

    Balanced assignment, arity 2: with m = |x - c0|^2 - |x - c1|^2, the cost of a split with
    |cluster 0| = n0 is const + sum of m over cluster 0, so the n0 points of smallest m go to
    cluster 0 (exact for the given centroids). When plain k-means would be unbalanced, the points
    moved are therefore those of weakest preference (margin closest to 0), never those nearest the
    big cluster's centroid. Arity k > 2: a greedy in at most k rounds: every unassigned point
    proposes to its nearest cluster that still has room; a cluster over-subscribed keeps the
    proposers with the largest regret (distance to the second-nearest open cluster minus distance
    to the nearest) and closes; the rest propose again. For k = 2 this equals the exact rule.
    Ties (identical embeddings) are broken by position, so the result is deterministic.

    Cost: O(N D iters) per level (two passes over the points per step for k = 2, about k + 2
    for the greedy), O(N D iters log_k N) in all; extra memory about three times the embedding
    matrix in float32. Measured figures: ``benchmarks/tree_build.py``.

    Args:
        embeddings: (N, D) float embeddings.
        arity: k of each k-means split (>= 2).
        seed: seed of the centroid initialisation.
        iters: at most this many assignment steps per level (>= 1).
    Returns:
        (N,) int64 row indices of ``embeddings`` in leaf order.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {x.shape}")
    if arity < 2:
        raise ValueError("arity must be >= 2")
    if iters < 1:
        raise ValueError("iters must be >= 1")
    if not np.isfinite(x.sum(dtype=np.float64)):
        raise ValueError("embeddings contain NaN or inf")
    rng = np.random.default_rng(seed)
    n = len(x)
    index = np.arange(n, dtype=np.int64)[None, :]  # (S, L) item rows per segment, -1 = padding
    size = np.array([n], dtype=np.int64)  # (S,)
    level = 0
    while index.shape[1] > arity:  # segments of <= arity items become leaves directly
        start = time.perf_counter()
        index, size, steps = _split_level(x, index, size, arity, rng, iters)
        logger.debug(
            "kmeans level %d: %d segments, %d steps, %.2fs",
            level,
            len(size) // arity,
            steps,
            time.perf_counter() - start,
        )
        level += 1
    return index[index >= 0]


def _split_level(
    x: np.ndarray,
    index: np.ndarray,
    size: np.ndarray,
    k: int,
    rng: np.random.Generator,
    iters: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Split every segment of one level into k balanced clusters.

    Args:
        x: (N, D) float32 embeddings.
        index: (S, L) rows of x in each segment, valid entries first, -1 padding.
        size: (S,) valid entries per segment (all > k - 1, at least one > k).
        k: clusters per segment.
    Returns:
        (index (S*k, L') of the child segments, their sizes (S*k,), assignment steps used).
    """
    n_seg, width = index.shape
    valid = np.arange(width) < size[:, None]  # (S, L)
    pads = np.nonzero(~valid)
    if n_seg == 1 and width == len(x):
        y = x[None]  # the root segment is x itself, in order
    else:
        y = np.take(x, np.maximum(index, 0), axis=0)  # (S, L, D)
        y[pads] = 0.0
    # part sizes of from_ordered_items: near-equal, first parts one larger
    rank = np.arange(k)
    cap = size[:, None] // k + (rank < (size % k)[:, None])  # (S, k)

    # init: one random point from each of k equal strata of the segment (distinct points)
    lo = rank * size[:, None] // k  # (S, k)
    hi = (rank + 1) * size[:, None] // k
    pick = lo + np.minimum((rng.random((n_seg, k)) * (hi - lo)).astype(np.int64), hi - lo - 1)
    centroids = y[np.arange(n_seg)[:, None], pick]  # (S, k, D)

    total = _weighted_sum(valid.astype(np.float32), y) if k == 2 else None  # (S, D)
    labels = None
    steps = 0
    for step in range(iters):
        if k == 2:
            new = _assign_two(y, centroids, cap, pads)
        else:
            new = _assign_greedy(y, centroids, cap, pads)
        steps = step + 1
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        if step + 1 < iters:
            centroids = _centroids(y, labels, cap, total)

    # reorder: child r of segment s is row s*k + r, holding its points in their previous order
    pos = np.zeros((n_seg, width), dtype=np.int32)
    for r in range(k):
        is_r = labels == r
        pos = np.where(is_r, np.cumsum(is_r, axis=1, dtype=np.int32) - 1, pos)
    child_size = cap.reshape(-1)
    child_width = int(child_size.max())
    out = np.full((n_seg * k, child_width), -1, dtype=np.int64)
    dest = (np.arange(n_seg, dtype=np.int64)[:, None] * k + labels) * child_width + pos  # (S, L)
    if len(pads[0]):
        out.reshape(-1)[dest[valid]] = index[valid]
    else:
        out.reshape(-1)[dest] = index
    return out, child_size, steps


def _rowdot(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(S, L, D) points, (S, D) one vector per segment -> (S, L) dot products.

    einsum rather than batched matmul: the batched BLAS calls are no faster single-threaded and
    much slower when their threads compete for a busy CPU.
    """
    return np.einsum("sld,sd->sl", y, w)


def _weighted_sum(weight: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(S, L) float32 weights, (S, L, D) points -> (S, D) per-segment weighted sums."""
    return np.einsum("sl,sld->sd", weight, y)


def _assign_two(
    y: np.ndarray, centroids: np.ndarray, cap: np.ndarray, pads: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Exact balanced 2-means assignment: the cap[:, 0] points of smallest margin -> cluster 0.

    Returns:
        (S, L) int8 labels, 2 on padding.
    """
    c0, c1 = centroids[:, 0], centroids[:, 1]  # (S, D)
    bias = (c0 * c0).sum(-1) - (c1 * c1).sum(-1)  # (S,)
    # margin = |x - c0|^2 - |x - c1|^2 (negative: nearer c0)
    margin = _rowdot(y, 2.0 * (c0 - c1))  # (S, L)
    np.subtract(bias[:, None], margin, out=margin)
    margin[pads] = np.inf
    labels = (~_smallest(margin, cap[:, 0])).view(np.int8)  # 0: cluster 0, 1: cluster 1
    labels[pads] = 2
    return labels


def _assign_greedy(
    y: np.ndarray, centroids: np.ndarray, cap: np.ndarray, pads: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Greedy balanced k-means assignment (k > 2) in at most k proposal rounds.

    Returns:
        (S, L) int8 labels, k on padding.
    """
    k = centroids.shape[1]
    norms = (centroids * centroids).sum(-1)  # (S, k)
    # dist[c] = |x - c|^2 - |x|^2, the part that depends on the cluster
    dist = np.stack([norms[:, c, None] - _rowdot(y, 2.0 * centroids[:, c]) for c in range(k)])
    labels = np.full(y.shape[:2], -1, dtype=np.int8)  # (S, L)
    labels[pads] = k
    room = cap.copy()  # (S, k) places left per cluster
    for _ in range(k):  # each round fills at least one cluster of every unfinished segment
        rows = np.flatnonzero((labels < 0).any(1))  # segments with unassigned points
        if len(rows) == 0:
            break
        whole = len(rows) == len(labels)
        sub_labels = labels if whole else labels[rows]
        sub_room = room if whole else room[rows]
        sub_dist = dist if whole else dist[:, rows]
        _greedy_round(sub_dist, sub_labels, sub_room)
        if not whole:
            labels[rows], room[rows] = sub_labels, sub_room
    if (labels < 0).any():
        raise AssertionError("greedy balanced assignment left points unassigned")
    return labels


def _greedy_round(dist: np.ndarray, labels: np.ndarray, room: np.ndarray) -> None:
    """One proposal round of ``_assign_greedy``, updating ``labels`` and ``room`` in place.

    Args:
        dist: (k, S, L) distance of each point to each cluster (up to a per-point constant).
        labels: (S, L) int8 cluster of each point, -1 where not assigned yet.
        room: (S, k) places left per cluster.
    """
    k = len(dist)
    free = labels < 0
    is_open = room > 0
    best = np.zeros(labels.shape, dtype=np.int8)  # nearest open cluster
    first = np.full(labels.shape, np.inf, dtype=np.float32)  # its distance
    second = np.full(labels.shape, np.inf, dtype=np.float32)  # the next open distance
    for c in range(k):
        d_c = dist[c] if is_open[:, c].all() else np.where(is_open[:, c, None], dist[c], np.inf)
        nearer = d_c < first
        np.minimum(second, d_c, out=second)
        np.copyto(second, first, where=nearer)
        np.copyto(first, d_c, where=nearer)
        np.copyto(best, c, where=nearer)
    with np.errstate(invalid="ignore"):
        regret = second - first  # inf where a single cluster is left open
    for c in range(k):
        proposing = free & (best == c)
        n_proposing = np.count_nonzero(proposing, axis=1)
        chosen = proposing
        over = np.flatnonzero(n_proposing > room[:, c])  # must keep the largest regrets only
        if len(over):
            chosen = proposing.copy()
            key = np.where(proposing[over], -regret[over], np.inf)
            chosen[over] = _smallest(key, room[over, c]) & proposing[over]
        labels[chosen] = c
        room[:, c] -= np.count_nonzero(chosen, axis=1)


def _smallest(key: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mask of the ``count[s]`` smallest entries of each row, ties broken by position.

    Args:
        key: (S, L) float keys.
        count: (S,) int, 0 <= count <= L.
    Returns:
        (S, L) bool.
    """
    n_seg, width = key.shape
    if not count.any():
        return np.zeros(key.shape, dtype=bool)
    kth = np.unique(np.clip(count - 1, 0, width - 1))
    thr = np.partition(key, kth, axis=1)[np.arange(n_seg), np.maximum(count - 1, 0)]  # (S,)
    mask = key <= thr[:, None]
    mask[count == 0] = False
    if np.array_equal(np.count_nonzero(mask, axis=1), count):
        return mask  # no ties at the threshold
    less = key < thr[:, None]
    equal = key == thr[:, None]
    equal &= np.cumsum(equal, axis=1, dtype=np.int32) <= (count - less.sum(1))[:, None]
    mask = less | equal
    mask[count == 0] = False
    return mask


def _centroids(
    y: np.ndarray, labels: np.ndarray, cap: np.ndarray, total: np.ndarray | None
) -> np.ndarray:
    """(S, k, D) cluster means; clusters have exactly ``cap`` points each, so none is empty."""
    k = cap.shape[1]
    sums = np.empty((len(cap), k, y.shape[2]), dtype=np.float32)
    for r in range(k):
        if r == k - 1 and total is not None:
            sums[:, r] = total - sums[:, :r].sum(1)
        else:
            sums[:, r] = _weighted_sum((labels == r).astype(np.float32), y)
    return sums / np.maximum(cap, 1)[:, :, None].astype(np.float32)


# --------------------------------------------------------------------------------- reports
def subtree_leaf_counts(tree: Tree) -> np.ndarray:
    """(n_nodes,) int64 number of leaves below each node (1 at a leaf)."""
    counts = tree.is_leaf.astype(np.int64)
    for j in range(tree.depth, 0, -1):  # bottom-up, one pass per level
        lo, hi = tree.level_offsets[j], tree.level_offsets[j + 1]
        par = tree.parent[lo:hi]
        plo = par[0]
        counts[plo : par[-1] + 1] += np.bincount(par - plo, weights=counts[lo:hi]).astype(np.int64)
    return counts


def item_order_from_tree(tree: Tree) -> np.ndarray:
    """(n_items,) item ids in left-to-right (depth-first) leaf order.

    ``item_order_from_tree(Tree.from_ordered_items(items, k))`` returns ``items``.
    """
    order = np.empty(tree.n_items, dtype=np.int64)
    order[_leaf_ranks(tree)] = tree.leaf_items
    return order


def is_balanced(tree: Tree) -> bool:
    """True when every inner node's children hold leaf counts within one of each other and all
    leaf depths are within one of each other (the shape ``from_ordered_items`` builds)."""
    depths = tree.level[tree.leaf_nodes]
    if depths.max() - depths.min() > 1:
        return False
    inner = np.flatnonzero(~tree.is_leaf)
    if len(inner) == 0:
        return True
    counts = subtree_leaf_counts(tree)
    starts = tree.child_offsets[inner] - 1  # children of inner nodes tile nodes 1..n-1 in order
    child_counts = counts[1:]
    spread = np.maximum.reduceat(child_counts, starts) - np.minimum.reduceat(child_counts, starts)
    return bool(spread.max() <= 1)


def _ancestor_at(tree: Tree, nodes: np.ndarray, level: int) -> np.ndarray:
    """Ancestor of each node at ``level`` (the node itself where it is shallower)."""
    cur = np.asarray(nodes, dtype=np.int64).copy()
    for _ in range(tree.depth):
        up = tree.level[cur] > level
        if not up.any():
            break
        cur[up] = tree.parent[cur[up]]
    return cur


def tree_purity(tree: Tree, item_category: np.ndarray) -> np.ndarray:
    """Category purity of each level.

    Purity of a node: the fraction of its leaves that belong to the most frequent category among
    them. Purity of level j: the mean over the nodes of level j (leaves at level j count, with
    purity 1; leaves shallower than j are not part of level j).

    Args:
        tree: the tree.
        item_category: array indexed by item id giving its category, (max item id + 1,).
    Returns:
        (depth+1,) float64 purity per level, root level first.
    """
    cats = np.asarray(item_category)[tree.leaf_items]
    # leaves in (category, left-to-right) order: for every level, the ancestors then come in
    # sorted runs inside each category, so (node, category) counts are run lengths
    left_to_right = np.empty(tree.n_items, dtype=np.int64)
    left_to_right[_leaf_ranks(tree)] = np.arange(tree.n_items)
    order = left_to_right[np.argsort(cats[left_to_right], kind="stable")]
    cur = tree.leaf_nodes[order]
    cat_sorted = cats[order]
    purity = np.ones(tree.depth + 1, dtype=np.float64)
    for j in range(tree.depth, -1, -1):
        up = tree.level[cur] > j
        cur[up] = tree.parent[cur[up]]
        here = tree.level[cur] == j
        node, cat = cur[here], cat_sorted[here]
        run_start = np.flatnonzero(np.r_[True, (node[1:] != node[:-1]) | (cat[1:] != cat[:-1])])
        run_len = np.diff(np.r_[run_start, len(node)])
        lo = tree.level_offsets[j]
        n_level = tree.level_sizes[j]
        best = np.zeros(n_level, dtype=np.int64)
        np.maximum.at(best, node[run_start] - lo, run_len)
        size = np.bincount(node - lo, minlength=n_level)
        has = size > 0
        purity[j] = float(np.mean(best[has] / size[has]))
    return purity


def closest_level(tree: Tree, n_groups: int) -> int:
    """The level whose node count is closest to ``n_groups`` (the shallower one on a tie)."""
    return int(np.argmin(np.abs(np.asarray(tree.level_sizes, dtype=np.int64) - int(n_groups))))


def truth_agreement(tree: Tree, item_label: np.ndarray, level: int | None = None) -> dict:
    """How well the subtrees of one level recover known groups of the items (a true taxonomy).

    The items' groups are their ancestors at ``level`` (a leaf shallower than ``level`` is its
    own group). Purity is ``tree_purity``'s at that level: the mean over its nodes of the
    fraction of a node's leaves in the node's most frequent label. NMI is scikit-learn's
    ``normalized_mutual_info_score`` (arithmetic normalisation) of labels vs groups: 1 when the
    groups are the labels, about ``(G - 1)(C - 1) / (2 N ln C)`` for G random groups of N items
    with C equal labels (chance is not 0: ~0.14 for a random tree's 64 subtrees over the
    default data's 3,755 items and 64 categories).

    Args:
        tree: the tree.
        item_label: array indexed by item id giving its true group, (max item id + 1,).
        level: the level compared; None: ``closest_level`` to the number of distinct labels
            among the tree's items.
    Returns:
        ``{"level", "nodes" (groups the level makes), "groups" (distinct labels), "purity",
        "nmi"}``.
    """
    from sklearn.metrics import normalized_mutual_info_score

    labels = np.asarray(item_label)[tree.leaf_items]  # (n_items,) in leaf_nodes order
    n_labels = len(np.unique(labels))
    if level is None:
        level = closest_level(tree, n_labels)
    if not 0 <= level <= tree.depth:
        raise ValueError(f"level {level} is not in 0..{tree.depth}")
    groups = _ancestor_at(tree, tree.leaf_nodes, level)  # (n_items,)
    return {
        "level": int(level),
        "nodes": int(len(np.unique(groups))),
        "groups": int(n_labels),
        "purity": float(tree_purity(tree, item_label)[level]),
        "nmi": float(normalized_mutual_info_score(labels, groups)),
    }


def _leaf_ranks(tree: Tree) -> np.ndarray:
    """(n_items,) left-to-right rank of each leaf in ``tree.leaf_nodes`` order."""
    counts = subtree_leaf_counts(tree)
    first = np.zeros(tree.n_nodes, dtype=np.int64)
    for j in range(1, tree.depth + 1):
        lo, hi = tree.level_offsets[j], tree.level_offsets[j + 1]
        par = tree.parent[lo:hi]
        before = np.cumsum(counts[lo:hi]) - counts[lo:hi]
        first[lo:hi] = first[par] + before - before[tree.child_offsets[par] - lo]
    return first[tree.leaf_nodes]


def moved_fraction(old_tree: Tree, new_tree: Tree, level: int | None = None) -> float:
    """How much the grouping of items changed between two trees over the same items.

    Each item's group is the set of items sharing its parent (``level=None``) or its ancestor at
    ``level`` (an item whose leaf is shallower than ``level`` is its own group). With ``G_old(i)``
    and ``G_new(i)`` the item's groups, the result is ``1 - mean_i J(G_old(i), G_new(i))`` where
    ``J`` is the Jaccard index ``|A & B| / |A | B|``: 0 when every group is unchanged, near 1 when
    the items were regrouped completely. It does not depend on node numbering or sibling order.

    Args:
        old_tree, new_tree: trees over the same item ids.
        level: grouping level, or None for the leaves' parents.
    Returns:
        float in [0, 1).
    """
    items = np.sort(old_tree.leaf_items)
    if not np.array_equal(items, np.sort(new_tree.leaf_items)):
        raise ValueError("the trees must hold the same items")
    groups = []
    for tree in (old_tree, new_tree):
        leaves = tree.item_to_leaf(items)  # same item order in both trees
        if level is None:
            group = np.where(leaves == 0, 0, tree.parent[leaves])
        else:
            group = _ancestor_at(tree, leaves, level)
        present = np.zeros(tree.n_nodes + 1, dtype=np.int64)
        present[group] = 1
        groups.append(np.cumsum(present)[group] - 1)  # dense group codes
    g_old, g_new = groups
    n_new = int(g_new.max()) + 1
    cells, cell_of = np.unique(g_old * n_new + g_new, return_inverse=True)
    both = np.bincount(cell_of).astype(np.float64)  # |A & B| per (old, new) cell
    size_old = np.bincount(g_old).astype(np.float64)[cells // n_new]
    size_new = np.bincount(g_new).astype(np.float64)[cells % n_new]
    jaccard_sum = np.sum(both * both / (size_old + size_new - both))  # each item of a cell
    return float(1.0 - jaccard_sum / old_tree.n_items)
