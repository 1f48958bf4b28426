"""One Prefect task per pipeline step. Each calls exactly one ``tdm.stages`` function with the
``tdm.paths.Paths`` layout (so the artefacts land where ``tdm <command>`` and ``dvc repro`` put
them), logs to MLflow when given a run, and returns the path of what it wrote.

Retries only where a failure can be transient (reading the raw data), and never for bad input;
training and evaluation are deterministic, so a retry would fail the same way. Caching is DVC's
job: no Prefect cache.

Bad input (params, data, a failed validation, a locked root) is not a bug: the flow fails with
the error's one-line message and no traceback (``expected_errors``, ``quiet_expected_failures``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

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
from tdm.data.checks import expected_window
from tdm.errors import TdmError
from tdm.paths import Paths

P = ParamSpec("P")
R = TypeVar("R")


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's or the environment's fault, never a bug (``tdm.errors``):
    bad params or data, a tree or artefact file that does not load, a root in use, failed
    Great Expectations validation (``ValidationFailed``)."""
    return (TdmError,)


class TrainingDeploymentError(TdmError):
    """The training deployment a pipeline names is missing, or a flow run of it did not complete
    (failed, crashed, cancelled): one of ``expected_errors``, so the pipeline fails with its one
    line (``flows.train.train_on_deployment``)."""


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a validation failure lists its expectations)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class ExpectedFailureFilter(logging.Filter):
    """Drops the record Prefect's task and flow engines log, with its traceback, for an
    ``expected_errors`` exception ("Task run failed with exception: ..."), and a traceback
    attached to no exception (Prefect 3.9 logs a task that returns a ``Failed`` state with
    ``exc_info=True``, printed as ``NoneType: None``). The failed state, with its message, is
    still logged ("Finished in state Failed(...)") and shown in the UI."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        exc = record.exc_info[1]
        if exc is None:
            record.exc_info = None
            return True
        return not isinstance(exc, expected_errors())


ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


def quiet_expected_failures() -> None:
    """Install ``ExpectedFailureFilter`` on the loggers of Prefect's engines (once). Prefect 3.9
    has no setting for this: its task engine logs every failure with ``exc_info=True``
    (``prefect/task_engine.py``, ``handle_retry``)."""
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedFailureFilter) for f in logger.filters):
            logger.addFilter(ExpectedFailureFilter())


def fails_readably(flow_fn: Callable[P, R]) -> Callable[P, R | State]:
    """For a flow function, under ``@flow``: bad input (``expected_errors``) ends the flow run
    in a ``Failed`` state whose message is the error's one line and whose ``result()`` raises
    the error, with no traceback logged by the flow or its tasks (``quiet_expected_failures``).
    Other exceptions (bugs) keep Prefect's traceback. The flow's process gets
    ``tdm.runtime.tune_allocator`` (its tasks run in it)."""
    from prefect.states import Failed

    from tdm.runtime import tune_allocator

    @functools.wraps(flow_fn)  # Prefect reads the parameters through __wrapped__
    def run(*args: P.args, **kwargs: P.kwargs) -> R | State:
        quiet_expected_failures()
        tune_allocator()
        try:
            return flow_fn(*args, **kwargs)
        except expected_errors() as exc:
            return Failed(message=one_line(exc), data=exc)

    return run


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger (shown with the run in the UI); this module's outside a run
    (a task called through ``.fn()``)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def retry_unless_expected(task, task_run, state) -> bool:
    """A ``retry_condition_fn``: retry a failure unless it is bad input (``expected_errors``)."""
    return not isinstance(state.data, expected_errors())


def config_differs(cfg: Config, params: str | Path) -> bool:
    """Whether the run's config is not its params file's (overrides, or another round count;
    also when the file alone does not load, but does with the run's overrides)."""
    from tdm.config import ConfigError

    try:
        return cfg != load_config(params)
    except ConfigError:
        return True


RUN_FILE = "flow_run.json"


def artefact_root(
    cfg: Config, params: str | Path, root: str | Path, run_name: str, run_id: str
) -> Path:
    """Where a flow run writes its files: ``root`` when it runs on ``params`` unchanged (what DVC
    records), else its own ``<root>/runs/<run_name>/``, so that a run with overrides never
    replaces the recorded outputs. A folder already holding another flow run's files (its
    ``flow_run.json`` names another id) gets the id's first 8 characters appended."""
    if not config_differs(cfg, params):
        return Path(root)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name or "").strip(".-") or "run"
    folder = Path(root) / "runs" / name
    marker = folder / RUN_FILE
    if marker.exists():
        import json

        try:
            other = json.loads(marker.read_text()).get("flow_run_id")
        except ValueError:
            other = None
        if other != run_id:
            folder = folder.with_name(f"{name}-{run_id[:8]}")
    return folder


def write_run_file(folder: Path, **info: object) -> Path:
    """``<folder>/flow_run.json``: which flow run wrote the folder, with what params."""
    from tdm.io import write_json

    return write_json(Path(folder) / RUN_FILE, info)


@task(name="load-config", cache_policy=NO_CACHE)
def config_task(
    params: str = "params.yaml", overrides: list[str] | None = None, rounds: int | None = None
) -> Config:
    """Load and validate ``params`` with ``section.key=value`` overrides (``rounds`` last)."""
    extra = [f"rounds.count={rounds}"] if rounds is not None else []
    return load_config(params, [*(overrides or []), *extra])


