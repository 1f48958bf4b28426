"""Training loop for the scorers (Sec. 3.3, Eq. 4), checkpoints, resume and warm start.

The trainer knows nothing about the data module: it takes a *sample source*, any object with

- ``n_samples: int``, the number of training samples;
- ``batch(positions: np.ndarray) -> (hist, windows, targets)``: ``hist`` (B, L) int64 item indices
  (= embedding rows) left-padded with -1, ``windows`` (B, L) int64 time windows (-1 on padding),
  ``targets`` (B,) int64 target item ids;
- optionally ``lengths`` (n_samples,) history lengths (for ``train.bucket_by_length``) and
  ``users`` (n_samples,) the user of every sample (for ``train.max_samples_per_user``).

Every epoch draws a permutation of the sample positions from ``(train.seed, epoch)`` and reseeds
the sampler from ``(sampler seed, train.seed, epoch)``, so a run resumed from ``last.pt`` ends with
exactly the weights of an uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tdm.config import Config, ModelConfig, TrainConfig
from tdm.io import save_torch
from tdm.model import build_model
from tdm.sampler import LayerwiseSampler
from tdm.tree import Tree

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class SampleSource(Protocol):
    """What ``train`` reads samples from (see the module docstring)."""

    n_samples: int

    def batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        losses: mean Eq. 4 loss of every epoch run so far (including epochs before a resume).
        stats: per-epoch dicts: ``epoch``, ``loss``, ``samples``, ``pairs`` (valid (user, node)
            pairs), ``seconds``, ``samples_per_s``, ``pairs_per_s``.
        device: the device trained on.
    """

    losses: list[float] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 4: binary cross-entropy with logits, mean over the valid (user, node) pairs.

    Args:
        logits: (B, S); labels: (B, S) float; mask: (B, S) bool.
    Returns:
        Scalar loss (0 when nothing is valid).
    """
    weight = mask.to(torch.float32)
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), labels, weight=weight, reduction="sum"
    )
    return loss / weight.sum().clamp_min(1.0)


def _seed_int(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` ahead (order and values unchanged)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


def bucket_by_length(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    span: int = 32,
) -> np.ndarray:
    """Reorder shuffled samples so that each batch holds histories of similar length.

    Within every run of ``span`` batches of ``order`` the samples are sorted by history length,
    cut into batches, and the batches shuffled again, so a batch's padding (and the attention
    work spent on it) shrinks while the epoch still visits the samples in random order at the
    scale of ``span`` batches.

    Args:
        order: (S,) sample positions, shuffled.
        lengths: (n_samples,) history length of every sample.
        batch_size: samples per batch.
        rng: generator for the batch shuffle.
        span: batches per sorted run.
    Returns:
        (S,) the same positions, reordered.
    """
    chunk = batch_size * span
    out = []
    for s in range(0, len(order), chunk):
        part = order[s : s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        cuts = list(range(0, len(part), batch_size))
        out += [part[cuts[i] : cuts[i] + batch_size] for i in rng.permutation(len(cuts))]
    return np.concatenate(out) if out else order


class TrainStep:
    """One optimisation step of Eq. 4 on a batch already on ``device``: forward (bfloat16
    autocast on CUDA when ``amp``, float16 with a grad scaler where bfloat16 is missing), masked
    BCE, backward, optimizer step. Returns the detached loss."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, amp: bool
    ) -> None:
        self.model, self.optimizer, self.device_type = model, optimizer, device.type
        self.use_amp = amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16
        if self.use_amp and not torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.float16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )

    def __call__(
        self,
        hist: torch.Tensor,  # (B, L)
        windows: torch.Tensor,  # (B, L)
        rows: torch.Tensor,  # (B, S) node embedding rows
        labels: torch.Tensor,  # (B, S)
        mask: torch.Tensor,  # (B, S)
    ) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.model(hist, windows, rows)  # (B, S)
        loss = masked_bce(logits, labels, mask)  # Eq. 4
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def cap_per_user(order: np.ndarray, sample_users: np.ndarray, cap: int) -> np.ndarray:
    """Keep at most ``cap`` samples of every user: the first ones in ``order``.

    With ``order`` a fresh permutation every epoch, every user contributes a random subset of at
    most ``cap`` samples, so a few very active users do not dominate the loss (the fixed number
    of examples per user of Covington et al., 2016).

    Args:
        order: (n,) sample indices in visiting order.
        sample_users: (n_samples,) user of every sample.
        cap: samples kept per user.
    Returns:
        The kept indices, in their original order.
    """
    users = sample_users[order]  # (n,)
    by_user = np.argsort(users, kind="stable")
    sorted_users = users[by_user]
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_user] = np.arange(len(order)) - np.searchsorted(sorted_users, sorted_users)
    return order[rank < cap]


