"""``tdm serve`` as a process: acknowledged events survive ``kill -9`` (found by a server started
again on the same store); bad input is one line and exit status 2."""

from __future__ import annotations

import signal

import httpx
import pytest
from serving_support import (
    ROOT,
    LiveServer,
    free_port,
    prepare_tiny,
    start_cli_server,
    write_model_dir,
)

from tdm.cli import main
from tdm.config import config_from_dict
from tdm.serving.app import Service
from tdm.serving.store import SqliteStore


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    prepared, tree = prepare_tiny(root)
    return write_model_dir(root / "model", prepared, tree)


@pytest.mark.integration
def test_acknowledged_events_survive_kill_9(model, tmp_path):
    """The default ``serve.store_sync: full``; ``normal`` also survives a killed process (the
    kernel keeps the written WAL pages), not a power loss, which no test here can make."""
    store = tmp_path / "store.sqlite"
    args = ["--params", str(ROOT / "params.yaml")]
    args += ["--model", str(model), "--store", str(store)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_cli_server(*args, cwd=tmp_path, port=port)
    sent = []
    try:
        for n in range(20):  # 20 acknowledged requests of 5 events each
            events = [
                {"user_id": 7 + n % 3, "item_id": 1000 + 5 * n + j, "timestamp": 100 * n + j}
                for j in range(5)
            ]
            response = httpx.post(f"{url}/v1/events", json={"events": events}, timeout=30)
            assert response.status_code == 200 and response.json()["accepted"] == 5
            sent += events
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no checkpoint, no close
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    wal = store.with_name(store.name + "-wal")
    assert wal.stat().st_size > 0  # the events are in the write-ahead log, never checkpointed
    # a new server on the same store file (in this process: no second start-up of torch)
    cfg = config_from_dict({}, [])
    service = Service(cfg, str(model), SqliteStore(store, cfg.data.max_history), device="cpu")
    service.load()
    with LiveServer(service) as server:
        for user in (7, 8, 9):
            kept = httpx.get(f"{server.url}/v1/users/{user}/history", timeout=30).json()
            want = [(e["item_id"], e["timestamp"]) for e in sent if e["user_id"] == user]
            assert [(e["item_id"], e["timestamp"]) for e in kept["events"]] == want
        assert httpx.get(f"{server.url}/v1/users", timeout=30).json()["total"] == 3


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "no/such/folder"], "no model.pt"),
        (["--model", "nosuch:/x/y"], "no resolver for nosuch:/"),
        (["--model", "MODEL", "--titles", "no/titles.csv"], "no movies.csv"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    args = [str(model) if a == "MODEL" else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", str(free_port()), "--store", "s.sqlite", *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdm: error:") and words in lines[0], lines
