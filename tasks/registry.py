"""The MLflow Model Registry around the rounds' models: register, promote, resolve.

- ``register(run, model_dir)``: the round's model as a version of the registered model ``tdm``
  (the pyfunc model of ``tasks.pyfunc``, logged under the run's ``recommender/`` unless the
  train task already did), tagged with its validation recall (``valid_recall``, the kept
  epoch's, from the folder's ``train_log.json``) and the model folder's manifest digest.
- ``promote(name, version)``: moves the alias ``champion`` to the version only when its
  validation recall beats the current champion's (strictly; the first version becomes champion).
  Validation users only: the test users stay unseen by every choice.
- ``resolve("models:/tdm/champion")``: the trained model folder of that version, downloaded once
  into a cache and checked against its manifest, with what the registry knows about it. ``tdm
  serve`` reaches it through the ``tdm.model_sources`` entry point ``models`` (pyproject.toml),
  so ``tdm/`` never imports MLflow.

Every function takes the tracking URI explicitly or from ``$MLFLOW_TRACKING_URI`` (else
``sqlite:///<cwd>/mlflow.db``, the pipeline's store); the registry is the tracking store's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdm.errors import TdmError

log = logging.getLogger(__name__)

MODEL_NAME = "tdm"
CHAMPION = "champion"
METRIC = "valid_recall"
ARTIFACT_PATH = "recommender"  # where tasks.steps.train_task logs the pyfunc model
MANIFEST_TAG = "manifest_digest"
CACHE_ENV = "TDM_MODEL_CACHE"
MODEL_ARTIFACT = "model_dir"  # tasks.pyfunc.MODEL_ARTIFACT (not imported: no mlflow.pyfunc here)
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<ref>[^/@]+)|@(?P<alias>[^/@]+))/?")


class RegistryError(TdmError, LookupError):
    """A registry URI that names no model version, or a version without a usable model."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/NAME/VERSION``, ``models:/NAME/ALIAS`` or ``models:/NAME@ALIAS``."""

    name: str
    version: str | None
    alias: str | None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        match = _URI.fullmatch(uri.strip())
        if match is None:
            raise RegistryError(
                f"{uri!r} is not models:/NAME/VERSION, models:/NAME/ALIAS or models:/NAME@ALIAS"
            )
        ref = match["ref"]
        if ref is not None and ref.isdigit():
            return cls(match["name"], ref, None)
        return cls(match["name"], None, ref or match["alias"])


def _client(tracking_uri: str | None):
    """``(MlflowClient, its tracking URI)`` for ``tracking_uri`` or the default store."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(".", tracking_uri)
    return MlflowClient(tracking_uri=uri), uri


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def validation_recall(model_dir: str | Path) -> float | None:
    """The kept epoch's validation Recall@M of a trained folder (``train_log.json``), or None
    when training had no validation users."""
    from tdm.paths import TRAIN_LOG_FILE

    path = Path(model_dir) / TRAIN_LOG_FILE
    if not path.is_file():
        return None
    train_log = json.loads(path.read_text())
    history = train_log.get("valid_recall") or []
    best = train_log.get("best_epoch", len(history) - 1)
    if not history or not 0 <= best < len(history):
        return None
    value = float(history[best])
    return value if math.isfinite(value) else None


def register(
    run,
    model_dir: str | Path,
    name: str = MODEL_NAME,
    artifact_path: str = ARTIFACT_PATH,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register the trained folder ``model_dir`` as a new version of ``name``.

    Args:
        run: the round's run (``tasks.tracking.RunRef``).
        model_dir: the trained model folder (``models/round_<r>``).
        name: the registered model (created when missing).
        artifact_path: where the run holds (or gets) the pyfunc model of ``tasks.pyfunc``;
            logged here when the run has no ``<artifact_path>/MLmodel`` yet.
        tags: more version tags.
    Returns:
        ``{"name", "version", "source", "run_id", "valid_recall", "manifest_digest"}``.
    """
    from mlflow.exceptions import MlflowException

    from tdm.io import manifest_digest

    client = run.client
    logged = {a.path for a in client.list_artifacts(run.run_id, artifact_path)}
    if f"{artifact_path}/MLmodel" not in logged:
        from tasks import pyfunc

        pyfunc.log(run, model_dir, artifact_path)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    recall = validation_recall(model_dir)
    digest = manifest_digest(model_dir)
    version_tags = {MANIFEST_TAG: digest, **(tags or {})}
    if recall is not None:
        version_tags[METRIC] = repr(recall)
    source = f"{client.get_run(run.run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run.run_id, tags=version_tags)
    log.info("registered %s version %s (validation recall %s)", name, version.version, recall)
    return {
        "name": name,
        "version": str(version.version),
        "source": source,
        "run_id": run.run_id,
        METRIC: recall,
        MANIFEST_TAG: digest,
    }


