"""The online service (tdm/serving): store, features, dynamic batching, hot swap, bad requests,
metrics, against a real server on loopback with a real SQLite store.

Models have seeded random weights (answers depend on the weights, not on their quality), on the
tiny synthetic corpus; the tests run with one torch thread.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from serving_support import (
    LiveServer,
    items_of,
    offline_answer,
    popular_ids,
    prepare_tiny,
    tiny_config,
    write_model_dir,
)

from tdm.config import ServeConfig
from tdm.data.features import eval_batch
from tdm.data.protocol import load_prepared
from tdm.metrics import excluded_items
from tdm.recommender import Recommender, RequestError
from tdm.serving.app import Service, batch_workers
from tdm.serving.batcher import BatcherClosed, DynamicBatcher, share
from tdm.serving.engine import Engine, Query
from tdm.serving.metrics import Metrics
from tdm.serving.store import Event, SqliteStore, import_prepared


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Prepared tiny data, its category tree, and two different models on it (A: attention-DNN,
    B: DNN, other weights)."""
    root = tmp_path_factory.mktemp("serving")
    prepared, tree = prepare_tiny(root)
    a = write_model_dir(root / "model_a", prepared, tree, "attention_dnn", seed=0)
    b = write_model_dir(root / "model_b", prepared, tree, "dnn", seed=1)
    return {"root": root, "prepared": prepared, "tree": tree, "a": a, "b": b}


def make_service(corpus, tmp_path, *extra: str, model: Path | None = None) -> Service:
    cfg = tiny_config(*extra)
    store = SqliteStore(tmp_path / "store.sqlite", cfg.data.max_history)
    service = Service(cfg, str(model or corpus["a"]), store, device="cpu")
    service.load()
    return service


@pytest.fixture(scope="module")
def live(corpus, tmp_path_factory):
    """A server on model A with the evaluation users in its store."""
    service = make_service(corpus, tmp_path_factory.mktemp("live"), "serve.max_wait_ms=5")
    import_prepared(service.store, corpus["prepared"])
    with LiveServer(service) as server:
        yield server


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


