"""Serve the pipeline flow as a deployment, so a person can start it from the Prefect UI.

With a Prefect server running (``make prefect-ui``) and ``PREFECT_API_URL`` pointing at it:

    python -m flows.serve --name tdm

registers the deployment ``tdm-pipeline/tdm`` and runs the flow runs the UI (Deployments -> Run,
with editable parameters) or ``prefect deployment run 'tdm-pipeline/tdm' --watch`` create.
A run with ``overrides`` (or ``rounds``) writes to ``<root>/runs/<flow run name>/``, leaving the
outputs DVC recorded in ``<root>`` as they are; two runs on one folder do not start together.
``--train-deployment tdm-train/gpu`` makes training on a GPU worker the default of its runs
(``flows.train``; the parameter ``train_deployment`` stays editable per run).
"""

from __future__ import annotations

import argparse

from flows.pipeline import tdm_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the TDM pipeline flow as a deployment.")
    parser.add_argument("--name", default="tdm", help="deployment name")
    parser.add_argument("--params", default="params.yaml", help="default params file")
    parser.add_argument("--root", default=".", help="default artefact folder")
    parser.add_argument(
        "--train-deployment",
        default=None,
        help="default deployment to train each round on, e.g. tdm-train/gpu (flows.deploy)",
    )
    args = parser.parse_args(argv)
    defaults = {"params": args.params, "root": args.root}
    if args.train_deployment:
        defaults["train_deployment"] = args.train_deployment
    tdm_pipeline.serve(
        name=args.name,
        parameters=defaults,
        description=(
            "TDM rounds: GX validation, prepare, tree init, train/evaluate/relearn. With "
            "overrides, the files go to <root>/runs/<flow run name>/."
        ),
    )


if __name__ == "__main__":
    main()
