"""Great Expectations suites for the raw behaviour table and the prepared samples.

The suites are kept as code (``raw_suite``, ``prepared_suites``); ``validate_raw`` and
``validate_prepared`` run them with a throw-away (ephemeral) GX context on in-memory pandas
frames and return a :class:`ValidationReport`. ``require`` turns a failed report into a
:class:`ValidationFailed` exception.

``great_expectations`` is imported inside the functions: it costs about 3.5 s, so importing this
module stays cheap. The ``tdm`` package never imports it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tdm.data import checks
from tdm.data.schema import BEHAVIOR_TYPES, COLUMNS, ID_COLUMNS
from tdm.errors import TdmError

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite

    from tdm.data.protocol import Prepared
    from tdm.tree import Tree

logger = logging.getLogger(__name__)

N_EXAMPLES = 5
EVAL_SPLITS = ("valid", "test")


# ------------------------------------------------------------------------------------- report
@dataclass
class ValidationReport:
    """The outcome of validating one or more tables.

    Attributes:
        name: what was validated (the source name, or ``"prepared"``).
        success: every expectation passed.
        results: one dict per expectation: ``table``, ``expectation``, ``column``, ``success``,
            ``unexpected_count``, ``unexpected_percent``, ``examples`` (a few offending values),
            ``rows`` (their row indices), ``observed`` (table-level expectations) and ``error``
            (an exception GX caught, e.g. a missing column).
        raw: the GX validation results, ``{table: describe_dict}``, JSON-ready.
    """

    name: str
    success: bool
    results: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The results that did not pass."""
        return [r for r in self.results if not r["success"]]

    def to_json(self, indent: int | None = 2) -> str:
        """The report (results and raw GX output) as JSON."""
        payload = {
            "name": self.name,
            "success": self.success,
            "results": self.results,
            "raw": self.raw,
        }
        return json.dumps(payload, indent=indent, default=str)

    def to_markdown(self) -> str:
        """A table: expectation, column, offending rows and a few examples, failures first."""
        status = "passed" if self.success else "FAILED"
        lines = [
            f"### Validation of {self.name}: {status} "
            f"({len(self.results) - len(self.failures)}/{len(self.results)} expectations)",
            "",
            "| ok | table | expectation | column | offending rows | examples |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(self.results, key=lambda r: r["success"]):
            offending = "" if r["unexpected_count"] is None else str(r["unexpected_count"])
            lines.append(
                f"| {'yes' if r['success'] else '**no**'} | {r['table']} | {r['expectation']} "
                f"| {r['column'] or ''} | {offending} | {_md_escape(_describe_examples(r))} |"
            )
        return "\n".join(lines) + "\n"


class ValidationFailed(TdmError):
    """Data that failed validation; ``report`` holds the full :class:`ValidationReport`."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        failures = report.failures
        lines = [
            f"validation of {report.name} failed: "
            f"{len(failures)} of {len(report.results)} expectations"
        ]
        for r in failures:
            where = f" on column {r['column']!r}" if r["column"] else ""
            count = (
                "" if r["unexpected_count"] is None else f": {r['unexpected_count']} offending rows"
            )
            lines.append(f"  - [{r['table']}] {r['expectation']}{where}{count}")
            detail = _describe_examples(r)
            if detail:
                lines.append(f"      {detail}")
        super().__init__("\n".join(lines))


def require(report: ValidationReport) -> ValidationReport:
    """Return ``report`` if it passed.

    Raises:
        ValidationFailed: when any expectation failed.
    """
    if not report.success:
        raise ValidationFailed(report)
    return report


# ------------------------------------------------------------------------------------- suites
def raw_suite(
    window: tuple[int, int] | None = None,
    outlier_fraction: float = checks.OUTLIER_FRACTION,
    duplicate_fraction: float = checks.DUPLICATE_FRACTION,
    now: float | None = None,
) -> ExpectationSuite:
    """Expectations on a canonical behaviour table (``tdm.data.schema``).

    Columns exactly :data:`COLUMNS` in that order; no nulls; ids >= 0; behaviour types in
    :data:`BEHAVIOR_TYPES`; timestamps within ``window`` (inclusive; without a window, between 0
    and now) for at least ``1 - outlier_fraction`` of the rows; at most ``duplicate_fraction`` of
    the rows belong to a group of identical rows (both copies of a duplicated row count).

    The last two are the suspicious-data findings of :mod:`tdm.data.checks`, which ``tdm prepare``
    runs without GX: bounds, tolerances and the pass rule come from there, so both give the same
    verdict on the same data.

    Args:
        window: ``(first, last)`` Unix seconds (``tdm.data.checks.expected_window``), or None.
        outlier_fraction: tolerated share of timestamps out of bounds.
        duplicate_fraction: tolerated share of rows that are exact duplicates.
        now: Unix seconds taken as the present (the bound without a window); default the clock.

    Returns:
        The suite (not registered with any context).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    _context()  # GX builds suites only while a context is active
    suite = gx.ExpectationSuite(name="raw_behaviors")
    suite.add_expectation(gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(COLUMNS)))
    for column in COLUMNS:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    for column in ID_COLUMNS:
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeInSet(column="behavior_type", value_set=list(BEHAVIOR_TYPES))
    )
    lowest, highest = checks.timestamp_bounds(window, now)
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column="timestamp",
            min_value=lowest,
            max_value=highest,
            mostly=checks.mostly(outlier_fraction),
        )
    )
    suite.add_expectation(
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=list(COLUMNS), mostly=checks.mostly(duplicate_fraction)
        )
    )
    return suite


