"""One Prefect task per pipeline step. Each calls exactly one ``tdm.stages`` function with the
``tdm.paths.Paths`` layout (so the artefacts land where ``tdm <command>`` and ``dvc repro`` put
them), logs to MLflow when given a run, and returns the path of what it wrote.

Retries only where a failure can be transient (reading the raw data); training and evaluation
are deterministic, so a retry would fail the same way. Caching is DVC's job: no Prefect cache.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import (
    RunRef,
    log_figure,
    log_file,
    log_metrics,
    log_params,
    log_tree,
    metric_values,
)
from tdm import stages
from tdm.config import Config, load_config
from tdm.paths import Paths


@task(name="load-config", cache_policy=NO_CACHE)
def config_task(
    params: str = "params.yaml", overrides: list[str] | None = None, rounds: int | None = None
) -> Config:
    """Load and validate ``params`` with ``section.key=value`` overrides (``rounds`` last)."""
    extra = [f"rounds.count={rounds}"] if rounds is not None else []
    return load_config(params, [*(overrides or []), *extra])


@task(name="prepare", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_task(cfg: Config, root: str) -> str:
    """Raw data -> ``<root>/prepared`` (``tdm.stages.prepare``). Returns the folder."""
    out = Paths(Path(root)).prepared
    stages.prepare(cfg, out)
    return str(out)


@task(name="init-tree", cache_policy=NO_CACHE)
def init_tree_task(cfg: Config, root: str, prepared: str, run: RunRef | None = None) -> str:
    """Category tree -> ``<root>/trees/round_0.tree`` (``tdm.stages.init_tree``)."""
    out = Paths(Path(root)).tree(0)
    stats = stages.init_tree(cfg, Path(prepared), out)
    if run is not None:
        log_tree(run, out, stats)
    return str(out)


@task(name="train", task_run_name="train-round-{round_}", cache_policy=NO_CACHE)
def train_task(
    cfg: Config,
    root: str,
    round_: int,
    tree: str,
    init_from: str | None = None,
    run: RunRef | None = None,
) -> str:
    """Train on ``tree`` -> ``<root>/models/round_<r>`` (``tdm.stages.train``; the GPU step,
    ``train.device: auto`` picks CUDA when present). Per-epoch ``loss`` and ``valid_recall`` go
    to ``run`` with ``step=epoch``; then the loss curve (PNG) and the model as an MLflow pyfunc
    model that loads back (``tasks.pyfunc``). Returns the model folder."""
    out = Paths(Path(root)).model(round_)

    def on_epoch(epoch: int, stats: dict) -> None:
        if run is not None:
            log_metrics(
                run,
                {k: stats[k] for k in ("loss", "valid_recall", "samples_per_s") if k in stats},
                step=epoch,
            )

    summary = stages.train(
        cfg,
        Paths(Path(root)).prepared,
        Path(tree),
        out,
        init_from=Path(init_from) if init_from else None,
        callback=on_epoch,
    )
    if run is not None:
        log_metrics(
            run,
            {
                "train_seconds": summary["seconds"],
                "best_epoch": summary["best_epoch"],
                "samples": summary["samples"],
            },
        )
        run.client.set_tag(run.run_id, "train.device_used", summary["device"])
        log_file(run, out / stages.TRAIN_LOG_FILE, "model")
        from tasks import figures, pyfunc

        log_figure(run, figures.loss_curve, summary, "loss.png", title=f"round {round_}")
        pyfunc.log(run, out, "recommender")
    return str(out)


@task(name="evaluate", task_run_name="evaluate-round-{round_}", cache_policy=NO_CACHE)
def evaluate_task(
    cfg: Config,
    root: str,
    round_: int,
    model_dir: str,
    run: RunRef | None = None,
    previous_tree: str | None = None,
) -> dict:
    """Metrics -> ``<root>/metrics/round_<r>.json`` (``tdm.stages.evaluate``). Logs every
    ``<method>.<filter>.<metric>``, the tree figures (with the moved fraction vs
    ``previous_tree``), the tree file, the metrics file and PNGs of the layer-wise recall and the
    tree's balance. Returns the headline row."""
    paths = Paths(Path(root))
    out = paths.metrics(round_)
    report = stages.evaluate(cfg, paths.prepared, Path(model_dir), out)
    if run is not None:
        log_metrics(run, metric_values(report))
        log_tree(
            run,
            paths.tree(round_),
            report["tree"],
            Path(previous_tree) if previous_tree else None,
        )
        log_file(run, out, "metrics")
        from tasks import figures
        from tdm.tree import Tree

        if report.get("layerwise_recall"):
            log_figure(
                run,
                figures.layerwise_recall,
                report["layerwise_recall"],
                "layerwise_recall.png",
                title=f"round {round_}: layer-wise recall",
            )
        log_figure(
            run,
            figures.tree_balance,
            Tree.load(paths.tree(round_)),
            "tree_balance.png",
            title=f"round {round_}: tree",
        )
    row: dict = {"round": round_}
    for who in ("tdm", "most_popular"):
        for mode, values in report[who].items():
            row[f"{who}/{mode}/precision"] = values["precision"]
            row[f"{who}/{mode}/recall"] = values["recall"]
    return row


