"""Small MLflow helpers for the Prefect tasks and flows.

Every helper takes the tracking URI and run id explicitly (``MlflowClient``), so logging does not
depend on MLflow's thread-local active run, whichever thread Prefect runs a task in.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

EXPERIMENT = "tdm-pipeline"
PARENT_TAG = "mlflow.parentRunId"
MLFLOW_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`
# MLflow 3's UI shows an experiment as "GenAI apps & agents" (traces) or "Machine learning"
# (runs). The experiment tag below records the kind (the UI's own "experiment type" setting
# writes it); MLflow 3.17's UI decides by its workflow switch, which a link sets with
# ``?workflowType=machine_learning`` (both read from its bundled JS, ``mlflow/server/js``).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_VIEW = "workflowType=machine_learning"
ARTEFACT_ROOT = "artefact_root"  # parent-run tag and param: the folder the run's files went to
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch call


def resolve_tracking_uri(root: str | Path, tracking_uri: str | None = None) -> str:
    """The flow parameter, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class RunRef:
    """A run to log to: what a task needs, and nothing Prefect cannot serialise."""

    tracking_uri: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def experiment_id(tracking_uri: str, root: str | Path, name: str = EXPERIMENT) -> str:
    """The experiment ``name``, created if missing, of the model-training kind (tagged
    ``mlflow.experimentKind``, also on an older experiment without the tag); a local store
    keeps its artefacts under ``<root>/mlartifacts`` rather than in the working directory."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if tracking_uri.startswith(("sqlite:", "file:")):
        location = (Path(root).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


@contextmanager
def tracked_run(
    tracking_uri: str,
    name: str,
    root: str | Path = ".",
    parent: RunRef | None = None,
    tags: dict[str, str] | None = None,
    experiment: str = EXPERIMENT,
) -> Iterator[RunRef]:
    """Create a run in ``experiment`` (nested under ``parent`` when given) and end it FINISHED,
    or FAILED when the body raises."""
    client = MlflowClient(tracking_uri=tracking_uri)
    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent is not None:
        all_tags[PARENT_TAG] = parent.run_id
    run = client.create_run(
        experiment_id(tracking_uri, root, experiment), tags=all_tags, run_name=name
    )
    ref = RunRef(tracking_uri, run.info.run_id)
    try:
        yield ref
    except BaseException:
        client.set_terminated(ref.run_id, status="FAILED")
        raise
    client.set_terminated(ref.run_id, status="FINISHED")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_params(run: RunRef, params: dict[str, Any]) -> None:
    """Log a nested mapping (e.g. ``cfg.to_dict()``) as dotted params."""
    items = [Param(k, str(v)) for k, v in flatten(params).items()]
    client = run.client
    for start in range(0, len(items), _BATCH):
        client.log_batch(run.run_id, params=items[start : start + _BATCH])


def log_metrics(run: RunRef, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite numeric values in one batch."""
    import time

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and float(v) == float(v)  # drops NaN
    ]
    if items:
        run.client.log_batch(run.run_id, metrics=items)


def level_key(prefix: str, level: int) -> str:
    """``<prefix>.level_NN``, zero-padded so that the levels sort (``level_02`` < ``level_10``)."""
    return f"{prefix}.level_{int(level):02d}"


def metric_values(report: dict) -> dict[str, float]:
    """The evaluation report as flat metrics: ``tdm.none.recall``,
    ``most_popular.items.precision``, ``layerwise.beam.level_NN``..."""
    out: dict[str, float] = {}
    for who in ("tdm", "most_popular"):
        for mode, values in report.get(who, {}).items():
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    out[f"{who}.{mode}.{name}"] = value
    layerwise = report.get("layerwise_recall") or {}
    for kind in ("beam", "brute_force"):
        for level, value in zip(layerwise.get("level", []), layerwise.get(kind, []), strict=False):
            out[level_key(f"layerwise.{kind}", level)] = value
    if "retrieval_seconds" in report:
        out["retrieval_seconds"] = report["retrieval_seconds"]
    return out


def headline_metrics(row: dict) -> dict[str, float]:
    """A round's headline row (``tdm/none/recall``..., as ``evaluate_task`` returns it) as metric
    names (``tdm.none.recall``...): TDM and most-popular Precision/Recall@M per filter mode."""
    return {
        key.replace("/", "."): value
        for key, value in row.items()
        if key.count("/") == 2 and key.split("/")[0] in ("tdm", "most_popular")
    }


