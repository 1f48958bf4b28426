"""`tdm benchmark`: baselines and TDM variants over seeds, summarised as the paper's tables."""

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import TINY

from tdm.benchmark import render, summarise
from tdm.cli import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "reports"
    overrides = [a for s in TINY for a in ("--set", s)]
    args = ["benchmark", "--params", str(ROOT / "params.yaml"), *overrides]
    args += ["--seeds", "0,1", "--baselines", "popular,itemcf"]
    args += ["--variants", "attention_dnn,product_dnn", "--rounds", "3", "--out", str(out)]
    assert run([*args, "--work", str(out.parent / "work")]) == 0
    return out


def test_every_method_and_round_is_averaged_over_the_seeds(report):
    result = json.loads((report / "results.json").read_text())
    rows = result["summary"]["rows"]
    assert set(rows) == {
        "popular",
        "itemcf",
        "attention_dnn/round_0",
        "attention_dnn/round_1",
        "attention_dnn/round_2",
        "product_dnn/round_0",
        "product_dnn/round_1",
    }
    per_seed = [result["per_seed"][s] for s in ("0", "1")]
    for mode in ("none", "items", "categories"):
        xs = [p["baselines"]["itemcf"]["test"][mode]["recall"] for p in per_seed]
        stat = rows["itemcf"][mode]["recall"]
        assert stat["n"] == 2 and stat["mean"] == pytest.approx(np.mean(xs))
        assert stat["std"] == pytest.approx(np.std(xs, ddof=1))
        xs = [p["tdm"]["attention_dnn"]["rounds"][2]["test"][mode]["precision"] for p in per_seed]
        stat = rows["attention_dnn/round_2"][mode]["precision"]
        assert stat["mean"] == pytest.approx(np.mean(xs))
    # the seed picks other test users: most-popular's list is the same, its scores are not
    pops = [p["baselines"]["popular"]["test"]["none"]["recall"] for p in per_seed]
    assert pops[0] != pops[1]
    # baselines are tuned on validation users: a grid table per seed, the choice from it
    grid = per_seed[0]["baselines"]["itemcf"]["grid"]
    best = max(grid, key=lambda row: row["value"])
    assert (
        per_seed[0]["baselines"]["itemcf"]["params"]["neighbours"] == best["params"]["neighbours"]
    )


def test_tables_and_figure_are_written(report):
    tables = (report / "tables.md").read_text()
    for title in ("Table 2", "Table 3", "Table 4", "Fig. 4"):
        assert title in tables
    assert "| item-CF |" in tables and "TDM attention-DNN (relearnt twice)" in tables
    assert (report / "fig4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((report / "results.json").read_text())
    assert render(result) + "\n" == tables
    fig4 = result["summary"]["fig4"]
    assert len(fig4["beam"]) == len(fig4["level"]) and fig4["beam"][0] == pytest.approx(1.0)


def test_finished_methods_are_reused_only_with_the_settings_they_depend_on(report, monkeypatch):
    from tdm import baselines, benchmark
    from tdm.config import load_config

    cfg = load_config(ROOT / "params.yaml", TINY)
    work = report.parent / "work"
    ran: list[str] = []

    def no_baseline(cfg, prepared, name, tune_mode):
        ran.append(name)
        raise AssertionError(f"{name} was run again")

    def no_variant(cfg, folder, name, n_rounds):
        ran.append(name)
        raise AssertionError(f"{name} was run again")

    monkeypatch.setattr(benchmark, "_baseline", no_baseline)
    monkeypatch.setattr(benchmark, "_variant", no_variant)
    again = benchmark.run(
        cfg, "x", work, [0, 1], ["popular", "itemcf"], ["attention_dnn", "product_dnn"], rounds=3
    )
    first = json.loads((report / "results.json").read_text())
    assert again["summary"]["rows"] == first["summary"]["rows"] and ran == []
    assert again["compute_seconds"] == first["compute_seconds"] > 0
    # the baselines do not depend on the training params; the TDM variants do
    lr = load_config(ROOT / "params.yaml", [*TINY, "train.lr=0.02"])
    with pytest.raises(AssertionError, match="product_dnn was run again"):
        benchmark.run(lr, "x", work, [0], ["popular", "itemcf"], ["product_dnn"], rounds=3)
    assert ran == ["product_dnn"]
    with pytest.raises(AssertionError, match="product_dnn was run again"):  # other rounds
        benchmark.run(cfg, "x", work, [0], ["popular"], ["product_dnn"], rounds=1)
    with pytest.raises(AssertionError, match="popular was run again"):  # other test users
        benchmark.run(cfg, "x", work, [2], ["popular"], [], rounds=1)
    with pytest.raises(ValueError, match=r"unknown baselines \['nope'\]"):
        benchmark.run(cfg, "x", work, [0], ["popular", "nope"], [], rounds=1)
    with pytest.raises(ValueError, match=r"unknown TDM variants \['nope'\]"):
        benchmark.run(cfg, "x", work, [0], ["popular"], ["nope"], rounds=1)
    monkeypatch.setitem(baselines.GRIDS, "itemcf", {"neighbours": [7]})  # another grid
    with pytest.raises(AssertionError, match="itemcf was run again"):
        benchmark.run(cfg, "x", work, [0], ["popular", "itemcf"], [], rounds=1)


def test_by_history_length_splits_the_test_users_of_every_seed(report, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "by_history_length", ROOT / "benchmarks/by_history_length.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    work, out = report.parent / "work", tmp_path / "groups.json"
    script.main(["--work", str(work), "--round", "1", "--bounds", "12", "--out", str(out)])
    groups = json.loads(out.read_text())["groups"]
    assert "| history | users |" in capsys.readouterr().out
    assert [g["history"][:5] for g in groups] == ["[0, 1", "[12, "]
    # the users of both seeds, once each; per-group means pool back to each seed's report
    rounds = [
        json.loads((work / f"seed_{s}/attention_dnn/result.json").read_text()) for s in (0, 1)
    ]
    users = [
        json.loads((work / f"seed_{s}/attention_dnn/metrics/round_1.json").read_text())["users"]
        for s in (0, 1)
    ]
    assert sum(g["users"] for g in groups) == sum(users)
    pooled = sum(g["users"] * g["tdm P (none)"] for g in groups) / sum(users)
    per_seed = [r["result"]["rounds"][1]["test"]["none"]["precision"] for r in rounds]
    assert pooled == pytest.approx(100 * np.average(per_seed, weights=users))


def test_summarise_handles_a_single_seed():
    test = {"none": {m: 0.5 for m in ("precision", "recall", "f_measure", "novelty")}}
    per_seed = {0: {"baselines": {"popular": {"test": test}}, "tdm": {}}}
    stat = summarise(per_seed, ["none"])["rows"]["popular"]["none"]["recall"]
    assert stat == {"mean": 0.5, "std": 0.0, "n": 1}
