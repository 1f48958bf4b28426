"""Layer-wise positive and negative node sampling (Sec. 3.3, Eq. 3-4; HS variant Sec. 5.4).

For a training sample whose target is item ``i``, the positives are the ancestors of ``i``'s leaf
at every level below the root (the max-heap property, Eq. 2, makes them the preferred nodes of
their levels), and each level adds its own negatives. Everything is vectorised over the batch; the
only Python loop is over levels (and, without replacement, a few rounds of redrawing repeats).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tdm.config import SamplerConfig
from tdm.tree import Tree

logger = logging.getLogger(__name__)

MODES = ("random", "siblings")
PROFILES = ("proportional", "leaf_heavy")
# The public TDM code's UserBehavior profile (x-deeplearning, tdm_ub_att_ubuntu, 22 levels):
# 1..15, 17, 19, 22, 25, 30 negatives at levels 1..20 -- 233, close to linear in the level index
# (weights 1..20, 210 in all) -- then 76 and 200 at the last two levels, 509 in all. As weights
# on that scale, per unit of the deepest upper level's index (20):
NEXT_WEIGHT = 76 / 233 * 210 / 20  # 3.42: the level above the leaves
LEAF_WEIGHT = 200 / 233 * 210 / 20  # 9.01: the leaf level


def negatives_for_levels(
    level_sizes: Sequence[int], total: int, profile: str = "proportional"
) -> list[int]:
    """Per-level negative counts for levels 1..depth, more near the leaves (Sec. 5.2).

    No level gets more than ``level_size - 1`` (the nodes other than the positive), and the
    counts always sum to ``min(total, sum(level_size - 1))``.

    ``proportional``: every level that has room for a negative (``level_size >= 2``) first gets
    one, while the total allows; the rest is shared in proportion to the level index ``j``
    (level 1 weight 1, the deepest level weight ``depth``) by largest remainders. What a capped
    level cannot take is shared among the others in the same proportion. A depth-12 tree with
    100 negatives gives the leaf level ~15.

    ``leaf_heavy`` (the shape of the public code's UserBehavior profile, which gives the leaf
    level 200 and the level above it 76 of 509 on a 22-level tree): weight ``j`` for levels
    ``j = 1..depth-2``, ``NEXT_WEIGHT * (depth-2)`` (3.42x) for level ``depth-1`` and
    ``LEAF_WEIGHT * (depth-2)`` (9.01x) for the leaf level; the total is shared in proportion
    to the weights by largest remainders (capped levels pass their excess on, as above); then
    every level with room that got none takes one from the level holding the most, while the
    total allows one per level. The last two levels get ``(LEAF_WEIGHT + NEXT_WEIGHT) /
    ((depth-1)/2 + LEAF_WEIGHT + NEXT_WEIGHT)`` of the total: 54% at depth 22 (exactly 200 and
    76 of 509), 69% at depth 12 (50% and 19%), 83% at depth 6.

    Args:
        level_sizes: (depth+1,) nodes per level, the root's level first.
        total: the wanted number of negatives per sample, summed over levels.
        profile: ``proportional`` | ``leaf_heavy``.
    Returns:
        ``depth`` counts, for levels 1..depth.
    """
    if profile not in PROFILES:
        raise ValueError(f"sampler profile {profile!r} is not one of {', '.join(PROFILES)}")
    sizes = np.asarray(level_sizes, dtype=np.int64)[1:]
    caps = np.maximum(sizes - 1, 0)
    budget = int(min(max(total, 0), caps.sum()))
    weights = np.arange(1, len(sizes) + 1, dtype=np.float64)
    if profile == "proportional" or len(sizes) == 0:
        return _proportional(caps, budget, weights).tolist()
    scale = max(len(sizes) - 2, 1)
    weights[-1] = LEAF_WEIGHT * scale
    if len(sizes) >= 2:
        weights[-2] = NEXT_WEIGHT * scale
    counts = _share(caps, budget, weights)
    open_levels = caps > 0
    if budget >= open_levels.sum():  # every level with room gets at least one
        for level in np.flatnonzero(open_levels & (counts == 0)):
            donor = int(np.argmax(counts))  # the most; on ties the shallowest keeps the order
            counts[donor] -= 1
            counts[level] += 1
    return counts.tolist()


def _proportional(caps: np.ndarray, budget: int, weights: np.ndarray) -> np.ndarray:
    """One negative for every level with room (while the budget allows), then the rest by
    ``weights`` (``_share``)."""
    counts = np.zeros(len(caps), dtype=np.int64)
    open_levels = caps > 0
    if budget >= open_levels.sum():
        counts[open_levels] = 1
    return counts + _share(caps - counts, budget - int(counts.sum()), weights)


def _share(room: np.ndarray, budget: int, weights: np.ndarray) -> np.ndarray:
    """``budget`` spread over levels in proportion to ``weights`` by largest remainders (deepest
    first on ties), no level above its ``room``; a capped level's excess goes to the others."""
    room = np.asarray(room, dtype=np.int64).copy()
    counts = np.zeros(len(room), dtype=np.int64)
    budget = int(min(max(budget, 0), room.sum()))
    while budget > 0:
        free = room > 0
        share = np.where(free, weights, 0.0)
        share = budget * share / share.sum()
        add = np.minimum(np.floor(share).astype(np.int64), room)
        left = budget - int(add.sum())
        if left > 0:  # largest remainders, deepest first on ties
            remainder = np.where(free & (add < room), share - add, -1.0)
            order = np.lexsort((-weights, -remainder))
            order = order[remainder[order] >= 0][:left]
            add[order] += 1
        counts += add
        room -= add
        budget -= int(add.sum())
    return counts


