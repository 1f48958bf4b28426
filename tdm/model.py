"""Scorers: the deep models that judge a (user, tree node) pair (Sec. 3.4, Fig. 2, Sec. 5.4).

Scorer protocol
---------------
Any ``torch.nn.Module`` that follows this protocol can be trained, checkpointed and used in beam
search. ``model.name`` in ``params.yaml`` is one of the built-ins below or ``"pkg.module:Class"``
naming a user class, which is then constructed as ``Class(n_embeddings, cfg, time_windows)``.

- ``Class(n_embeddings: int, cfg: ModelConfig, time_windows: int)``.
- ``embedding: nn.Embedding(n_embeddings, d)``: the single node table. Rows ``0..n_items-1`` are
  the items (= leaves: each item and its leaf share one embedding, Sec. 3.4), internal nodes follow
  (``Tree.embedding_rows()``). A behaviour's row is its item index. Exported to re-learn the tree.
- ``user_state(hist, windows) -> state``: ``hist`` (B, L) int64 embedding rows left-padded with
  -1, ``windows`` (B, L) int64 time window of each behaviour in ``[0, W)`` (0 = most recent), -1 on
  padding. Everything that does not depend on the node is computed here, once per user.
- ``score(state, node_rows) -> logits``: ``node_rows`` (B, N) int64 embedding rows, N nodes per
  user; returns (B, N) logits of P(user is interested in node) (a single logit is the paper's
  two-way softmax, ``softmax([0, z])[1] = sigmoid(z)``).
- ``forward(hist, windows, node_rows) = score(user_state(hist, windows), node_rows)``.

A state is a tensor or a tuple of tensors, each with the batch (user) dimension first; a
``NamedTuple`` (``AttentionState``) names its parts, and a part may be None (absent). Beam search
scores the N candidate nodes of every user in one ``score`` call (no expansion of the state);
code that needs a subset of the users (say, dropping finished ones) uses
``select_state(state, index)``, which indexes the first dimension of every tensor and keeps the
tuple's type, so a custom scorer's state must keep the batch dimension first in every tensor.

Built-ins
---------
- ``attention_dnn`` (Fig. 2): a DIN-style activation unit weights every behaviour against the
  candidate node, the weighted behaviours are averaged per time window, the W window vectors and
  the node embedding are concatenated and fed to FC layers (Linear + BatchNorm + PReLU) and a final
  Linear(1).
- ``dnn`` (TDM DNN, Sec. 5.4): the same without the activation unit (all weights 1.0).
- ``product_dnn`` (TDM product-DNN, Sec. 5.4): no attention, no node embedding in the input; the
  logit is the inner product of a user vector and the node embedding.

With ``model.node_bias`` every built-in adds a learnt bias per node (a row per embedding row,
zero at start) to its logit: a popularity prior the network does not have to learn through the
node embedding (measured in docs/RESULTS.md: it lifts the attention-DNN on ml-latest-small and
costs recall on the synthetic default, so it is off by default). It stays a per-node term, so
beam search and the max-heap reasoning are unchanged; ``warm_start`` gives a re-learnt tree's
internal nodes the largest bias of their children.

"Weighted average" per time window (Fig. 2) is implemented as the weighted sum of the window's
behaviour embeddings divided by the number of behaviours in that window (not by the sum of the
weights, which are unnormalised activation outputs and may be negative or near zero); an empty
window gives a zero vector.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tdm.config import ModelConfig

logger = logging.getLogger(__name__)

State = torch.Tensor | tuple[torch.Tensor | None, ...]

EMBEDDING_STD = 0.05


def select_state(state: State, index: torch.Tensor | slice) -> State:
    """Select users from a state.

    Args:
        state: a tensor or a tuple of tensors (a ``NamedTuple`` included), batch (user)
            dimension first; None parts are allowed.
        index: (K,) int64 user positions, (B,) bool mask or a slice.
    Returns:
        The same structure (a ``NamedTuple`` keeps its type) with every tensor indexed along its
        first dimension; None parts stay None.
    """
    if isinstance(state, torch.Tensor):
        return state[index]
    parts = [None if t is None else t[index] for t in state]
    make = getattr(state, "_make", None)  # a NamedTuple
    return make(parts) if make is not None else tuple(parts)


def window_weights(
    hist: torch.Tensor,
    windows: torch.Tensor,
    time_windows: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Averaging weights that spread each behaviour over its time window.

    Args:
        hist: (B, L) int64 embedding rows, -1 on padding.
        windows: (B, L) int64 time windows in [0, W), -1 on padding (values >= W go to W-1).
        time_windows: W.
        dtype: of the result.
    Returns:
        (B, L, W): ``1 / n_w`` where behaviour l lies in window w holding ``n_w`` valid
        behaviours, 0 elsewhere (padding and other windows).
    """
    valid = (hist >= 0) & (windows >= 0)  # (B, L)
    win = windows.clamp(0, time_windows - 1)
    onehot = F.one_hot(win, time_windows).to(dtype) * valid.unsqueeze(-1)  # (B, L, W)
    count = onehot.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, W)
    return onehot / count


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear + BatchNorm1d + PReLU for each consecutive pair of ``sizes``."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.PReLU()]
    return nn.Sequential(*layers)