def log_tree(
    run: RunRef,
    tree_path: Path,
    stats: dict,
    previous_tree: Path | None = None,
    first_round: bool = False,
) -> dict[str, float]:
    """Tree figures as metrics (``tree.depth``, ``tree.n_nodes``, ``tree.purity.level_NN``,
    ``tree.moved_fraction`` vs ``previous_tree``, 0 for the ``first_round``'s tree, and on
    generated data ``tree.truth.<grouping>_<figure>``, see ``truth_metrics``), the level sizes
    as a JSON artefact and the tree file itself under ``tree/``."""
    from tdm.tree import Tree
    from tdm.tree_build import moved_fraction

    figures = {
        f"tree.{k}": stats[k]
        for k in ("depth", "n_nodes", "n_items", "mean_fanout", "min_leaf_depth", "max_leaf_depth")
        if k in stats
    }
    for level, purity in enumerate(stats.get("category_purity", [])):
        figures[level_key("tree.purity", level)] = purity
    figures.update(truth_metrics(stats))
    if first_round:  # the initial tree: nothing moved yet
        figures["tree.moved_fraction"] = 0.0
    elif previous_tree is not None and Path(previous_tree).exists():
        figures["tree.moved_fraction"] = moved_fraction(
            Tree.load(previous_tree), Tree.load(tree_path)
        )
    log_metrics(run, figures)
    client = run.client
    client.log_dict(run.run_id, stats, "tree/stats.json")
    client.log_dict(run.run_id, {"level_sizes": stats.get("level_sizes", [])}, "tree/levels.json")
    client.log_artifact(run.run_id, str(tree_path), "tree")
    from tasks.versioning import file_md5

    client.set_tag(run.run_id, "tree.md5", file_md5(tree_path))
    return figures


TRUTH_FIGURES = ("purity", "nmi", "level")


def truth_metrics(stats: dict) -> dict[str, float]:
    """The tree-vs-truth report of ``tdm.stages.tree_report`` (``truth``, on data the synthetic
    generator made) as metrics ``tree.truth.<grouping>_<purity|nmi|level>``, e.g.
    ``tree.truth.category_nmi``, ``tree.truth.department_purity``; none without a truth."""
    return {
        f"tree.truth.{grouping}_{figure}": report[figure]
        for grouping, report in sorted((stats.get("truth") or {}).items())
        for figure in TRUTH_FIGURES
        if figure in report
    }


def log_file(run: RunRef, path: Path, folder: str | None = None) -> None:
    """Upload one file as a run artefact."""
    run.client.log_artifact(run.run_id, str(path), folder)