@dataclass(frozen=True)
class _Sparse:
    """Column layout of the levels whose distinct negatives are drawn together (S columns)."""

    has: np.ndarray  # (depth+1,) bool, level j is one of them
    cols: np.ndarray  # (S,) output columns
    starts: np.ndarray  # (S,) first node id of the column's level
    ranges: np.ndarray  # (S,) candidates of the column's level (its size - 1)
    levels: np.ndarray  # (S,) the column's level


class LayerwiseSampler:
    """Samples the tree nodes of Eq. 4 for a batch of target items.

    Args:
        tree: the tree index.
        negatives_per_level: ``depth`` counts, negatives at levels 1..depth
            (see ``negatives_for_levels``).
        mode: ``"random"``: negatives uniform over the level without the positive (Sec. 3.3).
            ``"siblings"``: the positive's siblings (attention-DNN-HS, Sec. 5.4); a level with at
            most ``count`` siblings takes each sibling once and masks the remaining slots, a level
            with more draws ``count`` of them uniformly.
        seed: an int seed or a ``np.random.Generator``.
        replacement: True: a level's draws are independent (a negative may repeat within a
            level). False: a sample's negatives within a level are distinct (a uniform subset);
            a level with at most ``count`` candidates takes each of them once and masks the
            remaining slots.

    Output layout: for each level j = 1..depth, one positive column followed by
    ``negatives_per_level[j-1]`` negative columns, so ``S = depth + sum(negatives_per_level)``.
    """

    def __init__(
        self,
        tree: Tree,
        negatives_per_level: Sequence[int],
        mode: str = "random",
        seed: int | np.random.Generator | None = 0,
        replacement: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"sampler mode {mode!r} is not one of {', '.join(MODES)}")
        counts = [int(n) for n in negatives_per_level]
        if len(counts) != tree.depth:
            raise ValueError(
                f"negatives_per_level has {len(counts)} entries, the tree has {tree.depth} levels"
            )
        if any(n < 0 for n in counts):
            raise ValueError("negatives_per_level must be non-negative")
        self.tree = tree
        self.mode = mode
        self.replacement = bool(replacement)
        self.negatives_per_level = counts
        if isinstance(seed, np.random.Generator):
            self.seed = int(seed.integers(2**63))
        else:
            self.seed = seed
        self.rng = np.random.default_rng(self.seed)
        self.width = tree.depth + sum(counts)
        self._level_of = tree.level
        self._level_offsets = tree.level_offsets
        self._level_sizes = tree.level_sizes
        self._sparse = self._sparse_layout() if mode == "random" and not replacement else None

    @classmethod
    def from_config(cls, tree: Tree, cfg: SamplerConfig) -> LayerwiseSampler:
        """Sampler from the ``sampler`` section: ``negatives_per_level`` if given, else
        ``negatives_for_levels(tree.level_sizes, total_negatives, profile)``."""
        counts = cfg.negatives_per_level
        if counts is None:
            counts = negatives_for_levels(tree.level_sizes, cfg.total_negatives, cfg.profile)
        return cls(tree, counts, mode=cfg.mode, seed=cfg.seed, replacement=cfg.replacement)

    def reseed(self, *keys: int) -> None:
        """Restart the generator from ``(seed, *keys)`` (the trainer passes (train seed, epoch))."""
        base = [] if self.seed is None else [self.seed]
        self.rng = np.random.default_rng([*base, *keys])

    def sample(self, target_items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positive and negative nodes of every level for each target (Eq. 3-4).

        Args:
            target_items: (B,) int64 item ids.
        Returns:
            nodes: (B, S) int64 node ids (0 where masked).
            labels: (B, S) float32, 1 for positives, 0 for negatives.
            mask: (B, S) bool, False where the entry does not exist: levels deeper than the
                target's leaf, levels with a single node, missing siblings.
        """
        tree = self.tree
        leaves = tree.item_to_leaf(np.asarray(target_items, dtype=np.int64))
        path = tree.ancestors(leaves)  # (B, depth+1), -1 below the leaf
        B = len(leaves)
        nodes = np.zeros((B, self.width), dtype=np.int64)
        labels = np.zeros((B, self.width), dtype=np.float32)
        mask = np.zeros((B, self.width), dtype=bool)
        col = 0
        for j in range(1, tree.depth + 1):
            n_neg = self.negatives_per_level[j - 1]
            pos = path[:, j]  # (B,) Eq. 4: the ancestor at level j is positive
            exists = pos >= 0
            size = int(self._level_sizes[j])
            live = exists if size > 1 else np.zeros(B, dtype=bool)
            nodes[:, col] = np.where(live, pos, 0)
            labels[:, col] = 1.0
            mask[:, col] = live
            if n_neg > 0 and not (self._sparse is not None and self._sparse.has[j]):
                if self.mode == "random":
                    neg, ok = self._uniform(pos, j, n_neg, B)
                else:
                    neg, ok = self._siblings(pos, n_neg, B)
                ok &= live[:, None]
                nodes[:, col + 1 : col + 1 + n_neg] = np.where(ok, neg, 0)
                mask[:, col + 1 : col + 1 + n_neg] = ok
            col += 1 + n_neg
        if self._sparse is not None and len(self._sparse.cols):
            self._sparse_negatives(path, nodes, mask)
        return nodes, labels, mask

    def _sparse_layout(self) -> _Sparse:
        """The levels sampled together without replacement (``_sparse_negatives``): those with
        at least 4x as many candidates as negatives. Smaller levels go through ``_distinct``."""
        cols, starts, ranges, levels = [], [], [], []
        has = np.zeros(self.tree.depth + 1, dtype=bool)
        col = 0
        for j, n in enumerate(self.negatives_per_level, start=1):
            m = int(self._level_sizes[j]) - 1  # candidates: the level without the positive
            if n > 0 and 4 * n <= m:
                has[j] = True
                cols.append(np.arange(col + 1, col + 1 + n))
                starts += [int(self._level_offsets[j])] * n
                ranges += [m] * n
                levels += [j] * n
            col += 1 + n

        def arr(values: list) -> np.ndarray:
            return np.asarray(values, dtype=np.int64)

        return _Sparse(
            has=has,
            cols=np.concatenate(cols) if cols else arr([]),
            starts=arr(starts),
            ranges=arr(ranges),
            levels=arr(levels),
        )

    def _sparse_negatives(self, path: np.ndarray, nodes: np.ndarray, mask: np.ndarray) -> None:
        """Distinct uniform negatives of all sparse levels at once, written into ``nodes`` and
        ``mask``.

        One (B, S) draw of candidate ids ``start_j + r``, ``r`` uniform in ``[0, size_j - 1)``,
        i.e. with replacement; each row is sorted once (the levels' id ranges are disjoint and
        ordered, so every level keeps its own block of columns), and a slot that repeats its left
        neighbour is refilled with fresh draws from its level until the fresh id is neither in
        the row nor among the row's other fresh ids (membership through sorted arrays of
        ``row * n_nodes + id`` keys: the sorted rows, then each round's accepted ids; a few
        rounds). Label-symmetric within a level, so each level's negatives are a uniform subset.
        Then the positive is skipped: ``id + (id >= positive)``.
        """
        sp = self._sparse
        rng = self.rng
        B, S = len(path), len(sp.cols)
        n_nodes = self.tree.n_nodes
        dtype = np.int32 if n_nodes < 2**31 else np.int64  # int32 sorts faster
        draw = rng.random((B, S))  # (B, S)
        draw *= sp.ranges
        draw += sp.starts  # exact: ids are far below 2^53
        ids = draw.astype(dtype)  # floor: start + r, r uniform in [0, size - 1)
        ids.sort(axis=1)
        flat = ids.ravel()
        at = np.flatnonzero(flat[1:] == flat[:-1]) + 1  # repeats of the left neighbour
        at = at[at % S != 0]  # not across rows
        if len(at):
            rows, cols = np.divmod(at, S)
            row_base = np.arange(B, dtype=np.int64) * n_nodes
            taken = [(row_base[:, None] + ids).ravel()]  # sorted key arrays: the rows, ...
            while len(rows):
                fresh = sp.starts[cols] + (rng.random(len(rows)) * sp.ranges[cols]).astype(np.int64)
                keys = row_base[rows] + fresh
                order = np.argsort(keys)
                sorted_keys = keys[order]  # sorted queries: searchsorted stays in cache
                new = np.ones(len(keys), dtype=bool)
                new[1:] = sorted_keys[1:] != sorted_keys[:-1]  # one per row and value
                for block in taken:
                    new &= ~_member(sorted_keys, block)
                taken.append(sorted_keys[new])  # ... and each round's accepted fresh ids
                ok = np.empty(len(keys), dtype=bool)
                ok[order] = new
                ids[rows[ok], cols[ok]] = fresh[ok]
                rows, cols = rows[~ok], cols[~ok]
        pos = path.astype(dtype)[:, sp.levels]  # (B, S) the positive of each column's level
        ids += ids >= pos  # skip the positive
        live = pos >= 0  # (B, S) sparse levels have more than one node
        if not live.all():
            ids[~live] = 0
        nodes[:, sp.cols] = ids
        mask[:, sp.cols] = live

    def _uniform(self, pos: np.ndarray, j: int, n: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, n) nodes uniform over level j without ``pos`` (distinct unless ``replacement``)."""
        start = int(self._level_offsets[j])
        size = int(self._level_sizes[j])
        if size < 2:
            return np.zeros((B, n), dtype=np.int64), np.zeros((B, n), dtype=bool)
        rank = (pos - start)[:, None]  # (B, 1)
        if self.replacement:
            r = self.rng.integers(0, size - 1, size=(B, n), dtype=np.int64)  # (B, n)
            ok = np.ones((B, n), dtype=bool)
        else:
            r, ok = _distinct(self.rng, np.full(B, size - 1, dtype=np.int64), n)  # (B, n)
        neg = start + r + (r >= rank)  # skip the positive's rank
        return neg, ok

    def _siblings(self, pos: np.ndarray, n: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, n) siblings of ``pos`` (children of its parent other than itself)."""
        tree = self.tree
        safe = np.maximum(pos, 1)
        parent = tree.parent[safe]  # (B,)
        first = tree.child_offsets[parent]  # (B,) children are a contiguous id range
        n_sib = tree.child_offsets[parent + 1] - first - 1  # (B,)
        rank = (safe - first)[:, None]  # (B, 1)
        if not self.replacement:
            r, ok = _distinct(self.rng, np.maximum(n_sib, 0), n)  # (B, n)
            return first[:, None] + r + (r >= rank), ok
        slot = np.arange(n, dtype=np.int64)[None, :]  # (1, n)
        few = (n_sib <= n)[:, None]  # (B, 1) take all siblings once
        drawn = (self.rng.random((B, n)) * np.maximum(n_sib, 1)[:, None]).astype(np.int64)
        r = np.where(few, slot, np.minimum(drawn, (n_sib - 1)[:, None]))  # (B, n)
        neg = first[:, None] + r + (r >= rank)
        ok = r < n_sib[:, None]
        return neg, ok


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """(n,) bool: which ``keys`` occur in the sorted array ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _distinct(rng: np.random.Generator, m: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row b, n distinct values uniform over ``[0, m[b])`` (a uniform n-subset).

    A row with ``m[b] <= n`` takes every value once (slots ``>= m[b]`` masked). Rows with
    ``m[b] > n``: when n is a large share of the range (``4n > max m``), the n smallest of
    ``m[b]`` random keys; otherwise n draws with replacement whose repeats are redrawn until none
    is left (label-symmetric, so the final set is a uniform subset; a few rounds, since repeats
    are rare there). Values come out sorted in the second case.

    Args:
        rng: the generator.
        m: (B,) int64 number of candidates per row.
        n: values per row.
    Returns:
        r: (B, n) int64 values (0 where masked), ok: (B, n) bool.
    """
    B = len(m)
    few = m <= n  # (B,) take all
    many = np.flatnonzero(~few)
    if len(many) == 0 or n == 0:
        slot = np.arange(n, dtype=np.int64)[None, :]  # (1, n)
        ok = slot < m[:, None]  # (B, n)
        return np.where(ok, slot, 0), ok
    mm = m[many]  # (b,)
    width = int(mm.max())
    if 4 * n > width:  # dense: the n smallest of m random keys
        keys = rng.random((len(many), width))  # (b, width)
        keys[np.arange(width)[None, :] >= mm[:, None]] = np.inf
        drawn = np.argpartition(keys, n - 1, axis=1)[:, :n]  # (b, n)
    else:
        same = int(mm.min()) == width  # random mode: one level, one range for every row
        dtype = np.int32 if width < 2**31 else np.int64  # int32 sorts faster

        def draw(rows: np.ndarray | None, size: tuple[int, ...] | int) -> np.ndarray:
            if same:
                return rng.integers(0, width, size=size, dtype=dtype)
            high = mm if rows is None else mm[rows]
            high = high[:, None] if rows is None else high
            return (rng.random(size) * high).astype(dtype)

        drawn = draw(None, (len(many), n))  # (b, n) with replacement
        drawn.sort(axis=1)
        while True:
            repeat = drawn[:, 1:] == drawn[:, :-1]  # (b, n-1) equal to the left neighbour
            if not repeat.any():
                break
            rows, cols = np.nonzero(repeat)
            drawn[rows, cols + 1] = draw(rows, len(rows))
            touched = np.unique(rows)
            drawn[touched] = np.sort(drawn[touched], axis=1)
    if len(many) == B:
        return drawn.astype(np.int64), np.ones((B, n), dtype=bool)
    slot = np.arange(n, dtype=np.int64)[None, :]  # (1, n)
    ok = slot < m[:, None]  # (B, n)
    r = np.where(few[:, None], slot, 0)  # (B, n)
    r[many] = drawn
    return np.where(ok, r, 0), ok
