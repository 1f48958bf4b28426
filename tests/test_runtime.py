"""tdm.runtime.tune_allocator: freed memory stays in the process, not faulted in again."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)

# Six live 8 MB blocks, freed together, ten times over: the pattern of a scoring call's
# temporaries. Minor page faults are counted from the third round on.
PROBE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from tdm.runtime import tune_allocator
applied = tune_allocator()
faults = 0
for round_ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(1 << 20) for _ in range(6)]  # 8 MB each, every page touched
    del blocks
    if round_ >= 2:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def test_tuned_allocator_reuses_freed_blocks_without_new_page_faults():
    tuned, default = _probe(), _probe(TDM_MALLOC_TUNE="0")
    assert tuned["applied"] is True
    assert default["applied"] is False  # the switch leaves glibc's defaults
    pages = 8 * 6 * 8 * (1 << 20) // 4096  # eight rounds of 48 MB
    # glibc's defaults hand the blocks back each round (fewer faults than pages: the kernel may
    # map some of them as huge pages)
    assert default["faults"] > pages // 10
    assert tuned["faults"] < pages // 100


def test_tune_allocator_is_applied_once_per_process():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; sys.path.insert(0, sys.argv[1]); from tdm import runtime;"
            "first = runtime.tune_allocator(); os.environ['TDM_MALLOC_TUNE'] = '0';"
            "print(first, runtime.tune_allocator(), runtime._applied)",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["True", "True", "True"]
