"""benchmarks/fidelity_sweep.py end to end at a tiny size: validation users only, one training per
combination of the training keys, every filter_beam value evaluated on the same models."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fidelity_sweep  # noqa: E402
from tests.tiny import TINY  # noqa: E402


def test_sweep_trains_once_per_training_setting_and_never_reads_test_users(tmp_path, monkeypatch):
    import tdm.evaluation

    touched = []
    original = tdm.evaluation.evaluate_split

    def spy(ranker, data, split, *args, **kwargs):
        touched.append("valid" if split is data.valid else "test" if split is data.test else "?")
        return original(ranker, data, split, *args, **kwargs)

    monkeypatch.setattr(tdm.evaluation, "evaluate_split", spy)  # the sweep's, the pipeline's
    args = [f"--set={item}" for item in TINY if not item.startswith("rounds.")]
    args += ["--set=synthetic.n_users=200", "--set=data.n_test_users=20"]
    args += ["--grid", "retrieval.filter_beam=0,25", "--grid", "sampler.profile=leaf_heavy"]
    args += ["--grid", "data.window_mode=last_behaviour,position", "--rounds", "1"]
    out = tmp_path / "sweep.json"
    argv = [*args, "--seeds", "0", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert fidelity_sweep.main(argv) == 0
    assert set(touched) == {"valid"}
    result = json.loads(out.read_text())
    assert len(result["trainings"]) == 2  # one per window mode: filter_beam needs no training
    tdm = [r for r in result["runs"] if r["method"] == "tdm"]
    assert len(tdm) == 4 and {r["eval"]["retrieval.filter_beam"] for r in tdm} == {0, 25}
    for run in tdm:
        assert set(run["valid"]) == {"none", "items", "categories"}
        assert run["valid"]["none"]["n_evaluated"] <= 30  # the validation users
    # unfiltered recall does not depend on the filtering beam
    by_mode = {}
    for run in tdm:
        by_mode.setdefault(run["train"]["data.window_mode"], set()).add(
            run["valid"]["none"]["recall"]
        )
    assert all(len(values) == 1 for values in by_mode.values())
    # a second call reuses the trained models
    assert fidelity_sweep.main(argv) == 0
    again = json.loads(out.read_text())
    assert [r["valid"] for r in again["runs"]] == [r["valid"] for r in result["runs"]]
