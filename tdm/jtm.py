"""Joint tree learning (JTM): the tree re-learnt from the trained model's own likelihood.

Beyond the TDM paper (ANCHORS.md, "Beyond the paper"): Zhu et al., "Joint Optimization of
Tree-based Index and Deep Model for Recommender Systems" (NeurIPS 2019), tree learning
(Algorithm 2 there). TDM (Sec. 3.5) re-learns the tree by k-means over the item embeddings;
JTM instead moves every item to the place where the trained model already likes it most.

Objective
---------
With the model fixed and ``A_c`` the training samples whose target is item ``c`` (a user's
history before a behaviour on ``c``), the tree (the projection ``pi`` of items onto leaves) is
chosen to maximise::

    L(pi) = sum_c L_c(pi(c)),   L_c(pi(c)) = sum_{u in A_c} sum_j log P(b_j(pi(c)) | u)

where ``b_j(n)`` is the ancestor of leaf ``n`` at level ``j`` and ``P = sigmoid(logit)`` as in
training (Eq. 4). Algorithm 2 of JTM solves it greedily, top-down, ``d`` levels at a time (the
"gap"): the items under a node ``n`` of level ``a`` are spread over the descendants of ``n`` at
level ``l = a + d``, each item to the descendant ``t`` that maximises its share of the objective
on levels ``a+1..l`` (the path from below ``n`` down to ``t``), subject to every descendant
receiving exactly as many items as it has leaves. Then the same is done under each node of
level ``l``, and so on down to the leaves.

As implemented (``learn_tree``)
------------------------------
1. The tree's *shape* is kept: the new tree has the old tree's ``parent`` array and only the
   items move between leaves (JTM changes the projection, not the tree). So every node id, and
   its embedding row (``Tree.embedding_rows``), means the same in both trees: the model's score
   for a node of the old tree is its score for the node at the same place in the new tree.
   Balance and depth are the old tree's (a balanced tree stays balanced).
2. Steps: ``a = 0, d, 2d, ...`` with ``l = min(a + d, depth - 1)``. For every internal node
   (*anchor*) of level ``a``, the *slots* are its descendants at level ``l``, plus any leaf
   above level ``l`` (a near-complete tree has leaves one level short; such a leaf is a slot of
   capacity one). A slot's capacity is its number of leaves (the paper's ``|C_n| / 2^d`` in a
   complete binary tree).
3. Weight of item ``c`` for slot ``t``: the sum over ``c``'s samples of
   ``log sigmoid(logit(u, v))`` over the internal nodes ``v`` on the path from level ``a + 1``
   down to ``t``. Every sample of the step is scored against all internal descendants of its
   item's anchor on levels ``a+1..l`` in one ``model.score`` call (``arity + ... + arity^d``
   nodes: 14 for a binary tree and ``d = 3``), in chunks of users under
   ``torch.inference_mode``; the path sums are one small matmul. With a sample cap (below) the
   sums over the samples drawn are scaled by ``samples / samples drawn``: an estimate of the
   sum over all the item's samples, which is the item's weight in the objective.
4. Leaves and the root do not count. A leaf's embedding is its item's own (Sec. 3.4: an item
   and its leaf share one embedding), so ``log P(leaf | u)`` is the same wherever the item goes;
   the root is on every path. The last step therefore decides the nodes of level
   ``depth - 1``; the leaves under one such node are interchangeable and take its items in the
   order of their old leaves.
5. The balanced assignment of a step is a transportation problem per anchor (items to slots,
   ``room[t]`` places in slot t, maximise the summed weights). It is solved through its dual,
   one price per slot: Sinkhorn's iterations in log space with an annealed temperature
   (``_prices``) give prices at which almost every item's best slot (weight less price)
   respects the room. Then the paper's greedy with rebalancing places the items exactly, on
   the weights less the prices, through ``tdm.tree_build``'s balanced k-means greedy
   (``_greedy_round``): every item proposes to its best slot with room; a slot offered more
   items than it has room keeps those that would lose the most by moving (the largest
   difference between their best and next-best open slot), is closed, and the others propose
   again; at most ``arity^d`` rounds. When the prices alone already fit, that assignment is
   optimal for the step (reported as ``optimal``). Ties go to the lower slot, then to the
   earlier item: the result is a function of the seed alone (on the CPU; CUDA's scatter-add
   may order float sums differently).
6. Items with no training sample carry no evidence: after the items with samples are placed,
   they fill the room that is left, each preferring the slot that holds its old leaf. With no
   samples at all the tree comes back unchanged.

Where the paper leaves room, and why these choices
--------------------------------------------------
- Rebalancing (point 5). The greedy alone, over the ``arity^d`` slots of a step, fails where
  slots tie: an item indifferent between the two slots under the child it needs has a regret
  of 0 there, so a full slot keeps items by position and pushes out items that need that side
  most (``tests/test_jtm.py``, the left/right toy: with d >= 2 the greedy puts the weakest
  items on the contested side). A nested split (one level of the step at a time, valuing a
  child by the best slot below it) fixes that case but over-rates children by that maximum.
  On a trained tiny model (tests/tiny.py, one epoch, ~12 samples an item, half the samples
  held out), objective per sample, start -6.71 in-sample / -6.72 held out: d = 1 -6.35 /
  -6.67; d = 3 greedy -6.37 / -6.78, nested -6.37 / -6.73, prices -6.24 / -6.58; d = 6 prices
  -6.18 / -6.55. So with the step solved properly a larger gap pays, as JTM reports.
- ``samples_per_item`` (``tree.jtm_samples_per_item``): at most this many samples of each item
  are scored, drawn uniformly at random (seeded); 0 uses all. The cost is linear in the samples
  scored; the cap touches only the items above it (the popular head, whose sums are then
  estimated, point 3). Without that scaling a cap biases the objective against popular items
  (cap 8 of ~12 samples: held out -6.94 instead of -6.61 with it). A cap far below an item's
  samples adds noise that can undo the gain (cap 4 of ~12: -6.98, worse than the start).
- The gap ``d`` (``tree.jtm_gap``): the paper suggests ``d = 7`` for binary trees. A step
  scores ``arity + ... + arity^d`` nodes per sample and builds each sample's user state once,
  and there are ``ceil((depth - 1) / d)`` steps. With the attention-DNN the user state costs
  about as much as 20-40 node scores, so ``d = 3`` or 4 is cheapest per sample; ``arity^d`` is
  capped at ``MAX_SLOTS`` (memory: the weights of a step are ``N * arity^d`` floats, and the
  price iterations hold a few such arrays).
- The score is ``log sigmoid`` of the logit: the log-probability the model is trained to give
  (Eq. 4), not the raw logit.

Cost (``benchmarks/jtm.py``): ``S * ceil((depth - 1) / d)`` user states and about
``S * (depth - 1) / d * 2 arity^d`` (user, node) scores for ``S`` samples scored; the prices
and the greedy take O(N arity^d) per Sinkhorn iteration (about 100 a step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdm.model import select_state
from tdm.tree import Tree
from tdm.tree_build import _greedy_round, subtree_leaf_counts

logger = logging.getLogger(__name__)

__all__ = ["MAX_SLOTS", "learn_tree", "tree_log_likelihood"]

MAX_SLOTS = 64  # largest arity**gap: slots per anchor and step (int8 greedy labels; memory)
CPU_SCORE_PAIRS = 8192  # (user, node) pairs per ``model.score`` call on the CPU (cache-sized)
CUDA_SCORE_PAIRS = 1 << 20
# Bytes of user state per ``model.user_state`` call on the CPU: the attention-DNN's retrieval
# state is ~330 KB a user, and a fresh ~80 MB state per 256 users costs page faults every call.
CPU_STATE_BYTES = 16 << 20
PRICE_SWEEPS = 12  # at most this many Sinkhorn temperatures per step (``_prices``)
SINKHORN_ITERS = 10  # Sinkhorn iterations per temperature
_BIG = 1e12

Features = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Step:
    """The candidate layout of one step (anchors at level ``a``, slots at level ``l``).

    Attributes:
        anchors: (A,) internal nodes of level a.
        rows: (A, C) embedding rows of the internal nodes on levels a+1..l under each anchor,
            -1 where there is none (a leaf, or no node in that position).
        path: (C, T) float32, 1 where column c lies on the path from level a+1 to slot t.
        slots: (A, T) slot node ids, -1 where there is none.
        room: (A, T) int64 leaves under each slot, 0 where there is none.
    """

    anchors: np.ndarray
    rows: np.ndarray
    path: np.ndarray
    slots: np.ndarray
    room: np.ndarray


def learn_tree(
    model: nn.Module,
    tree: Tree,
    targets: np.ndarray,
    features: Features,
    gap: int = 3,
    samples_per_item: int = 16,
    seed: int = 0,
    lengths: np.ndarray | None = None,
    device: torch.device | str | None = None,
    batch_users: int = 256,
    callback: Callable[[dict], None] | None = None,
) -> Tree:
    """JTM tree learning (Zhu et al. 2019, Algorithm 2); see the module docstring.

    Args:
        model: the trained scorer (``tdm.model`` protocol) of ``tree``: it scores that tree's
            embedding rows.
        tree: the tree the model was trained on; its shape is kept, its items move.
        targets: (S,) int item id of every training sample (the positive of that sample).
        features: ``features(index) -> (hist, windows)`` for (K,) sample indices: (K, L) int64
            arrays as ``model.user_state`` takes them (``TrainSamples.batch``).
        gap: levels decided per step (the paper's d), >= 1, ``arity**gap <= MAX_SLOTS``.
        samples_per_item: at most this many samples per item, drawn at random; 0: all.
        seed: seed of the sample draw (the only randomness).
        lengths: (S,) optional history lengths; samples are scored in this order (less padding).
        device: where to score; default the model's device.
        batch_users: samples per ``model.user_state`` call.
        callback: ``callback(info)`` after every step, ``info`` a dict of step statistics.
    Returns:
        The new tree: ``tree``'s shape with every item at exactly one leaf.
    Raises:
        ValueError: a bad gap or cap.
        KeyError: a target that is not an item of the tree.
    """
    if gap < 1:
        raise ValueError(f"gap must be >= 1, got {gap}")
    arity = tree.max_arity if tree.n_nodes > 1 else 2
    if arity**gap > MAX_SLOTS:
        raise ValueError(
            f"arity**gap = {arity}**{gap} = {arity**gap} slots per step; at most {MAX_SLOTS}"
        )
    if samples_per_item < 0:
        raise ValueError(f"samples_per_item must be >= 0, got {samples_per_item}")
    targets = np.asarray(targets, dtype=np.int64).ravel()
    n_items = tree.n_items
    item_of_leaf = np.full(tree.n_nodes, -1, dtype=np.int64)  # leaf node -> item position
    item_of_leaf[tree.leaf_nodes] = np.arange(n_items)
    old_leaf = tree.leaf_nodes  # (N,) item position k sits at old_leaf[k]
    sample_item = item_of_leaf[tree.item_to_leaf(targets)] if len(targets) else targets
    rng = np.random.default_rng(seed)
    kept = _cap_samples(sample_item, samples_per_item, rng)  # (S',) sample indices
    if lengths is not None:
        kept = kept[np.argsort(np.asarray(lengths)[kept], kind="stable")]
    kept_item = sample_item[kept]  # (S',)
    used = np.bincount(kept_item, minlength=n_items)  # (N,) samples scored per item
    has_samples = used > 0
    # a capped item's sums estimate the sums over all its samples (the objective's weight)
    scale = np.bincount(sample_item, minlength=n_items) / np.maximum(used, 1)  # (N,)

    counts = subtree_leaf_counts(tree)
    emb_rows = tree.embedding_rows()
    anchor = np.zeros(n_items, dtype=np.int64)  # (N,) current node of each item, level a
    scorer = _Scorer(model, features, device, batch_users)
    a = 0
    with scorer:
        while a < tree.depth - 1 and not tree.is_leaf[0]:
            level = min(a + gap, tree.depth - 1)
            t0 = time.perf_counter()
            step = _build_step(tree, counts, emb_rows, a, level)
            weights, n_scored = scorer.weights(step, anchor, kept, kept_item, n_items)
            weights *= scale[:, None]
            t1 = time.perf_counter()
            old_slot = _ancestor_at_level(tree, old_leaf, level)  # (N,) old place at level l
            anchor, solved = _assign(step, anchor, weights, has_samples, old_slot, tree.is_leaf)
            info = {
                "levels": [a, level],
                "anchors": len(step.anchors),
                "slots": int(step.slots.shape[1]),
                "nodes_per_sample": int(step.rows.shape[1]),
                "samples_scored": n_scored,
                "moved": float(np.mean(anchor != old_slot)),
                **solved,
                "seconds_scoring": round(t1 - t0, 3),
                "seconds_assign": round(time.perf_counter() - t1, 3),
            }
            logger.info("jtm levels %d..%d: %s", a + 1, level, info)
            if callback is not None:
                callback(info)
            a = level
    new_leaf = _fill_leaves(tree, anchor, old_leaf)
    node_item = tree.node_item.copy()
    node_item[new_leaf] = tree.leaf_items
    return Tree(tree.parent, node_item)


def tree_log_likelihood(
    model: nn.Module,
    tree: Tree,
    targets: np.ndarray,
    features: Features,
    device: torch.device | str | None = None,
    batch_users: int = 256,
) -> float:
    """Mean over samples of ``sum_j log sigmoid(logit(u, b_j))`` over the internal nodes
    ``b_j`` of levels 1..depth-1 above each sample's target: the part of JTM's objective that
    depends on the tree (the module docstring, points 3-4).

    Args:
        model, tree, targets, features, device, batch_users: as for ``learn_tree``.
    Returns:
        float, <= 0; 0.0 without samples or internal levels.
    """
    targets = np.asarray(targets, dtype=np.int64).ravel()
    if len(targets) == 0 or tree.depth < 2:
        return 0.0
    ancestors = tree.ancestors(tree.item_to_leaf(targets))[:, 1:-1]  # (S, depth-1)
    inner = (ancestors >= 0) & ~tree.is_leaf[np.maximum(ancestors, 0)]
    rows = np.where(inner, tree.embedding_rows()[np.maximum(ancestors, 0)], -1)
    total = 0.0
    scorer = _Scorer(model, features, device, batch_users)
    with scorer:
        for start in range(0, len(targets), scorer.batch_users):
            index = np.arange(start, min(start + scorer.batch_users, len(targets)))
            total += float(scorer.log_probs(index, rows[index]).sum())
    return total / len(targets)


# ----------------------------------------------------------------------------- samples
def _cap_samples(sample_item: np.ndarray, per_item: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``per_item`` samples of every item, drawn uniformly (0: all), sorted."""
    n = len(sample_item)
    if per_item == 0 or n == 0:
        return np.arange(n, dtype=np.int64)
    if np.bincount(sample_item).max() <= per_item:
        return np.arange(n, dtype=np.int64)
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(sample_item[shuffled], kind="stable")]  # by item, random within
    item_sorted = sample_item[order]
    first = np.searchsorted(item_sorted, item_sorted, side="left")  # (n,) start of each run
    keep = np.arange(n) - first < per_item
    return np.sort(order[keep])


