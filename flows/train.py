"""One training round as its own Prefect flow, ``tdm-train``, so that a Prefect work pool and its
worker place the GPU step on a GPU machine while the rest of the pipeline runs elsewhere.

``tdm_train`` is the pipeline's training step on its own: the same stage function through
``tasks.steps.train_task``, writing ``<root>/models/round_<r>`` and logging per-epoch loss,
validation recall, the loss curve and the pyfunc model to the pipeline's MLflow round run (its
tracking URI and run id come in as plain parameters). It takes no lock: the pipeline that starts
it holds the lock of ``root`` for the whole run.

``python -m flows.deploy --pool gpu`` puts it into the work pool ``gpu`` as deployment
``tdm-train/gpu``; ``prefect worker start --pool gpu`` on the GPU machine runs its flow runs;
``python -m flows.pipeline --train-deployment tdm-train/gpu`` trains every round there
(``train_on_deployment``). ``root`` and the MLflow store must be reachable under the same paths
from both machines (a shared file system, an MLflow server).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.steps import (
    TrainingDeploymentError,
    config_task,
    fails_readably,
    run_logger,
    train_task,
)
from tasks.tracking import RunRef, resolve_tracking_uri
from tdm.paths import Paths

POLL_SECONDS = 2.0  # how often the pipeline reads the state of a training flow run


@flow(name="tdm-train")
@fails_readably
def tdm_train(
    params: str,
    root: str,
    round: int,
    tree: str,
    overrides: list[str] | None = None,
    init_from: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> str:
    """Train round ``round`` on ``tree`` -> ``<root>/models/round_<round>``.

    Args:
        params: the params file, as the pipeline read it.
        root: the pipeline's artefact folder (``prepared/`` is read from it, the model written
            to it); the same path on this machine as on the pipeline's.
        round: the round (names the model folder and the task run).
        tree: the tree file to train on.
        overrides: ``section.key=value`` overrides, as the pipeline's (``rounds.count`` too).
        init_from: a model folder to warm-start from (Sec. 3.5), or None.
        tracking_uri: the MLflow tracking URI of ``run_id``; default as the pipeline's
            (``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``).
        run_id: the MLflow round run to log to; None logs nothing to MLflow.
    Returns:
        The model folder; on bad input (``tasks.steps.expected_errors``) a ``Failed`` state whose
        message is the error's one line.
    """
    cfg = config_task(params, overrides)
    run = RunRef(resolve_tracking_uri(root, tracking_uri), run_id) if run_id else None
    return train_task(cfg, root, round, tree, init_from=init_from, run=run)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "the in-process (ephemeral) API: set PREFECT_API_URL"


def check_train_deployment(name: str) -> str:
    """The work pool of deployment ``name`` (``"tdm-train/gpu"``); logs whether a worker of it
    is online (flow runs wait for one).

    Raises:
        TrainingDeploymentError: no such deployment on this Prefect API.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise TrainingDeploymentError(
                f"train_deployment {name!r}: no such deployment on {_api_url()}; create it with "
                "`python -m flows.deploy --pool <pool>` against the server this flow uses"
            ) from None
        pool = deployment.work_pool_name or ""
        online = (
            client.read_workers_for_work_pool(
                pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
            )
            if pool
            else []
        )
    logger = run_logger()
    logger.info("training each round as a flow run of %s (work pool %r)", name, pool)
    if not online:
        logger.warning(
            "no worker of work pool %r is online: the training flow runs wait until one starts "
            "(`prefect worker start --pool %s` on the GPU machine)",
            pool,
            pool,
        )
    return pool


def train_on_deployment(
    deployment: str,
    params: str,
    overrides: list[str],
    root: str,
    round_: int,
    tree: str,
    init_from: str | None = None,
    run: RunRef | None = None,
    name: str | None = None,
) -> tuple[str, str]:
    """Train one round as a flow run of ``deployment`` (``tdm_train``) and wait for it.

    Paths go out resolved, so the worker's flow run finds them when ``root`` is shared under
    the same path. Inside a flow run, the training run is linked to it as a subflow (Prefect's
    ``run_deployment``). The MLflow round ``run`` is tagged with the training flow run's id.

    Args:
        deployment: ``"<flow>/<deployment>"``, e.g. ``"tdm-train/gpu"``.
        params, overrides, root, round_, tree, init_from: as ``tdm_train``'s.
        run: the MLflow round run the training logs to.
        name: the training flow run's name; default Prefect's.
    Returns:
        ``(model folder, training flow run id)``; the model folder as ``train_task`` returns it.
    Raises:
        TrainingDeploymentError: the flow run ended in another state than Completed (failed,
            crashed, cancelled), or completed without the model folder showing up here.
    """
    from prefect.deployments import run_deployment

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path else None

    parameters = {
        "params": absolute(params),
        "root": absolute(root),
        "round": round_,
        "tree": absolute(tree),
        "overrides": list(overrides),
        "init_from": absolute(init_from),
        "tracking_uri": run.tracking_uri if run else None,
        "run_id": run.run_id if run else None,
    }
    logger = run_logger()
    flow_run = run_deployment(
        deployment, parameters=parameters, flow_run_name=name, poll_interval=POLL_SECONDS
    )
    if run is not None:
        run.client.set_tag(run.run_id, "prefect.train_flow_run_id", str(flow_run.id))
        run.client.set_tag(run.run_id, "prefect.train_deployment", deployment)
    state = flow_run.state
    pool = flow_run.work_pool_name
    where = f"training flow run {flow_run.name!r} of {deployment} (work pool {pool!r})"
    if state is None or not state.is_completed():
        what = state.name if state is not None else "no state"
        message = " ".join((state.message or "").split()) if state is not None else ""
        raise TrainingDeploymentError(
            f"round {round_}: {where} ended {what}" + (f": {message}" if message else "")
        )
    model = Paths(Path(root)).model(round_)
    if not model.is_dir():
        raise TrainingDeploymentError(
            f"round {round_}: {where} completed, but {model.resolve()} is not here: the root "
            "must be a folder both machines share under the same path"
        )
    logger.info("round %d: trained by %s", round_, where)
    return str(model), str(flow_run.id)