def log_figure(run: RunRef, draw, data: Any, name: str, folder: str = "plots", **kwargs) -> None:
    """Draw ``draw(data, path, **kwargs)`` (a ``tasks.figures`` function) into a temporary PNG
    and upload it as ``<folder>/<name>``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tdm-figure-") as tmp:
        run.client.log_artifact(run.run_id, str(draw(data, Path(tmp) / name, **kwargs)), folder)


def tag_dvc_record(
    parent: RunRef, round_runs: list[RunRef], record: dict, root: str | Path = "."
) -> None:
    """Tag the runs with the DVC revision of what they produced, so each tree, model and
    embedding file can be checked out again with DVC: on the parent ``dvc.recorded``,
    ``dvc.lock.md5`` (and ``dvc.lock`` itself as an artefact), ``dvc.prepared.md5``; on round
    ``r``'s run ``dvc.tree.md5``, ``dvc.model.md5``, ``dvc.embeddings.md5`` as dvc.lock lists
    them (the md5 is the file's name in the DVC cache and remote)."""
    from tdm.paths import Paths

    client = parent.client
    client.set_tag(parent.run_id, "dvc.recorded", str(record["recorded"]).lower())
    if not record["recorded"]:
        client.set_tag(parent.run_id, "dvc.not_recorded_because", record["reason"][:5000])
        return
    outs = record["outs"]
    client.set_tag(parent.run_id, "dvc.lock.md5", record["lock_md5"])
    if "prepared" in outs:
        client.set_tag(parent.run_id, "dvc.prepared.md5", outs["prepared"])
    client.log_artifact(parent.run_id, str(Path(root) / "dvc.lock"), "dvc")
    rel = Paths(Path("."))
    for r, run in enumerate(round_runs):
        for name, path in (
            ("tree", rel.tree(r)),
            ("model", rel.model(r)),
            ("embeddings", rel.embeddings(r)),
        ):
            if path.as_posix() in outs:
                client.set_tag(run.run_id, f"dvc.{name}.md5", outs[path.as_posix()])


def source_tags(project_dir: str | Path) -> dict[str, str]:
    """``git.commit`` (``git rev-parse HEAD``) and ``data.md5`` (from ``data.dvc``) when found."""
    project_dir = Path(project_dir)
    tags: dict[str, str] = {}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if commit:
            tags["git.commit"] = commit
            tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    dvc_file = project_dir / "data.dvc"
    if dvc_file.exists():
        import yaml

        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
            md5 = next((o.get("md5") for o in outs if o.get("md5")), None)
        except yaml.YAMLError:
            md5 = None
        if md5:
            tags["data.md5"] = str(md5)
    return tags


def summary_markdown(summary: dict) -> str:
    """The rounds' Precision/Recall@M per filter mode, TDM vs most-popular, plus the run ids."""
    rows = summary["rounds"]
    topk = summary.get("topk", "M")
    modes = [k.split("/")[1] for k in rows[0] if k.startswith("tdm/") and k.endswith("/recall")]
    head = ["round", "method"] + [f"{m} P@{topk} / R@{topk}" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for who, label in (("tdm", "TDM"), ("most_popular", "most-popular")):
            cells = [
                f"{100 * row[f'{who}/{m}/precision']:.2f}% / {100 * row[f'{who}/{m}/recall']:.2f}%"
                for m in modes
            ]
            lines.append("| " + " | ".join([str(row["round"]), label, *cells]) + " |")
    mlflow_info = summary.get("mlflow", {})
    if summary.get(ARTEFACT_ROOT):
        lines += ["", f"Artefacts (trees, models, metrics): `{summary[ARTEFACT_ROOT]}`"]
    lines += [
        "",
        f"MLflow tracking URI: `{mlflow_info.get('tracking_uri', '')}` "
        f"(`make mlflow-ui`, then the links below)",
        f"- parent run: {_run_link(mlflow_info, mlflow_info.get('parent_run_id', ''))}",
    ]
    for r, run_id in enumerate(mlflow_info.get("round_run_ids", [])):
        lines.append(f"- round {r} run: {_run_link(mlflow_info, run_id)}")
    dvc = summary.get("dvc")
    if dvc:
        recorded = (
            f"recorded, dvc.lock md5 `{dvc['lock_md5']}`"
            if dvc["recorded"]
            else f"not recorded ({dvc['reason']})"
        )
        lines += ["", f"DVC: {recorded}"]
    return "\n".join(lines)


def run_url(experiment: str, run_id: str) -> str:
    """The run's page in the local MLflow UI (``make mlflow-ui``), in its model-training view."""
    return f"{MLFLOW_UI}/#/experiments/{experiment}/runs/{run_id}?{UI_VIEW}"


def _run_link(mlflow_info: dict, run_id: str) -> str:
    """A markdown link to the run in the local MLflow UI: plain text, as a code span inside a
    link shows its backticks in Prefect's UI."""
    exp = mlflow_info.get("experiment_id")
    if not exp:
        return f"`{run_id}`"
    return f"[{run_id}]({run_url(exp, run_id)})"


def format_summary(summary: dict) -> str:
    """The rounds' Precision/Recall@M per filter mode as a plain-text table (``tdm pipeline``'s)."""
    from tdm.cli import format_rounds

    return format_rounds(summary, summary.get("topk", "M"))


TREE_COLUMNS = (
    ("tree.depth", "depth", "{:.0f}"),
    ("tree.n_nodes", "nodes", "{:.0f}"),
    ("tree.moved_fraction", "moved", "{:.3f}"),
    ("tree.purity.level_03", "purity@3", "{:.3f}"),
    ("tree.truth.category_purity", "cat.purity", "{:.3f}"),
    ("tree.truth.category_nmi", "cat.NMI", "{:.3f}"),
    ("tree.truth.department_purity", "dept.purity", "{:.3f}"),
    ("tree.truth.department_nmi", "dept.NMI", "{:.3f}"),
    ("tdm.none.precision", "P", "{:.2%}"),
    ("tdm.none.recall", "R", "{:.2%}"),
    ("tdm.items.recall", "R items", "{:.2%}"),
    ("most_popular.none.recall", "R popular", "{:.2%}"),
)


def compare_trees(tracking_uri: str, run_id: str | None = None, n_runs: int = 1) -> str:
    """A table of the rounds (trees) of pipeline runs from MLflow, newest runs first: the tree's
    shape, how much it moved, its purity against the data's categories (level 3) and, on data
    the synthetic generator made, against the true categories and departments (``cat.*``,
    ``dept.*``: purity and NMI at the level closest to the number of groups; "-" elsewhere),
    then TDM's and most-popular's precision and recall.

    Args:
        tracking_uri: the MLflow store.
        run_id: a parent (pipeline) run; default the newest ``n_runs`` parent runs.
        n_runs: how many parent runs when ``run_id`` is not given.
    Returns:
        The table as text, one row per (pipeline run, round).
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise ValueError(f"{tracking_uri}: no '{EXPERIMENT}' experiment (run the flow first)")
    if run_id is not None:
        parents = [client.get_run(run_id)]
    else:
        runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
        parents = [r for r in runs if PARENT_TAG not in r.data.tags][:n_runs]
    head = ["run", "round"] + [label for _, label, _ in TREE_COLUMNS]
    rows = []
    for parent in parents:
        children = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        )
        for child in sorted(children, key=lambda c: int(c.data.params.get("round", 0))):
            metrics = child.data.metrics
            cells = [
                fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in TREE_COLUMNS
            ]
            rows.append([parent.info.run_id[:8], child.data.params.get("round", "?"), *cells])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    lines = [
        "  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)) for r in [head, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
