import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from tasks.validation import (
    ValidationFailed,
    ValidationReport,
    require,
    validate_prepared,
    validate_raw,
)
from tdm.config import DataConfig, SyntheticConfig
from tdm.data import checks
from tdm.data.protocol import load_prepared, prepare
from tdm.data.schema import COLUMNS, DataError
from tdm.data.synthetic import generate
from tdm.tree_build import category_tree


@pytest.fixture(scope="module")
def good() -> pd.DataFrame:
    return generate(
        SyntheticConfig(n_users=200, n_items=150, n_categories=10, behaviors_per_user=20)
    )


@pytest.fixture(scope="module")
def window(good) -> tuple[int, int]:
    return int(good["timestamp"].min()), int(good["timestamp"].max())


def assert_fails(report: ValidationReport, expectation: str, column: str) -> dict:
    """The report failed on ``expectation`` naming ``column``, in its results and its exception."""
    assert not report.success
    hits = [r for r in report.failures if r["expectation"] == expectation and column in r["column"]]
    assert hits, report.to_markdown()
    with pytest.raises(ValidationFailed) as caught:
        require(report)
    assert caught.value.report is report
    assert expectation in str(caught.value)
    assert column in str(caught.value)
    markdown = report.to_markdown()
    assert expectation in markdown and column in markdown
    return hits[0]


def test_raw_suite_passes_on_good_data(good, window):
    report = validate_raw(good, "synthetic", window=window)
    assert report.success, report.to_markdown()
    assert require(report) is report
    assert len(report.results) >= 11
    payload = json.loads(report.to_json())
    assert payload["success"] is True
    assert payload["raw"]["behaviors"]["success"] is True
    assert "FAILED" not in report.to_markdown()


def test_missing_column_fails(good):
    report = validate_raw(good.drop(columns="category_id"), "no-category")
    assert_fails(report, "expect_table_columns_to_match_ordered_list", "category_id")


def test_null_fails(good):
    broken = good.copy()
    broken["item_id"] = broken["item_id"].astype("Int64")
    broken.loc[7, "item_id"] = pd.NA
    hit = assert_fails(
        validate_raw(broken, "nulls"), "expect_column_values_to_not_be_null", "item_id"
    )
    assert hit["unexpected_count"] == 1
    assert hit["rows"] == [7]
    assert "7" in str(ValidationFailed(validate_raw(broken, "nulls")))


def test_negative_id_fails(good):
    broken = good.copy()
    broken.loc[11, "user_id"] = -5
    hit = assert_fails(
        validate_raw(broken, "negative"), "expect_column_values_to_be_between", "user_id"
    )
    assert hit["examples"] == [-5]
    assert hit["rows"] == [11]


def test_unknown_behavior_type_fails(good):
    broken = good.copy()
    broken["behavior_type"] = broken["behavior_type"].cat.add_categories(["click"])
    broken.loc[3, "behavior_type"] = "click"
    report = validate_raw(broken, "unknown-type")
    hit = assert_fails(report, "expect_column_values_to_be_in_set", "behavior_type")
    assert hit["examples"] == ["click"]
    assert "click" in str(ValidationFailed(report))


def test_timestamps_outside_window(good, window):
    n_out = int(0.05 * len(good))
    broken = good.copy()
    broken.loc[: n_out - 1, "timestamp"] = window[1] + 86_400
    report = validate_raw(broken, "late", window=window, outlier_fraction=0.01)
    hit = assert_fails(report, "expect_column_values_to_be_between", "timestamp")
    assert hit["unexpected_count"] == n_out

    few = good.copy()
    few.loc[:4, "timestamp"] = window[0] - 1  # 5 rows, well under 1 %
    assert validate_raw(few, "few-early", window=window, outlier_fraction=0.01).success


def test_too_many_duplicates_fail(good):
    copies = good.iloc[: int(0.05 * len(good))]
    broken = pd.concat([good, copies], ignore_index=True)
    report = validate_raw(broken, "duplicated", duplicate_fraction=0.01)
    assert_fails(report, "expect_compound_columns_to_be_unique", "user_id")
    # the few duplicates the generator makes itself are tolerated
    assert validate_raw(good, "good", duplicate_fraction=0.01).success


