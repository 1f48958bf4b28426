"""Validation-only sweep of settings (issue 14's fidelity fixes): the numbers to choose defaults by.

For every seed (``data.seed``: which users are validation and which are test users, as in
``tdm benchmark``) and every combination of the ``--grid`` values, TDM runs its alternating
rounds (``tdm.stages.pipeline``: prepare, category tree, train, re-learn, ...) with
``eval.split=valid``, and each round's model is evaluated on the VALIDATION users only:
Precision/Recall@M per filter mode (Sec. 5.3). The test users are never evaluated here.

Keys that do not change what is trained (``EVAL_ONLY``: ``retrieval.filter_beam``, which only
acts on the ``items``/``categories`` filter modes, while training picks its epoch on the
unfiltered validation recall) reuse the trained models: one training per combination of the other
keys, one evaluation per value. Trained runs are kept under ``--work`` with the settings they
depend on, so an interrupted sweep resumes and a new value trains only what is new.

    python benchmarks/fidelity_sweep.py --seeds 0,1,2 \\
        --grid retrieval.filter_beam=0,20,50 \\
        --grid sampler.profile=proportional,leaf_heavy \\
        --grid data.window_mode=target_time,last_behaviour,position \\
        --set train.epochs=4 --set train.patience=1 --set train.progress=false \\
        --set train.num_threads=1

Prints, per round, each combination's validation Recall and Precision@M (mean +- sample std over
the seeds) per filter mode and the paired difference in recall with the first combination
(the first value of every grid), and writes every per-seed number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Before torch loads libgomp: spinning OpenMP threads collapse on shared cores (PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import RESULTS, machine_info, result_name, write_result  # noqa: E402
from tdm.config import Config, TrainConfig, config_from_dict  # noqa: E402

log = logging.getLogger("fidelity_sweep")

EVAL_ONLY = ("retrieval.filter_beam",)  # grid keys evaluated on the same trained models
# The pipeline's own report on the validation users; no test-user curve during training.
FORCED = ["eval.split=valid", "eval.layerwise=false"] + (
    ["train.test_curve=false"]
    if "test_curve" in {f.name for f in dataclasses.fields(TrainConfig)}
    else []
)
METRICS = ("recall", "precision")


def split_values(text: str) -> list:
    """``a,b,[1, 2]`` -> ``["a", "b", [1, 2]]``: commas inside brackets do not split."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [yaml.safe_load(p.strip()) if p.strip() else None for p in parts]


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["section.key=v1,v2", ...]`` -> ``{"section.key": [v1, v2]}`` in the given order."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--grid {item!r}: expected section.key=value1,value2")
        if key in grid:
            raise SystemExit(f"--grid {key} given twice")
        grid[key] = split_values(values)
    return grid


def overrides(combo: dict) -> list[str]:
    """``{"a.b": 1}`` -> ``["a.b=1"]`` (values as YAML, so lists and strings round-trip)."""
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in combo.items()]


