"""Array-backed tree index over items (Sec. 3.1, 3.3).

Nodes are numbered level by level (breadth first) with the root at 0, so the nodes of level ``j``
are the contiguous range ``level_offsets[j]:level_offsets[j + 1]`` and the children of a node are a
contiguous range too. The whole structure is two arrays, ``parent`` and ``node_item``; everything
else is derived. Leaves may sit at different depths and inner nodes may have any number of
children.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from tdm.errors import TdmError
from tdm.io import write_bytes

_MAGIC = b"TDMTREE\x00"
_VERSION = 1


class TreeFormatError(TdmError, ValueError):
    """A tree file that is corrupt, truncated or of an unknown format."""


class Tree:
    """A tree whose leaves are items.

    Args:
        parent: (n_nodes,) int64, parent of each node, -1 at the root (node 0). Nodes are in
            breadth-first order: parents are non-decreasing and smaller than their children.
        node_item: (n_nodes,) int64, the item id of each leaf, -1 at inner nodes.
    """

    def __init__(self, parent: np.ndarray, node_item: np.ndarray) -> None:
        parent = np.ascontiguousarray(parent, dtype=np.int64)
        node_item = np.ascontiguousarray(node_item, dtype=np.int64)
        n = len(parent)
        if n == 0 or len(node_item) != n:
            raise ValueError("parent and node_item must be non-empty and of equal length")
        if parent[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        rest = parent[1:]
        if np.any(rest < 0) or np.any(rest >= np.arange(1, n)) or np.any(np.diff(rest) < 0):
            raise ValueError("nodes must be in breadth-first order (0 <= parent[v] < v, sorted)")
        self.parent = parent
        self.node_item = node_item

        n_children = np.bincount(rest, minlength=n).astype(np.int64)
        self.child_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(n_children, out=self.child_offsets[1:])
        self.child_offsets += 1  # children of the root start at node 1
        self.child_offsets[0] = 1
        self.is_leaf = n_children == 0

        level = np.zeros(n, dtype=np.int64)
        for v_start, v_end in _runs(parent):  # one pass per level, not per node
            level[v_start:v_end] = level[parent[v_start:v_end]] + 1
        if np.any(np.diff(level) < 0):
            raise ValueError("nodes must be ordered level by level")
        self.level = level
        self.depth = int(level[-1])
        self.level_offsets = np.searchsorted(level, np.arange(self.depth + 2)).astype(np.int64)

        if np.any((node_item >= 0) != self.is_leaf):
            raise ValueError("exactly the leaves must carry an item id (>= 0)")
        self.leaf_nodes = np.flatnonzero(self.is_leaf)
        self.leaf_items = node_item[self.leaf_nodes]
        order = np.argsort(self.leaf_items, kind="stable")
        self._sorted_items = self.leaf_items[order]
        self._sorted_leaves = self.leaf_nodes[order]
        if np.any(np.diff(self._sorted_items) == 0):
            dup = self._sorted_items[np.flatnonzero(np.diff(self._sorted_items) == 0)[0]]
            raise ValueError(f"item {dup} appears at more than one leaf")

    # ----------------------------------------------------------------------------- structure
    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    @property
    def n_items(self) -> int:
        return len(self.leaf_nodes)

    @property
    def level_sizes(self) -> np.ndarray:
        """(depth+1,) number of nodes at each level, root level first."""
        return np.diff(self.level_offsets)

    @property
    def max_arity(self) -> int:
        return int(np.diff(self.child_offsets).max())

    def item_to_leaf(self, item_ids: np.ndarray) -> np.ndarray:
        """Leaf node ids of ``item_ids`` (any shape); KeyError names an unknown item."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_items, item_ids)
        pos_c = np.minimum(pos, len(self._sorted_items) - 1)
        bad = self._sorted_items[pos_c] != item_ids
        if np.any(bad):
            raise KeyError(f"item {int(item_ids[bad].flat[0])} is not in the tree")
        return self._sorted_leaves[pos_c]

    def ancestors(self, leaf_nodes: np.ndarray) -> np.ndarray:
        """Ancestors of nodes at every level.

        Args:
            leaf_nodes: (B,) node ids (usually leaves).
        Returns:
            (B, depth+1) int64: column j is the ancestor at level j (the node itself at its own
            level), -1 for levels below the node.
        """
        nodes = np.asarray(leaf_nodes, dtype=np.int64)
        out = np.full((len(nodes), self.depth + 1), -1, dtype=np.int64)
        rows = np.arange(len(nodes))
        cur = nodes.copy()
        for _ in range(self.depth + 1):
            live = cur >= 0
            out[rows[live], self.level[cur[live]]] = cur[live]
            cur = np.where(live, self.parent[np.maximum(cur, 0)], -1)
        return out

    def children_of(self, nodes: np.ndarray) -> np.ndarray:
        """(B, max_arity) children of each node (contiguous ids), padded with -1."""
        nodes = np.asarray(nodes, dtype=np.int64)
        start = self.child_offsets[nodes]
        count = self.child_offsets[nodes + 1] - start
        span = np.arange(self.max_arity)
        return np.where(span < count[:, None], start[:, None] + span, -1)

    def embedding_rows(self) -> np.ndarray:
        """(n_nodes,) row of each node in the model's embedding table.

        A leaf's row is its item id (items and their leaves share one embedding, Sec. 3.4), so the
        item ids must be exactly 0..n_items-1; inner nodes take rows n_items.. in node order.
        """
        if self._sorted_items[0] != 0 or self._sorted_items[-1] != self.n_items - 1:
            raise ValueError("embedding_rows needs item ids 0..n_items-1 (use item indices)")
        rows = np.empty(self.n_nodes, dtype=np.int64)
        rows[self.leaf_nodes] = self.leaf_items
        inner = np.flatnonzero(~self.is_leaf)
        rows[inner] = self.n_items + np.arange(len(inner))
        return rows

    def stats(self) -> dict:
        """Depth, arity and balance figures for reports."""
        leaf_depths = self.level[self.leaf_nodes]
        fanout = np.diff(self.child_offsets)[~self.is_leaf]
        return {
            "n_items": self.n_items,
            "n_nodes": self.n_nodes,
            "depth": self.depth,
            "max_arity": self.max_arity,
            "level_sizes": self.level_sizes.tolist(),
            "min_leaf_depth": int(leaf_depths.min()),
            "max_leaf_depth": int(leaf_depths.max()),
            "mean_fanout": float(fanout.mean()) if len(fanout) else 0.0,
        }

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Tree)
            and np.array_equal(self.parent, other.parent)
            and np.array_equal(self.node_item, other.node_item)
        )

    def __repr__(self) -> str:
        return f"Tree(n_items={self.n_items}, n_nodes={self.n_nodes}, depth={self.depth})"

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_ordered_items(cls, item_ids: np.ndarray, arity: int = 2) -> Tree:
        """Near-complete tree over items in the given order (Sec. 3.5).

        The ordered items are split recursively into ``arity`` parts of near-equal size (first
        parts one larger) until one item is left; every split is balanced, so leaf depths differ by
        at most one. Built level by level with array operations.
        """
        items = np.asarray(item_ids, dtype=np.int64)
        if arity < 2:
            raise ValueError("arity must be >= 2")
        if len(items) == 0:
            raise ValueError("cannot build a tree over no items")
        parents = [np.array([-1], dtype=np.int64)]
        node_items = []
        start = np.array([0], dtype=np.int64)  # segment of each node of the current level
        size = np.array([len(items)], dtype=np.int64)
        first_id = 0
        while True:
            leaf = size == 1
            node_items.append(np.where(leaf, items[np.minimum(start, len(items) - 1)], -1))
            inner = np.flatnonzero(~leaf)
            if len(inner) == 0:
                break
            parts = np.minimum(arity, size[inner])
            child_parent = np.repeat(first_id + inner, parts)
            rank = np.arange(len(child_parent)) - np.repeat(np.cumsum(parts) - parts, parts)
            base = np.repeat(size[inner] // parts, parts)
            rem = np.repeat(size[inner] % parts, parts)
            child_size = base + (rank < rem)
            # offset of a child inside its parent's segment: rank*base + min(rank, rem)
            child_start = np.repeat(start[inner], parts) + rank * base + np.minimum(rank, rem)
            first_id += len(size)
            parents.append(child_parent)
            start, size = child_start, child_size
        return cls(np.concatenate(parents), np.concatenate(node_items))

    # ----------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the tree to one file (magic, format version, header, checksum), atomically."""
        path = Path(path)
        payload = self.parent.astype("<i8").tobytes() + self.node_item.astype("<i8").tobytes()
        header = json.dumps(
            {"n_nodes": self.n_nodes, "sha256": hashlib.sha256(payload).hexdigest()},
            sort_keys=True,
        ).encode()
        blob = _MAGIC + struct.pack("<II", _VERSION, len(header)) + header + payload
        write_bytes(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> Tree:
        """Read a file written by ``save``; TreeFormatError names the file on any damage."""
        path = Path(path)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise TreeFormatError(f"{path}: tree file not found") from None
        head = len(_MAGIC) + 8
        if len(blob) < head or blob[: len(_MAGIC)] != _MAGIC:
            raise TreeFormatError(f"{path}: not a tdm tree file (bad magic)")
        version, header_len = struct.unpack("<II", blob[len(_MAGIC) : head])
        if version != _VERSION:
            raise TreeFormatError(f"{path}: tree format version {version}, expected {_VERSION}")
        try:
            header = json.loads(blob[head : head + header_len])
            n = int(header["n_nodes"])
        except (ValueError, KeyError, TypeError):
            raise TreeFormatError(f"{path}: corrupt header") from None
        payload = blob[head + header_len :]
        if len(payload) != 16 * n:
            raise TreeFormatError(f"{path}: truncated ({len(payload)} of {16 * n} payload bytes)")
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise TreeFormatError(f"{path}: checksum mismatch (file is corrupt)")
        parent = np.frombuffer(payload[: 8 * n], dtype="<i8").astype(np.int64)
        node_item = np.frombuffer(payload[8 * n :], dtype="<i8").astype(np.int64)
        try:
            return cls(parent, node_item)
        except ValueError as exc:
            raise TreeFormatError(f"{path}: invalid tree: {exc}") from None


def _runs(parent: np.ndarray):
    """Yield [start, end) ranges of nodes whose parents all lie in the previous range."""
    n = len(parent)
    start, end = 1, 1
    prev_end = 1  # nodes [0, 1) are level 0
    while start < n:
        end = int(np.searchsorted(parent, prev_end, side="left"))
        end = max(end, start + 1)
        yield start, end
        start, prev_end = end, end
