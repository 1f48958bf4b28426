"""`tdm benchmark`: baselines and TDM variants over seeds, summarised as the paper's tables."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import TINY

from tdm.benchmark import render, summarise
from tdm.cli import run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


TRAININGS: list[dict] = []  # every tdm.stages.train call of the module's benchmark run


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from tdm import stages

    out = tmp_path_factory.mktemp("bench") / "reports"
    overrides = [a for s in TINY for a in ("--set", s)]
    args = ["benchmark", "--params", str(ROOT / "params.yaml"), *overrides]
    args += ["--seeds", "0,1", "--baselines", "popular,itemcf"]
    args += ["--variants", "attention_dnn,product_dnn", "--rounds", "3", "--out", str(out)]
    train = stages.train

    def spy(cfg, prepared_dir, tree_path, out_dir, init_from=None, **kwargs):
        TRAININGS.append(
            {"cfg": cfg, "tree": Path(tree_path).read_bytes(), "out": Path(out_dir)}
            | {"init_from": init_from}
        )
        return train(cfg, prepared_dir, tree_path, out_dir, init_from=init_from, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "train", spy)
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
        "attention_dnn/equal_budget",
        "attention_dnn/jtm",
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


def md_table(text: str, title: str) -> dict[str, dict[str, str]]:
    """The first markdown table under the ``## <title>...`` heading as {first cell: {column:
    cell}}."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title}"))
    cells = []
    for line in lines[start + 1 :]:
        if line.startswith("## ") or (cells and not line.startswith("|")):
            break
        if line.startswith("|") and not line.startswith("|---"):
            cells.append([c.strip() for c in line.strip().strip("|").split("|")])
    head, *body = cells
    return {row[0]: dict(zip(head[1:], row[1:], strict=True)) for row in body}


