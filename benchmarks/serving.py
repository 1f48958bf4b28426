"""Load test of ``tdm serve`` (the paper's Sec. 4): throughput and latency over loopback HTTP, with
and without dynamic batching, and errors during hot swaps.

A synthetic model folder per model (``--items`` leaves, a near-complete binary tree, seeded random
weights of the paper's sizes: D = 24, attention 36, FC 128-64-24; 69 behaviours in 10 time windows)
and a behaviour store of ``--users`` users with full histories are written to a temporary folder.
For each model and mode, ``tdm serve`` runs as its own process (``batched``:
``serve.max_batch``/``serve.max_wait_ms``; ``unbatched``: ``serve.max_batch=1``) and a client
process keeps ``c`` connections busy (HTTP/1.1 keep-alive, one request in flight per connection,
closed loop), for each concurrency c: ``POST /v1/recommend {"user_id", "k"}`` with users drawn at
random (the service's default filter, the user's items left out; ``--filter none`` asks for nothing
to be left out). Each row is bounded by ``--requests`` and ``--seconds`` after a warm-up of 2c
requests; latency is measured by the client from sending the request to reading the whole answer.
The mean batch size comes from the server's ``/metrics``. Unless ``--no-swap``, one more batched
run at the highest concurrency, for ``--seconds``, reloads the model (``POST /v1/reload`` with
``force``: loaded fully, then switched) every ``--swap-every`` seconds and counts failed requests.

Everything runs on 127.0.0.1 and stops by itself.

    python benchmarks/serving.py                 # 1M items, DNN and attention-DNN, c 1/8/64
    python benchmarks/serving.py --smoke         # 2k items, seconds (the test suite runs it)
    python benchmarks/serving.py --items 100000 --models dnn --concurrency 1,64 --seconds 10
    python benchmarks/serving.py --filter none --concurrency 1 --modes batched --no-swap

Prints a table and writes benchmarks/results/serving_<hostname>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, machine_info, percentile, result_name, write_result  # noqa: E402

HISTORY = 69  # params.yaml data.max_history
WINDOWS = 10  # params.yaml data.time_windows
MODELS = ("dnn", "attention_dnn")


# ----------------------------------------------------------------------------- the model
def build_model_dir(out: Path, n_items: int, name: str, seed: int) -> dict:
    """A model folder as ``tdm train`` writes it, with random weights; returns its facts."""
    import pandas as pd
    import torch

    from tdm.checkpoint import save_model
    from tdm.config import ModelConfig
    from tdm.io import atomic_dir, write_json
    from tdm.model import build_model
    from tdm.tree import Tree

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    tree = Tree.from_ordered_items(rng.permutation(n_items), arity=2)
    cfg = ModelConfig(name=name)
    model = build_model(cfg, tree.n_nodes, WINDOWS, seed=seed).eval()
    item_ids = np.arange(n_items, dtype=np.int64) * 3 + 1  # raw ids differ from indices
    counts = (1e6 / (1 + np.arange(n_items)) ** 1.1).astype(np.int64)  # Zipf popularity
    items = pd.DataFrame(
        {
            "item_index": np.arange(n_items, dtype=np.int64),
            "item_id": item_ids,
            "category_id": rng.integers(0, 100, n_items, dtype=np.int64),
            "train_count": rng.permutation(counts),
        }
    )
    bounds = [int(60 * 4**i) for i in range(WINDOWS - 1)]  # 1 min .. ~182 days
    meta = {"n_items": n_items, "max_history": HISTORY, "time_windows": WINDOWS,
            "window_bounds": bounds, "data": {"source": "synthetic"}}  # fmt: skip
    with torch.no_grad(), atomic_dir(out, manifest=True) as tmp:
        save_model(model, tmp / "model.pt", cfg)
        tree.save(tmp / "tree.tree")
        items.to_parquet(tmp / "items.parquet", index=False)
        write_json(tmp / "meta.json", meta)
    return {"n_items": n_items, "n_nodes": int(tree.n_nodes), "depth": int(tree.depth),
            "build_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def fill_store(path: Path, n_users: int, n_items: int, seed: int) -> None:
    """``n_users`` users with ``HISTORY`` behaviours each over the last ~week."""
    from tdm.serving.store import Event, SqliteStore

    rng = np.random.default_rng(seed)
    store = SqliteStore(path, HISTORY, "normal")
    now = 1_700_000_000
    events = []
    for user in range(n_users):
        items = rng.integers(0, n_items, HISTORY) * 3 + 1
        times = np.sort(now - rng.integers(0, 7 * 86400, HISTORY))
        events += [Event(user, int(i), "pv", int(t)) for i, t in zip(items, times, strict=True)]
    store.append(events)
    store.close()


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def start_server(model: Path, store: Path, port: int, sets: list[str], log: Path):
    cmd = [sys.executable, "-m", "tdm.cli", "serve", "--params", str(ROOT / "params.yaml"),
           "--model", str(model), "--store", str(store), "--port", str(port)]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    handle = open(log, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600
    while get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tdm serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.25)
    return proc, handle


def stop_server(proc, handle) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    handle.close()


def batch_stats(port: int) -> tuple[float, float]:
    """(sum, count) of the server's ``tdm_batch_size`` histogram."""
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("tdm_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("tdm_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


# ----------------------------------------------------------------------------- the client
async def _request(reader, writer, path: str, body: bytes) -> tuple[int, bytes]:
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def load(port: int, concurrency: int, bodies: list[bytes], requests: int, seconds: float,
               warmup: int, reload_every: float = 0.0) -> dict:  # fmt: skip
    """Closed-loop load: ``concurrency`` connections, ``requests`` in all or ``seconds``."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    reloads = []

    async def worker(offset: int, budget: int, record: bool, deadline: float) -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = offset
        try:
            while time.monotonic() < deadline:
                if record:
                    if issued >= budget:
                        break
                    issued += 1
                elif n - offset >= budget:
                    break
                body = bodies[n % len(bodies)]
                n += 1
                start = time.perf_counter()
                try:
                    status, payload = await _request(reader, writer, "/v1/recommend", body)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    errors.append(f"connection: {exc!r}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if record:
                    latencies.append(time.perf_counter() - start)
                    if status != 200:
                        errors.append(f"{status}: {payload[:200]!r}")
        finally:
            writer.close()

    done = asyncio.Event()

    async def reloader(deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                try:
                    await asyncio.wait_for(done.wait(), reload_every)
                    break  # the clients are done
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() >= deadline:
                    break
                start = time.perf_counter()
                status, payload = await _request(reader, writer, "/v1/reload", b'{"force": true}')
                reloads.append({"status": status, "seconds": time.perf_counter() - start})
        finally:
            writer.close()

    far = time.monotonic() + 600
    await asyncio.gather(*(worker(i * 7919, max(2, warmup // concurrency), False, far)
                           for i in range(concurrency)))  # fmt: skip
    start = time.perf_counter()
    deadline = time.monotonic() + seconds

    async def clients() -> None:
        await asyncio.gather(
            *(worker(i * 7919 + 13, requests, True, deadline) for i in range(concurrency))
        )
        done.set()

    await asyncio.gather(clients(), *([reloader(deadline)] if reload_every > 0 else []))
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 1) if wall > 0 else 0.0,
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(float(ms.mean()), 2) if len(ms) else 0.0,
        "reloads": reloads,
    }


# ----------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--modes", default="batched,unbatched")
    p.add_argument("--requests", type=int, default=2000, help="per row, at most")
    p.add_argument("--seconds", type=float, default=30.0, help="per row, at most")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("-k", type=int, default=10)
    p.add_argument(
        "--filter",
        choices=("items", "none", "categories"),
        default="items",
        help="the requests' filter mode (items: the service's default, the user's items left "
        "out, with the beam of retrieval.filter_beam; none: nothing left out, beam k); results "
        "of another mode go to serving_filter-<mode>_<host>.json",
    )
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="server torch threads (serve.num_threads; default: params.yaml's; 0: torch's default)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server batcher workers, batched and unbatched alike (serve.workers; default: "
        "params.yaml's)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "native", "torch"),
        default=None,
        help="the server's beam search (serve.backend; default: params.yaml's, auto: C)",
    )
    p.add_argument(
        "--no-swap", dest="swap", action="store_false", help="skip the batched run with reloads"
    )
    p.add_argument("--swap-every", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, help="keep the model folders here (default: temporary)")
    args = p.parse_args(argv)
    if args.smoke:
        args.items, args.users, args.requests, args.seconds = 2000, 50, 40, 5.0
        args.concurrency = "1,4"
        args.swap, args.swap_every = True, 0.5
        args.seconds = 2.0
        args.models = args.models if argv and "--models" in argv else "dnn"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    models = [m for m in args.models.split(",") if m]
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    work = Path(args.work or tempfile.mkdtemp(prefix="tdm-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    extra = {} if args.filter == "items" else {"filter": args.filter}  # items: the default
    bodies = [json.dumps({"user_id": rng.randrange(args.users), "k": args.k, **extra}).encode()
              for _ in range(4096)]  # fmt: skip
    info = machine_info()
    rows, built = [], {}
    try:
        store = work / "behaviors.sqlite"
        if not store.exists():
            fill_store(store, args.users, args.items, args.seed)
        for name in models:
            folder = work / f"{name}_{args.items}"
            built[name] = build_model_dir(folder, args.items, name, args.seed)
            print(f"{name}: {built[name]}", flush=True)
            runs = [(mode, c, 0.0) for mode in modes for c in concurrency]
            if args.swap and "batched" in modes:
                runs.append(("batched+swap", max(concurrency), args.swap_every))
            for batched in dict.fromkeys(m.startswith("batched") for m, _, _ in runs):
                sets = [f"serve.max_batch={args.max_batch if batched else 1}",
                        f"serve.max_wait_ms={args.max_wait_ms if batched else 0}"]  # fmt: skip
                if args.threads is not None:
                    sets.append(f"serve.num_threads={args.threads}")
                if args.workers is not None:
                    sets.append(f"serve.workers={args.workers}")
                if args.backend is not None:
                    sets.append(f"serve.backend={args.backend}")
                port = free_port()
                proc, handle = start_server(folder, store, port, sets, work / f"{name}.log")
                try:
                    for row_mode, c, every in runs:
                        if row_mode.startswith("batched") != batched:
                            continue
                        requests = args.requests if not every else 100 * args.requests
                        before = batch_stats(port)
                        result = asyncio.run(
                            load(port, c, bodies, requests, args.seconds, 2 * c, every)
                        )
                        after = batch_stats(port)
                        batches = after[1] - before[1]
                        result["mean_batch"] = (
                            round((after[0] - before[0]) / batches, 2) if batches else None
                        )
                        row = {"model": name, "mode": row_mode, "concurrency": c, **result}
                        rows.append(row)
                        print_row(row)
                finally:
                    stop_server(proc, handle)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    payload = {
        "benchmark": "serving",
        "machine": info,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": built,
        "rows": rows,
        "summary": summary(rows),
    }
    stem = "serving" if args.filter == "items" else f"serving_filter-{args.filter}"
    name = result_name(stem) if not args.smoke else result_name(f"{stem}_smoke")
    path = write_result(args.out, name, payload)
    print(json.dumps(payload["summary"], indent=2))
    print(f"wrote {path}")
    return 0


def print_row(r: dict) -> None:
    print(f"{r['model']:<14} {r['mode']:<13} c={r['concurrency']:<3} {r['requests']:>6} req "
          f"{r['throughput_rps']:>8.1f} req/s  p50 {r['p50_ms']:>7.2f}  p95 {r['p95_ms']:>7.2f}  "
          f"p99 {r['p99_ms']:>7.2f} ms  batch {r['mean_batch']}  errors {r['errors']}",
          flush=True)  # fmt: skip


def summary(rows: list[dict]) -> dict:
    """The issue's targets per model: p50 at c = 1, batched/unbatched throughput and p99 at the
    highest concurrency, errors during swaps."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        top = max(r["concurrency"] for r in mine)

        def find(mode, c, mine=mine):
            return next((r for r in mine if r["mode"] == mode and r["concurrency"] == c), None)

        one = find("batched", 1) or find("unbatched", 1)
        hi_b, hi_u = find("batched", top), find("unbatched", top)
        swap = find("batched+swap", top)
        out[name] = {
            "p50_ms_at_c1": one["p50_ms"] if one else None,
            f"speedup_batched_at_c{top}": (
                round(hi_b["throughput_rps"] / hi_u["throughput_rps"], 2)
                if hi_b and hi_u and hi_u["throughput_rps"]
                else None
            ),
            f"p99_ms_batched_at_c{top}": hi_b["p99_ms"] if hi_b else None,
            "errors": sum(r["errors"] for r in mine),
            "swap_reloads": len(swap["reloads"]) if swap else None,
            "swap_errors": swap["errors"] if swap else None,
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
