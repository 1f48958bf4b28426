"""Time and peak memory of the tree builders (Sec. 3.5) at corpus sizes up to 4M items.

Each (builder, size) runs in its own subprocess so that its peak RSS is clean. Data: 24-d float32
embeddings from a seeded mixture of Gaussians, categories Zipf-distributed over 10k categories.
Every result is checked (each item exactly once, balanced) outside the timed region.

    python benchmarks/tree_build.py                 # 100k and 1M
    python benchmarks/tree_build.py --full          # adds 4M
    python benchmarks/tree_build.py --sizes 50000,200000

Prints a table and writes benchmarks/results/tree_build_<hostname>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tdm.tree_build import category_tree, is_balanced, kmeans_tree  # noqa: E402

BUILDERS = ("category_tree", "kmeans_tree")
N_CATEGORIES = 10_000
N_COMPONENTS = 1_000


def make_data(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, dim) float32 mixture of Gaussians, categories (n,) Zipf over 10k)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_COMPONENTS, dim), dtype=np.float32) * 3.0
    component = rng.integers(0, N_COMPONENTS, n)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 20):  # in chunks: no full-size temporaries
        emb[start : start + (1 << 20)] += centres[component[start : start + (1 << 20)]]
    weight = 1.0 / np.arange(1, N_CATEGORIES + 1)
    categories = rng.choice(N_CATEGORIES, size=n, p=weight / weight.sum())
    return emb, categories


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_one(builder: str, n: int, dim: int, arity: int, iters: int, seed: int) -> dict:
    """Build one tree in this process; returns time, peak RSS and the checks."""
    emb, categories = make_data(n, dim, seed)
    items = np.arange(n, dtype=np.int64)
    rss_before = _max_rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    if builder == "category_tree":
        tree = category_tree(items, categories, arity=arity, seed=seed)
    else:
        tree = kmeans_tree(items, emb, arity=arity, seed=seed, iters=iters)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    rss_peak = _max_rss_mib()
    each_once = bool(np.array_equal(np.sort(tree.leaf_items), items))
    balanced = is_balanced(tree)
    return {
        "builder": builder,
        "n": n,
        "dim": dim,
        "arity": arity,
        "iters": iters,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "ns_per_n_log2_n": seconds * 1e9 / (n * math.log2(n)),
        "rss_before_build_mib": rss_before,
        "peak_rss_mib": rss_peak,
        "depth": tree.depth,
        "each_item_once": each_once,
        "balanced": balanced,
    }


def machine_info() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["load_average_1_5_15"] = list(os.getloadavg())  # the CPUs may be shared
    info["threads_env"] = {
        key: os.environ[key]
        for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        if key in os.environ
    }
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated item counts")
    parser.add_argument("--full", action="store_true", help="add 4M items")
    parser.add_argument("--builders", default=",".join(BUILDERS))
    parser.add_argument("--dim", type=int, default=24)
    parser.add_argument("--arity", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", nargs=2, metavar=("BUILDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        builder, n = args.worker[0], int(args.worker[1])
        print(json.dumps(run_one(builder, n, args.dim, args.arity, args.iters, args.seed)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.full and 4_000_000 not in sizes:
        sizes.append(4_000_000)
    builders = [b for b in args.builders.split(",") if b]
    common = ["--dim", str(args.dim), "--arity", str(args.arity), "--iters", str(args.iters)]
    common += ["--seed", str(args.seed)]
    results = []
    header = (
        f"{'builder':<14} {'n':>9} {'seconds':>9} {'cpu s':>8} {'ns/(n log2 n)':>14} "
        f"{'data MiB':>9} {'peak MiB':>9} {'depth':>5} {'ok':>3}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        for builder in builders:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", builder, str(n)]
            proc = subprocess.run(cmd + common, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{builder:<14} {n:>9} FAILED\n{proc.stderr}", file=sys.stderr)
                return 1
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            ok = "yes" if row["each_item_once"] and row["balanced"] else "NO"
            print(
                f"{builder:<14} {n:>9} {row['seconds']:>9.2f} {row['cpu_seconds']:>8.2f} "
                f"{row['ns_per_n_log2_n']:>14.1f} "
                f"{row['rss_before_build_mib']:>9.0f} {row['peak_rss_mib']:>9.0f} "
                f"{row['depth']:>5} {ok:>3}",
                flush=True,
            )
            if ok != "yes":
                print(f"{builder} at n={n}: item set or balance check failed", file=sys.stderr)
                return 1
    info = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tree_build_{info['hostname']}.json"
    path.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