# ----------------------------------------------------------------------------- one step
def _build_step(tree: Tree, counts: np.ndarray, emb_rows: np.ndarray, a: int, l: int) -> _Step:
    """Candidates and slots of the step from level ``a`` to level ``l`` (> a)."""
    k = tree.max_arity
    h = l - a
    lo, hi = tree.level_offsets[a], tree.level_offsets[a + 1]
    nodes = np.arange(lo, hi)
    anchors = nodes[~tree.is_leaf[nodes]]  # (A,)
    n_anchor = len(anchors)
    levels = []  # levels[r-1]: (A, k^r) descendants at relative level r, -1 padding
    cur = anchors[:, None]
    for _ in range(h):
        flat = cur.reshape(-1)
        kids = np.full((len(flat), k), -1, dtype=np.int64)
        ok = flat >= 0
        if ok.any():
            kids[ok] = tree.children_of(flat[ok])
        cur = kids.reshape(n_anchor, -1)
        levels.append(cur)
    n_slots = k**h
    t = np.arange(n_slots)
    slots = levels[-1].copy()  # (A, T)
    for r in range(1, h):  # a leaf above level l is a slot, in its first column
        span = k ** (h - r)
        anc = levels[r - 1][:, t // span]  # (A, T)
        is_leaf_above = (anc >= 0) & tree.is_leaf[np.maximum(anc, 0)]
        slots = np.where(is_leaf_above & (t % span == 0), anc, slots)
    room = np.where(slots >= 0, counts[np.maximum(slots, 0)], 0)

    cand = np.concatenate(levels, axis=1)  # (A, C_full)
    inner = (cand >= 0) & ~tree.is_leaf[np.maximum(cand, 0)]
    offsets = np.cumsum([0] + [k**r for r in range(1, h + 1)])
    path = np.zeros((offsets[-1], n_slots), dtype=np.float32)
    for r in range(1, h + 1):
        path[offsets[r - 1] + t // k ** (h - r), t] = 1.0
    keep = inner.any(0)  # columns holding an internal node under some anchor
    rows = np.where(inner, emb_rows[np.maximum(cand, 0)], -1)[:, keep]
    return _Step(anchors, rows, path[keep], slots, room)


def _assign(
    step: _Step,
    anchor: np.ndarray,
    weights: np.ndarray,
    has_samples: np.ndarray,
    old_slot: np.ndarray,
    is_leaf: np.ndarray,
    sweeps: int = PRICE_SWEEPS,
) -> tuple[np.ndarray, dict]:
    """Balanced assignment of the items under every anchor to its slots (module docstring,
    point 5): slot prices by coordinate descent on the dual, then the greedy on the weights
    less the prices, then the items without samples.

    Args:
        step: the step's layout.
        anchor: (N,) current node of every item (level a, or a leaf above).
        weights: (N, T) float64 weight of every item for every slot of its anchor.
        has_samples: (N,) bool.
        old_slot: (N,) the item's old ancestor at level l (its old leaf when shallower).
        is_leaf: (n_nodes,) bool.
        sweeps: at most this many price sweeps.
    Returns:
        (N,) the new node of every item (level l, or a leaf above), and figures of the
        assignment: ``price_sweeps`` run and ``optimal`` (the prices alone met every capacity,
        which proves the step's assignment optimal).
    """
    n_slots = step.slots.shape[1]
    active = np.flatnonzero(~is_leaf[anchor])  # items under an anchor of this step
    if len(active) == 0:
        return anchor, {"price_sweeps": 0, "optimal": True}
    row = np.searchsorted(step.anchors, anchor[active])  # (n,) anchor row of each item
    used, seg = np.unique(row, return_inverse=True)  # anchors holding items (all, normally)
    order = np.argsort(seg, kind="stable")  # by anchor, items in position order
    size = np.bincount(seg, minlength=len(used))
    rank = np.empty(len(active), dtype=np.int64)
    rank[order] = np.arange(len(active)) - (np.cumsum(size) - size)[seg[order]]
    member = np.full((len(used), int(size.max())), -1, dtype=np.int64)  # (S, W) items
    member[seg, rank] = active
    valid = member >= 0
    safe = np.maximum(member, 0)
    room = step.room[used].copy()  # (S, T)
    if not np.array_equal(room.sum(1), size):
        raise AssertionError("jtm: slot capacities do not match the items under an anchor")

    first = valid & has_samples[safe]  # (S, W) placed first, by their weights
    value = np.where(room[:, None, :] > 0, weights[safe], -np.inf)  # (S, W, T)
    value[~first] = -np.inf
    price, sweeps_run, optimal = _prices(value, first, room, sweeps)
    dist = -np.ascontiguousarray(np.moveaxis(value - price[:, None, :], 2, 0), np.float32)
    labels = np.where(first, -1, n_slots).astype(np.int8)  # (S, W), -1: to place
    _greedy(dist, labels, room)  # (T, S, W) dist: exact capacities
    late = valid & ~first  # without samples: the room left, their old slot first
    if late.any():
        at_old = step.slots[used][:, None, :] == old_slot[safe][:, :, None]  # (S, W, T)
        dist = -np.ascontiguousarray(np.moveaxis(at_old, 2, 0), dtype=np.float32)
        labels[late] = -1
        _greedy(dist, labels, room)
    out = anchor.copy()
    out[member[valid]] = step.slots[used[np.nonzero(valid)[0]], labels[valid].astype(np.int64)]
    if np.any(out[active] < 0):
        raise AssertionError("jtm: an item was assigned to no slot")
    return out, {"price_sweeps": sweeps_run, "optimal": optimal}


def _prices(
    value: np.ndarray, valid: np.ndarray, room: np.ndarray, sweeps: int
) -> tuple[np.ndarray, int, bool]:
    """Slot prices for the balanced assignment: the entropy-smoothed dual (Sinkhorn).

    The step's problem, per anchor, is a transportation problem: maximise
    ``sum_i value[i, slot(i)]`` with ``room[t]`` places in slot t. Its dual variables are slot
    prices ``p``: at the optimum every item takes a slot maximising ``value[i, t] - p[t]``.
    The prices come from Sinkhorn's iterations on the soft assignment
    ``P[i, t] ~ exp((value[i, t] - p[t]) / tau)`` (rows summing to one, slot ``t`` receiving
    ``room[t]``; ``p >= 0`` where the anchor has items without samples, whose room is only an
    upper bound), in log space, with the temperature ``tau`` halved every ``SINKHORN_ITERS``
    iterations from the median spread of the items' weights down to 1/1024 of it (``sweeps``
    halvings at most). Unlike coordinate descent on the exact dual, this does not stall where
    slots tie. The caller rounds with the greedy on ``value - p``.

    Args:
        value: (S, W, T) weights, -inf where an item may not go or is not placed here.
        valid: (S, W) bool, the items to place.
        room: (S, T) int64 places per slot.
        sweeps: at most this many temperatures.
    Returns:
        (S, T) float64 prices, temperatures run, and whether every item's best slot at these
        prices fits in the room (then that assignment is optimal: complementary slackness).
    """
    n_seg, width, n_slots = value.shape
    price = np.zeros((n_seg, n_slots))
    count = valid.sum(1)
    if not valid.any():
        return price, 0, True
    upper = (count < room.sum(1))[:, None]  # (S, 1) room beyond the items: p >= 0
    with np.errstate(divide="ignore"):
        log_room = np.log(room.astype(np.float64))  # (S, T), -inf where closed
    finite = np.isfinite(value)
    lo = np.where(finite, value, np.inf).min(-1)
    spread = value.max(-1) - lo  # (S, W)
    tau = float(np.median(spread[valid & np.isfinite(spread)])) if valid.any() else 1.0
    tau = max(tau, 1e-6)
    safe = np.where(finite, value, -_BIG)  # (S, W, T), huge penalty instead of -inf
    done = 0
    optimal = False
    for sweep in range(1, sweeps + 1):
        done = sweep
        for _ in range(SINKHORN_ITERS):
            scaled = (safe - price[:, None, :]) / tau  # (S, W, T)
            row = _logsumexp(scaled, 2)  # (S, W)
            col = _logsumexp(np.where(valid[:, :, None], safe / tau - row[:, :, None], -np.inf), 1)
            new = tau * (col - log_room)  # (S, T): slot t receives room[t]
            new = np.where(upper, np.maximum(new, 0.0), new)
            price = np.where(room > 0, new, _BIG)
            price -= np.where(upper, 0.0, price.min(1, keepdims=True))  # equality: shift-free
        best = np.argmax(value - price[:, None, :], axis=2)  # (S, W)
        want = np.zeros((n_seg, n_slots), dtype=np.int64)
        np.add.at(want, (np.nonzero(valid)[0], best[valid]), 1)
        optimal = bool(np.all(want <= room))
        if optimal or tau < 1e-3 * spread[valid].max(initial=0.0):
            break
        tau /= 2.0
    return price, done, optimal


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(x))) along ``axis``; -inf where every entry is -inf."""
    top = x.max(axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(x - top).sum(axis, keepdims=True)) + top
    return np.squeeze(out, axis)


def _greedy(dist: np.ndarray, labels: np.ndarray, room: np.ndarray) -> None:
    """Run ``tdm.tree_build._greedy_round`` until every free item (label -1) is placed.

    Args:
        dist: (T, A, W) float32 distance of every item to every slot (lower is better).
        labels: (A, W) int8 slot of each item, -1 where free; updated in place.
        room: (A, T) int64 places left per slot; updated in place.
    """
    for _ in range(dist.shape[0]):  # each round closes a slot of every unfinished anchor
        rows = np.flatnonzero((labels < 0).any(1))
        if len(rows) == 0:
            return
        if len(rows) == len(labels):
            _greedy_round(dist, labels, room)
            continue
        sub_labels, sub_room = labels[rows], room[rows]
        _greedy_round(dist[:, rows], sub_labels, sub_room)
        labels[rows], room[rows] = sub_labels, sub_room
    if (labels < 0).any():
        raise AssertionError("jtm: the balanced assignment left items unplaced")


def _ancestor_at_level(tree: Tree, nodes: np.ndarray, level: int) -> np.ndarray:
    """Ancestor of each node at ``level`` (the node itself where it is shallower)."""
    cur = np.asarray(nodes, dtype=np.int64).copy()
    while True:
        up = tree.level[cur] > level
        if not up.any():
            return cur
        cur[up] = tree.parent[cur[up]]


def _fill_leaves(tree: Tree, anchor: np.ndarray, old_leaf: np.ndarray) -> np.ndarray:
    """(N,) leaf of every item: items at a leaf keep it; the items of an internal node (whose
    children are all leaves) take its children in the order of their old leaves."""
    leaf = anchor.copy()
    inner = np.flatnonzero(~tree.is_leaf[anchor])
    if len(inner) == 0:
        return leaf
    order = inner[np.lexsort((old_leaf[inner], anchor[inner]))]
    parents = anchor[order]
    first = np.searchsorted(parents, parents, side="left")
    leaf[order] = tree.child_offsets[parents] + np.arange(len(order)) - first
    if not np.all(tree.is_leaf[leaf]) or len(np.unique(leaf)) != len(leaf):
        raise AssertionError("jtm: the last level does not hold one item per leaf")
    return leaf


# ----------------------------------------------------------------------------- scoring
class _Scorer:
    """Chunked, inference-mode scoring of (sample, node-row) pairs with a ``tdm.model``
    scorer. A context manager: eval mode inside, the model's mode restored after."""

    def __init__(
        self,
        model: nn.Module,
        features: Features,
        device: torch.device | str | None,
        batch_users: int,
    ) -> None:
        self.model = model
        self.features = features
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.batch_users = max(int(batch_users), 1)
        self.pairs = CPU_SCORE_PAIRS if self.device.type == "cpu" else CUDA_SCORE_PAIRS
        self.state_users = self.batch_users  # users per ``user_state`` call (log_probs)
        self._sized = False
        self._mode = model.training
        self._inference: torch.inference_mode | None = None

    def __enter__(self) -> _Scorer:
        self._mode = self.model.training
        self.model.eval()
        self._inference = torch.inference_mode()
        self._inference.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inference.__exit__(*exc)
        self.model.train(self._mode)

    def log_probs(self, index: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """(B, C) float32 ``log sigmoid(logit)`` of samples ``index`` for node rows ``rows``
        (B, C) (-1: none, giving 0), on the scoring device.

        On the CPU the users go through ``model.user_state`` a few at a time, as many as fit in
        ``CPU_STATE_BYTES`` (measured on the first call), and ``model.score`` sees at most
        ``CPU_SCORE_PAIRS`` pairs a call."""
        hist, windows = self.features(index)
        hist = torch.as_tensor(np.asarray(hist, dtype=np.int64), device=self.device)  # (B, L)
        windows = torch.as_tensor(np.asarray(windows, dtype=np.int64), device=self.device)
        node_rows = torch.as_tensor(rows, device=self.device)  # (B, C)
        n, c = node_rows.shape
        per_call = max(1, self.pairs // max(c, 1))
        out = torch.empty(n, c, dtype=torch.float32, device=self.device)
        start = 0
        while start < n:
            end = min(start + self.state_users, n)
            state = self.model.user_state(hist[start:end], windows[start:end])
            if self.device.type == "cpu" and not self._sized:
                per_user = _state_bytes(state) / max(end - start, 1)
                self.state_users = int(np.clip(CPU_STATE_BYTES // max(per_user, 1), 8, 4096))
                self._sized = True
            for s in range(start, end, per_call):
                e = min(s + per_call, end)
                whole = s == start and e == end
                part = state if whole else select_state(state, slice(s - start, e - start))
                logits = self.model.score(part, node_rows[s:e])  # (b, C)
                out[s:e] = F.logsigmoid(logits.float())
            start = end
        return out.masked_fill_(node_rows < 0, 0.0)

    def weights(
        self,
        step: _Step,
        anchor: np.ndarray,
        kept: np.ndarray,
        kept_item: np.ndarray,
        n_items: int,
    ) -> tuple[np.ndarray, int]:
        """(N, T) float64 summed path log-probabilities of every item for every slot of its
        anchor (step point 3), and the number of samples scored."""
        n_slots = step.slots.shape[1]
        out = torch.zeros(n_items, n_slots, dtype=torch.float64)  # (N, T)
        if step.rows.shape[1] == 0 or len(kept) == 0:
            return out.numpy(), 0
        anchor_row = np.full(int(step.anchors.max()) + 1, -1, dtype=np.int64)
        anchor_row[step.anchors] = np.arange(len(step.anchors))
        item_anchor = anchor[kept_item]  # (S',)
        live = item_anchor <= step.anchors[-1]
        live[live] = anchor_row[item_anchor[live]] >= 0  # the item is under an anchor of a
        samples, items = kept[live], kept_item[live]
        rows_of = anchor_row[anchor[items]]  # (S'',) anchor row of each sample
        path = torch.as_tensor(step.path, device=self.device)  # (C, T)
        for s in range(0, len(samples), self.batch_users):
            e = min(s + self.batch_users, len(samples))
            log_p = self.log_probs(samples[s:e], step.rows[rows_of[s:e]])  # (B, C)
            sums = (log_p @ path).to("cpu", torch.float64)  # (B, T)
            out.index_add_(0, torch.as_tensor(items[s:e]), sums)
        return out.numpy(), len(samples)


def _state_bytes(state: torch.Tensor | tuple) -> int:
    """Bytes held by a user state (a tensor or a tuple of tensors, None parts allowed)."""
    parts = [state] if isinstance(state, torch.Tensor) else [t for t in state if t is not None]
    return sum(t.numel() * t.element_size() for t in parts)
