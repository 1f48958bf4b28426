"""One answer at a time, in process: what the search of a single request costs, without HTTP.

The model folders and store of ``benchmarks/serving.py`` (``--items`` leaves, DNN and
attention-DNN of the paper's sizes, 69 behaviours of ``--users`` stored users), one torch thread
(``serve.num_threads``' default). For each model, ``retrieval.filter_beam`` value and filter mode
(``none``: nothing excluded; ``items``: the user's items excluded, the service's default),
``Engine.answer`` answers ``--answers`` single-user queries (k = 10) one by one after a warm-up,
the settings taking turns query by query (so that a drift of the machine's speed hits all of
them); the median milliseconds per answer are reported (the store read included, HTTP and JSON
not).

    python benchmarks/serving_inprocess.py --work /tmp/tdm-serving   # reuses serving.py's folders

Prints a table and writes benchmarks/results/serving_inprocess_<hostname>.json.
"""

from __future__ import annotations

import argparse
import os
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
from benchmarks.serving import HISTORY, MODELS, build_model_dir, fill_store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--answers", type=int, default=200)
    p.add_argument("--filter-beam", default="0,20", help="retrieval.filter_beam values")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="model folders and store (default: temporary)")
    p.add_argument("--out", type=Path, default=RESULTS)
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
        engines = {
            fb: Engine.load(folder, device="cpu", filter_beam=fb)
            for fb in [int(x) for x in args.filter_beam.split(",") if x]
        }
        configs = [(fb, mode) for fb in engines for mode in ("none", "items")]
        ms: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
        for fb, mode in configs:  # warm-up
            engines[fb].answer([Query(k=10, mode=mode, user_id=u) for u in range(5)], store)
        for u in range(args.answers):  # round-robin: drifts of the machine hit every config
            for fb, mode in configs:
                query = Query(k=10, mode=mode, user_id=u % args.users)
                start = time.perf_counter()
                engines[fb].answer([query], store)
                ms[(fb, mode)].append(1000 * (time.perf_counter() - start))
        for (fb, mode), xs in ms.items():
            row = {
                "model": name,
                "filter_beam": fb,
                "mode": mode,
                "median_ms": round(statistics.median(xs), 2),
                "p95_ms": round(sorted(xs)[int(0.95 * (len(xs) - 1))], 2),
            }
            rows.append(row)
            print(
                f"{name:14s} filter_beam {fb:3d}  {mode:5s}  "
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
