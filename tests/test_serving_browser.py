"""The demo page in a real browser: Debian's headless Chromium driven over the DevTools protocol
(``Runtime.evaluate``, ``Input.insertText``, ``Page.captureScreenshot``), against a real server.

On MovieLens latest-small (``../shared/data``) when it is there, so the page shows titles and
genres; else on the synthetic corpus with a titles file. Skipped only when ``chromium`` is not
installed (``.ci/run`` installs it with apt-get).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import torch
from serving_support import LiveServer, free_port, prepare_tiny, tiny_config, write_model_dir

from tdm.serving.app import Service
from tdm.serving.store import SqliteStore, import_prepared

pytestmark = pytest.mark.integration
MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, url: str, width: int = 1400, height: int = 900) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="tdm-chromium-")
        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", f"--remote-debugging-port={port}",
             "--remote-allow-origins=*", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium's DevTools endpoint did not come up")
            time.sleep(0.2)
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0
        self.send(  # the viewport itself, not the window with its frame
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, condition: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(condition)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true after {timeout} s: {condition}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium with apt-get)")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    if (MOVIELENS / "movies.csv").is_file():
        cfg = tiny_config("data.source=movielens", f"data.path={MOVIELENS}",
                          "data.max_history=69")  # fmt: skip
        titles = None  # the model's data.path has movies.csv
    else:
        cfg = tiny_config()
        titles = root / "titles.csv"
    prepared, tree = prepare_tiny(root, cfg)
    if titles is not None:
        import pandas as pd

        items = pd.read_parquet(prepared / "items.parquet")
        names = [f"Synthetic item {i}" for i in items["item_id"]]
        pd.DataFrame({"item_id": items["item_id"], "title": names}).to_csv(titles, index=False)
    model = write_model_dir(root / "model", prepared, tree, "attention_dnn", seed=0)
    service = Service(cfg, str(model), SqliteStore(root / "s.sqlite", 69), titles=titles,
                      device="cpu")  # fmt: skip
    service.load()
    import_prepared(service.store, prepared, splits=("test",))
    with LiveServer(service) as live:
        yield live


def _check_png(data: bytes, width: int, height: int) -> None:
    """A real rendering: the window's size, many colours, and ink in the results area."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (width, height)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "a blank or near-blank page"
    middle = image.crop((360, 120, 1040, 600)).convert("L")  # the top-k panel
    lo, hi = middle.getextrema()
    assert hi - lo > 100, "no text in the results panel"


def test_the_demo_page_shows_a_users_top_k_and_a_tree_path(server, tmp_path):
    titles = server.service.engine.catalog.has_titles
    assert titles
    browser = Browser(server.url + "/")
    try:
        browser.wait("document.querySelectorAll('#user-select option').length > 0")
        browser.wait("document.querySelectorAll('#user-history li').length > 0")
        browser.wait("!document.getElementById('model').textContent.includes('loading')")
        user = int(browser.js("document.getElementById('user-select').value"))
        browser.js("document.getElementById('k').value = '8'")
        browser.js("document.getElementById('recommend-btn').click()")
        browser.wait("document.querySelectorAll('#results tbody tr').length === 8")
        rows = browser.js(
            "[...document.querySelectorAll('#results tbody tr')].map(r => "
            "[r.dataset.itemId, ...[...r.cells].map(c => c.textContent)])"
        )
        want = httpx.post(server.url + "/v1/recommend", json={"user_id": user, "k": 8}).json()
        assert [int(r[0]) for r in rows] == [i["item_id"] for i in want["items"]]
        assert [r[2] for r in rows] == [i["title"] for i in want["items"]]
        # the category's name (MovieLens genres), else its id as the page writes it (synthetic)
        shown = [i["category"] or f"category {i['category_id']}" for i in want["items"]]
        assert [r[3] for r in rows] == shown
        assert all(r[2] and not r[2].startswith("item ") for r in rows)  # titles, not ids
        assert browser.js("document.getElementById('status').textContent").startswith("8 items")
        browser.js("document.querySelector('#results tbody tr').click()")
        browser.wait("document.querySelectorAll('#path li').length > 2")
        path = browser.js("[...document.querySelectorAll('#path li')].map(l => l.textContent)")
        assert path[0].startswith("root") and ": 1 item," in path[-1]
        assert rows[0][2] in browser.js("document.getElementById('path-title').textContent")
        png = browser.screenshot(tmp_path / "demo_user.png")
        _check_png(png, 1400, 900)
        keep = os.environ.get("TDM_SCREENSHOTS")
        if keep:
            shutil.copy(tmp_path / "demo_user.png", Path(keep) / "serving_demo_user.png")
    finally:
        browser.close()


def test_the_demo_page_builds_a_history_from_title_search(server, tmp_path):
    engine = server.service.engine
    word = "Star" if engine.catalog.source.endswith("movies.csv") else "Synthetic"
    browser = Browser(server.url + "/")
    try:
        browser.wait("document.querySelectorAll('#user-select option').length > 0")
        browser.js("document.getElementById('item-search').focus()")
        browser.send("Input.insertText", text=word)
        browser.wait("document.querySelectorAll('#search-results li').length > 1")
        found = browser.js(
            "[...document.querySelectorAll('#search-results li')].map(l => l.textContent)"
        )
        assert all(word.lower() in text.lower() for text in found)
        browser.js("document.querySelectorAll('#search-results li')[0].click()")
        browser.js("document.querySelectorAll('#search-results li')[1].click()")
        assert browser.js("document.querySelectorAll('#history-list li').length") == 2
        assert browser.js("document.getElementById('mode-history').checked") is True
        browser.js("document.getElementById('recommend-btn').click()")
        browser.wait("document.querySelectorAll('#results tbody tr').length === 10")
        status = browser.js("document.getElementById('status').textContent")
        assert "2 known behaviours" in status and "cold start" not in status
        picked = [text.rsplit(" (", 1)[0] for text in found[:2]]
        shown = browser.js(
            "[...document.querySelectorAll('#results tbody tr')].map(r => r.cells[1].textContent)"
        )
        assert not set(picked) & set(shown)  # the history's own items are left out
        _check_png(browser.screenshot(tmp_path / "demo_history.png"), 1400, 900)
        keep = os.environ.get("TDM_SCREENSHOTS")
        if keep:
            shutil.copy(tmp_path / "demo_history.png", Path(keep) / "serving_demo_history.png")
    finally:
        browser.close()