@task(name="export-embeddings", task_run_name="export-round-{round_}", cache_policy=NO_CACHE)
def export_task(root: str, round_: int, model_dir: str) -> str:
    """Leaf embeddings -> ``<root>/embeddings/round_<r>.npy`` (``tdm.stages.export_embeddings``)."""
    out = Paths(Path(root)).embeddings(round_)
    stages.export_embeddings(Path(model_dir), out)
    return str(out)


@task(name="relearn-tree", task_run_name="relearn-round-{round_}", cache_policy=NO_CACHE)
def relearn_task(cfg: Config, root: str, round_: int, embeddings: str) -> str:
    """K-means tree over round ``r``'s embeddings -> ``<root>/trees/round_<r+1>.tree``
    (``tdm.stages.relearn_tree``). Returns the new tree's path."""
    out = Paths(Path(root)).tree(round_ + 1)
    stages.relearn_tree(cfg, Path(embeddings), out)
    return str(out)


@task(name="plot-data", task_run_name="plot-data-round-{round_}", cache_policy=NO_CACHE)
def plot_data_task(root: str, round_: int) -> list[str]:
    """Round ``r``'s loss and layer-wise recall as CSV under ``<root>/plots/`` (what the DVC
    stage ``plot_data@<r>`` writes, ``tasks.plot_data.write_round``)."""
    from tasks.plot_data import write_round

    return [str(p) for p in write_round(root, round_)]


@task(name="plot-summary", cache_policy=NO_CACHE)
def plot_summary_task(root: str, rounds: int) -> str:
    """``<root>/plots/rounds.csv``: the recall of every round (DVC stage ``plot_summary``)."""
    from tasks.plot_data import write_summary

    return str(write_summary(root, rounds))


@task(name="dvc-commit", cache_policy=NO_CACHE)
def dvc_record_task(cfg: Config, params: str, root: str) -> dict:
    """Record the run's outputs in DVC (``dvc commit``) when ``root`` is a DVC project and the run
    used its ``params.yaml`` unchanged (``tasks.versioning.record``). Returns the record as a
    dict: ``recorded``, ``reason``, ``lock_md5``, ``outs`` (path -> md5)."""
    import dataclasses

    from prefect.logging import get_run_logger

    from tasks.versioning import record

    result = record(cfg, params, root)
    logger = get_run_logger()
    if result.recorded:
        logger.info("recorded in DVC: dvc.lock md5 %s (`dvc push` ships it)", result.lock_md5)
    else:
        logger.warning("not recorded in DVC: %s", result.reason)
    return dataclasses.asdict(result)


def log_config(run: RunRef, cfg: Config, **extra: object) -> None:
    """The whole config as dotted params (``train.lr``...), plus ``extra``."""
    log_params(run, {**cfg.to_dict(), **extra})


# The UserBehavior data set's documented window (UTC+8 days 2017-11-25..2017-12-03), which the
# synthetic generator's default timeline also covers.
USERBEHAVIOR_WINDOW = (1511539200, 1511539200 + 9 * 86400)


def expected_window(cfg: Config) -> tuple[int, int] | None:
    """The timestamps a raw data set should lie in, when its source has a known window."""
    if cfg.data.source == "userbehavior":
        return USERBEHAVIOR_WINDOW
    if cfg.data.source == "synthetic":
        start = cfg.synthetic.start_timestamp
        return start, start + cfg.synthetic.days * 86400
    return None


def _keep_report(report, root: str, name: str, run: RunRef | None) -> Path:
    from tdm.io import write_text

    path = Path(root) / "reports" / f"validation_{name}.json"
    write_text(path, report.to_json())
    if run is not None:
        log_file(run, path, "validation")
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=report.to_markdown(),
        key=f"validation-{name.replace('_', '-')}",
        description=f"Great Expectations: {name} data",
    )
    return path


@task(name="validate-raw", cache_policy=NO_CACHE)
def validate_raw_task(cfg: Config, root: str, run: RunRef | None = None) -> str:
    """Great Expectations on the raw behaviour table; raises ValidationFailed (no retry)."""
    from tasks.validation import require, validate_raw
    from tdm.data.loaders import load_dataset

    frame = load_dataset(cfg.data, cfg.synthetic)
    report = validate_raw(frame, cfg.data.path or cfg.data.source, window=expected_window(cfg))
    path = _keep_report(report, root, "raw", run)
    require(report)
    return str(path)


@task(name="validate-prepared", cache_policy=NO_CACHE)
def validate_prepared_task(cfg: Config, root: str, tree: str, run: RunRef | None = None) -> str:
    """Great Expectations on the prepared samples against the initial tree, before training."""
    from tasks.validation import require, validate_prepared
    from tdm.data.protocol import load_prepared
    from tdm.tree import Tree

    paths = Paths(Path(root))
    report = validate_prepared(load_prepared(paths.prepared), Tree.load(tree))
    path = _keep_report(report, root, "prepared", run)
    require(report)
    return str(path)
