"""Where a served model comes from: a local model folder or a URI such as
``models:/tdm/champion``.

A URI's scheme names a resolver among the ``tdm.model_sources`` entry points of the installed
packages (pyproject.toml: ``models = "tasks.registry:resolve"``, the MLflow Model Registry), so
``tdm`` itself never imports MLflow. A resolver is ``resolve(uri) -> (folder, info)``: a local,
manifest-checked model folder and what it knows about it (``version``, ``run_id``, ...).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tdm.errors import TdmError

log = logging.getLogger(__name__)

SOURCES = "tdm.model_sources"  # entry points: scheme -> resolve(uri) -> (folder, info)
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):/")


class SourceError(TdmError, LookupError):
    """A model source that names no loadable model."""


def scheme(source: str) -> str | None:
    """The URI scheme of ``source`` (``models`` of ``models:/tdm/1``), None for a path."""
    match = _SCHEME.match(source)
    return match["scheme"].lower() if match and len(match["scheme"]) > 1 else None


def resolvers() -> dict[str, Any]:
    """The installed resolvers by scheme (loaded lazily by the caller)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=SOURCES)}


def resolve(source: str, root: str | Path = ".") -> tuple[Path, dict[str, Any]]:
    """The local model folder of ``source`` and what is known about it.

    Args:
        source: a model folder (relative to ``root`` unless absolute) or a URI whose scheme has
            a resolver (``models:/NAME/ALIAS|VERSION``).
        root: the project root (relative folders, ``dvc.lock``).
    Returns:
        ``(folder, info)``; ``info`` holds at least ``source`` and, for a folder, the DVC hash
        of the folder when ``<root>/dvc.lock`` records it.
    Raises:
        SourceError: a scheme without a resolver.
    """
    kind = scheme(source)
    if kind is None or kind == "file":
        path = Path(source[len("file://") :] if kind == "file" else source)
        folder = path if path.is_absolute() else Path(root) / path
        return folder, {"source": source, **_dvc_info(folder, Path(root))}
    found = resolvers().get(kind)
    if found is None:
        raise SourceError(
            f"{source}: no resolver for {kind}:/ URIs (installed: "
            f"{', '.join(sorted(resolvers())) or 'none'}; models:/ needs tdm-flow[mlops])"
        )
    folder, info = found.load()(source)
    return Path(folder), {"source": source, **info}


def _dvc_info(folder: Path, root: Path) -> dict[str, Any]:
    """``{"dvc": {"model.md5": ...}}`` when ``root/dvc.lock`` lists ``folder`` as an output."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        relative = folder.resolve().relative_to(root.resolve()).as_posix()
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except (ValueError, OSError, yaml.YAMLError):
        return {}
    for stage in stages.values():
        for out in stage.get("outs") or []:
            if out.get("path") == relative and out.get("md5"):
                return {"dvc": {"model.md5": out["md5"]}}
    return {}
