"""One loaded model, answering batches of recommendation requests: the user-targeting server of
the paper's Fig. 3 (Sec. 4).

An ``Engine`` is built whole (model, tree, item table, titles, a warm-up search) before the
service switches to it, and never changes afterwards: a batch takes the current engine once and
every answer in it comes from that engine, tagged with its ``version``.

Features are ``tdm.Recommender``'s (``Recommender.history`` then ``Recommender.features``,
i.e. ``tdm.data.features.make_history`` as in training), and ``Recommender.search`` runs one
batched beam search per distinct ``k`` in the batch (``k`` is also the beam width, so requests
with different ``k`` cannot share a search); each request's answer equals
``Recommender.recommend`` for it alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdm.config import RetrievalConfig
from tdm.errors import TdmError
from tdm.io import file_digest
from tdm.recommender import History, Recommender, RequestError
from tdm.serving.catalog import Catalog, default_titles, load_catalog
from tdm.serving.store import BehaviorStore

log = logging.getLogger(__name__)

FILTERS = ("none", "items", "categories")


class UnknownItemError(RequestError, LookupError):
    """An item id the served model does not know (the tree-path request: 404)."""


@dataclass(frozen=True)
class Query:
    """One recommendation request: a user of the store or an explicit history.

    Attributes:
        k: number of items (``Recommender.check_k``).
        mode: ``"none"``, ``"items"`` (leave out the history's items) or ``"categories"``
            (leave out every item of the history's categories), Sec. 5.3.
        history: ``(item_id, timestamp or None)`` pairs; None: the store's history of
            ``user_id``.
        user_id: the user whose stored behaviours are the history.
        now: the time ages are measured from; default the latest behaviour's.
    """

    k: int
    mode: str = "items"
    history: tuple[tuple[int, int | None], ...] | None = None
    user_id: int | None = None
    now: int | None = None


@dataclass(frozen=True)
class Answer:
    """The answer to one ``Query``.

    Attributes:
        item_ids: (n,) int64 recommended items, best first.
        scores: (n,) float64 model scores (logits), NaN for most-popular fill-ins.
        item_index: (n,) int64 their item indices (for titles and categories).
        cold_start: True when the list is most-popular: no known behaviour at all (a user
            without stored behaviours, or only items the model does not know).
        unknown_items: history item ids the model does not know (ignored).
        history_length: known behaviours in the history (the model reads the last
            ``max_history``).
        model_version: the engine that answered.
    """

    item_ids: np.ndarray
    scores: np.ndarray
    item_index: np.ndarray
    cold_start: bool
    unknown_items: list[int]
    history_length: int
    model_version: str


def search_backend(model: torch.nn.Module, device: torch.device, backend: str) -> str:
    """What answers a request's beam search: ``"native"`` (C), or ``"torch"`` with the reason
    when ``backend`` is ``"auto"`` and C cannot serve the model.

    Raises:
        ConfigError: ``backend`` is ``"native"`` and C cannot serve the model.
    """
    from tdm import native
    from tdm.config import ConfigError

    if backend == "torch":
        return "torch"
    why = native.unsupported(model, device)
    if why is None:
        return "native"
    if backend == "native":
        raise ConfigError(f"serve.backend: native: {why}")
    return f"torch ({why})"


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes (what DVC and the MLflow run's ``tree.md5`` tag record)."""
    return file_digest(path, "md5")


def version_label(info: dict[str, Any], digest: str) -> str:
    """What answers are tagged with: ``NAME/VERSION`` of a registry model, the source's own
    ``version``, else ``local-`` and the start of the folder's manifest digest."""
    if info.get("version") and info.get("name"):
        return f"{info['name']}/{info['version']}"
    return str(info.get("version") or f"local-{digest[:12]}")


@dataclass
class Engine:
    """A model ready to serve.

    Attributes:
        recommender: the model, tree, item table and feature settings.
        catalog: titles and category names.
        info: what is loaded (``/v1/model``).
    """

    recommender: Recommender
    catalog: Catalog
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rec = self.recommender
        categories = rec.items["category_id"].to_numpy()
        self._category_ids = categories
        codes, inverse = np.unique(categories, return_inverse=True)
        self._category_code = inverse.astype(np.int64).ravel()  # (n_items,)
        self._category_order = np.argsort(self._category_code, kind="stable")
        self._category_start = np.zeros(len(codes) + 1, dtype=np.int64)
        np.cumsum(
            np.bincount(self._category_code, minlength=len(codes)), out=self._category_start[1:]
        )
        self._popularity = rec.items["train_count"].to_numpy()
        self._leaves_under: np.ndarray | None = None
        self._title_lower: np.ndarray | None = None

    @property
    def version(self) -> str:
        return str(self.info.get("version", ""))

    @property
    def n_items(self) -> int:
        return len(self.recommender.items)

    # --------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        folder: str | Path,
        info: dict[str, Any] | None = None,
        *,
        model_name: str | None = None,
        max_k: int = RetrievalConfig().max_k,
        filter_beam: int = RetrievalConfig().filter_beam,
        titles: str | Path | None = None,
        device: str | torch.device | None = None,
        warm_up: bool = True,
        backend: str = "auto",
    ) -> Engine:
        """Load a model folder fully (manifest-checked) and run a warm-up search.

        Args:
            folder: a trained model folder.
            info: what the source knows (``tdm.serving.source.resolve``): ``version``,
                ``run_id``, ``dvc``...; the version defaults to the folder's manifest digest.
            model_name: the caller's ``model.name`` (custom model classes).
            max_k: ``retrieval.max_k``.
            filter_beam: ``retrieval.filter_beam`` (the beam of a request with exclusions).
            titles: a titles file or folder (``tdm.serving.catalog.load_catalog``); None: the
                model's MovieLens data when it has one.
            device: where to score; default CUDA when present.
            warm_up: run one search before returning (first calls are slower).
            backend: the beam search's (``serve.backend``): ``"auto"`` searches in C
                (``tdm.native``) where it applies, ``"native"`` requires it, ``"torch"``.

        Raises:
            ConfigError: ``backend`` is ``"native"`` and the C search cannot serve this model.
        """
        from tdm.io import manifest_digest
        from tdm.paths import TRAIN_LOG_FILE, TREE_FILE

        start = time.perf_counter()
        folder = Path(folder)
        rec = Recommender.load(
            folder,
            device=device,
            model_name=model_name,
            max_k=max_k,
            filter_beam=filter_beam,
            backend=backend,
        )
        search = search_backend(rec.model, rec.device, backend)
        if titles is None:
            titles = default_titles(rec.meta)
        catalog = load_catalog(titles, rec.items)
        digest = manifest_digest(folder)
        info = dict(info or {})
        version = version_label(info, digest)
        train_log = folder / TRAIN_LOG_FILE
        valid_recall = info.get("valid_recall")
        if valid_recall is None and train_log.is_file():
            history = json.loads(train_log.read_text()).get("valid_recall") or []
            valid_recall = max(history) if history else None
        tree = rec.tree
        info.update(
            {
                "version": version,
                "folder": str(folder.resolve()),
                "manifest_digest": digest,
                "tree_md5": file_md5(folder / TREE_FILE),
                "model_class": type(rec.model).__name__,
                "n_items": len(rec.items),
                "n_nodes": int(tree.n_nodes),
                "depth": int(tree.depth),
                "max_history": rec.max_history,
                "filter_beam": rec.filter_beam,
                "time_windows": len(rec.window_bounds) + 1,
                "device": str(rec.device),
                "search_backend": search,
                "titles": catalog.source or None,
                "valid_recall": valid_recall,
            }
        )
        info.setdefault("run_id", None)
        info.setdefault("dvc", {})
        engine = cls(rec, catalog, info)
        if warm_up:
            empty = History(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, np.zeros(0, np.int64))
            rec.search([empty], rec.check_k(10), [np.zeros(0, np.int64)])
        info["load_seconds"] = round(time.perf_counter() - start, 3)
        info["loaded_at"] = time.time()
        log.info("loaded %s (%d items) in %.2f s", version, len(rec.items), info["load_seconds"])
        return engine

    # --------------------------------------------------------------------------- answering
    def exclusion(self, history: History, mode: str) -> np.ndarray:
        """Item indices a filter mode leaves out for a history (Sec. 5.3; as
        ``tdm.metrics.excluded_items`` per user, with the category index built once)."""
        if mode == "none":
            return np.zeros(0, dtype=np.int64)
        seen = np.unique(history.items)
        if mode == "items":
            return seen
        if mode != "categories":
            raise RequestError(f"filter {mode!r} is not one of {', '.join(FILTERS)}")
        codes = np.unique(self._category_code[seen])
        parts = [
            self._category_order[self._category_start[c] : self._category_start[c + 1]]
            for c in codes
        ]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def answer(
        self, queries: Sequence[Query], store: BehaviorStore | None = None
    ) -> list[Answer | TdmError]:
        """Answer a batch: one batched beam search per distinct k.

        Args:
            queries: the requests.
            store: where the histories of ``user_id`` queries are read (one read per batch).
        Returns:
            Per query an ``Answer``, or the ``RequestError`` that query alone gets (bad k).
        """
        rec = self.recommender
        wanted = [q.user_id for q in queries if q.history is None]
        stored = store.histories(wanted) if (wanted and store is not None) else {}
        out: list[Answer | TdmError | None] = [None] * len(queries)
        groups: dict[int, list[tuple[int, History]]] = {}
        for i, query in enumerate(queries):
            try:
                k = rec.check_k(query.k)
                if query.mode not in FILTERS:
                    raise RequestError(f"filter {query.mode!r} is not one of {', '.join(FILTERS)}")
                pairs = query.history if query.history is not None else stored.get(query.user_id)
                history = rec.history(list(pairs or ()), query.now)
            except RequestError as exc:
                out[i] = exc
                continue
            if len(history.items) == 0:  # nothing the model knows: most-popular
                out[i] = self._popular_answer(k, history)
            else:
                groups.setdefault(k, []).append((i, history))
        for k, members in groups.items():
            histories = [h for _, h in members]
            exclude = [self.exclusion(h, queries[i].mode) for i, h in members]
            for (i, history), (ids, scores) in zip(
                members, rec.search(histories, k, exclude), strict=True
            ):
                out[i] = Answer(
                    item_ids=ids,
                    scores=np.where(np.isfinite(scores), scores, np.nan).astype(np.float64),
                    item_index=rec.to_index(ids),
                    cold_start=False,
                    unknown_items=[int(x) for x in history.unknown],
                    history_length=len(history.items),
                    model_version=self.version,
                )
        return out  # type: ignore[return-value]

    def _popular_answer(self, k: int, history: History) -> Answer:
        ids = self.recommender.popular(k)
        return Answer(
            item_ids=ids,
            scores=np.full(len(ids), np.nan),
            item_index=self.recommender.to_index(ids),
            cold_start=True,
            unknown_items=[int(x) for x in history.unknown],
            history_length=0,
            model_version=self.version,
        )

    def describe(self, item_index: np.ndarray) -> list[dict[str, Any]]:
        """``item_id``, ``title``, ``category_id``, ``category``, ``popularity`` per index."""
        rec = self.recommender
        item_index = np.asarray(item_index, dtype=np.int64)
        ids = rec.to_ids(item_index)
        out = []
        for index, item in zip(item_index, ids, strict=True):
            category = int(self._category_ids[index])
            out.append(
                {
                    "item_id": int(item),
                    "title": self.catalog.title(int(index)),
                    "category_id": category,
                    "category": self.catalog.category(category),
                    "popularity": int(self._popularity[index]),
                }
            )
        return out

    # --------------------------------------------------------------------------- the demo's
    def search_items(self, text: str, limit: int = 20) -> list[dict[str, Any]]:
        """Items whose title contains ``text`` (case-insensitive) or whose id starts with it,
        most popular first."""
        text = text.strip()
        if not text:
            return []
        match = np.zeros(self.n_items, dtype=bool)
        if text.isdigit():
            index = self.recommender.to_index(np.array([int(text)]))
            if index[0] >= 0:
                match[index[0]] = True
        if self.catalog.has_titles:
            if self._title_lower is None:
                self._title_lower = np.array(
                    [t.lower() if t else "" for t in self.catalog.titles], dtype=object
                )
            needle = text.lower()
            match |= np.fromiter(
                (needle in t for t in self._title_lower), dtype=bool, count=self.n_items
            )
        found = np.flatnonzero(match)
        order = np.lexsort((found, -self._popularity[found]))[:limit]
        return self.describe(found[order])

    def path(
        self, item_id: int, history: Sequence[tuple[int, int | None]], now: int | None = None
    ) -> dict[str, Any]:
        """The tree path of an item, root to leaf, with the model's score of every node on it
        for a user (the probability Algorithm 1 ranks by, level by level).

        Raises:
            UnknownItemError: the model does not know ``item_id``.
        """
        from tdm.retrieval import tree_tensors

        rec = self.recommender
        index = int(rec.to_index(np.array([item_id]))[0])
        if index < 0:
            raise UnknownItemError(f"item {item_id} is not in the served model's corpus")
        tree = rec.tree
        leaf = tree.item_to_leaf(np.array([index]))
        nodes = tree.ancestors(leaf)[0]
        nodes = nodes[nodes >= 0]  # (depth of the leaf + 1,), root first
        query = rec.history(list(history), now)
        hist, windows = rec.features([query])
        if self._leaves_under is None:
            self._leaves_under = tree_tensors(tree, rec.device).leaves_under_host
        rows = tree.embedding_rows()[nodes]
        with torch.inference_mode():
            state = rec.model.user_state(
                torch.as_tensor(hist, device=rec.device),
                torch.as_tensor(windows, device=rec.device),
            )
            logits = rec.model.score(state, torch.as_tensor(rows[None, :], device=rec.device))
        logits = logits.float().cpu().numpy()[0]
        steps = []
        for level, (node, logit) in enumerate(zip(nodes, logits, strict=True)):
            steps.append(
                {
                    "node_id": int(node),
                    "level": level,
                    "n_leaves": int(self._leaves_under[node]),
                    "score": None if level == 0 else float(logit),  # the root is never scored
                    "probability": None if level == 0 else float(1 / (1 + np.exp(-logit))),
                }
            )
        return {
            "item": self.describe(np.array([index]))[0],
            "nodes": steps,
            "history_length": len(query.items),
            "unknown_items": [int(x) for x in query.unknown],
            "model_version": self.version,
        }
