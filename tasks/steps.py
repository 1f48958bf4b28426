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

from tasks.tracking import RunRef, log_file, log_metrics, log_params, log_tree, metric_values
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
    to ``run`` with ``step=epoch``. Returns the model folder."""
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
    ``previous_tree``), the tree file and the metrics file. Returns the headline row."""
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


def log_config(run: RunRef, cfg: Config, **extra: object) -> None:
    """The whole config as dotted params (``train.lr``...), plus ``extra``."""
    log_params(run, {**cfg.to_dict(), **extra})
