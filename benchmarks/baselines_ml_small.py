"""The baselines on MovieLens latest-small with the paper's protocol (Sec. 5.1-5.3), 5 seeds.

For each seed (``data.seed``: the random test/validation users and the window sample), the data is
prepared from ``params.yaml`` with ``data.source=movielens`` (ratings >= 4, users >= 10, 100 test +
100 validation users, first half of each timeline known); each baseline is tuned on the
validation users over its grid (``tdm.baselines.GRIDS``; Recall@M, no filtering), refitted with
the chosen parameters and evaluated once on the test users, P/R/F/Novelty@M for every filter
mode. Prints a markdown table (mean ± sample std over seeds) next to the independent numbers of
``../shared/ANCHORS.md`` and writes ``benchmarks/results/baselines_ml_small.json``.

    python benchmarks/baselines_ml_small.py                      # all baselines, seeds 0-4
    python benchmarks/baselines_ml_small.py --methods itemcf,bpr --seeds 0,1

The data folder is read in place (never copied); the prepared folders go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tdm.baselines import BASELINES, GRIDS, fit, tune  # noqa: E402
from tdm.benchmark import BASELINE_LABELS as NAMES  # noqa: E402
from tdm.benchmark import METRICS  # noqa: E402
from tdm.config import load_config  # noqa: E402
from tdm.data.loaders import load_dataset  # noqa: E402
from tdm.data.protocol import load_prepared, prepare  # noqa: E402
from tdm.evaluation import evaluate_split  # noqa: E402

ANCHORS = {  # ../shared/ANCHORS.md: independent implementation, same protocol, mean of 5 seeds
    ("popular", "none"): (9.82, 4.91),
    ("popular", "items"): (14.38, 6.10),
    ("itemcf", "none"): (8.50, 5.64),
    ("itemcf", "items"): (18.98, 8.65),
    ("bpr", "none"): (6.00, 4.15),
    ("bpr", "items"): (16.08, 8.03),
}


def run(args: argparse.Namespace) -> dict:
    data_path = (ROOT / args.data).resolve()
    overrides = ["data.source=movielens", f"data.path={data_path}", *args.set]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(BASELINES))
    if unknown:
        raise SystemExit(f"unknown methods {unknown} (known: {', '.join(BASELINES)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {m: {"seeds": {}} for m in methods}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tdm-baselines-") as tmp:
        frame = None
        for seed in seeds:
            cfg = load_config(ROOT / "params.yaml", [*overrides, f"data.seed={seed}"])
            if frame is None:
                frame = load_dataset(cfg.data, cfg.synthetic)
            prepared_dir = Path(tmp) / f"seed_{seed}"
            meta = prepare(frame, cfg.data, prepared_dir)
            data = load_prepared(prepared_dir)
            print(
                f"seed {seed}: {meta['n_users']} users, {meta['n_items']} items, "
                f"{meta['n_train_users']}/{meta['n_valid_users']}/{meta['n_test_users']} "
                "train/valid/test users",
                flush=True,
            )
            for method in methods:
                t0 = time.perf_counter()
                grid = GRIDS[method]
                best, table = tune(method, data, grid, cfg.eval, seed=seed, mode=args.tune_mode)
                t_tune = time.perf_counter() - t0
                model = fit(method, data, best, seed=seed)
                report = evaluate_split(model.ranker(), data, data.test, cfg.eval)
                seconds = time.perf_counter() - t0
                results[method]["seeds"][seed] = {
                    "best_params": best,
                    "tuning": table,
                    "test": report,
                    "tune_seconds": round(t_tune, 2),
                    "seconds": round(seconds, 2),
                }
                none = report["none"]
                print(
                    f"  {method:8s} best {best}  test P {100 * none['precision']:.2f}% "
                    f"R {100 * none['recall']:.2f}%  ({seconds:.1f} s)",
                    flush=True,
                )
    wall = time.perf_counter() - t_all
    for method in methods:
        runs = results[method]["seeds"].values()
        results[method]["summary"] = {
            mode: {
                metric: {
                    "mean": float(np.mean([r["test"][mode][metric] for r in runs])),
                    "std": float(np.std([r["test"][mode][metric] for r in runs], ddof=1))
                    if len(runs) > 1
                    else 0.0,
                }
                for metric in METRICS
            }
            for mode in cfg.eval.filters
        }
        results[method]["grid"] = GRIDS[method]
        results[method]["seconds"] = round(sum(r["seconds"] for r in runs), 1)
    return {
        "protocol": {
            "data": str(args.data),
            "overrides": overrides,
            "min_rating": cfg.data.min_rating,
            "min_user_behaviors": cfg.data.min_user_behaviors,
            "n_test_users": cfg.data.n_test_users,
            "n_valid_users": cfg.data.n_valid_users,
            "topk": cfg.eval.topk,
            "filters": list(cfg.eval.filters),
            "seeds": seeds,
            "tuned_on": f"validation users, recall@{cfg.eval.topk}, filter {args.tune_mode}",
            "std": "sample standard deviation over seeds (ddof=1)",
        },
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "wall_seconds": round(wall, 1),
        "results": results,
        "anchors": {f"{m}/{mode}": v for (m, mode), v in ANCHORS.items()},
    }


def markdown(out: dict) -> str:
    """The table: one row per (method, filter mode), mean ± std over seeds, in percent."""
    lines = [
        "| method | filter | Precision@10 | Recall@10 | F-Measure@10 | Novelty@10 | anchor P / R |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, res in out["results"].items():
        for mode, values in res["summary"].items():
            cells = [
                f"{100 * values[m]['mean']:.2f} ± {100 * values[m]['std']:.2f}%" for m in METRICS
            ]
            anchor = ANCHORS.get((method, mode))
            ref = f"{anchor[0]:.2f}% / {anchor[1]:.2f}%" if anchor else ""
            lines.append(f"| {NAMES[method]} | {mode} | {' | '.join(cells)} | {ref} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/ml-latest-small", help="relative to repo")
    parser.add_argument("--methods", default=",".join(BASELINES))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--tune-mode", default="none", choices=["none", "items", "categories"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], help="params override, repeatable")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/baselines_ml_small.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = run(args)
    table = markdown(out)
    print()
    print(table)
    print(
        f"\nwall time {out['wall_seconds']:.0f} s on {out['machine']['platform']}, "
        f"{out['machine']['cpus']} CPUs, torch {out['machine']['torch']} "
        f"({out['machine']['torch_threads']} threads, {out['machine']['device']})"
    )
    for method, res in out["results"].items():
        chosen = [r["best_params"] for r in res["seeds"].values()]
        print(
            f"- {NAMES[method]}: grid {res['grid']}; chosen per seed {chosen}; {res['seconds']} s"
        )
    out["table_markdown"] = table
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=_json) + "\n")
    print(f"wrote {path}")


def _json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    main()