@task(
    name="prepare",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_expected,
    cache_policy=NO_CACHE,
)
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
    ``train.device: auto`` picks CUDA when present). Per-epoch ``loss`` and ``valid_recall``
    (with ``train.test_curve`` also ``test_loss`` and ``test_recall``, reported only) go to
    ``run`` with ``step=epoch``; then the loss curve (PNG), with ``train.test_curve`` Fig. 5
    (``fig5.png``: the test curves of the rounds so far, ``figures.test_curves``), and the model
    as an MLflow pyfunc model that loads back (``tasks.pyfunc``). Each epoch's loss and
    validation recall also go to the task run's log. Returns the model folder."""
    out = Paths(Path(root)).model(round_)
    logger = run_logger()

    def on_epoch(epoch: int, stats: dict) -> None:
        test = ""
        if "test_recall" in stats:  # train.test_curve: reported, never used by training
            test = f", test loss {stats['test_loss']:.4f}, Recall@{cfg.eval.topk} "
            test += f"{stats['test_recall']:.4f}"
        logger.info(
            "epoch %d/%d: loss %.4f, validation Recall@%d %.4f (%.0f samples/s)%s",
            epoch + 1,
            cfg.train.epochs,
            stats.get("loss", float("nan")),
            cfg.eval.topk,
            stats.get("valid_recall", float("nan")),
            stats.get("samples_per_s", float("nan")),
            test,
        )
        if run is not None:
            keys = ("loss", "valid_recall", "samples_per_s", "test_loss", "test_recall")
            log_metrics(run, {k: stats[k] for k in keys if k in stats}, step=epoch)

    summary = stages.train(
        cfg,
        Paths(Path(root)).prepared,
        Path(tree),
        out,
        init_from=Path(init_from) if init_from else None,
        callback=on_epoch,
    )
    logger.info(
        "round %d: %d epochs in %.1f s on %s, kept epoch %d",
        round_,
        len(summary["losses"]),
        summary["seconds"],
        summary["device"],
        summary["best_epoch"] + 1,
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
        if summary.get("test_curve"):
            log_figure(
                run,
                figures.test_curves,
                _round_curves(root, round_, summary),
                "fig5.png",
                title=f"rounds 0-{round_}: test loss and recall per epoch",
            )
        pyfunc.log(run, out, "recommender")
    return str(out)


def _round_curves(root: str, round_: int, summary: dict) -> dict:
    """Fig. 5's data (``figures.test_curves``): the test curve of every round up to ``round_``
    that recorded one (round 0: the category tree; later rounds: re-learnt trees, warm-started
    when ``rounds.warm_start``), ``summary`` being round ``round_``'s training log."""
    import json

    curves = {}
    for r in range(round_ + 1):
        log_path = Paths(Path(root)).model(r) / stages.TRAIN_LOG_FILE
        if r == round_:
            curve = summary.get("test_curve")
        elif log_path.exists():
            curve = json.loads(log_path.read_text()).get("test_curve")
        else:
            curve = None
        if curve:
            tree = "category tree" if r == 0 else "re-learnt tree"
            curves[f"round {r} ({tree})"] = curve
    return {"k": summary["test_curve"]["k"], "curves": curves}


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
    ``previous_tree`` and, on generated data, ``tree.truth.*``: ``tracking.log_tree``), the tree
    file, the metrics file and PNGs of the layer-wise recall and the tree's balance. Returns the
    headline row."""
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
            first_round=round_ == 0,
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
    """Round ``r``'s re-learnt tree -> ``<root>/trees/round_<r+1>.tree``
    (``tdm.stages.relearn_tree``): k-means over the round's ``embeddings``, or with
    ``tree.learner: jtm`` JTM over ``<root>/models/round_<r>`` and ``<root>/prepared``. Returns
    the new tree's path."""
    paths = Paths(Path(root))
    out = paths.tree(round_ + 1)
    stages.relearn_tree(
        cfg,
        Path(embeddings),
        out,
        model_dir=paths.model(round_),
        prepared_dir=paths.prepared,
    )
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
    window = expected_window(cfg.data, cfg.synthetic)
    report = validate_raw(frame, cfg.data.path or cfg.data.source, window=window)
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


@task(name="register-model", task_run_name="register-round-{round_}", cache_policy=NO_CACHE)
def register_task(
    run: RunRef, model_dir: str, round_: int, name: str = "tdm", promote: bool = True
) -> dict:
    """Register round ``round_``'s model as a new version of ``name`` in the MLflow Model
    Registry (``tasks.registry.register``) and, with ``promote``, move the alias ``champion`` to
    it when it beats the current champion's validation recall (``tasks.registry.promote``).
    Returns the registration, with the promotion's outcome under ``promotion``."""
    from tasks.registry import promote as promote_version
    from tasks.registry import register

    logger = run_logger()
    version = register(run, model_dir, name=name, tags={"round": str(round_)})
    if promote:
        version["promotion"] = promote_version(
            name, version["version"], tracking_uri=run.tracking_uri
        )
        logger.info("%s version %s: %s", name, version["version"], version["promotion"]["reason"])
    return version