# ----------------------------------------------------------------------------- the store
def test_store_keeps_each_users_last_behaviours_by_time(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite", max_history=3)
    store.append([Event(1, 10, "pv", 100), Event(1, 11, "buy", 50), Event(2, 20, "pv", 7)])
    store.append([Event(1, 12, "pv", 300), Event(1, 13, "cart", 100), Event(1, 14, "pv", 1)])
    # user 1: times 1, 50, 100 (item 10), 100 (item 13, later arrival), 300 -> last 3 by time
    assert store.histories([1, 2, 3]) == {1: [(10, 100), (13, 100), (12, 300)], 2: [(20, 7)]}
    assert [e.behavior_type for e in store.history(1)] == ["pv", "cart", "pv"]
    assert store.count_users() == 2
    assert [u.user_id for u in store.users()] == [1, 2]  # most recently active first
    store.close()
    reopened = SqliteStore(tmp_path / "s.sqlite", max_history=3)
    assert reopened.histories([1])[1] == [(10, 100), (13, 100), (12, 300)]
    mode = reopened._writer.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reopened.close()


@pytest.mark.parametrize("window_mode", ["target_time", "last_behaviour", "position"])
def test_service_features_equal_the_offline_features(tmp_path, window_mode):
    """The store's histories of the evaluation users, turned into features by the service's
    path (Recommender.history + features), equal eval_batch's on the prepared data, in every
    ``data.window_mode``."""
    cfg = tiny_config(f"data.window_mode={window_mode}")
    prepared_dir, tree = prepare_tiny(tmp_path, cfg)
    model = write_model_dir(tmp_path / "model", prepared_dir, tree)
    prepared = load_prepared(prepared_dir)
    rec = Recommender.load(model, device="cpu")
    assert rec.window_mode == window_mode
    store = SqliteStore(tmp_path / "s.sqlite", rec.max_history)
    import_prepared(store, prepared_dir, splits=("test",))
    split = prepared.test
    stored = store.histories(split.users)
    histories = [rec.history(stored[int(u)]) for u in split.users]
    hist, windows = rec.features(histories)
    rows = np.arange(len(split.users))
    want_hist, want_windows = eval_batch(
        split, rows, rec.max_history, rec.window_bounds, window_mode
    )
    np.testing.assert_array_equal(hist, want_hist)
    np.testing.assert_array_equal(windows, want_windows)
    assert (want_hist >= 0).sum() > 0 and len(np.unique(want_windows[want_windows >= 0])) > 2


# ----------------------------------------------------------------------------- batching
def test_batcher_gathers_concurrent_requests_and_answers_each():
    sizes = []
    gate = threading.Event()

    def handle(batch):
        gate.wait(5)
        sizes.append(len(batch))
        return [ValueError(f"bad {x}") if x == 13 else x * 2 for x in batch]

    batcher = DynamicBatcher(handle, max_batch=8, max_wait_ms=50)
    futures = [batcher.submit(i) for i in range(20)]
    gate.set()
    assert [f.result(5) for f in futures if f is not futures[13]] == [
        2 * i for i in range(20) if i != 13
    ]
    with pytest.raises(ValueError, match="bad 13"):
        futures[13].result(5)
    assert max(sizes) <= 8 and sum(sizes) == 20 and len(sizes) < 20
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(1)


def test_a_lone_client_is_not_kept_waiting():
    """The batcher waits for company only after a batch that had some: one client at a time
    gets no added latency even with a long ``max_wait_ms``."""
    batcher = DynamicBatcher(lambda batch: batch, max_batch=64, max_wait_ms=2000)
    start = time.perf_counter()
    assert [batcher.submit(i).result(10) for i in range(5)] == list(range(5))
    assert time.perf_counter() - start < 1.0
    batcher.close()


def test_workers_search_side_by_side_and_close_answers_what_is_queued():
    """Two workers take batches from one queue at once (a batch in hand does not hold up the
    next); close answers every request queued before it and stops both workers."""
    inside, release = threading.Barrier(2, timeout=5), threading.Event()
    threads = set()

    def handle(batch):
        threads.add(threading.current_thread().name)
        if len(threads) <= 2 and batch[0] < 2:
            inside.wait()  # both workers hold a batch at the same time, or this times out
        release.wait(5)
        return [x + 100 for x in batch]

    batcher = DynamicBatcher(handle, max_batch=1, max_wait_ms=0, workers=2, name="w")
    futures = [batcher.submit(i) for i in range(10)]
    time.sleep(0.2)
    release.set()
    batcher.close()
    assert [f.result(0) for f in futures] == [i + 100 for i in range(10)]
    assert threads == {"w-0", "w-1"} and not batcher.alive
    with pytest.raises(BatcherClosed):
        batcher.submit(1)
    with pytest.raises(ValueError, match="workers"):
        DynamicBatcher(handle, workers=0)


def test_a_burst_is_shared_by_the_idle_workers():
    """With other workers idle a worker takes an even share of the queue and does not wait for
    company; end to end, a burst is answered by both workers."""
    assert [share(8, 1, 64), share(9, 1, 64), share(8, 3, 64), share(200, 1, 64)] == [4, 5, 2, 64]
    assert share(1, 5, 64) == 1 and share(8, 0, 64) == 8 and share(8, 0, 3) == 3
    names = set()

    def handle(batch):
        names.add(threading.current_thread().name)
        time.sleep(0.05)
        return batch

    batcher = DynamicBatcher(handle, max_batch=64, max_wait_ms=2000, workers=2, name="w")
    time.sleep(0.1)  # both workers wait on the queue
    start = time.perf_counter()
    futures = [batcher.submit(i) for i in range(8)]
    assert [f.result(5) for f in futures] == list(range(8))
    assert time.perf_counter() - start < 1.5  # nobody waited max_wait_ms (2 s) for company
    batcher.close()
    assert names == {"w-0", "w-1"}


def test_serve_workers_zero_means_one_per_core_with_the_c_search():
    cores = len(os.sched_getaffinity(0))
    assert batch_workers(ServeConfig(workers=3)) == 3
    assert batch_workers(ServeConfig(workers=0, backend="torch")) == 1
    assert batch_workers(ServeConfig(workers=0)) == cores  # the C search is built here


def test_a_failing_batch_fails_its_requests_and_the_worker_lives_on():
    calls = []

    def handle(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return batch

    batcher = DynamicBatcher(handle, max_batch=1, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(1).result(5)
    assert batcher.submit(2).result(5) == 2
    batcher.close()


def _queries(corpus, rec: Recommender) -> list[Query]:
    prepared = load_prepared(corpus["prepared"])
    split = prepared.valid
    ids = rec.items.sort_values("item_index")["item_id"].to_numpy()
    queries = []
    for row in range(12):
        lo, hi = split.hist_offsets[row], split.hist_offsets[row + 1]
        history = tuple(
            (int(ids[i]), int(t))
            for i, t in zip(split.hist_items[lo:hi], split.hist_times[lo:hi], strict=True)
        )
        if row == 3:
            history = ((987654321, 5), *history)  # an unknown item, ignored
        if row == 5:
            history = tuple((i, None) for i, _ in history)  # no timestamps
        k = (5, 10, 7)[row % 3]
        mode = ("items", "none", "categories")[row % 3 if row != 4 else 0]
        queries.append(Query(k=k, mode=mode, history=history))
    return queries


@pytest.mark.parametrize("filter_beam", [0, 30])
def test_every_batched_answer_equals_its_unbatched_answer(corpus, filter_beam):
    """One batch mixing k (5, 10, 7), filters (items, none, categories), timestamps or none and
    unknown items: each answer equals the one-request batch and ``Recommender.recommend``
    (also with a wider beam for requests with exclusions, ``retrieval.filter_beam``)."""
    engine = Engine.load(corpus["a"], device="cpu", filter_beam=filter_beam)
    rec = engine.recommender
    queries = _queries(corpus, rec)
    batched = engine.answer(queries)
    for query, answer in zip(queries, batched, strict=True):
        alone = engine.answer([query])[0]
        assert list(answer.item_ids) == list(alone.item_ids)
        np.testing.assert_allclose(answer.scores, alone.scores, rtol=1e-5, atol=1e-6)
        assert len(answer.item_ids) == min(query.k, len(rec.items))
        if query.mode in ("none", "items"):
            assert list(answer.item_ids) == offline_answer(rec, query.history, query.k, query.mode)
        else:  # categories: nothing of a seen category, as tdm.metrics.excluded_items says
            history = rec.history(list(query.history))
            seen = np.unique(history.items)
            want, _ = excluded_items(
                "categories", seen, np.array([0, len(seen)]), rec.items["category_id"].to_numpy()
            )
            np.testing.assert_array_equal(engine.exclusion(history, "categories"), want)
            assert not set(rec.to_index(answer.item_ids)) & set(want.tolist())
    assert batched[3].unknown_items == [987654321]
    assert not any(a.cold_start for a in batched)


def test_a_bad_k_fails_only_its_own_request(corpus):
    engine = Engine.load(corpus["a"], device="cpu", max_k=50)
    history = ((int(engine.recommender.to_ids(np.array([0]))[0]), 100),)
    good, bad = engine.answer([Query(k=5, history=history), Query(k=51, history=history)])
    assert len(good.item_ids) == 5
    assert isinstance(bad, RequestError) and "above retrieval.max_k" in str(bad)


# ----------------------------------------------------------------------------- HTTP
def test_recommend_for_a_stored_user_and_for_a_history(live, corpus):
    engine = live.service.engine
    rec = engine.recommender
    user = int(load_prepared(corpus["prepared"]).test.users[0])
    stored = live.service.store.histories([user])[user]
    got = post(live, "/v1/recommend", {"user_id": user, "k": 8}).json()
    assert got["cold_start"] is False and got["history_length"] == len(stored)
    assert items_of(got) == offline_answer(rec, stored, 8, "items")
    assert got["model_version"] == engine.version and got["filter"] == "items"
    history = [{"item_id": i, "timestamp": t} for i, t in stored]
    same = post(live, "/v1/recommend", {"history": history, "k": 8, "exclude_seen": True})
    assert items_of(same.json()) == items_of(got)
    keep = post(live, "/v1/recommend", {"history": history, "k": 8, "filter": "none"}).json()
    assert items_of(keep) == offline_answer(rec, stored, 8, "none")
    scores = [item["score"] for item in got["items"]]
    assert scores == sorted(scores, reverse=True)
    first = got["items"][0]
    index = int(rec.to_index(np.array([first["item_id"]]))[0])
    assert first["category_id"] == int(rec.items["category_id"].iloc[index])


def test_an_unknown_user_gets_the_most_popular_list_marked_cold_start(live, corpus):
    got = post(live, "/v1/recommend", {"user_id": 424242424, "k": 6}).json()
    assert got["cold_start"] is True
    assert items_of(got) == popular_ids(live.service.engine.recommender.items, 6)
    assert all(item["score"] is None for item in got["items"])
    only_unknown = post(live, "/v1/recommend", {"history": [{"item_id": 999999991}], "k": 3})
    assert only_unknown.json()["cold_start"] is True
    assert only_unknown.json()["unknown_items"] == [999999991]


def test_unknown_items_in_a_history_are_ignored_and_reported(live):
    rec = live.service.engine.recommender
    known = [int(i) for i in rec.to_ids(np.array([3, 4]))]
    history = [{"item_id": known[0], "timestamp": 10}, {"item_id": 999999993, "timestamp": 11},
               {"item_id": known[1], "timestamp": 12}]  # fmt: skip
    got = post(live, "/v1/recommend", {"history": history, "k": 5}).json()
    assert got["unknown_items"] == [999999993] and got["history_length"] == 2
    assert items_of(got) == offline_answer(rec, [(known[0], 10), (known[1], 12)], 5, "items")


BAD_REQUESTS = [
    # (path, JSON body or raw bytes, status, error code, words of the message)
    ("/v1/recommend", {"user_id": 1, "k": 10, "colour": "red"}, 422, "invalid_request", "colour"),
    ("/v1/recommend", {"user_id": "1"}, 422, "invalid_request", "user_id"),
    ("/v1/recommend", {"user_id": 1, "k": 2.5}, 422, "invalid_request", "k"),
    ("/v1/recommend", {"user_id": 1, "k": "10"}, 422, "invalid_request", "k"),
    ("/v1/recommend", {"user_id": 1, "k": 0}, 422, "invalid_request", "k"),
    ("/v1/recommend", {"user_id": 1, "k": -3}, 422, "invalid_request", "k"),
    ("/v1/recommend", {"user_id": 1, "k": 1001}, 422, "invalid_request", "max_k"),
    ("/v1/recommend", {"user_id": 1, "k": True}, 422, "invalid_request", "k"),
    ("/v1/recommend", {"user_id": -1}, 422, "invalid_request", "user_id"),
    ("/v1/recommend", {"user_id": 2**64}, 422, "invalid_request", "user_id"),
    ("/v1/recommend", {"k": 5}, 422, "invalid_request", "exactly one"),
    ("/v1/recommend", {"user_id": 1, "history": []}, 422, "invalid_request", "exactly one"),
    ("/v1/recommend", {"history": [{"item_id": 1, "timestamp": "x"}]}, 422, "invalid_request",
     "timestamp"),
    ("/v1/recommend", {"history": [{"item": 1}]}, 422, "invalid_request", "item"),
    ("/v1/recommend", {"history": [{"item_id": 1}] * 1001}, 422, "invalid_request",
     "max_request_history"),
    ("/v1/recommend", {"user_id": 1, "filter": "brand"}, 422, "invalid_request", "filter"),
    ("/v1/recommend", {"user_id": 1, "exclude_seen": "yes"}, 422, "invalid_request",
     "exclude_seen"),
    ("/v1/recommend", {"user_id": 1, "exclude_seen": False, "filter": "items"}, 422,
     "invalid_request", "contradicts"),
    ("/v1/recommend", [1, 2], 422, "invalid_request", "body"),
    ("/v1/recommend", b"{not json", 422, "invalid_json", "JSON"),
    ("/v1/recommend", b"", 422, "invalid_request", "body"),
    ("/v1/events", {"events": []}, 422, "invalid_request", "events"),
    ("/v1/events", {"events": [{"user_id": 1, "item_id": 2, "timestamp": 3,
                                "behavior_type": "click"}]}, 422, "invalid_request",
     "behavior_type"),
    ("/v1/events", {"events": [{"user_id": 1, "item_id": 2}]}, 422, "invalid_request",
     "timestamp"),
    ("/v1/events", {"events": [{"user_id": 1, "item_id": 2, "timestamp": 1}] * 1001}, 422,
     "invalid_request", "at most 1000"),
    ("/v1/path", {"item_id": 987654321}, 404, "not_found", "corpus"),
    ("/v1/path", {"item_id": 1, "user_id": 1, "history": []}, 422, "invalid_request",
     "at most one"),
    ("/v1/reload", {"model": "/no/such/model"}, 422, "reload_failed", "model.pt"),
    ("/v1/reload", {"model": "nosuchscheme:/x"}, 422, "reload_failed", "no resolver"),
    ("/v1/nothing", {}, 404, "not_found", "Not Found"),
    ("/v1/recommend", b"[" * 100000 + b"]" * 100000, 400, "bad_request", "parsing"),
    ("/v1/recommend", b"\xff\xfe\x00", 400, "bad_request", "parsing"),
    ("/v1/recommend", b'{"user_id": 1, "k": NaN}', 422, "invalid_request", "k"),
    ("/v1/recommend", b'{"user_id": 1e400}', 422, "invalid_request", "user_id"),
    ("/v1/recommend", b"null", 422, "invalid_request", "body"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, status, code, words", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_never_a_500(live, path, body, status, code, words):
    if isinstance(body, bytes):
        response = httpx.post(
            live.url + path, content=body, headers={"content-type": "application/json"}
        )
    else:
        response = post(live, path, body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] == code
    assert words.lower() in json.dumps(error).lower()


def test_bodies_over_the_limit_get_413_declared_or_streamed(live):
    big = b'{"events": [' + b" " * (1 << 20) + b"]}"
    declared = httpx.post(live.url + "/v1/events", content=big,
                          headers={"content-type": "application/json"})  # fmt: skip
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"

    def chunks():
        for _ in range(20):
            yield b" " * 65536

    streamed = httpx.post(live.url + "/v1/recommend", content=chunks(),
                          headers={"content-type": "application/json"})  # fmt: skip
    assert streamed.status_code == 413
    assert httpx.get(live.url + "/healthz").status_code == 200  # still serving


def test_health_readiness_model_info_and_openapi(live, corpus):
    assert httpx.get(live.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(live.url + "/readyz").json()
    assert ready["status"] == "ready"
    info = httpx.get(live.url + "/v1/model").json()
    from tdm.io import manifest_digest
    from tdm.serving.engine import file_md5

    assert info["manifest_digest"] == manifest_digest(corpus["a"])
    assert info["tree_md5"] == file_md5(corpus["a"] / "tree.tree")
    assert info["n_items"] == 200 and info["version"] == ready["model_version"]
    assert {"run_id", "dvc", "depth", "n_nodes", "model_class", "source"} <= set(info)
    spec = httpx.get(live.url + "/openapi.json").json()
    assert {"/v1/recommend", "/v1/events", "/v1/model", "/metrics"} <= set(spec["paths"])
    request = spec["components"]["schemas"]["RecommendRequest"]
    assert request["additionalProperties"] is False
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "recommend-btn" in page.text
    assert httpx.get(live.url + "/static/app.js").status_code == 200


def test_events_are_stored_and_change_the_users_recommendations(live):
    rec = live.service.engine.recommender
    ids = [int(i) for i in rec.to_ids(np.array([10, 11, 12]))]
    user = 5_000_001
    before = post(live, "/v1/recommend", {"user_id": user, "k": 4}).json()
    assert before["cold_start"] is True
    events = [{"user_id": user, "item_id": i, "behavior_type": "pv", "timestamp": 1000 + n}
              for n, i in enumerate(ids)]  # fmt: skip
    events.append({"user_id": user, "item_id": 999999999, "timestamp": 2000})
    stored = post(live, "/v1/events", {"events": events}).json()
    assert stored == {"accepted": 4, "users": 1, "unknown_items": [999999999]}
    after = post(live, "/v1/recommend", {"user_id": user, "k": 4}).json()
    assert after["cold_start"] is False and after["history_length"] == 3
    assert after["unknown_items"] == [999999999]
    pairs = [(i, 1000 + n) for n, i in enumerate(ids)] + [(999999999, 2000)]
    assert items_of(after) == offline_answer(rec, pairs, 4, "items")
    history = httpx.get(f"{live.url}/v1/users/{user}/history").json()["events"]
    assert [e["item_id"] for e in history] == [*ids, 999999999]
    assert [e["known"] for e in history] == [True, True, True, False]


def test_tree_path_of_an_item_scores_each_node_for_the_user(live, corpus):
    engine = live.service.engine
    rec = engine.recommender
    user = int(load_prepared(corpus["prepared"]).test.users[1])
    top = post(live, "/v1/recommend", {"user_id": user, "k": 3}).json()["items"][0]
    path = post(live, "/v1/path", {"user_id": user, "item_id": top["item_id"]}).json()
    nodes = path["nodes"]
    assert nodes[0]["level"] == 0 and nodes[0]["n_leaves"] == 200 and nodes[0]["score"] is None
    assert nodes[-1]["n_leaves"] == 1 and path["item"]["item_id"] == top["item_id"]
    assert [n["level"] for n in nodes] == list(range(len(nodes)))
    leaf = int(rec.tree.item_to_leaf(rec.to_index(np.array([top["item_id"]])))[0])
    assert nodes[-1]["node_id"] == leaf
    assert nodes[-1]["score"] == pytest.approx(top["score"], abs=1e-4)  # the leaf's logit
    counts = [n["n_leaves"] for n in nodes]
    assert counts == sorted(counts, reverse=True)


def test_item_search_and_user_listing(live):
    rec = live.service.engine.recommender
    some = int(rec.to_ids(np.array([7]))[0])
    found = httpx.get(f"{live.url}/v1/items", params={"q": str(some)}).json()
    assert [i["item_id"] for i in found["items"]] == [some] and found["titles"] is False
    users = httpx.get(f"{live.url}/v1/users", params={"limit": 5}).json()
    assert len(users["users"]) == 5 and users["total"] >= 70
    assert httpx.get(f"{live.url}/v1/items", params={"q": ""}).status_code == 422
    assert httpx.get(f"{live.url}/v1/users", params={"limit": 0}).status_code == 422
    for path in ("/v1/users?offset=99999999999999999999999", "/v1/users/-5/history",
                 "/v1/users/99999999999999999999999/history", "/v1/users/abc/history"):  # fmt: skip
        response = httpx.get(live.url + path)
        assert response.status_code == 422 and response.json()["error"] == "invalid_request"


def _histogram(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = out.get(le, 0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_counted_in_the_metrics(corpus, tmp_path):
    service = make_service(corpus, tmp_path, "serve.max_wait_ms=30", "serve.max_batch=16")
    import_prepared(service.store, corpus["prepared"])
    users = [int(u) for u in load_prepared(corpus["prepared"]).valid.users[:32]]
    with LiveServer(service) as server, httpx.Client(timeout=30) as client:

        def ask(user):
            return client.post(server.url + "/v1/recommend", json={"user_id": user, "k": 5})

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, users))
        alone = service.engine.answer([Query(k=5, user_id=u) for u in users], service.store)
        for response, want in zip(answers, alone, strict=True):
            assert response.status_code == 200
            assert items_of(response.json()) == [int(i) for i in want.item_ids]
        client.post(server.url + "/v1/recommend", json={"user_id": 1, "k": "x"})
        text = client.get(server.url + "/metrics").text
    n = len(users)
    sizes = _histogram(text, "tdm_batch_size")
    assert sizes["+Inf"] < n and sizes["1"] < sizes["+Inf"]  # some batches held several
    assert (
        f'tdm_http_requests_total{{route="/v1/recommend",method="POST",status="200"}} {n}' in text
    )
    assert 'tdm_http_requests_total{route="/v1/recommend",method="POST",status="422"} 1' in text
    latency = _histogram(text, "tdm_http_request_duration_seconds")
    assert latency["+Inf"] >= n + 1
    assert "# TYPE tdm_http_request_duration_seconds histogram" in text
    assert f'tdm_model_info{{version="{service.engine.version}"}} 1' in text
    assert service.metrics.batch_size.count() == sizes["+Inf"]


def test_metrics_text_format():
    metrics = Metrics()
    metrics.requests.inc(route="/x", method="GET", status="200")
    metrics.latency.observe(0.003, route="/x")
    metrics.latency.observe(0.004, route="/x")  # on a bound: counted in that bucket
    text = metrics.render()
    assert 'tdm_http_requests_total{route="/x",method="GET",status="200"} 1' in text
    assert 'tdm_http_request_duration_seconds_bucket{route="/x",le="0.002"} 0' in text
    assert 'tdm_http_request_duration_seconds_bucket{route="/x",le="0.004"} 2' in text
    assert 'tdm_http_request_duration_seconds_bucket{route="/x",le="+Inf"} 2' in text
    assert 'tdm_http_request_duration_seconds_count{route="/x"} 2' in text
    assert "tdm_events_total 0" in text


# ----------------------------------------------------------------------------- hot swap
@pytest.mark.integration
def test_hot_swap_under_load_answers_every_request_wholly_by_one_model(corpus, tmp_path):
    """Clients keep asking while the model flips A -> B -> A -> B: no request fails, and each
    answer is exactly what the model it is tagged with gives (two batcher workers, so batches
    on the old and the new model can be in flight at once)."""
    service = make_service(corpus, tmp_path, "serve.max_wait_ms=2", "serve.workers=2")
    import_prepared(service.store, corpus["prepared"])
    users = [int(u) for u in load_prepared(corpus["prepared"]).test.users[:24]]
    engines = {}
    for folder in (corpus["a"], corpus["b"]):
        engine = Engine.load(folder, device="cpu", warm_up=False)
        engines[engine.version] = {
            u: [int(i) for i in a.item_ids]
            for u, a in zip(
                users,
                engine.answer([Query(k=6, user_id=u) for u in users], service.store),
                strict=True,
            )
        }
    assert len(engines) == 2
    a_version, b_version = engines
    assert engines[a_version] != engines[b_version]  # the two models disagree
    stop = threading.Event()
    seen, failures = [], []
    with LiveServer(service) as server:

        def client(offset: int) -> None:
            with httpx.Client(timeout=30) as http:
                n = offset
                while not stop.is_set():
                    user = users[n % len(users)]
                    n += 1
                    response = http.post(server.url + "/v1/recommend",
                                         json={"user_id": user, "k": 6})  # fmt: skip
                    if response.status_code != 200:
                        failures.append(response.text)
                        continue
                    body = response.json()
                    seen.append(body["model_version"])
                    if items_of(body) != engines[body["model_version"]][user]:
                        failures.append(f"mixed answer for user {user}: {body}")

        threads = [threading.Thread(target=client, args=(i * 5,)) for i in range(6)]
        for thread in threads:
            thread.start()
        swaps = []
        for folder in (corpus["b"], corpus["a"], corpus["b"]):
            time.sleep(0.4)
            swaps.append(post(server, "/v1/reload", {"model": str(folder)}))
        time.sleep(0.4)
        stop.set()
        for thread in threads:
            thread.join(30)
        text = httpx.get(server.url + "/metrics").text
    assert failures == []
    assert [s.status_code for s in swaps] == [200, 200, 200]
    assert [s.json()["model"]["version"] for s in swaps] == [b_version, a_version, b_version]
    assert set(seen) == {a_version, b_version} and len(seen) > 50
    assert seen[-1] == b_version
    assert 'tdm_model_reloads_total{result="loaded"} 4' in text
    assert ',status="5' not in text


def test_a_failed_reload_keeps_the_model_and_an_unchanged_one_is_not_reloaded(corpus, tmp_path):
    from tdm.io import atomic_dir

    service = make_service(corpus, tmp_path)
    version = service.engine.version
    broken = tmp_path / "broken"
    with atomic_dir(broken) as tmp:
        for f in corpus["a"].iterdir():
            (tmp / f.name).write_bytes(f.read_bytes())
    data = bytearray((broken / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (broken / "model.pt").write_bytes(bytes(data))
    with LiveServer(service) as server:
        failed = post(server, "/v1/reload", {"model": str(broken)})
        assert failed.status_code == 422 and "model.pt" in failed.json()["message"]
        assert httpx.get(server.url + "/v1/model").json()["version"] == version
        same = post(server, "/v1/reload", {}).json()
        assert same["reloaded"] is False and same["model"]["version"] == version
        forced = post(server, "/v1/reload", {"force": True}).json()
        assert forced["reloaded"] is True and forced["previous"] == version
        assert post(server, "/v1/recommend", {"user_id": 1, "k": 3}).status_code == 200


@pytest.mark.integration
def test_polling_swaps_in_a_retrained_folder(corpus, tmp_path):
    """``serve.reload_poll_s``: a new model published into the served folder (as ``tdm train``
    publishes, one atomic swap) is picked up without a request."""
    from tdm.io import atomic_dir

    served = tmp_path / "models" / "round_0"
    write_model_dir(served, corpus["prepared"], corpus["tree"], "attention_dnn", seed=0)
    service = make_service(corpus, tmp_path, "serve.reload_poll_s=0.2", model=served)
    first = service.engine.version
    with LiveServer(service) as server:
        with atomic_dir(served) as tmp:
            for f in corpus["b"].iterdir():
                (tmp / f.name).write_bytes(f.read_bytes())
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/v1/model").json()["version"] == first:
            assert time.monotonic() < deadline, "the new folder was not picked up"
            time.sleep(0.1)
        info = httpx.get(server.url + "/v1/model").json()
        assert info["model_class"] == "DNN"
        assert post(server, "/v1/recommend", {"user_id": 1, "k": 3}).status_code == 200


# ----------------------------------------------------------------------------- catalog, source
def test_movielens_titles_and_genre_names_match_the_loaders_categories(tmp_path):
    """Category names read from movies.csv name the category ids ``load_movielens`` gave."""
    import pandas as pd

    from tdm.data.loaders import load_movielens
    from tdm.serving.catalog import default_titles, load_catalog

    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,"Toy Story (1995)",Adventure|Animation|Children\n'
        "2,Heat (1995),Action|Crime|Thriller\n"
        '3,"Shawshank Redemption, The (1994)",Crime|Drama\n'
        "4,Obscure (2001),(no genres listed)\n"
    )
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,5,10\n1,2,4,11\n2,3,4.5,12\n2,4,5,13\n"
    )
    table = load_movielens(folder).drop_duplicates("item_id")
    items = pd.DataFrame(
        {
            "item_index": [0, 1, 2, 3],
            "item_id": table["item_id"].to_numpy(),
            "category_id": table["category_id"].to_numpy(),
            "train_count": [1, 1, 1, 1],
        }
    )
    catalog = load_catalog(folder, items)
    by_id = dict(zip(items["item_id"], range(4), strict=True))
    assert catalog.title(by_id[3]) == "Shawshank Redemption, The (1994)"
    names = {int(i): catalog.category(c) for i, c in zip(items["item_id"], items["category_id"],
                                                          strict=True)}  # fmt: skip
    assert names == {1: "Adventure", 2: "Action", 3: "Crime", 4: "(no genres listed)"}
    meta = {"data": {"source": "movielens", "path": str(folder)}}
    assert default_titles(meta) == str(folder)
    assert default_titles({"data": {"source": "userbehavior", "path": str(folder)}}) is None
    (tmp_path / "titles.csv").write_text("item_id,title\n2,Heat\n99,Elsewhere\n")
    plain = load_catalog(tmp_path / "titles.csv", items)
    assert plain.title(by_id[2]) == "Heat" and plain.title(by_id[1]) is None


def test_a_model_folder_recorded_in_dvc_lock_reports_its_dvc_hash(corpus, tmp_path):
    import shutil

    from tdm.serving.source import resolve, scheme

    model = tmp_path / "models" / "round_0"
    shutil.copytree(corpus["a"], model)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train_0:\n    cmd: tdm train\n    outs:\n"
        "    - path: models/round_0\n      md5: 0123456789abcdef.dir\n"
    )
    folder, info = resolve("models/round_0", tmp_path)
    assert folder == tmp_path / "models" / "round_0"
    assert info["dvc"] == {"model.md5": "0123456789abcdef.dir"}
    engine = Engine.load(folder, info, device="cpu", warm_up=False)
    assert engine.info["dvc"] == {"model.md5": "0123456789abcdef.dir"}
    assert scheme("models:/tdm/1") == "models" and scheme("/abs/path") is None
    assert scheme("relative/dir") is None and scheme("file:///x") == "file"
