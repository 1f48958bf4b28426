"""Shared helpers of the benchmark scripts: machine facts, a matmul ceiling, timing, output.

Not a benchmark itself. The scripts put the repository root on ``sys.path`` and import this as
``benchmarks.common``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tdm.runtime import tune_allocator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# As the tdm CLI, the service and the flows do: keep freed memory in the heap (``TDM_MALLOC_TUNE=0``
# measures glibc's defaults instead).
ALLOCATOR_TUNED = tune_allocator()


def machine_info(device: str = "cpu") -> dict:
    """Hostname, CPU model, cores, library versions, torch threads, load average, GPU name."""
    import torch

    info = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "malloc_tuned": ALLOCATOR_TUNED,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]  # CPUs may be shared
    info["threads_env"] = {
        key: os.environ[key]
        for key in (
            "OMP_NUM_THREADS",
            "OMP_WAIT_POLICY",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
            "TDM_MALLOC_TUNE",
        )
        if key in os.environ
    }
    return info


def result_name(stem: str, device: str = "cpu", full: bool = False) -> str:
    """``<stem>_<hostname>[_cuda][_full].json``: as tree_build's on the CPU at the default sizes;
    a GPU run and a ``--full`` run get their own files, so ``make bench`` keeps the full ones."""
    host = socket.gethostname()
    suffix = "" if device == "cpu" else "_" + device.split(":")[0]
    return f"{stem}_{host}{suffix}{'_full' if full else ''}.json"


def write_result(out_dir: Path, name: str, payload: dict) -> Path:
    """``out_dir/name`` as indented JSON, atomically."""
    from tdm.io import write_text

    return write_text(
        Path(out_dir) / name, json.dumps(payload, indent=2, default=_json_default) + "\n"
    )


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], reps: int, device: str = "cpu") -> float:
    """Fastest of ``reps`` timed calls after one warm-up call, in seconds."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(device: str = "cpu", shapes: tuple[tuple[int, int, int], ...] = ()) -> dict:
    """Plain fp32 ``torch.matmul`` GFLOP/s, best of a few calls, measured now.

    Always ``2048^3`` (the machine's ceiling); plus ``shapes`` given as (M, K, N).
    Returns {"MxKxN": GFLOP/s}.
    """
    import torch

    out = {}
    for m, k, n in ((2048, 2048, 2048), *shapes):
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        reps = max(3, min(50, int(2e10 // (2 * m * k * n))))
        seconds = best_time(lambda a=a, b=b: a @ b, reps, device)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
    return out


def max_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def top_ops(prof, n: int = 12) -> list[dict]:
    """The ``n`` operators of a torch.profiler run with the most self time (CPU, or CUDA)."""
    rows = []
    for event in prof.key_averages():
        self_us = event.self_cpu_time_total
        device_us = getattr(event, "self_device_time_total", 0) or 0
        rows.append(
            {
                "name": event.key,
                "self_cpu_ms": self_us / 1e3,
                "self_device_ms": device_us / 1e3,
                "calls": event.count,
            }
        )
    key = "self_device_ms" if any(r["self_device_ms"] > 0 for r in rows) else "self_cpu_ms"
    rows.sort(key=lambda r: -r[key])
    total = sum(r[key] for r in rows) or 1.0
    for r in rows:
        r["share"] = r[key] / total
    return rows[:n]


def print_ops(title: str, rows: list[dict]) -> None:
    key = "self_device_ms" if any(r["self_device_ms"] > 0 for r in rows) else "self_cpu_ms"
    print(f"  {title} (top operators by {key.replace('_', ' ')}):")
    for r in rows:
        print(f"    {r['name']:<36} {r[key]:>9.1f} ms {100 * r['share']:>5.1f}%  x{r['calls']}")
