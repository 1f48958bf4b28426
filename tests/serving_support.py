"""Helpers of the serving tests: tiny model folders, a real server on loopback (in this process
or as a ``tdm serve`` subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tiny import TINY_DATA

from tdm.config import Config, ModelConfig, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = [*TINY_DATA, "train.num_threads=1"]  # the tiny corpus of tests/tiny.py


def tiny_config(*extra: str) -> Config:
    return config_from_dict({}, [*TINY, *extra])


def prepare_tiny(root: Path, cfg: Config | None = None) -> tuple[Path, Path]:
    """``root/prepared`` and ``root/tree.tree`` (the category tree) of the tiny corpus."""
    from tdm import stages

    cfg = cfg or tiny_config()
    stages.prepare(cfg, root / "prepared")
    stages.init_tree(cfg, root / "prepared", root / "tree.tree")
    return root / "prepared", root / "tree.tree"


def write_model_dir(
    out: Path,
    prepared: Path,
    tree_path: Path,
    name: str = "attention_dnn",
    seed: int = 0,
    valid_recall: float | None = None,
    hidden: tuple[int, ...] = (16, 8),
) -> Path:
    """A model folder as ``tdm train`` writes it, with seeded random weights (no training):
    model.pt, tree.tree, items.parquet, meta.json, train_log.json, manifest.json."""
    from tdm.checkpoint import save_model
    from tdm.io import atomic_dir, write_json
    from tdm.model import build_model
    from tdm.tree import Tree

    tree = Tree.load(tree_path)
    meta = json.loads((prepared / "meta.json").read_text())
    cfg = ModelConfig(name=name, hidden=list(hidden))
    model = build_model(cfg, tree.n_nodes, int(meta["time_windows"]), seed=seed).eval()
    with atomic_dir(out, manifest=True) as tmp:
        save_model(model, tmp / "model.pt", cfg)
        tree.save(tmp / "tree.tree")
        shutil.copy2(prepared / "items.parquet", tmp / "items.parquet")
        shutil.copy2(prepared / "meta.json", tmp / "meta.json")
        write_json(
            tmp / "train_log.json",
            {
                "valid_recall": [] if valid_recall is None else [valid_recall],
                "best_epoch": 0,
            },
        )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``create_app(service)`` under uvicorn on a free loopback port, in a thread of this
    process (a real socket, a real event loop)."""

    def __init__(self, service) -> None:
        import uvicorn

        from tdm.serving.app import create_app

        self.service = service
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(service), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise TimeoutError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.service.close()


def start_cli_server(*args: str, cwd: Path, port: int) -> subprocess.Popen:
    """``tdm serve --port PORT ...`` in a subprocess; returns once /readyz answers 200."""
    import httpx

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(BIN / "tdm"), "serve", "--port", str(port), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tdm serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("tdm serve not ready after 90 s")
        time.sleep(0.2)


def offline_answer(recommender, history, k: int, mode: str) -> list[int]:
    """What ``Recommender.recommend`` gives for one request (filters none and items)."""
    assert mode in ("none", "items")
    items, _ = recommender.recommend(list(history), k, exclude_seen=mode == "items")
    return [int(i) for i in items]


def items_of(response: dict) -> list[int]:
    return [item["item_id"] for item in response["items"]]


def popular_ids(items: pd.DataFrame, k: int) -> list[int]:
    frame = items.sort_values("item_index")
    order = np.lexsort((np.arange(len(frame)), -frame["train_count"].to_numpy()))
    return [int(i) for i in frame["item_id"].to_numpy()[order[:k]]]
