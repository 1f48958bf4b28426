"""Training throughput: the sampler and data loading alone vs the model step alone.

Data: a seeded synthetic UserBehavior-like log (``tdm.data.synthetic``) run through the real
``prepare`` (Sec. 5.1 protocol), a category tree over its items (Sec. 3.5) and the layer-wise
sampler (Sec. 3.3, ``total_negatives`` spread over the levels). For each model variant:

- sampler alone: what the trainer does on the host for every batch (``tdm.train._batches``:
  ``TrainSamples.batch`` = ``tdm.data.features.train_batch`` histories and windows, then
  ``LayerwiseSampler.sample``, then ``torch.from_numpy``), over length-bucketed shuffled batches;
- step alone: forward + Eq. 4 loss + backward + Adam on batches sampled beforehand and already on
  the device (autocast on CUDA as the trainer does with ``train.amp``);
- end to end: ``tdm.train.train`` for one capped epoch (on CPU the sampler and the step run one
  after the other; on CUDA a thread samples ahead).

Throughput is in (user, node) pairs per second: valid entries of the sampler's mask, i.e. the
positive and negative nodes of every level of every sample. Target: sampler >= 5x the step.

    python benchmarks/training.py                     # 20k users, 100k items, 100 negatives
    python benchmarks/training.py --full              # 100k users, 1M items, 600 negatives too
    python benchmarks/training.py --device cuda

Prints a table and writes benchmarks/results/training_<hostname>[_cuda][_full].json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Before torch loads libgomp: spinning OpenMP threads collapse on shared cores (PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    machine_info,
    print_ops,
    result_name,
    sync,
    top_ops,
    write_result,
)
from tdm.config import DataConfig, ModelConfig, SyntheticConfig, TrainConfig  # noqa: E402
from tdm.data.protocol import load_prepared, prepare  # noqa: E402
from tdm.data.samples import TrainSamples  # noqa: E402
from tdm.data.synthetic import generate  # noqa: E402
from tdm.model import build_model  # noqa: E402
from tdm.sampler import LayerwiseSampler, negatives_for_levels  # noqa: E402
from tdm.train import Optimizers, TrainStep, _batches, bucket_by_length, train  # noqa: E402
from tdm.tree_build import category_tree  # noqa: E402

MODELS = ("attention_dnn", "dnn", "product_dnn")


def make_data(n_users: int, n_items: int, seed: int, workdir: Path):
    """Synthetic log -> prepared folder -> (Prepared, TrainSamples, category tree)."""
    synthetic = SyntheticConfig(
        n_users=n_users,
        n_items=n_items,
        n_categories=max(64, n_items // 100),
        n_departments=32,
        behaviors_per_user=40,
        seed=seed,
    )
    frame = generate(synthetic)
    data_cfg = DataConfig(source="synthetic", path=None, seed=seed)
    prepare(frame, data_cfg, workdir / "prepared")
    del frame
    data = load_prepared(workdir / "prepared")
    source = TrainSamples(data, data_cfg.max_history, data_cfg.min_history)
    items = data.items
    tree = category_tree(
        items["item_index"].to_numpy(), items["category_id"].to_numpy(), arity=2, seed=seed
    )
    return data, source, tree


def epoch_order(source: TrainSamples, batch: int, seed: int) -> np.ndarray:
    """A shuffled, length-bucketed sample order, as the trainer draws one."""
    order = np.random.default_rng([seed, 0]).permutation(source.n_samples)
    return bucket_by_length(order, source.lengths, batch, np.random.default_rng([seed, 0, 1]))


def time_sampler(source, sampler, order, batch, budget, max_batches) -> dict:
    """Host-side batches (histories + sampled nodes as CPU tensors) until the budget."""
    it = _batches(source, sampler, order[: batch * max_batches], batch)
    next(it)  # warm-up
    pairs = samples = batches = 0
    start = time.perf_counter()
    for hist, _windows, _nodes, _labels, mask in it:
        pairs += int(mask.sum())
        samples += len(hist)
        batches += 1
        if time.perf_counter() - start >= budget:
            break
    seconds = time.perf_counter() - start
    return {
        "sampler_batches": batches,
        "sampler_samples_per_s": samples / seconds,
        "sampler_pairs_per_s": pairs / seconds,
        "sampler_ms_per_batch": 1e3 * seconds / batches,
        "pairs_per_sample": pairs / samples,
    }


def device_batches(source, sampler, order, batch, n, node_rows, device) -> list[tuple]:
    out = []
    for hist, windows, nodes, labels, mask in _batches(source, sampler, order[: batch * n], batch):
        out.append(
            (
                hist.to(device),
                windows.to(device),
                node_rows[nodes.to(device)],
                labels.to(device),
                mask.to(device),
            )
        )
    return out


def make_step(model, device: str, amp: bool, optimizer: str = "adam") -> TrainStep:
    """The trainer's own step (``tdm.train.TrainStep``, ``train.optimizer``) on a batch already
    on the device."""
    optimizers = Optimizers(model, TrainConfig(lr=1e-3, optimizer=optimizer))
    return TrainStep(model, optimizers, torch.device(device), amp)


def time_step(step, batches, device, budget) -> dict:
    step(*batches[0])  # warm-up (allocations, Adam state)
    sync(device)
    pairs = samples = n = 0
    start = time.perf_counter()
    while True:
        b = batches[n % len(batches)]
        step(*b)
        pairs += int(b[4].sum())
        samples += len(b[0])
        n += 1
        if n >= len(batches) and time.perf_counter() - start >= budget:
            break
        if n % len(batches) == 0:
            sync(device)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "step_batches": n,
        "step_samples_per_s": samples / seconds,
        "step_pairs_per_s": pairs / seconds,
        "step_ms_per_batch": 1e3 * seconds / n,
    }


def end_to_end(model, tree, source, sampler, args, n_samples) -> dict:
    cfg = TrainConfig(
        epochs=1,
        batch_size=args.batch,
        device=args.device,
        amp=args.amp,
        num_threads=args.threads,
        seed=args.seed,
        max_samples_per_epoch=n_samples,
        optimizer=args.optimizer,
        progress=False,
    )
    result = train(model, tree, source, sampler, cfg, device=args.device)
    stats = result.stats[-1]
    return {
        "train_pairs_per_s": stats["pairs_per_s"],
        "train_samples_per_s": stats["samples_per_s"],
        "train_samples": stats["samples"],
    }


def profile_sampler(source, sampler, order, batch, n) -> list[dict]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in _batches(source, sampler, order[: batch * n], batch):
        pass
    prof.disable()
    stream = io.StringIO()
    stats = pstats.Stats(prof, stream=stream)
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append(
            {
                "name": f"{Path(file).name}:{line}({func})",
                "calls": calls,
                "tottime_ms": 1e3 * tottime,
                "cumtime_ms": 1e3 * cumtime,
            }
        )
    rows.sort(key=lambda r: -r["tottime_ms"])
    total = sum(r["tottime_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["tottime_ms"] / total
    return rows[:12]


def profile_step(step, batches, device) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for b in batches[:3]:
            step(*b)
        sync(device)
    return top_ops(prof)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--negatives", default="100", help="total negatives per sample, list")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=256, help="samples per step (train.batch)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--max-batches", type=int, default=200)
    parser.add_argument("--full", action="store_true", help="100k users, 1M items, 100 and 600")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sparse_adam"])
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-train", action="store_true", help="skip the end-to-end epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--out-name", default="training", help="file stem of the JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.full:
        args.users, args.items, args.negatives = 100_000, 1_000_000, "100,600"
        args.budget *= 2
    torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    load = info["load_average_1_5_15"]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, load {load}")

    with tempfile.TemporaryDirectory(prefix="tdm-bench-train-") as tmp:
        start = time.perf_counter()
        data, source, tree = make_data(args.users, args.items, args.seed, Path(tmp))
        print(
            f"data: {source.n_samples} samples, {data.n_items} items, tree depth {tree.depth}, "
            f"{tree.n_nodes} nodes ({time.perf_counter() - start:.1f} s to generate and prepare)"
        )
    order = epoch_order(source, args.batch, args.seed)
    node_rows = torch.as_tensor(tree.embedding_rows(), device=args.device)
    header = (
        f"{'model':<14}{'neg':>5}{'pairs/sample':>13}{'sampler pairs/s':>16}{'step pairs/s':>14}"
        f"{'ratio':>7}{'sampler ms':>11}{'step ms':>9}{'train pairs/s':>15}"
    )
    print(header)
    print("-" * len(header))
    results, profiles = [], {}
    for total in [int(x) for x in args.negatives.split(",") if x]:
        negatives = negatives_for_levels(tree.level_sizes, total)
        sampler = LayerwiseSampler(tree, negatives, seed=args.seed)
        host = time_sampler(source, sampler, order, args.batch, args.budget, args.max_batches)
        if not args.no_profile:
            profiles[f"sampler_neg{total}"] = profile_sampler(
                source, sampler, order, args.batch, 20
            )
        batches = device_batches(source, sampler, order, args.batch, 16, node_rows, args.device)
        for name in [m for m in args.models.split(",") if m]:
            model = build_model(ModelConfig(name=name), tree.n_nodes, data.meta["time_windows"], 0)
            model.to(args.device).train()
            step = make_step(model, args.device, args.amp, args.optimizer)
            dev = time_step(step, batches, args.device, args.budget)
            if not args.no_profile:
                profiles[f"step_{name}_neg{total}"] = profile_step(step, batches, args.device)
            row = {
                "model": name,
                "total_negatives": total,
                "negatives_per_level": negatives,
                "batch": args.batch,
                **host,
                **dev,
            }
            row["sampler_over_step"] = row["sampler_pairs_per_s"] / row["step_pairs_per_s"]
            if not args.no_train:
                n = max(args.batch * 8, int(row["step_samples_per_s"] * args.budget))
                model = build_model(
                    ModelConfig(name=name), tree.n_nodes, data.meta["time_windows"], 0
                )
                row.update(end_to_end(model, tree, source, sampler, args, n))
            results.append(row)
            print(
                f"{name:<14}{total:>5}{row['pairs_per_sample']:>13.1f}"
                f"{row['sampler_pairs_per_s']:>16,.0f}{row['step_pairs_per_s']:>14,.0f}"
                f"{row['sampler_over_step']:>7.1f}x{row['sampler_ms_per_batch']:>10.1f}"
                f"{row['step_ms_per_batch']:>9.1f}"
                f"{row.get('train_pairs_per_s', float('nan')):>15,.0f}",
                flush=True,
            )
    print(
        f"pairs: valid (user, node) pairs; sampler: tdm.train._batches on the host; step: forward "
        f"+ backward + Adam on device batches of {args.batch} samples;\nratio: sampler/step "
        "(target >= 5); train: tdm.train.train, one capped epoch, end to end."
    )
    for key, ops in profiles.items():
        if key.startswith("sampler"):
            print(f"  profile: {key} (cProfile, top by own time):")
            for r in ops[:8]:
                print(f"    {r['name']:<52} {r['tottime_ms']:>8.1f} ms {100 * r['share']:>5.1f}%")
        else:
            print_ops(f"profile: {key}, 3 steps", ops[:8])
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(
        n_samples=int(source.n_samples), n_items=int(data.n_items), tree_depth=int(tree.depth)
    )
    payload = {"machine": info, "settings": settings, "results": results, "profiles": profiles}
    path = write_result(args.out, result_name(args.out_name, args.device, args.full), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
