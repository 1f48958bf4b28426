"""A factorisation machine (Rendle, ICDM 2010) for implicit feedback, trained with sampled
negatives and the BPR pairwise loss.

The feature vector of a (user, candidate) pair has three fields: the user's recent behaviours as
a normalised bag (weight ``1/|H|`` on each of the at most ``max_history`` items before the target,
the same histories TDM sees, time windows ignored), the candidate item (one-hot) and the candidate's
category (one-hot). The FM score is ``w0 + sum_f w_f x_f + sum_{f<g} <v_f, v_g> x_f x_g``.
Split into the user part U (history) and the item part I (item, category)::

    score(u, i) = const(u) + w_i + w_c(i) + <v_i, v_c(i)> + <sum_h x_h v_h, v_i + v_c(i)>

``const(u)`` (bias, history linear and history-history terms) is the same for every candidate of
a user, so it cancels in the pairwise loss and in ranking and is not modelled. Ranking a user is
therefore ``<u, q_i> + b_i`` with ``u = sum_h x_h v_h`` computed once and ``q_i = v_i + v_c(i)``,
``b_i = w_i + w_c(i) + <v_i, v_c(i)>``: one matmul against all items.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tdm.baselines import model_meta, rank_dense
from tdm.data.samples import TrainSamples

if TYPE_CHECKING:
    from tdm.data.protocol import Prepared

logger = logging.getLogger(__name__)


class _FMNet(nn.Module):
    """Embeddings and linear weights of the three fields."""

    def __init__(self, n_items: int, n_categories: int, factors: int, init_std: float) -> None:
        super().__init__()
        self.history = nn.Embedding(n_items, factors)  # v_h
        self.item = nn.Embedding(n_items, factors)  # v_i
        self.category = nn.Embedding(n_categories, factors)  # v_c
        self.item_weight = nn.Embedding(n_items, 1)  # w_i
        self.category_weight = nn.Embedding(n_categories, 1)  # w_c
        for table in (self.history, self.item, self.category):
            nn.init.normal_(table.weight, std=init_std)
        nn.init.zeros_(self.item_weight.weight)
        nn.init.zeros_(self.category_weight.weight)

    def user(self, hist: torch.Tensor) -> torch.Tensor:
        """(B, L) item indices, -1 padding -> (B, d) ``sum_h v_h / |H|``."""
        valid = (hist >= 0).to(self.history.weight.dtype)  # (B, L)
        weight = valid / valid.sum(1, keepdim=True).clamp_min(1.0)  # (B, L) x_h
        return F.embedding_bag(
            hist.clamp_min(0), self.history.weight, per_sample_weights=weight, mode="sum"
        )  # (B, d)

    def item_side(
        self, items: torch.Tensor, categories: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(...) items and their categories -> q (..., d) and b (...)."""
        vi, vc = self.item(items), self.category(categories)  # (..., d)
        bias = (
            self.item_weight(items).squeeze(-1)
            + self.category_weight(categories).squeeze(-1)
            + (vi * vc).sum(-1)
        )
        return vi + vc, bias


class FM:
    """FM with history-bag, item and category fields, BPR loss with uniform negatives.

    Args:
        factors: embedding size of every field.
        epochs: passes over the training samples.
        lr: Adam learning rate.
        reg: L2 weight on the embeddings and weights a batch uses.
        negatives: uniform negative items per positive (each gives one BPR pair).
        batch_size: positive samples per step.
        init_std: standard deviation of the initial embeddings.
        use_category: include the category field.
        with_eval_history: the evaluation users' known halves also give training samples.
        device: ``auto`` (CUDA when present) | cpu | cuda.
    """

    def __init__(
        self,
        factors: int = 32,
        epochs: int = 10,
        lr: float = 0.005,
        reg: float = 1e-5,
        negatives: int = 5,
        batch_size: int = 512,
        init_std: float = 0.05,
        use_category: bool = True,
        with_eval_history: bool = True,
        device: str = "auto",
    ) -> None:
        self.factors, self.epochs, self.lr, self.reg = int(factors), int(epochs), lr, reg
        self.negatives, self.batch_size, self.init_std = int(negatives), int(batch_size), init_std
        self.use_category, self.with_eval_history, self.device = (
            use_category,
            with_eval_history,
            device,
        )
        self.net: _FMNet | None = None
        self.losses: list[float] = []

    def fit(
        self, data: Prepared, seed: int = 0, callback: Callable[[int, FM], None] | None = None
    ) -> FM:
        """Train on every position with an earlier behaviour (``tdm.data.samples.TrainSamples``).

        Args:
            data: the prepared data.
            seed: seed of initialisation, sample order and negatives.
            callback: ``callback(epoch, self)`` after each epoch (0-based); ``self.ranker()``
                then ranks with the weights of that epoch.
        """
        from tdm.train import resolve_device

        device = resolve_device(self.device)
        max_history, min_history, _ = model_meta(data)
        self.max_history, self.window_bounds = max_history, data.window_bounds
        samples = TrainSamples(data, max_history, max(min_history, 1), self.with_eval_history)
        category = data.items.sort_values("item_index")["category_id"].to_numpy()
        _, category = np.unique(category, return_inverse=True)
        if not self.use_category:
            category = np.zeros_like(category)
        n_items = data.n_items
        self.item_category = torch.from_numpy(category.astype(np.int64)).to(device)  # (n,)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _FMNet(n_items, int(category.max()) + 1, self.factors, self.init_std)
        net = net.to(device)
        self.net = net
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        rng = np.random.default_rng(seed)
        self.losses = []
        for epoch in range(self.epochs):
            order = rng.permutation(samples.n_samples)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                hist, _, targets = samples.batch(index)
                neg = rng.integers(0, n_items, size=(len(index), self.negatives))
                hist_t = torch.from_numpy(hist).to(device)
                items = torch.from_numpy(np.concatenate([targets[:, None], neg], 1)).to(device)
                user = net.user(hist_t)  # (B, d)
                q, b = net.item_side(items, self.item_category[items])  # (B, 1+S, d), (B, 1+S)
                logits = torch.einsum("bd,bnd->bn", user, q) + b  # (B, 1+S)
                diff = logits[:, :1] - logits[:, 1:]  # (B, S)
                l2 = user.square().sum(-1) + q.square().sum((-1, -2)) + b.square().sum(-1)
                loss = -F.logsigmoid(diff).mean() + self.reg * l2.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(index)
            self.losses.append(total / max(samples.n_samples, 1))
            logger.debug("FM epoch %d: loss %.4f", epoch + 1, self.losses[-1])
            if callback is not None:
                callback(epoch, self)
        return self

    @torch.no_grad()
    def item_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_items, d) ``q_i`` and (n_items,) ``b_i`` of every item."""
        items = torch.arange(len(self.item_category), device=self.item_category.device)
        return self.net.item_side(items, self.item_category)

    def ranker(self):
        """A ranker for ``tdm.evaluation.evaluate_split``: exact top k of ``<u, q_i> + b_i``."""
        from tdm.data.features import eval_batch

        if self.net is None:
            raise RuntimeError("FM.fit was not called")
        q, b = self.item_vectors()
        device = q.device

        def rank(split, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]):
            hist, _ = eval_batch(split, rows, self.max_history, self.window_bounds)  # (B, L)
            hist = torch.from_numpy(hist)

            @torch.no_grad()
            def score_chunk(start: int, stop: int) -> torch.Tensor:
                user = self.net.user(hist[start:stop].to(device))  # (b, d)
                return user @ q.T + b  # (b, n_items)

            return rank_dense(score_chunk, len(rows), k, exclude, len(b))

        return rank
