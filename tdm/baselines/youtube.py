"""YouTube product-DNN (Covington et al., RecSys 2016) as the paper's baseline (Sec. 5.2).

The same inputs as TDM: the at most ``max_history`` behaviours before a target, their embeddings
averaged per time window, the W window vectors concatenated and fed through FC layers to a user
vector ``u``; the preference for item i is ``<u, e_i>``. The network is TDM's own product-DNN
(``tdm.model.ProductDNN``) over an item-only embedding table; the training samples are TDM's
(``tdm.data.samples.TrainSamples``). Training is sampled softmax: each target competes with
``negatives`` items drawn uniformly for the batch (shared by its samples; a draw equal to a
sample's target is masked out for that sample; uniform proposals need no log-Q correction).
Prediction is exact kNN in inner-product space: ``u`` against every item embedding, torch top-k.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from tdm.baselines import model_meta, rank_dense
from tdm.data.features import window_mode_of
from tdm.data.samples import TrainSamples

if TYPE_CHECKING:
    from tdm.data.protocol import Prepared

logger = logging.getLogger(__name__)


class YouTubeDNN:
    """YouTube product-DNN with sampled-softmax training and exact inner-product top-k.

    Args:
        embedding_dim: item embedding size (paper: 24).
        hidden: FC layer sizes; the last is replaced by ``embedding_dim`` (paper: 128, 64, 24).
        epochs: passes over the training samples.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        negatives: uniform negatives per batch for the sampled softmax (paper: 100 on
            MovieLens, 600 on UserBehavior).
        batch_size: samples per step.
        with_eval_history: the evaluation users' known halves also give training samples (TDM's
            ``train.with_eval_history``; off by default, as for TDM).
        device: ``auto`` (CUDA when present) | cpu | cuda.
    """

    def __init__(
        self,
        embedding_dim: int = 24,
        hidden: Sequence[int] = (128, 64, 24),
        epochs: int = 5,
        lr: float = 0.001,
        weight_decay: float = 0.0,
        negatives: int = 100,
        batch_size: int = 256,
        with_eval_history: bool = False,
        device: str = "auto",
    ) -> None:
        self.embedding_dim, self.hidden = int(embedding_dim), [int(h) for h in hidden]
        self.epochs, self.lr, self.weight_decay = int(epochs), lr, weight_decay
        self.negatives, self.batch_size = int(negatives), int(batch_size)
        self.with_eval_history, self.device = with_eval_history, device
        self.model: torch.nn.Module | None = None
        self.losses: list[float] = []

    def fit(
        self,
        data: Prepared,
        seed: int = 0,
        callback: Callable[[int, YouTubeDNN], None] | None = None,
    ) -> YouTubeDNN:
        """Train on TDM's training samples.

        Args:
            data: the prepared data.
            seed: seed of initialisation, sample order and negatives.
            callback: ``callback(epoch, self)`` after each epoch (0-based); ``self.ranker()``
                then ranks with the weights of that epoch.
        """
        from tdm.config import ModelConfig
        from tdm.model import build_model
        from tdm.train import resolve_device

        device = resolve_device(self.device)
        max_history, min_history, time_windows = model_meta(data)
        self.max_history, self.window_bounds = max_history, data.window_bounds
        self.window_mode = window_mode_of(data.meta)
        samples = TrainSamples(data, max_history, max(min_history, 1), self.with_eval_history)
        cfg = ModelConfig(name="product_dnn", embedding_dim=self.embedding_dim, hidden=self.hidden)
        model = build_model(cfg, data.n_items, time_windows, seed=seed).to(device)
        self.model = model
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(seed)
        n_items = data.n_items
        self.losses = []
        for epoch in range(self.epochs):
            model.train()
            order = rng.permutation(samples.n_samples)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                if len(index) < 2 and len(order) > 1:  # BatchNorm needs two samples
                    continue
                hist, windows, targets = samples.batch(index)
                negatives = torch.from_numpy(rng.integers(0, n_items, size=self.negatives))
                targets_t = torch.from_numpy(targets).to(device)
                user = model.user_state(
                    torch.from_numpy(hist).to(device), torch.from_numpy(windows).to(device)
                )  # (B, D)
                pos = (user * model.embedding(targets_t)).sum(-1, keepdim=True)  # (B, 1)
                negatives = negatives.to(device)
                neg = user @ model.embedding(negatives).T  # (B, S)
                neg = neg.masked_fill(negatives[None, :] == targets_t[:, None], -float("inf"))
                logits = torch.cat([pos, neg], 1)  # (B, 1+S)
                loss = F.cross_entropy(logits, torch.zeros_like(targets_t))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(index)
            self.losses.append(total / max(samples.n_samples, 1))
            logger.debug("youtube epoch %d: loss %.4f", epoch + 1, self.losses[-1])
            if callback is not None:
                model.eval()
                callback(epoch, self)
        model.eval()
        return self

    def ranker(self):
        """A ranker for ``tdm.evaluation.evaluate_split``: exact top k of ``<u, e_i>``."""
        from tdm.data.features import eval_batch

        if self.model is None:
            raise RuntimeError("YouTubeDNN.fit was not called")
        model = self.model.eval()
        device = model.embedding.weight.device

        def rank(split, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]):
            hist, windows = eval_batch(
                split, rows, self.max_history, self.window_bounds, self.window_mode
            )
            hist, windows = torch.from_numpy(hist), torch.from_numpy(windows)

            @torch.no_grad()
            def score_chunk(start: int, stop: int) -> torch.Tensor:
                user = model.user_state(
                    hist[start:stop].to(device), windows[start:stop].to(device)
                )  # (b, D)
                return user @ model.embedding.weight.T  # (b, n_items)

            return rank_dense(score_chunk, len(rows), k, exclude, model.embedding.num_embeddings)

        return rank
