import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tdm import cli, stages
from tdm.config import Config, DataConfig, SyntheticConfig
from tdm.data import checks
from tdm.data.checks import (
    USERBEHAVIOR_WINDOW,
    check_loaded,
    check_suspicious,
    duplicated_rows,
    exceeds,
    expected_window,
    find_suspicious,
)
from tdm.data.loaders import load_dataset, load_movielens
from tdm.data.schema import DataError
from tdm.data.synthetic import generate, write_userbehavior_csv

REPO = Path(__file__).resolve().parents[2]
ML_LATEST_SMALL = REPO.parent / "shared" / "data" / "ml-latest-small"
SMALL = SyntheticConfig(n_users=200, n_items=150, n_categories=10, behaviors_per_user=20)
WINDOW = expected_window(DataConfig(source="synthetic"), SMALL)
NOW = 1_700_000_000  # 2023-11-14


@pytest.fixture(scope="module")
def good() -> pd.DataFrame:
    return generate(SMALL)


def shifted(df: pd.DataFrame, rows: int, to: int, start: int = 10) -> pd.DataFrame:
    """A copy with the timestamps of ``rows`` rows from ``start`` set to ``to``."""
    out = df.copy()
    out.loc[start : start + rows - 1, "timestamp"] = to
    return out


def check_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tdm.data.checks"]


# ------------------------------------------------------------------------------- windows
def test_expected_window_per_source():
    synthetic = SyntheticConfig(start_timestamp=1000, days=2)
    assert expected_window(DataConfig(source="userbehavior"), synthetic) == USERBEHAVIOR_WINDOW
    assert expected_window(DataConfig(source="synthetic"), synthetic) == (1000, 1000 + 2 * 86400)
    assert expected_window(DataConfig(source="movielens"), synthetic) is None
    assert checks.timestamp_bounds(None, now=NOW) == (0, NOW)
    assert checks.timestamp_bounds((5, 9), now=NOW) == (5, 9)


def test_exceeds_is_gx_mostly():
    # 1 % of 1000 rows is tolerated, one more is not; no rows, nothing to exceed.
    assert not exceeds(10, 1000, 0.01) and exceeds(11, 1000, 0.01)
    assert not exceeds(0, 0, 0.01)
    assert exceeds(1, 5, 0.0)


# ------------------------------------------------------------------------------- clean data
def test_default_synthetic_data_raises_and_warns_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    synthetic = SyntheticConfig()
    generated = load_dataset(DataConfig(source="synthetic"), synthetic)
    findings = check_loaded(generated, DataConfig(source="synthetic"), synthetic)
    # the generator repeats a few rows within a second (~0.2 %): INFO, not a warning
    assert [f.kind for f in findings] == ["duplicates"]
    assert not findings[0].error
    # the same data as the default UserBehavior.csv (`make data`), checked as that source
    path = write_userbehavior_csv(generated, tmp_path / "UserBehavior.csv")
    data = DataConfig(source="userbehavior", path=str(tmp_path))
    assert [f.kind for f in check_loaded(load_dataset(data, synthetic), data, synthetic)] == [
        "duplicates"
    ]
    assert not [r for r in check_records(caplog) if r.levelno >= logging.WARNING]
    assert str(path) in check_records(caplog)[-1].getMessage()


@pytest.mark.skipif(not ML_LATEST_SMALL.is_dir(), reason="no shared ml-latest-small")
def test_ml_latest_small_raises_and_warns_nothing(caplog):
    caplog.set_level(logging.INFO)
    data = DataConfig(source="movielens", path=str(ML_LATEST_SMALL), min_rating=0.0)
    assert (
        check_loaded(load_movielens(ML_LATEST_SMALL, min_rating=0.0), data, SyntheticConfig()) == []
    )
    assert check_records(caplog) == []


