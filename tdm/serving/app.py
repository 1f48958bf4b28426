"""The HTTP service (FastAPI): behaviour events in, recommendations out, with dynamic batching,
model hot swap, metrics and a demo page.

``Service`` holds the state (the behaviour store, the current ``Engine``, the batcher, the
metrics); ``create_app(service)`` puts the routes around it; ``serve(...)`` runs it with uvicorn
(``tdm serve``). Endpoints (the OpenAPI document is at ``/openapi.json``):

- ``POST /v1/events``, ``POST /v1/recommend``, ``POST /v1/path``, ``POST /v1/reload``
- ``GET /v1/model``, ``GET /v1/items?q=``, ``GET /v1/users``, ``GET /v1/users/{id}/history``
- ``GET /healthz`` (the process answers), ``GET /readyz`` (a model, the batcher and the store are
  usable), ``GET /metrics`` (Prometheus text), ``GET /`` (the demo page)

Bad input never gets a 500: a body over ``serve.max_body_bytes`` gets 413, a request the schema
refuses or that cannot be answered as asked 422, an unknown route or item 404, each with a JSON
``{"error", "message"[, "details"]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi import Query as QueryParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tdm import native
from tdm.config import Config, ServeConfig
from tdm.errors import TdmError
from tdm.recommender import RequestError
from tdm.serving import schemas
from tdm.serving.batcher import BatcherClosed, DynamicBatcher
from tdm.serving.engine import Answer, Engine, Query, UnknownItemError, version_label
from tdm.serving.metrics import CONTENT_TYPE, Metrics
from tdm.serving.source import resolve
from tdm.serving.store import BehaviorStore, Event, StoreError

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")


def batch_workers(settings: ServeConfig) -> int:
    """``serve.workers``, or for 0 one batcher thread per core this process may use when the
    search runs in C (one thread each, the GIL released: docs/PERFORMANCE.md, section 5), else
    one (torch's operations take the GIL between them)."""
    if settings.workers > 0:
        return settings.workers
    if settings.backend == "torch" or not native.available():
        return 1
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, len(cores) if cores else os.cpu_count() or 1)


