"""A trained TDM as an MLflow ``python_function`` model, so a round's model loads back from
MLflow (``mlflow.pyfunc.load_model``) and recommends exactly what ``tdm.Recommender`` does.

The MLflow model holds the whole model folder (weights, tree, items, feature metadata) as an
artefact and the ``tdm`` and ``tasks`` source as code, so loading it needs no checkout. It is
saved as MLflow "models from code" (``tasks/pyfunc_model.py``), not pickled.

Input: one row per behaviour, columns ``user`` (any id grouping a history; optional: one
history), ``item_id`` and ``timestamp`` (optional). Params: ``k`` (10), ``exclude_seen`` (true).
Output: ``user``, ``rank`` (0 = best), ``item_id``, ``score``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

MODEL_ARTIFACT = "model_dir"
DEFAULT_K = 10


class TDMRecommenderModel(mlflow.pyfunc.PythonModel):
    """``tdm.Recommender`` behind MLflow's pyfunc interface (CPU scoring)."""

    def load_context(self, context) -> None:
        from tdm.recommender import Recommender

        self.recommender = Recommender.load(context.artifacts[MODEL_ARTIFACT], device="cpu")

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        params = params or {}
        k = int(params.get("k", DEFAULT_K))
        exclude_seen = bool(params.get("exclude_seen", True))
        frame = pd.DataFrame(model_input)
        if "user" not in frame.columns:
            frame = frame.assign(user=0)
        columns = ["item_id", "timestamp"] if "timestamp" in frame.columns else ["item_id"]
        rows = []
        for user, history in frame.groupby("user", sort=False):
            items, scores = self.recommender.recommend(history[columns], k, exclude_seen)
            rows += [
                (user, rank, int(item), float(score))
                for rank, (item, score) in enumerate(zip(items, scores, strict=True))
            ]
        return pd.DataFrame(rows, columns=["user", "rank", "item_id", "score"])


def signature():
    """Input columns and ``k``/``exclude_seen`` params (so ``predict(params=...)`` is accepted)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("long", "user", required=False),
            ColSpec("long", "item_id"),
            ColSpec("long", "timestamp", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("long", "user"),
            ColSpec("long", "rank"),
            ColSpec("long", "item_id"),
            ColSpec("double", "score"),
        ]
    )
    params = ParamSchema(
        [ParamSpec("k", "long", DEFAULT_K), ParamSpec("exclude_seen", "boolean", True)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def requirements() -> list[str]:
    """Pinned to what is installed: no pip resolution or inference when logging (seconds)."""
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}"
        for name in ("mlflow", "torch", "numpy", "pandas", "pyarrow", "pyyaml")
    ]


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    """No "Downloading artifacts" bar in the task log while MLflow copies the model folder."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def save(model_dir: str | Path, path: str | Path) -> Path:
    """Write the MLflow model of the trained folder ``model_dir`` to the new folder ``path``."""
    import tasks
    import tdm

    with tempfile.TemporaryDirectory(prefix="tdm-mlflow-code-") as code:
        packages = []
        for package in (tdm, tasks):
            source = Path(package.__file__).parent
            packages.append(str(Path(code) / source.name))
            shutil.copytree(source, packages[-1], ignore=shutil.ignore_patterns("__pycache__"))
        with warnings.catch_warnings(), _no_progress_bar():
            # an input example would cost a model load per round; the signature is explicit
            warnings.filterwarnings("ignore", message=".*input example.*")
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
            mlflow.pyfunc.save_model(
                path=str(path),
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={MODEL_ARTIFACT: str(model_dir)},
                code_paths=packages,
                signature=signature(),
                pip_requirements=requirements(),
            )
    return Path(path)


def log(run, model_dir: str | Path, artifact_path: str = "model") -> str:
    """Log the trained folder ``model_dir`` as an MLflow model under ``artifact_path`` of ``run``
    (a ``tasks.tracking.RunRef``). Returns the ``runs:/<run_id>/<artifact_path>`` URI."""
    with tempfile.TemporaryDirectory(prefix="tdm-mlflow-model-") as tmp:
        local = save(model_dir, Path(tmp) / artifact_path)
        run.client.log_artifacts(run.run_id, str(local), artifact_path)
    return f"runs:/{run.run_id}/{artifact_path}"
