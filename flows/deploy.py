"""Put the training flow ``tdm-train`` (``flows.train``) into a Prefect work pool.

With ``PREFECT_API_URL`` pointing at the Prefect server that the pipeline and the GPU machine
both reach:

    python -m flows.deploy --pool gpu                  # or: make deploy-train POOL=gpu

creates the work pool ``gpu`` (type ``process``) unless it exists, and the deployment
``tdm-train/gpu`` from this project's folder (``flow.from_source(<project>,
"flows/train.py:tdm_train").deploy(...)``: no image; a worker runs each flow run as a process
in that folder). On the GPU machine, in the project's environment and the same folder:

    prefect worker start --pool gpu

then ``python -m flows.pipeline --train-deployment tdm-train/gpu`` trains each round there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from uuid import UUID

PROJECT_DIR = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/train.py:tdm_train"
POOL_TYPE = "process"


def ensure_pool(name: str) -> bool:
    """Create the work pool ``name`` of type ``process`` (Prefect's default job template for it)
    unless a pool of that name exists. Returns whether it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type=POOL_TYPE,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="tdm-flow: GPU workers for the training step (tdm-train)",
            )
        )
    return True


def deploy_train(pool: str, name: str | None = None, source: str | Path = PROJECT_DIR) -> UUID:
    """Create (or update) the deployment ``tdm-train/<name>`` of ``flows.train.tdm_train`` in
    work pool ``pool``, from the project folder ``source``.

    A worker runs each flow run in ``source`` (the deployment's pull step sets the working
    directory), so that folder must exist under the same path on the worker's machine, with the
    project installed in the worker's Python environment.

    Args:
        pool: the work pool (created by ``ensure_pool`` if needed).
        name: the deployment's name; default the pool's.
        source: the project folder.
    Returns:
        The deployment's id.
    """
    from prefect import flow

    train = flow.from_source(source=str(Path(source).resolve()), entrypoint=ENTRYPOINT)
    return train.deploy(
        name=name or pool,
        work_pool_name=pool,
        description=(
            "One TDM training round (tdm.stages.train through tasks.steps.train_task), started "
            "by the tdm-pipeline flow with train_deployment set. root must be a folder the "
            "worker's machine shares under the same path."
        ),
        tags=["tdm", "train"],
        print_next_steps=False,
        ignore_warnings=True,  # a process pool without an image is the intent here
    )


def main(argv: list[str] | None = None) -> UUID:
    """``python -m flows.deploy --pool gpu``: the pool if missing, the deployment, and the
    commands for the worker and the pipeline. Without a Prefect server (``PREFECT_API_URL``
    unset or not answering) one line and exit status 2."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    parser = argparse.ArgumentParser(description="Deploy tdm-train to a Prefect work pool.")
    parser.add_argument("--pool", required=True, help="work pool (created as type process)")
    parser.add_argument("--name", default=None, help="deployment name (default: the pool's)")
    parser.add_argument(
        "--source", default=str(PROJECT_DIR), help="the project folder, as the worker sees it"
    )
    args = parser.parse_args(argv)
    if not PREFECT_API_URL.value():
        print(
            "flows.deploy: error: PREFECT_API_URL is not set: point it at the Prefect server "
            "that the pipeline and the worker use (e.g. http://127.0.0.1:4200/api)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        created = ensure_pool(args.pool)
    except httpx.ConnectError as exc:
        print(
            f"flows.deploy: error: no Prefect server at {PREFECT_API_URL.value()}: {exc}",
            file=sys.stderr,
        )
        sys.exit(2)
    deployment_id = deploy_train(args.pool, args.name, args.source)
    name = f"tdm-train/{args.name or args.pool}"
    print(
        "\n".join(
            [
                f"work pool {args.pool!r} ({POOL_TYPE}): {'created' if created else 'exists'}",
                f"deployment {name} ({deployment_id}) from {Path(args.source).resolve()}",
                "on the GPU machine (project installed, same folder, same PREFECT_API_URL):",
                f"    prefect worker start --pool {args.pool}",
                "then train each round there:",
                f"    python -m flows.pipeline --train-deployment {name}",
            ]
        )
    )
    return deployment_id


if __name__ == "__main__":
    main()
