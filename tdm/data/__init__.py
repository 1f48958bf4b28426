"""Data: loaders of the raw sets, the synthetic generator, the Sec. 5.1 protocol and features.

The names below are imported lazily, so ``import tdm.data.schema`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "eval_batch": "features",
    "history_index": "features",
    "make_history": "features",
    "train_batch": "features",
    "download": "loaders",
    "load_dataset": "loaders",
    "load_movielens": "loaders",
    "load_userbehavior": "loaders",
    "EvalSplit": "protocol",
    "Prepared": "protocol",
    "TrainSplit": "protocol",
    "load_prepared": "protocol",
    "n_samples": "protocol",
    "prepare": "protocol",
    "sample_positions": "protocol",
    "training_positions": "protocol",
    "BEHAVIOR_TYPES": "schema",
    "COLUMNS": "schema",
    "DataError": "schema",
    "check_table": "schema",
    "generate": "synthetic",
    "write_userbehavior_csv": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tdm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tdm.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