def _score(client, name: str, version, metric: str) -> float | None:
    """A version's ``metric``: its tag (``register``), else the value logged on its run."""
    value = version.tags.get(metric)
    if value is None and version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(metric)
    try:
        value = float(value) if value is not None else None
    except ValueError:
        log.warning(
            "%s version %s: tag %s=%r is not a number", name, version.version, metric, value
        )
        return None
    return value if value is not None and math.isfinite(value) else None


def promote(
    name: str,
    version: str | int,
    metric: str = METRIC,
    *,
    alias: str = CHAMPION,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Move ``alias`` to ``version`` when it beats the alias's current version on ``metric``.

    Args:
        name: the registered model.
        version: the candidate version.
        metric: the version tag (or run metric) compared, higher is better; default the
            validation recall that ``register`` records.
        alias: the alias moved.
        tracking_uri: the MLflow store; default ``$MLFLOW_TRACKING_URI`` or the local one.
    Returns:
        ``{"promoted": bool, "champion": version now under the alias, "previous": version
        before (None if none), "candidate_score", "champion_score", "reason"}``.
    """
    from mlflow.exceptions import MlflowException

    client, _ = _client(tracking_uri)
    try:
        candidate = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} version {version}: {_first_line(exc)}") from None
    candidate_score = _score(client, name, candidate, metric)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    previous = str(current.version) if current is not None else None
    out = {
        "promoted": False,
        "champion": previous,
        "previous": previous,
        "candidate_score": candidate_score,
        "champion_score": None,
    }
    if current is not None and str(current.version) == str(candidate.version):
        return {**out, "reason": f"version {candidate.version} is already {alias}"}
    if candidate_score is None:
        return {**out, "reason": f"version {candidate.version} has no {metric}"}
    if current is not None:
        champion_score = _score(client, name, current, metric)
        out["champion_score"] = champion_score
        if champion_score is not None and candidate_score <= champion_score:
            return {
                **out,
                "reason": f"{metric} {candidate_score:.6g} does not beat {alias} version "
                f"{current.version}'s {champion_score:.6g}",
            }
    client.set_registered_model_alias(name, alias, str(candidate.version))
    log.info("%s: alias %s -> version %s (%s %s)", name, alias, candidate.version, metric,
             candidate_score)  # fmt: skip
    reason = (
        f"first {alias}"
        if current is None
        else f"{metric} {candidate_score:.6g} beats version {current.version}'s "
        f"{out['champion_score']}"
    )
    return {**out, "promoted": True, "champion": str(candidate.version), "reason": reason}


def default_cache() -> Path:
    """``$TDM_MODEL_CACHE``, else ``~/.cache/tdm-flow/models``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "tdm-flow" / "models"


def resolve(
    uri: str, cache_dir: str | Path | None = None, tracking_uri: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The local model folder of a registry URI, downloaded once and manifest-checked.

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME/ALIAS`` or ``models:/NAME@ALIAS``.
        cache_dir: where versions are kept (``<cache>/<NAME>/<VERSION>/``); default
            ``default_cache()``. A cached version is reused while its manifest checks out.
        tracking_uri: the MLflow store; default ``$MLFLOW_TRACKING_URI`` or the local one.
    Returns:
        ``(folder, info)``: the trained model folder (``Recommender.load`` reads it) and
        ``{"source": uri, "name", "version", "alias", "run_id", "model_source",
        "valid_recall", "tags", "dvc": {...}}`` (the round run's ``dvc.*.md5`` tags).
    Raises:
        RegistryError: no such model, version or alias; a version without a tdm model.
        IntegrityError: the downloaded folder does not match its manifest.
    """
    import yaml
    from mlflow.exceptions import MlflowException

    from tdm.checkpoint import open_model_dir
    from tdm.io import atomic_dir, recover_dir

    ref = ModelRef.parse(uri)
    client, store = _client(tracking_uri)
    try:
        if ref.version is not None:
            version = client.get_model_version(ref.name, ref.version)
        else:
            version = client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {_first_line(exc)}") from None
    folder = Path(cache_dir or default_cache()) / ref.name / str(version.version)
    recover_dir(folder)
    if not _usable(folder):
        from mlflow.artifacts import download_artifacts

        from tasks.pyfunc import _no_progress_bar

        with atomic_dir(folder) as tmp, _no_progress_bar():
            try:
                mlmodel = download_artifacts(
                    artifact_uri=f"{version.source}/MLmodel", dst_path=str(tmp), tracking_uri=store
                )
                flavor = (yaml.safe_load(Path(mlmodel).read_text()) or {}).get("flavors", {})
                artifacts = (flavor.get("python_function") or {}).get("artifacts") or {}
                path = (artifacts.get(MODEL_ARTIFACT) or {}).get("path")
                if not path:
                    raise RegistryError(f"{uri}: version {version.version} holds no tdm model")
                local = download_artifacts(
                    artifact_uri=f"{version.source}/{path}",
                    dst_path=str(tmp / "download"),
                    tracking_uri=store,
                )
            except (MlflowException, OSError) as exc:
                raise RegistryError(
                    f"{uri}: cannot download version {version.version} from {version.source} "
                    f"({_first_line(exc)})"
                ) from None
            shutil.move(local, tmp / "model")
            shutil.rmtree(tmp / "download", ignore_errors=True)
            open_model_dir(tmp / "model")  # a download that does not check out is not kept
        _CHECKED[folder / "model"] = _stats(folder / "model")
    model_dir = folder / "model"
    run_tags: dict[str, str] = {}
    if version.run_id:
        try:
            run_tags = client.get_run(version.run_id).data.tags
        except MlflowException:
            run_tags = {}
    info = {
        "source": uri,
        "name": ref.name,
        "version": str(version.version),
        "alias": ref.alias,
        "aliases": list(getattr(version, "aliases", []) or []),
        "run_id": version.run_id,
        "model_source": version.source,
        METRIC: _score(client, ref.name, version, METRIC),
        "tags": dict(version.tags),
        "dvc": {k: v for k, v in run_tags.items() if k.startswith("dvc.")},
    }
    return model_dir, info


_CHECKED: dict[Path, tuple] = {}  # folder -> its files' stats when last checked (polling)


def _stats(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))


def _usable(folder: Path) -> bool:
    """A cached version whose model folder checks out against its manifest. The check hashes
    every file; it is repeated only when a file's size or time changed since the last check in
    this process (``tdm serve`` polling an alias resolves every few seconds)."""
    from tdm.checkpoint import open_model_dir

    model = folder / "model"
    if not model.is_dir():
        return False
    stats = _stats(model)
    if _CHECKED.get(model) == stats:
        return True
    try:
        open_model_dir(model)
    except (TdmError, OSError) as exc:
        log.warning("%s: cached model unusable (%s); downloading again", folder, exc)
        return False
    _CHECKED[model] = stats
    return True
