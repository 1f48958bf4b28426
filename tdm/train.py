"""Training loop for the scorers (Sec. 3.3, Eq. 4), with resume (``tdm.checkpoint``) and warm start.

The trainer knows nothing about the data module: it takes a *sample source*, any object with

- ``n_samples: int``, the number of training samples;
- ``batch(positions: np.ndarray) -> (hist, windows, targets)``: ``hist`` (B, L) int64 item indices
  (= embedding rows) left-padded with -1, ``windows`` (B, L) int64 time windows (-1 on padding),
  ``targets`` (B,) int64 target item ids;
- optionally ``lengths`` (n_samples,) history lengths (for ``train.bucket_by_length``) and
  ``users`` (n_samples,) the user of every sample (for ``train.max_samples_per_user``).

Every epoch draws a permutation of the sample positions from ``(train.seed, epoch)`` and reseeds
the sampler from ``(sampler seed, train.seed, epoch)``, so a run resumed from a checkpoint ends
with exactly the weights of an uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tdm import distributed
from tdm.checkpoint import Checkpointer, Progress
from tdm.config import ConfigError, TrainConfig
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
    """``"auto"``/None -> CUDA when available, else CPU; anything else as given, checked.

    Raises:
        ConfigError: a CUDA device that this machine or this torch build does not have.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"train.device: {device!r} is not a torch device") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"train.device: {device!r}, but torch {torch.__version__} sees no CUDA device "
                "(use auto or cpu)"
            )
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"train.device: {device!r}, but this machine has {count} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {device!r}, but MPS is not available")
    return dev


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


OPTIMIZERS = ("adam", "sparse_adam")


