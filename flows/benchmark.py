"""``tdm benchmark`` as a Prefect flow, tracked in MLflow: one task per seed (every baseline tuned
on the validation users, every TDM variant through its rounds), then the paper's tables.

MLflow: a parent run ``benchmark-<dataset>`` (experiment ``tdm-benchmark``) with the mean and
standard deviation of every (method, filter mode, metric) and the report files (``results.json``,
``tables.md``, ``fig4.png``); one nested run per seed with that seed's values and chosen
hyper-parameters. Bad input (params, data) fails the flow with one line and no traceback, and
``python -m flows.benchmark`` with exit status 2, as ``flows.pipeline``.

    python -m flows.benchmark --dataset ml-latest-small --seeds 0,1,2,3,4 \\
        --set data.source=movielens --set data.path=../shared/data/ml-latest-small
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.steps import expected_errors, fails_readably, one_line
from tasks.tracking import (
    log_file,
    log_metrics,
    log_params,
    resolve_tracking_uri,
    source_tags,
    tracked_run,
)
from tdm import benchmark
from tdm.config import load_config

EXPERIMENT = "tdm-benchmark"


@task(name="benchmark-seed", task_run_name="seed-{seed}", cache_policy=NO_CACHE)
def seed_task(cfg, work: str, seed: int, baselines, variants, rounds: int, tune_mode: str) -> dict:
    """Every method on the test users of ``data.seed = seed`` (``tdm.benchmark.seed_result``)."""
    return benchmark.seed_result(cfg, Path(work), seed, baselines, variants, rounds, tune_mode)


def seed_metrics(result: dict) -> dict[str, float]:
    """``<row>.<mode>.<metric>`` of one seed (rows as in ``tdm.benchmark.summarise``)."""
    rows = benchmark.summarise({0: result}, _modes(result))["rows"]
    return {
        f"{row}.{mode}.{metric}": stat["mean"]
        for row, modes in rows.items()
        for mode, metrics in modes.items()
        for metric, stat in metrics.items()
    }


def _modes(result: dict) -> list[str]:
    for b in result["baselines"].values():
        return list(b["test"])
    for v in result["tdm"].values():
        return list(v["rounds"][0]["test"])
    return []


@flow(name="tdm-benchmark")
@fails_readably
def tdm_benchmark(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    dataset: str | None = None,
    seeds: list[int] = (0, 1, 2, 3, 4),
    baselines: list[str] = ("popular", "itemcf", "bpr", "fm", "youtube"),
    variants: list[str] = ("attention_dnn", "dnn", "product_dnn", "attention_dnn_hs"),
    rounds: int = 3,
    tune_mode: str = "none",
    root: str = ".",
    work: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Run the benchmark and write ``<root>/reports/<dataset>/``.

    Args:
        params: the params file; ``overrides``: ``section.key=value`` on top.
        dataset: the report's name (default ``data.source``).
        seeds: ``data.seed`` values (which users are test and validation users).
        baselines, variants: keys of ``tdm.baselines.BASELINES`` / ``tdm.benchmark.VARIANTS``.
        rounds: rounds of the attention-DNN (Table 4).
        tune_mode: filter mode of the baselines' validation metric.
        root: project folder (reports, MLflow store).
        work: scratch folder (finished seeds are reused from it); default a temporary folder.
        tracking_uri: MLflow store (default ``sqlite:///<root>/mlflow.db``).
    Returns:
        The report (``tdm.benchmark.assemble``); on bad input a ``Failed`` state whose message
        is the error's one line and whose result raises it.
    """
    cfg = load_config(params, list(overrides or []))
    dataset = dataset or cfg.data.source
    uri = resolve_tracking_uri(root, tracking_uri)
    out = Path(root) / "reports" / dataset
    baselines, variants, seeds = list(baselines), list(variants), [int(s) for s in seeds]
    t0 = time.perf_counter()
    tags = {**source_tags(root), "dataset": dataset}
    with tempfile.TemporaryDirectory(prefix="tdm-benchmark-") as tmp:
        scratch = work or tmp
        with tracked_run(
            uri, f"benchmark-{dataset}", root, tags=tags, experiment=EXPERIMENT
        ) as parent:
            log_params(
                parent,
                {
                    "dataset": dataset,
                    "seeds": seeds,
                    "baselines": baselines,
                    "variants": variants,
                    "rounds": rounds,
                    "tune_mode": tune_mode,
                    "overrides": list(overrides or []),
                },
            )
            per_seed = {}
            for seed in seeds:
                with tracked_run(
                    uri, f"seed-{seed}", root, parent=parent, tags=tags, experiment=EXPERIMENT
                ) as run:
                    result = seed_task(cfg, scratch, seed, baselines, variants, rounds, tune_mode)
                    log_params(
                        run,
                        {
                            "data.seed": seed,
                            **{
                                f"{name}.{k}": v
                                for name, b in result["baselines"].items()
                                for k, v in b["params"].items()
                            },
                        },
                    )
                    log_metrics(run, seed_metrics(result))
                per_seed[seed] = result
            report = benchmark.assemble(cfg, dataset, per_seed, tune_mode, time.perf_counter() - t0)
            tables = benchmark.write_report(report, out)
            files = [out / "results.json", out / "tables.md"]
            from tasks.figures import layerwise_recall, test_curves

            for key, draw, title in (
                ("fig4", layerwise_recall, f"{dataset}: TDM product-DNN, category tree"),
                ("fig5", test_curves, f"{dataset}: TDM attention-DNN, category vs learnt tree"),
            ):
                if report["summary"].get(key):
                    files.append(draw(report["summary"][key], out / f"{key}.png", title))
            summary = {
                f"{row}.{mode}.{metric}.{k}": stat[k]
                for row, modes in report["summary"]["rows"].items()
                for mode, metrics in modes.items()
                for metric, stat in metrics.items()
                for k in ("mean", "std")
            }
            log_metrics(parent, summary)
            for path in files:
                log_file(parent, path, "report")
    create_markdown_artifact(
        markdown=tables,
        key=f"tdm-benchmark-{_slug(dataset)}",
        description="Tables 2-4, Fig. 4, Fig. 5",
    )
    return report


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="tdm benchmark as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--dataset")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--baselines", default="popular,itemcf,bpr,fm,youtube")
    parser.add_argument("--variants", default="attention_dnn,dnn,product_dnn,attention_dnn_hs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tune-mode", default="none", choices=["none", "items", "categories"])
    parser.add_argument("--root", default=".")
    parser.add_argument("--work")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args(argv)
    state = tdm_benchmark(
        params=args.params,
        overrides=args.overrides,
        dataset=args.dataset,
        seeds=[int(s) for s in args.seeds.split(",")],
        baselines=[b for b in args.baselines.split(",") if b],
        variants=[v for v in args.variants.split(",") if v],
        rounds=args.rounds,
        tune_mode=args.tune_mode,
        root=args.root,
        work=args.work,
        tracking_uri=args.tracking_uri,
        return_state=True,
    )
    try:
        report = state.result()  # raises the flow's error
    except expected_errors() as exc:
        print(f"tdm-benchmark: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(benchmark.render(report))
    return report


if __name__ == "__main__":
    main()
