"""Where every artefact lives, relative to a project root. No side effects at import."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The files of a model folder (``tdm train``), besides its manifest.
MODEL_FILE = "model.pt"
TREE_FILE = "tree.tree"
ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"
TRAIN_LOG_FILE = "train_log.json"


@dataclass(frozen=True)
class Paths:
    """Artefact layout shared by the CLI, the DVC stages and the Prefect tasks."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def tree(self, round_: int) -> Path:
        return self.root / "trees" / f"round_{round_}.tree"

    def model(self, round_: int) -> Path:
        return self.root / "models" / f"round_{round_}"

    def embeddings(self, round_: int) -> Path:
        return self.root / "embeddings" / f"round_{round_}.npy"

    def metrics(self, round_: int) -> Path:
        return self.root / "metrics" / f"round_{round_}.json"