@pytest.fixture(scope="module")
def prepared(good, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    cfg = DataConfig(source="synthetic", n_test_users=20, n_valid_users=20, max_history=10)
    prepare(good, cfg, out)
    return load_prepared(out)


def test_prepared_suite_passes(prepared):
    tree = category_tree(prepared.items["item_index"], prepared.items["category_id"])
    report = validate_prepared(prepared, tree)
    assert report.success, report.to_markdown()
    assert set(report.raw) == {"items", "eval_users"}


def test_item_missing_from_tree_fails(prepared):
    items = prepared.items
    dropped = int(items["item_index"].iloc[int(items["train_count"].argmax())])
    keep = items["item_index"] != dropped
    tree = category_tree(items["item_index"][keep], items["category_id"][keep])
    report = validate_prepared(prepared, tree)
    hit = assert_fails(report, "expect_column_values_to_be_in_set", "in_tree")
    assert hit["unexpected_count"] == int(
        sum(
            np.count_nonzero(a == dropped)
            for a in (
                prepared.train.items,
                prepared.valid.hist_items,
                prepared.valid.truth_items,
                prepared.test.hist_items,
                prepared.test.truth_items,
            )
        )
    )


def test_test_user_in_training_fails(prepared):
    users = prepared.test.users.copy()
    users[0] = prepared.train.users[0]
    leaked = dataclasses.replace(prepared, test=dataclasses.replace(prepared.test, users=users))
    tree = category_tree(prepared.items["item_index"], prepared.items["category_id"])
    report = validate_prepared(leaked, tree)
    assert_fails(report, "expect_column_values_to_be_in_set", "in_train")


def test_valid_and_test_users_overlap_fails(prepared):
    users = prepared.test.users.copy()
    users[0] = prepared.valid.users[0]
    leaked = dataclasses.replace(prepared, test=dataclasses.replace(prepared.test, users=users))
    tree = category_tree(prepared.items["item_index"], prepared.items["category_id"])
    assert_fails(validate_prepared(leaked, tree), "expect_column_values_to_be_unique", "user_id")


def test_history_length_bound(prepared):
    tree = category_tree(prepared.items["item_index"], prepared.items["category_id"])
    longest = int(np.diff(prepared.test.hist_offsets).max())
    assert validate_prepared(prepared, tree, max_history=longest).success
    report = validate_prepared(prepared, tree, max_history=longest - 1)
    assert_fails(report, "expect_column_values_to_be_between", "history_length")


# ------------------------------------------------------- same verdict as tdm.data.checks
NOW = 1_700_000_000  # 2023-11-14: the "present" of both sides


def _last_tolerated(total: int, tolerance: float) -> int:
    """The most offending rows of ``total`` that ``tolerance`` still allows."""
    return max(k for k in range(total + 1) if not checks.exceeds(k, total, tolerance))


def _late(good, window, rows):
    broken = good.copy()
    broken.loc[: rows - 1, "timestamp"] = window[1] + 1
    return broken


def _negative(good, rows):
    broken = good.copy()
    broken.loc[: rows - 1, "timestamp"] = -broken.loc[: rows - 1, "timestamp"]
    return broken


def _with_copies(good, copies):
    # copies of rows that have no duplicate yet: each adds two duplicated rows
    single = np.flatnonzero(~good.duplicated(keep=False).to_numpy())[:copies]
    return pd.concat([good, good.iloc[single]], ignore_index=True)


def _copies_to_fail(good):
    organic = int(good.duplicated(keep=False).sum())
    return next(
        c
        for c in range(len(good))
        if checks.exceeds(organic + 2 * c, len(good) + c, checks.DUPLICATE_FRACTION)
    )


# case: (build(good, window) -> frame, check against the window?, expected to pass)
SUSPICIOUS = {
    "clean": (lambda good, window: good, True, True),
    "few late": (lambda good, window: _late(good, window, 5), True, True),
    "late at the tolerance": (
        lambda good, window: _late(good, window, _last_tolerated(len(good), 0.01)),
        True,
        True,
    ),
    "late past the tolerance": (
        lambda good, window: _late(good, window, _last_tolerated(len(good), 0.01) + 1),
        True,
        False,
    ),
    "one negative": (lambda good, window: _negative(good, 1), False, True),
    "many negative": (lambda good, window: _negative(good, len(good) // 50), False, False),
    "milliseconds": (
        lambda good, window: good.assign(timestamp=good.timestamp * 1000),
        False,
        False,
    ),
    "duplicates at the tolerance": (
        lambda good, window: _with_copies(good, _copies_to_fail(good) - 1),
        True,
        True,
    ),
    "duplicates past the tolerance": (
        lambda good, window: _with_copies(good, _copies_to_fail(good)),
        True,
        False,
    ),
}


@pytest.mark.parametrize("case", list(SUSPICIOUS))
def test_checks_and_gx_give_the_same_verdict(good, window, case):
    build, use_window, passes = SUSPICIOUS[case]
    frame = build(good, window)
    window = window if use_window else None
    report = validate_raw(frame, case, window=window, now=NOW)
    findings = checks.find_suspicious(frame, window, now=NOW)
    assert report.success is passes, report.to_markdown()
    assert (not any(f.error for f in findings)) is passes
    if passes:
        checks.check_suspicious(frame, case, window, now=NOW)
    else:
        with pytest.raises(DataError):
            checks.check_suspicious(frame, case, window, now=NOW)
    # and both count the same offending rows
    counted = {
        r["expectation"]: r["unexpected_count"]
        for r in report.results
        if r["column"] in ("timestamp", ", ".join(COLUMNS))
    }
    found = {f.kind: f.count for f in findings}
    assert counted["expect_column_values_to_be_between"] == found.get("timestamps", 0)
    assert counted["expect_compound_columns_to_be_unique"] == found.get("duplicates", 0)
