"""The paper's comparisons on one data set, over several seeds (Sec. 5, Tables 2-4, Fig. 4).

For every seed (``data.seed``: which users are test and validation users) the data is prepared
once; then

- every baseline (``tdm.baselines``) is tuned on the validation users over its grid
  (``tdm.baselines.GRIDS``), refitted with the chosen parameters and evaluated once on the test
  users;
- every TDM variant runs the alternating rounds (``tdm.stages.pipeline``): round 0 on the
  category tree, round r > 0 on the tree re-learnt from round r-1 (warm start). The validation
  users pick each round's best epoch; the test users are evaluated once per round.

Everything is averaged over the seeds (mean and sample standard deviation) and rendered as the
paper's tables: Table 2 (all methods, P/R/F/Novelty@M, no filtering and interacted items
filtered), Table 3 (interacted categories filtered), Table 4 (the attention-DNN per round: the
category tree, the learnt tree, one more relearning) and the data of Fig. 4 (layer-wise recall of
beam search vs brute force, TDM product-DNN on the category tree).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from tdm.config import Config, config_from_dict
from tdm.io import write_json, write_text
from tdm.paths import Paths

log = logging.getLogger(__name__)

METRICS = ("precision", "recall", "f_measure", "novelty")
BASELINE_LABELS = {
    "popular": "most-popular",
    "itemcf": "item-CF",
    "bpr": "BPR-MF",
    "fm": "FM",
    "youtube": "YouTube product-DNN",
}
# TDM variants of Sec. 5.4: params overrides on top of the data set's params.
VARIANTS: dict[str, list[str]] = {
    "attention_dnn": ["model.name=attention_dnn"],
    "dnn": ["model.name=dnn"],
    "product_dnn": ["model.name=product_dnn"],
    "attention_dnn_hs": [
        "model.name=attention_dnn",
        "sampler.mode=siblings",
        "retrieval.ranking=path",
    ],
}
VARIANT_LABELS = {
    "attention_dnn": "TDM attention-DNN",
    "dnn": "TDM DNN",
    "product_dnn": "TDM product-DNN",
    "attention_dnn_hs": "TDM attention-DNN-HS",
}
TREE_LABELS = {0: "category tree", 1: "learnt tree", 2: "relearnt twice"}
FIG4_VARIANT = "product_dnn"
ROUND = "/round_"  # a TDM row is "<variant>/round_<r>" (a valid MLflow metric name part)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``section.key=value`` overrides applied (validated like params.yaml)."""
    return config_from_dict(dataclasses.asdict(cfg), overrides)


def run_seed(
    cfg: Config,
    work: Path,
    baselines: list[str],
    variants: list[str],
    rounds: int,
    tune_mode: str = "none",
) -> dict:
    """One seed: every baseline and every TDM variant on the test users of ``cfg.data.seed``.

    Each method's result is kept in ``work`` with the settings it depends on (a baseline: the
    data, synthetic and eval params, its tuning grid and ``tune_mode``; a TDM variant: all
    params and its rounds) and read back, not run again, by a later call with the same settings:
    changing ``train.lr`` re-runs the TDM variants only.

    Args:
        cfg: the data set's config (its ``data.seed`` picks the users).
        work: a scratch folder for prepared data, trees, models and the kept results.
        baselines: keys of ``tdm.baselines.BASELINES``.
        variants: keys of :data:`VARIANTS`.
        rounds: rounds of the attention-DNN (Table 4); the other variants run two (initial and
            learnt tree).
        tune_mode: filter mode of the validation metric the baselines are tuned on.
    Returns:
        ``{"baselines": {name: {"params", "grid", "test", "seconds"}},
        "tdm": {variant: {"rounds": [report of round r], "seconds"}}, "seconds"}`` where a test
        report maps filter mode -> metric -> value and "seconds" is the compute time of all of
        them (also of the kept ones).
    """
    from tdm import stages
    from tdm.baselines import BASELINES, GRIDS

    for kind, names, known in (
        ("baselines", baselines, BASELINES),
        ("TDM variants", variants, VARIANTS),
    ):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"unknown {kind} {unknown} (known: {', '.join(known)})")
    work = Path(work)
    stages.prepare(cfg, work / "prepared")  # the baselines' data (~0.1 s, not counted)
    out: dict[str, Any] = {"baselines": {}, "tdm": {}}
    params = dataclasses.asdict(cfg)
    for name in baselines:
        key = {
            "method": name,
            "tune_mode": tune_mode,
            "grid": GRIDS[name],
            **{section: params[section] for section in ("data", "synthetic", "eval")},
        }
        out["baselines"][name] = _kept(
            work / "baselines" / f"{name}.json",
            key,
            lambda name=name: _baseline(cfg, work / "prepared", name, tune_mode),
        )
    for name in variants:
        n_rounds = rounds if name == "attention_dnn" else min(rounds, 2)
        key = {"method": name, "rounds": n_rounds, "params": params}
        out["tdm"][name] = _kept(
            work / name / "result.json",
            key,
            lambda name=name, n=n_rounds: _variant(cfg, work / name, name, n),
        )
    seconds = sum(res["seconds"] for res in (*out["baselines"].values(), *out["tdm"].values()))
    out["seconds"] = round(seconds, 1)
    return out


