"""Layer-wise retrieval (Algorithm 1) and brute-force scoring, batched over users with torch.

Conventions shared by ``beam_search`` and ``brute_force``:

- ``hist``/``windows``: (U, L) int64 numpy arrays or tensors, as made by
  ``tdm.data.features.make_history`` (rows of the model's embedding table, -1 padding).
- Users are processed in batches of ``batch_size``; ``model.user_state`` runs once per batch, and
  ``model.score`` once per level (beam search) or per chunk of nodes (brute force). On the CPU a
  level's scoring is split into calls of at most ``CPU_SCORE_PAIRS`` (user, node) pairs (whole
  users each), so that the activations stay in cache; the state is sliced along its first
  (user) dimension for that (``tdm.model.select_state``). The model is
  put in eval mode for the call (its mode is restored afterwards) and runs under
  ``torch.inference_mode`` on ``device`` (default: where the model's parameters are).
- Results are numpy arrays on the host: ids (U, K) int64 padded with -1, scores (U, K) float32
  padded with -inf, best first, with K = min(k, n_items): there are never more columns than
  items in the tree. Padding appears only where fewer candidates remain than columns (items
  removed by ``exclude``; a level with fewer than K nodes).
- ``exclude`` (Sec. 5.3 filtering): either a CSR pair ``(items, offsets)`` of numpy arrays with U
  rows (``tdm.metrics.excluded_items``), or a dense (U, n_items) bool array/tensor (True =
  excluded). Excluded items' leaves never enter the result set (Algorithm 1, line 3); the beam over
  inner nodes is unchanged. Ask for k larger than M when filtering so that enough items remain.
- ``with_stats=True`` appends a ``SearchStats`` (nodes scored, calls made) to the returned tuple:
  ``items, scores, stats = beam_search(..., with_stats=True)``.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import tdm.native
from tdm.model import State, frozen, select_state
from tdm.tree import Tree

__all__ = ["SearchStats", "TreeTensors", "beam_search", "brute_force", "tree_tensors"]

RANKINGS = ("node", "path")
BACKENDS = ("torch", "native", "auto")
CPU_SCORE_PAIRS = 8192  # (user, node) pairs per ``model.score`` call on the CPU (cache-sized)

Inputs = np.ndarray | torch.Tensor  # (U, L) int64 ``hist`` or ``windows``
Exclude = tuple[np.ndarray, np.ndarray] | np.ndarray | torch.Tensor | None  # see module docstring


@dataclass(frozen=True, eq=False)
class SearchStats:
    """What one ``beam_search`` or ``brute_force`` call did (``with_stats=True``).

    Attributes:
        nodes_scored: (user, node) pairs scored in total; padding is not counted.
        nodes_scored_per_user: (U,) int64 nodes scored for each user.
        max_nodes_scored: the largest entry of ``nodes_scored_per_user`` (0 without users).
        user_state_calls: calls of ``model.user_state`` (one per batch of users).
        score_calls: calls of ``model.score``.
    """

    nodes_scored: int
    nodes_scored_per_user: np.ndarray
    max_nodes_scored: int
    user_state_calls: int
    score_calls: int


BeamResult = (
    tuple[np.ndarray, np.ndarray]
    | tuple[np.ndarray, np.ndarray, list[np.ndarray]]
    | tuple[np.ndarray, np.ndarray, SearchStats]
    | tuple[np.ndarray, np.ndarray, list[np.ndarray], SearchStats]
)
BruteResult = tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, SearchStats]


# ----------------------------------------------------------------------------- tree on device
@dataclass(frozen=True)
class TreeTensors:
    """The arrays of a ``Tree`` that retrieval needs, as tensors on one device.

    Attributes:
        n_nodes: number of nodes.
        depth: deepest leaf's level (root = level 0).
        max_arity: largest number of children of a node.
        child_start: (n_nodes + 1,) int64 id of a node's first child (a ``Tree``'s children of a
            node are contiguous node ids).
        child_count: (n_nodes + 1,) int64 number of children.
        is_leaf: (n_nodes + 1,) bool.
        rows: (n_nodes + 1,) int64 embedding row of each node (``tree.embedding_rows()``).
        (The last entry of these four is for node -1, the padding, which indexes it as a
        negative index does: no children, not a leaf, row 0. Beam search indexes them with
        padded node lists as they are.)
        node_item: (n_nodes,) int64 item id at leaves, -1 at inner nodes.
        item_leaf: (max_item + 1,) int64 leaf of each item id, -1 for ids not in the tree.
        leaf_nodes: (n_items,) int64 all leaves in node order.
        item_leaf_host: ``item_leaf`` as a numpy array.
        level_offsets: (depth+2,) numpy node-id range of each level.
        level_has_leaf: (depth+1,) numpy bool, whether a level holds any leaf (beam search skips
            the leaf bookkeeping of the levels that hold none).
        span: (max_arity,) int64 ``0..max_arity-1`` (``children_of``).
        parent_host: (n_nodes,) numpy parent of each node, -1 at the root.
        leaves_under_host: (n_nodes,) numpy number of leaves in each node's subtree.
    """

    n_nodes: int
    depth: int
    max_arity: int
    child_start: torch.Tensor
    child_count: torch.Tensor
    is_leaf: torch.Tensor
    rows: torch.Tensor
    node_item: torch.Tensor
    item_leaf: torch.Tensor
    leaf_nodes: torch.Tensor
    item_leaf_host: np.ndarray
    level_offsets: np.ndarray
    level_has_leaf: np.ndarray
    span: torch.Tensor
    parent_host: np.ndarray
    leaves_under_host: np.ndarray

    @property
    def n_items(self) -> int:
        """Number of leaves (= items)."""
        return len(self.leaf_nodes)

    @classmethod
    def build(cls, tree: Tree, device: torch.device | str) -> TreeTensors:
        """Convert ``tree`` once; see ``tree_tensors`` for the cached door."""
        n_nodes = int(tree.n_nodes)
        child_offsets = np.asarray(tree.child_offsets, dtype=np.int64)
        count = np.diff(child_offsets)
        node_item = np.asarray(tree.node_item, dtype=np.int64)
        is_leaf = count == 0
        leaf_nodes = np.flatnonzero(is_leaf)
        item_leaf = np.full(int(node_item.max()) + 1, -1, dtype=np.int64)
        item_leaf[node_item[leaf_nodes]] = leaf_nodes
        level_offsets = np.asarray(tree.level_offsets, dtype=np.int64)
        leaf_level = np.searchsorted(level_offsets, leaf_nodes, side="right") - 1
        level_has_leaf = np.zeros(len(level_offsets) - 1, dtype=bool)
        level_has_leaf[leaf_level] = True

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), device=device)

        def padded(a: np.ndarray, pad) -> torch.Tensor:  # one more entry, for node -1
            return t(np.append(a, np.asarray(pad, dtype=a.dtype)))

        return cls(
            n_nodes=n_nodes,
            depth=int(tree.depth),
            max_arity=max(int(count.max()), 1),
            child_start=padded(child_offsets[:-1], 0),
            child_count=padded(count, 0),
            is_leaf=padded(is_leaf, False),
            rows=padded(np.asarray(tree.embedding_rows(), dtype=np.int64), 0),
            node_item=t(node_item),
            item_leaf=t(item_leaf),
            leaf_nodes=t(leaf_nodes.astype(np.int64)),
            item_leaf_host=item_leaf,
            level_offsets=level_offsets,
            level_has_leaf=level_has_leaf,
            span=torch.arange(max(int(count.max()), 1), device=device),
            parent_host=np.asarray(tree.parent, dtype=np.int64),
            leaves_under_host=_leaves_under(
                np.asarray(tree.parent, dtype=np.int64), is_leaf, level_offsets
            ),
        )

    def children_of(self, nodes: torch.Tensor) -> torch.Tensor:
        """Children of each node, padded with -1.

        Args:
            nodes: (B, K) int64 node ids, -1 = none.
        Returns:
            (B, K * max_arity) int64 child ids, -1 padding, children of ``nodes[:, i]`` in columns
            ``i*max_arity:(i+1)*max_arity``.
        """
        span = self.span  # (a,)
        count = self.child_count[nodes].unsqueeze(-1)  # (B, K, 1); node -1: 0
        kids = self.child_start[nodes].unsqueeze(-1) + span  # (B, K, a) contiguous child ids
        return kids.masked_fill_(span >= count, -1).flatten(1)  # (B, K*a)


def _leaves_under(parent: np.ndarray, is_leaf: np.ndarray, level_offsets: np.ndarray) -> np.ndarray:
    """(n_nodes,) number of leaves in each subtree, accumulated bottom-up one level at a time."""
    count = is_leaf.astype(np.int64)
    for j in range(len(level_offsets) - 2, 0, -1):
        lo, hi = level_offsets[j], level_offsets[j + 1]
        count += np.bincount(parent[lo:hi], weights=count[lo:hi], minlength=len(count)).astype(
            np.int64
        )
    return count


_CACHE: dict[tuple[int, str], tuple[weakref.ref, TreeTensors]] = {}


def tree_tensors(tree: Tree, device: torch.device | str) -> TreeTensors:
    """``TreeTensors`` of ``tree`` on ``device``, cached per (tree object, device).

    The cache holds the tree weakly; a tree must not be modified in place after first use.
    """
    device = torch.device(device)
    key = (id(tree), str(device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is tree:
        return hit[1]
    tensors = TreeTensors.build(tree, device)
    for dead in [k for k, (ref, _) in _CACHE.items() if ref() is None]:
        del _CACHE[dead]
    _CACHE[key] = (weakref.ref(tree), tensors)
    return tensors


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _inference(model: torch.nn.Module):
    """Eval mode and ``torch.inference_mode`` for the block; the model's mode is restored.

    A model already wholly in eval mode (a served one) is left alone: switching every module's
    mode twice cost ~0.15 ms per search."""
    switch = any(m.training for m in model.modules())
    was_training = model.training
    if switch:
        model.eval()
    try:
        with torch.inference_mode(), frozen(model):
            yield
    finally:
        if switch:
            model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _as_long(x: Inputs, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of an array or tensor as an int64 tensor on ``device``."""
    if isinstance(x, torch.Tensor):
        return x[start:stop].to(device=device, dtype=torch.long)
    return torch.as_tensor(np.asarray(x[start:stop], dtype=np.int64), device=device)


