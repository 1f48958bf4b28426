"""Data-parallel training (``tdm.distributed``): gradient averaging over real gloo process
groups, and `tdm train` with ``train.nproc: 2`` through torchrun on a tiny data set: the same
validation recall as one process, a killed rank fails the job cleanly, and the job resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import TINY_DATA

from tdm import distributed
from tdm.io import verify_manifest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [
    *TINY_DATA,
    "train.batch_size=128",
    "train.progress=false",
    "train.optimizer=sparse_adam",
    "sampler.total_negatives=20",
    "model.hidden=[16, 8]",
]


# ----------------------------------------------------------------------- gradient averaging
def _rank_grads(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 4, sparse=True), torch.nn.Linear(4, 1))
    rows = torch.tensor([[rank, 7, 7 + rank], [3, 3, 10 * (rank + 1)]])  # (2, 3), rank-specific
    model(rows).pow(2).sum().mul(rank + 1).backward()
    sync = distributed.GradientSync(model)
    sync()
    torch.save(
        {
            "table": model[0].weight.grad.to_dense(),
            "linear": model[1].weight.grad.clone(),
            "rows": model[0].weight.grad.coalesce().indices()[0].tolist(),
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.integration
def test_gradient_sync_averages_dense_and_sparse_gradients(tmp_path):
    """Two gloo ranks: each ends with the mean of both ranks' gradients, the embedding's still
    sparse and holding only the rows some rank touched."""
    world, init = 2, f"file://{tmp_path / 'store'}"
    mp.start_processes(_rank_grads, args=(world, init, str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    expected = []
    for rank in range(world):  # the same forward/backward, one rank at a time, unsynchronised
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(50, 4, sparse=True), torch.nn.Linear(4, 1))
        rows = torch.tensor([[rank, 7, 7 + rank], [3, 3, 10 * (rank + 1)]])
        model(rows).pow(2).sum().mul(rank + 1).backward()
        expected.append((model[0].weight.grad.to_dense(), model[1].weight.grad))
    table = (expected[0][0] + expected[1][0]) / 2
    linear = (expected[0][1] + expected[1][1]) / 2
    for r in range(world):
        torch.testing.assert_close(got[r]["table"], table)
        torch.testing.assert_close(got[r]["linear"], linear)
        assert got[r]["rows"] == [0, 1, 3, 7, 8, 10, 20]


def test_shard_splits_every_global_batch_and_drops_the_incomplete_one(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    order = np.arange(10)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(order, 4))
    assert parts[0].tolist() == [0, 1, 4, 5] and parts[1].tolist() == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="multiple of train.nproc"):
        distributed.shard(order, 5)


# ----------------------------------------------------------------------- torchrun end to end
def _tdm(root: Path, *args: str, extra=()) -> subprocess.CompletedProcess:
    sets = [a for s in (*TINY, *extra) for a in ("--set", s)]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = ["tdm", *args, "--root", str(root), "--params", str(ROOT / "params.yaml"), *sets]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    for command in ("prepare", "init-tree"):
        done = _tdm(root, command)
        assert done.returncode == 0, done.stderr
    return root


def _log(root: Path, name: str) -> dict:
    return json.loads((root / "models" / name / "train_log.json").read_text())


@pytest.mark.integration
def test_two_processes_reach_the_validation_recall_of_one(prepared):
    """Same global batch, half of it on each of 2 gloo ranks: same steps, same recall (within
    the noise BatchNorm over half batches makes), one published model."""
    one = _tdm(prepared, "train", "--out", str(prepared / "models/one"), extra=["train.epochs=3"])
    assert one.returncode == 0, one.stderr
    two = _tdm(
        prepared,
        "train",
        "--out",
        str(prepared / "models/two"),
        extra=["train.epochs=3", "train.nproc=2"],
    )
    assert two.returncode == 0, two.stderr
    a, b = _log(prepared, "one"), _log(prepared, "two")
    assert a["processes"] == 1 and b["processes"] == 2
    assert b["steps"] == a["steps"] - 3  # each epoch's last, incomplete batch is dropped
    assert b["valid_recall"][-1] > 0.3 and a["valid_recall"][-1] > 0.3  # most-popular: ~0.07
    assert abs(a["valid_recall"][-1] - b["valid_recall"][-1]) < 0.05
    assert abs(a["losses"][-1] - b["losses"][-1]) < 0.02
    verify_manifest(prepared / "models/two")
    assert not (prepared / "models/two.launch").exists()
    assert not (prepared / "models/two.ckpt").exists()


def _rank_pid(spec_dir: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` whose command names ``spec_dir``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "tdm.distributed" in cmdline and str(spec_dir) in cmdline:
            if f"RANK={rank}".encode() in environ:
                return int(proc.name)
    return None


@pytest.mark.integration
def test_a_killed_rank_fails_the_job_cleanly_and_the_job_resumes(prepared):
    out = prepared / "models/round_0"
    earlier = _tdm(prepared, "train", extra=["train.epochs=1"])  # the model to keep intact
    assert earlier.returncode == 0, earlier.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    extra = ["train.epochs=4", "train.nproc=2"]
    sets = [a for s in (*TINY, *extra) for a in ("--set", s)]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    job = subprocess.Popen(
        ["tdm", "train", "--root", str(prepared), "--params", str(ROOT / "params.yaml"), *sets],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    launch = prepared / "models/round_0.launch"
    progress = launch / distributed.PROGRESS_FILE
    deadline = time.time() + 300
    while not (progress.exists() and progress.read_text().count("\n") >= 1):
        assert job.poll() is None, job.communicate()
        assert time.time() < deadline
        time.sleep(0.2)
    pid = _rank_pid(launch, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # rank 1 dies in epoch 2
    _, err = job.communicate(timeout=300)
    assert job.returncode == 2
    assert err.strip().splitlines()[-1].startswith("tdm: error: training in 2 processes failed")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # earlier model intact
    assert (prepared / "models/round_0.ckpt/last.pt").exists()  # rank 0 checkpointed epoch 1

    resumed = _tdm(prepared, "train", extra=extra)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "after epoch 1" in resumed.stderr
    log = _log(prepared, "round_0")
    assert log["processes"] == 2 and log["epochs_run"] == 4
    verify_manifest(out)
