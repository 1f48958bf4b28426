"""The paper's comparisons on one data set, over several seeds (Sec. 5, Tables 2-4, Fig. 4).

For every seed (``data.seed``: which users are test and validation users) the data is prepared
once; then

- every baseline (``tdm.baselines``) is tuned on the validation users over its grid
  (``tdm.baselines.GRIDS``), refitted with the chosen parameters and evaluated once on the test
  users;
- every TDM variant runs the alternating rounds (``tdm.stages.pipeline``): round 0 on the
  category tree, round r > 0 on the tree re-learnt from round r-1 (warm start). The validation
  users pick each round's best epoch; the test users are evaluated once per round.

- the attention-DNN (Table 4, Fig. 5) also trains the learnt tree of its round 1 from scratch,
  with round 0's settings (*equal budget*: the alternating round 1 starts from round 0's model,
  so it has round 0's epochs on top of its own), and records the test users' loss and Recall@M
  after every epoch of round 0, round 1 and that run (``train.test_curve``: reported only, the
  validation users alone pick epochs).

Everything is averaged over the seeds (mean and sample standard deviation) and rendered as the
paper's tables: Table 2 (all methods, P/R/F/Novelty@M, no filtering and interacted items
filtered), Table 3 (interacted categories filtered), Table 4 (the attention-DNN per round: the
category tree, the learnt tree, one more relearning, and the learnt tree from scratch, with the
paired equal-budget and alternating differences), the data of Fig. 4 (layer-wise recall of beam
search vs brute force, TDM product-DNN on the category tree) and of Fig. 5 (test loss and
Recall@M per epoch, category tree vs learnt tree).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tdm.config import Config, config_from_dict
from tdm.io import MANIFEST_FILE, sha256_file, write_json, write_text
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
# Table 4's and Fig. 5's variant: test curves per epoch, and its learnt tree from scratch
TABLE4_VARIANT = "attention_dnn"
ROUND = "/round_"  # a TDM row is "<variant>/round_<r>" (a valid MLflow metric name part)
EQUAL_BUDGET = "/equal_budget"  # "<variant>/equal_budget": round 1's tree, from scratch
JTM = "/jtm"  # "<variant>/jtm": round 1 on JTM's tree instead of k-means' (tree.learner=jtm)


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
    params and its rounds, for :data:`TABLE4_VARIANT` with its test curves; its equal-budget run:
    all params and the hash of the tree it trains on) and read back, not run again, by a later
    call with the same settings: changing ``train.lr`` re-runs the TDM variants only.

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
        "tdm": {variant: {"rounds": [report of round r], "seconds"}},
        "equal_budget": {variant: {"test", "tree", "train", "seconds"}}, "jtm": {variant: {...}},
        "seconds"}`` where a test report maps filter mode -> metric -> value and "seconds" is
        the compute time of all of them (also of the kept ones). ``equal_budget`` and ``jtm``
        hold :data:`TABLE4_VARIANT` when it runs two rounds or more.
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
    out: dict[str, Any] = {"baselines": {}, "tdm": {}, "equal_budget": {}, "jtm": {}}
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
        if name == TABLE4_VARIANT:
            key["test_curve"] = True
        out["tdm"][name] = _kept(
            work / name / "result.json",
            key,
            lambda name=name, n=n_rounds: _variant(cfg, work / name, name, n),
        )
        if name == TABLE4_VARIANT and n_rounds >= 2:
            tree = _learnt_tree(cfg, work / name, name)
            key = {"method": name, "kind": "equal_budget", "params": params}
            key["tree"] = sha256_file(tree)
            out["equal_budget"][name] = _kept(
                work / f"{name}_equal_budget" / "result.json",
                key,
                lambda name=name, tree=tree: _equal_budget(
                    cfg, work / f"{name}_equal_budget", name, tree
                ),
            )
            key = {"method": name, "kind": "jtm", "params": params}
            key["round_0"] = sha256_file(Paths(work / name).model(0) / MANIFEST_FILE)
            out["jtm"][name] = _kept(
                work / f"{name}_jtm" / "result.json",
                key,
                lambda name=name: _jtm(cfg, work / f"{name}_jtm", name, work / name),
            )
    seconds = sum(
        res["seconds"]
        for part in ("baselines", "tdm", "equal_budget", "jtm")
        for res in out[part].values()
    )
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
            f"train.test_curve={str(name == TABLE4_VARIANT).lower()}",
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
                "train": _train_summary(paths.model(r)),
            }
            for r, rep in enumerate(reports)
        ],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _train_summary(model_dir: Path) -> dict:
    """What Table 4 and Fig. 5 need of a training log: epochs run, the kept epoch, the losses,
    the validation recall and (``train.test_curve``) the test curve."""
    from tdm.paths import TRAIN_LOG_FILE

    train_log = json.loads((Path(model_dir) / TRAIN_LOG_FILE).read_text())
    keys = ("epochs_run", "best_epoch", "losses", "valid_recall", "test_curve", "seconds")
    return {k: train_log[k] for k in keys if k in train_log}


def _learnt_tree(cfg: Config, folder: Path, name: str) -> Path:
    """Round 1's tree of a variant's folder (re-learnt from round 0's embeddings), made again
    from round 0 (``tdm.stages.relearn_tree``) when only the tree file is gone."""
    paths = Paths(folder)
    if not paths.tree(1).exists():
        if not paths.embeddings(0).exists():
            raise FileNotFoundError(
                f"{paths.tree(1)}: missing, and no {paths.embeddings(0)} to re-learn it from "
                f"(remove {folder / 'result.json'} to run the rounds again)"
            )
        from tdm import stages

        stages.relearn_tree(
            with_overrides(cfg, VARIANTS[name]),
            paths.embeddings(0),
            paths.tree(1),
            model_dir=paths.model(0),
            prepared_dir=paths.prepared,
        )
    return paths.tree(1)


def _equal_budget(cfg: Config, folder: Path, name: str, tree: Path) -> dict:
    """Table 4 at equal budget: the learnt ``tree`` (round 1's) trained from scratch with round
    0's settings (``train.epochs``, ``train.patience``, the epoch picked on the validation users)
    and the test curve, evaluated once on the test users. The alternating round 1 trains on the
    same tree warm-started from round 0's model (Sec. 3.5), so it also has round 0's epochs."""
    from tdm import stages

    t0 = time.perf_counter()
    vcfg = _round_1_config(cfg, name, [])
    paths = Paths(folder)
    stages.prepare(vcfg, paths.prepared)
    paths.tree(1).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tree, paths.tree(1))
    report = _train_round_1(vcfg, paths, init_from=None)
    log.info(
        "seed %d %s, learnt tree from scratch: %s", cfg.data.seed, name, _short(report["test"])
    )
    return {**report, "seconds": round(time.perf_counter() - t0, 1)}


def _jtm(cfg: Config, folder: Path, name: str, variant_folder: Path) -> dict:
    """Round 1 on JTM's tree (``tree.learner=jtm``, ``tdm.jtm``): learnt from the round-0 model
    of ``variant_folder`` (the same model k-means' round 1 re-clusters the embeddings of) and
    trained like the alternating round 1 (warm start from that model, ``rounds.warm_start``),
    with the test curve, evaluated once on the test users. Paired with the variant's round 1,
    it compares the two tree learners on one starting model."""
    from tdm import stages

    t0 = time.perf_counter()
    vcfg = _round_1_config(cfg, name, ["tree.learner=jtm"])
    paths, source = Paths(folder), Paths(variant_folder)
    stages.prepare(vcfg, paths.prepared)
    paths.tree(1).parent.mkdir(parents=True, exist_ok=True)
    learnt = stages.relearn_tree(
        vcfg,
        source.embeddings(0),
        paths.tree(1),
        model_dir=source.model(0),
        prepared_dir=paths.prepared,
    )
    init_from = source.model(0) if vcfg.rounds.warm_start else None
    report = _train_round_1(vcfg, paths, init_from=init_from)
    log.info("seed %d %s, JTM tree: %s", cfg.data.seed, name, _short(report["test"]))
    relearn = {k: learnt[k] for k in ("seconds", "moved_fraction", "samples_used")}
    return {**report, "relearn": relearn, "seconds": round(time.perf_counter() - t0, 1)}


def _round_1_config(cfg: Config, name: str, extra: list[str]) -> Config:
    return with_overrides(
        cfg,
        [
            *VARIANTS[name],
            *extra,
            "rounds.count=1",
            "eval.split=test",
            "eval.layerwise=false",
            "train.test_curve=true",
        ],
    )


def _train_round_1(cfg: Config, paths: Paths, init_from: Path | None) -> dict:
    """Train on ``paths.tree(1)`` into ``paths.model(1)`` and evaluate it on the test users."""
    from tdm import stages

    stages.train(cfg, paths.prepared, paths.tree(1), paths.model(1), init_from=init_from)
    report = stages.evaluate(cfg, paths.prepared, paths.model(1), paths.metrics(1))
    return {
        "test": report["tdm"],
        "tree": report.get("tree"),
        "train": _train_summary(paths.model(1)),
    }


def _short(report: dict) -> str:
    none = report.get("none") or next(iter(report.values()))
    return f"P {100 * none['precision']:.2f}% R {100 * none['recall']:.2f}%"


def summarise(per_seed: dict[int, dict], filters: list[str]) -> dict:
    """Mean and sample std over seeds of every (row, filter mode, metric).

    Returns:
        ``{"rows": {row: {mode: {metric: {"mean", "std", "n"}}}}, "fig4": {...} | None,
        "equal_budget": {...} | None, "jtm": {...} | None, "fig5": {...} | None, "truth":
        {...}}`` where a row is a baseline name, ``"<variant>/round_<r>"``,
        ``"<variant>/equal_budget"`` (round 1's tree from scratch) or ``"<variant>/jtm"``
        (round 1 on JTM's tree); ``equal_budget`` holds the paired differences with the
        category tree (:func:`_equal_budget_summary`), ``jtm`` JTM's tree minus k-means' tree,
        paired (:func:`_jtm_summary`), ``fig5`` the test curves (:func:`_fig5`), ``truth`` the
        trees against the known groupings: ``{row: {grouping: {"purity", "nmi":
        {"mean", "std", "n"}, "level"}}}`` for the TDM rows whose tree has a truth report
        (``tdm.stages.tree_report``: the generator's categories and departments on generated data,
        the data's own categories elsewhere).
    """
    values: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(row: str, test: dict) -> None:
        for mode in filters:
            for metric in METRICS:
                values.setdefault(row, {}).setdefault(mode, {}).setdefault(metric, [])
                values[row][mode][metric].append(float(test[mode][metric]))

    layerwise: list[dict] = []
    truth: dict[str, dict[str, dict[str, list]]] = {}
    for res in per_seed.values():
        for name, b in res["baselines"].items():
            add(name, b["test"])
        for name, v in res["tdm"].items():
            for r, rnd in enumerate(v["rounds"]):
                add(f"{name}{ROUND}{r}", rnd["test"])
                for grouping, report in ((rnd.get("tree") or {}).get("truth") or {}).items():
                    for key in ("purity", "nmi", "level"):
                        row = truth.setdefault(f"{name}{ROUND}{r}", {})
                        row.setdefault(grouping, {}).setdefault(key, []).append(report[key])
            if name == FIG4_VARIANT and v["rounds"][0].get("layerwise_recall"):
                layerwise.append(v["rounds"][0]["layerwise_recall"])
        for name, eq in (res.get("equal_budget") or {}).items():
            add(f"{name}{EQUAL_BUDGET}", eq["test"])
        for name, jtm in (res.get("jtm") or {}).items():
            add(f"{name}{JTM}", jtm["test"])
            for grouping, report in ((jtm.get("tree") or {}).get("truth") or {}).items():
                for key in ("purity", "nmi", "level"):
                    row = truth.setdefault(f"{name}{JTM}", {})
                    row.setdefault(grouping, {}).setdefault(key, []).append(report[key])
    rows = {
        row: {
            mode: {m: _mean_std(xs) for m, xs in metrics.items()} for mode, metrics in modes.items()
        }
        for row, modes in values.items()
    }
    return {
        "rows": rows,
        "fig4": _fig4(layerwise),
        "equal_budget": _equal_budget_summary(per_seed, filters),
        "jtm": _jtm_summary(per_seed, filters),
        "fig5": _fig5(per_seed),
        "truth": {
            row: {
                grouping: {
                    "purity": _mean_std(values["purity"]),
                    "nmi": _mean_std(values["nmi"]),
                    "level": sorted(set(values["level"])),
                }
                for grouping, values in groupings.items()
            }
            for row, groupings in truth.items()
        },
    }


def _equal_budget_summary(per_seed: dict[int, dict], filters: list[str]) -> dict | None:
    """Table 4 at equal budget, paired over the seeds that ran both: the learnt tree from
    scratch (``<variant>/equal_budget``) and warm-started (round 1) minus the category tree
    (round 0), per filter mode and metric, with the epochs each trained.

    Returns:
        None without an equal-budget run, else ``{"variant", "n" (seeds), "paired": {kind:
        {mode: {metric: {"mean", "std", "ahead" (seeds where the learnt tree is higher), "n"}}}},
        "epochs": {"category": {"run", "kept"}, "from_scratch": {...}, "warm_start": {...}}}``
        (means over the seeds; ``kept``: the epoch picked on validation, 1-based) for
        ``kind`` in ``from_scratch`` and ``warm_start``.
    """
    name = TABLE4_VARIANT
    runs = []
    for res in per_seed.values():
        eq = (res.get("equal_budget") or {}).get(name)
        rounds = (res.get("tdm") or {}).get(name, {}).get("rounds", [])
        if eq is not None and len(rounds) >= 2:
            runs.append({"category": rounds[0], "from_scratch": eq, "warm_start": rounds[1]})
    if not runs:
        return None
    paired: dict[str, Any] = {}
    for kind in ("from_scratch", "warm_start"):
        paired[kind] = {}
        for mode in filters:
            paired[kind][mode] = {}
            for metric in METRICS:
                diff = np.asarray(
                    [
                        r[kind]["test"][mode][metric] - r["category"]["test"][mode][metric]
                        for r in runs
                    ]
                )
                paired[kind][mode][metric] = {
                    **_mean_std(diff.tolist()),
                    "ahead": int((diff > 0).sum()),
                }
    epochs = {}
    for kind in ("category", "from_scratch", "warm_start"):
        trained = [r[kind].get("train") or {} for r in runs]
        run = [t["epochs_run"] for t in trained if "epochs_run" in t]
        kept = [t["best_epoch"] + 1 for t in trained if "best_epoch" in t]
        epochs[kind] = {
            "run": float(np.mean(run)) if run else None,
            "kept": float(np.mean(kept)) if kept else None,
        }
    return {"variant": name, "n": len(runs), "paired": paired, "epochs": epochs}


def _jtm_summary(per_seed: dict[int, dict], filters: list[str]) -> dict | None:
    """JTM against k-means relearning, paired over the seeds that ran both: round 1 on JTM's
    tree (``<variant>/jtm``) minus round 1 on k-means' tree, both warm-started from the same
    round-0 model: per filter mode the precision and recall, and per true grouping (generated
    data) the tree's purity and NMI.

    Returns:
        None without a JTM run, else ``{"variant", "n", "paired": {mode: {metric: {"mean",
        "std", "ahead" (seeds where JTM is higher), "n"}}}, "truth": {grouping: {"purity",
        "nmi": {...}}}, "relearn_seconds": {"jtm", ...}}``.
    """
    name = TABLE4_VARIANT
    runs = []
    for res in per_seed.values():
        jtm = (res.get("jtm") or {}).get(name)
        rounds = (res.get("tdm") or {}).get(name, {}).get("rounds", [])
        if jtm is not None and len(rounds) >= 2:
            runs.append((jtm, rounds[1]))
    if not runs:
        return None

    def paired(diffs: list[float]) -> dict:
        return {**_mean_std(diffs), "ahead": int(sum(d > 0 for d in diffs))}

    out: dict[str, Any] = {"variant": name, "n": len(runs), "paired": {}, "truth": {}}
    for mode in filters:
        out["paired"][mode] = {
            m: paired([j["test"][mode][m] - k["test"][mode][m] for j, k in runs])
            for m in ("precision", "recall")
        }
    for grouping in ("category", "department"):
        pairs = [
            ((j.get("tree") or {}).get("truth") or {}, (k.get("tree") or {}).get("truth") or {})
            for j, k in runs
        ]
        if all(grouping in jt and grouping in kt for jt, kt in pairs):
            out["truth"][grouping] = {
                f: paired([jt[grouping][f] - kt[grouping][f] for jt, kt in pairs])
                for f in ("purity", "nmi")
            }
    seconds = [j["relearn"]["seconds"] for j, _ in runs if "relearn" in j]
    out["relearn_seconds"] = _mean_std(seconds) if seconds else None
    return out


FIG5_CURVES = {  # label -> where a seed's test curve is
    "category tree": ("round", 0),
    "learnt tree, from scratch": ("equal_budget", None),
    "learnt tree, warm start (round 1)": ("round", 1),
    "JTM tree, warm start": ("jtm", None),
}


def _fig5(per_seed: dict[int, dict]) -> dict | None:
    """Fig. 5's data: per epoch, mean and std over the seeds of the test loss and Recall@M of
    :data:`TABLE4_VARIANT` on the category tree (round 0), on the learnt tree from scratch
    (equal budget) and warm-started (round 1), and on JTM's tree (warm-started), each epoch over
    the seeds that ran it.

    Returns:
        None without test curves, else ``{"k", "curves": {label: {"epoch", "loss", "loss_std",
        "recall", "recall_std", "n"}}}`` (the format of ``tasks.figures.test_curves``).
    """
    found: dict[str, list[dict]] = {label: [] for label in FIG5_CURVES}
    for res in per_seed.values():
        rounds = (res.get("tdm") or {}).get(TABLE4_VARIANT, {}).get("rounds", [])
        for label, (where, r) in FIG5_CURVES.items():
            if where == "round":
                run = rounds[r] if r < len(rounds) else {}
            else:
                run = (res.get(where) or {}).get(TABLE4_VARIANT) or {}
            curve = (run.get("train") or {}).get("test_curve")
            if curve and curve.get("epoch"):
                found[label].append(curve)
    curves = {label: _mean_curve(cs) for label, cs in found.items() if cs}
    if not curves:
        return None
    k = next(cs[0]["k"] for cs in found.values() if cs)
    return {"k": k, "curves": curves}


def _mean_curve(curves: list[dict]) -> dict:
    """Per epoch (1-based), mean and sample std of ``loss`` and ``recall`` over the curves that
    reach it, and how many do (``n``)."""
    n_epochs = max(len(c["epoch"]) for c in curves)
    out: dict[str, list] = {"epoch": list(range(1, n_epochs + 1)), "n": []}
    for key in ("loss", "recall"):
        out[key], out[f"{key}_std"] = [], []
        for e in range(n_epochs):
            stat = _mean_std([c[key][e] for c in curves if e < len(c[key])])
            out[key].append(stat["mean"])
            out[f"{key}_std"].append(stat["std"])
    out["n"] = [sum(e < len(c["epoch"]) for c in curves) for e in range(n_epochs)]
    return out


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
    for suffix, tree in ((EQUAL_BUDGET, "learnt tree, from scratch"), (JTM, "JTM tree")):
        if row.endswith(suffix):
            name = row[: -len(suffix)]
            return f"{VARIANT_LABELS.get(name, name)} ({tree})"
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
    attention = sorted(r for r in rows if r.startswith(f"{TABLE4_VARIANT}{ROUND}"))
    attention += [
        r for r in (f"{TABLE4_VARIANT}{EQUAL_BUDGET}", f"{TABLE4_VARIANT}{JTM}") if r in rows
    ]
    if attention:
        lines += ["## Table 4: TDM attention-DNN per tree (round)", ""]
        lines += _table(rows, two or filters[:1], ("precision", "recall", "f_measure"), attention)
        lines += [""]
        equal = result["summary"].get("equal_budget")
        if equal:
            lines += _equal_budget_lines(equal, two or filters[:1]) + [""]
        jtm = result["summary"].get("jtm")
        if jtm:
            lines += _jtm_lines(jtm, filters) + [""]
    truth = result["summary"].get("truth")
    if truth:
        rows_with_truth = [r for r in dict.fromkeys([*tdm_rows, *attention]) if r in truth]
        lines += _truth_lines(truth, rows_with_truth) + [""]
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
    fig5 = result["summary"].get("fig5")
    if fig5:
        lines += _fig5_lines(fig5) + [""]
    return "\n".join(lines)


def _signed(stat: dict) -> str:
    return f"{100 * stat['mean']:+.2f} ± {100 * stat['std']:.2f} ({stat['ahead']}/{stat['n']})"


def _epochs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _equal_budget_lines(equal: dict, modes: list[str]) -> list[str]:
    """Table 4's paired comparison: learnt tree (from scratch, warm start) minus category tree."""
    ep = equal["epochs"]
    lines = [
        "## Table 4 at equal budget: learnt tree minus category tree, paired over the seeds",
        "",
        f"Points, mean ± std over {equal['n']} seeds (seeds where the learnt tree is ahead). "
        "*Equal budget*: round 1's tree (re-learnt from round 0's embeddings) trained from "
        "scratch with round 0's settings; *alternating*: round 1 of Table 4, the same tree "
        "warm-started from round 0's kept model. Epochs: run (kept on validation), means over "
        "the seeds; the warm start's are round 0's kept ones plus its own.",
        "",
    ]
    head = ["comparison", "epochs (learnt vs category)"]
    head += [f"{m[0].upper()}{m[1:]} ({mode})" for mode in modes for m in ("precision", "recall")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    category = f"{_epochs(ep['category']['run'])} ({_epochs(ep['category']['kept'])})"
    for kind, label, epochs in (
        (
            "from_scratch",
            "equal budget: from scratch",
            f"{_epochs(ep['from_scratch']['run'])} ({_epochs(ep['from_scratch']['kept'])})",
        ),
        (
            "warm_start",
            "alternating: warm start",
            f"{_epochs(ep['category']['kept'])} + {_epochs(ep['warm_start']['run'])} "
            f"({_epochs(ep['warm_start']['kept'])})",
        ),
    ):
        cells = [
            _signed(equal["paired"][kind][mode][m])
            for mode in modes
            for m in ("precision", "recall")
        ]
        lines.append(f"| {label} | {epochs} vs {category} | " + " | ".join(cells) + " |")
    return lines


def _jtm_lines(jtm: dict, modes: list[str]) -> list[str]:
    """JTM's tree minus k-means' tree (round 1, same round-0 model), paired over the seeds."""
    lines = [
        "## JTM vs k-means relearning: round 1 on JTM's tree minus round 1 on k-means' tree",
        "",
        f"Points (purity and NMI: their own units), mean ± std over {jtm['n']} seeds (seeds "
        "where JTM is ahead). Both trees are learnt from the same round-0 model (k-means from "
        "its item embeddings, JTM from its likelihood of every item's training targets) and "
        "trained the same way (warm start from that model).",
        "",
    ]
    head = ["metric", *modes]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ("precision", "recall"):
        cells = [_signed(jtm["paired"][mode][m]) for mode in modes]
        lines.append(f"| {m[0].upper()}{m[1:]}@M | " + " | ".join(cells) + " |")
    if jtm["truth"]:
        lines += ["", "| true grouping | tree purity | tree NMI |", "|---|---|---|"]
        for grouping, stats in jtm["truth"].items():
            cells = [
                f"{s['mean']:+.3f} ± {s['std']:.3f} ({s['ahead']}/{s['n']})"
                for s in (stats["purity"], stats["nmi"])
            ]
            lines.append(f"| {grouping} | " + " | ".join(cells) + " |")
    seconds = jtm.get("relearn_seconds")
    if seconds:
        lines += ["", f"JTM's tree learning took {seconds['mean']:.1f} s per seed (mean)."]
    return lines


def _truth_lines(truth: dict, order: list[str]) -> list[str]:
    """Each TDM tree against the known groupings: the generator's true categories and
    departments, or the data's own categories (``tdm.stages.truth_groups``)."""
    groupings = [g for g in ("category", "department") if any(g in truth[r] for r in order)]
    if "department" in groupings:
        title = "## Trees against the true taxonomy (data the synthetic generator made)"
        tail = (
            " (a random tree over the default data: NMI 0.14 against its 64 categories, 0.00 "
            "against its 8 departments). The category tree is built from the data's categories "
            "in random order, so its departments are scattered."
        )
    else:
        title = "## Trees against the data's categories"
        tail = (
            ". The data's item categories are the only grouping known here (MovieLens: the genre "
            "that `data.category_rule` picks); the category tree is built from them, so it shows "
            "the most a tree keeps, and a re-learnt tree how much of them it keeps."
        )
    how = (
        "Purity and NMI of the subtrees at the level whose node count is closest to the number "
        "of groups (level in brackets), mean ± std over the seeds. 1 is a perfect recovery; "
        "chance is above 0"
    )
    lines = [title, "", how + tail, ""]
    head = ["tree"] + [f"{g} {f}" for g in groupings for f in ("purity", "NMI")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in order:
        cells = []
        for g in groupings:
            stat = truth[row].get(g)
            if stat is None:
                cells += ["-", "-"]
                continue
            level = "/".join(str(x) for x in stat["level"])
            cells.append(f"{stat['purity']['mean']:.3f} ± {stat['purity']['std']:.3f} ({level})")
            cells.append(f"{stat['nmi']['mean']:.3f} ± {stat['nmi']['std']:.3f}")
        lines.append(f"| {_row_label(row)} | " + " | ".join(cells) + " |")
    return lines


def _fig5_lines(fig5: dict) -> list[str]:
    """Fig. 5's data as a table: per epoch, each curve's test loss and Recall@M (mean ± std)."""
    curves = fig5["curves"]
    lines = [
        f"## Fig. 5: test loss and Recall@{fig5['k']} per epoch, TDM attention-DNN",
        "",
        "Reported only: the test users are scored after every epoch, the validation users alone "
        "pick the kept epoch. Mean ± std over the seeds that ran the epoch.",
        "",
    ]
    head = ["epoch"] + [f"{label}: {what}" for label in curves for what in ("loss", "recall")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_epochs = max(len(c["epoch"]) for c in curves.values())
    for e in range(n_epochs):
        cells = [str(e + 1)]
        for c in curves.values():
            if e < len(c["epoch"]):
                cells.append(f"{c['loss'][e]:.4f} ± {c['loss_std'][e]:.4f}")
                cells.append(f"{100 * c['recall'][e]:.2f} ± {100 * c['recall_std'][e]:.2f}")
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
