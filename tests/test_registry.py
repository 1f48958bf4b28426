"""The MLflow Model Registry around the rounds' models (tasks/registry.py), against a real local
MLflow store (SQLite) in a temporary folder, and ``models:/`` URIs served with hot swap."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from serving_support import LiveServer, prepare_tiny, tiny_config, write_model_dir

from tasks import registry
from tasks.tracking import tracked_run
from tdm.io import manifest_digest
from tdm.recommender import Recommender
from tdm.serving.app import Service
from tdm.serving.source import resolve as resolve_source
from tdm.serving.store import SqliteStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A local MLflow store with three rounds registered as versions 1-3 of ``tdm`` (validation
    recall 0.20, 0.30, 0.25)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    prepared, tree = prepare_tiny(root)
    models, registered = [], []
    for r, (name, recall) in enumerate([("attention_dnn", 0.2), ("dnn", 0.3), ("dnn", 0.25)]):
        folder = write_model_dir(root / f"round_{r}", prepared, tree, name, r, recall)
        with tracked_run(uri, f"round {r}", root=root) as run:
            if r == 1:  # as the pipeline's train task does: the pyfunc model is logged already
                from tasks import pyfunc

                pyfunc.log(run, folder, "recommender")
            registered.append(registry.register(run, folder))
        models.append(folder)
    return {"uri": uri, "root": root, "models": models, "registered": registered}


@pytest.fixture
def env(mlflow_store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store["uri"])
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    return mlflow_store


def test_register_records_each_round_as_a_version(mlflow_store):
    from mlflow.tracking import MlflowClient

    got = mlflow_store["registered"]
    assert [r["version"] for r in got] == ["1", "2", "3"]
    assert [r["valid_recall"] for r in got] == [0.2, 0.3, 0.25]
    client = MlflowClient(tracking_uri=mlflow_store["uri"])
    for r, folder in zip(got, mlflow_store["models"], strict=True):
        version = client.get_model_version("tdm", r["version"])
        assert version.run_id == r["run_id"]
        assert version.tags[registry.MANIFEST_TAG] == manifest_digest(folder)
        artifacts = [a.path for a in client.list_artifacts(r["run_id"], "recommender")]
        assert "recommender/MLmodel" in artifacts  # logged once, also when already there


def test_promote_moves_champion_only_to_a_better_validation_recall(env):
    uri = env["uri"]
    first = registry.promote("tdm", 1, tracking_uri=uri)
    assert first["promoted"] and first["champion"] == "1" and first["previous"] is None
    better = registry.promote("tdm", 2, tracking_uri=uri)
    assert better["promoted"] and better["champion"] == "2" and better["previous"] == "1"
    worse = registry.promote("tdm", 3, tracking_uri=uri)
    assert not worse["promoted"] and worse["champion"] == "2"
    assert "does not beat" in worse["reason"]
    again = registry.promote("tdm", 2, tracking_uri=uri)
    assert not again["promoted"] and "already" in again["reason"]
    with pytest.raises(registry.RegistryError):
        registry.promote("tdm", 99, tracking_uri=uri)


def test_resolve_downloads_a_checked_model_folder_once(env, tmp_path):
    registry.promote("tdm", 1, tracking_uri=env["uri"])
    registry.promote("tdm", 2, tracking_uri=env["uri"])
    folder, info = registry.resolve("models:/tdm/champion")
    assert manifest_digest(folder) == manifest_digest(env["models"][1])
    assert info["version"] == "2" and info["alias"] == "champion"
    assert info["run_id"] == env["registered"][1]["run_id"] and info["valid_recall"] == 0.3
    stamp = (folder / "model.pt").stat().st_mtime_ns
    again, _ = registry.resolve("models:/tdm@champion")
    assert again == folder and (again / "model.pt").stat().st_mtime_ns == stamp  # cached
    by_number, info3 = registry.resolve("models:/tdm/3")
    assert manifest_digest(by_number) == manifest_digest(env["models"][2])
    assert info3["alias"] is None
    (folder / "meta.json").write_text("{}")  # a spoilt cache is downloaded again
    repaired, _ = registry.resolve("models:/tdm/champion")
    assert manifest_digest(repaired) == manifest_digest(env["models"][1])
    # the served folder recommends what the trained one does
    history = [(int(i), 100 + n) for n, i in enumerate([3, 5, 8])]
    want = Recommender.load(env["models"][1], device="cpu").recommend(history, 5)[0]
    assert list(Recommender.load(repaired, device="cpu").recommend(history, 5)[0]) == list(want)
    for bad in ("models:/tdm/nosuchalias", "models:/nosuchmodel/1", "models:/tdm", "runs:/x"):
        with pytest.raises(registry.RegistryError):
            registry.resolve(bad)


def test_tdm_resolves_models_uris_through_the_entry_point(env):
    registry.promote("tdm", 2, tracking_uri=env["uri"])
    folder, info = resolve_source("models:/tdm/champion")
    assert info["source"] == "models:/tdm/champion" and info["version"] == "2"
    assert (folder / "model.pt").is_file()


def test_serving_the_champion_swaps_when_the_alias_moves(env, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["uri"])
    client.set_registered_model_alias("tdm", "champion", "1")
    cfg = tiny_config()
    service = Service(
        cfg, "models:/tdm/champion", SqliteStore(tmp_path / "s.sqlite", 15), device="cpu"
    )
    service.load()
    with LiveServer(service) as server:
        info = httpx.get(server.url + "/v1/model").json()
        assert info["version"] == "tdm/1" and info["run_id"] == env["registered"][0]["run_id"]
        assert info["source"] == "models:/tdm/champion"
        unchanged = httpx.post(server.url + "/v1/reload", json={}).json()
        assert unchanged["reloaded"] is False
        client.set_registered_model_alias("tdm", "champion", "2")
        swapped = httpx.post(server.url + "/v1/reload", json={}).json()
        assert swapped["reloaded"] and swapped["previous"] == "tdm/1"
        answer = httpx.post(server.url + "/v1/recommend", json={"user_id": 1, "k": 3}).json()
        assert answer["model_version"] == "tdm/2"


def test_the_registered_pyfunc_model_still_loads_for_mlflow_models_serve(env):
    """``mlflow models serve -m models:/tdm/champion`` serves this pyfunc model."""
    import mlflow.pyfunc

    registry.promote("tdm", 2, tracking_uri=env["uri"])
    model = mlflow.pyfunc.load_model("models:/tdm@champion")
    rec = Recommender.load(env["models"][1], device="cpu")
    ids = [int(i) for i in rec.to_ids(np.array([3, 5, 8]))]
    frame = pd.DataFrame({"item_id": ids, "timestamp": [100, 101, 102]})
    out = model.predict(frame, params={"k": 4})
    want, _ = rec.recommend(list(zip(ids, [100, 101, 102], strict=True)), 4)
    assert out["item_id"].tolist() == [int(i) for i in want]
