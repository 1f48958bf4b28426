"""The alternating TDM rounds (Sec. 3.5) as a Prefect flow, tracked in MLflow.

validate -> prepare -> init tree -> [train -> evaluate -> export -> relearn]* — the same stage
functions and artefact paths as ``tdm pipeline`` and ``dvc repro`` (plot data included). One
MLflow parent run for the flow (``tdm-pipeline <flow run> <overrides>``, with the headline
metrics per round), one nested run per round (``round-<r> <flow run>``).

A run on its params file unchanged writes to ``root``; when that is a DVC project's own
params.yaml, its outputs are then recorded in DVC (``dvc commit``) and the MLflow runs tagged
with their DVC hashes. A run whose config differs (overrides, ``rounds``) writes to
``<root>/runs/<flow run name>/`` instead, so it never replaces what dvc.lock describes; the
MLflow parent run names the folder (tag and param ``artefact_root``). The run holds the lock of
its folder (``tdm.io.root_lock``) throughout: a second run there fails at once.

With ``train_deployment`` (``"tdm-train/gpu"``), each round's training runs as a flow run of
that deployment of ``flows.train.tdm_train``, which a worker of its work pool picks up (on a GPU
machine), and the flow waits for it; everything else, and the lock, stay here. The artefact
folder and the MLflow store must then be reachable under the same paths from the worker's
machine (README, "Training on a GPU worker").

Bad input (params, data, a failed validation, a folder in use, a training flow run that did not
complete) fails the flow with one line and no traceback; ``python -m flows.pipeline`` then exits
with status 2.

    python -m flows.pipeline --params params.yaml --set train.epochs=1 --rounds 2
    python -m flows.pipeline --train-deployment tdm-train/gpu   # with PREFECT_API_URL set
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.train import check_train_deployment, train_on_deployment
from tasks.steps import (
    artefact_root,
    config_task,
    dvc_record_task,
    evaluate_task,
    expected_errors,
    export_task,
    fails_readably,
    init_tree_task,
    log_config,
    one_line,
    plot_data_task,
    plot_summary_task,
    prepare_task,
    register_task,
    relearn_task,
    run_logger,
    train_task,
    validate_prepared_task,
    validate_raw_task,
    write_run_file,
)
from tasks.tracking import (
    ARTEFACT_ROOT,
    experiment_id,
    format_summary,
    headline_metrics,
    log_metrics,
    log_params,
    resolve_tracking_uri,
    run_url,
    source_tags,
    summary_markdown,
    tag_dvc_record,
    tracked_run,
)
from tdm.io import root_lock

RUN_NAME_CHARS = 100  # a run name the MLflow UI shows on one line; all overrides are params


def run_label(*parts: str) -> str:
    """The non-empty ``parts`` joined by spaces, as many as fit in ``RUN_NAME_CHARS`` (the first
    two always), then ``(+N more)``."""
    parts = tuple(p for p in parts if p)
    text = " ".join(parts[:2])
    for i, part in enumerate(parts[2:], start=2):
        if len(text) + 1 + len(part) > RUN_NAME_CHARS:
            return f"{text} (+{len(parts) - i} more)"
        text += " " + part
    return text


@flow(name="tdm-pipeline")
@fails_readably
def tdm_pipeline(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    rounds: int | None = None,
    root: str = ".",
    tracking_uri: str | None = None,
    train_deployment: str | None = None,
    register_as: str | None = "tdm",
    promote: bool = True,
) -> dict:
    """Run every round and return the summary (headline metrics per round, MLflow run ids,
    where the artefacts went, whether DVC recorded them).

    Args:
        params: the params file.
        overrides: ``section.key=value`` overrides, as ``tdm --set``.
        rounds: overrides ``rounds.count`` when given.
        root: the project folder: the artefacts (``prepared/``, ``trees/``, ``models/``...) go
            here when the run uses ``params`` unchanged, else to ``<root>/runs/<flow run>/``.
        tracking_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<root>/mlflow.db``.
        register_as: the MLflow registered model every round's model becomes a version of
            (``tasks.registry.register``); None: no registration.
        promote: move the registered model's alias ``champion`` to a round's version when it
            beats the champion's validation recall (``tdm serve --model models:/tdm/champion``).
        train_deployment: a deployment of ``flows.train.tdm_train`` (``"tdm-train/gpu"``):
            each round trains as a flow run of it, on a worker of its work pool, and the flow
            waits for it (the summary lists their ids under ``train_flow_runs``). Default: in
            this process.
    Returns:
        The summary; on bad input (``tasks.steps.expected_errors``) a ``Failed`` state whose
        message is the error's one line (no traceback logged) and whose result raises it.
    """
    from prefect.runtime import flow_run

    t0 = time.perf_counter()
    logger = run_logger()
    Path(root).mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(root, tracking_uri)
    overrides = list(overrides or [])
    cfg = config_task(params, overrides, rounds)
    if train_deployment:
        check_train_deployment(train_deployment)
    run_name, run_id = flow_run.name or "", flow_run.id or ""
    changes = [*overrides, *([f"rounds.count={rounds}"] if rounds is not None else [])]
    folder = artefact_root(cfg, params, root, run_name, run_id)
    out, where = str(folder), str(folder.resolve())
    with root_lock(folder, f"Prefect flow run {run_name} {run_id}"):
        if folder != Path(root):
            info = {"flow_run_name": run_name, "flow_run_id": run_id, "overrides": changes}
            write_run_file(folder, params=str(params), **info)
            logger.info("the config differs from %s (%s): writing to %s", params, changes, out)
        tags = {
            **source_tags(Path(params).resolve().parent),
            "params": str(params),
            ARTEFACT_ROOT: where,
            "prefect.flow_run_name": run_name,
            "prefect.flow_run_id": run_id,
        }
        summary: dict = {
            "rounds": [],
            "topk": cfg.eval.topk,
            ARTEFACT_ROOT: out,
            "registered": [],
        }
        if train_deployment:
            summary["train_deployment"] = train_deployment
            summary["train_flow_runs"] = []
        parent_name = run_label("tdm-pipeline", run_name, *changes)
        with tracked_run(uri, parent_name, root, tags=tags) as parent:
            log_config(parent, cfg)
            log_params(parent, {ARTEFACT_ROOT: where, "overrides": changes})
            summary["mlflow"] = {
                "tracking_uri": uri,
                "parent_run_id": parent.run_id,
                "experiment_id": experiment_id(uri, root),
                "round_run_ids": [],
            }
            validate_raw_task(cfg, out, run=parent)  # a failure stops the flow here
            prepared = prepare_task(cfg, out)
            tree = init_tree_task(cfg, out, prepared, run=parent)
            validate_prepared_task(cfg, out, tree, run=parent)  # ... or here, before training
            previous_tree: str | None = None
            model: str | None = None
            round_runs = []
            for r in range(cfg.rounds.count):
                name = run_label(f"round-{r}", run_name)
                with tracked_run(uri, name, root, parent=parent, tags=tags) as run:
                    round_runs.append(run)
                    summary["mlflow"]["round_run_ids"].append(run.run_id)
                    log_config(run, cfg, round=r)
                    init_from = model if (r > 0 and cfg.rounds.warm_start) else None
                    if train_deployment:
                        model, train_run = train_on_deployment(
                            train_deployment,
                            params,
                            changes,
                            out,
                            r,
                            tree,
                            init_from=init_from,
                            run=run,
                            name=f"{run_name}-train-round-{r}" if run_name else None,
                        )
                        summary["train_flow_runs"].append(train_run)
                    else:
                        model = train_task(cfg, out, r, tree, init_from=init_from, run=run)
                    row = evaluate_task(cfg, out, r, model, run=run, previous_tree=previous_tree)
                    if register_as:
                        registered = register_task(run, model, r, register_as, promote)
                        summary["registered"].append(registered)
                    plot_data_task(out, r)
                    embeddings = export_task(out, r, model)
                    if r + 1 < cfg.rounds.count:
                        previous_tree, tree = tree, relearn_task(cfg, out, r, embeddings)
                log_metrics(parent, headline_metrics(row), step=r)
                summary["rounds"].append({**row, "run_id": run.run_id})
            plot_summary_task(out, cfg.rounds.count)
            # a run in its own folder is never recorded: `record` says why (its overrides)
            record = dvc_record_task(cfg, params, root)
            tag_dvc_record(parent, round_runs, record, root)
            summary["dvc"] = {k: record[k] for k in ("recorded", "reason", "lock_md5")}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    create_markdown_artifact(
        markdown=summary_markdown(summary),
        key="tdm-pipeline-metrics",
        description="Precision/Recall@M per round and filter mode, with the MLflow run ids",
    )
    return summary


def closing_text(summary: dict, root: str = ".") -> str:
    """The metrics table, where the artefacts are (``summary["artefact_root"]``, else ``root``),
    and how to open the Prefect and MLflow UIs."""
    mlflow_info = summary["mlflow"]
    out = Path(summary.get(ARTEFACT_ROOT) or root)
    dvc = summary.get("dvc") or {}
    if dvc.get("recorded"):
        dvc_line = (
            f"DVC: outputs recorded in dvc.lock (md5 {dvc['lock_md5']}): `dvc status` is clean, "
            "`dvc push` ships data, trees and models"
        )
    else:
        dvc_line = f"DVC: outputs not recorded ({dvc.get('reason', 'no DVC step')})"
    return "\n".join(
        [
            "",
            format_summary(summary),
            "",
            f"artefacts: {out}/ (prepared, trees, models, embeddings)",
            f"metrics: {out / 'metrics'}/round_<r>.json; plot data: {out / 'plots'}/"
            f"{' (`dvc plots show`)' if dvc.get('recorded') else ''}; total {summary['seconds']} s",
            dvc_line,
            "",
            "Prefect UI: `make prefect-ui` (prefect server start --host 127.0.0.1 --port 4200), "
            "then http://127.0.0.1:4200/runs: this flow run, its task runs, logs and the "
            "tdm-pipeline-metrics artifact",
            f"MLflow UI:  `make mlflow-ui` (mlflow ui --backend-store-uri "
            f"{mlflow_info['tracking_uri']} --port 5000 --workers 1), then "
            f"{run_url(mlflow_info['experiment_id'], mlflow_info['parent_run_id'])}: "
            "the pipeline run, its rounds in the experiment tdm-pipeline",
            "Trees side by side: `tdm compare-trees`",
            *_registry_lines(summary.get("registered") or []),
        ]
    )


def _registry_lines(registered: list[dict]) -> list[str]:
    """Where the registered versions are and how to serve the champion."""
    if not registered:
        return []
    last = registered[-1]
    champion = (last.get("promotion") or {}).get("champion")
    lines = [
        f"MLflow Model Registry: {last['name']} versions "
        + ", ".join(r["version"] for r in registered)
        + (f"; champion: version {champion}" if champion else "")
    ]
    if champion:
        lines.append(f"Serve it: `tdm serve --model models:/{last['name']}/champion`")
    return lines


def main(argv: list[str] | None = None) -> dict:
    """``python -m flows.pipeline``: run the flow and print ``closing_text``; bad input is one
    line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(description="Run the TDM rounds as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--root", default=".")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument(
        "--train-deployment",
        default=None,
        help="train each round as a flow run of this deployment, e.g. tdm-train/gpu",
    )
    parser.add_argument(
        "--register-as", default="tdm", help="MLflow registered model name ('' : none)"
    )
    parser.add_argument("--no-promote", action="store_true", help="never move the alias champion")
    args = parser.parse_args(argv)
    state = tdm_pipeline(
        params=args.params,
        overrides=args.overrides,
        rounds=args.rounds,
        root=args.root,
        tracking_uri=args.tracking_uri,
        train_deployment=args.train_deployment,
        register_as=args.register_as or None,
        promote=not args.no_promote,
        return_state=True,
    )
    try:
        summary = state.result()  # raises the flow's error
    except expected_errors() as exc:
        print(f"tdm-pipeline: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    print(closing_text(summary, args.root))
    return summary


if __name__ == "__main__":
    main()
