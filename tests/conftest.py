"""Test-session settings that must be in place before torch, prefect or mlflow are imported, and
the real local Prefect server the deployment tests share."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# Sleeping (not spinning) OpenMP threads: on a busy 2-core machine spinning threads slow every
# process down 5-20x (docs/PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The allocator settings of the tdm CLI, service and flows (tdm/runtime.py).
from tdm.runtime import tune_allocator  # noqa: E402

tune_allocator()

# One Prefect home for the whole session (profiles, the SQLite database of a server a test
# starts), never ~/.prefect; removed when the session ends. No telemetry from any tool.
PREFECT_HOME = tempfile.mkdtemp(prefix="tdm-prefect-home-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"

BIN = Path(sys.executable).parent


def pytest_unconfigure(config):
    shutil.rmtree(PREFECT_HOME, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def prefect_server():
    """``prefect server start`` on a free loopback port for the session (its SQLite database in
    the session's ``PREFECT_HOME``). Yields the environment for processes that use it:
    ``PREFECT_API_URL``, telemetry off, quick runner and worker polling, ``.venv/bin`` on
    ``PATH``. Stopped with SIGTERM by PID at the end."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise TimeoutError(f"prefect server at {url} not healthy after 90 s")
            time.sleep(0.5)
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
