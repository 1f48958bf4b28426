"""Record what a flow run wrote in DVC, and read back what DVC recorded.

The Prefect flow and ``dvc repro`` run the same stage functions and write the same files at the
same paths. So when the flow ran in a DVC project on the project's own ``params.yaml`` (no
overrides), ``dvc commit`` records its outputs exactly as ``dvc repro`` would have: dvc.lock gets
their hashes, the cache their bytes; afterwards ``dvc status`` is clean and ``dvc push`` ships
data, trees and models. A run with overrides is not recorded: dvc.lock would claim params that
did not produce the files.

DVC runs as a subprocess (``python -m dvc``, the interpreter of this process): no DVC import in
the flow's process, no dependence on ``PATH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tdm.config import Config, load_config
from tdm.io import file_digest

LOCK_FILE = "dvc.lock"


class DvcError(RuntimeError):
    """A DVC command that failed; the message carries its output."""


@dataclass
class DvcRecord:
    """What ``record`` did: ``recorded`` and why not, the md5 of dvc.lock and of every output
    DVC lists (``path -> md5``; a folder's md5 ends in ``.dir``)."""

    recorded: bool
    reason: str = ""
    lock_md5: str | None = None
    outs: dict[str, str] = field(default_factory=dict)


def is_dvc_project(root: str | Path) -> bool:
    root = Path(root)
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def run_dvc(root: str | Path, *args: str, timeout: float = 600) -> str:
    """Run ``dvc <args>`` in ``root``; returns its output, raises DvcError on failure."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise DvcError(f"dvc {' '.join(args)} failed in {root}:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes: what DVC 3 records for a file output."""
    return file_digest(path, "md5")


def locked_outs(root: str | Path) -> dict[str, str]:
    """``path -> md5`` of every output in ``dvc.lock`` and in the ``*.dvc`` files at ``root``."""
    root = Path(root)
    outs: dict[str, str] = {}
    entries = []
    lock = root / LOCK_FILE
    if lock.exists():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            entries += stage.get("outs") or []
    for dvc_file in sorted(p for p in root.glob("*.dvc") if p.is_file()):
        entries += (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    for entry in entries:
        if entry.get("md5"):
            outs[entry["path"]] = entry["md5"]
    return outs


def dvc_rounds(root: str | Path) -> int:
    """How many rounds ``dvc.yaml`` runs: round 0 plus its ``later_rounds`` var."""
    spec = yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}
    for entry in spec.get("vars") or []:
        if isinstance(entry, dict) and "later_rounds" in entry:
            return 1 + len(entry["later_rounds"] or {})
    raise ValueError(f"{Path(root) / 'dvc.yaml'}: no `later_rounds` in vars")


def unrecordable(cfg: Config, params: str | Path, root: str | Path) -> str:
    """Why the run's outputs cannot be recorded in DVC, or ``""`` when they can."""
    root = Path(root)
    if not is_dvc_project(root):
        return f"{root.resolve()} is not a DVC project (no .dvc/ and dvc.yaml)"
    if Path(params).resolve() != (root / "params.yaml").resolve():
        return f"params {params} is not the DVC project's params.yaml"
    if cfg != load_config(params):
        return "the run used overrides that are not in params.yaml"
    if dvc_rounds(root) != cfg.rounds.count:
        # committing would record another run's leftovers (or miss rounds) as this run's
        return f"dvc.yaml runs {dvc_rounds(root)} rounds, rounds.count is {cfg.rounds.count}"
    return ""


def record(cfg: Config, params: str | Path, root: str | Path) -> DvcRecord:
    """``dvc commit`` the outputs of a flow run that used ``params`` unchanged in DVC project
    ``root``; otherwise record nothing and say why.

    Returns:
        The record, with the hashes now in dvc.lock when ``recorded``.
    Raises:
        DvcError: the commit failed (e.g. dvc.yaml lists rounds the run did not produce).
    """
    reason = unrecordable(cfg, params, root)
    if reason:
        return DvcRecord(recorded=False, reason=reason)
    run_dvc(root, "commit", "--force", "--quiet")
    lock = Path(root) / LOCK_FILE
    return DvcRecord(recorded=True, lock_md5=file_md5(lock), outs=locked_outs(root))
