"""The flow served as a deployment on a real local Prefect server, triggered through its API.

The server and the served flow share the test session's ``PREFECT_HOME`` (tests/conftest.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny import TINY as BASE_TINY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = BASE_TINY + ["rounds.count=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {seconds} s")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    procs = [
        subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        _wait(lambda: _healthy(url), 90, "prefect server")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flows.serve",
                    "--name",
                    "test",
                    "--params",
                    str(ROOT / "params.yaml"),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        yield env
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_deployment_triggered_through_the_api_completes(server, tmp_path):
    def deployed() -> bool:
        done = subprocess.run(
            [str(BIN / "prefect"), "deployment", "inspect", "tdm-pipeline/test"],
            env=server,
            capture_output=True,
            text=True,
        )
        return done.returncode == 0

    _wait(deployed, 90, "deployment tdm-pipeline/test")
    params = {
        "overrides": TINY,
        "root": str(tmp_path),
        "tracking_uri": f"sqlite:///{tmp_path}/m.db",
    }
    done = subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "tdm-pipeline/test",
            "--params",
            json.dumps(params),
            "--watch",
            "--watch-timeout",
            "300",
        ],
        env=server,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Completed" in done.stdout + done.stderr
    # a run with overrides: its files in <root>/runs/<flow run name>/, nothing in <root> itself
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "flow_run.json").read_text())["flow_run_name"] == run.name
    assert f"'{run.name}'" in done.stdout + done.stderr  # the flow run `--watch` followed
    report = json.loads((run / "metrics/round_0.json").read_text())
    assert set(report["tdm"]) == {"none", "items", "categories"}
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "models").exists()
