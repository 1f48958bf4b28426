"""The canonical behaviour table every loader returns, and the error they raise on bad input.

A behaviour table is a pandas DataFrame with the columns of :data:`COLUMNS`, in that order:
``user_id``, ``item_id``, ``category_id`` (non-negative integers; loaders may use int32 for
memory), ``behavior_type`` (one of :data:`BEHAVIOR_TYPES`; loaders return it as a pandas
Categorical with exactly those categories, whose values are plain ``str``) and ``timestamp``
(integer Unix seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tdm.errors import TdmError

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
ID_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "category_id")
BEHAVIOR_TYPES: tuple[str, ...] = ("pv", "buy", "cart", "fav")


class DataError(TdmError, ValueError):
    """Input data that cannot be used, with the file, 1-based line (or row) and column named.

    Args:
        message: what is wrong.
        source: the file, URL or table name the data came from.
        line: 1-based line number in the file (header included) when known.
        column: the offending column.
        row: 1-based row number of a table when no file line is known.
    """

    def __init__(
        self,
        message: str,
        source: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.source = None if source is None else str(source)
        self.line = line
        self.column = column
        self.row = row
        where = []
        if self.source is not None:
            where.append(self.source)
        if line is not None:
            where.append(f"line {line}")
        elif row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


def behavior_categorical(values: Sequence[str] | np.ndarray | pd.Series) -> pd.Categorical:
    """Behaviour types as a Categorical with exactly :data:`BEHAVIOR_TYPES` as categories."""
    return pd.Categorical(values, categories=list(BEHAVIOR_TYPES))


def check_table(df: pd.DataFrame, source_name: str | Path, lines: np.ndarray | None = None) -> None:
    """Check that ``df`` is a valid behaviour table; raise on the first offender.

    Checks, in order: every column of :data:`COLUMNS` is present; no value is null; id and
    timestamp columns are integers; ids are non-negative; behaviour types are in
    :data:`BEHAVIOR_TYPES`. Within a check, the offender reported is the first row in table order.

    Args:
        df: the table.
        source_name: the file (or table name) named in the error.
        lines: (len(df),) optional 1-based file line of each row; without it the error names the
            1-based row of the table.

    Raises:
        DataError: naming ``source_name``, the line or row, and the column.
    """

    def fail(message: str, column: str, position: int) -> None:
        if lines is not None:
            raise DataError(message, source_name, line=int(lines[position]), column=column)
        raise DataError(message, source_name, row=position + 1, column=column)

    for column in COLUMNS:
        if column not in df.columns:
            raise DataError(
                f"missing column (have: {', '.join(map(str, df.columns))})",
                source_name,
                column=column,
            )
    for column in COLUMNS:
        null = df[column].isna().to_numpy()
        if null.any():
            fail("missing value", column, int(np.argmax(null)))
    for column in (*ID_COLUMNS, "timestamp"):
        if not pd.api.types.is_integer_dtype(df[column].dtype):
            raise DataError(
                f"expected integers, got dtype {df[column].dtype}", source_name, column=column
            )
    for column in ID_COLUMNS:
        negative = (df[column] < 0).to_numpy(dtype=bool)
        if negative.any():
            position = int(np.argmax(negative))
            fail(f"negative id {df[column].iat[position]}", column, position)
    known = df["behavior_type"].isin(BEHAVIOR_TYPES).to_numpy()
    if not known.all():
        position = int(np.argmin(known))
        fail(
            f"unknown behaviour type {df['behavior_type'].iat[position]!r} "
            f"(known: {', '.join(BEHAVIOR_TYPES)})",
            "behavior_type",
            position,
        )
