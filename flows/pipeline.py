"""The alternating TDM rounds (Sec. 3.5) as a Prefect flow, tracked in MLflow.

validate -> prepare -> init tree -> [train -> evaluate -> export -> relearn]* — the same stage
functions and artefact paths as ``tdm pipeline`` and ``dvc repro`` (plot data included). One
MLflow parent run for the flow, one nested run per round. When the run used a DVC project's own
params.yaml, its outputs are then recorded in DVC (``dvc commit``) and the MLflow runs tagged
with their DVC hashes.

    python -m flows.pipeline --params params.yaml --set train.epochs=1 --rounds 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.steps import (
    config_task,
    dvc_record_task,
    evaluate_task,
    export_task,
    init_tree_task,
    log_config,
    plot_data_task,
    plot_summary_task,
    prepare_task,
    relearn_task,
    train_task,
    validate_prepared_task,
    validate_raw_task,
)
from tasks.tracking import (
    experiment_id,
    format_summary,
    resolve_tracking_uri,
    source_tags,
    summary_markdown,
    tag_dvc_record,
    tracked_run,
)


@flow(name="tdm-pipeline")
def tdm_pipeline(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    rounds: int | None = None,
    root: str = ".",
    tracking_uri: str | None = None,
) -> dict:
    """Run every round and return the summary (headline metrics per round, MLflow run ids,
    whether DVC recorded the outputs).

    Args:
        params: the params file.
        overrides: ``section.key=value`` overrides, as ``tdm --set``.
        rounds: overrides ``rounds.count`` when given.
        root: the folder the artefacts go to (``prepared/``, ``trees/``, ``models/``...).
        tracking_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<root>/mlflow.db``.
    """
    t0 = time.perf_counter()
    Path(root).mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(root, tracking_uri)
    cfg = config_task(params, overrides or [], rounds)
    tags = {**source_tags(Path(params).resolve().parent), "params": str(params)}
    summary: dict = {"rounds": [], "topk": cfg.eval.topk}
    with tracked_run(uri, "tdm-pipeline", root, tags=tags) as parent:
        log_config(parent, cfg)
        summary["mlflow"] = {
            "tracking_uri": uri,
            "parent_run_id": parent.run_id,
            "experiment_id": experiment_id(uri, root),
            "round_run_ids": [],
        }
        validate_raw_task(cfg, root, run=parent)  # a failure stops the flow here
        prepared = prepare_task(cfg, root)
        tree = init_tree_task(cfg, root, prepared, run=parent)
        validate_prepared_task(cfg, root, tree, run=parent)  # ... or here, before training
        previous_tree: str | None = None
        model: str | None = None
        round_runs = []
        for r in range(cfg.rounds.count):
            with tracked_run(uri, f"round-{r}", root, parent=parent, tags=tags) as run:
                round_runs.append(run)
                summary["mlflow"]["round_run_ids"].append(run.run_id)
                log_config(run, cfg, round=r)
                init_from = model if (r > 0 and cfg.rounds.warm_start) else None
                model = train_task(cfg, root, r, tree, init_from=init_from, run=run)
                row = evaluate_task(cfg, root, r, model, run=run, previous_tree=previous_tree)
                plot_data_task(root, r)
                embeddings = export_task(root, r, model)
                if r + 1 < cfg.rounds.count:
                    previous_tree, tree = tree, relearn_task(cfg, root, r, embeddings)
            summary["rounds"].append({**row, "run_id": run.run_id})
        plot_summary_task(root, cfg.rounds.count)
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
    """The metrics table, where the artefacts are, and how to open the Prefect and MLflow UIs."""
    mlflow_info = summary["mlflow"]
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
            f"metrics: {Path(root) / 'metrics'}/round_<r>.json; plot data: {Path(root) / 'plots'}/ "
            f"(`dvc plots show`); total {summary['seconds']} s",
            dvc_line,
            "",
            "Prefect UI: `make prefect-ui` (prefect server start --host 127.0.0.1 --port 4200), "
            "then http://127.0.0.1:4200/runs: this flow run, its task runs, logs and the "
            "tdm-pipeline-metrics artifact",
            f"MLflow UI:  `make mlflow-ui` (mlflow ui --backend-store-uri "
            f"{mlflow_info['tracking_uri']} --port 5000 --workers 1), then http://127.0.0.1:5000:"
            f" experiment tdm-pipeline, run {mlflow_info['parent_run_id']} and its rounds",
            "Trees side by side: `tdm compare-trees`",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Run the TDM rounds as a Prefect flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--root", default=".")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    summary = tdm_pipeline(
        params=args.params,
        overrides=args.overrides,
        rounds=args.rounds,
        root=args.root,
        tracking_uri=args.tracking_uri,
    )
    print(closing_text(summary, args.root))
    return summary


if __name__ == "__main__":
    main()
