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

A state is a tensor or a tuple of tensors, each with the batch (user) dimension first. Beam search
scores the N candidate nodes of every user in one ``score`` call and selects a subset of users
with ``select_state(state, index)``, which indexes the first dimension of every tensor; a custom
scorer's state must therefore keep the batch dimension first in every tensor.

Built-ins
---------
- ``attention_dnn`` (Fig. 2): a DIN-style activation unit weights every behaviour against the
  candidate node, the weighted behaviours are averaged per time window, the W window vectors and
  the node embedding are concatenated and fed to FC layers (Linear + BatchNorm + PReLU) and a final
  Linear(1).
- ``dnn`` (TDM DNN, Sec. 5.4): the same without the activation unit (all weights 1.0).
- ``product_dnn`` (TDM product-DNN, Sec. 5.4): no attention, no node embedding in the input; the
  logit is the inner product of a user vector and the node embedding.

"Weighted average" per time window (Fig. 2) is implemented as the weighted sum of the window's
behaviour embeddings divided by the number of behaviours in that window (not by the sum of the
weights, which are unnormalised activation outputs and may be negative or near zero); an empty
window gives a zero vector.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tdm.config import ModelConfig

logger = logging.getLogger(__name__)

State = torch.Tensor | tuple[torch.Tensor, ...]

EMBEDDING_STD = 0.05


def select_state(state: State, index: torch.Tensor) -> State:
    """Select users from a state.

    Args:
        state: a tensor or a tuple of tensors, batch (user) dimension first.
        index: (K,) int64 user positions or (B,) bool mask.
    Returns:
        The same structure with every tensor indexed along its first dimension.
    """
    if isinstance(state, torch.Tensor):
        return state[index]
    return tuple(t[index] for t in state)


