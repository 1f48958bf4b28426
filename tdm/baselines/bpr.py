"""BPR-MF (Rendle et al., UAI 2009): matrix factorisation trained with the BPR pairwise loss.

``x(u, i) = <p_u, q_i> + b_i``; for a positive pair (u, i) and an item j the user never
interacted with, drawn uniformly, minimise ``-log sigmoid(x(u, i) - x(u, j))`` plus
``reg * (|p_u|^2 + |q_i|^2 + |q_j|^2)`` over mini-batches with Adam. The validation and test
users' known first halves join training as extra users (Sec. 5.2: BPR-MF needs every user in
training), so they get embeddings; ranking is one matmul against all items (exact).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from tdm.baselines import interactions, rank_dense, sample_negatives, split_row_start
from tdm.metrics import csr_rows

if TYPE_CHECKING:
    from tdm.data.protocol import Prepared

logger = logging.getLogger(__name__)


class BPR:
    """BPR-MF in torch.

    Args:
        factors: embedding size.
        epochs: passes over the distinct (user, item) pairs.
        lr: Adam learning rate.
        reg: L2 weight on the embeddings a batch uses (per pair).
        batch_size: pairs per step.
        init_std: standard deviation of the initial embeddings.
        with_eval_history: add the evaluation users' known halves as users (needed to rank for
            them: without it the ranker raises).
        device: ``auto`` (CUDA when present) | cpu | cuda.
    """

    def __init__(
        self,
        factors: int = 32,
        epochs: int = 30,
        lr: float = 0.01,
        reg: float = 0.01,
        batch_size: int = 1024,
        init_std: float = 0.1,
        with_eval_history: bool = True,
        device: str = "auto",
    ) -> None:
        self.factors, self.epochs, self.lr, self.reg = int(factors), int(epochs), lr, reg
        self.batch_size, self.init_std = int(batch_size), init_std
        self.with_eval_history, self.device = with_eval_history, device
        self.user_factors: torch.Tensor | None = None  # (U, d)
        self.item_factors: torch.Tensor | None = None  # (n_items, d)
        self.item_bias: torch.Tensor | None = None  # (n_items,)
        self.losses: list[float] = []
        self._data = None

    def fit(
        self, data: Prepared, seed: int = 0, callback: Callable[[int, BPR], None] | None = None
    ) -> BPR:
        """Train on the training users (and the evaluation users' known halves).

        Args:
            data: the prepared data.
            seed: seed of initialisation, pair order and negatives.
            callback: ``callback(epoch, self)`` after each epoch (0-based); ``self.ranker()``
                then ranks with the factors of that epoch.
        """
        from tdm.train import resolve_device

        device = resolve_device(self.device)
        known = interactions(data, self.with_eval_history)
        n_items = data.n_items
        keys = np.unique(csr_rows(known.offsets) * n_items + known.items)  # distinct pairs
        users, items = keys // n_items, keys % n_items
        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            user_f = torch.randn(known.n_users, self.factors) * self.init_std
            item_f = torch.randn(n_items, self.factors) * self.init_std
        user_f = user_f.to(device).requires_grad_()
        item_f = item_f.to(device).requires_grad_()
        bias = torch.zeros(n_items, device=device, requires_grad=True)
        opt = torch.optim.Adam([user_f, item_f, bias], lr=self.lr)
        self.user_factors, self.item_factors = user_f.detach(), item_f.detach()
        self.item_bias, self._data = bias.detach(), data
        self.losses = []
        for epoch in range(self.epochs):
            order = rng.permutation(len(keys))
            negatives = sample_negatives(rng, users[order], n_items, keys)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                pick = order[start : start + self.batch_size]
                u = torch.from_numpy(users[pick]).to(device)
                i = torch.from_numpy(items[pick]).to(device)
                j = torch.from_numpy(negatives[start : start + len(pick)]).to(device)
                pu, qi, qj = user_f[u], item_f[i], item_f[j]  # (B, d)
                diff = (pu * (qi - qj)).sum(-1) + bias[i] - bias[j]  # (B,)
                l2 = (pu.square() + qi.square() + qj.square()).sum(-1)  # (B,)
                loss = -torch.nn.functional.logsigmoid(diff).mean() + self.reg * l2.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(pick)
            self.losses.append(total / max(len(keys), 1))
            logger.debug("BPR-MF epoch %d: loss %.4f", epoch + 1, self.losses[-1])
            if callback is not None:
                callback(epoch, self)
        return self

    def ranker(self):
        """A ranker for ``tdm.evaluation.evaluate_split``: exact top k of ``<p_u, q_i> + b_i``."""
        if self.user_factors is None:
            raise RuntimeError("BPR.fit was not called")
        if not self.with_eval_history:
            raise RuntimeError("BPR without with_eval_history has no embeddings for eval users")

        def rank(split, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]):
            first = split_row_start(self._data, split)
            users = torch.from_numpy(np.asarray(rows, dtype=np.int64) + first)

            def score_chunk(start: int, stop: int) -> torch.Tensor:
                user = self.user_factors[users[start:stop].to(self.user_factors.device)]  # (b, d)
                return user @ self.item_factors.T + self.item_bias  # (b, n_items)

            return rank_dense(score_chunk, len(rows), k, exclude, len(self.item_bias))

        return rank
