"""Suspicious-data findings on a loaded behaviour table, and their thresholds.

The single definition shared by the plain CLI (``tdm prepare`` / ``tdm pipeline`` call
:func:`check_loaded` from :func:`tdm.stages.prepare`, just after loading) and the Great Expectations
raw suite (``tasks.validation.raw_suite`` takes its bounds, tolerances and pass rule from here), so
the two give the same verdict on the same data.

Findings:

- **Timestamps out of bounds.** A timestamp is suspect when it lies outside the source's known
  window (:func:`expected_window`: UserBehavior's documented nine days, or the synthetic
  generator's configured timeline), or, for a source without one (MovieLens), when it is negative
  or later than now (:func:`timestamp_bounds`). The message counts them by kind: negative, after
  now, before or after the window.
- **Duplicated rows.** Rows identical in every column. Every copy counts (a row and its repeat are
  two duplicated rows), as in GX's ``expect_compound_columns_to_be_unique``.

Verdicts. Each finding is the share of rows it concerns, held against a tolerance
(:data:`OUTLIER_FRACTION`, :data:`DUPLICATE_FRACTION`: 1 % each):

- **Error** above the tolerance: :class:`~tdm.data.schema.DataError` naming the first offending
  line (UserBehavior) or row of the loaded table (other sources) and the column, with the counts.
  That much is a systematic fault, not noise: timestamps in milliseconds, the wrong data set or
  window, a file appended to itself.
- **Warning** (one log line, counts and the first example) for suspect timestamps within the
  tolerance: real logs carry a few bad clocks (UserBehavior has rows outside its nine days), and
  the rows are kept, so a zero tolerance would refuse the paper's own data set.
- Duplicated rows within the tolerance are logged at INFO only: a click log repeats a click within
  one second now and then (the synthetic generator does too, about 0.2 % of rows), and a warning on
  every run of the default data would teach people to ignore warnings.

"Above the tolerance" is decided exactly as GX decides ``mostly`` (:func:`exceeds`:
``(n - bad) / n < 1 - tolerance`` in floating point), so the two never disagree at the boundary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from tdm.config import DataConfig, SyntheticConfig
from tdm.data.schema import COLUMNS, DataError

logger = logging.getLogger(__name__)

OUTLIER_FRACTION: float = 0.01
"""Tolerated share of rows with a suspect timestamp (GX suite: ``outlier_fraction``)."""
DUPLICATE_FRACTION: float = 0.01
"""Tolerated share of rows that are exact duplicates (GX suite: ``duplicate_fraction``)."""

# The UserBehavior data set's documented window (UTC+8 days 2017-11-25..2017-12-03), which the
# synthetic generator's default timeline also covers.
USERBEHAVIOR_WINDOW: tuple[int, int] = (1511539200, 1511539200 + 9 * 86400)

_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def expected_window(data: DataConfig, synthetic: SyntheticConfig) -> tuple[int, int] | None:
    """The timestamps a raw data set should lie in, when its source has a known window.

    Args:
        data: the ``data`` section (``source``).
        synthetic: the ``synthetic`` section (the generator's timeline).

    Returns:
        ``(first, last)`` Unix seconds, inclusive, or None (MovieLens: no documented window).
    """
    if data.source == "userbehavior":
        return USERBEHAVIOR_WINDOW
    if data.source == "synthetic":
        start = synthetic.start_timestamp
        return start, start + synthetic.days * 86400
    return None


def timestamp_bounds(
    window: tuple[int, int] | None = None, now: float | None = None
) -> tuple[int, int]:
    """The inclusive range outside which a timestamp is suspect: ``window`` when the source has
    one, else ``[0, now]``.

    Args:
        window: the source's known window, or None.
        now: Unix seconds taken as the present; default the clock.

    Returns:
        ``(lowest, highest)`` Unix seconds.
    """
    if window is not None:
        return int(window[0]), int(window[1])
    return 0, int(time.time() if now is None else now)


def mostly(tolerance: float) -> float:
    """GX's ``mostly`` for a tolerated share of offending rows."""
    return 1.0 - tolerance


def exceeds(count: int, total: int, tolerance: float) -> bool:
    """``count`` offending rows of ``total`` are more than ``tolerance`` allows, computed as GX
    does for ``mostly`` (so both agree on every count)."""
    if total == 0:
        return False
    return (float(total) - float(count)) / float(total) < mostly(tolerance)


@dataclass(frozen=True)
class Finding:
    """Suspicious rows of one kind.

    Attributes:
        kind: ``"timestamps"`` or ``"duplicates"``.
        count: offending rows.
        total: rows of the table.
        tolerance: the tolerated share of ``count / total``.
        position: 0-based table row of the first offending row (for duplicates, the first row that
            repeats an earlier one).
        column: the column at fault (None for duplicates: every column).
        what: what is suspect, with the counts by kind (``"have a timestamp outside ..."``).
        example: the first offending row's values (``"user 1, item 2, timestamp -5"``).
        original: for duplicates, the 0-based row that ``position`` repeats.
    """

    kind: str
    count: int
    total: int
    tolerance: float
    position: int
    column: str | None
    what: str
    example: str
    original: int | None = None

    @property
    def error(self) -> bool:
        """More offending rows than tolerated."""
        return exceeds(self.count, self.total, self.tolerance)

    @property
    def share(self) -> str:
        """``count`` of ``total`` rows as text: ``"5 of 300 rows (1.67 %)"``."""
        return f"{self.count} of {self.total} rows ({100 * self.count / self.total:.3g} %)"


def find_suspicious(
    df: pd.DataFrame,
    window: tuple[int, int] | None = None,
    now: float | None = None,
    outlier_fraction: float = OUTLIER_FRACTION,
    duplicate_fraction: float = DUPLICATE_FRACTION,
) -> list[Finding]:
    """The findings on a behaviour table (see the module docstring), errors or not.

    Args:
        df: the behaviour table (:mod:`tdm.data.schema`; integer ``timestamp``).
        window: the source's known window (:func:`expected_window`), or None.
        now: Unix seconds taken as the present; default the clock.
        outlier_fraction: tolerated share of suspect timestamps.
        duplicate_fraction: tolerated share of duplicated rows.

    Returns:
        One :class:`Finding` per kind that has offending rows, timestamps first.
    """
    findings = []
    timestamps = _timestamp_finding(df, window, now, outlier_fraction)
    if timestamps is not None:
        findings.append(timestamps)
    duplicates = _duplicate_finding(df, duplicate_fraction)
    if duplicates is not None:
        findings.append(duplicates)
    return findings


def check_suspicious(
    df: pd.DataFrame,
    source_name: str,
    window: tuple[int, int] | None = None,
    lines: Sequence[int] | np.ndarray | None = None,
    now: float | None = None,
    outlier_fraction: float = OUTLIER_FRACTION,
    duplicate_fraction: float = DUPLICATE_FRACTION,
) -> list[Finding]:
    """Raise on the first finding above its tolerance; log the others (see the module docstring).

    Args:
        df: the behaviour table.
        source_name: the file or table name named in messages.
        window, now, outlier_fraction, duplicate_fraction: see :func:`find_suspicious`.
        lines: (len(df),) optional 1-based file line of each row (a ``range`` will do); without it
            messages name the 1-based row of the table.

    Returns:
        The findings, none of them an error.

    Raises:
        DataError: naming ``source_name``, the first offending line or row, and the column.
    """
    findings = find_suspicious(df, window, now, outlier_fraction, duplicate_fraction)
    for finding in findings:
        if finding.error:
            line, row = _line_or_row(finding.position, lines)
            raise DataError(
                f"{finding.share} {finding.what}; more than the "
                f"{100 * finding.tolerance:g} % tolerated; the first: {finding.example}"
                f"{_repeats(finding, lines)}",
                source_name,
                line=line,
                column=finding.column,
                row=row,
            )
    for finding in findings:
        level = logging.WARNING if finding.kind == "timestamps" else logging.INFO
        logger.log(
            level,
            "%s: %s %s; within the %g %% tolerated, kept; the first, %s: %s%s",
            source_name,
            finding.share,
            finding.what,
            100 * finding.tolerance,
            _where(finding.position, lines),
            finding.example,
            _repeats(finding, lines),
        )
    return findings


def check_loaded(
    df: pd.DataFrame, data: DataConfig, synthetic: SyntheticConfig, now: float | None = None
) -> list[Finding]:
    """:func:`check_suspicious` on the table :func:`tdm.data.loaders.load_dataset` returned for
    ``data``: the source's window, and file lines for UserBehavior (one row per line).

    Args:
        df: the loaded table.
        data: the ``data`` section it was loaded with.
        synthetic: the ``synthetic`` section.
        now: Unix seconds taken as the present; default the clock.

    Returns:
        The findings, none of them an error.

    Raises:
        DataError: a finding above its tolerance.
    """
    lines = None
    if data.source == "userbehavior" and data.path:
        from tdm.data.loaders import userbehavior_file

        source = str(userbehavior_file(data.path))
        lines = range(1, len(df) + 1)
    else:
        source = data.path if data.source == "movielens" and data.path else data.source
    return check_suspicious(df, source, expected_window(data, synthetic), lines, now)


def duplicated_rows(df: pd.DataFrame) -> np.ndarray:
    """(len(df),) bool: the row is identical in every column to another row (all copies marked,
    as ``df.duplicated(keep=False)``).

    Rows are hashed into 64-bit keys column by column and sorted; only rows whose key repeats are
    compared exactly, so a table of 100M rows costs a sort of 100M integers rather than pandas'
    row hashing (about 20x slower).
    """
    n = len(df)
    if n == 0:
        return np.zeros(0, dtype=bool)
    key = np.zeros(n, dtype=np.uint64)
    for column in df.columns:
        key ^= _column_codes(df[column]).astype(np.uint64)
        key *= _HASH_MULTIPLIER
        key ^= key >> np.uint64(29)
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    duplicated = np.zeros(n, dtype=bool)
    if repeated.size:
        values = np.unique(repeated)  # sorted; few unless the table is mostly copies
        slot = np.minimum(np.searchsorted(values, key), len(values) - 1)
        candidates = np.flatnonzero(values[slot] == key)
        exact = df.iloc[candidates].duplicated(keep=False).to_numpy()
        duplicated[candidates[exact]] = True
    return duplicated


def _column_codes(values: pd.Series) -> np.ndarray:
    """Integers equal exactly where ``values`` are equal (NaN equal to NaN, as pandas does)."""
    if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_extension_array_dtype(
        values.dtype
    ):
        return values.to_numpy()
    if isinstance(values.dtype, pd.CategoricalDtype):
        return values.cat.codes.to_numpy()
    return pd.factorize(values, use_na_sentinel=False)[0]


def _timestamp_finding(
    df: pd.DataFrame, window: tuple[int, int] | None, now: float | None, tolerance: float
) -> Finding | None:
    present = int(time.time() if now is None else now)
    lowest, highest = timestamp_bounds(window, present)
    times = df["timestamp"]
    valid = times.notna().to_numpy()
    values = times.to_numpy(dtype=np.int64, na_value=0)
    outside = valid & ((values < lowest) | (values > highest))
    count = int(outside.sum())
    if not count:
        return None
    kinds = {
        "negative": values < 0,
        "after now": values > present,
        "before the window": (values >= 0) & (values < lowest),
        "after the window": (values <= present) & (values > highest),
    }
    breakdown = ", ".join(
        f"{int(n)} {name}" for name, mask in kinds.items() if (n := (mask & outside).sum())
    )
    if window is None:
        what = f"have a negative timestamp or one after now ({_utc(present)}): {breakdown}"
    else:
        what = (
            f"have a timestamp outside the source's window {_utc(lowest)} .. {_utc(highest)} "
            f"[{lowest}, {highest}]: {breakdown}"
        )
    position = int(np.argmax(outside))
    return Finding(
        kind="timestamps",
        count=count,
        total=int(valid.sum()),
        tolerance=tolerance,
        position=position,
        column="timestamp",
        what=what,
        example=_describe_row(df, position),
    )


def _duplicate_finding(df: pd.DataFrame, tolerance: float) -> Finding | None:
    table = df[list(COLUMNS)] if set(COLUMNS) <= set(df.columns) else df
    positions = np.flatnonzero(duplicated_rows(table))
    if not positions.size:
        return None
    copies = table.iloc[positions]
    repeat = int(np.argmax(copies.duplicated(keep="first").to_numpy()))
    same = np.ones(repeat, dtype=bool)
    for column in copies.columns:
        earlier = copies[column].iloc[:repeat].to_numpy()
        value = copies[column].iloc[repeat]
        same &= (earlier == value) | (pd.isna(earlier) & pd.isna(value))
    return Finding(
        kind="duplicates",
        count=int(positions.size),
        total=len(df),
        tolerance=tolerance,
        position=int(positions[repeat]),
        column=None,
        what="are exact duplicates (identical in every column to another row)",
        example=_describe_row(df, int(positions[repeat])),
        original=int(positions[int(np.argmax(same))]),
    )


def _describe_row(df: pd.DataFrame, position: int) -> str:
    row = df.iloc[position]
    parts = [f"{name.removesuffix('_id')} {row[name]}" for name in COLUMNS if name in df.columns]
    return ", ".join(parts)


def _line_or_row(
    position: int, lines: Sequence[int] | np.ndarray | None
) -> tuple[int | None, int | None]:
    if lines is None:
        return None, position + 1
    return int(lines[position]), None


def _where(position: int, lines: Sequence[int] | np.ndarray | None) -> str:
    line, row = _line_or_row(position, lines)
    return f"line {line}" if line is not None else f"row {row}"


def _repeats(finding: Finding, lines: Sequence[int] | np.ndarray | None) -> str:
    if finding.original is None:
        return ""
    return f", repeating {_where(finding.original, lines)}"


def _utc(seconds: int) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return str(seconds)
