"""Training through a Prefect work pool: ``python -m flows.deploy`` puts ``tdm-train`` into a
process pool, a real ``prefect worker start`` picks up its flow runs, and the pipeline flow with
``train_deployment`` set trains every round there (the GPU worker of README's "Training on a GPU
worker", on this machine's CPU). Against the session's Prefect server (tests/conftest.py)."""

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tiny import TINY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = str(ROOT / "params.yaml")
POOL = "tdm-test-gpu"
DEPLOYMENT = f"tdm-train/{POOL}"


@contextmanager
def _api(env: dict):
    """This process on the test server; its logs and events sent before it leaves (at exit the
    server is gone, and sending would retry for a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        try:
            yield
        finally:
            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)


@pytest.fixture(scope="module")
def worker(prefect_server, tmp_path_factory):
    """The pool and the deployment made by ``python -m flows.deploy``, and a worker of the pool
    (its output in ``worker.log``), online; yields ``(env, deployment id, log path)``."""
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    from flows.deploy import ensure_pool

    env = prefect_server
    done = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--pool", POOL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"work pool '{POOL}' (process): created" in done.stdout
    assert f"prefect worker start --pool {POOL}" in done.stdout
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with _api(env), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            assert deployment.work_pool_name == POOL
            assert client.read_work_pool(POOL).type == "process"
            assert not ensure_pool(POOL)  # there already: kept as it is
            online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
            deadline = time.monotonic() + 60
            while not client.read_workers_for_work_pool(POOL, worker_filter=online):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no worker online:\n{log.read_text()}"
                time.sleep(0.5)
        yield env, deployment.id, log
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM by PID; a second one if it is still there after 15 s (a worker started with
    SIGINT ignored, as in a background job of a non-interactive shell, turns the first into an
    ignored SIGINT and kills itself on the second), then SIGKILL."""
    for _ in range(2):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def test_rounds_train_in_flow_runs_the_worker_picked_up(worker, tmp_path):
    from prefect import get_client

    from flows.pipeline import tdm_pipeline

    env, deployment_id, log = worker
    uri = f"sqlite:///{tmp_path}/m.db"
    with _api(env):
        state = tdm_pipeline(
            params=PARAMS,
            overrides=TINY,
            root=str(tmp_path),
            tracking_uri=uri,
            train_deployment=DEPLOYMENT,
            return_state=True,
        )
        assert state.is_completed(), state.message
        summary = state.result()
        pipeline_run = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            runs = [client.read_flow_run(i) for i in summary["train_flow_runs"]]
            parents = [client.read_task_run(run.parent_task_run_id) for run in runs]
    assert len(runs) == 2
    for r, (run, parent) in enumerate(zip(runs, parents, strict=True)):
        assert run.deployment_id == deployment_id and run.work_pool_name == POOL
        assert run.state_name == "Completed", run.state
        assert run.parameters["round"] == r
        assert run.infrastructure_pid not in (None, str(os.getpid()))  # a worker's process
        assert f"submitting flow run '{run.id}'" in log.read_text()  # ... picked up by it
        assert parent.flow_run_id == pipeline_run  # linked to the pipeline's flow run
    out = Path(summary["artefact_root"])
    assert out.parent == tmp_path / "runs"  # the pipeline's folder, as without a worker
    for r in range(2):
        assert (out / "models" / f"round_{r}" / "model.pt").is_file()
        assert (out / "metrics" / f"round_{r}.json").is_file()
    assert (out / "plots" / "rounds.csv").is_file()
    assert [row["round"] for row in summary["rounds"]] == [0, 1]
    # the worker's flow run logged training to the pipeline's MLflow round run
    device = "cuda" if torch.cuda.is_available() else "cpu"  # train.device: auto
    client = MlflowClient(tracking_uri=uri)
    for run_id, train_run in zip(
        summary["mlflow"]["round_run_ids"], summary["train_flow_runs"], strict=True
    ):
        logged = client.get_run(run_id).data
        assert logged.tags["prefect.train_flow_run_id"] == train_run
        assert logged.tags["train.device_used"].startswith(device)
        assert "loss" in logged.metrics and "tdm.none.recall" in logged.metrics


def test_a_failed_training_flow_run_fails_the_pipeline_in_one_line(worker, tmp_path):
    """The worker's flow run fails (a device it does not have): the pipeline stops there, exit
    status 2, one error line naming the flow run, its state and the worker's reason."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    env, deployment_id, _ = worker
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.pipeline",
            "--params",
            PARAMS,
            *(
                arg
                for o in [*TINY, "rounds.count=1", "train.device=cuda:99"]
                for arg in ("--set", o)
            ),
            "--root",
            str(tmp_path),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
            "--train-deployment",
            DEPLOYMENT,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("tdm-pipeline: error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    (error,) = errors
    assert error.startswith("tdm-pipeline: error: round 0: training flow run '")
    assert f"of {DEPLOYMENT} (work pool '{POOL}') ended Failed: train.device: 'cuda:99'" in error
    name = error.split("'")[1]
    with _api(env), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))
        )
    assert run.deployment_id == deployment_id and run.state_name == "Failed"
    (out,) = (tmp_path / "runs").iterdir()
    assert not (out / "models" / "round_0").exists()


def test_a_missing_deployment_fails_before_any_work(prefect_server, tmp_path):
    from flows.pipeline import tdm_pipeline

    with _api(prefect_server):
        state = tdm_pipeline(
            params=PARAMS,
            overrides=TINY,
            root=str(tmp_path),
            tracking_uri=f"sqlite:///{tmp_path}/m.db",
            train_deployment="tdm-train/nowhere",
            return_state=True,
        )
    assert state.is_failed()
    assert state.message.startswith("train_deployment 'tdm-train/nowhere': no such deployment on ")
    assert "python -m flows.deploy --pool" in state.message and "\n" not in state.message
    assert not (tmp_path / "runs").exists()
