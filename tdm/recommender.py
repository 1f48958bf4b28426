"""Load a trained model folder and recommend items for behaviour histories."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tdm.config import RetrievalConfig
from tdm.errors import TdmError
from tdm.tree import Tree

log = logging.getLogger(__name__)


class RequestError(TdmError, ValueError):
    """A recommendation request that cannot be answered as asked (bad k, bad history)."""


class Recommender:
    """A trained TDM: scorer + tree + item table + feature settings.

    Args:
        model: the trained scorer (see ``tdm.model``).
        tree: the tree it was trained on; its item ids are item indices.
        items: the prepared item table (``item_index``, ``item_id``, ``category_id``,
            ``train_count``).
        meta: the prepared metadata (``max_history``, ``window_bounds``, ...).
        device: where to score; default CUDA when present.
        max_k: the largest ``k`` a caller may ask for (``retrieval.max_k``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tree: Tree,
        items: pd.DataFrame,
        meta: dict,
        device: str | torch.device | None = None,
        max_k: int = RetrievalConfig().max_k,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tree = tree
        self.items = items.sort_values("item_index").reset_index(drop=True)
        self.meta = meta
        self.max_k = int(max_k)
        self.max_history = int(meta["max_history"])
        self.window_bounds = np.asarray(meta["window_bounds"], dtype=np.int64)
        self._item_ids = self.items["item_id"].to_numpy()
        self._id_order = np.argsort(self._item_ids, kind="stable")
        self._popular = np.lexsort(
            (np.arange(len(self.items)), -self.items["train_count"].to_numpy())
        )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        model_name: str | None = None,
        max_k: int = RetrievalConfig().max_k,
    ) -> Recommender:
        """Load a folder written by ``tdm train`` (``model.pt``, tree, items, meta), checked
        against its manifest (``tdm.checkpoint.open_model_dir``).

        Args:
            model_dir: the model folder.
            device: where to score; default CUDA when present.
            model_name: the caller's ``model.name``; needed to load a custom model class (a
                model file never chooses the code it runs, ``tdm.checkpoint.load_checkpoint``).
            max_k: the largest ``k`` a caller may ask for.
        """
        from tdm.checkpoint import load_model_dir
        from tdm.paths import ITEMS_FILE, META_FILE

        model, tree = load_model_dir(model_dir, "cpu", model_name)
        items = pd.read_parquet(Path(model_dir) / ITEMS_FILE)
        meta = json.loads((Path(model_dir) / META_FILE).read_text())
        return cls(model, tree, items, meta, device, max_k)

    # ------------------------------------------------------------------------- id mapping
    def to_index(self, item_ids: np.ndarray) -> np.ndarray:
        """Item indices of raw item ids; -1 for ids the model does not know."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self._item_ids, item_ids, sorter=self._id_order)
        pos = np.minimum(pos, len(self._item_ids) - 1)
        idx = self._id_order[pos]
        return np.where(self._item_ids[idx] == item_ids, idx, -1)

    def to_ids(self, item_index: np.ndarray) -> np.ndarray:
        item_index = np.asarray(item_index, dtype=np.int64)
        return np.where(item_index >= 0, self._item_ids[np.maximum(item_index, 0)], -1)

    # ------------------------------------------------------------------------- recommending
    def recommend(
        self,
        history: Sequence[tuple[int, int | None]] | pd.DataFrame,
        k: int = 10,
        exclude_seen: bool = True,
        now: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for one behaviour history (Algorithm 1).

        Args:
            history: ``(item_id, timestamp)`` pairs, or a DataFrame with ``item_id`` and
                ``timestamp`` columns. Unknown items are ignored (logged). A missing timestamp
                (None) puts the behaviour at ``now``, i.e. in the most recent time window.
            k: number of items, 1..``max_k``; more than the corpus holds gives the whole
                corpus.
            exclude_seen: leave the history's items out (complemented by popularity).
            now: the time of the request; default the latest timestamp of the history.
        Returns:
            item ids (n,) int64 and their scores (n,) float (popularity fill-ins score -inf),
            n = min(k, items not excluded): never padded.
        Raises:
            RequestError: k out of range, or an id or timestamp that is not a 64-bit integer.
        """
        from tdm.data.features import make_history
        from tdm.metrics import complement
        from tdm.retrieval import beam_search

        k = self.check_k(k)
        if isinstance(history, pd.DataFrame):
            stamps = history["timestamp"] if "timestamp" in history else [None] * len(history)
            pairs = list(zip(history["item_id"], stamps, strict=True))
        else:
            pairs = list(history)
        ids = _int64([i for i, _ in pairs], "item id")
        stamps = [None if t is None or pd.isna(t) else t for _, t in pairs]
        known_times = _int64([t for t in stamps if t is not None], "timestamp")
        if now is None:
            now = int(known_times.max()) if len(known_times) else 0
        times = _int64([now if t is None else t for t in stamps], "timestamp")
        index = self.to_index(ids)
        if np.any(index < 0):
            log.warning("ignoring %d unknown item ids in the history", int((index < 0).sum()))
        order = np.argsort(times[index >= 0], kind="stable")
        seq, seq_times = index[index >= 0][order], times[index >= 0][order]
        hist, windows = make_history(
            seq,
            seq_times,
            np.array([0]),
            np.array([len(seq)]),
            np.array([now]),
            self.max_history,
            self.window_bounds,
        )
        exclude = np.unique(seq) if exclude_seen else np.zeros(0, dtype=np.int64)
        offsets = np.array([0, len(exclude)])
        items, scores = beam_search(
            self.model,
            self.tree,
            hist,
            windows,
            max(k, 1),
            exclude=(exclude, offsets),
            device=self.device,
        )
        items, scores = complement(items, exclude, offsets, self._popular, k, scores=scores)
        keep = items[0] >= 0
        return self.to_ids(items[0][keep]), scores[0][keep]

    def check_k(self, k: int) -> int:
        """``k`` capped at the corpus size; RequestError when it is not in 1..``max_k``."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RequestError(f"k must be a positive integer, got {k!r}")
        if k > self.max_k:
            raise RequestError(f"k {k} is above retrieval.max_k ({self.max_k})")
        return min(int(k), len(self.items))

    def ranker(self, cfg: RetrievalConfig):
        """A ranker for ``tdm.evaluation.evaluate_split`` using beam search with ``cfg``."""
        from tdm.data.features import eval_batch
        from tdm.retrieval import beam_search

        def rank(split, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]):
            hist, windows = eval_batch(split, rows, self.max_history, self.window_bounds)
            return beam_search(
                self.model,
                self.tree,
                hist,
                windows,
                max(k, cfg.beam_size),
                ranking=cfg.ranking,
                exclude=exclude,
                device=self.device,
                batch_size=cfg.batch_size,
            )

        return rank


def _int64(values: Sequence, what: str) -> np.ndarray:
    """Values as int64, RequestError naming the first one that is not a 64-bit integer."""
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        try:
            number = int(value)
            if number != value and not isinstance(value, str):
                raise ValueError
            out[i] = number
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"{what} {value!r} is not a 64-bit integer") from None
    return out