def window_weights(hist: torch.Tensor, windows: torch.Tensor, time_windows: int) -> torch.Tensor:
    """Averaging weights that spread each behaviour over its time window.

    Args:
        hist: (B, L) int64 embedding rows, -1 on padding.
        windows: (B, L) int64 time windows in [0, W), -1 on padding (values >= W go to W-1).
        time_windows: W.
    Returns:
        (B, L, W) float32: ``1 / n_w`` where behaviour l lies in window w holding ``n_w`` valid
        behaviours, 0 elsewhere (padding and other windows).
    """
    valid = (hist >= 0) & (windows >= 0)  # (B, L)
    win = windows.clamp(0, time_windows - 1)
    onehot = F.one_hot(win, time_windows).to(torch.float32) * valid.unsqueeze(-1)  # (B, L, W)
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

    def window_means(self, hist: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(B, W*D) unweighted per-window means of the behaviour embeddings (zeros if empty)."""
        avg = window_weights(hist, windows, self.time_windows)  # (B, L, W)
        emb = self.embedding(_rows(hist))  # (B, L, D)
        means = torch.einsum("blw,bld->bwd", avg.to(emb.dtype), emb)  # (B, W, D)
        return means.flatten(1)  # (B, W*D)

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> State:
        raise NotImplementedError

    def score(self, state: State, node_rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, hist: torch.Tensor, windows: torch.Tensor, node_rows: torch.Tensor
    ) -> torch.Tensor:
        """(B, L), (B, L), (B, N) -> (B, N) logits."""
        return self.score(self.user_state(hist, windows), node_rows)


class _Head(nn.Module):
    """FC layers after the first Linear: BN + PReLU, then Linear + BN + PReLU ..., Linear(1).

    The first Linear is kept outside so that callers can split it (``first``).
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

    def after_first(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, H1) output of the first Linear -> (B, N) logits."""
        B, N, H = h.shape
        h = self.first_norm(h.reshape(B * N, H))  # (B*N, H1)
        h = self.rest(h)  # (B*N, H_last)
        return self.out(h).view(B, N)  # (B, N)


class AttentionDNN(_Scorer):
    """TDM attention-DNN (Sec. 3.4, Fig. 2).

    The activation unit's first layer sees ``[e_b, e_n, e_b*e_n, e_b-e_n]``. It is linear in that
    input, so with its weight split as ``[A1, A2, A3, A4]``::

        A·[b, n, b*n, b-n] = (A1+A4)·b + (A2-A4)·n + A3·(b*n)

    The b-part is per user (``user_state``), the n-part per node, and only the ``b*n`` part is per
    (behaviour, node) pair: one batched matmul of the node embeddings against ``b ⊙ A3`` which is
    also prepared per user. The 4D concatenation is never materialised.

    State: ``(user_part (B, L, H), pair_weight (B, D, L*H), spread (B, L, W*D))``.
    """

    def __init__(self, n_embeddings: int, cfg: ModelConfig, time_windows: int) -> None:
        super().__init__(n_embeddings, cfg, time_windows)
        D, H = cfg.embedding_dim, cfg.attention_hidden
        self.attention_in = nn.Linear(4 * D, H)  # activation unit, PReLU(36)
        self.attention_act = nn.PReLU()
        self.attention_out = nn.Linear(H, 1)
        self.head = _Head(time_windows * D + D, cfg.hidden)

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> State:
        D = self.dim
        B, L = hist.shape
        emb = self.embedding(_rows(hist))  # (B, L, D)
        A = self.attention_in.weight  # (H, 4D)
        A1, A3, A4 = A[:, :D], A[:, 2 * D : 3 * D], A[:, 3 * D :]
        user_part = emb @ (A1 + A4).t() + self.attention_in.bias  # (B, L, H)
        pair_weight = emb.unsqueeze(-2) * A3  # (B, L, H, D)
        pair_weight = pair_weight.reshape(B, -1, D).transpose(1, 2)  # (B, D, L*H)
        avg = window_weights(hist, windows, self.time_windows).to(emb.dtype)  # (B, L, W)
        spread = (avg.unsqueeze(-1) * emb.unsqueeze(2)).reshape(B, L, -1)  # (B, L, W*D)
        return user_part, pair_weight, spread

    def score(self, state: State, node_rows: torch.Tensor) -> torch.Tensor:
        user_part, pair_weight, spread = state
        D = self.dim
        B, N = node_rows.shape
        L, H = user_part.shape[1], user_part.shape[2]
        node = self.embedding(_rows(node_rows))  # (B, N, D)
        A = self.attention_in.weight  # (H, 4D)
        A2, A4 = A[:, D : 2 * D], A[:, 3 * D :]
        node_part = node @ (A2 - A4).t()  # (B, N, H)
        act = torch.bmm(node, pair_weight.to(node.dtype)).view(B, N, L, H)  # (B, N, L, H)
        act = act + user_part.unsqueeze(1) + node_part.unsqueeze(2)  # (B, N, L, H)
        act = self.attention_act(act)
        weight = self.attention_out(act).squeeze(-1)  # (B, N, L) activation weights
        # Padding behaviours have zero rows in ``spread``, so their weights drop out.
        pooled = torch.bmm(weight, spread.to(weight.dtype))  # (B, N, W*D) window averages
        h = self.head.first(torch.cat([pooled, node.to(pooled.dtype)], dim=-1))  # (B, N, H1)
        return self.head.after_first(h)


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

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> State:
        user = self.window_means(hist, windows)  # (B, W*D)
        Wu = self.head.first.weight[:, : user.shape[1]]  # (H1, W*D)
        return user @ Wu.t() + self.head.first.bias  # (B, H1)

    def score(self, state: State, node_rows: torch.Tensor) -> torch.Tensor:
        user_hidden = state
        node = self.embedding(_rows(node_rows))  # (B, N, D)
        Wn = self.head.first.weight[:, -self.dim :]  # (H1, D)
        h = user_hidden.unsqueeze(1) + node @ Wn.t()  # (B, N, H1)
        return self.head.after_first(h)


class ProductDNN(_Scorer):
    """TDM product-DNN (Sec. 5.4): logit = <u, e_n>, no bias.

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

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> State:
        user = self.window_means(hist, windows)  # (B, W*D)
        return self.project(self.tower(user))  # (B, D)

    def score(self, state: State, node_rows: torch.Tensor) -> torch.Tensor:
        node = self.embedding(_rows(node_rows))  # (B, N, D)
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
    return model