def _freeze_heap() -> None:
    """Keep the objects alive now (the libraries, the engine) out of later garbage collections.

    A full collection walks every tracked object: ~200k after the imports, ~85 ms on the
    project's VM, a pause in every request in flight when it runs under load. Requests' own
    garbage is still collected. Each switch unfreezes and collects first, so an engine that was
    replaced and is kept only by a reference cycle is freed at the next switch at the latest.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Service:
    """The state behind the routes.

    Args:
        cfg: the params (``serve``, ``retrieval.max_k``, ``retrieval.filter_beam``,
            ``data.max_history``, ``model.name`` are read).
        source: the model folder or ``models:/`` URI.
        store: the behaviour store.
        root: the project root (relative model folders, ``dvc.lock``).
        titles: a titles file or folder; None: the model's MovieLens data when it has one.
        device: where to score; default CUDA when present.
    """

    def __init__(
        self,
        cfg: Config,
        source: str,
        store: BehaviorStore,
        *,
        root: str | Path = ".",
        titles: str | Path | None = None,
        device: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.settings = cfg.serve
        self.source = source
        self.store = store
        self.root = Path(root)
        self.titles = titles
        self.device = device
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self._reload_lock = threading.Lock()
        self.batcher: DynamicBatcher = DynamicBatcher(
            self._answer_batch,
            self.settings.max_batch,
            self.settings.max_wait_ms,
            on_batch=self._on_batch,
            workers=batch_workers(self.settings),
        )

    # --------------------------------------------------------------------------- models
    def load(self, source: str | None = None, force: bool = False) -> dict[str, Any]:
        """Load ``source`` (default the current one) fully, then switch to it in one step.

        In-flight batches finish on the engine they started with; the next batch takes the
        new one. A failed load leaves the served model as it was.

        Returns:
            ``{"reloaded": bool, "previous": version or None, "model": info}``.
        """
        with self._reload_lock:
            source = source or self.source
            previous = self.engine
            try:
                folder, info = resolve(source, self.root)
                if previous is not None and not force and source == self.source:
                    from tdm.io import manifest_digest

                    digest = manifest_digest(folder)
                    if (
                        digest == previous.info.get("manifest_digest")
                        and version_label(info, digest) == previous.version
                    ):
                        self.metrics.reloads.inc(result="unchanged")
                        return {
                            "reloaded": False,
                            "previous": previous.version,
                            "model": previous.info,
                        }
                engine = Engine.load(
                    folder,
                    info,
                    model_name=self.cfg.model.name,
                    max_k=self.cfg.retrieval.max_k,
                    filter_beam=self.cfg.retrieval.filter_beam,
                    titles=self.titles,
                    device=self.device,
                    backend=self.cfg.serve.backend,
                )
            except BaseException:
                self.metrics.reloads.inc(result="failed")
                raise
            if engine.recommender.max_history > self.store.max_history:
                log.warning(
                    "the model reads %d behaviours, the store keeps %d per user",
                    engine.recommender.max_history,
                    self.store.max_history,
                )
            self.engine = engine  # the switch: one reference assignment
            self.source = source
            _freeze_heap()
            self.metrics.reloads.inc(result="loaded")
            self.metrics.model.clear()
            self.metrics.model.set(1, version=engine.version)
            self.metrics.items.set(engine.n_items)
            return {
                "reloaded": True,
                "previous": previous.version if previous is not None else None,
                "model": engine.info,
            }

    def current(self) -> Engine:
        engine = self.engine
        if engine is None:
            raise StoreError("no model loaded yet")
        return engine

    async def poll(self, every: float) -> None:
        """Load the source again every ``every`` seconds when its version changed."""
        while True:
            await asyncio.sleep(every)
            try:
                result = await run_in_threadpool(self.load)
                if result["reloaded"]:
                    log.info("model source changed: now serving %s", result["model"]["version"])
            except Exception as exc:  # keep serving the old model, try again later
                log.warning("polling %s failed: %s", self.source, exc)

    # --------------------------------------------------------------------------- batches
    def _answer_batch(self, queries: list[Query]) -> list[dict | BaseException]:
        """The batcher's handler: one engine for the whole batch, answers fully formed."""
        engine = self.current()
        answers = engine.answer(queries, self.store)
        out: list[dict | BaseException] = []
        for query, answer in zip(queries, answers, strict=True):
            if isinstance(answer, Answer):
                out.append(self._response(engine, query, answer))
                if answer.cold_start:
                    self.metrics.cold_start.inc()
                if answer.unknown_items:
                    self.metrics.unknown_items.inc(len(answer.unknown_items))
            else:
                out.append(answer)
        return out

    @staticmethod
    def _response(engine: Engine, query: Query, answer: Answer) -> dict:
        items = engine.describe(answer.item_index)
        for item, score in zip(items, answer.scores, strict=True):
            item["score"] = None if np.isnan(score) else round(float(score), 6)
        return {
            "items": items,
            "cold_start": answer.cold_start,
            "unknown_items": answer.unknown_items,
            "history_length": answer.history_length,
            "filter": query.mode,
            "k": query.k,
            "model_version": answer.model_version,
        }

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    def ready(self) -> list[str]:
        """What keeps the service from answering (empty when ready)."""
        problems = []
        if self.engine is None:
            problems.append("no model loaded")
        if not self.batcher.alive:
            problems.append("the batcher is stopped")
        try:
            self.store.ping()
        except StoreError as exc:
            problems.append(f"store: {exc}")
        return problems

    def close(self) -> None:
        self.batcher.close()
        self.store.close()


