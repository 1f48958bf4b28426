"""Training step time against corpus size, per model and optimizer, side by side in one run.

A step is the trainer's own (``tdm.train.TrainStep`` with ``tdm.train.Optimizers``): forward,
Eq. 4 loss, backward and the optimizer update, on batches already on the device. For every corpus
size a complete binary tree over that many items is built and batches are drawn the way the
trainer draws them: histories of ``max_history`` items from a Zipf-like popularity over the whole
corpus (so a step touches a few thousand rows of a table of millions), targets from the same law,
nodes from the layer-wise sampler (``total_negatives`` over the levels). The sizes are measured
round-robin (every repetition times every size once), so a change of machine load hits all of
them alike, and the ratio to the smallest size is taken of the medians.

The optimizer's state memory is the bytes of its state tensors after the warm-up steps.

    python benchmarks/step_scaling.py                                   # 100k and 4M items
    python benchmarks/step_scaling.py --items 100000,1000000 --models product_dnn --reps 3

Prints a table and writes benchmarks/results/step_scaling_<hostname>[_cuda].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, machine_info, result_name, sync, write_result  # noqa: E402
from tdm.config import ModelConfig, TrainConfig  # noqa: E402
from tdm.model import build_model  # noqa: E402
from tdm.sampler import LayerwiseSampler, negatives_for_levels  # noqa: E402
from tdm.train import Optimizers, TrainStep  # noqa: E402
from tdm.tree import Tree  # noqa: E402

MODELS = ("attention_dnn", "dnn", "product_dnn")
OPTIMIZERS = ("adam", "sparse_adam")


def zipf_items(rng: np.random.Generator, n_items: int, shape, a: float = 1.1) -> np.ndarray:
    """Item indices with popularity ~ rank^-a over the whole corpus (a random rank order)."""
    ranks = np.minimum(rng.zipf(a, size=shape) - 1, n_items - 1)
    return (ranks * 2654435761) % n_items  # a fixed scramble: popular items spread over the ids


def make_batches(tree: Tree, args, rng: np.random.Generator, device: str) -> list[tuple]:
    n_items = tree.n_items
    sampler = LayerwiseSampler(
        tree, negatives_for_levels(tree.level_sizes, args.negatives), seed=args.seed
    )
    rows = torch.as_tensor(tree.embedding_rows(), device=device)
    out = []
    for _ in range(args.batches):
        hist = zipf_items(rng, n_items, (args.batch, args.max_history))  # (B, L)
        windows = np.sort(rng.integers(0, 10, hist.shape), axis=1)[:, ::-1].copy()  # (B, L)
        targets = zipf_items(rng, n_items, args.batch)
        nodes, labels, mask = sampler.sample(targets)
        out.append(
            (
                torch.as_tensor(hist, device=device),
                torch.as_tensor(windows, device=device),
                rows[torch.as_tensor(nodes, device=device)],
                torch.as_tensor(labels, device=device),
                torch.as_tensor(mask, device=device),
            )
        )
    return out


def state_bytes(optimizer: Optimizers) -> int:
    return sum(
        t.numel() * t.element_size()
        for part in optimizer.parts
        for state in part.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="100000,4000000", help="corpus sizes, comma-separated")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--batch", type=int, default=256, help="samples per step")
    parser.add_argument("--negatives", type=int, default=100, help="total negatives per sample")
    parser.add_argument("--max-history", type=int, default=69)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches per size")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=5, help="round-robin repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.items.split(",") if x]
    info = machine_info(args.device)
    load = info["load_average_1_5_15"]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, load {load}")
    trees = {n: Tree.from_ordered_items(np.arange(n), arity=2) for n in sizes}
    rng = np.random.default_rng(args.seed)
    batches = {n: make_batches(trees[n], args, rng, args.device) for n in sizes}
    header = (
        f"{'model':<14}{'optimizer':<12}{'items':>10}{'step ms':>9}{'p10-p90 ms':>15}"
        f"{'x smallest':>11}{'rows touched':>13}{'table MiB':>10}{'opt state MiB':>14}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for name in [m for m in args.models.split(",") if m]:
        for kind in [o for o in args.optimizers.split(",") if o]:
            steps = {}
            for n in sizes:
                model = build_model(ModelConfig(name=name), trees[n].n_nodes, 10, seed=0)
                model.to(args.device).train()
                cfg = TrainConfig(optimizer=kind, lr=1e-3, device=args.device)
                optimizer = Optimizers(model, cfg)
                step = TrainStep(model, optimizer, torch.device(args.device), amp=True)
                for b in batches[n][:2]:  # warm-up: allocations, optimizer state
                    step(*b)
                steps[n] = (model, optimizer, step)
            times: dict[int, list[float]] = {n: [] for n in sizes}
            for rep in range(args.reps):
                for n in sizes:
                    step = steps[n][2]
                    sync(args.device)
                    for i in range(args.steps):
                        b = batches[n][(rep * args.steps + i) % len(batches[n])]
                        t0 = time.perf_counter()
                        step(*b)
                        sync(args.device)
                        times[n].append(1e3 * (time.perf_counter() - t0))
            base = float(np.median(times[sizes[0]]))
            for n in sizes:
                model, optimizer, _ = steps[n]
                touched = len(
                    np.unique(
                        np.concatenate(
                            [b[0].cpu().numpy().ravel() for b in batches[n]]
                            + [b[2].cpu().numpy().ravel() for b in batches[n]]
                        )
                    )
                ) / len(batches[n])
                row = {
                    "model": name,
                    "optimizer": kind,
                    "items": n,
                    "nodes": int(trees[n].n_nodes),
                    "step_ms_median": float(np.median(times[n])),
                    "step_ms_p10": float(np.percentile(times[n], 10)),
                    "step_ms_p90": float(np.percentile(times[n], 90)),
                    "over_smallest": float(np.median(times[n])) / base,
                    "rows_touched_per_step_approx": touched,
                    "table_mib": model.embedding.weight.numel() * 4 / 2**20,
                    "optimizer_state_mib": state_bytes(optimizer) / 2**20,
                    "samples_per_s": args.batch / (float(np.median(times[n])) / 1e3),
                    "step_ms": times[n],
                }
                results.append(row)
                print(
                    f"{name:<14}{kind:<12}{n:>10,}{row['step_ms_median']:>9.1f}"
                    f"{row['step_ms_p10']:>8.1f}-{row['step_ms_p90']:<6.1f}"
                    f"{row['over_smallest']:>10.2f}x{touched:>13,.0f}"
                    f"{row['table_mib']:>10.0f}{row['optimizer_state_mib']:>14.0f}",
                    flush=True,
                )
            del steps
    print(
        "step: forward + Eq. 4 + backward + optimizer update of batches of "
        f"{args.batch} samples on {args.device}; median of {args.reps} x {args.steps} steps per "
        "size, sizes round-robin; x smallest: median over the smallest size's median."
    )
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"machine": info, "settings": settings, "results": results}
    path = write_result(args.out, result_name("step_scaling", args.device), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
