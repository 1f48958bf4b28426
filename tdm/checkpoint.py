"""Model files and training checkpoints.

- A *model file* (``save_model``/``load_checkpoint``) holds the weights with the ModelConfig that
  rebuilds them (nanoGPT's ``model_args``), so a model loads from the file alone. A file names
  its model class, but never chooses code to import: a built-in name, or a custom
  ``pkg.module:Class`` only when the caller's own params name the same class.
- A *checkpoint folder* (``Checkpointer``) holds the state of an unfinished training run after
  each epoch: weights, optimizer, grad scaler, losses, and the state of the epoch callback (the
  validation monitor). It also holds the run's *fingerprint*: everything that determines
  training (the params it reads and the hashes of the prepared data, the tree and the model it
  warm-started from). A run resumes only from a checkpoint with the same fingerprint; otherwise
  it says what differs and starts fresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdm.config import MODEL_NAMES, Config, ModelConfig
from tdm.errors import TdmError
from tdm.io import save_torch
from tdm.paths import MODEL_FILE, TREE_FILE

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
LAST = "last.pt"


class CheckpointError(TdmError, ValueError):
    """A model or checkpoint file that cannot be used: corrupt, foreign, or naming code that the
    caller did not ask for."""


def model_meta(model: nn.Module, model_config: ModelConfig) -> dict[str, Any]:
    """What rebuilds ``model``: its config, table size and number of time windows."""
    return {
        "model_name": model_config.name,
        "model_config": dataclasses.asdict(model_config),
        "n_embeddings": int(model.embedding.num_embeddings),
        "time_windows": int(model.time_windows),
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a model or checkpoint file (on CPU, tensors only: no pickled code runs).

    Raises:
        CheckpointError: naming the file when it is unreadable or not of this format.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable model file ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a tdm model file of format {CHECKPOINT_FORMAT}")
    return ckpt


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    model_name: str | None = None,
) -> nn.Module:
    """Rebuild the model stored in a model or checkpoint file from the file alone.

    Args:
        path: a file from ``save_model`` or a checkpoint's ``last.pt``.
        map_location: where to put the model.
        model_name: the caller's own ``model.name``. A file whose model is not built in loads
            only when this names the same ``pkg.module:Class``: the file never picks the code.
    Returns:
        The model with its trained weights, in eval mode.
    Raises:
        CheckpointError: the file is unreadable, or names a custom class the caller did not.
    """
    from tdm.model import build_model

    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig(**ckpt["model_config"])
        name = cfg.name
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: no usable model_config ({exc})") from None
    if name not in MODEL_NAMES and name != model_name:
        raise CheckpointError(
            f"{path}: the file names the custom model class {name!r}; it loads only with params "
            f"whose model.name is {name!r} (built-ins: {', '.join(MODEL_NAMES)})"
        )
    model = build_model(cfg, ckpt["n_embeddings"], ckpt["time_windows"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the model ({first})") from None
    return model.to(map_location).eval()


def save_model(model: nn.Module, path: str | Path, cfg: Config | ModelConfig) -> None:
    """Write the weights with the config needed to rebuild them (``load_checkpoint``), atomically.

    Args:
        model: a scorer.
        path: the file to write.
        cfg: the whole Config (also stored, as ``config``) or just the ModelConfig.
    """
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    obj = {
        "format": CHECKPOINT_FORMAT,
        **model_meta(model, model_cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if isinstance(cfg, Config):
        obj["config"] = cfg.to_dict()
    save_torch(obj, Path(path))


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """sha256 of the fingerprint's canonical JSON."""
    text = json.dumps(fingerprint, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """``key old -> new`` for the first keys where two fingerprints differ."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


@dataclasses.dataclass
class Progress:
    """Where a resumed run continues: epochs done, their losses and statistics."""

    epoch: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    stats: list[dict[str, float]] = dataclasses.field(default_factory=list)


class Checkpointer:
    """The checkpoints of one training run: ``epoch_<e>.pt`` after every epoch (e = epochs
    done) and ``last.pt``, a hard link to the newest, all written atomically.

    Args:
        directory: the checkpoint folder (created on the first save).
        fingerprint: JSON-able description of everything that determines training.
        model_config: stored with the weights, so a checkpoint loads like a model file.
    """

    def __init__(
        self, directory: str | Path, fingerprint: dict[str, Any], model_config: ModelConfig
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.model_config = model_config

    @property
    def last(self) -> Path:
        return self.directory / LAST

    def clear(self) -> None:
        """Remove every checkpoint of the folder."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        callback: Any = None,
    ) -> Progress:
        """Load the newest checkpoint into ``model``, ``optimizer``, ``scaler`` (and the
        callback's ``load_state_dict`` when it has one) when its fingerprint matches.

        A checkpoint of another run (other params, data, tree or start model), or one that
        cannot be read, is removed with a log line saying why; training then starts fresh.

        Returns:
            The progress to continue from (epoch 0 when starting fresh).
        """
        if not self.last.exists():
            return Progress()
        try:
            ckpt = read_checkpoint(self.last)
            stored = ckpt["fingerprint"]
        except (CheckpointError, KeyError) as exc:
            logger.warning("%s: unusable checkpoint (%s); starting fresh", self.last, exc)
            self.clear()
            return Progress()
        if stored != self.fingerprint:
            logger.warning(
                "%s was written by another run (%s); starting fresh",
                self.directory,
                differences(stored, self.fingerprint),
            )
            self.clear()
            return Progress()
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if callback is not None and hasattr(callback, "load_state_dict") and ckpt.get("callback"):
            callback.load_state_dict(ckpt["callback"])
        logger.info("resumed from %s after epoch %d", self.last, ckpt["epoch"])
        return Progress(int(ckpt["epoch"]), list(ckpt["losses"]), list(ckpt["stats"]))

    def save(
        self,
        progress: Progress,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        callback: Any = None,
    ) -> Path:
        """Write the state after ``progress.epoch`` epochs; returns the epoch file."""
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            **model_meta(model, self.model_config),
            "fingerprint": self.fingerprint,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "callback": callback.state_dict() if hasattr(callback, "state_dict") else None,
            "epoch": progress.epoch,
            "losses": list(progress.losses),
            "stats": list(progress.stats),
        }
        path = save_torch(ckpt, self.directory / f"epoch_{progress.epoch}.pt")
        link = self.directory / f".{LAST}.{os.getpid()}.tmp"
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, self.last)
        return path


