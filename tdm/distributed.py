"""Data-parallel training over ``torch.distributed``, started by ``torchrun``.

``train.nproc: N`` (> 1) makes ``tdm.stages.train`` start ``python -m torch.distributed.run
--standalone --nproc-per-node N -m tdm.distributed SPEC``: N processes on this machine (gloo on
CPU, NCCL on CUDA, one GPU per process), each calling ``tdm.stages.train`` with the same spec (a
JSON file: the resolved config and the paths). Across machines, run ``torchrun --nnodes M
--node-rank R --rdzv-endpoint HOST:PORT -m tdm.cli train ...`` on each; a process started by
torchrun trains as its rank and never starts torchrun itself.

Within a run (``tdm.train.train``):

- every rank draws the same epoch order and takes its own slice of every global batch of
  ``train.batch_size`` samples (``shard``), so N processes see the samples one process would;
- after every backward pass ``GradientSync`` averages the gradients over the ranks: dense ones
  with one all-reduce of a flat buffer, the sparse rows of the embedding tables by all-gathering
  their (row, value) pairs, so a step still moves only the rows some rank touched;
- rank 0 alone runs the validation callback, writes checkpoints and the model; its decision to
  stop is broadcast. Ranks resume from the checkpoint after rank 0 has checked it.

If a process dies, torchrun stops the others and exits non-zero; the parent raises
``TrainingFailed`` and nothing is published (the model folder is written by rank 0 after the
last epoch, atomically), so the earlier model stays intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tdm.errors import TdmError

PROGRESS_FILE = "progress.jsonl"


class TrainingFailed(TdmError, RuntimeError):
    """A training process failed; its own output above says why."""


# ----------------------------------------------------------------------------- this process
def launched() -> bool:
    """Whether this process was started by torchrun (``torch.distributed.run``)."""
    return dist.is_torchelastic_launched()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def setup(device: torch.device) -> torch.device:
    """Join the process group of a torchrun launch (no-op otherwise); returns the device this
    rank trains on: its own GPU (``LOCAL_RANK``) on CUDA, else the CPU."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_flag(value: bool, device: torch.device) -> bool:
    """Rank 0's ``value`` on every rank."""
    if world_size() == 1:
        return value
    flag = torch.tensor([1 if value else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (itself in a single process)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (fresh weights are seeded alike anyway;
    this makes it so whatever the start)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def shard(order: np.ndarray, batch_size: int) -> np.ndarray:
    """This rank's slice of every global batch of ``order``.

    Global batch ``b`` is ``order[b * batch_size : (b + 1) * batch_size]``; rank ``r`` of ``N``
    takes its ``r``-th contiguous ``batch_size / N`` of it. A last incomplete global batch is
    dropped, so that every rank runs the same number of steps (each one a collective).
    """
    n = world_size()
    if n == 1:
        return order
    if batch_size % n or batch_size // n < 2:
        raise ValueError(
            f"train.batch_size {batch_size} must be a multiple of train.nproc {n}, with at least "
            "2 samples per process (BatchNorm)"
        )
    full = len(order) // batch_size * batch_size
    per = batch_size // n
    return order[:full].reshape(-1, n, per)[:, rank(), :].reshape(-1)


class GradientSync:
    """Average the gradients of ``model`` over the ranks, in place (call after ``backward``).

    Dense gradients go in one flat buffer and one all-reduce. A sparse gradient (an embedding
    table under ``train.optimizer: sparse_adam``) is coalesced, its rows and values all-gathered
    (padded to the longest rank's), summed into one sparse gradient and divided by the number of
    ranks: the same rows an all-reduce of the dense table would change, at the cost of the rows
    touched. A parameter without a gradient on a rank counts as zero there.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self) -> None:
        n = world_size()
        if n == 1:
            return
        dense = [p for p in self.params if p.grad is None or not p.grad.is_sparse]
        sparse = [p for p in self.params if p.grad is not None and p.grad.is_sparse]
        if dense:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= n
            offset = 0
            for p, g in zip(dense, grads, strict=True):
                p.grad = flat[offset : offset + g.numel()].view_as(p)
                offset += g.numel()
        for p in sparse:
            p.grad = _all_gather_sparse(p.grad.coalesce(), n)


def _all_gather_sparse(grad: torch.Tensor, n: int) -> torch.Tensor:
    rows = grad.indices()[0]  # (K,)
    values = grad.values()  # (K, D)
    count = torch.tensor([rows.numel()], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(n)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    pad = longest - rows.numel()
    rows = torch.cat([rows, rows.new_zeros(pad)])
    values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    all_rows = [torch.empty_like(rows) for _ in range(n)]
    all_values = [torch.empty_like(values) for _ in range(n)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_values, values)
    keep = [slice(0, int(c.item())) for c in counts]
    indices = torch.cat([r[k] for r, k in zip(all_rows, keep, strict=True)]).unsqueeze(0)
    summed = torch.sparse_coo_tensor(
        indices, torch.cat([v[k] for v, k in zip(all_values, keep, strict=True)]), grad.shape
    ).coalesce()
    return summed / n


# ----------------------------------------------------------------------------- the launcher
def launch(
    spec: dict[str, Any],
    spec_path: Path,
    nproc: int,
    callback: Callable[[int, dict], None] | None = None,
) -> None:
    """Run ``tdm.stages.train`` in ``nproc`` processes on this machine through torchrun and
    wait for them, calling ``callback(epoch, stats)`` as rank 0 reports epochs.

    Args:
        spec: JSON-able: ``config`` (``Config.to_dict()``), ``prepared``, ``tree``, ``out``,
            ``init_from``, ``fresh``.
        spec_path: where to write it (its folder also gets the progress file).
        nproc: processes.
        callback: the caller's epoch callback (called in this process).
    Raises:
        TrainingFailed: a process failed (torchrun stopped the others).
    """
    from tdm.io import write_json

    spec_path = Path(spec_path)
    progress = spec_path.with_name(PROGRESS_FILE)
    progress.unlink(missing_ok=True)
    write_json(spec_path, {**spec, "progress": str(progress)})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "tdm.distributed",
        str(spec_path),
    ]
    env = {**os.environ, "TDM_LOCK_HELD": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    done = threading.Event()
    reader = threading.Thread(target=_follow, args=(progress, callback, done), daemon=True)
    reader.start()
    try:
        code = subprocess.run(cmd, env=env, check=False).returncode
    finally:
        done.set()
        reader.join()
        spec_path.unlink(missing_ok=True)
    if code != 0:
        raise TrainingFailed(
            f"training in {nproc} processes failed (torchrun exit status {code}); "
            "the earlier model, if any, is unchanged"
        )


def _follow(path: Path, callback, done: threading.Event) -> None:
    """Call ``callback`` for every line rank 0 appends to the progress file."""
    seen = 0
    while True:
        finished = done.is_set()
        if path.exists():
            lines = path.read_text().splitlines()
            for line in lines[seen:]:
                if callback is not None:
                    record = json.loads(line)
                    callback(record["epoch"], record["stats"])
            seen = len(lines)
        if finished:
            return
        time.sleep(0.5)


def report_progress(path: str | None, epoch: int, stats: dict) -> None:
    """Rank 0: append an epoch's statistics to the progress file the launcher follows."""
    if path and rank() == 0:
        with open(path, "a") as handle:
            handle.write(json.dumps({"epoch": epoch, "stats": stats}) + "\n")


def main(argv: list[str] | None = None) -> None:
    """One rank of a launch: ``python -m tdm.distributed SPEC`` under torchrun."""
    import logging

    from tdm import stages
    from tdm.config import config_from_dict

    who = f"rank {os.environ.get('RANK', '?')}"
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {who} %(levelname)s %(name)s: %(message)s"
    )
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    cfg = config_from_dict(spec["config"])
    path = spec.get("progress")
    stages.train(
        cfg,
        Path(spec["prepared"]),
        Path(spec["tree"]),
        Path(spec["out"]),
        init_from=Path(spec["init_from"]) if spec.get("init_from") else None,
        callback=lambda epoch, stats: report_progress(path, epoch, stats),
        fresh=bool(spec.get("fresh")),
    )


if __name__ == "__main__":
    main()
