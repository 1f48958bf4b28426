"""The pipeline end to end at the paper's scale: a UserBehavior-sized corpus through every stage.

Every stage is the real ``tdm`` command, run as its own process on one ``--root``, so each has a
clean peak RSS (``ru_maxrss`` from ``wait4``: the largest of the process and the children it
waited for, e.g. torchrun's ranks):

1. generate: ``tdm generate`` writes a UserBehavior-sized CSV (~1M users, 4.16M items, 9.4k
   categories, ~100M rows) in bounded memory;
2. prepare: the paper's protocol (Sec. 5.1), with ``--test-users`` test users;
3. init-tree: the category tree (Sec. 3.5);
4. train: ``--steps`` optimizer steps of the attention-DNN (``train.optimizer: sparse_adam``),
   in one process with one thread, then in ``train.nproc: 2`` processes of one thread each
   (torchrun, gloo); samples/s from the trainer's log (the steps only, not loading);
5. export-embeddings; 6. relearn-tree (balanced k-means over 4M items);
7. evaluate: beam search (Algorithm 1, k = 10) for the test users, no filtering.

    python benchmarks/corpus_scale.py                      # 100M rows: ~16 GiB free, ~25 min
    python benchmarks/corpus_scale.py --users 100000 --items 416000 --steps 50   # rehearsal

From the samples/s it states the time of one epoch (every training sample once) here; with
``--gpu-samples-per-s`` (a GPU's measured rate) also there. Prints a table and writes
benchmarks/results/corpus_scale_<hostname>.json (``--out-name`` to change the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, result_name, write_result  # noqa: E402

BIN = Path(sys.executable).parent


def run_stage(name: str, cmd: list[str], env: dict, logs: Path) -> dict:
    """Run one command to completion: wall seconds and peak RSS (MiB) of it and its children."""
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"stage {name} failed with status {proc.returncode}: {' '.join(cmd)}")
    return {"stage": name, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=4_162_024)
    parser.add_argument("--categories", type=int, default=9_439)
    parser.add_argument("--behaviours", type=int, default=100, help="per user")
    parser.add_argument("--test-users", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", default="attention_dnn")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--gpu-samples-per-s", type=float, help="a GPU's training rate")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cuda: train once on the GPU (AMP) instead of 1 and 2 CPU processes",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--out-name", default="corpus_scale")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tdm-corpus-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_WAIT_POLICY": "PASSIVE"}
    sets = [
        "data.source=userbehavior",
        f"data.path={work / 'UserBehavior.csv'}",
        f"synthetic.n_users={args.users}",
        f"synthetic.n_items={args.items}",
        f"synthetic.n_categories={args.categories}",
        f"synthetic.n_departments={max(1, args.categories // 94)}",
        f"synthetic.behaviors_per_user={args.behaviours}",
        f"data.n_test_users={args.test_users}",
        f"model.name={args.model}",
        "train.optimizer=sparse_adam",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        "train.epochs=1",
        "train.progress=false",
        "eval.filters=[none]",
        "eval.layerwise=false",
    ]

    def tdm(*command: str, extra: tuple[str, ...] = ()) -> list[str]:
        overrides = [a for s in (*sets, *extra) for a in ("--set", s)]
        params = ["--params", str(ROOT / "params.yaml"), "--root", str(work)]
        return ["tdm", *command, *params, *overrides]

    info = machine_info("cpu")
    print(f"workdir {work}, load {info['load_average_1_5_15']}", flush=True)
    stages = []

    def stage(name: str, cmd: list[str]) -> dict:
        row = run_stage(name, cmd, env, logs)
        stages.append(row)
        print(f"{name:<22}{row['seconds']:>9.1f} s{row['peak_rss_mib']:>10,.0f} MiB", flush=True)
        return row

    try:
        stage("generate", tdm("generate", "--out", str(work / "UserBehavior.csv")))
        csv_bytes = (work / "UserBehavior.csv").stat().st_size
        stage("prepare", tdm("prepare"))
        (work / "UserBehavior.csv").unlink()  # 3 GiB of disk back
        meta = json.loads((work / "prepared/meta.json").read_text())
        stage("init-tree", tdm("init-tree"))
        runs = {}
        trainings = (
            (
                ("train 1 process", ("train.nproc=1", "train.num_threads=1")),
                ("train 2 processes", ("train.nproc=2", "train.num_threads=1")),
            )
            if args.device == "cpu"
            else (("train gpu", (f"train.device={args.device}",)),)
        )
        for label, extra in trainings:
            row = stage(label, tdm("train", "--fresh", extra=extra))
            log = json.loads((work / "models/round_0/train_log.json").read_text())
            row.update(
                samples_per_s=log["samples_per_s"][-1],
                steps=log["steps"],
                train_seconds=log["seconds"],
                processes=log["processes"],
                train_samples=log["samples"],
            )
            runs[label] = row
            print(f"{'':<22}{row['samples_per_s']:>9,.0f} samples/s", flush=True)
        stage("export-embeddings", tdm("export-embeddings"))
        stage("relearn-tree", tdm("relearn-tree"))
        evaluation = stage("evaluate", tdm("evaluate"))
        metrics = json.loads((work / "metrics/round_0.json").read_text())
        evaluation.update(
            users=metrics["users"],
            retrieval_seconds=metrics["retrieval_seconds"],
            ms_per_user=1e3 * metrics["retrieval_seconds"] / metrics["users"],
        )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    samples = int(next(iter(runs.values()))["train_samples"])
    epoch = {"train_samples": samples}
    for label, row in runs.items():
        epoch[f"hours {label}"] = samples / row["samples_per_s"] / 3600
        print(f"one epoch = {samples:,} samples, {label}: {epoch[f'hours {label}']:.2f} h")
    if "train 2 processes" in runs:
        epoch["speedup_2_over_1"] = (
            runs["train 2 processes"]["samples_per_s"] / runs["train 1 process"]["samples_per_s"]
        )
        print(f"2 processes over 1: {epoch['speedup_2_over_1']:.2f}x")
    if args.gpu_samples_per_s:
        epoch["hours_gpu"] = samples / args.gpu_samples_per_s / 3600
    peak = max(r["peak_rss_mib"] for r in stages)
    print(f"peak RSS of any stage: {peak:,.0f} MiB ({peak / 1024:.2f} GiB)")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "machine": info,
        "settings": settings,
        "corpus": {
            "csv_bytes": csv_bytes,
            "n_items": meta["n_items"],
            "n_train_users": meta["n_train_users"],
        },
        "stages": stages,
        "epoch": epoch,
        "peak_rss_mib": peak,
    }
    path = write_result(args.out, result_name(args.out_name, args.device), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