class Optimizers:
    """The model's optimizers, used as one (``train.optimizer``).

    - ``"adam"``: one Adam over every parameter. Each step updates every row of the embedding
      table, so a step costs O(table), as much at 4M items as the rest of the step many times over.
    - ``"sparse_adam"``: the embedding tables (every ``nn.Embedding`` of the model: the node table
      and the per-node bias) get sparse gradients and ``torch.optim.SparseAdam``, which reads and
      updates only the rows a batch touches (a *lazy* Adam: a row's moments move only when it is
      touched); the other parameters keep Adam. A step then costs the same at any corpus size.
      SparseAdam keeps two moment tables as large as the embedding table (2 x rows x dim floats,
      allocated at the first step); ``weight_decay`` applies to the dense parameters only.

    Args:
        model: the scorer; with ``"sparse_adam"`` its embeddings are switched to sparse gradients.
        cfg: the ``train`` section (``optimizer``, ``lr``, ``weight_decay``).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.kind = cfg.optimizer
        if self.kind not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer: {self.kind!r} is not one of {OPTIMIZERS}")
        tables: list[nn.Parameter] = []
        if self.kind == "sparse_adam":
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    module.sparse = True
                    tables.append(module.weight)
        table_ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in table_ids]
        self.parts: list[torch.optim.Optimizer] = []
        if tables:
            self.parts.append(torch.optim.SparseAdam(tables, lr=cfg.lr))
        if dense:
            self.parts.append(torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay))

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        for part in self.parts:
            scaler.step(part)
        scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or len(state["parts"]) != len(self.parts):
            raise ValueError(f"optimizer state of {state.get('kind')!r}, not {self.kind!r}")
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


class TrainStep:
    """One optimisation step of Eq. 4 on a batch already on ``device``: forward (bfloat16
    autocast on CUDA when ``amp``, float16 with a grad scaler where bfloat16 is missing), masked
    BCE, backward, ``sync`` (the gradient all-reduce of a data-parallel run), optimizer step.
    Returns the detached loss."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizers,
        device: torch.device,
        amp: bool,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.optimizer, self.device_type = model, optimizer, device.type
        self.sync = sync
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
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        if self.sync is not None:
            self.sync()
        self.optimizer.step(self.scaler)
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
    pin: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """CPU tensors ``(hist, windows, nodes, labels, mask)`` for consecutive slices of ``order``.

    A last slice of a single sample joins the one before it (BatchNorm needs two rows). With
    ``history_dropout`` > 0 each behaviour is hidden (set to padding) with that chance, drawn
    from ``rng``. With ``pin`` the tensors are in pinned memory, so that copies to a GPU are
    asynchronous (made in the prefetch thread, off the training loop).
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
        tensors = [
            torch.from_numpy(np.ascontiguousarray(a)) for a in (hist, windows, nodes, labels, mask)
        ]
        yield tuple(t.pin_memory() for t in tensors) if pin else tuple(tensors)


def train(
    model: nn.Module,
    tree: Tree,
    sample_source: SampleSource,
    sampler: LayerwiseSampler,
    cfg: TrainConfig,
    *,
    checkpointer: Checkpointer | None = None,
    callback: Callable[[int, dict[str, float]], bool | None] | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train ``model`` on the sampler's (user, node) pairs with Eq. 4 (``train.optimizer``).

    Thread count and global seeding are the caller's: this function draws every random number
    from generators seeded by ``(cfg.seed, epoch)`` and the sampler's seed.

    Args:
        model: a scorer (``tdm.model`` protocol); trained in place and left on ``device``.
        tree: the tree whose nodes are sampled; ``tree.embedding_rows()`` maps nodes to rows.
        sample_source: see the module docstring.
        sampler: the layer-wise sampler (reseeded every epoch).
        cfg: the ``train`` section.
        checkpointer: if given, training resumes from its newest checkpoint when that was
            written by the same run (same fingerprint), and a checkpoint is written after every
            epoch (after the callback, so the callback's ``state_dict`` is saved with it).
        callback: ``callback(epoch, stats)`` after each epoch (0-based epoch, stats as in
            ``TrainResult.stats``); returning True stops training (early stopping). A callback
            with ``state_dict``/``load_state_dict`` is checkpointed and resumed too.
        device: overrides ``cfg.device`` (``"auto"``: CUDA when available).
    Returns:
        TrainResult with per-epoch losses and throughput (epochs before a resume included).
    """
    dev = resolve_device(device if device is not None else cfg.device)
    model.to(dev)
    optimizer = Optimizers(model, cfg)
    ranks, lead = distributed.world_size(), distributed.rank() == 0
    sync = distributed.GradientSync(model) if ranks > 1 else None
    step = TrainStep(model, optimizer, dev, cfg.amp, sync)
    node_rows = torch.as_tensor(tree.embedding_rows(), dtype=torch.int64, device=dev)  # (n_nodes,)
    progress = Progress()
    if checkpointer is not None:  # rank 0 checks (and may clear) the checkpoint first
        if lead:
            progress = checkpointer.resume(model, optimizer, step.scaler, callback)
        distributed.barrier()
        if not lead:
            progress = checkpointer.resume(model, optimizer, step.scaler)
    distributed.broadcast_module(model)
    result = TrainResult(list(progress.losses), list(progress.stats), str(dev))

    n = int(sample_source.n_samples)
    steps_done = sum(int(stats.get("steps", 0)) for stats in result.stats)
    for epoch in range(progress.epoch, cfg.epochs):
        if cfg.max_steps and steps_done >= cfg.max_steps:
            break
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
        if cfg.max_steps:  # the steps left, whole batches
            order = order[: (cfg.max_steps - steps_done) * cfg.batch_size]
        order = distributed.shard(order, cfg.batch_size)  # this rank's part of every batch
        sampler.reseed(cfg.seed, epoch)
        stats = _epoch(
            step,
            _batches(
                sample_source,
                sampler,
                order,
                cfg.batch_size // ranks,
                cfg.history_dropout,
                np.random.default_rng([cfg.seed, epoch, 2]),
                pin=dev.type == "cuda",
            ),
            node_rows,
            dev,
            f"epoch {epoch + 1}/{cfg.epochs}",
            len(order),
            cfg.progress and lead,
            cfg.prefetch,
        )
        stats["epoch"] = epoch
        steps_done += int(stats["steps"])
        result.losses.append(stats["loss"])
        result.stats.append(stats)
        if lead:
            logger.info(
                "epoch %d/%d loss %.4f, %.0f samples/s, %.0f pairs/s%s",
                epoch + 1,
                cfg.epochs,
                stats["loss"],
                stats["samples_per_s"],
                stats["pairs_per_s"],
                f" ({ranks} processes)" if ranks > 1 else "",
            )
        stop = bool(callback(epoch, stats)) if (callback is not None and lead) else False
        stop = distributed.broadcast_flag(stop, dev)
        if cfg.max_steps and steps_done >= cfg.max_steps:
            if lead:
                logger.info("stopping after %d steps (train.max_steps)", steps_done)
            stop = True
        if checkpointer is not None and lead:
            done = Progress(epoch + 1, result.losses, result.stats)
            checkpointer.save(done, model, optimizer, step.scaler, callback)
        if stop:
            break
    return result


def _epoch(
    step: TrainStep,
    batches: Iterator[tuple[torch.Tensor, ...]],
    node_rows: torch.Tensor,
    dev: torch.device,
    desc: str,
    n_samples: int,
    show: bool,
    prefetch: int = 0,
) -> dict[str, float]:
    """One pass over ``batches`` (``prefetch`` of them made ahead by a background thread);
    returns the epoch's loss and throughput."""
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=dev)
    n_pairs = torch.zeros((), device=dev, dtype=torch.int64)
    n_batches = 0
    bar = tqdm(total=n_samples, desc=desc, unit="sample", disable=not show, leave=False)
    if prefetch > 0:  # a background thread prepares the next batches while this one trains
        batches = _prefetch(batches, prefetch)
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
        if show and n_batches % 20 == 1:
            bar.set_postfix(loss=f"{loss_sum.item() / n_batches:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    totals = distributed.sum_over_ranks(torch.stack([loss_sum.double(), n_pairs.double()]))
    loss_sum, pairs = totals[0], int(totals[1].item())
    n_samples *= distributed.world_size()
    return {
        "loss": loss_sum.item() / max(n_batches * distributed.world_size(), 1),
        "samples": n_samples,
        "steps": n_batches,
        "pairs": pairs,
        "seconds": seconds,
        "samples_per_s": n_samples / max(seconds, 1e-9),
        "pairs_per_s": pairs / max(seconds, 1e-9),
    }


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