def _rows(index: torch.Tensor) -> torch.Tensor:
    """Padding-safe embedding rows: -1 becomes row 0 (callers mask it)."""
    return index.clamp_min(0)


class _Scorer(nn.Module):
    """Common parts: the embedding table, window averaging and ``forward``."""

    def __init__(self, n_embeddings: int, cfg: ModelConfig, time_windows: int) -> None:
        super().__init__()
        if time_windows < 1:
            raise ValueError("time_windows must be >= 1")
        self.cfg = cfg
        self.n_embeddings = n_embeddings
        self.time_windows = time_windows
        self.dim = cfg.embedding_dim
        self.embedding = nn.Embedding(n_embeddings, cfg.embedding_dim)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_STD)  # Fig. 2: random init
        self.node_bias = nn.Embedding(n_embeddings, 1) if cfg.node_bias else None
        if self.node_bias is not None:
            nn.init.zeros_(self.node_bias.weight)

    def window_means(self, hist: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(B, W*D) unweighted per-window means of the behaviour embeddings (zeros if empty)."""
        emb = self.embedding(_rows(hist))  # (B, L, D)
        avg = window_weights(hist, windows, self.time_windows, emb.dtype)  # (B, L, W)
        means = torch.einsum("blw,bld->bwd", avg, emb)  # (B, W, D)
        return means.flatten(1)  # (B, W*D)

    def node_embedding(self, node_rows: torch.Tensor) -> torch.Tensor:
        """(B, N) rows -> (B, N, D) embeddings: ``self.embedding`` without a module call (one
        per scored level; sparse gradients as the table is set)."""
        table = self.embedding
        return F.embedding(_rows(node_rows), table.weight, sparse=table.sparse)

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> State:
        raise NotImplementedError

    def score(self, state: State, node_rows: torch.Tensor) -> torch.Tensor:
        """(B, N) logits: the model's own score plus the node's bias when ``model.node_bias``."""
        logits = self.node_score(state, node_rows)
        if self.node_bias is None:
            return logits
        bias = F.embedding(_rows(node_rows), self.node_bias.weight, sparse=self.node_bias.sparse)
        return logits + bias.squeeze(-1).to(logits.dtype)

    def node_score(self, state: State, node_rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, hist: torch.Tensor, windows: torch.Tensor, node_rows: torch.Tensor
    ) -> torch.Tensor:
        """(B, L), (B, L), (B, N) -> (B, N) logits."""
        return self.score(self.user_state(hist, windows), node_rows)


class _Head(nn.Module):
    """FC layers after the first Linear: BN + PReLU, then Linear + BN + PReLU ..., Linear(1).

    The first Linear is kept outside so that callers can split it (``first_params``). In eval
    mode every BatchNorm is an affine map of its running statistics and is folded into the Linear
    before it (``_fold_norm``): retrieval scores each node without a separate normalisation pass.
    """

    def __init__(self, n_in: int, hidden: Sequence[int]) -> None:
        super().__init__()
        hidden = list(hidden)
        if not hidden:
            raise ValueError("model.hidden must name at least one layer")
        self.first = nn.Linear(n_in, hidden[0])
        self.first_norm = nn.Sequential(nn.BatchNorm1d(hidden[0]), nn.PReLU())
        self.rest = _mlp(hidden)
        self.out = nn.Linear(hidden[-1], 1)
        self._folded: dict[int, tuple[tuple, tuple, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pinned: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # ``frozen``
        self._pin_depth = 0

    def _fold(self, layer: int, linear: nn.Linear, norm: nn.BatchNorm1d):
        """``_fold_norm(linear, norm)``, kept while no gradient is recorded and none of its inputs
        changed (same tensors, same in-place version: an optimizer step or ``load_state_dict``
        moves the version). One user's beam search scores ~20 levels: recomputing the folds
        at every level cost ~15% of it. Within ``frozen`` the check runs once per layer."""
        if torch.is_grad_enabled():
            return _fold_norm(linear, norm)
        pinned = self._pinned
        if pinned is not None and layer in pinned:
            return pinned[layer]
        inputs = (linear.weight, linear.bias, norm.weight, norm.bias)
        inputs += (norm.running_mean, norm.running_var)
        # ids are unique while the kept entry holds the tensors themselves; data_ptr sees a
        # parameter whose storage was swapped (``module.to``, ``.double()``)
        key = (*map(id, inputs), *[(t._version, t.data_ptr()) for t in inputs])
        kept = self._folded.get(layer)
        if kept is None or kept[0] != key:
            kept = (key, inputs, _fold_norm(linear, norm))
            self._folded[layer] = kept
        if pinned is not None:
            pinned[layer] = kept[2]
        return kept[2]

    def first_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first Linear's weight (H1, n_in) and bias (H1,).

        In eval mode its BatchNorm is folded in (``after_first`` then skips it).
        """
        if self.training:
            return self.first.weight, self.first.bias
        return self._fold(0, self.first, self.first_norm[0])

    def after_first(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, H1) output of ``first_params`` -> (B, N) logits."""
        B, N, H = h.shape
        h = h.reshape(B * N, H)  # (B*N, H1)
        if self.training:
            h = self.rest(self.first_norm(h))  # (B*N, H_last)
        else:  # functional calls: a module call's overhead is felt at ~20 levels per search
            h = F.prelu(h, self.first_norm[1].weight)  # the BatchNorm is in ``first_params``
            layers = list(self.rest)
            triples = zip(layers[0::3], layers[1::3], layers[2::3], strict=True)
            for i, (linear, norm, act) in enumerate(triples, start=1):
                h = F.prelu(F.linear(h, *self._fold(i, linear, norm)), act.weight)
        return F.linear(h, self.out.weight, self.out.bias).view(B, N)  # (B, N)


_PIN_LOCK = threading.Lock()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Within the block the built-in heads check once per layer that their folded BatchNorms
    are current and then reuse them: for a caller that scores many times with weights that do
    not change meanwhile (beam search). Blocks may nest and run on several threads."""
    heads = [m for m in model.modules() if isinstance(m, _Head)]
    with _PIN_LOCK:
        for head in heads:
            if head._pin_depth == 0:
                head._pinned = {}
            head._pin_depth += 1
    try:
        yield
    finally:
        with _PIN_LOCK:
            for head in heads:
                head._pin_depth -= 1
                if head._pin_depth == 0:
                    head._pinned = None


def _fold_norm(linear: nn.Linear, norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(linear(x))`` with ``norm`` in eval mode (running statistics)."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)  # (H,)
    return linear.weight * scale[:, None], (linear.bias - norm.running_mean) * scale + norm.bias


CPU_CHUNK_ELEMENTS = 1 << 21
CUDA_CHUNK_ELEMENTS = 1 << 26


def _chunk_users(device: torch.device, per_user: int) -> int:
    """Users per chunk of the activation unit: cache-sized on CPU, large on GPUs."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS
    return max(1, budget // max(per_user, 1))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when it is a no-op (scoring runs ~20 times a search)."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``t``'s device, else ``t.dtype``."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class _ActivationUnit(torch.autograd.Function):
    """Activation-unit weights (Fig. 2) from the split first layer, chunked and memory-lean.

    For user b, node n and behaviour l (H values each)::

        x[b, n, l] = A3·(emb[b, l] * node[b, n]) + user_part[b, l] + node_part[b, n]
        weight[b, n, l] = PReLU(x[b, n, l]) @ out_weight + out_bias

    The pair term is one batched matmul of the node embeddings against ``emb[b] ⊙ A3``
    (D, L*H) per user. The (B, N, L, H) pre-activation is built a chunk of users at a time
    (cache-sized on CPU) and recomputed in backward instead of stored, so the largest tensor of
    the model never exists in full.
    """

    @staticmethod
    def forward(
        ctx: Any,
        node: torch.Tensor,  # (B, N, D)
        emb: torch.Tensor,  # (B, L, D) behaviour embeddings
        pair: torch.Tensor,  # (H, D) A3
        user_part: torch.Tensor,  # (B, L, H)
        node_part: torch.Tensor,  # (B, N, H)
        slope: torch.Tensor,  # (1,) PReLU slope
        out_weight: torch.Tensor,  # (H,)
        out_bias: torch.Tensor,  # (1,)
        chunk: int,
    ) -> torch.Tensor:
        B, N, _ = node.shape
        L = emb.shape[1]
        out = node.new_empty(B, N, L)
        with torch.autocast(node.device.type, enabled=False):
            for s in range(0, B, chunk):
                e = min(s + chunk, B)
                _, x = _pre_activation(node, emb, pair, user_part, node_part, s, e)  # (c,N,L,H)
                torch.matmul(F.prelu(x, slope), out_weight, out=out[s:e])  # (c, N, L)
            out += out_bias
        ctx.save_for_backward(node, emb, pair, user_part, node_part, slope, out_weight)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(grad.device.type, enabled=False):
            return _ActivationUnit._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        node, emb, pair, user_part, node_part, slope, out_weight = ctx.saved_tensors
        B, N, D = node.shape
        L, H = user_part.shape[1], user_part.shape[2]
        grad = grad.to(node.dtype).contiguous()  # (B, N, L)
        g_node = torch.empty_like(node)
        g_emb = torch.empty_like(emb)
        acc = torch.promote_types(node.dtype, torch.float32)  # accumulate in >= float32
        g_pair = torch.zeros(H, D, dtype=acc, device=node.device)
        g_user = torch.empty_like(user_part)
        g_npart = torch.empty_like(node_part)
        g_x_sum = torch.zeros(H, dtype=acc, device=node.device)  # sum g * x
        g_neg_sum = torch.zeros(H, dtype=acc, device=node.device)  # sum g * min(x, 0)
        v_neg = out_weight * slope  # (H,) d weight / d x where x <= 0
        for s in range(0, B, ctx.chunk):
            e = min(s + ctx.chunk, B)
            c = e - s
            pw, x = _pre_activation(node, emb, pair, user_part, node_part, s, e)  # (c,N,L,H)
            g = grad[s:e].reshape(1, -1)  # (1, c*N*L)
            g_x_sum += (g @ x.view(-1, H)).view(H)
            g_x = torch.where(x > 0, out_weight, v_neg)  # (c, N, L, H)
            g_neg_sum += (g @ x.clamp_(max=0).view(-1, H)).view(H)
            g_x.mul_(grad[s:e].unsqueeze(-1))  # (c, N, L, H) d loss / d x
            torch.sum(g_x, dim=1, out=g_user[s:e])  # (c, L, H)
            torch.sum(g_x, dim=2, out=g_npart[s:e])  # (c, N, H)
            g_x = g_x.view(c, N, L * H)
            torch.bmm(g_x, pw.transpose(1, 2), out=g_node[s:e])  # (c, N, D)
            g_pw = torch.bmm(node[s:e].transpose(1, 2), g_x).view(c, D, L, H)  # (c, D, L, H)
            g_emb[s:e] = torch.einsum("cdlh,hd->cld", g_pw, pair)  # (c, L, D)
            g_pair += torch.einsum("cdlh,cld->hd", g_pw, emb[s:e])  # (H, D)
        # PReLU(x) = x - (1 - a) min(x, 0)
        g_out_weight = g_x_sum - (1 - slope.to(acc)) * g_neg_sum  # (H,)
        g_slope = (g_neg_sum * out_weight.to(acc)).sum().reshape(1)  # (1,)
        g_bias = grad.sum().reshape(1)
        return (
            g_node,
            g_emb,
            g_pair.to(pair.dtype),
            g_user,
            g_npart,
            g_slope.to(slope.dtype),
            g_out_weight.to(out_weight.dtype),
            g_bias.to(node.dtype),
            None,
        )


def _pre_activation(
    node: torch.Tensor,
    emb: torch.Tensor,
    pair: torch.Tensor,
    user_part: torch.Tensor,
    node_part: torch.Tensor,
    s: int,
    e: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair weights (c, D, L*H) and pre-activation (c, N, L, H) of users s..e-1.

    See ``_ActivationUnit``; c = e - s.
    """
    c, N, L, H = e - s, node.shape[1], emb.shape[1], pair.shape[0]
    pw = pair_weights_of(emb[s:e], pair)  # (c, D, L*H): emb ⊙ A3
    x = torch.bmm(node[s:e], pw).view(c, N, L, H)  # A3·(b*n)
    x += user_part[s:e].unsqueeze(1)  # (A1+A4)·b + bias
    x += node_part[s:e].unsqueeze(2)  # (A2-A4)·n
    return pw, x


def pair_weights_of(emb: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """``emb ⊙ A3`` laid out for one batched matmul: (B, L, D), (H, D) -> (B, D, L*H)."""
    B, L, D = emb.shape
    pw = emb.transpose(1, 2).unsqueeze(-1) * pair.t().unsqueeze(1)  # (B, D, L, H)
    return pw.view(B, D, L * pair.shape[0])


def _activation_inference(
    node: torch.Tensor,  # (B, N, D+1) node embeddings with a column of ones
    unit: torch.Tensor,  # (B, D+1, L*H) the whole first layer per user (``AttentionDNN``)
    linear: torch.Tensor,  # (B, D+1, L) unit @ (a w): the linear share of PReLU + output layer
    w_pos: torch.Tensor,  # (H,) (1 - a) w: the ReLU share
    out_bias: torch.Tensor,  # (1,)
    chunk: int,
) -> torch.Tensor:
    """(B, N, L) activation weights without autograd: one batched matmul per chunk of users
    gives the whole pre-activation ``x``, then PReLU and the output layer.

    ``prelu(x) = (1 - a) relu(x) + a x`` with slope ``a`` and ``x`` is linear in the node, so
    ``prelu(x) @ w = relu(x) @ ((1 - a) w) + [n, 1] @ (unit @ (a w))``: the ReLU runs in place on
    ``x`` and the linear share is a small matmul against ``linear`` (built once per user), never
    a second (N, L, H) tensor."""
    B, N, _ = node.shape
    H = w_pos.shape[0]
    L = unit.shape[2] // H
    out = torch.baddbmm(out_bias, node, linear)  # (B, N, L) bias + linear share
    for s in range(0, B, chunk):
        e = min(s + chunk, B)
        x = torch.bmm(node[s:e], unit[s:e]).view(e - s, N, L, H)  # (c, N, L, H)
        out[s:e] += x.relu_() @ w_pos
    return out


class AttentionState(NamedTuple):
    """User state of ``AttentionDNN`` (see there): every tensor has the user dimension first.

    Attributes:
        emb: (B, L, D) behaviour embeddings.
        user_part: (B, L, H) the per-user share of the activation unit's first layer.
        spread: (B, L, W*D) the embeddings spread over their time windows with the 1/count
            averaging factor (zero rows on padding).
        unit: (B, D+1, L*H) the activation unit's whole first layer per user; built only without
            autograd (retrieval), None in training.
        linear: (B, D+1, L) ``unit @ (a w)``, the share of PReLU and output layer that is linear
            in the node; None exactly when ``unit`` is.
        w_pos: (B, H) ``(1 - a) w``, the ReLU share of PReLU and output layer (the same row for
            every user: an expanded view, so that it is computed once per search, not per
            level); None exactly when ``unit`` is.
    """

    emb: torch.Tensor
    user_part: torch.Tensor
    spread: torch.Tensor
    unit: torch.Tensor | None = None
    linear: torch.Tensor | None = None
    w_pos: torch.Tensor | None = None


class AttentionDNN(_Scorer):
    """TDM attention-DNN (Sec. 3.4, Fig. 2).

    The activation unit's first layer sees ``[e_b, e_n, e_b*e_n, e_b-e_n]``. It is linear in that
    input, so with its weight split as ``[A1, A2, A3, A4]``::

        A·[b, n, b*n, b-n] = (A1+A4)·b + (A2-A4)·n + A3·(b*n)

    The b-part is per user (``user_state``), the n-part per node, and only the ``b*n`` part is per
    (behaviour, node) pair: one batched matmul of the node embeddings against ``b ⊙ A3``
    (``_ActivationUnit``). The 4D concatenation is never materialised.

    State: ``AttentionState(emb, user_part, spread)``: behaviour embeddings (B, L, D), the per-user
    share of the activation unit's first layer (B, L, H), and the embeddings spread over their
    time windows with the 1/count averaging factor (B, L, W*D) (zero rows on padding).

    Without autograd (retrieval, which scores every level against one state) the state also
    carries ``unit``, the whole first layer of the unit per user, (B, D+1, L*H): rows 0..D-1 are
    ``emb ⊙ A3 + (A2-A4)ᵀ`` and row D is the user part, so ``[n, 1] @ unit`` is the
    pre-activation of every (behaviour, node) pair in one batched matmul. It is built once per
    user instead of at every ``score`` call ((D+1)*L*H floats per user: 248 KB at L = 69), and
    ``linear = unit @ (a w)`` (B, D+1, L), the share of PReLU (slope ``a``) and output layer ``w``
    that is linear in the node, and ``w_pos = (1 - a) w``, the ReLU share (see
    ``_activation_inference``).
    Training builds the pair weights chunk by chunk and recomputes them in backward instead.
    """

    def __init__(self, n_embeddings: int, cfg: ModelConfig, time_windows: int) -> None:
        super().__init__(n_embeddings, cfg, time_windows)
        D, H = cfg.embedding_dim, cfg.attention_hidden
        self.attention_in = nn.Linear(4 * D, H)  # activation unit, PReLU(36)
        self.attention_act = nn.PReLU()
        self.attention_out = nn.Linear(H, 1)
        self.head = _Head(time_windows * D + D, cfg.hidden)

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> AttentionState:
        D = self.dim
        B, L = hist.shape
        emb = self.embedding(_rows(hist))  # (B, L, D)
        A = self.attention_in.weight  # (H, 4D)
        A1, A4 = A[:, :D], A[:, 3 * D :]
        user_part = emb @ (A1 + A4).t() + self.attention_in.bias  # (B, L, H)
        avg = window_weights(hist, windows, self.time_windows, emb.dtype)  # (B, L, W)
        spread = (avg.unsqueeze(-1) * emb.unsqueeze(2)).reshape(B, L, -1)  # (B, L, W*D)
        if torch.is_grad_enabled():
            return AttentionState(emb, user_part, spread)
        A2, A3 = A[:, D : 2 * D], A[:, 2 * D : 3 * D]
        node_weights = (A2 - A4).t().repeat(1, L)  # (D, L*H): column l*H + h is (A2-A4)[h]
        unit = torch.cat([pair_weights_of(emb, A3) + node_weights, user_part.view(B, 1, -1)], 1)
        out_weight, slope = self.attention_out.weight.view(-1), self.attention_act.weight
        linear = unit.view(B, D + 1, L, -1) @ (out_weight * slope)  # (B, D+1, L)
        w_pos = (out_weight * (1 - slope)).expand(B, -1)  # (B, H)
        return AttentionState(emb, user_part, spread, unit, linear, w_pos)

    def node_score(self, state: AttentionState, node_rows: torch.Tensor) -> torch.Tensor:
        emb, user_part, spread, unit, linear, w_pos = state
        D = self.dim
        B, N = node_rows.shape
        L, H = user_part.shape[1], user_part.shape[2]
        node = self.node_embedding(node_rows)  # (B, N, D)
        dtype = _compute_dtype(node)
        out_bias = _cast(self.attention_out.bias, dtype)
        chunk = _chunk_users(node.device, N * L * H)
        if unit is not None:  # retrieval: the unit's first layer is in the state
            weight = _activation_inference(
                _cast(torch.cat([node, node.new_ones(B, N, 1)], -1), dtype),
                _cast(unit, dtype),
                _cast(linear, dtype),
                _cast(w_pos[0], dtype),
                out_bias,
                chunk,
            )  # (B, N, L) activation weights
        else:
            slope = self.attention_act.weight.to(dtype)
            out_weight = self.attention_out.weight.view(-1).to(dtype)
            A = self.attention_in.weight  # (H, 4D)
            A2, A3, A4 = A[:, D : 2 * D], A[:, 2 * D : 3 * D], A[:, 3 * D :]
            node_part = node @ (A2 - A4).t()  # (B, N, H)
            weight = _ActivationUnit.apply(
                node.to(dtype),
                emb.to(dtype),
                A3.to(dtype),
                user_part.to(dtype),
                node_part.to(dtype),
                slope,
                out_weight,
                out_bias,
                chunk,
            )  # (B, N, L) activation weights
        # Padding behaviours have zero rows in ``spread``, so their weights drop out.
        pooled = torch.bmm(weight, _cast(spread, weight.dtype))  # (B, N, W*D) window averages
        h = F.linear(torch.cat([pooled, _cast(node, pooled.dtype)], -1), *self.head.first_params())
        return self.head.after_first(h)  # h: (B, N, H1)


class DNN(_Scorer):
    """TDM DNN (Sec. 5.4): attention-DNN without the activation unit (all weights 1.0).

    The window averages do not depend on the node, so the user's share of the first FC layer,
    ``W_u·u + bias``, is computed once in ``user_state``; ``score`` adds ``W_n·e_n``. This equals
    the first Linear applied to the concatenation ``[u, e_n]``.

    State: ``user_hidden`` (B, H1).
    """

    def __init__(self, n_embeddings: int, cfg: ModelConfig, time_windows: int) -> None:
        super().__init__(n_embeddings, cfg, time_windows)
        self.head = _Head(time_windows * cfg.embedding_dim + cfg.embedding_dim, cfg.hidden)

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        user = self.window_means(hist, windows)  # (B, W*D)
        weight, bias = self.head.first_params()
        return user @ weight[:, : user.shape[1]].t() + bias  # (B, H1)

    def node_score(self, state: torch.Tensor, node_rows: torch.Tensor) -> torch.Tensor:
        user_hidden = state
        node = self.node_embedding(node_rows)  # (B, N, D)
        Wn = self.head.first_params()[0][:, -self.dim :]  # (H1, D)
        h = user_hidden.unsqueeze(1) + node @ Wn.t()  # (B, N, H1)
        return self.head.after_first(h)


class ProductDNN(_Scorer):
    """TDM product-DNN (Sec. 5.4): logit = <u, e_n>, no bias (unless ``model.node_bias``).

    ``u`` is the window averages through FC layers ``hidden[:-1]`` (Linear + BN + PReLU) and a last
    Linear to ``embedding_dim`` without BN/PReLU (the paper's third layer, 24 = embedding_dim; the
    last entry of ``hidden`` is replaced by ``embedding_dim`` so the inner product is defined). No
    bias is added, so the model is a pure inner product and retrieval could use MIPS.

    State: ``user`` (B, D).
    """

    def __init__(self, n_embeddings: int, cfg: ModelConfig, time_windows: int) -> None:
        super().__init__(n_embeddings, cfg, time_windows)
        hidden = list(cfg.hidden)
        if hidden and hidden[-1] != cfg.embedding_dim:
            logger.warning(
                "product_dnn: last hidden size %d replaced by embedding_dim %d",
                hidden[-1],
                cfg.embedding_dim,
            )
        sizes = [time_windows * cfg.embedding_dim] + hidden[:-1]
        self.tower = _mlp(sizes)
        self.project = nn.Linear(sizes[-1], cfg.embedding_dim)

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        user = self.window_means(hist, windows)  # (B, W*D)
        return self.project(self.tower(user))  # (B, D)

    def node_score(self, state: torch.Tensor, node_rows: torch.Tensor) -> torch.Tensor:
        node = self.node_embedding(node_rows)  # (B, N, D)
        return torch.bmm(node, state.to(node.dtype).unsqueeze(-1)).squeeze(-1)  # (B, N)


MODELS: dict[str, type[nn.Module]] = {
    "attention_dnn": AttentionDNN,
    "dnn": DNN,
    "product_dnn": ProductDNN,
}


def resolve_model_class(name: str) -> type[nn.Module]:
    """The class for ``model.name``: a built-in name or ``"pkg.module:Class"``.

    Raises:
        ValueError: naming ``model.name`` when it cannot be imported or is not an nn.Module.
    """
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise ValueError(
            f"model.name {name!r}: unknown model (built-ins: {', '.join(MODELS)}; "
            "or give 'pkg.module:Class')"
        )
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model.name {name!r}: cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"model.name {name!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model.name {name!r}: {class_name!r} is not a torch.nn.Module class")
    return cls


def build_model(
    cfg: ModelConfig, n_embeddings: int, time_windows: int, seed: int | None = None
) -> nn.Module:
    """Construct the scorer named by ``cfg.name``.

    Args:
        cfg: the model section.
        n_embeddings: rows of the embedding table (``tree.n_nodes``: items then internal nodes).
        time_windows: W, the number of time windows of the features.
        seed: if given, weights are initialised from this seed without touching the global RNG.
    Returns:
        The model (in training mode).
    """
    cls = resolve_model_class(cfg.name)
    if seed is None:
        model = cls(n_embeddings, cfg, time_windows)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(n_embeddings, cfg, time_windows)
    for attr in ("embedding", "user_state", "score"):
        if not hasattr(model, attr):
            raise ValueError(f"model.name {cfg.name!r}: the model has no {attr!r} (see tdm.model)")
    if cfg.node_bias and getattr(model, "node_bias", None) is None:
        raise ValueError(f"model.node_bias: the model {cfg.name!r} has no per-node bias")
    return model
