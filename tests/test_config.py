from pathlib import Path

import pytest

from tdm.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_and_every_key_is_documented():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    text = (ROOT / "params.yaml").read_text()
    for section, values in cfg.to_dict().items():
        assert f"\n{section}:" in f"\n{text}"
        for key in values:
            lines = [ln for ln in text.splitlines() if ln.strip().startswith(f"{key}:")]
            assert lines, f"{section}.{key} missing from params.yaml"
            assert any("# (" in ln for ln in lines), f"{section}.{key} has no '# (type)' comment"


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
        ("tree.arity=1", "tree.arity: must be >= 2"),
        ("eval.filters=[none, brand]", "eval.filters: 'brand'"),
        ("noequals", "expected section.key=value"),
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
