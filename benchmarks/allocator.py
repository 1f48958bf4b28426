"""The allocator settings of ``tdm.runtime.tune_allocator`` against glibc's defaults, in turns.

Each round runs three hot paths once with the settings (``TDM_MALLOC_TUNE=1``, what the tdm CLI,
service, flows and benchmarks apply) and once without (``TDM_MALLOC_TUNE=0``), in alternating
order, each as its own process, so that a drift of the machine's speed hits both:

- ``beam``: ``benchmarks/beam_search.py`` at 1M leaves, k = 10, one torch thread (the service's
  setting): the p50 of a one-user search and the batched ms per user (256 users a call);
- ``jtm``: ``benchmarks/jtm.py`` with the attention-DNN at 10k items: seconds of tree learning;
- ``train``: ``benchmarks/training.py`` (20k users, 100k items, two threads): ms per training
  step of the attention-DNN and the DNN (batch 256, sampled beforehand).

The system CPU time of every process is reported next to it: page faults on freshly mapped
memory show up there.

    python benchmarks/allocator.py                     # 2 rounds of all three
    python benchmarks/allocator.py --rounds 1 --only beam
    python benchmarks/allocator.py --rounds 1 --smoke  # tiny sizes, seconds (the tests)

Prints a table and writes benchmarks/results/allocator_<hostname>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.common import RESULTS, machine_info, result_name, write_result  # noqa: E402

BENCH = Path(__file__).resolve().parent
Reader = Callable[[], dict]


def _report(out: Path, stem: str) -> dict:
    return json.loads(next(out.glob(f"{stem}_*.json")).read_text())


def _beam(out: Path, smoke: bool) -> tuple[list[str], Reader]:
    size = ["--leaves", "1000000", "--budget", "2"]
    if smoke:
        size = ["--leaves", "3000", "--budget", "0", "--max-batches", "2", "--max-single", "2"]
        size += ["--brute-budget", "0", "--max-brute", "1"]
    cmd = ["beam_search.py", *size, "--models", "attention_dnn,dnn", "--ks", "10"]
    cmd += ["--threads", "1", "--no-profile", "--out", str(out)]

    def read() -> dict:
        report = _report(out, "beam_search")
        row = {"beam malloc_tuned": report["machine"]["malloc_tuned"]}
        for r in report["results"]:
            row[f"{r['model']} 1-user p50 ms"] = r["single_ms_p50"]
            row[f"{r['model']} ms/user"] = r["ms_per_user_batched"]
        return row

    return cmd, read


def _jtm(out: Path, smoke: bool) -> tuple[list[str], Reader]:
    items = 300 if smoke else 10_000
    cmd = ["jtm.py", "--items", str(items), "--model", "attention_dnn", "--out", str(out)]

    def read() -> dict:
        report = _report(out, "jtm")
        (r,) = report["results"]
        return {
            "jtm malloc_tuned": report["machine"]["malloc_tuned"],
            "jtm attention_dnn s": r["seconds"],
            "jtm peak RSS MiB": r["peak_rss_mib"],
        }

    return cmd, read


def _train(out: Path, smoke: bool) -> tuple[list[str], Reader]:
    size = ["--budget", "3"]
    if smoke:
        size = ["--users", "300", "--items", "600", "--budget", "0", "--max-batches", "3"]
    cmd = ["training.py", *size, "--models", "attention_dnn,dnn", "--no-profile", "--no-train"]
    cmd += ["--out", str(out)]

    def read() -> dict:
        report = _report(out, "training")
        row = {"train malloc_tuned": report["machine"]["malloc_tuned"]}
        for r in report["results"]:
            row[f"train {r['model']} step ms"] = r["step_ms_per_batch"]
        return row

    return cmd, read


PATHS = {"beam": _beam, "jtm": _jtm, "train": _train}


def run_one(name: str, tuned: bool, smoke: bool = False) -> dict:
    """One process of benchmark ``name``; its metrics plus wall, user and system seconds."""
    with tempfile.TemporaryDirectory(prefix="tdm-alloc-") as tmp:
        cmd, read = PATHS[name](Path(tmp), smoke)
        env = {**os.environ, "TDM_MALLOC_TUNE": "1" if tuned else "0"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(BENCH / cmd[0]), *cmd[1:]],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row = read()
    row[f"{name} wall s"] = wall
    row[f"{name} user s"] = after.ru_utime - before.ru_utime
    row[f"{name} sys s"] = after.ru_stime - before.ru_stime
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(PATHS), help="comma-separated: beam,jtm,train")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(PATHS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {sorted(PATHS)}")

    runs: dict[str, list[dict]] = {"tuned": [], "glibc": []}
    for round_ in range(args.rounds):
        order = [True, False] if round_ % 2 == 0 else [False, True]
        for tuned in order:
            row: dict = {}
            for name in names:
                row.update(run_one(name, tuned, args.smoke))
            runs["tuned" if tuned else "glibc"].append(row)
            print(f"round {round_ + 1} {'tuned' if tuned else 'glibc'}: done", flush=True)

    keys = [key for key in runs["tuned"][0] if not key.endswith("malloc_tuned")]
    table = []
    print(f"\n{'metric':<34}{'glibc defaults':>28}{'tuned':>28}{'change':>9}")
    for key in keys:
        old = [r[key] for r in runs["glibc"]]
        new = [r[key] for r in runs["tuned"]]
        change = statistics.mean(new) / statistics.mean(old) - 1 if statistics.mean(old) else 0.0
        table.append({"metric": key, "glibc": old, "tuned": new, "change": change})
        fmt = " / ".join(f"{v:.2f}" for v in old), " / ".join(f"{v:.2f}" for v in new)
        print(f"{key:<34}{fmt[0]:>28}{fmt[1]:>28}{change:>+9.0%}")
    path = write_result(
        args.out,
        result_name("allocator"),
        {
            "machine": machine_info(),
            "settings": {**vars(args), "out": str(args.out)},
            "rows": table,
            "runs": runs,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
