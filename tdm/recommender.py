"""Load a trained model folder and recommend items for behaviour histories."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tdm.config import RetrievalConfig
from tdm.data.features import window_mode_of
from tdm.errors import TdmError
from tdm.tree import Tree

log = logging.getLogger(__name__)


class RequestError(TdmError, ValueError):
    """A recommendation request that cannot be answered as asked (bad k, bad history)."""


@dataclass(frozen=True)
class History:
    """A behaviour history resolved against a model's corpus (``Recommender.history``).

    Attributes:
        items: (n,) int64 item indices of the known behaviours, oldest first (stable in time).
        times: (n,) int64 their timestamps.
        now: the time ages are measured from (the time windows, Sec. 3.4).
        unknown: (m,) int64 raw item ids of the history that the model does not know.
    """

    items: np.ndarray
    times: np.ndarray
    now: int
    unknown: np.ndarray


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
        filter_beam: the beam width of a query with excluded items (``retrieval.filter_beam``,
            see ``search``); 0: k, as without exclusions.
        backend: ``tdm.retrieval.beam_search``'s: ``"torch"``, ``"native"`` (C) or ``"auto"``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tree: Tree,
        items: pd.DataFrame,
        meta: dict,
        device: str | torch.device | None = None,
        max_k: int = RetrievalConfig().max_k,
        filter_beam: int = RetrievalConfig().filter_beam,
        backend: str = "torch",
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tree = tree
        self.items = items.sort_values("item_index").reset_index(drop=True)
        self.meta = meta
        self.max_k = int(max_k)
        self.filter_beam = int(filter_beam)
        self.backend = backend
        self.max_history = int(meta["max_history"])
        self.window_bounds = np.asarray(meta["window_bounds"], dtype=np.int64)
        self.window_mode = window_mode_of(meta)
        self._item_ids = self.items["item_id"].to_numpy()
        self._id_order = np.argsort(self._item_ids, kind="stable")
        self._id_table = _id_table(self._item_ids)
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
        filter_beam: int = RetrievalConfig().filter_beam,
        backend: str = "torch",
    ) -> Recommender:
        """Load a folder written by ``tdm train`` (``model.pt``, tree, items, meta), checked
        against its manifest (``tdm.checkpoint.open_model_dir``).

        Args:
            model_dir: the model folder.
            device: where to score; default CUDA when present.
            model_name: the caller's ``model.name``; needed to load a custom model class (a
                model file never chooses the code it runs, ``tdm.checkpoint.load_checkpoint``).
            max_k: the largest ``k`` a caller may ask for.
            filter_beam: the beam width of a query with excluded items (``retrieval.filter_beam``).
            backend: the beam search's (``tdm.retrieval.beam_search``).
        """
        from tdm.checkpoint import load_model_dir
        from tdm.paths import ITEMS_FILE, META_FILE

        model, tree = load_model_dir(model_dir, "cpu", model_name)
        items = pd.read_parquet(Path(model_dir) / ITEMS_FILE)
        meta = json.loads((Path(model_dir) / META_FILE).read_text())
        return cls(model, tree, items, meta, device, max_k, filter_beam, backend)

    # ------------------------------------------------------------------------- id mapping
    def to_index(self, item_ids: np.ndarray) -> np.ndarray:
        """Item indices of raw item ids; -1 for ids the model does not know."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        table = self._id_table
        if table is not None:
            inside = (item_ids >= 0) & (item_ids < len(table))
            return np.where(inside, table[np.where(inside, item_ids, 0)], -1).astype(np.int64)
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
        k = self.check_k(k)
        query = self.history(history, now)
        if len(query.unknown):
            log.warning("ignoring %d unknown item ids in the history", len(query.unknown))
        exclude = np.unique(query.items) if exclude_seen else np.zeros(0, dtype=np.int64)
        return self.search([query], k, [exclude])[0]

    def history(
        self,
        history: Sequence[tuple[int, int | None]] | pd.DataFrame,
        now: int | None = None,
    ) -> History:
        """One behaviour history as the model sees it: known items in time order.

        Args:
            history: ``(item_id, timestamp)`` pairs or a DataFrame, as for ``recommend``.
            now: the time of the request; default the latest timestamp of the history.
        Returns:
            A ``History``: item indices of the known items sorted by time (stable), their
            timestamps, ``now``, and the raw ids the model does not know.
        Raises:
            RequestError: an id or timestamp that is not a 64-bit integer.
        """
        if isinstance(history, pd.DataFrame):
            stamps = history["timestamp"] if "timestamp" in history else [None] * len(history)
            pairs = list(zip(history["item_id"], stamps, strict=True))
        else:
            pairs = list(history)
        ids = _int64([i for i, _ in pairs], "item id")
        stamps = [None if t is None or (type(t) is not int and pd.isna(t)) else t for _, t in pairs]
        known_times = _int64([t for t in stamps if t is not None], "timestamp")
        if now is None:
            now = int(known_times.max()) if len(known_times) else 0
        times = _int64([now if t is None else t for t in stamps], "timestamp")
        index = self.to_index(ids)
        order = np.argsort(times[index >= 0], kind="stable")
        return History(index[index >= 0][order], times[index >= 0][order], int(now), ids[index < 0])

    def features(self, histories: Sequence[History]) -> tuple[np.ndarray, np.ndarray]:
        """The model inputs of several histories (``tdm.data.features.make_history``).

        Returns:
            hist (B, L) int64 item indices and windows (B, L) int64, -1 on padding, with
            L = ``max_history``: the last L behaviours of each history, most recent last.
        """
        from tdm.data.features import make_history

        lengths = np.array([len(h.items) for h in histories], dtype=np.int64)
        ends = np.cumsum(lengths)
        items = np.concatenate([h.items for h in histories]) if histories else lengths
        times = np.concatenate([h.times for h in histories]) if histories else lengths
        return make_history(
            items.astype(np.int64, copy=False),
            times.astype(np.int64, copy=False),
            ends - lengths,
            ends,
            np.array([h.now for h in histories], dtype=np.int64),
            self.max_history,
            self.window_bounds,
            self.window_mode,
        )

    def search(
        self, histories: Sequence[History], k: int, exclude: Sequence[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k items of several histories with one batched beam search (Algorithm 1).

        Args:
            histories: from ``history``.
            k: number of items, already checked (``check_k``); also the beam width, or
                ``max(k, filter_beam)`` for a history whose ``exclude`` is not empty.
            exclude: per history, the item indices never to return (complemented by
                popularity, as ``recommend`` does).
        Returns:
            Per history, item ids (n,) int64 and scores (n,) float (popularity fill-ins score
            -inf), n = min(k, items not excluded).
        """
        from tdm.metrics import complement

        hist, windows = self.features(histories)
        excluded = [np.asarray(e, dtype=np.int64) for e in exclude]
        offsets = np.zeros(len(excluded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in excluded], out=offsets[1:])
        excluded = np.concatenate(excluded) if excluded else np.zeros(0, dtype=np.int64)
        width = max(k, 1)
        items, scores = self.beam(
            hist, windows, width, self.filtering_width(width), (excluded, offsets)
        )
        items, scores = complement(items, excluded, offsets, self._popular, k, scores=scores)
        keep = items >= 0
        return [(self.to_ids(items[b][keep[b]]), scores[b][keep[b]]) for b in range(len(items))]

    def popular(self, k: int) -> np.ndarray:
        """The k most popular item ids (training behaviours, ties by item index): the list
        ``recommend`` complements with, and a cold-start answer. RequestError for a bad k."""
        return self.to_ids(self._popular[: self.check_k(k)])

    def check_k(self, k: int) -> int:
        """``k`` capped at the corpus size; RequestError when it is not in 1..``max_k``."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RequestError(f"k must be a positive integer, got {k!r}")
        if k > self.max_k:
            raise RequestError(f"k {k} is above retrieval.max_k ({self.max_k})")
        return min(int(k), len(self.items))

    def filtering_width(self, width: int, filter_beam: int | None = None) -> int:
        """The beam width of a query with excluded items: ``max(width, filter_beam)``, or
        ``width`` when ``filter_beam`` (default ``self.filter_beam``) is 0."""
        filter_beam = self.filter_beam if filter_beam is None else int(filter_beam)
        return max(width, filter_beam) if filter_beam > 0 else width

    def beam(
        self,
        hist: np.ndarray,
        windows: np.ndarray,
        width: int,
        filter_width: int,
        exclude: tuple[np.ndarray, np.ndarray],
        **kwargs,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Beam search (Algorithm 1) with beam ``width``, and ``filter_width`` for the users
        whose ``exclude`` row is not empty (excluded leaves would otherwise crowd the beam:
        their ancestors still score high). A user's result never depends on the other users.

        Args:
            hist, windows: (U, L) model inputs.
            width: beam width (and items returned) of users with nothing excluded.
            filter_width: the same for users with excluded items.
            exclude: CSR ``(items, offsets)`` of item indices, U rows.
            **kwargs: passed to ``tdm.retrieval.beam_search`` (ranking, batch_size).
        Returns:
            items (U, K) int64 and scores (U, K) float32 as ``beam_search``, padded with -1 /
            -inf to K = min(max(width, filter_width), n_items) when the widths differ.
        """
        from tdm.retrieval import beam_search

        def run(h, w, k, ex):
            return beam_search(
                self.model,
                self.tree,
                h,
                w,
                k,
                exclude=ex,
                device=self.device,
                backend=self.backend,
                **kwargs,
            )

        items, offsets = np.asarray(exclude[0]), np.asarray(exclude[1])
        filtered = np.diff(offsets) > 0  # (U,)
        if filter_width == width or not filtered.any():
            return run(hist, windows, width, (items, offsets))
        if filtered.all():
            return run(hist, windows, filter_width, (items, offsets))
        plain, rows = np.flatnonzero(~filtered), np.flatnonzero(filtered)
        lengths = np.diff(offsets)[rows]
        sub = np.repeat(offsets[rows] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        sub_items = items[sub + np.arange(lengths.sum())]  # the CSR rows of ``rows``
        sub_offsets = np.r_[0, np.cumsum(lengths)]
        nothing = (items[:0], np.zeros(len(plain) + 1, dtype=np.int64))  # an empty CSR
        parts = [
            (plain, run(hist[plain], windows[plain], width, nothing)),
            (rows, run(hist[rows], windows[rows], filter_width, (sub_items, sub_offsets))),
        ]
        K = max(part[1][0].shape[1] for part in parts)
        out_items = np.full((len(hist), K), -1, dtype=np.int64)
        out_scores = np.full((len(hist), K), -np.inf, dtype=np.float32)
        for index, (part_items, part_scores) in parts:
            out_items[index, : part_items.shape[1]] = part_items
            out_scores[index, : part_scores.shape[1]] = part_scores
        return out_items, out_scores

    def ranker(self, cfg: RetrievalConfig):
        """A ranker for ``tdm.evaluation.evaluate_split`` using beam search with ``cfg``: beam
        ``max(M, beam_size)``, and ``max(M, filter_beam)`` for users with excluded items (the
        ``items``/``categories`` filter modes) when ``filter_beam`` > 0."""
        from tdm.data.features import eval_batch

        def rank(split, rows: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]):
            hist, windows = eval_batch(
                split, rows, self.max_history, self.window_bounds, self.window_mode
            )
            width = max(k, cfg.beam_size)
            return self.beam(
                hist,
                windows,
                width,
                max(k, cfg.filter_beam) if cfg.filter_beam > 0 else width,
                exclude,
                ranking=cfg.ranking,
                batch_size=cfg.batch_size,
            )

        return rank


def _id_table(item_ids: np.ndarray) -> np.ndarray | None:
    """Item index by raw id, -1 for unknown ids, when the ids are non-negative and at most ~4x
    the number of items (else None: ``to_index`` searches the sorted ids). One look-up per id
    instead of a binary search over the corpus, whose ~20 steps miss the cache at 1M items
    after a search has run (~0.1 ms per request)."""
    n = len(item_ids)
    if n == 0 or int(item_ids.min()) < 0 or int(item_ids.max()) >= 4 * n + 1024:
        return None
    table = np.full(int(item_ids.max()) + 1, -1, dtype=np.int32 if n < 2**31 else np.int64)
    table[item_ids[::-1]] = np.arange(n - 1, -1, -1)  # the first of repeated ids, as the search
    return table


def _int64(values: Sequence, what: str) -> np.ndarray:
    """Values as int64, RequestError naming the first one that is not a 64-bit integer."""
    if all(type(v) is int for v in values):  # the store's and JSON's: one conversion
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass  # named below
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