# ------------------------------------------------------------------------------- timestamps
def test_few_timestamps_out_of_window_warn_once(good, caplog):
    broken = shifted(good, 3, WINDOW[1] + 3600)
    findings = check_suspicious(broken, "ub.csv", WINDOW, lines=range(1, len(good) + 1))
    assert len(findings) >= 1 and findings[0].kind == "timestamps" and not findings[0].error
    warnings = [r for r in check_records(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert message.startswith(f"ub.csv: 3 of {len(good)} rows")
    assert "3 after the window" in message and "line 11:" in message
    assert f"timestamp {WINDOW[1] + 3600}" in message


def test_many_timestamps_out_of_window_fail_naming_line_and_column(good):
    n_out = int(0.05 * len(good))
    broken = shifted(good, n_out, WINDOW[0] - 86400)
    with pytest.raises(DataError) as caught:
        check_suspicious(broken, "ub.csv", WINDOW, lines=range(1, len(good) + 1))
    error = caught.value
    assert (error.line, error.column) == (11, "timestamp")
    message = str(error)
    assert message.startswith(f"ub.csv, line 11, column 'timestamp': {n_out} of {len(good)} rows")
    assert f"{n_out} before the window" in message and "more than the 1 % tolerated" in message
    assert "\n" not in message


def test_negative_and_future_timestamps_without_a_window(good):
    few = shifted(good, 2, -5)
    (finding,) = [f for f in find_suspicious(few, now=NOW) if f.kind == "timestamps"]
    assert (finding.count, finding.error) == (2, False)
    assert "2 negative" in finding.what
    with pytest.raises(DataError, match=r"row 11, column 'timestamp': .*\d+ negative"):
        check_suspicious(shifted(good, len(good) // 10, -1), "t", now=NOW)
    in_milliseconds = good.assign(timestamp=good["timestamp"] * 1000)
    with pytest.raises(DataError, match=f"row 1, column 'timestamp': {len(good)} of") as caught:
        check_suspicious(in_milliseconds, "t", now=NOW)
    assert f"{len(good)} after now" in str(caught.value)


# ------------------------------------------------------------------------------- duplicates
def test_duplicated_rows_match_pandas_even_when_keys_collide(good, monkeypatch):
    broken = pd.concat([good, good.iloc[[3, 50, 50]]], ignore_index=True)
    expected = broken.duplicated(keep=False).to_numpy()
    assert (duplicated_rows(broken) == expected).all()
    # every row hashes alike: the exact comparison alone must decide
    monkeypatch.setattr(checks, "_column_codes", lambda values: np.zeros(len(values), np.int64))
    assert (duplicated_rows(broken) == expected).all()


def test_few_duplicates_are_info_many_fail(good, caplog):
    caplog.set_level(logging.INFO)
    few = pd.concat([good, good.iloc[[7]]], ignore_index=True)
    (finding,) = [f for f in check_suspicious(few, "t", WINDOW) if f.kind == "duplicates"]
    assert not finding.error
    assert not [r for r in check_records(caplog) if r.levelno >= logging.WARNING]
    assert any("duplicate" in r.getMessage() for r in check_records(caplog))

    copies = good.iloc[: int(0.05 * len(good))]
    many = pd.concat([good, copies], ignore_index=True)
    with pytest.raises(DataError, match="are exact duplicates|a duplicate") as caught:
        check_suspicious(many, "ub.csv", WINDOW, lines=range(1, len(many) + 1))
    error = caught.value
    first_repeat = int(np.argmax(many.duplicated(keep="first").to_numpy()))
    assert error.line == first_repeat + 1 and error.column is None
    original = int(np.argmax((many == many.iloc[first_repeat]).all(axis=1).to_numpy()))
    assert f"repeating line {original + 1}" in str(error)


# ------------------------------------------------------------------------------- tdm prepare
def write_ub(df: pd.DataFrame, folder: Path) -> Path:
    return write_userbehavior_csv(df, folder / "UserBehavior.csv")


def test_tdm_prepare_fails_with_one_line(good, tmp_path, capsys):
    n_out = int(0.05 * len(good))
    path = write_ub(shifted(good, n_out, USERBEHAVIOR_WINDOW[0] - 30 * 86400), tmp_path)
    argv = ["prepare", "--params", str(REPO / "params.yaml"), "--root", str(tmp_path / "root")]
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv, "--set", f"data.path={path}"])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"tdm: error: {path}, line 11, column")
    assert f"{n_out} before the window" in lines[0]
    assert not (tmp_path / "root" / "prepared").exists()


def test_prepare_warns_and_goes_on(good, tmp_path, caplog):
    path = write_ub(shifted(good, 3, USERBEHAVIOR_WINDOW[1] + 86400, start=0), tmp_path)
    data = DataConfig(source="userbehavior", path=str(path), n_test_users=20, n_valid_users=20)
    meta = stages.prepare(Config(data=data, synthetic=SMALL), tmp_path / "prepared")
    assert meta and (tmp_path / "prepared").is_dir()
    warnings = [r for r in check_records(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith(f"{path}: 3 of {len(good)} rows")
    assert "line 1:" in warnings[0].getMessage()
