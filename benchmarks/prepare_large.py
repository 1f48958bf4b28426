"""Data preparation at UserBehavior scale: load -> protocol split -> training samples.

A UserBehavior-format CSV of ``--rows`` rows is generated first (never committed; deleted at the
end unless ``--keep``) by ``tdm.data.synthetic.write_synthetic_csv`` at UserBehavior's shape, what
``tdm generate`` writes with the overrides in that module's docstring: ~100 behaviours per user
(UserBehavior: 100M rows over 988k users), 4,162,024 items in 9,439 categories, generated in
chunks of ~2M rows (``synthetic.chunk_rows``; one shared item corpus, each chunk its own users)
appended to one file, and cut at exactly ``--rows`` rows.

Then one fresh subprocess runs what ``tdm pipeline`` runs in one process for these steps, and
reports wall time and peak RSS (``ru_maxrss``) after each:

1. load: ``tdm.data.loaders.load_userbehavior`` (pyarrow, narrow types);
2. split: ``tdm.data.protocol.prepare`` (users >= 10 behaviours, test/validation users, dense item
   indices, (user, time) sort, window bounds) writing the prepared folder; the frame is freed;
3. samples: ``load_prepared`` + ``tdm.data.samples.TrainSamples`` (positions and history lengths of
   every training sample).

    python benchmarks/prepare_large.py                  # 20M rows
    python benchmarks/prepare_large.py --full           # 100M rows (UserBehavior's size)
    python benchmarks/prepare_large.py --rows 30000000 --workdir /tmp/ub

Before generating, the memory the run will need (~110 bytes per row at peak, measured) is checked
against MemAvailable; the run stops with a message when it does not fit (``--force`` overrides).
Prints a table and writes benchmarks/results/prepare_large_<hostname>.json (100M rows: _full.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tdm.config import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, result_name, write_result  # noqa: E402

N_ITEMS = 4_162_024  # UserBehavior's items
N_CATEGORIES = 9_439  # and categories
N_DEPARTMENTS = 100  # ~94 categories each (UserBehavior has no departments)
BEHAVIOURS_PER_USER = 100
PEAK_BYTES_PER_ROW = 110  # measured peak of the worker per CSV row (see PERFORMANCE.md)


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc/self/status, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def synthetic_config(rows: int, seed: int) -> SyntheticConfig:
    """The ``synthetic`` section at UserBehavior's shape with enough users for ``rows`` rows."""
    from tdm.config import SyntheticConfig

    return SyntheticConfig(
        n_users=int(rows / BEHAVIOURS_PER_USER * 1.01) + 100,  # a margin: the cut takes ``rows``
        n_items=N_ITEMS,
        n_categories=N_CATEGORIES,
        n_departments=N_DEPARTMENTS,
        behaviors_per_user=BEHAVIOURS_PER_USER,
        seed=seed,
    )


def generate_csv(path: Path, rows: int, seed: int) -> dict:
    """Write exactly ``rows`` UserBehavior rows to ``path``; returns counts and seconds."""
    from tdm.data.synthetic import write_synthetic_csv

    start = time.perf_counter()
    written = write_synthetic_csv(
        synthetic_config(rows, seed),
        path,
        max_rows=rows,
        progress=lambda done: print(f"  generated {done:,} rows", flush=True),
    )
    return {
        "rows": written,
        "generate_seconds": time.perf_counter() - start,
        "csv_bytes": path.stat().st_size,
    }