def combos(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def label(combo: dict) -> str:
    """``section.key=value`` pairs as ``key=value`` (the section when two keys share a name)."""
    names = [k.split(".", 1)[-1] for k in combo]
    short = [n if names.count(n) == 1 else k for k, n in zip(combo, names, strict=True)]
    return " ".join(f"{n}={v}" for n, v in zip(short, combo.values(), strict=True)) or "(as set)"


def run_training(cfg: Config, folder: Path) -> dict:
    """The pipeline's rounds in ``folder`` (validation users only), kept with their settings."""
    from tdm import stages
    from tdm.io import write_json
    from tdm.paths import Paths

    key = {"params": json.loads(json.dumps(dataclasses.asdict(cfg)))}
    done = folder / "sweep_key.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        log.info("reusing %s", folder)
        return json.loads(done.read_text())["summary"]
    t0 = time.perf_counter()
    summary = stages.pipeline(cfg, Paths(folder))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(done, {"key": key, "summary": summary})
    return summary


def evaluate_valid(cfg: Config, folder: Path, n_rounds: int, eval_combos: list[dict]) -> list:
    """Each round's model on the validation users, once per evaluation-only combination."""
    from tdm.baselines.popular import MostPopular
    from tdm.data.protocol import load_prepared
    from tdm.evaluation import evaluate_split
    from tdm.paths import Paths
    from tdm.recommender import Recommender

    paths = Paths(folder)
    data = load_prepared(paths.prepared)
    eval_cfg = dataclasses.replace(cfg.eval, filters=["none", "items", "categories"])
    popular = MostPopular(data.items["train_count"].to_numpy())
    out = [
        {
            "round": None,
            "eval": {},
            "method": "most_popular",
            "valid": evaluate_split(popular.ranker(), data, data.valid, eval_cfg),
        }
    ]
    for r in range(n_rounds):
        rec = Recommender.load(paths.model(r), device="cpu", model_name=cfg.model.name)
        for combo in eval_combos:
            ecfg = config_from_dict(dataclasses.asdict(cfg), overrides(combo))
            t0 = time.perf_counter()
            report = evaluate_split(rec.ranker(ecfg.retrieval), data, data.valid, eval_cfg)
            out.append(
                {
                    "round": r,
                    "eval": combo,
                    "method": "tdm",
                    "valid": report,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
    return out


def summarise(runs: list[dict], modes: list[str]) -> list[dict]:
    """Mean, sample std and the paired difference with the first combination, per row."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        row_key = (run["method"], run["round"], label({**run["train"], **run["eval"]}))
        rows.setdefault(row_key, {})[run["seed"]] = run["valid"]
    first: dict = {}
    out = []
    for (method, rnd, name), per_seed in rows.items():
        seeds = sorted(per_seed)
        entry = {"method": method, "round": rnd, "setting": name, "seeds": seeds, "modes": {}}
        if method == "tdm" and rnd not in first:
            first[rnd] = per_seed
        for mode in modes:
            stats = {}
            for metric in METRICS:
                values = np.array([per_seed[s][mode][metric] for s in seeds], dtype=float)
                stats[metric] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                }
            if method == "tdm":
                base = first[rnd]
                common = [s for s in seeds if s in base]
                diff = np.array(
                    [per_seed[s][mode]["recall"] - base[s][mode]["recall"] for s in common]
                )
                stats["recall_vs_first"] = {
                    "mean": float(diff.mean()) if len(diff) else float("nan"),
                    "ahead": int((diff > 0).sum()),
                    "behind": int((diff < 0).sum()),
                }
            entry["modes"][mode] = stats
        out.append(entry)
    return out


def print_table(summary: list[dict], modes: list[str], topk: int) -> None:
    width = max(len(e["setting"]) for e in summary) + 2
    head = f"{'setting':<{width}}" + "".join(
        f"{f'R@{topk} {m}':>17}{f'P@{topk} {m}':>17}{'dR':>8}" for m in modes
    )
    rounds = sorted({e["round"] for e in summary if e["round"] is not None})
    for rnd in [None, *rounds]:
        entries = [e for e in summary if e["round"] == rnd]
        if not entries:
            continue
        title = "most-popular" if rnd is None else f"TDM round {rnd}"
        print(f"\nvalidation users, {title} (%, mean +- std over seeds; dR: paired with row 1)")
        print(head)
        for e in entries:
            cells = ""
            for m in modes:
                for metric in METRICS:
                    stat = e["modes"][m][metric]
                    cells += f"{100 * stat['mean']:>9.2f} +-{100 * stat['std']:>5.2f}"
                vs = e["modes"][m].get("recall_vs_first")
                cells += f"{100 * vs['mean']:>+8.2f}" if vs else f"{'':>8}"
            print(f"{e['setting']:<{width}}{cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--seeds", default="0", help="data.seed values, comma separated")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=None, help="default: rounds.count")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tdm-fidelity-sweep"))
    parser.add_argument("--out", type=Path, default=None, help="JSON; default benchmarks/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    grid = parse_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    train_grid = {k: v for k, v in grid.items() if k not in EVAL_ONLY}
    eval_grid = {k: v for k, v in grid.items() if k in EVAL_ONLY}
    raw = yaml.safe_load(args.params.read_text()) or {}
    base = [*args.set, *FORCED] + ([f"rounds.count={args.rounds}"] if args.rounds else [])
    eval_combos = combos(eval_grid)
    for combo in combos(grid):  # fail on a typo before hours of training
        config_from_dict(raw, [*base, *overrides(combo)])

    runs: list[dict] = []
    trainings: list[dict] = []
    t_start = time.perf_counter()
    for seed in seeds:
        for combo in combos(train_grid):
            cfg = config_from_dict(raw, [*base, *overrides(combo), f"data.seed={seed}"])
            digest = hashlib.sha256(json.dumps(combo, sort_keys=True).encode()).hexdigest()[:12]
            folder = args.work / f"seed_{seed}" / digest
            log.info("seed %d: training %s in %s", seed, label(combo), folder)
            summary = run_training(cfg, folder)
            trainings.append(
                {"seed": seed, "train": combo, "folder": str(folder), "seconds": summary["seconds"]}
            )
            data_part = {k: v for k, v in combo.items() if k.startswith("data.")}
            for result in evaluate_valid(cfg, folder, cfg.rounds.count, eval_combos):
                is_tdm = result["method"] == "tdm"
                runs.append({"seed": seed, "train": combo if is_tdm else data_part, **result})
    runs = _dedupe_popular(runs)
    modes = ["none", "items", "categories"]
    summary = summarise(runs, modes)
    topk = config_from_dict(raw, base).eval.topk
    print_table(summary, modes, topk)
    payload = {
        "machine": machine_info("cpu"),
        "settings": {
            "params": str(args.params),
            "seeds": seeds,
            "grid": grid,
            "set": args.set,
            "forced": FORCED,
            "eval_only": list(EVAL_ONLY),
            "rounds": args.rounds,
        },
        "trainings": trainings,
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = args.out or RESULTS / result_name("fidelity_sweep")
    path = write_result(out.parent, out.name, payload)
    print(f"\nwrote {path}")
    return 0


def _dedupe_popular(runs: list[dict]) -> list[dict]:
    """Most-popular once per seed and data setting (it does not depend on the TDM settings)."""
    seen, out = set(), []
    for run in runs:
        if run["method"] == "most_popular":
            key = (run["seed"], label(run["train"]))
            if key in seen:
                continue
            seen.add(key)
        out.append(run)
    return out


if __name__ == "__main__":
    sys.exit(main())
