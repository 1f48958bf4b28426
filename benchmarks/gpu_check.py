"""Correctness on a GPU against the CPU, same weights: beam search and a few training steps.

1. Beam search (Algorithm 1): a 100k-leaf tree, ``dnn`` and ``attention_dnn`` with seeded random
   weights, 512 users, k = 10 and 50: the items returned on ``--device`` and on the CPU (fp32,
   TF32 off) must agree: >= 99% of users with identical lists and >= 99.9% of all items shared
   (a near-tie in float32 may swap two neighbours on a rare user), scores within 1e-3.
2. Training (``tdm.train.train`` on a small synthetic prepared set, 3 short epochs, the same
   seeds): the per-epoch losses on ``--device`` must equal the CPU's within 1e-3 relative in fp32
   and within 3e-2 with autocast (bf16), for ``attention_dnn``, ``dnn`` and ``product_dnn``.

    python benchmarks/gpu_check.py --device cuda       # what benchmarks/gpu.sh runs
    python benchmarks/gpu_check.py --device cpu        # dry run of the same code (CPU vs CPU)

Exits 1 on any mismatch; writes gpu_check_<hostname>[_cuda].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.beam_search import make_users  # noqa: E402
from benchmarks.common import RESULTS, machine_info, result_name, write_result  # noqa: E402
from benchmarks.training import make_data  # noqa: E402
from tdm.config import ModelConfig, TrainConfig  # noqa: E402
from tdm.model import build_model  # noqa: E402
from tdm.retrieval import beam_search  # noqa: E402
from tdm.sampler import LayerwiseSampler, negatives_for_levels  # noqa: E402
from tdm.train import train  # noqa: E402
from tdm.tree import Tree  # noqa: E402

MIN_SAME_ROWS = 0.99
MIN_SHARED_ITEMS = 0.999
SCORE_ATOL = 1e-3
LOSS_RTOL = {"fp32": 1e-3, "amp": 3e-2}


def check_beam(device: str, leaves: int, users: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    tree = Tree.from_ordered_items(rng.permutation(leaves), arity=2)
    hist, windows = make_users(users, leaves, rng)
    rows = []
    for name in ("dnn", "attention_dnn"):
        model = build_model(ModelConfig(name=name), tree.n_nodes, 10, seed=seed).eval()
        for k in (10, 50):
            cpu_items, cpu_scores = beam_search(model, tree, hist, windows, k, device="cpu")
            model.to(device)
            start = time.perf_counter()
            dev_items, dev_scores = beam_search(model, tree, hist, windows, k, device=device)
            seconds = time.perf_counter() - start
            model.to("cpu")
            same = (cpu_items == dev_items).all(axis=1)
            shared = np.mean(
                [len(np.intersect1d(a, b)) / k for a, b in zip(cpu_items, dev_items, strict=True)]
            )
            both = cpu_items == dev_items
            diff = float(np.abs(cpu_scores[both] - dev_scores[both]).max()) if both.any() else 0.0
            ok = same.mean() >= MIN_SAME_ROWS and shared >= MIN_SHARED_ITEMS and diff <= SCORE_ATOL
            rows.append(
                {
                    "model": name,
                    "k": k,
                    "users": users,
                    "same_rows": float(same.mean()),
                    "shared_items": float(shared),
                    "max_score_diff": diff,
                    "device_seconds": seconds,
                    "ok": bool(ok),
                }
            )
            print(
                f"beam   {name:<14} k={k:<3} identical users {same.mean():7.2%}  shared items "
                f"{shared:7.2%}  max |score diff| {diff:.2e}  {'ok' if ok else 'MISMATCH'}",
                flush=True,
            )
    return rows


def check_training(device: str, seed: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="tdm-gpu-check-") as tmp:
        data, source, tree = make_data(2_000, 5_000, seed, Path(tmp))
    negatives = negatives_for_levels(tree.level_sizes, 100)
    rows = []
    for name in ("attention_dnn", "dnn", "product_dnn"):
        for mode in ("fp32", "amp"):
            losses = {}
            for dev in ("cpu", device):
                cfg = TrainConfig(
                    epochs=3,
                    batch_size=256,
                    device=dev,
                    amp=mode == "amp",
                    seed=seed,
                    max_samples_per_epoch=1_024,
                    bucket_by_length=True,
                    progress=False,
                )
                model = build_model(ModelConfig(name=name), tree.n_nodes, 10, seed=seed)
                sampler = LayerwiseSampler(tree, negatives, seed=seed)
                losses[dev] = train(model, tree, source, sampler, cfg, device=dev).losses
            cpu, other = np.asarray(losses["cpu"]), np.asarray(losses[device])
            rel = float(np.max(np.abs(cpu - other) / np.abs(cpu)))
            # autocast is CUDA-only in the trainer: on a CPU dry run both sides are fp32
            ok = rel <= LOSS_RTOL[mode]
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "cpu_losses": cpu.tolist(),
                    "device_losses": other.tolist(),
                    "max_rel_diff": rel,
                    "ok": bool(ok),
                }
            )
            print(
                f"train  {name:<14} {mode:<5} cpu {np.round(cpu, 5).tolist()}  {device} "
                f"{np.round(other, 5).tolist()}  max rel diff {rel:.1e}  "
                f"{'ok' if ok else 'MISMATCH'}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--leaves", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(
                "gpu_check: --device cuda but torch.cuda.is_available() is False", file=sys.stderr
            )
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    beam = check_beam(args.device, args.leaves, args.users, args.seed)
    training = check_training(args.device, args.seed)
    ok = all(r["ok"] for r in beam + training)
    payload = {
        "machine": machine_info(args.device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "beam_search": beam,
        "training": training,
        "ok": ok,
    }
    path = write_result(args.out, result_name("gpu_check", args.device), payload)
    print(f"{'all checks passed' if ok else 'CHECKS FAILED'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