def prepared_suites(max_history: int | None = None) -> dict[str, ExpectationSuite]:
    """Expectations on the tables :func:`prepared_tables` builds from prepared data.

    ``items`` (one row per item occurrence in train sequences and in valid/test histories and
    truths): ``in_tree`` is True. ``eval_users`` (one row per valid/test user): ``user_id`` unique
    (the two splits are disjoint), ``in_train`` is False, ``history_length`` in
    ``[1, max_history]`` (no upper bound when ``max_history`` is None).

    Args:
        max_history: the longest history allowed, or None.

    Returns:
        ``{table name: suite}``.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    _context()  # GX builds suites only while a context is active
    items = gx.ExpectationSuite(name="prepared_items")
    items.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="item_index"))
    items.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="in_tree", value_set=[True]))

    users = gx.ExpectationSuite(name="prepared_eval_users")
    users.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="user_id"))
    users.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="in_train", value_set=[False]))
    users.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column="history_length", min_value=1, max_value=max_history
        )
    )
    return {"items": items, "eval_users": users}


def prepared_tables(
    prepared: Prepared, tree_items: Iterable[int] | np.ndarray
) -> dict[str, pd.DataFrame]:
    """Flat frames of the prepared arrays for :func:`prepared_suites`.

    Tree membership and user overlap are computed here as boolean columns (``in_tree``,
    ``in_train``) rather than passed to GX as value sets, so the suites and their JSON stay small
    however many items and users there are.

    Args:
        prepared: the loaded prepared data.
        tree_items: the item indices the tree holds (``tree.leaf_items``).

    Returns:
        ``{"items": DataFrame(split, user_id, item_index, in_tree),
        "eval_users": DataFrame(split, user_id, history_length, in_train)}``.
    """
    if not isinstance(tree_items, np.ndarray):
        tree_items = list(tree_items)
    tree_set = np.unique(np.asarray(tree_items, dtype=np.int64))
    parts = [("train", prepared.train.users, prepared.train.items, prepared.train.offsets)]
    for name in EVAL_SPLITS:
        split = prepared.split(name)
        parts.append((f"{name}_history", split.users, split.hist_items, split.hist_offsets))
        parts.append((f"{name}_truth", split.users, split.truth_items, split.truth_offsets))
    item_frames = []
    for name, users, items, offsets in parts:
        item_frames.append(
            pd.DataFrame(
                {
                    "split": name,
                    "user_id": np.repeat(users, np.diff(offsets)),
                    "item_index": items,
                    "in_tree": np.isin(items, tree_set),
                }
            )
        )
    user_frames = []
    for name in EVAL_SPLITS:
        split = prepared.split(name)
        user_frames.append(
            pd.DataFrame(
                {
                    "split": name,
                    "user_id": split.users,
                    "history_length": np.diff(split.hist_offsets),
                    "in_train": np.isin(split.users, prepared.train.users),
                }
            )
        )
    return {
        "items": pd.concat(item_frames, ignore_index=True),
        "eval_users": pd.concat(user_frames, ignore_index=True),
    }


# ---------------------------------------------------------------------------------- validation
def validate_raw(
    df: pd.DataFrame,
    source_name: str,
    window: tuple[int, int] | None = None,
    outlier_fraction: float = checks.OUTLIER_FRACTION,
    duplicate_fraction: float = checks.DUPLICATE_FRACTION,
    now: float | None = None,
) -> ValidationReport:
    """Run :func:`raw_suite` on a behaviour table.

    Args:
        df: the behaviour table (not modified).
        source_name: the file or table name shown in the report.
        window, outlier_fraction, duplicate_fraction, now: see :func:`raw_suite`.

    Returns:
        The report; call :func:`require` to raise on failure.
    """
    suite = raw_suite(window, outlier_fraction, duplicate_fraction, now)
    return _run(source_name, {"behaviors": (df, suite)})


def validate_prepared(
    prepared: Prepared, tree: Tree, max_history: int | None = None
) -> ValidationReport:
    """Run :func:`prepared_suites` on prepared data against a tree.

    Args:
        prepared: from ``tdm.data.protocol.load_prepared``.
        tree: the tree whose leaves must hold every item of the samples.
        max_history: upper bound on evaluation users' history lengths, or None. ``prepare`` keeps
            the whole first half of each evaluation user's sequence (the model reads the last
            ``meta["max_history"]`` of it), so that meta value is not a valid bound.

    Returns:
        The report; call :func:`require` to raise on failure.
    """
    tables = prepared_tables(prepared, tree.leaf_items)
    suites = prepared_suites(max_history)
    return _run("prepared", {name: (tables[name], suites[name]) for name in suites})


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run(name: str, tables: dict[str, tuple[pd.DataFrame, ExpectationSuite]]) -> ValidationReport:
    """Validate each frame with its suite in one ephemeral context and merge the outcomes."""
    context = _context()
    source = context.data_sources.add_pandas(f"{name}_source")
    results: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for table, (frame, suite) in tables.items():
        batch_definition = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(
            "all"
        )
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        outcome = batch.validate(suite, result_format="COMPLETE")
        raw[table] = json.loads(json.dumps(outcome.describe_dict(), default=str))
        results.extend(_summarise(table, r) for r in outcome.results)
    report = ValidationReport(
        name=name, success=all(r["success"] for r in results), results=results, raw=raw
    )
    if report.success:
        logger.info("validation of %s passed (%d expectations)", name, len(results))
    else:
        logger.warning(
            "validation of %s failed: %d of %d expectations",
            name,
            len(report.failures),
            len(results),
        )
    return report


def _summarise(table: str, result: Any) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = config.kwargs
    details = result.result or {}
    column = kwargs.get("column")
    observed = details.get("observed_value")
    if column is None and "column_list" in kwargs:
        expected = list(kwargs["column_list"])
        if isinstance(observed, list) and config.type.startswith("expect_table_columns"):
            missing = [c for c in expected if c not in observed]
            extra = [c for c in observed if c not in expected]
            named = missing + extra
            column = ", ".join(map(str, named)) if named else ", ".join(map(str, expected))
        else:
            column = ", ".join(map(str, expected))
    error = None
    info = result.exception_info or {}
    if info.get("raised_exception"):
        error = info.get("exception_message")
    else:
        messages = [
            v.get("exception_message")
            for v in info.values()
            if isinstance(v, dict) and v.get("raised_exception")
        ]
        error = "; ".join(dict.fromkeys(m for m in messages if m)) or None
    return {
        "table": table,
        "expectation": config.type,
        "column": column,
        "success": bool(result.success),
        "unexpected_count": details.get("unexpected_count"),
        "unexpected_percent": details.get("unexpected_percent"),
        "examples": _plain(details.get("partial_unexpected_list", [])[:N_EXAMPLES]),
        "rows": _plain(details.get("partial_unexpected_index_list", [])[:N_EXAMPLES]),
        "observed": _plain(observed),
        "error": error,
    }


def _plain(value: Any) -> Any:
    """JSON-ready copy (numpy scalars and tuples become Python values and lists)."""
    return json.loads(json.dumps(value, default=_to_builtin))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _describe_examples(r: dict[str, Any]) -> str:
    parts = []
    if r["error"]:
        parts.append(f"error: {r['error']}")
    if r["examples"]:
        parts.append(f"e.g. {r['examples']}")
    if r["rows"]:
        parts.append(f"at rows {r['rows']}")
    if r["observed"] is not None and not r["success"] and not r["examples"]:
        parts.append(f"observed {r['observed']}")
    return " ".join(parts)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