def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def test_tables_and_figure_are_written(report):
    tables = (report / "tables.md").read_text()
    assert (report / "fig4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((report / "results.json").read_text())
    assert render(result) + "\n" == tables  # the file is the JSON's rendering
    rows, per_seed = result["summary"]["rows"], [result["per_seed"][s] for s in ("0", "1")]
    keys = {  # row label -> summary row, in the tables' order: baselines, then TDM by tree
        "most-popular": "popular",
        "item-CF": "itemcf",
        "TDM attention-DNN (category tree)": "attention_dnn/round_0",
        "TDM product-DNN (category tree)": "product_dnn/round_0",
        "TDM attention-DNN (learnt tree)": "attention_dnn/round_1",
        "TDM product-DNN (learnt tree)": "product_dnn/round_1",  # other variants: two rounds
        "TDM attention-DNN (relearnt twice)": "attention_dnn/round_2",
    }
    labels = list(keys)
    metrics = {
        "Precision": "precision",
        "Recall": "recall",
        "F-measure": "f_measure",
        "Novelty": "novelty",
    }

    # Table 2: every method a row (baselines first, then TDM by tree), each cell its mean ± std
    table2 = md_table(tables, "Table 2")
    assert list(table2) == labels
    for label, key in keys.items():
        assert len(table2[label]) == 8  # 4 metrics x (none, items)
        for column, metric in metrics.items():
            for mode in ("none", "items"):
                stat = rows[key][mode][metric]
                assert table2[label][f"{column} ({mode})"] == pct(stat["mean"], stat["std"])
    # ... computed here from the per-seed numbers, not from the summary
    recalls = [p["baselines"]["itemcf"]["test"]["none"]["recall"] for p in per_seed]
    want = pct(np.mean(recalls), np.std(recalls, ddof=1))
    assert table2["item-CF"]["Recall (none)"] == want and not want.endswith("± 0.00")
    precisions = [
        p["tdm"]["product_dnn"]["rounds"][1]["test"]["items"]["precision"] for p in per_seed
    ]
    cell = table2["TDM product-DNN (learnt tree)"]["Precision (items)"]
    assert cell == pct(np.mean(precisions), np.std(precisions, ddof=1))

    # Table 3: the categories mode only; Table 4: the attention-DNN per tree, no novelty
    table3 = md_table(tables, "Table 3")
    assert list(table3) == labels
    novelty = rows["popular"]["categories"]["novelty"]
    assert table3["most-popular"]["Novelty (categories)"] == pct(novelty["mean"], novelty["std"])
    assert all(len(cols) == 4 for cols in table3.values())
    table4 = md_table(tables, "Table 4")
    from_scratch = "TDM attention-DNN (learnt tree, from scratch)"
    jtm = "TDM attention-DNN (JTM tree)"
    assert list(table4) == [label for label in labels if "attention-DNN" in label] + [
        from_scratch,
        jtm,
    ]
    stat = rows["attention_dnn/equal_budget"]["none"]["recall"]
    assert table4[from_scratch]["Recall (none)"] == pct(stat["mean"], stat["std"])
    stat = rows["attention_dnn/round_2"]["items"]["f_measure"]
    assert table4["TDM attention-DNN (relearnt twice)"]["F-measure (items)"] == pct(
        stat["mean"], stat["std"]
    )
    assert "Novelty (none)" not in table4["TDM attention-DNN (category tree)"]

    # Fig. 4: level-wise recall of the product-DNN's first round, mean ± std over the seeds
    fig4 = md_table(tables, "Fig. 4")
    layerwise = [p["tdm"]["product_dnn"]["rounds"][0]["layerwise_recall"] for p in per_seed]
    levels = result["summary"]["fig4"]["level"]
    assert list(fig4) == [str(level) for level in levels] and len(levels) >= 2
    for i, level in enumerate(levels):
        for column, key in (("beam search", "beam"), ("brute force", "brute_force")):
            xs = [lw[key][i] for lw in layerwise]
            assert fig4[str(level)][column] == pct(np.mean(xs), np.std(xs, ddof=1))
    assert fig4[str(levels[0])]["beam search"].startswith("100.00 ± ")


def test_equal_budget_trains_round_1_s_tree_from_scratch_with_round_0_s_settings(report):
    work = report.parent / "work"
    result = json.loads((report / "results.json").read_text())
    for seed in (0, 1):
        variant = work / f"seed_{seed}/attention_dnn"
        by_out = {t["out"]: t for t in TRAININGS if str(t["out"]).startswith(str(variant))}
        round_0, round_1 = by_out[variant / "models/round_0"], by_out[variant / "models/round_1"]
        equal = by_out[work / f"seed_{seed}/attention_dnn_equal_budget/models/round_1"]
        assert round_0["init_from"] is None and equal["init_from"] is None  # from scratch
        assert Path(round_1["init_from"]) == variant / "models/round_0"  # the alternating round
        assert equal["tree"] == round_1["tree"] != round_0["tree"]  # round 1's learnt tree
        for section in ("train", "model", "sampler", "retrieval", "data"):  # round 0's settings
            assert getattr(equal["cfg"], section) == getattr(round_0["cfg"], section), section
        assert equal["cfg"].train.test_curve and round_1["cfg"].train.test_curve
        per_seed = result["per_seed"][str(seed)]
        run_ = per_seed["equal_budget"]["attention_dnn"]
        assert (
            run_["train"]["epochs_run"]
            == per_seed["tdm"]["attention_dnn"]["rounds"][0]["train"]["epochs_run"]
        )
        assert run_["train"]["test_curve"]["epoch"] == [1]  # train.epochs=1
        assert set(run_["tree"]["truth"]) == {"category", "department"}  # generated data
    # the other variants record no test curve
    product = [t for t in TRAININGS if "product_dnn" in str(t["out"])]
    assert product and not any(t["cfg"].train.test_curve for t in product)

    # the paired differences, from the per-seed numbers
    equal = result["summary"]["equal_budget"]
    assert equal["n"] == 2
    for kind, r in (("from_scratch", None), ("warm_start", 1)):
        diffs = []
        for seed in ("0", "1"):
            tdm = result["per_seed"][seed]
            rounds = tdm["tdm"]["attention_dnn"]["rounds"]
            learnt = tdm["equal_budget"]["attention_dnn"] if r is None else rounds[r]
            diffs.append(learnt["test"]["none"]["recall"] - rounds[0]["test"]["none"]["recall"])
        stat = equal["paired"][kind]["none"]["recall"]
        assert stat["mean"] == pytest.approx(np.mean(diffs))
        assert stat["ahead"] == sum(d > 0 for d in diffs) and stat["n"] == 2
    tables = (report / "tables.md").read_text()
    paired = md_table(tables, "Table 4 at equal budget")
    assert list(paired) == ["equal budget: from scratch", "alternating: warm start"]
    stat = equal["paired"]["from_scratch"]["items"]["recall"]
    cell = f"{100 * stat['mean']:+.2f} ± {100 * stat['std']:.2f} ({stat['ahead']}/2)"
    assert paired["equal budget: from scratch"]["Recall (items)"] == cell
    assert (
        paired["equal budget: from scratch"]["epochs (learnt vs category)"]
        == "1.0 (1.0) vs 1.0 (1.0)"
    )


def test_jtm_relearns_round_0_s_model_and_is_paired_with_k_means(report):
    work = report.parent / "work"
    result = json.loads((report / "results.json").read_text())
    diffs = []
    for seed in (0, 1):
        variant = work / f"seed_{seed}/attention_dnn"
        by_out = {t["out"]: t for t in TRAININGS}
        kmeans = by_out[variant / "models/round_1"]
        jtm = by_out[work / f"seed_{seed}/attention_dnn_jtm/models/round_1"]
        assert jtm["cfg"].tree.learner == "jtm" and kmeans["cfg"].tree.learner == "kmeans"
        assert Path(jtm["init_from"]) == Path(kmeans["init_from"]) == variant / "models/round_0"
        assert jtm["tree"] != kmeans["tree"]  # another learner, another tree
        for section in ("train", "model", "sampler", "retrieval", "data"):
            assert getattr(jtm["cfg"], section) == getattr(kmeans["cfg"], section), section
        per_seed = result["per_seed"][str(seed)]
        run_ = per_seed["jtm"]["attention_dnn"]
        assert run_["relearn"]["seconds"] > 0 and 0 <= run_["relearn"]["moved_fraction"] <= 1
        assert set(run_["tree"]["truth"]) == {"category", "department"}
        k_means = per_seed["tdm"]["attention_dnn"]["rounds"][1]
        diffs.append(run_["test"]["items"]["recall"] - k_means["test"]["items"]["recall"])
    stat = result["summary"]["jtm"]["paired"]["items"]["recall"]
    assert stat["mean"] == pytest.approx(np.mean(diffs)) and stat["n"] == 2
    assert stat["ahead"] == sum(d > 0 for d in diffs)
    tables = (report / "tables.md").read_text()
    table = md_table(tables, "JTM vs k-means relearning")
    cell = f"{100 * stat['mean']:+.2f} ± {100 * stat['std']:.2f} ({stat['ahead']}/2)"
    assert table["Recall@M"]["items"] == cell
    assert "TDM attention-DNN (JTM tree)" in md_table(tables, "Table 4: ")
    truth = md_table(tables, "Trees against the true taxonomy")
    labels = [line.split("|")[1].strip() for line in tables.split("## Trees against")[1]
              .split("\n## ")[0].splitlines() if line.startswith("| TDM")]  # fmt: skip
    assert len(labels) == len(set(labels)) == len(result["summary"]["truth"])  # each tree once
    stat = result["summary"]["truth"]["attention_dnn/jtm"]["category"]["purity"]
    assert truth["TDM attention-DNN (JTM tree)"]["category purity"].startswith(
        f"{stat['mean']:.3f} ± "
    )


def test_fig5_averages_the_test_curves_over_the_seeds(report):
    result = json.loads((report / "results.json").read_text())
    assert (report / "fig5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig5 = result["summary"]["fig5"]
    assert fig5["k"] == 10
    assert list(fig5["curves"]) == [
        "category tree",
        "learnt tree, from scratch",
        "learnt tree, warm start (round 1)",
        "JTM tree, warm start",
    ]
    per_seed = [result["per_seed"][s] for s in ("0", "1")]
    where = {
        "category tree": lambda p: p["tdm"]["attention_dnn"]["rounds"][0],
        "learnt tree, from scratch": lambda p: p["equal_budget"]["attention_dnn"],
        "learnt tree, warm start (round 1)": lambda p: p["tdm"]["attention_dnn"]["rounds"][1],
        "JTM tree, warm start": lambda p: p["jtm"]["attention_dnn"],
    }
    for label, get in where.items():
        curves = [get(p)["train"]["test_curve"] for p in per_seed]
        got = fig5["curves"][label]
        assert got["epoch"] == [1] and got["n"] == [2]
        for key in ("loss", "recall"):
            values = [c[key][0] for c in curves]
            assert got[key][0] == pytest.approx(np.mean(values))
            assert got[f"{key}_std"][0] == pytest.approx(np.std(values, ddof=1))
    table = md_table((report / "tables.md").read_text(), "Fig. 5")
    recall = fig5["curves"]["category tree"]
    cell = f"{100 * recall['recall'][0]:.2f} ± {100 * recall['recall_std'][0]:.2f}"
    assert list(table) == ["1"] and table["1"]["category tree: recall"] == cell


def test_every_tree_is_measured_against_the_generator_s_taxonomy(report):
    result = json.loads((report / "results.json").read_text())
    truth = result["summary"]["truth"]
    rounds = {r for r in result["summary"]["rows"] if "/round_" in r}
    assert set(truth) == rounds | {"attention_dnn/jtm"}
    per_seed = [result["per_seed"][s] for s in ("0", "1")]
    for row in rounds:
        stats = truth[row]
        name, r = row.split("/round_")
        for grouping in ("category", "department"):
            trees = [p["tdm"][name]["rounds"][int(r)]["tree"]["truth"][grouping] for p in per_seed]
            assert stats[grouping]["nmi"]["mean"] == pytest.approx(
                np.mean([t["nmi"] for t in trees])
            )
            assert stats[grouping]["level"] == sorted({t["level"] for t in trees})
    table = md_table((report / "tables.md").read_text(), "Trees against the true taxonomy")
    stat = truth["attention_dnn/round_1"]["department"]
    cell = f"{stat['nmi']['mean']:.3f} ± {stat['nmi']['std']:.3f}"
    assert table["TDM attention-DNN (learnt tree)"]["department NMI"] == cell


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

    def no_equal_budget(cfg, folder, name, tree):
        ran.append(f"{name} from scratch")
        raise AssertionError(f"{name} from scratch was run again")

    monkeypatch.setattr(benchmark, "_baseline", no_baseline)
    monkeypatch.setattr(benchmark, "_variant", no_variant)
    monkeypatch.setattr(benchmark, "_equal_budget", no_equal_budget)
    monkeypatch.setattr(benchmark, "_jtm", no_equal_budget)
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
    # the run from scratch depends on the learnt tree it trains on, too
    learnt = work / "seed_0/attention_dnn/trees/round_1.tree"
    kept = learnt.read_bytes()
    try:
        shutil.copyfile(work / "seed_0/attention_dnn/trees/round_0.tree", learnt)
        with pytest.raises(AssertionError, match="attention_dnn from scratch was run again"):
            benchmark.run(cfg, "x", work, [0], [], ["attention_dnn"], rounds=3)
    finally:
        learnt.write_bytes(kept)
    learnt.unlink()  # made again from round 0's embeddings: the same tree, nothing re-run
    benchmark.run(cfg, "x", work, [0], [], ["attention_dnn"], rounds=3)
    assert learnt.read_bytes() == kept
    assert ran == ["product_dnn", "product_dnn", "popular", "itemcf", "attention_dnn from scratch"]


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


def test_truth_table_names_what_the_trees_are_measured_against():
    """Generated data: the true taxonomy (categories and departments); other data: the data's own
    categories only, with their own heading."""
    from tdm.benchmark import ROUND, _truth_lines

    stat = {"purity": {"mean": 0.5, "std": 0.1}, "nmi": {"mean": 0.4, "std": 0.1}, "level": [5]}
    row = f"attention_dnn{ROUND}1"
    own = "\n".join(_truth_lines({row: {"category": stat}}, [row]))
    assert "## Trees against the data's categories" in own and "department" not in own
    assert "| 0.500 ± 0.100 (5) | 0.400 ± 0.100 |" in own
    both = "\n".join(_truth_lines({row: {"category": stat, "department": stat}}, [row]))
    assert "true taxonomy" in both and "department purity" in both