def _kept(path: Path, key: dict, compute) -> dict:
    """``compute()``, kept in ``path`` with ``key``; read back when ``path`` holds the same key."""
    key = json.loads(json.dumps(key))
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            log.info("reusing %s", path)
            return kept["result"]
    result = compute()
    write_json(path, {"key": key, "result": result})
    return result


def _baseline(cfg: Config, prepared: Path, name: str, tune_mode: str) -> dict:
    """A baseline tuned on the validation users, refitted and evaluated once on the test users."""
    from tdm.baselines import fit, tune
    from tdm.data.protocol import load_prepared
    from tdm.evaluation import evaluate_split

    t0 = time.perf_counter()
    data = load_prepared(prepared)
    best, table = tune(name, data, None, cfg.eval, seed=cfg.data.seed, mode=tune_mode)
    model = fit(name, data, best, seed=cfg.data.seed)
    test = evaluate_split(model.ranker(), data, data.test, cfg.eval)
    log.info("seed %d %s %s: %s", cfg.data.seed, name, best, _short(test))
    return {
        "params": best,
        "grid": table,
        "test": test,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _variant(cfg: Config, folder: Path, name: str, n_rounds: int) -> dict:
    """A TDM variant's alternating rounds, each evaluated once on the test users."""
    from tdm import stages

    layerwise = name in (FIG4_VARIANT, "attention_dnn")
    vcfg = with_overrides(
        cfg,
        [
            *VARIANTS[name],
            f"rounds.count={n_rounds}",
            "eval.split=test",
            f"eval.layerwise={str(layerwise).lower()}",
        ],
    )
    paths = Paths(folder)
    t0 = time.perf_counter()
    stages.pipeline(vcfg, paths)
    reports = [json.loads(paths.metrics(r).read_text()) for r in range(n_rounds)]
    log.info("seed %d %s: %s", cfg.data.seed, name, [_short(r["tdm"]) for r in reports])
    return {
        "rounds": [
            {
                "test": rep["tdm"],
                "layerwise_recall": rep.get("layerwise_recall"),
                "tree": rep.get("tree"),
            }
            for rep in reports
        ],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _short(report: dict) -> str:
    none = report.get("none") or next(iter(report.values()))
    return f"P {100 * none['precision']:.2f}% R {100 * none['recall']:.2f}%"


def summarise(per_seed: dict[int, dict], filters: list[str]) -> dict:
    """Mean and sample std over seeds of every (row, filter mode, metric).

    Returns:
        ``{"rows": {row: {mode: {metric: {"mean", "std", "n"}}}}, "fig4": {...} | None}`` where a
        row is a baseline name or ``"<variant>/round_<r>"``.
    """
    values: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(row: str, test: dict) -> None:
        for mode in filters:
            for metric in METRICS:
                values.setdefault(row, {}).setdefault(mode, {}).setdefault(metric, [])
                values[row][mode][metric].append(float(test[mode][metric]))

    layerwise: list[dict] = []
    for res in per_seed.values():
        for name, b in res["baselines"].items():
            add(name, b["test"])
        for name, v in res["tdm"].items():
            for r, rnd in enumerate(v["rounds"]):
                add(f"{name}{ROUND}{r}", rnd["test"])
            if name == FIG4_VARIANT and v["rounds"][0].get("layerwise_recall"):
                layerwise.append(v["rounds"][0]["layerwise_recall"])
    rows = {
        row: {
            mode: {m: _mean_std(xs) for m, xs in metrics.items()} for mode, metrics in modes.items()
        }
        for row, modes in values.items()
    }
    return {"rows": rows, "fig4": _fig4(layerwise)}


def _mean_std(xs: list[float]) -> dict:
    arr = np.asarray(xs, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def _fig4(layerwise: list[dict]) -> dict | None:
    """Per-level mean (and std) over seeds of beam search and brute-force recall."""
    if not layerwise:
        return None
    depth = min(len(lw["level"]) for lw in layerwise)  # trees of different seeds may differ
    out: dict[str, Any] = {"k": layerwise[0]["k"], "level": layerwise[0]["level"][:depth]}
    for key in ("beam", "brute_force"):
        arr = np.asarray([lw[key][:depth] for lw in layerwise], dtype=np.float64)
        out[key] = arr.mean(axis=0).tolist()
        out[f"{key}_std"] = (arr.std(axis=0, ddof=1) if len(arr) > 1 else 0 * arr[0]).tolist()
    return out


def _row_label(row: str) -> str:
    if ROUND not in row:
        return BASELINE_LABELS.get(row, row)
    name, r = row.split(ROUND)
    return f"{VARIANT_LABELS.get(name, name)} ({TREE_LABELS.get(int(r), f'round {r}')})"


def _cell(stat: dict) -> str:
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def _table(rows: dict, modes: list[str], metrics: tuple[str, ...], order: list[str]) -> list[str]:
    head = ["method"] + [
        f"{m[0].upper()}{m[1:].replace('_', '-')} ({mode})" for mode in modes for m in metrics
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in order:
        if row not in rows or any(mode not in rows[row] for mode in modes):
            continue
        cells = [_cell(rows[row][mode][m]) for mode in modes for m in metrics]
        lines.append(f"| {_row_label(row)} | " + " | ".join(cells) + " |")
    return lines


def render(result: dict) -> str:
    """Tables 2-4 and the Fig. 4 data as markdown (percentages, mean ± std over seeds)."""
    rows = result["summary"]["rows"]
    filters = result["protocol"]["filters"]
    M = result["protocol"]["topk"]
    tdm_rows = sorted((r for r in rows if ROUND in r), key=lambda r: (r.split(ROUND)[1], r))
    order = [b for b in BASELINE_LABELS if b in rows] + tdm_rows
    seeds = result["protocol"]["seeds"]
    lines = [
        f"# {result['dataset']}: TDM vs baselines (@{M}, {len(seeds)} seeds: {seeds})",
        "",
        f"Protocol: {result['protocol']['description']}. Cells: mean ± sample std over seeds, %.",
        f"Compute time {result['compute_seconds']:.0f} s (all seeds) on "
        f"{result['machine']['platform']} "
        f"({result['machine']['cpus']} CPUs, torch {result['machine']['torch']}).",
        "",
    ]
    two = [m for m in ("none", "items") if m in filters]
    if two:
        lines += [f"## Table 2: all methods, {' and '.join(two)} filtering", ""]
        lines += _table(rows, two, METRICS, order) + [""]
    if "categories" in filters:
        lines += ["## Table 3: interacted categories filtered", ""]
        lines += _table(rows, ["categories"], METRICS, order) + [""]
    attention = sorted(r for r in rows if r.startswith(f"attention_dnn{ROUND}"))
    if attention:
        lines += ["## Table 4: TDM attention-DNN per tree (round)", ""]
        lines += _table(rows, two or filters[:1], ("precision", "recall", "f_measure"), attention)
        lines += [""]
    fig4 = result["summary"].get("fig4")
    if fig4:
        lines += [
            f"## Fig. 4: layer-wise Recall@{fig4['k']}, TDM product-DNN on the category tree",
            "",
            "| level | beam search | brute force |",
            "|---|---|---|",
        ]
        for i, level in enumerate(fig4["level"]):
            lines.append(
                f"| {level} | {100 * fig4['beam'][i]:.2f} ± {100 * fig4['beam_std'][i]:.2f} "
                f"| {100 * fig4['brute_force'][i]:.2f} ± {100 * fig4['brute_force_std'][i]:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def seed_result(
    cfg: Config,
    work: Path,
    seed: int,
    baselines: list[str],
    variants: list[str],
    rounds: int = 3,
    tune_mode: str = "none",
) -> dict:
    """:func:`run_seed` for ``data.seed = seed`` in ``work/seed_<seed>`` (methods finished by an
    earlier call with the same settings are read back from there)."""
    scfg = with_overrides(cfg, [f"data.seed={seed}"])
    return run_seed(scfg, Path(work) / f"seed_{seed}", baselines, variants, rounds, tune_mode)


def assemble(
    cfg: Config, dataset: str, per_seed: dict[int, dict], tune_mode: str, wall_seconds: float
) -> dict:
    """The report: protocol, machine, per-seed results and their summary."""
    import os

    import torch

    d = cfg.data
    return {
        "dataset": dataset,
        "protocol": {
            "description": (
                f"source {d.source}, min rating {d.min_rating} (MovieLens), users with >= "
                f"{d.min_user_behaviors} behaviours, {d.n_test_users} test + {d.n_valid_users} "
                f"validation users, first half of each timeline known; baselines tuned on "
                f"validation Recall@{cfg.eval.topk} ({tune_mode}), TDM's epoch picked on it"
            ),
            "topk": cfg.eval.topk,
            "filters": list(cfg.eval.filters),
            "seeds": list(per_seed),
            "params": dataclasses.asdict(cfg),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "wall_seconds": round(wall_seconds, 1),  # of this call (cached seeds: ~0)
        "compute_seconds": round(sum(r["seconds"] for r in per_seed.values()), 1),
        "per_seed": per_seed,
        "summary": summarise(per_seed, list(cfg.eval.filters)),
    }


def run(
    cfg: Config,
    dataset: str,
    work: Path,
    seeds: list[int],
    baselines: list[str],
    variants: list[str],
    rounds: int = 3,
    tune_mode: str = "none",
) -> dict:
    """Every method for every seed, summarised (see the module docstring)."""
    t0 = time.perf_counter()
    per_seed = {
        seed: seed_result(cfg, work, seed, baselines, variants, rounds, tune_mode) for seed in seeds
    }
    return assemble(cfg, dataset, per_seed, tune_mode, time.perf_counter() - t0)


def write_report(result: dict, out: Path) -> str:
    """``out/results.json`` and ``out/tables.md`` (atomically); returns the tables."""
    tables = render(result)
    write_json(Path(out) / "results.json", result)
    write_text(Path(out) / "tables.md", tables + "\n")
    return tables