# ------------------------------------------------------------------------------- middleware
class Guard:
    """ASGI middleware: the body size limit (413 before the app reads anything) and the
    request metrics (count by route template, method and status; latency by route)."""

    def __init__(self, app, service: Service, routes: list | None = None) -> None:
        self.app = app
        self.service = service
        self.limit = service.settings.max_body_bytes
        self.routes = routes or []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            recorded = True
            label = getattr(scope.get("route"), "path", None) or self._route(scope)
            metrics = self.service.metrics
            metrics.requests.inc(route=label, method=scope["method"], status=str(status))
            metrics.latency.observe(time.perf_counter() - start, route=label)

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start" and not recorded:
                record(message["status"])  # before the client can see the response
            await send(message)

        try:
            replay = await self._body(scope, receive)
            if isinstance(replay, Response):
                await replay(scope, receive, send_counted)
                return
            await self.app(scope, replay, send_counted)
        finally:
            if not recorded:  # no response started: the app failed
                record(500)

    def _route(self, scope) -> str:
        """The route template of a request refused before routing (413), else "unmatched"."""
        from starlette.routing import Match

        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE and hasattr(route, "methods"):
                return route.path
        return "unmatched"

    async def _body(self, scope, receive):
        """A ``receive`` that replays the whole body, or a 413/400 response."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return _error(400, "bad_request", "Content-Length is not a number")
            if length > self.limit:
                return _too_large(length, self.limit)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return _too_large(size, self.limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _error(status: int, code: str, message: str, details: list | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status)


def _too_large(size: int, limit: int) -> JSONResponse:
    return _error(413, "too_large", f"request body of {size} bytes is over the {limit} byte limit")


def _validation_details(exc: RequestValidationError) -> list[dict]:
    return [
        {
            "loc": [str(x) for x in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]


# ------------------------------------------------------------------------------- the app
def create_app(service: Service) -> FastAPI:
    """The FastAPI application around ``service`` (whose model is loaded by the caller)."""
    settings = service.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        poller = None
        if settings.reload_poll_s > 0:
            poller = asyncio.create_task(service.poll(settings.reload_poll_s))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()

    app = FastAPI(
        title="tdm-flow serving",
        summary="TDM retrieval (Algorithm 1) over a behaviour store, as in the paper's Sec. 4",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        first = details[0] if details else {"loc": [], "msg": "invalid request", "type": ""}
        if first["type"] == "json_invalid":
            return _error(422, "invalid_json", "the body is not valid JSON", details)
        where = ".".join(x for x in first["loc"] if x != "body") or "body"
        return _error(422, "invalid_request", f"{where}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(UnknownItemError)
    async def unknown_item(request: Request, exc: UnknownItemError) -> JSONResponse:
        return _error(404, "not_found", str(exc))

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return _error(422, "invalid_request", str(exc))

    @app.exception_handler(StoreError)
    async def unavailable(request: Request, exc: StoreError) -> JSONResponse:
        return _error(503, "unavailable", str(exc))

    @app.exception_handler(BatcherClosed)
    async def closing(request: Request, exc: BatcherClosed) -> JSONResponse:
        return _error(503, "unavailable", "the service is shutting down")

    responses = {
        413: {"model": schemas.ErrorBody, "description": "body over serve.max_body_bytes"},
        422: {"model": schemas.ErrorBody, "description": "refused by the schema or the model"},
    }

    # ---------------------------------------------------------------------- operations
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"model": schemas.ErrorBody}})
    async def readyz():
        """A model is loaded, the batcher runs and the store answers."""
        problems = await run_in_threadpool(service.ready)
        if problems:
            return _error(503, "not_ready", "; ".join(problems))
        return {"status": "ready", "model_version": service.current().version}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text: requests by route and status, latency and batch-size histograms."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/model", tags=["model"])
    async def model() -> dict:
        """What is served: version, MLflow run id, tree md5, manifest digest, DVC hashes, corpus
        size, where it was loaded from."""
        return {**service.current().info, "source": service.source}

    @app.post(
        "/v1/reload", tags=["model"], responses={**responses, 503: {"model": schemas.ErrorBody}}
    )
    async def reload(body: schemas.ReloadRequest | None = None) -> dict:
        """Load the model source again (a new registry version behind the alias, a re-trained
        folder) or ``model``, fully, then switch to it; requests in flight finish on the old
        model. A source that fails to load leaves the served model as it was (422)."""
        body = body or schemas.ReloadRequest()
        try:
            return await run_in_threadpool(service.load, body.model, body.force)
        except (TdmError, OSError) as exc:  # the source names nothing loadable
            return _error(422, "reload_failed", " ".join(str(exc).split()) or type(exc).__name__)
        except Exception as exc:  # e.g. the registry is unreachable: not the request's fault
            log.exception("reload of %s failed", body.model or service.source)
            return _error(503, "reload_failed", " ".join(str(exc).split())[:500])

    # ---------------------------------------------------------------------- serving
    @app.post("/v1/events", tags=["serving"], responses=responses)
    async def events(body: schemas.EventsRequest) -> schemas.EventsResponse:
        """Store behaviours; answered once they are durable (they survive a crash)."""
        if len(body.events) > settings.max_events:
            raise RequestError(
                f"events: {len(body.events)} events, at most {settings.max_events} per request"
            )
        batch = [Event(e.user_id, e.item_id, e.behavior_type, e.timestamp) for e in body.events]
        await run_in_threadpool(service.store.append, batch)
        service.metrics.events.inc(len(batch))
        ids = np.array([e.item_id for e in batch], dtype=np.int64)
        unknown = ids[service.current().recommender.to_index(ids) < 0]
        return schemas.EventsResponse(
            accepted=len(batch),
            users=len({e.user_id for e in batch}),
            unknown_items=sorted({int(x) for x in unknown}),
        )

    @app.post("/v1/recommend", tags=["serving"], responses=responses)
    async def recommend(body: schemas.RecommendRequest) -> schemas.RecommendResponse:
        """Top-k items (Algorithm 1) for a stored user or an explicit history. A user without
        behaviours (or a history of unknown items only) gets the most-popular list, marked
        ``cold_start``; unknown history items are ignored and listed."""
        history = None
        if body.history is not None:
            if len(body.history) > settings.max_request_history:
                raise RequestError(
                    f"history: {len(body.history)} behaviours, at most "
                    f"{settings.max_request_history} (serve.max_request_history)"
                )
            history = tuple((h.item_id, h.timestamp) for h in body.history)
        query = Query(k=body.k, mode=body.mode, history=history, user_id=body.user_id, now=body.now)
        return await service.batcher(query)

    @app.post(
        "/v1/path", tags=["serving"], responses={**responses, 404: {"model": schemas.ErrorBody}}
    )
    async def path(body: schemas.PathRequest) -> schemas.PathResponse:
        """The item's path in the tree, root to leaf, with the model's score of each node for
        the user (or history; neither: an empty history)."""
        engine = service.current()
        if body.history is not None:
            if len(body.history) > settings.max_request_history:
                raise RequestError(f"history: at most {settings.max_request_history} behaviours")
            history = [(h.item_id, h.timestamp) for h in body.history]
        elif body.user_id is not None:
            stored = await run_in_threadpool(service.store.histories, [body.user_id])
            history = stored.get(body.user_id, [])
        else:
            history = []
        return await run_in_threadpool(engine.path, body.item_id, history, body.now)

    @app.get("/v1/items", tags=["demo"])
    async def items(
        q: str = QueryParam(..., min_length=1, max_length=200, description="title text or id"),
        limit: int = QueryParam(20, ge=1, le=200),
    ) -> dict:
        """Items whose title contains ``q`` or whose id is ``q``, most popular first."""
        engine = service.current()
        found = await run_in_threadpool(engine.search_items, q, limit)
        return {"items": found, "titles": engine.catalog.has_titles}

    @app.get("/v1/users", tags=["demo"])
    async def users(
        limit: int = QueryParam(50, ge=1, le=1000),
        offset: int = QueryParam(0, ge=0, le=2**62),
    ) -> dict:
        """Users of the behaviour store, most recently active first."""
        found = await run_in_threadpool(service.store.users, limit, offset)
        total = await run_in_threadpool(service.store.count_users)
        return {
            "users": [
                {"user_id": u.user_id, "events": u.events, "last_timestamp": u.last_timestamp}
                for u in found
            ],
            "total": total,
        }

    @app.get("/v1/users/{user_id}/history", tags=["demo"])
    async def user_history(user_id: int = PathParam(ge=0, le=2**63 - 1)) -> dict:
        """A user's stored behaviours, oldest first, with titles where known."""
        engine = service.current()
        events = await run_in_threadpool(service.store.history, user_id)
        ids = np.array([e.item_id for e in events], dtype=np.int64)
        index = engine.recommender.to_index(ids) if len(ids) else ids
        known = {
            int(i): d
            for i, d in zip(ids[index >= 0], engine.describe(index[index >= 0]), strict=True)
        }
        return {
            "user_id": user_id,
            "events": [
                {
                    "item_id": e.item_id,
                    "behavior_type": e.behavior_type,
                    "timestamp": e.timestamp,
                    "title": (known.get(e.item_id) or {}).get("title"),
                    "known": e.item_id in known,
                }
                for e in events
            ],
        }

    # ---------------------------------------------------------------------- the demo page
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, service=service, routes=app.router.routes)
    return app


