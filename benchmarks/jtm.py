"""Time and peak memory of JTM's tree learning (tdm/jtm.py) at corpus sizes of 100k and 1M items.

Each (size, model, gap) runs in its own subprocess, so that its peak RSS is clean. Setting: a
binary tree over the items in random order (``Tree.from_ordered_items``), a freshly initialised
scorer of each ``--model`` (default all three built-ins, cheapest first, with the params.yaml
sizes: the scoring cost is that of a trained one), and ``--samples-per-item-mean`` training
samples per item on average with Zipf-like item popularity (weight ``1 / (rank + 10)^1.1``),
capped at ``--samples-per-item`` per item as ``tree.jtm_samples_per_item`` does. Histories:
``--history`` behaviours over ``--windows`` time windows, lengths uniform in 1..history, drawn
from a pool of 4096 so that making them costs next to nothing (the real ``TrainSamples.batch``
adds its own, small, cost).
Every result is checked (each item exactly once, the old tree's shape, balanced) outside the
timed region. ``--likelihood`` also reports the objective per sample (``tree_log_likelihood``)
before and after, on at most 200k random samples.

    python benchmarks/jtm.py                             # 100k and 1M items, all three models
    python benchmarks/jtm.py --items 10000 --likelihood  # a smoke run, with the objective
    python benchmarks/jtm.py --gap 1,3,4 --model attention_dnn

Prints a table and writes benchmarks/results/jtm_<hostname>[_cuda].json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    machine_info,
    max_rss_mib,
    result_name,
    write_result,
)

POOL = 4096
LIKELIHOOD_SAMPLES = 200_000


def make_samples(n_items: int, per_item_mean: float, history: int, windows: int, seed: int):
    """(targets (S,), features(index) -> (hist, windows), lengths (S,)) with Zipf-like targets."""
    rng = np.random.default_rng(seed)
    n_samples = int(round(n_items * per_item_mean))
    weight = 1.0 / (np.arange(n_items) + 10.0) ** 1.1
    popularity = rng.permutation(n_items)  # which item has which rank
    targets = popularity[rng.choice(n_items, size=n_samples, p=weight / weight.sum())]
    pool_len = rng.integers(1, history + 1, POOL)
    pool_hist = rng.integers(0, n_items, (POOL, history))
    pool_win = np.sort(rng.integers(0, windows, (POOL, history)), axis=1)[:, ::-1].copy()
    pad = np.arange(history)[None, :] < (history - pool_len)[:, None]  # left padding
    pool_hist[pad] = -1
    pool_win[pad] = -1
    pool_of = rng.integers(0, POOL, n_samples)  # the history of every sample

    def features(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = pool_of[index]
        width = max(int(pool_len[rows].max()), 1)
        return pool_hist[rows, -width:], pool_win[rows, -width:]

    return targets, features, pool_len[pool_of]


def run_one(args: argparse.Namespace, n_items: int, gap: int, model_name: str) -> dict:
    """Learn one tree in this process; returns time, peak RSS, per-step figures and checks."""
    import torch

    from tdm.config import ModelConfig
    from tdm.jtm import learn_tree, tree_log_likelihood
    from tdm.model import build_model
    from tdm.tree import Tree
    from tdm.tree_build import is_balanced

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    tree = Tree.from_ordered_items(rng.permutation(n_items), args.arity)
    cfg = ModelConfig(name=model_name)
    model = build_model(cfg, tree.n_nodes, args.windows, seed=args.seed).to(args.device).eval()
    targets, features, lengths = make_samples(
        n_items, args.samples_per_item_mean, args.history, args.windows, args.seed
    )
    rss_before = max_rss_mib()
    steps: list[dict] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    new = learn_tree(
        model,
        tree,
        targets,
        features,
        gap=gap,
        samples_per_item=args.samples_per_item,
        seed=args.seed,
        lengths=lengths,
        device=args.device,
        callback=steps.append,
    )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    rss_peak = max_rss_mib()
    scored = sum(s["samples_scored"] * s["nodes_per_sample"] for s in steps)
    row = {
        "n_items": n_items,
        "model": model_name,
        "arity": args.arity,
        "gap": gap,
        "depth": tree.depth,
        "samples": len(targets),
        "samples_per_item_cap": args.samples_per_item,
        "samples_scored": steps[0]["samples_scored"] if steps else 0,
        "pairs_scored": scored,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "scoring_seconds": sum(s["seconds_scoring"] for s in steps),
        "assign_seconds": sum(s["seconds_assign"] for s in steps),
        "pairs_per_s": scored / max(sum(s["seconds_scoring"] for s in steps), 1e-9),
        "steps": steps,
        "rss_before_mib": rss_before,
        "peak_rss_mib": rss_peak,
        "each_item_once": bool(np.array_equal(np.sort(new.leaf_items), np.arange(n_items))),
        "same_shape": bool(np.array_equal(new.parent, tree.parent)),
        "balanced": is_balanced(new),
    }
    if args.likelihood:  # on at most LIKELIHOOD_SAMPLES random samples (a mean: unbiased)
        t0 = time.perf_counter()
        some = np.sort(rng.permutation(len(targets))[:LIKELIHOOD_SAMPLES])

        def some_features(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return features(some[index])

        for key, which in (("before", tree), ("after", new)):
            row[f"log_likelihood_{key}"] = tree_log_likelihood(
                model, which, targets[some], some_features, args.device
            )
        row["likelihood_samples"] = len(some)
        row["likelihood_seconds"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="100000,1000000", help="comma-separated item counts")
    parser.add_argument("--gap", default="3", help="comma-separated tree.jtm_gap values")
    parser.add_argument(
        "--model", default="product_dnn,dnn,attention_dnn", help="comma-separated scorers"
    )
    parser.add_argument("--arity", type=int, default=2)
    parser.add_argument("--samples-per-item", type=int, default=16, help="the cap; 0: all")
    parser.add_argument("--samples-per-item-mean", type=float, default=20.0)
    parser.add_argument("--history", type=int, default=69, help="data.max_history")
    parser.add_argument("--windows", type=int, default=10, help="data.time_windows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--likelihood", action="store_true", help="also the objective, before/after"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=3, metavar=("N", "GAP", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        n, gap, model_name = args.worker
        print(json.dumps(run_one(args, int(n), int(gap), model_name)))
        return 0

    forward = [
        *("--arity", str(args.arity), "--seed", str(args.seed)),
        *("--samples-per-item", str(args.samples_per_item)),
        *("--samples-per-item-mean", str(args.samples_per_item_mean)),
        *("--history", str(args.history), "--windows", str(args.windows)),
        *("--threads", str(args.threads), "--device", args.device),
        *(["--likelihood"] if args.likelihood else []),
    ]
    header = (
        f"{'model':<13} {'items':>9} {'gap':>3} {'depth':>5} {'scored':>9} {'pairs':>11} "
        f"{'seconds':>9} {'scoring':>8} {'assign':>7} {'pairs/s':>9} {'peak MiB':>9} {'ok':>3}"
    )
    print(f"JTM tree learning, cap {args.samples_per_item} samples per item")
    print(header)
    print("-" * len(header))
    results = []
    runs = [
        (n, gap, name)
        for n in [int(s) for s in args.items.split(",") if s]
        for name in [m for m in args.model.split(",") if m]
        for gap in [int(g) for g in args.gap.split(",") if g]
    ]
    for n, gap, name in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), str(gap), name]
        proc = subprocess.run(cmd + forward, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name:<13} {n:>9} {gap:>3} FAILED\n{proc.stderr}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(row)
        ok = row["each_item_once"] and row["same_shape"] and row["balanced"]
        print(
            f"{name:<13} {n:>9} {gap:>3} {row['depth']:>5} {row['samples_scored']:>9} "
            f"{row['pairs_scored']:>11} {row['seconds']:>9.1f} {row['scoring_seconds']:>8.1f} "
            f"{row['assign_seconds']:>7.1f} {row['pairs_per_s']:>9.0f} "
            f"{row['peak_rss_mib']:>9.0f} {'yes' if ok else 'NO':>3}",
            flush=True,
        )
        if "log_likelihood_after" in row:
            print(
                f"{'':<13} {'':>9} objective per sample {row['log_likelihood_before']:.3f} -> "
                f"{row['log_likelihood_after']:.3f} ({row['likelihood_seconds']:.1f} s)"
            )
        if not ok:
            print(f"n={n} gap={gap}: item set, shape or balance check failed", file=sys.stderr)
            return 1
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"machine": machine_info(args.device), "args": settings, "results": results}
    path = write_result(args.out, result_name("jtm", args.device), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