def worker(csv_path: Path, out_dir: Path, profile: bool = False) -> dict:
    """load -> split -> samples in this process; time and peak RSS after each step.

    With ``profile`` the whole sequence runs under cProfile and the top functions by own time
    are returned too (the timings then include the profiler's overhead).
    """
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(worker, csv_path, out_dir)
        stats = pstats.Stats(prof).stats
        rows = [
            {"name": f"{Path(f).name}:{line}({fn})", "calls": c, "tottime_s": tt, "cumtime_s": ct}
            for (f, line, fn), (_cc, c, tt, ct, _callers) in stats.items()
        ]
        rows.sort(key=lambda r: -r["tottime_s"])
        result["profile"] = rows[:15]
        return result
    from tdm.config import DataConfig
    from tdm.data.loaders import load_userbehavior
    from tdm.data.protocol import load_prepared, prepare
    from tdm.data.samples import TrainSamples

    cfg = DataConfig(source="userbehavior", path=str(csv_path))
    steps = []
    t0 = time.perf_counter()

    def mark(name: str, start: float, **extra) -> float:
        now = time.perf_counter()
        steps.append(
            {
                "step": name,
                "seconds": now - start,
                "rss_mib": _status_mib("VmRSS"),
                "peak_rss_mib": _status_mib("VmHWM"),
                **extra,
            }
        )
        return now

    start = t0
    frame = load_userbehavior(csv_path)
    rows = len(frame)
    start = mark("load", start, rows=rows)
    meta = prepare(frame, cfg, out_dir)
    del frame
    start = mark("split", start, **{k: meta[k] for k in ("n_items", "n_users", "n_train_samples")})
    data = load_prepared(out_dir)
    source = TrainSamples(data, cfg.max_history, cfg.min_history)
    mark("samples", start, n_samples=int(source.n_samples))
    return {
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": _status_mib("VmHWM"),
        "steps": steps,
        "meta": {k: v for k, v in meta.items() if k != "data"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--full", action="store_true", help="100M rows")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir in /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the CSV and prepared folder")
    parser.add_argument("--force", action="store_true", help="run even if memory looks short")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="cProfile the measured steps")
    parser.add_argument("--worker", nargs=2, metavar=("CSV", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]), args.profile)))
        return 0

    rows = 100_000_000 if args.full else args.rows
    need = rows * PEAK_BYTES_PER_ROW / 2**30
    free = mem_available_gib()
    print(f"{rows:,} rows: expect ~{need:.1f} GiB peak; MemAvailable {free:.1f} GiB")
    if need > free - 2.0 and not args.force:
        print("not enough free memory for this size (others share the machine)", file=sys.stderr)
        return 3
    made = args.workdir is None or not args.workdir.exists()  # only then is it ours to remove
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tdm-bench-prepare-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    csv_path = workdir / "UserBehavior.csv"
    try:
        gen = generate_csv(csv_path, rows, args.seed)
        print(
            f"generated {gen['rows']:,} rows, {gen['csv_bytes'] / 2**30:.2f} GiB, "
            f"in {gen['generate_seconds']:.0f} s; MemAvailable {mem_available_gib():.1f} GiB"
        )
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        cmd += [str(csv_path), str(workdir / "prepared")] + (["--profile"] if args.profile else [])
        wall = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - wall
        if proc.returncode != 0:
            print(f"worker failed:\n{proc.stderr}", file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            csv_path.unlink(missing_ok=True)
            shutil.rmtree(workdir / "prepared", ignore_errors=True)
            if made:
                shutil.rmtree(workdir, ignore_errors=True)
    result.update(gen)
    result["process_wall_seconds"] = wall  # including interpreter start and imports
    header = f"{'step':<9}{'seconds':>9}{'RSS MiB':>10}{'peak MiB':>10}  detail"
    print(header)
    print("-" * len(header))
    for s in result["steps"]:
        detail = ", ".join(
            f"{k} {v:,}"
            for k, v in s.items()
            if k not in ("step", "seconds", "rss_mib", "peak_rss_mib")
        )
        print(
            f"{s['step']:<9}{s['seconds']:>9.1f}{s['rss_mib']:>10.0f}{s['peak_rss_mib']:>10.0f}  "
            f"{detail}"
        )
    peak_gib = result["peak_rss_mib"] / 1024
    print(
        f"total    {result['seconds']:>9.1f}{'':>10}{result['peak_rss_mib']:>10.0f}  "
        f"{result['rows']:,} rows: {peak_gib:.2f} GiB peak "
        f"({'meets' if peak_gib <= 16 else 'MISSES'} the 16 GiB target), "
        f"{result['peak_rss_mib'] * 2**20 / result['rows']:.0f} bytes/row"
    )
    if "profile" in result:
        print("profile (cProfile, top by own time; timings above include its overhead):")
        for r in result["profile"][:10]:
            print(f"  {r['name']:<60} {r['tottime_s']:>7.1f} s  x{r['calls']}")
    info = machine_info("cpu")
    payload = {"machine": info, "settings": {"rows": rows, "seed": args.seed}, "result": result}
    path = write_result(args.out, result_name("prepare_large", full=rows == 100_000_000), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
