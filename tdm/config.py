"""Typed configuration: one frozen dataclass per ``params.yaml`` section.

``load_config`` rejects unknown keys and wrongly typed values with a message naming the key, so
a typo in ``params.yaml`` or in a ``--set section.key=value`` override fails loudly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file or override that does not match the schema."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "userbehavior"
    path: str | None = "data/synthetic/UserBehavior.csv"
    min_rating: float = 4.0
    min_user_behaviors: int = 10
    n_test_users: int = 100
    n_valid_users: int = 100
    max_history: int = 69
    min_history: int = 1
    time_windows: int = 10
    category_rule: str = "first"
    seed: int = 0


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 1500
    n_items: int = 4000
    n_departments: int = 8
    n_categories: int = 64
    interests_per_user: int = 3
    behaviors_per_user: int = 40
    drift: float = 0.05
    zipf_a: float = 1.2
    noise: float = 0.05
    days: int = 9
    start_timestamp: int = 1511539200
    seed: int = 0


@dataclass(frozen=True)
class TreeConfig:
    arity: int = 2
    seed: int = 0
    kmeans_iters: int = 10


@dataclass(frozen=True)
class SamplerConfig:
    negatives_per_level: list[int] | None = None
    total_negatives: int = 100
    mode: str = "random"
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "attention_dnn"
    embedding_dim: int = 24
    attention_hidden: int = 36
    hidden: list[int] = field(default_factory=lambda: [128, 64, 24])
    node_bias: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 256
    lr: float = 0.01
    weight_decay: float = 0.0
    device: str = "auto"
    amp: bool = True
    num_threads: int = 0
    seed: int = 0
    max_samples_per_epoch: int = 0
    max_samples_per_user: int = 0
    history_dropout: float = 0.0
    bucket_by_length: bool = True
    with_eval_history: bool = False
    select_best: bool = True
    patience: int = 0
    progress: bool = True


@dataclass(frozen=True)
class RetrievalConfig:
    beam_size: int = 10
    ranking: str = "node"
    batch_size: int = 256


@dataclass(frozen=True)
class EvalConfig:
    topk: int = 10
    filters: list[str] = field(default_factory=lambda: ["none", "items", "categories"])
    split: str = "test"
    layerwise: bool = True


@dataclass(frozen=True)
class RoundsConfig:
    count: int = 2
    warm_start: bool = True


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _check(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})"
        )
    kwargs = {k: _check(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key, yaml.safe_load(raw) if raw != "" else None


def config_from_dict(raw: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from a params mapping plus ``section.key=value`` overrides."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for text in overrides:
        section, key, value = _parse_override(text)
        raw.setdefault(section, {})[key] = value
    hints = typing.get_type_hints(Config)
    sections = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(sections))})")
    cfg = Config(**{name: _build_section(hints[name], raw[name], name) for name in raw})
    validate(cfg)
    return cfg


def load_config(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Config:
    """Load ``path`` (YAML) into a Config, applying ``section.key=value`` overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


_CHOICES = {
    ("data", "source"): ("synthetic", "movielens", "userbehavior"),
    ("data", "category_rule"): ("first", "rarest"),
    ("sampler", "mode"): ("random", "siblings"),
    ("retrieval", "ranking"): ("node", "path"),
    ("eval", "split"): ("test", "valid"),
}


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(allowed)}")
    for mode in cfg.eval.filters:
        if mode not in ("none", "items", "categories"):
            raise ConfigError(f"eval.filters: {mode!r} is not one of none, items, categories")
    positive = [
        ("tree", "arity", 2),
        ("data", "max_history", 1),
        ("data", "time_windows", 1),
        ("model", "embedding_dim", 1),
        ("train", "batch_size", 1),
        ("retrieval", "beam_size", 1),
        ("eval", "topk", 1),
        ("rounds", "count", 1),
    ]
    for section, key, low in positive:
        if getattr(getattr(cfg, section), key) < low:
            raise ConfigError(f"{section}.{key}: must be >= {low}")
    if not 0.0 <= cfg.train.history_dropout < 1.0:
        raise ConfigError("train.history_dropout: must be in [0, 1)")