# ------------------------------------------------------------------------------- running
def serve(
    cfg: Config,
    source: str,
    *,
    root: str | Path = ".",
    host: str | None = None,
    port: int | None = None,
    store: str | Path | None = None,
    titles: str | Path | None = None,
    import_users: str | Path | None = None,
    device: str | None = None,
) -> None:
    """Load the model, open the store and answer HTTP until SIGINT/SIGTERM (``tdm serve``).

    Args:
        cfg: the params; ``serve`` gives the defaults of everything below.
        source: a model folder or ``models:/NAME/ALIAS|VERSION``.
        root: the project root (relative paths).
        host, port, store, titles: override ``serve.host``, ``serve.port``, ``serve.store``,
            ``serve.titles``.
        import_users: a prepared folder whose evaluation users' known histories go into the
            store first (users to try the demo with); skipped when the store has users.
        device: where to score; default CUDA when present.
    """
    import torch
    import uvicorn

    from tdm.runtime import tune_allocator
    from tdm.serving.store import SqliteStore, import_prepared

    tune_allocator()
    settings = cfg.serve
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    root = Path(root)
    store_path = Path(store or settings.store)
    store_path = store_path if store_path.is_absolute() else root / store_path
    titles = titles or settings.titles
    if titles is not None and not Path(titles).is_absolute():
        titles = root / titles
    behaviors = SqliteStore(store_path, cfg.data.max_history, settings.store_sync)
    if import_users is not None and behaviors.count_users() == 0:
        n = import_prepared(behaviors, import_users)
        print(f"imported the known histories of {n} evaluation users into {store_path}")
    service = Service(cfg, source, behaviors, root=root, titles=titles, device=device)
    try:
        info = service.load()["model"]
        app = create_app(service)
        host = host or settings.host
        port = settings.port if port is None else port
        print(
            f"serving {info['version']} ({info['n_items']} items, {info['model_class']}) from "
            f"{source} at http://{host}:{port}/ (API: /openapi.json; store: {store_path})",
            flush=True,
        )
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
        uvicorn.Server(config).run()
    finally:
        service.close()