def _batches(
    sample_source: SampleSource,
    sampler: LayerwiseSampler,
    order: np.ndarray,
    batch_size: int,
    history_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """CPU tensors ``(hist, windows, nodes, labels, mask)`` for consecutive slices of ``order``.

    A last slice of a single sample joins the one before it (BatchNorm needs two rows). With
    ``history_dropout`` > 0 each behaviour is hidden (set to padding) with that chance, drawn
    from ``rng``.
    """
    bounds = list(range(0, len(order), batch_size)) + [len(order)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        hist, windows, targets = sample_source.batch(order[s:e])
        if history_dropout > 0:
            hidden = (hist >= 0) & (rng.random(hist.shape) < history_dropout)  # (B, L)
            hist, windows = np.where(hidden, -1, hist), np.where(hidden, -1, windows)
        nodes, labels, mask = sampler.sample(targets)  # Sec. 3.3
        yield tuple(
            torch.from_numpy(np.ascontiguousarray(a)) for a in (hist, windows, nodes, labels, mask)
        )


def _model_meta(model: nn.Module, model_config: ModelConfig | None) -> dict[str, Any]:
    cfg = model_config if model_config is not None else getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("checkpointing needs the ModelConfig: pass model_config= to train")
    return {
        "model_name": cfg.name,
        "model_config": dataclasses.asdict(cfg),
        "n_embeddings": int(model.embedding.num_embeddings),
        "time_windows": int(model.time_windows),
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict (on CPU), checking its format version."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a tdm checkpoint of format {CHECKPOINT_FORMAT}")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a checkpoint or model file from the file alone.

    Args:
        path: ``epoch_<e>.pt``/``last.pt`` written by ``train``, or a file from ``save_model``.
        map_location: where to put the model.
    Returns:
        The model with its trained weights, in eval mode.
    """
    ckpt = read_checkpoint(path)
    cfg = ModelConfig(**ckpt["model_config"])
    model = build_model(cfg, ckpt["n_embeddings"], ckpt["time_windows"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval()


def save_model(model: nn.Module, path: str | Path, cfg: Config | ModelConfig | None = None) -> None:
    """Write the weights with the config needed to rebuild them (``load_checkpoint``), atomically.

    Args:
        model: a scorer.
        path: the file to write.
        cfg: the whole Config (stored as ``config``) or just the ModelConfig; default
            ``model.cfg``.
    """
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    obj = {
        "format": CHECKPOINT_FORMAT,
        **_model_meta(model, model_cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if isinstance(cfg, Config):
        obj["config"] = cfg.to_dict()
    save_torch(obj, Path(path))


def train(
    model: nn.Module,
    tree: Tree,
    sample_source: SampleSource,
    sampler: LayerwiseSampler,
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    model_config: ModelConfig | None = None,
) -> TrainResult:
    """Train ``model`` on the sampler's (user, node) pairs with Eq. 4 and Adam.

    Args:
        model: a scorer (``tdm.model`` protocol); trained in place and left on ``device``.
        tree: the tree whose nodes are sampled; ``tree.embedding_rows()`` maps nodes to rows.
        sample_source: see the module docstring.
        sampler: the layer-wise sampler (reseeded every epoch).
        cfg: the ``train`` section.
        checkpoint_dir: if given, ``epoch_<e>.pt`` (e = 1-based count of finished epochs) and
            ``last.pt`` are written after every epoch, atomically.
        callback: ``callback(epoch, stats)`` after each epoch (0-based epoch, stats as in
            ``TrainResult.stats``); returning True stops training (early stopping).
        device: overrides ``cfg.device`` (``"auto"``: CUDA when available).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        model_config: the ModelConfig written into checkpoints (default ``model.cfg``).
    Returns:
        TrainResult with per-epoch losses and throughput.
    """
    dev = resolve_device(device if device is not None else cfg.device)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    model.to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = TrainStep(model, optimizer, dev, cfg.amp)
    scaler = step.scaler
    node_rows = torch.as_tensor(tree.embedding_rows(), dtype=torch.int64, device=dev)  # (n_nodes,)
    meta = _model_meta(model, model_config) if checkpoint_dir is not None else None
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    result = TrainResult(device=str(dev))
    start_epoch = 0
    if resume and ckpt_dir is not None and (ckpt_dir / "last.pt").exists():
        ckpt = read_checkpoint(ckpt_dir / "last.pt")
        if ckpt["model_name"] != meta["model_name"] or ckpt["n_embeddings"] != meta["n_embeddings"]:
            raise ValueError(
                f"{ckpt_dir / 'last.pt'}: holds {ckpt['model_name']} with "
                f"{ckpt['n_embeddings']} embeddings, not {meta['model_name']} with "
                f"{meta['n_embeddings']}"
            )
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start_epoch = int(ckpt["epoch"])
        result.losses = list(ckpt["losses"])
        result.stats = list(ckpt["stats"])
        logger.info("resumed from %s after epoch %d", ckpt_dir / "last.pt", start_epoch)

    n = int(sample_source.n_samples)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        if cfg.max_samples_per_user > 0:
            order = cap_per_user(order, np.asarray(sample_source.users), cfg.max_samples_per_user)
        if cfg.max_samples_per_epoch > 0:
            order = order[: cfg.max_samples_per_epoch]
        lengths = getattr(sample_source, "lengths", None)
        if cfg.bucket_by_length and lengths is not None:
            rng = np.random.default_rng([cfg.seed, epoch, 1])
            order = bucket_by_length(order, np.asarray(lengths), cfg.batch_size, rng)
        sampler.reseed(cfg.seed, epoch)
        torch.manual_seed(_seed_int(cfg.seed, epoch))
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        n_pairs = torch.zeros((), device=dev, dtype=torch.int64)
        n_batches = 0
        bar = tqdm(
            total=len(order),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="sample",
            disable=not cfg.progress,
            leave=False,
        )
        batches = _batches(
            sample_source,
            sampler,
            order,
            cfg.batch_size,
            cfg.history_dropout,
            np.random.default_rng([cfg.seed, epoch, 2]),
        )
        if dev.type != "cpu":  # overlap sampling with the device; on CPU it would steal a core
            batches = _prefetch(batches)
        for hist, windows, nodes, labels, mask in batches:
            hist = hist.to(dev, non_blocking=True)  # (B, L)
            windows = windows.to(dev, non_blocking=True)  # (B, L)
            rows = node_rows[nodes.to(dev, non_blocking=True)]  # (B, S)
            labels = labels.to(dev, non_blocking=True)  # (B, S)
            mask = mask.to(dev, non_blocking=True)  # (B, S)
            loss_sum += step(hist, windows, rows, labels, mask)
            n_pairs += mask.sum()
            n_batches += 1
            bar.update(len(hist))
            if cfg.progress and n_batches % 20 == 1:
                bar.set_postfix(loss=f"{loss_sum.item() / n_batches:.4f}")
        bar.close()
        seconds = time.perf_counter() - t0
        mean_loss = loss_sum.item() / max(n_batches, 1)
        pairs = int(n_pairs.item())
        stats = {
            "epoch": epoch,
            "loss": mean_loss,
            "samples": len(order),
            "pairs": pairs,
            "seconds": seconds,
            "samples_per_s": len(order) / max(seconds, 1e-9),
            "pairs_per_s": pairs / max(seconds, 1e-9),
        }
        result.losses.append(mean_loss)
        result.stats.append(stats)
        logger.info(
            "epoch %d/%d loss %.4f, %.0f samples/s, %.0f pairs/s",
            epoch + 1,
            cfg.epochs,
            mean_loss,
            stats["samples_per_s"],
            stats["pairs_per_s"],
        )
        if ckpt_dir is not None:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                **meta,
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": epoch + 1,
                "train_config": dataclasses.asdict(cfg),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "sampler": sampler.rng.bit_generator.state,
                },
                "losses": list(result.losses),
                "stats": list(result.stats),
            }
            save_torch(ckpt, ckpt_dir / f"epoch_{epoch + 1}.pt")
            save_torch(ckpt, ckpt_dir / "last.pt")
        if callback is not None and callback(epoch, stats):
            logger.info("stopping after epoch %d: the callback asked to stop", epoch + 1)
            break
    return result


@torch.no_grad()
def warm_start(new_model: nn.Module, old_model: nn.Module, old_tree: Tree, new_tree: Tree) -> None:
    """Initialise a model for a re-learnt tree from the previous round's model (Sec. 3.5).

    All weights are copied; in the embedding table the item rows ``0..n_items-1`` are copied as
    they are (items keep their rows) and every internal node of ``new_tree`` gets the mean of the
    embeddings of the leaves under it, accumulated bottom-up level by level. A per-node bias
    (``model.node_bias``) keeps the items' values and gives every internal node the largest bias
    of its children, as the max-heap property asks of a node's probability (Eq. 1).

    Args:
        new_model: the model to initialise (its table has ``new_tree.n_nodes`` rows), in place.
        old_model: the trained model of ``old_tree``.
        old_tree, new_tree: trees over the same items ``0..n_items-1``.
    """
    n_items = new_tree.n_items
    if old_tree.n_items != n_items:
        raise ValueError(f"warm_start: trees index {old_tree.n_items} and {n_items} items")
    old_state = old_model.state_dict()
    new_state = new_model.state_dict()
    for key, value in new_state.items():
        if key in ("embedding.weight", "node_bias.weight"):
            continue
        if key not in old_state or old_state[key].shape != value.shape:
            raise ValueError(f"warm_start: parameter {key!r} does not match the old model")
        value.copy_(old_state[key])
    old_table = old_model.embedding.weight  # (n_old, D)
    table = new_model.embedding.weight  # (n_new, D)
    items = old_table[:n_items].to(device=table.device, dtype=torch.float32)  # (n_items, D)
    sums = torch.zeros(new_tree.n_nodes, table.shape[1], device=table.device)  # (n_nodes, D)
    counts = torch.zeros(new_tree.n_nodes, device=table.device)  # (n_nodes,)
    leaves = torch.as_tensor(new_tree.leaf_nodes, device=table.device)
    sums[leaves] = items[torch.as_tensor(new_tree.leaf_items, device=table.device)]
    counts[leaves] = 1.0
    _reduce_up(new_tree, sums, "sum")
    _reduce_up(new_tree, counts, "sum")
    rows = torch.as_tensor(new_tree.embedding_rows(), device=table.device)  # (n_nodes,)
    inner = torch.as_tensor(np.flatnonzero(~new_tree.is_leaf), device=table.device)
    table[:n_items] = items.to(table.dtype)
    table[rows[inner]] = (sums[inner] / counts[inner, None]).to(table.dtype)
    if getattr(new_model, "node_bias", None) is not None:
        _warm_bias(new_model.node_bias.weight, old_model.node_bias.weight, new_tree)


def _warm_bias(bias: torch.Tensor, old_bias: torch.Tensor, new_tree: Tree) -> None:
    """Items keep their bias; each internal node gets the largest of its children's, bottom-up."""
    n_items = new_tree.n_items
    node_bias = torch.full((new_tree.n_nodes,), -torch.inf, device=bias.device)  # (n_nodes,)
    leaves = torch.as_tensor(new_tree.leaf_nodes, device=bias.device)
    items = torch.as_tensor(new_tree.leaf_items, device=bias.device)
    node_bias[leaves] = old_bias[:n_items, 0].to(device=bias.device, dtype=torch.float32)[items]
    _reduce_up(new_tree, node_bias, "amax")
    rows = torch.as_tensor(new_tree.embedding_rows(), device=bias.device)  # (n_nodes,)
    bias[rows, 0] = node_bias.to(bias.dtype)


def _reduce_up(tree: Tree, values: torch.Tensor, reduce: str) -> None:
    """Fold every node's row of ``values`` (n_nodes, ...) into its parent's, deepest level first.

    ``reduce`` is ``"sum"`` (added to the parent's row) or ``"amax"`` (the larger one kept).
    """
    parent = torch.as_tensor(tree.parent, device=values.device)
    offsets = tree.level_offsets
    for j in range(tree.depth, 0, -1):  # children before parents
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        if reduce == "sum":
            values.index_add_(0, parent[lo:hi], values[lo:hi].clone())
        else:
            values.scatter_reduce_(0, parent[lo:hi], values[lo:hi].clone(), reduce)