# ----------------------------------------------------------------------------- model folders


def open_model_dir(model_dir: str | Path) -> Path:
    """A trained model folder, checked: an interrupted swap is recovered and every file must
    match the folder's manifest (``tdm.io.verify_manifest``).

    Raises:
        FileNotFoundError: no ``model.pt`` in the folder.
        IntegrityError: a file changed, went missing or was added after training.
    """
    from tdm.io import recover_dir, verify_manifest

    model_dir = Path(model_dir)
    recover_dir(model_dir)
    if not (model_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{model_dir}: no {MODEL_FILE} (not a trained model folder)")
    verify_manifest(model_dir)
    return model_dir


def load_model_dir(
    model_dir: str | Path, map_location: str | torch.device = "cpu", model_name: str | None = None
) -> tuple[nn.Module, Any]:
    """The model and tree of a checked model folder (``open_model_dir``).

    Args:
        model_dir: a folder written by ``tdm train``.
        map_location: where to put the model.
        model_name: the caller's ``model.name`` (see ``load_checkpoint``).
    Returns:
        ``(model, tree)``, the model in eval mode.
    """
    from tdm.tree import Tree

    model_dir = open_model_dir(model_dir)
    model = load_checkpoint(model_dir / MODEL_FILE, map_location, model_name)
    return model, Tree.load(model_dir / TREE_FILE)
