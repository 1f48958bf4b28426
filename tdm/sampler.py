"""Layer-wise positive and negative node sampling (Sec. 3.3, Eq. 3-4; HS variant Sec. 5.4).

For a training sample whose target is item ``i``, the positives are the ancestors of ``i``'s leaf
at every level below the root (the max-heap property, Eq. 2, makes them the preferred nodes of
their levels), and each level adds its own negatives. Everything is vectorised over the batch; the
only Python loop is over levels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tdm.config import SamplerConfig
from tdm.tree import Tree

logger = logging.getLogger(__name__)

MODES = ("random", "siblings")


def negatives_for_levels(level_sizes: Sequence[int], total: int) -> list[int]:
    """Per-level negative counts for levels 1..depth, more near the leaves (Sec. 5.2).

    Rule: every level that has room for a negative (``level_size >= 2``) first gets one, while the
    total allows; the rest is shared in proportion to the level index ``j`` (level 1 weight 1, the
    deepest level weight ``depth``) by largest remainders. No level gets more than
    ``level_size - 1`` (the nodes other than the positive); what a capped level cannot take is
    shared among the others in the same proportion. The counts sum to
    ``min(total, sum(level_size - 1))``.

    Args:
        level_sizes: (depth+1,) nodes per level, the root's level first.
        total: the wanted number of negatives per sample, summed over levels.
    Returns:
        ``depth`` counts, for levels 1..depth.
    """
    sizes = np.asarray(level_sizes, dtype=np.int64)[1:]
    caps = np.maximum(sizes - 1, 0)
    counts = np.zeros(len(sizes), dtype=np.int64)
    budget = int(min(max(total, 0), caps.sum()))
    open_levels = caps > 0
    if budget >= open_levels.sum():
        counts[open_levels] = 1
    budget -= int(counts.sum())
    weights = np.arange(1, len(sizes) + 1, dtype=np.float64)
    while budget > 0:
        room = caps - counts
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
        budget -= int(add.sum())
    return counts.tolist()


class LayerwiseSampler:
    """Samples the tree nodes of Eq. 4 for a batch of target items.

    Args:
        tree: the tree index.
        negatives_per_level: ``depth`` counts, negatives at levels 1..depth
            (see ``negatives_for_levels``).
        mode: ``"random"``: negatives uniform over the level without the positive, with
            replacement (Sec. 3.3). ``"siblings"``: the positive's siblings (attention-DNN-HS,
            Sec. 5.4); a level with at most ``count`` siblings takes each sibling once and masks the
            remaining slots, a level with more draws ``count`` of them uniformly with replacement.
        seed: an int seed or a ``np.random.Generator``.

    Output layout: for each level j = 1..depth, one positive column followed by
    ``negatives_per_level[j-1]`` negative columns, so ``S = depth + sum(negatives_per_level)``.
    """

    def __init__(
        self,
        tree: Tree,
        negatives_per_level: Sequence[int],
        mode: str = "random",
        seed: int | np.random.Generator | None = 0,
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

    @classmethod
    def from_config(cls, tree: Tree, cfg: SamplerConfig) -> LayerwiseSampler:
        """Sampler from the ``sampler`` section: ``negatives_per_level`` if given, else
        ``negatives_for_levels(tree.level_sizes, total_negatives)``."""
        counts = cfg.negatives_per_level
        if counts is None:
            counts = negatives_for_levels(tree.level_sizes, cfg.total_negatives)
        return cls(tree, counts, mode=cfg.mode, seed=cfg.seed)

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
            if n_neg > 0:
                if self.mode == "random":
                    neg, ok = self._uniform(pos, j, n_neg, B)
                else:
                    neg, ok = self._siblings(pos, n_neg, B)
                ok &= live[:, None]
                nodes[:, col + 1 : col + 1 + n_neg] = np.where(ok, neg, 0)
                mask[:, col + 1 : col + 1 + n_neg] = ok
            col += 1 + n_neg
        return nodes, labels, mask

    def _uniform(self, pos: np.ndarray, j: int, n: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, n) nodes uniform over level j without ``pos``, with replacement."""
        start = int(self._level_offsets[j])
        size = int(self._level_sizes[j])
        if size < 2:
            return np.zeros((B, n), dtype=np.int64), np.zeros((B, n), dtype=bool)
        rank = (pos - start)[:, None]  # (B, 1)
        r = self.rng.integers(0, size - 1, size=(B, n), dtype=np.int64)  # (B, n)
        neg = start + r + (r >= rank)  # skip the positive's rank
        return neg, np.ones((B, n), dtype=bool)

    def _siblings(self, pos: np.ndarray, n: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, n) siblings of ``pos`` (children of its parent other than itself)."""
        tree = self.tree
        safe = np.maximum(pos, 1)
        parent = tree.parent[safe]  # (B,)
        first = tree.child_offsets[parent]  # (B,) children are a contiguous id range
        n_sib = tree.child_offsets[parent + 1] - first - 1  # (B,)
        rank = (safe - first)[:, None]  # (B, 1)
        slot = np.arange(n, dtype=np.int64)[None, :]  # (1, n)
        few = (n_sib <= n)[:, None]  # (B, 1) take all siblings once
        drawn = (self.rng.random((B, n)) * np.maximum(n_sib, 1)[:, None]).astype(np.int64)
        r = np.where(few, slot, np.minimum(drawn, (n_sib - 1)[:, None]))  # (B, n)
        neg = first[:, None] + r + (r >= rank)
        ok = r < n_sib[:, None]
        return neg, ok