@dataclass
class _Calls:
    """Running counts of ``model.user_state`` and ``model.score`` calls during one search."""

    user_state: int = 0
    score: int = 0

    def stats(self, scored: np.ndarray) -> SearchStats:
        """The ``SearchStats`` of a search that scored ``scored`` (U,) nodes per user."""
        return SearchStats(
            nodes_scored=int(scored.sum()),
            nodes_scored_per_user=scored,
            max_nodes_scored=int(scored.max()) if len(scored) else 0,
            user_state_calls=self.user_state,
            score_calls=self.score,
        )


def _score(model: torch.nn.Module, state: State, node_rows: torch.Tensor, calls: _Calls):
    """(B, N) float logits of ``model.score``, in cache-sized slices of users on the CPU."""
    batch, width = node_rows.shape
    step = batch
    if node_rows.device.type == "cpu" and batch * width > CPU_SCORE_PAIRS:
        step = max(1, CPU_SCORE_PAIRS // max(width, 1))
    if step >= batch:
        calls.score += 1
        return model.score(state, node_rows).float()  # (B, N)
    parts = []
    for s in range(0, batch, step):
        e = min(s + step, batch)
        parts.append(model.score(select_state(state, slice(s, e)), node_rows[s:e]).float())
        calls.score += 1
    return torch.cat(parts)  # (B, N)


def _topk_pad(
    scores: torch.Tensor, nodes: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k columns by score, padded to k; entries with score -inf become node -1.

    Args:
        scores: (B, C) float, -inf = absent.
        nodes: (B, C) int64 ids aligned with ``scores``.
        k: number of columns wanted.
    Returns:
        nodes (B, k) int64 and scores (B, k) float, best first.
    """
    batch, width = scores.shape
    kk = min(k, width)
    if kk > 0:
        top_s, top_i = scores.topk(kk, dim=1)  # (B, kk)
        top_n = nodes.gather(1, top_i).masked_fill(torch.isneginf(top_s), -1)  # (B, kk)
    else:
        top_s = scores.new_empty(batch, 0)
        top_n = nodes.new_empty(batch, 0)
    if kk < k:
        top_s = F.pad(top_s, (0, k - kk), value=-float("inf"))
        top_n = F.pad(top_n, (0, k - kk), value=-1)
    return top_n, top_s


class _Excluder:
    """Membership test of (user, node) pairs in one batch's excluded set.

    The set holds every excluded leaf and every inner node all of whose leaves are excluded, so
    beam search never spends a beam slot on a subtree with nothing left to recommend (with
    interacted categories filtered on a category tree, whole subtrees drop out).
    """

    def __init__(
        self, exclude: Exclude, start: int, stop: int, tt: TreeTensors, device: torch.device
    ) -> None:
        self.n_nodes = tt.n_nodes
        if isinstance(exclude, tuple):
            items, offsets = exclude
            sub = np.asarray(offsets, dtype=np.int64)[start : stop + 1]
            items = np.asarray(items, dtype=np.int64)[sub[0] : sub[-1]]
            rows = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(sub))
        else:
            dense = exclude[start:stop]
            if isinstance(dense, torch.Tensor):
                dense = dense.cpu().numpy()
            rows, items = np.nonzero(np.asarray(dense, dtype=bool))
        item_leaf = tt.item_leaf_host
        known = (items >= 0) & (items < len(item_leaf))
        leaves = item_leaf[items[known]]
        rows = rows[known][leaves >= 0]
        leaves = leaves[leaves >= 0]
        keys = [np.unique(rows * self.n_nodes + leaves)]  # distinct excluded (user, leaf)
        rows, cur = keys[0] // self.n_nodes, keys[0] % self.n_nodes
        while len(cur):  # climb: an inner node is excluded when all its leaves are
            prev, cur = cur, tt.parent_host[cur]
            up = cur >= 0
            weight = tt.leaves_under_host[prev[up]]  # leaves a fully excluded child brings
            anc, inverse = np.unique(rows[up] * self.n_nodes + cur[up], return_inverse=True)
            counts = np.bincount(inverse.ravel(), weights=weight, minlength=len(anc))
            full = anc[counts == tt.leaves_under_host[anc % self.n_nodes]]
            keys.append(full)
            rows, cur = full // self.n_nodes, full % self.n_nodes
        keys = np.sort(np.concatenate(keys))
        self.keys = torch.as_tensor(keys, device=device)
        node_level = np.searchsorted(tt.level_offsets, keys % self.n_nodes, side="right") - 1
        self.levels = np.zeros(len(tt.level_offsets) - 1, dtype=bool)  # levels with excluded nodes
        self.levels[node_level] = True

    def __call__(self, nodes: torch.Tensor) -> torch.Tensor:
        """(B, C) node ids -> (B, C) bool, True where the node is excluded (the answer for
        padding, -1, is meaningless)."""
        if self.keys.numel() == 0:
            return torch.zeros_like(nodes, dtype=torch.bool)
        user = torch.arange(nodes.shape[0], device=nodes.device).unsqueeze(1)  # (B, 1)
        keys = user * self.n_nodes + nodes  # (B, C)
        pos = torch.searchsorted(self.keys, keys).clamp(max=self.keys.numel() - 1)
        return self.keys[pos] == keys


def _check_inputs(hist: Inputs, windows: Inputs, k: int, exclude: Exclude) -> int:
    n_users = len(hist)
    if len(windows) != n_users:
        raise ValueError(f"hist has {n_users} rows, windows {len(windows)}")
    if k <= 0:
        raise ValueError("k must be positive")
    if isinstance(exclude, tuple):
        if len(exclude) != 2 or len(exclude[1]) != n_users + 1:
            raise ValueError("exclude CSR must be (items, offsets) with one row per user")
    elif exclude is not None and len(exclude) != n_users:
        raise ValueError(f"exclude has {len(exclude)} rows for {n_users} users")
    return n_users


# ----------------------------------------------------------------------------- Algorithm 1
def beam_search(
    model: torch.nn.Module,
    tree: Tree,
    hist: Inputs,
    windows: Inputs,
    k: int,
    *,
    ranking: str = "node",
    exclude: Exclude = None,
    device: torch.device | str | None = None,
    batch_size: int = 1024,
    return_levels: bool = False,
    with_stats: bool = False,
    backend: str = "torch",
) -> BeamResult:
    """Layer-wise top-down retrieval of the top k items for each user (Algorithm 1).

    Q starts at the root's children (the root itself is never scored). At each level the nodes
    of Q are scored; leaves among them enter the result set A with their ranking score
    (line 3); the top k of the remaining inner nodes (line 5) are expanded into the next Q
    (line 6), until Q is empty (line 7); the top k of A are returned (line 8). Leaves may sit at
    any depth and a level may have fewer than k nodes. Scoring cost per user is at most
    k * max_arity nodes per level; a level whose Q holds at most k nodes, none of them a leaf,
    is not scored at all (line 5 keeps every one of them), unless ``ranking="path"`` or
    ``return_levels`` needs its scores.

    Args:
        model: scorer with ``user_state(hist, windows)`` and ``score(state, node_rows)``.
        tree: the tree index.
        hist: (U, L) int64 behaviour rows, -1 padding.
        windows: (U, L) int64 time windows, -1 padding.
        k: beam width and number of items returned; at most the number of items is used
            (K = min(k, tree.n_items) below).
        ranking: ``"node"``: a node ranks by its own logit (TDM); ``"path"``: by the sum of
            log-sigmoids of its own and its ancestors' logits below the root, i.e. the log of the
            product of their probabilities (the HS variant, Sec. 5.4) -- for the beam and for A.
        exclude: items never to return (see module docstring), or None.
        device: where to run; default the model's device.
        batch_size: users per batch.
        return_levels: also return, per level, the top K of all nodes of Q at that level
            (leaves included) by ranking score: the retrieved set of that level (Fig. 4).
        with_stats: also return a ``SearchStats``.
        backend: ``"torch"``; ``"native"``: the same search in C (``tdm.native``: the built-in
            models on the CPU, ranking ``"node"``, no ``return_levels``; equal results up to
            rounding, several times faster for a few users per call); ``"auto"``: native where
            it applies and is built, else torch. ``SearchStats.score_calls`` counts the levels
            scored per user in C.
    Returns:
        ``(items, scores)``, then ``levels`` with ``return_levels``, then ``stats`` with
        ``with_stats``: items (U, K) int64 item ids padded with -1; scores (U, K) float32 ranking
        scores (logits, or log-probabilities for ``"path"``) padded with -inf, best first;
        levels a list of depth+1 arrays (U, K) int64 of node ids padded with -1, entry j for
        level j (entry 0 holds the root); stats a ``SearchStats``.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking {ranking!r} is not one of {RANKINGS}")
    n_users = _check_inputs(hist, windows, k, exclude)
    device = _model_device(model) if device is None else torch.device(device)
    native = backend != "torch" and _use_native(model, device, ranking, return_levels, backend)
    tt = tree_tensors(tree, device)
    k = min(k, tt.n_items)  # a level holds at most n_items nodes: the beam is unchanged
    items = np.full((n_users, k), -1, dtype=np.int64)
    scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    levels: list[np.ndarray] = []
    if return_levels:
        levels = [np.full((n_users, k), -1, dtype=np.int64) for _ in range(tt.depth + 1)]
        levels[0][:, 0] = 0
    scored = np.zeros(n_users, dtype=np.int64)
    calls = _Calls()
    # the C search sets the model's mode itself where it runs torch (tdm.native.search)
    with contextlib.nullcontext() if native else _inference(model):
        for start in range(0, n_users, batch_size):
            stop = min(start + batch_size, n_users)
            excluder = None if exclude is None else _Excluder(exclude, start, stop, tt, device)
            if native:
                h, w = (_as_long(x, start, stop, device) for x in (hist, windows))
                out = tdm.native.search(model, tt, h, w, k, _excluded_nodes(excluder, stop - start))
                items[start:stop], scores[start:stop], scored[start:stop] = out[:3]
                calls.user_state += 1
                calls.score += out[3]
                continue
            out = _beam_batch(
                model,
                tt,
                _as_long(hist, start, stop, device),
                _as_long(windows, start, stop, device),
                k,
                ranking == "path",
                excluder,
                return_levels,
                calls,
            )
            items[start:stop] = out[0].cpu().numpy()
            scores[start:stop] = out[1].float().cpu().numpy()
            scored[start:stop] = out[2].cpu().numpy()
            for j, nodes in enumerate(out[3], start=1):
                levels[j][start:stop] = nodes.cpu().numpy()
    out = (items, scores, levels) if return_levels else (items, scores)
    return (*out, calls.stats(scored)) if with_stats else out


def _use_native(
    model: torch.nn.Module, device: torch.device, ranking: str, return_levels: bool, backend: str
) -> bool:
    """Whether ``beam_search`` runs in C; ValueError saying why not for ``backend="native"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    why = tdm.native.unsupported(model, device)
    if why is None and ranking != "node":
        why = f"the C search ranks by node, not {ranking!r}"
    if why is None and return_levels:
        why = "the C search does not return the levels"
    if why is not None and backend == "native":
        raise ValueError(f"backend 'native': {why}")
    return why is None


def _excluded_nodes(excluder: _Excluder | None, batch: int):
    """An ``_Excluder``'s set as a CSR of sorted node ids per user (``tdm.native.search``)."""
    if excluder is None:
        return None
    keys = excluder.keys.cpu().numpy()
    offsets = np.searchsorted(keys, np.arange(batch + 1, dtype=np.int64) * excluder.n_nodes)
    return keys % excluder.n_nodes, offsets.astype(np.int64)


def _compact(
    queue: torch.Tensor, base: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, bool]:
    """Q with its padding (-1) moved behind the valid entries and trimmed to the longest row.

    Returns:
        queue (B, C'), base aligned with it (or None), valid (B, C') bool, n_valid (B,) valid
        entries per row, and whether any row is shorter than C' (padding remains).
    """
    valid = queue >= 0  # (B, C)
    n_valid = valid.sum(dim=1)  # (B,)
    if queue.numel() == 0:
        return queue, base, valid, n_valid, False
    lo, hi = (int(x) for x in torch.aminmax(n_valid))
    if hi < queue.shape[1]:  # valid entries first (stable), then trim
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :hi]
        queue, valid = queue.gather(1, order), valid.gather(1, order)
        if base is not None:
            base = base.gather(1, order)
    return queue, base, valid, n_valid, lo < hi


def _beam_batch(
    model: torch.nn.Module,
    tt: TreeTensors,
    hist: torch.Tensor,
    windows: torch.Tensor,
    k: int,
    path: bool,
    excluder: _Excluder | None,
    want_levels: bool,
    calls: _Calls,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Algorithm 1 for one batch of users; returns items, scores, nodes scored, level top-k."""
    batch = hist.shape[0]
    device = hist.device
    state = model.user_state(hist, windows)  # once per user
    calls.user_state += 1
    root = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1)
    # Algorithm 1, line 1, with the root expanded (unless it is the only node and a leaf)
    queue = root if tt.depth == 0 else tt.children_of(root)  # (B, C)
    base = torch.zeros(queue.shape, device=device) if path else None  # ancestors' log-prob
    queue, base, valid, n_valid, padded = _compact(queue, base)
    found_nodes: list[torch.Tensor] = []
    found_scores: list[torch.Tensor] = []
    level_top: list[torch.Tensor] = []
    scored = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
    for level in range(1, max(tt.depth, 1) + 1):  # Algorithm 1, lines 2-7: levels 1..depth
        if queue.shape[1] == 0:  # line 7: Q is empty
            break
        # Q holds nodes of one level (the root alone in a one-node tree), padded with -1 where
        # ``padded`` (the tree tensors index -1 as a no-children, non-leaf node of row 0); most
        # levels hold no leaf and no excluded node, and most hold no padding
        at = min(level, tt.depth)
        leaf = tt.is_leaf[queue] if tt.level_has_leaf[at] else None  # (B, C)
        any_leaf = leaf is not None and bool(leaf.any())
        if path or want_levels or queue.shape[1] > k or any_leaf:
            logits = _score(model, state, tt.rows[queue], calls)  # (B, C) line 4
            scored += n_valid
        else:  # Q holds at most k inner nodes: line 5 keeps them all whatever their scores
            logits = torch.zeros(queue.shape, device=device)
        rank = base + F.logsigmoid(logits) if path else logits  # (B, C) Sec. 5.4 for "path"
        if padded:
            rank = rank.masked_fill(~valid, -float("inf"))
        if want_levels and tt.depth > 0:
            level_top.append(_topk_pad(rank, queue, k)[0])  # (B, k)
        excluded = excluder(queue) if excluder is not None and excluder.levels[at] else None
        # line 3: leaves of Q go to A; only the best k of a level can reach the final top k
        if any_leaf:
            leaf_rank = rank.masked_fill(~leaf, -float("inf"))
            if excluded is not None:
                leaf_rank = leaf_rank.masked_fill_(excluded, -float("inf"))
            a_nodes, a_scores = _topk_pad(leaf_rank, queue, k)  # (B, k)
            found_nodes.append(a_nodes)
            found_scores.append(a_scores)
            rank = rank.masked_fill(leaf, -float("inf"))
        if excluded is not None:  # a subtree with every leaf excluded has nothing to give
            rank = rank.masked_fill(excluded, -float("inf"))
        # line 5: top k of the remaining (inner) nodes of Q; padding, leaves and excluded
        # subtrees rank -inf and never expand
        kk = min(k, queue.shape[1])
        top_s, top_i = rank.topk(kk, dim=1)  # (B, kk)
        top_nodes = queue.gather(1, top_i)  # (B, kk)
        if padded or any_leaf or excluded is not None:
            top_nodes.masked_fill_(torch.isneginf(top_s), -1)
        # line 6: Q = children of the top k
        queue = tt.children_of(top_nodes)  # (B, kk*a)
        if path:
            base = top_s.repeat_interleave(tt.max_arity, dim=1)  # (B, kk*a)
        queue, base, valid, n_valid, padded = _compact(queue, base)
    while want_levels and len(level_top) < tt.depth:
        level_top.append(torch.full((batch, k), -1, dtype=torch.long, device=device))
    # line 8: the top k of A
    if found_nodes:
        nodes, best = _topk_pad(torch.cat(found_scores, 1), torch.cat(found_nodes, 1), k)
    else:
        nodes = torch.full((batch, k), -1, dtype=torch.long, device=device)
        best = torch.full((batch, k), -float("inf"), device=device)
    item_ids = torch.where(nodes >= 0, tt.node_item[nodes.clamp(min=0)], -1)  # (B, k)
    return item_ids, best, scored, level_top


# ----------------------------------------------------------------------------- brute force
def brute_force(
    model: torch.nn.Module,
    tree: Tree,
    hist: Inputs,
    windows: Inputs,
    k: int,
    level: int | None = None,
    *,
    exclude: Exclude = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    node_chunk: int = 4096,
    with_stats: bool = False,
) -> BruteResult:
    """Score every candidate node for every user and keep the top k by logit.

    Candidates are all leaves (every item) by default, or all nodes of one level (Fig. 4's
    brute-force curve). Nodes are scored in chunks of ``node_chunk`` with a running top k.

    Args:
        model: scorer with ``user_state`` and ``score``.
        tree: the tree index.
        hist, windows: (U, L) int64 model inputs.
        k: number of results; at most the number of items is used (K = min(k, tree.n_items),
            as in ``beam_search``, so that a level's result lines up with its ``return_levels``).
        level: None for all leaves, else a level 1..depth.
        exclude: items never to return (see module docstring); applies to leaves only.
        device: where to run; default the model's device.
        batch_size: users per batch.
        node_chunk: nodes scored per ``model.score`` call.
        with_stats: also return a ``SearchStats``.
    Returns:
        ``(ids, scores)``, then ``stats`` with ``with_stats``: ids (U, K) int64 -- item ids when
        ``level`` is None, node ids otherwise -- padded with -1, and scores (U, K) float32 logits
        padded with -inf, best first.
    """
    n_users = _check_inputs(hist, windows, k, exclude)
    device = _model_device(model) if device is None else torch.device(device)
    tt = tree_tensors(tree, device)
    if level is None:
        candidates = tt.leaf_nodes  # (N,)
    else:
        if not 0 <= level <= tt.depth:
            raise ValueError(f"level {level} outside 0..{tt.depth}")
        lo, hi = int(tt.level_offsets[level]), int(tt.level_offsets[level + 1])
        candidates = torch.arange(lo, hi, device=device)
    k = min(k, tt.n_items)
    ids = np.full((n_users, k), -1, dtype=np.int64)
    scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    scored = np.zeros(n_users, dtype=np.int64)
    calls = _Calls()
    with _inference(model):
        for start in range(0, n_users, batch_size):
            stop = min(start + batch_size, n_users)
            batch = stop - start
            excluder = None if exclude is None else _Excluder(exclude, start, stop, tt, device)
            state = model.user_state(
                _as_long(hist, start, stop, device), _as_long(windows, start, stop, device)
            )
            calls.user_state += 1
            best_n = torch.full((batch, k), -1, dtype=torch.long, device=device)
            best_s = torch.full((batch, k), -float("inf"), device=device)
            for c0 in range(0, len(candidates), node_chunk):
                chunk = candidates[c0 : c0 + node_chunk].unsqueeze(0).expand(batch, -1)
                logits = model.score(state, tt.rows[chunk]).float()  # (B, N)
                calls.score += 1
                if excluder is not None:
                    logits = logits.masked_fill(excluder(chunk), -float("inf"))
                best_n, best_s = _topk_pad(
                    torch.cat([best_s, logits], 1), torch.cat([best_n, chunk], 1), k
                )
            scored[start:stop] = len(candidates)
            if level is None:
                best_n = torch.where(best_n >= 0, tt.node_item[best_n.clamp(min=0)], -1)
            ids[start:stop] = best_n.cpu().numpy()
            scores[start:stop] = best_s.cpu().numpy()
    return (ids, scores, calls.stats(scored)) if with_stats else (ids, scores)
