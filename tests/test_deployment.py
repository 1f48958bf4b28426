"""The flow served as a deployment on a real local Prefect server, triggered through its API.

The server (the session's ``prefect_server``) and the served flow share the test session's
``PREFECT_HOME`` (tests/conftest.py)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import TINY as BASE_TINY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = BASE_TINY + ["rounds.count=1"]


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {seconds} s")


@pytest.fixture(scope="module")
def server(prefect_server):
    """The session's Prefect server (tests/conftest.py) with the flow served as deployment
    ``tdm-pipeline/test``; yields the environment that reaches it."""
    env = prefect_server
    proc = subprocess.Popen(
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
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
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
