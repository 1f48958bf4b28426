"""``tdm`` sub-commands that live on the orchestration side.

The ``tdm`` command (``tdm.cli``) never imports ``tasks``: it finds these through the
``tdm.commands`` entry points of the installed package (pyproject.toml), so the algorithm package
does not depend on MLflow while ``tdm compare-trees`` still works. Each entry point is a
function ``register(subparsers, common)`` that adds one sub-parser whose ``handler(args)``
returns the exit status. Keep this module light: MLflow is imported when the command runs.
"""

from __future__ import annotations

import argparse


def compare_trees(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``tdm compare-trees``: the rounds (trees) of pipeline runs side by side, from MLflow."""
    help_ = "the rounds (trees) of pipeline runs side by side, from MLflow"
    p = subparsers.add_parser("compare-trees", parents=[common], help=help_, description=help_)
    p.add_argument("--tracking-uri", help="MLflow store (default sqlite:///<root>/mlflow.db)")
    p.add_argument("--run", help="a pipeline (parent) run id; default the newest runs")
    p.add_argument("-n", type=int, default=1, help="how many of the newest pipeline runs")
    p.set_defaults(handler=_compare_trees)


def _compare_trees(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from tasks.tracking import compare_trees as table
    from tasks.tracking import resolve_tracking_uri
    from tdm.cli import CommandError

    try:
        print(table(resolve_tracking_uri(args.root, args.tracking_uri), args.run, args.n))
    except (ValueError, MlflowException) as exc:  # no experiment, no such run
        raise CommandError(str(exc).splitlines()[0]) from None
    return 0
