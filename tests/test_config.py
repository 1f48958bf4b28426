from pathlib import Path

import pytest

from tdm.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _documented_keys(text: str) -> dict[str, dict[str, str]]:
    """``section -> key -> comment`` of params.yaml, read line by line so a key counts only in
    its own section."""
    out: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":", 1)[0]
            out[section] = {}
        elif section is not None and line.startswith("  ") and not line.startswith("   "):
            key, _, rest = line.strip().partition(":")
            out[section][key] = rest.partition("#")[2].strip()
    return out


def test_params_yaml_loads_and_every_key_is_documented():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    documented = _documented_keys((ROOT / "params.yaml").read_text())
    for section, values in cfg.to_dict().items():
        assert section in documented, f"section {section} missing from params.yaml"
        for key in values:
            assert key in documented[section], f"{section}.{key} missing from params.yaml"
            comment = documented[section][key]
            assert comment.startswith("("), f"{section}.{key} has no '# (type)' comment"


def test_a_key_deleted_from_its_section_is_noticed(tmp_path):
    """tree.seed and sampler.seed share a name: deleting one must still be caught."""
    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines(keepends=True)
    start = lines.index("tree:\n")
    seed = next(i for i in range(start, len(lines)) if lines[i].strip().startswith("seed:"))
    documented = _documented_keys("".join(lines[:seed] + lines[seed + 1 :]))
    assert "seed" not in documented["tree"] and "seed" in documented["sampler"]


def test_defaults_match_params_yaml():
    # params.yaml is the single home of values: the dataclass defaults must not drift from it
    assert load_config(ROOT / "params.yaml").to_dict() == Config().to_dict()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.nme=x", "model.nme: unknown key"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("train.amp=maybe", "train.amp: expected true/false"),
        ("bogus.key=1", "bogus: unknown section"),
        ("data.source=csv", "data.source: 'csv' is not one of"),
        ("model.hidden=[128, x]", "model.hidden[1]: expected an integer"),
        ("tree.arity=1", "tree.arity: must be >= 2, got 1"),
        ("eval.filters=[none, brand]", "eval.filters[1]: 'brand' is not one of"),
        ("noequals", "expected section.key=value"),
        ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
        ("train.epochs=-1", "train.epochs: must be >= 1, got -1"),
        ("data.n_test_users=-5", "data.n_test_users: must be >= 1, got -5"),
        ("train.lr=0", "train.lr: must be > 0.0, got 0.0"),
        ("train.lr=.nan", "train.lr: expected a finite number"),
        ("train.batch_size=1", "train.batch_size: must be >= 2"),
        ("train.history_dropout=1.0", "train.history_dropout: must be < 1.0"),
        ("synthetic.noise=1.5", "synthetic.noise: must be <= 1.0"),
        ("sampler.negatives_per_level=[3, -1]", "sampler.negatives_per_level[1]: must be >= 0"),
        ("train.device=gpu", "train.device: 'gpu' is not one of auto, cpu, cuda"),
        ("train.seed=-3", "train.seed: must be >= 0"),
        ("model.name=attention", "model.name: 'attention' is not a built-in model"),
        ("model.name=no_such_pkg.mod:Net", "model.name: cannot find module 'no_such_pkg.mod'"),
        ("model.hidden=[]", "model.hidden: needs at least one layer"),
        ("eval.topk=2000", "eval.topk: 2000 is above retrieval.max_k"),
        ("sampler.mode=sibling", "sampler.mode: 'sibling' is not one of random, siblings"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(ROOT / "params.yaml", [override])


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        ROOT / "params.yaml",
        [
            "train.lr=0.02",
            "model.hidden=[32, 16]",
            "data.path=/tmp/x",
            "sampler.negatives_per_level=null",
        ],
    )
    assert cfg.train.lr == 0.02 and cfg.model.hidden == [32, 16]
    assert cfg.data.path == "/tmp/x" and cfg.sampler.negatives_per_level is None


def test_int_accepted_for_float_and_missing_sections_default():
    cfg = config_from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model == Config().model


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_bad_params_fail_before_any_work(tmp_path, capsys):
    """An impossible value stops `tdm pipeline` at once, with one line and exit status 2,
    before anything is prepared."""
    import time

    from tdm.cli import main

    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--root", str(tmp_path), "--set", "train.epochs=0"])
    assert exit_info.value.code == 2
    assert time.perf_counter() - t0 < 2.0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tdm: error: params.yaml: train.epochs: must be >= 1, got 0"]
    assert not (tmp_path / "prepared").exists()


def test_built_in_model_names_are_the_models_of_tdm_model():
    from tdm.config import MODEL_NAMES
    from tdm.model import MODELS

    assert set(MODEL_NAMES) == set(MODELS)
