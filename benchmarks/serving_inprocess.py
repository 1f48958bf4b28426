"""One answer at a time, in process: what the search of a single request costs, without HTTP.

The model folders and store of ``benchmarks/serving.py`` (``--items`` leaves, DNN and
attention-DNN of the paper's sizes, 69 behaviours of ``--users`` stored users), one torch thread
(``serve.num_threads``' default). For each model, beam search backend (``--backends``:
``serve.backend``, C or torch), ``retrieval.filter_beam`` value and filter mode (``none``:
nothing excluded; ``items``: the user's items excluded, the service's default),
``Engine.answer`` answers ``--answers`` single-user queries (k = 10) one by one after a warm-up,
the settings taking turns query by query (so that a drift of the machine's speed hits all of
them); the median milliseconds per answer are reported (the store read included, HTTP and JSON
not). With ``--http``, ``tdm serve`` runs beside it on the same folder and store (as
``benchmarks/serving.py`` starts it, at the largest ``--filter-beam`` and the first of
``--backends``) and one more setting
takes its turn: the same query over loopback HTTP (``POST /v1/recommend {"user_id", "k": 10}``,
which excludes the user's items; one keep-alive connection, the answer read whole), so that the
HTTP path's share of an answer is measured under the same conditions as the search itself.

    python benchmarks/serving_inprocess.py --work /tmp/tdm-serving   # reuses serving.py's folders
    python benchmarks/serving_inprocess.py --work /tmp/tdm-serving --http

Prints a table and writes benchmarks/results/serving_inprocess_<hostname>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.common import RESULTS, machine_info, result_name, write_result  # noqa: E402
from benchmarks.serving import (  # noqa: E402
    HISTORY,
    MODELS,
    build_model_dir,
    fill_store,
    free_port,
    start_server,
    stop_server,
)


class HttpClient:
    """One keep-alive loopback connection, blocking: ``recommend(user)`` sends ``POST
    /v1/recommend {"user_id", "k": 10}`` and reads the whole answer (status 200 or an error)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def recommend(self, user: int) -> bytes:
        body = json.dumps({"user_id": user, "k": 10}).encode()
        head = (
            "POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        status = self.reader.readline()
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        payload = self.reader.read(length)
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP answer {status!r}: {payload[:200]!r}")
        return payload

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--answers", type=int, default=200)
    p.add_argument("--filter-beam", default="0,20", help="retrieval.filter_beam values")
    p.add_argument("--backends", default="native,torch", help="serve.backend values")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="model folders and store (default: temporary)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--http", action="store_true", help="also over loopback HTTP (tdm serve)")
    args = p.parse_args(argv)

    import torch

    from tdm.serving.engine import Engine, Query
    from tdm.serving.store import SqliteStore

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="tdm-serving-inprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    store_path = work / "behaviors.sqlite"
    if not store_path.exists():
        fill_store(store_path, args.users, args.items, args.seed)
    store = SqliteStore(store_path, HISTORY)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        folder = work / f"{name}_{args.items}"
        build_model_dir(folder, args.items, name, args.seed)
        backends = [b for b in args.backends.split(",") if b]
        beams = [int(x) for x in args.filter_beam.split(",") if x]
        engines = {
            (be, fb): Engine.load(folder, device="cpu", filter_beam=fb, backend=be)
            for be in backends
            for fb in beams
        }
        configs = [(be, fb, mode) for be, fb in engines for mode in ("none", "items")]
        server = client = None
        if args.http:
            top = max(beams)
            sets = [f"retrieval.filter_beam={top}", f"serve.backend={backends[0]}"]
            server = start_server(
                folder, store_path, port := free_port(), sets, work / f"{name}_inprocess_http.log"
            )
            client = HttpClient(port)
            configs.append((backends[0], top, "http"))

        def answer(be: str, fb: int, mode: str, user: int, engines=engines, client=client):
            if mode == "http":
                client.recommend(user)
            else:
                engines[(be, fb)].answer([Query(k=10, mode=mode, user_id=user)], store)

        ms: dict[tuple[str, int, str], list[float]] = {c: [] for c in configs}
        try:
            for config in configs:  # warm-up
                for u in range(5):
                    answer(*config, u)
            for u in range(args.answers):  # round-robin: drifts of the machine hit every config
                for config in configs:
                    start = time.perf_counter()
                    answer(*config, u % args.users)
                    ms[config].append(1000 * (time.perf_counter() - start))
        finally:
            if server is not None:
                client.close()
                stop_server(*server)
        for (be, fb, mode), xs in ms.items():
            row = {
                "model": name,
                "backend": engines[(be, fb)].info["search_backend"],
                "filter_beam": fb,
                "mode": mode,
                "median_ms": round(statistics.median(xs), 2),
                "p95_ms": round(sorted(xs)[int(0.95 * (len(xs) - 1))], 2),
            }
            rows.append(row)
            print(
                f"{name:14s} {be:6s} filter_beam {fb:3d}  {mode:5s}  "
                f"median {row['median_ms']:6.2f} ms  p95 {row['p95_ms']:6.2f} ms",
                flush=True,
            )
        del engines
    store.close()
    payload = {
        "benchmark": "serving_inprocess",
        "machine": machine_info(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    path = write_result(args.out, result_name("serving_inprocess"), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
