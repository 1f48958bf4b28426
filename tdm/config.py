"""Typed configuration: one frozen dataclass per ``params.yaml`` section.

``load_config`` rejects unknown keys and wrongly typed values with a message naming the key, so
a typo in ``params.yaml`` or in a ``--set section.key=value`` override fails loudly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from tdm.errors import TdmError


class ConfigError(TdmError, ValueError):
    """A params file or override that does not match the schema."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, checked when the config loads (``Annotated[int, Range(1)]``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False

    def check(self, value: float, key: str) -> None:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise ConfigError(
                f"{key}: must be {'>' if self.low_open else '>='} {self.low}, got {value!r}"
            )
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise ConfigError(
                f"{key}: must be {'<' if self.high_open else '<='} {self.high}, got {value!r}"
            )


Count = Annotated[int, Range(0)]  # a count or a seed: >= 0
Positive = Annotated[int, Range(1)]
Fraction = Annotated[float, Range(0.0, 1.0)]

# The built-in scorers of tdm.model (a test checks that the two lists agree).
MODEL_NAMES = ("attention_dnn", "dnn", "product_dnn")
Source = Literal["synthetic", "movielens", "userbehavior"]
FilterMode = Literal["none", "items", "categories"]


@dataclass(frozen=True)
class DataConfig:
    source: Source = "userbehavior"
    path: str | None = "data/UserBehavior.csv"
    min_rating: float = 4.0
    min_user_behaviors: Annotated[int, Range(2)] = 10
    n_test_users: Positive = 100
    n_valid_users: Count = 100
    max_history: Positive = 69
    min_history: Count = 1
    time_windows: Positive = 10
    window_mode: Literal["target_time", "last_behaviour", "position"] = "position"
    category_rule: Literal["first", "rarest"] = "first"
    seed: Count = 0


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: Positive = 1500
    n_items: Positive = 4000
    n_departments: Positive = 8
    n_categories: Positive = 64
    interests_per_user: Positive = 3
    behaviors_per_user: Positive = 40
    drift: Fraction = 0.05
    zipf_a: Annotated[float, Range(0.0)] = 1.2
    noise: Fraction = 0.05
    days: Positive = 9
    start_timestamp: Count = 1511539200
    seed: Count = 0
    chunk_rows: Positive = 2_000_000


@dataclass(frozen=True)
class TreeConfig:
    arity: Annotated[int, Range(2)] = 2
    seed: Count = 0
    kmeans_iters: Positive = 10
    learner: Literal["kmeans", "jtm"] = "kmeans"
    jtm_gap: Annotated[int, Range(1, 6)] = 3
    jtm_samples_per_item: Count = 16


@dataclass(frozen=True)
class SamplerConfig:
    negatives_per_level: list[Count] | None = None
    total_negatives: Count = 100
    profile: Literal["proportional", "leaf_heavy"] = "proportional"
    replacement: bool = True
    mode: Literal["random", "siblings"] = "random"
    seed: Count = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "attention_dnn"
    embedding_dim: Positive = 24
    attention_hidden: Positive = 36
    hidden: list[Positive] = field(default_factory=lambda: [128, 64, 24])
    node_bias: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: Positive = 2
    batch_size: Annotated[int, Range(2)] = 256  # BatchNorm needs two rows
    lr: Annotated[float, Range(0.0, low_open=True)] = 0.01
    optimizer: Literal["adam", "sparse_adam"] = "sparse_adam"
    weight_decay: Annotated[float, Range(0.0)] = 0.0
    device: str = "auto"
    amp: bool = True
    nproc: Positive = 1
    num_threads: Count = 0
    seed: Count = 0
    max_samples_per_epoch: Count = 0
    max_steps: Count = 0
    max_samples_per_user: Count = 0
    history_dropout: Annotated[float, Range(0.0, 1.0, high_open=True)] = 0.0
    bucket_by_length: bool = True
    prefetch: Count = 2
    with_eval_history: bool = False
    select_best: bool = True
    patience: Count = 0
    progress: bool = True
    test_curve: bool = False


@dataclass(frozen=True)
class RetrievalConfig:
    beam_size: Positive = 10
    filter_beam: Count = 20
    ranking: Literal["node", "path"] = "node"
    batch_size: Positive = 256
    max_k: Positive = 1000


@dataclass(frozen=True)
class EvalConfig:
    topk: Positive = 10
    filters: list[FilterMode] = field(default_factory=lambda: ["none", "items", "categories"])
    split: Literal["test", "valid"] = "test"
    layerwise: bool = True


@dataclass(frozen=True)
class RoundsConfig:
    count: Positive = 2
    warm_start: bool = True


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: Annotated[int, Range(0, 65535)] = 8000
    store: str = "serving/behaviors.sqlite"
    store_sync: Literal["full", "normal"] = "full"
    titles: str | None = None
    max_batch: Positive = 16
    max_wait_ms: Annotated[float, Range(0.0, 1000.0)] = 2.0
    max_body_bytes: Annotated[int, Range(1024)] = 1_048_576
    max_events: Positive = 1000
    max_request_history: Positive = 1000
    reload_poll_s: Annotated[float, Range(0.0)] = 0.0
    num_threads: Count = 1
    workers: Annotated[int, Range(0, 64)] = 0
    backend: Literal["auto", "native", "torch"] = "auto"


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
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _check(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        value = _check(value, base, key)
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(value, key)
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
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
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation!r}")


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
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


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_CUSTOM_MODEL = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def check_model_name(name: str) -> str:
    """``model.name``: a built-in scorer, or ``pkg.module:Class`` whose module can be found.

    Only the module's location is looked up (its parent packages are imported, the module
    itself is not), so a typo fails here, in milliseconds, not after preparation.
    """
    if name in MODEL_NAMES:
        return name
    if not _CUSTOM_MODEL.fullmatch(name):
        raise ConfigError(
            f"model.name: {name!r} is not a built-in model ({', '.join(MODEL_NAMES)}) "
            "nor 'pkg.module:Class'"
        )
    module = name.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"model.name: cannot find module {module!r}: {exc}") from None
    if found is None:
        raise ConfigError(f"model.name: cannot find module {module!r}")
    return name


def validate(cfg: Config) -> None:
    """Checks across fields and of values whose type alone says too little."""
    if not _DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(
            f"train.device: {cfg.train.device!r} is not one of auto, cpu, cuda, cuda:N, mps"
        )
    check_model_name(cfg.model.name)
    if not cfg.model.hidden:
        raise ConfigError("model.hidden: needs at least one layer")
    syn = cfg.synthetic
    if syn.n_categories < syn.n_departments:
        raise ConfigError("synthetic.n_categories: must be >= synthetic.n_departments")
    if syn.interests_per_user > syn.n_categories:
        raise ConfigError("synthetic.interests_per_user: must be <= synthetic.n_categories")
    if cfg.train.batch_size % cfg.train.nproc or cfg.train.batch_size // cfg.train.nproc < 2:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} must be a multiple of train.nproc "
            f"({cfg.train.nproc}) with at least 2 samples per process"
        )
    if cfg.eval.topk > cfg.retrieval.max_k:
        raise ConfigError(
            f"eval.topk: {cfg.eval.topk} is above retrieval.max_k ({cfg.retrieval.max_k})"
        )
    if cfg.data.source != "synthetic" and not cfg.data.path:
        raise ConfigError(f"data.path: must be set for data.source {cfg.data.source!r}")
