"""Loaders of the raw data sets into the canonical behaviour table (:mod:`tdm.data.schema`).

Sources (paper Sec. 5.1):

- MovieLens (GroupLens): a folder with ``ratings.csv`` + ``movies.csv`` (20M/25M/latest format,
  with a header) or ``ratings.dat`` + ``movies.dat`` (1M/10M format, ``::``-separated, latin-1, no
  header), or a local path or URL of a GroupLens ``.zip``, downloaded and extracted into a cache.
- Taobao UserBehavior (Tianchi data set 649): ``UserBehavior.csv``, no header, about 100M rows;
  read by pyarrow with explicit narrow column types, never row by row in Python.
- The synthetic generator of :mod:`tdm.data.synthetic`.

Every reading error is a :class:`~tdm.data.schema.DataError` naming the file, the 1-based line
and the column of the first offending row: a value that does not convert (or does not fit int64),
a wrong number of fields, a byte that is not UTF-8, a line longer than :data:`BLOCK_SIZE`, an empty
file, a non-finite rating. The fast path is pyarrow's multi-threaded reader alone; the passes
that locate an error run only after it has refused a file.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tdm.config import DataConfig, SyntheticConfig
from tdm.data.schema import BEHAVIOR_TYPES, COLUMNS, DataError, behavior_categorical
from tdm.io import atomic_dir, atomic_file, sha256_file

logger = logging.getLogger(__name__)

NO_GENRE = "(no genres listed)"
URL_SCHEMES = ("http://", "https://", "file://", "ftp://")
# pyarrow reads a csv in blocks of this many bytes; it cannot read a line longer than one block
# (whether it fails depends on where the line falls), so such a line is refused outright.
BLOCK_SIZE = 1 << 20


def default_cache_dir() -> Path:
    """Where downloads and extracted archives go: ``$TDM_FLOW_CACHE`` or ``~/.cache/tdm-flow``."""
    return Path(os.environ.get("TDM_FLOW_CACHE", "~/.cache/tdm-flow")).expanduser()


# ---------------------------------------------------------------------------------------------
# Downloads and archives


def download(url: str, dest_dir: str | Path, force: bool = False) -> Path:
    """Download the zip archive at ``url`` into ``dest_dir`` and return its path.

    The file is written to a temporary name in ``dest_dir``, checked to be a complete zip archive
    (every member's CRC is verified) and only then renamed to its final name, so an interrupted or
    bad download never leaves a file that looks valid. An existing valid archive of the same name
    is reused unless ``force``.

    Args:
        url: ``http(s)://``, ``ftp://`` or ``file://`` URL of a ``.zip`` file.
        dest_dir: cache folder, created if missing.
        force: download again even when the archive is already there.

    Returns:
        Path of the archive in ``dest_dir`` (named after the last component of the URL path).

    Raises:
        DataError: naming the URL when the download fails or the result is not a zip archive.
    """
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download.zip"
    target = dest_dir / name
    if target.exists() and not force:
        if _is_valid_zip(target):
            logger.info("using cached %s", target)
            return target
        logger.warning("cached %s is not a valid zip archive; downloading again", target)
    try:
        logger.info("downloading %s to %s", url, target)
        with atomic_file(target) as tmp:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=120) as response:
                shutil.copyfileobj(response, out, length=1 << 20)
            if not _is_valid_zip(tmp):
                raise DataError("the downloaded file is not a valid zip archive", url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"download failed: {exc}", url) from exc
    return target


def _is_valid_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def extract_zip(zip_path: str | Path, dest_dir: str | Path) -> Path:
    """Extract ``zip_path`` into a folder of ``dest_dir`` keyed by the archive's content.

    Extraction goes to a temporary folder renamed into place when complete, so an existing
    folder is always a whole extraction and is reused. Members that would land outside the folder
    (absolute paths, ``..``) are refused.

    Args:
        zip_path: the archive.
        dest_dir: cache folder, created if missing.

    Returns:
        The folder holding the extracted members, ``dest_dir/<stem>-<sha256 prefix>``.

    Raises:
        DataError: naming the archive when it is not a zip file or holds an unsafe member.
    """
    zip_path = Path(zip_path)
    dest_dir = Path(dest_dir).expanduser()
    target = dest_dir / f"{zip_path.stem}-{sha256_file(zip_path)[:12]}"
    if target.is_dir():
        return target
    try:
        with atomic_dir(target) as tmp, zipfile.ZipFile(zip_path) as archive:
            root = tmp.resolve()
            for member in archive.namelist():
                resolved = (tmp / member).resolve()
                if resolved != root and root not in resolved.parents:
                    raise DataError(f"unsafe member path {member!r}", zip_path)
            archive.extractall(tmp)
    except zipfile.BadZipFile as exc:
        raise DataError(f"not a zip archive: {exc}", zip_path) from exc
    return target


# ---------------------------------------------------------------------------------------------
# CSV reading with errors located to file, line and column


@dataclass(frozen=True)
class _CsvSpec:
    """How to read one delimited file.

    ``names`` are the columns pyarrow splits a line into, ``types`` the kept ones with their
    types. A ``::``-separated file is read with delimiter ``:`` (``double``): the fields are every
    other column, named by ``fields``.
    """

    names: tuple[str, ...]
    types: dict[str, pa.DataType]
    header: bool
    delimiter: str = ","
    double: bool = False
    fields: tuple[str, ...] | None = None

    @property
    def include(self) -> list[str]:
        return list(self.types)

    @property
    def field_names(self) -> tuple[str, ...]:
        return self.fields or self.names

    def display_name(self, name: str) -> str:
        position = self.names.index(name)
        return self.field_names[position // 2 if self.double else position]


def _read_csv(path: Path, spec: _CsvSpec) -> pa.Table:
    """Read ``path`` with pyarrow (multi-threaded) or raise DataError at the first bad line."""
    read_options = pacsv.ReadOptions(
        column_names=list(spec.names), skip_rows=int(spec.header), block_size=BLOCK_SIZE
    )
    parse_options = pacsv.ParseOptions(delimiter=spec.delimiter, ignore_empty_lines=False)
    convert_options = pacsv.ConvertOptions(
        column_types=spec.types,
        include_columns=spec.include,
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        return pacsv.read_csv(
            path,
            read_options=read_options,
            parse_options=parse_options,
            convert_options=convert_options,
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        _locate_csv_error(path, spec, exc)


class _BadCell(Exception):
    def __init__(self, line: int, column: str, value: str, target: pa.DataType) -> None:
        super().__init__(f"line {line}, column {column}: {_shown(value)}")
        self.line, self.column, self.value, self.target = line, column, value, target


def _locate_csv_error(path: Path, spec: _CsvSpec, exc: Exception) -> NoReturn:
    """Find the first bad line of a file pyarrow refused.

    Two passes, both only on this error path: a byte scan (:func:`_scan_raw`) for an empty file,
    bytes that are not UTF-8 and lines longer than :data:`BLOCK_SIZE` (which pyarrow cannot
    read at all), then a serial pyarrow pass reading strings over the lines before the first such
    problem, for values that do not convert and lines with the wrong number of fields. The
    earlier offender wins.

    Raises:
        _BadCell: for a value that does not convert to its column type.
        DataError: for anything else, or, when neither pass finds anything, with pyarrow's own
            message.
    """
    problem, has_content = _scan_raw(path, spec.delimiter, BLOCK_SIZE)
    if problem is None and not has_content:
        empty = path.stat().st_size == 0
        raise DataError("empty file" if empty else "empty file (only blank lines)", path) from None
    try:
        if problem is None:
            _locate_bad_row(path, path, spec)
        else:
            with pa.memory_map(str(path)) as mapped:
                head = pa.BufferReader(mapped.read_buffer(problem.offset))
                _locate_bad_row(head, path, spec)
    except pa.ArrowInvalid as again:
        # Only the lines before a byte-level problem were read, and they may hold no row.
        if problem is None:
            raise DataError(f"unreadable file: {again}", path) from again
    if problem is not None:
        names = spec.names
        column = spec.display_name(names[min(problem.field, len(names) - 1)])
        raise DataError(problem.message, path, line=problem.line, column=column) from None
    raise DataError(f"unreadable file: {exc}", path) from exc


def _locate_bad_row(source: Path | pa.NativeFile, path: Path, spec: _CsvSpec) -> None:
    """Serial pass over ``source`` (the file or its head) reading strings; raise at the first bad
    line, return when there is none.

    Raises:
        _BadCell: for a value that does not convert to its column type.
        DataError: for a line with the wrong number of fields or with no values at all.
        pyarrow.ArrowInvalid: what pyarrow cannot read even as strings.
    """
    invalid: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row)
        return "skip"

    reader = pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(
            column_names=list(spec.names),
            skip_rows=int(spec.header),
            use_threads=False,
            block_size=BLOCK_SIZE,
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=spec.delimiter, ignore_empty_lines=False, invalid_row_handler=on_invalid
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in spec.include},
            include_columns=spec.include,
            null_values=[],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )

    def line_of(valid_row: int) -> int:
        # valid_row: 0-based among the rows pyarrow kept; skipped rows shift the line.
        line = valid_row + 1 + int(spec.header)
        for row in invalid:
            if row.number is not None and row.number <= line:
                line += 1
        return line

    rows_before = 0
    for batch in reader:
        bad: tuple[int, str] | None = None
        for name in spec.include:
            target = spec.types[name]
            if pa.types.is_string(target) or pa.types.is_dictionary(target):
                continue
            position = _first_unconvertible(batch.column(name), target)
            if position is not None and (bad is None or position < bad[0]):
                bad = (position, name)
        if bad is not None:
            line = line_of(rows_before + bad[0])
            if invalid and invalid[0].number is not None and invalid[0].number < line:
                _raise_invalid_row(path, spec, invalid[0])
            if all(batch.column(name)[bad[0]].as_py() == "" for name in spec.include):
                raise DataError("blank line (no values)", path, line=line)
            value = batch.column(bad[1])[bad[0]].as_py()
            raise _BadCell(line, bad[1], value, spec.types[bad[1]])
        if batch.num_rows:
            last_line = line_of(rows_before + batch.num_rows - 1)
            if invalid and invalid[0].number is not None and invalid[0].number <= last_line:
                _raise_invalid_row(path, spec, invalid[0])
        rows_before += batch.num_rows
    if invalid:
        _raise_invalid_row(path, spec, invalid[0])


@dataclass(frozen=True)
class _RawProblem:
    """A line :func:`_scan_raw` refuses: its 1-based number, the file offset of its first byte,
    the 0-based (delimiter-separated) field at fault and what is wrong."""

    line: int
    offset: int
    field: int
    message: str


def _scan_raw(path: Path, delimiter: str, max_line: int) -> tuple[_RawProblem | None, bool]:
    """The first line of ``path`` that is not UTF-8 or longer than ``max_line`` bytes.

    Reads the file in chunks cut at line ends (so no character is split), decodes each chunk
    and measures its lines with numpy; stops at the first problem.

    Returns:
        The problem (None when there is none) and whether the file holds anything but
        whitespace (meaningful when there is no problem: the whole file was read).
    """
    separator = delimiter.encode()
    line, base, pending, content = 1, 0, b"", False
    with open(path, "rb") as handle:
        while True:
            data = handle.read(_SCAN_CHUNK)
            buffer = pending + data if pending else data
            cut = buffer.rfind(b"\n") + 1 if data else len(buffer)
            block, pending = buffer[:cut], buffer[cut:]
            if block:
                content = content or not block.isspace()
                found = _block_problem(block, max_line)
                if found is not None:
                    offset, too_long = found
                    start = block.rfind(b"\n", 0, offset) + 1
                    end = block.find(b"\n", offset)
                    text = block[start : end if end >= 0 else len(block)]
                    field, raw = _field_at(text, offset - start, separator)
                    if too_long:
                        message = _LONG_LINE.format(limit=max_line, field=_snippet(raw))
                    else:
                        message = _NOT_UTF8.format(byte=block[offset], field=_snippet(raw))
                    problem = _RawProblem(
                        line + block.count(b"\n", 0, start), base + start, field, message
                    )
                    return problem, True
                line += block.count(b"\n")
                base += len(block)
            if len(pending) > max_line:
                field, raw = _field_at(pending, max_line, separator)
                message = _LONG_LINE.format(limit=max_line, field=_snippet(raw))
                return _RawProblem(line, base, field, message), True
            if not data:
                return None, content


_SCAN_CHUNK = 1 << 24
_LONG_LINE = "line longer than {limit} bytes, the most a line may hold; the field starts {field}"
_NOT_UTF8 = "byte 0x{byte:02x} is not UTF-8 (the file must be UTF-8 encoded): {field}"


def _block_problem(block: bytes, max_line: int) -> tuple[int, bool] | None:
    """Offset in ``block`` (whole lines) of its first non-UTF-8 byte or of the byte at which a
    line passes ``max_line``, whichever comes first, and whether it is the latter."""
    bad_byte = None
    try:
        block.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_byte = exc.start
    newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(block)]))
    long = np.flatnonzero(ends - starts > max_line)
    too_long = int(starts[long[0]]) + max_line if long.size else None
    if too_long is not None and (bad_byte is None or too_long < bad_byte):
        return too_long, True
    if bad_byte is not None:
        return bad_byte, False
    return None


def _field_at(line: bytes, offset: int, separator: bytes) -> tuple[int, bytes]:
    """The 0-based field of ``line`` holding byte ``offset`` (separators inside double quotes do
    not count) and that field's bytes."""
    head = line[:offset]
    if b'"' not in head:
        index, start = head.count(separator), head.rfind(separator) + 1
    else:
        index, start, quoted = 0, 0, False
        for position, byte in enumerate(head):
            if byte == ord('"'):
                quoted = not quoted
            elif byte == separator[0] and not quoted:
                index, start = index + 1, position + 1
    end = line.find(separator, offset)
    return index, line[start : end if end >= 0 else len(line)]


def _snippet(raw: bytes, limit: int = 40) -> str:
    """``raw`` quoted for a message: undecodable bytes as ``\\xff``, cut to ``limit`` characters."""
    text = raw.decode("utf-8", errors="backslashreplace")
    return "'" + (text if len(text) <= limit else text[: limit - 3] + "...") + "'"


def _first_unconvertible(values: pa.Array, target: pa.DataType) -> int | None:
    """Index of the first string in ``values`` that does not cast to ``target``, by bisection."""
    try:
        pc.cast(values, target)
        return None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    low, high = 0, len(values)
    while high - low > 1:
        mid = (low + high) // 2
        try:
            pc.cast(values.slice(low, mid - low), target)
            low = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            high = mid
    return low


def _raise_invalid_row(path: Path, spec: _CsvSpec, row: pacsv.InvalidRow) -> NoReturn:
    fields = spec.field_names
    actual = (row.actual_columns + 1) // 2 if spec.double else row.actual_columns
    column = fields[actual] if actual < len(fields) else fields[-1]
    text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
    separator = "::" if spec.double else spec.delimiter
    raise DataError(
        f"expected {len(fields)} fields separated by {separator!r}, got {actual}: {text!r}",
        path,
        line=row.number,
        column=column,
    )


def _cell_message(value: str, target: pa.DataType) -> str:
    """Why ``value`` does not read as ``target``."""
    if pa.types.is_integer(target) and _INTEGER.fullmatch(value) and not _fits_int64(value):
        return f"{_shown(value)} does not fit a 64-bit integer"
    return f"cannot read {_shown(value)} as {_describe(target)}"


def _shown(value: str, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters (a bad field can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


def _describe(target: pa.DataType) -> str:
    if pa.types.is_integer(target):
        return f"an integer ({target})"
    if pa.types.is_floating(target):
        return "a number"
    return str(target)


# ---------------------------------------------------------------------------------------------
# MovieLens


def load_movielens(
    path: str | Path,
    min_rating: float = 4.0,
    category_rule: str = "first",
    cache_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Load MovieLens ratings as implicit feedback (paper Sec. 5.1).

    Ratings ``>= min_rating`` are kept (the paper binarises at 4) as ``pv`` behaviours;
    ``user_id`` = userId, ``item_id`` = movieId, ``timestamp`` = the rating's Unix time. A movie's
    category is one of its genres:

    - ``"first"``: the first genre listed for the movie in the movies file;
    - ``"rarest"``: its genre carried by the fewest movies of the movies file (ties: the genre
      name first in sorted order), so a category is as specific as the data allows.

    ``"(no genres listed)"`` (or an empty genre field) is a category of its own. Category ids are
    dense, ``0..n_genres-1``, assigned in sorted order of the genre names over every genre label
    of the movies file, so a genre has the same id under either rule.

    Args:
        path: a folder holding ``ratings.csv`` + ``movies.csv`` (ML-20M/25M/latest) or
            ``ratings.dat`` + ``movies.dat`` (ML-1M/10M), directly or in one sub-folder; or the
            path or URL of a GroupLens ``.zip`` (downloaded and extracted into ``cache_dir``).
        min_rating: lowest rating kept.
        category_rule: ``"first"`` or ``"rarest"``.
        cache_dir: where archives are downloaded and extracted; default
            :func:`default_cache_dir`.

    Returns:
        The canonical behaviour table, in the ratings file's row order.

    Raises:
        DataError: missing or empty files, or a bad row (unparsable number, an integer beyond
            int64, wrong number of fields, a NaN or infinite rating, a byte that is not UTF-8, an
            over-long line or field, a rating of a movie absent from the movies file, a duplicate
            movie), naming the file, line and column.
    """
    if category_rule not in ("first", "rarest"):
        raise ValueError(f"category_rule must be 'first' or 'rarest', got {category_rule!r}")
    folder = _movielens_folder(path, Path(cache_dir) if cache_dir else default_cache_dir())
    ratings_path, movies_path, dat = _movielens_files(folder)
    logger.info("reading %s and %s", ratings_path, movies_path)
    movie_ids, genres, movie_lines = (_read_movies_dat if dat else _read_movies_csv)(movies_path)
    categories, vocabulary = _genre_categories(genres, category_rule)
    ratings = _read_ratings(ratings_path, dat)
    users = ratings.column("user_id").to_numpy()
    movies = ratings.column("item_id").to_numpy()
    rating = ratings.column("rating").to_numpy()
    times = ratings.column("timestamp").to_numpy()
    del ratings

    order = np.argsort(movie_ids, kind="stable")
    sorted_ids = movie_ids[order]
    duplicate = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if duplicate.size:
        first = int(np.min(np.maximum(order[duplicate], order[duplicate + 1])))
        raise DataError(
            f"duplicate movie id {movie_ids[first]}", movies_path, movie_lines[first], "movieId"
        )
    slot = np.searchsorted(sorted_ids, movies)
    slot = np.minimum(slot, max(len(sorted_ids) - 1, 0))
    known = sorted_ids[slot] == movies if len(sorted_ids) else np.zeros(len(movies), bool)
    if not known.all():
        row = int(np.argmin(known))
        raise DataError(
            f"movie {movies[row]} is not in {movies_path.name}",
            ratings_path,
            line=row + 1 + int(not dat),
            column="MovieID" if dat else "movieId",
        )
    keep = rating >= min_rating
    table = pd.DataFrame(
        {
            "user_id": users[keep].astype(np.int64),
            "item_id": movies[keep].astype(np.int64),
            "category_id": categories[order[slot[keep]]].astype(np.int64),
            "behavior_type": behavior_categorical(np.full(int(keep.sum()), "pv")),
            "timestamp": times[keep].astype(np.int64),
        },
        columns=list(COLUMNS),
    )
    logger.info(
        "MovieLens: kept %d of %d ratings (>= %s): %d users, %d movies, %d genres",
        len(table),
        len(keep),
        min_rating,
        table["user_id"].nunique(),
        table["item_id"].nunique(),
        len(vocabulary),
    )
    return table


def _movielens_folder(path: str | Path, cache_dir: Path) -> Path:
    text = str(path)
    if text.startswith(URL_SCHEMES):
        return extract_zip(download(text, cache_dir), cache_dir)
    local = Path(text).expanduser()
    if not local.exists():
        raise DataError("no such file or folder", local)
    if local.is_file():
        if not zipfile.is_zipfile(local):
            raise DataError("expected a MovieLens folder or a .zip archive", local)
        return extract_zip(local, cache_dir)
    return local


def _movielens_files(folder: Path) -> tuple[Path, Path, bool]:
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
    for candidate in candidates:
        for ext, dat in ((".csv", False), (".dat", True)):
            ratings, movies = candidate / f"ratings{ext}", candidate / f"movies{ext}"
            if ratings.is_file() and movies.is_file():
                return ratings, movies, dat
    raise DataError(
        "no ratings.csv + movies.csv or ratings.dat + movies.dat here or in a sub-folder", folder
    )


def _read_ratings(path: Path, dat: bool) -> pa.Table:
    if dat:
        # "UserID::MovieID::Rating::Timestamp" read with ":" as delimiter: fields 0, 2, 4, 6.
        spec = _CsvSpec(
            names=tuple(f"f{i}" for i in range(7)),
            types={
                "f0": pa.int64(),
                "f2": pa.int64(),
                "f4": pa.float64(),
                "f6": pa.int64(),
            },
            header=False,
            delimiter=":",
            double=True,
            fields=("UserID", "MovieID", "Rating", "Timestamp"),
        )
        renames = {"f0": "user_id", "f2": "item_id", "f4": "rating", "f6": "timestamp"}
    else:
        spec = _CsvSpec(
            names=("userId", "movieId", "rating", "timestamp"),
            types={
                "userId": pa.int64(),
                "movieId": pa.int64(),
                "rating": pa.float64(),
                "timestamp": pa.int64(),
            },
            header=True,
        )
        renames = {"userId": "user_id", "movieId": "item_id"}
        _check_header(path, spec.names)
    try:
        table = _read_csv(path, spec)
    except _BadCell as bad:
        raise DataError(
            _cell_message(bad.value, bad.target),
            path,
            line=bad.line,
            column=spec.display_name(bad.column),
        ) from None
    table = table.rename_columns([renames.get(name, name) for name in table.column_names])
    finite = pc.is_finite(table.column("rating"))
    if len(finite) and not pc.all(finite).as_py():
        row = pc.index(finite, False).as_py()
        raise DataError(
            f"rating {table.column('rating')[row].as_py()} is not a finite number",
            path,
            line=row + 1 + int(spec.header),
            column=spec.display_name(spec.include[2]),
        )
    for column in ("user_id", "item_id"):
        ids = table.column(column)
        if len(ids) and pc.min(ids).as_py() < 0:
            row = pc.index(pc.less(ids, 0), True).as_py()
            raise DataError(
                "negative id",
                path,
                line=row + 1 + int(spec.header),
                column=spec.display_name(spec.include[0 if column == "user_id" else 1]),
            )
    return table


def _check_header(path: Path, expected: tuple[str, ...]) -> None:
    """Raise DataError (line 1) unless the first line of ``path`` is the expected header."""
    if path.stat().st_size == 0:
        raise DataError("empty file", path, line=1)
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        first = handle.readline().rstrip("\r\n").lstrip("\ufeff")
    got = [name.strip().strip('"') for name in first.split(",")]
    if [name.lower() for name in got] == [name.lower() for name in expected]:
        return
    column = next(
        (e for g, e in zip(got, expected, strict=False) if g.lower() != e.lower()), expected[-1]
    )
    raise DataError(
        f"expected the header {','.join(expected)!r}, got {first[:80]!r}", path, 1, column
    )


def _parse_movie_id(text: str, path: Path, line: int, column: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(
            f"cannot read {_shown(text)} as an integer", path, line=line, column=column
        ) from None
    if not -(2**63) <= value < 2**63:
        message = f"{_shown(text)} does not fit a 64-bit integer"
        raise DataError(message, path, line=line, column=column)
    if value < 0:
        raise DataError("negative id", path, line=line, column=column)
    return value


def _read_movies_csv(path: Path) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    fields = ("movieId", "title", "genres")
    data = path.read_bytes()  # a few MB even for ML-25M
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        bad_line = data[start : end if end >= 0 else len(data)]
        field, raw = _field_at(bad_line, exc.start - start, b",")
        raise DataError(
            _NOT_UTF8.format(byte=data[exc.start], field=_snippet(raw)),
            path,
            line=data.count(b"\n", 0, start) + 1,
            column=fields[min(field, 2)],
        ) from None
    ids: list[int] = []
    genres: list[list[str]] = []
    lines: list[int] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    line = 1
    try:
        header_line = next(reader, None)
        if header_line is None:
            raise DataError("empty file", path, line=1)
        if [name.strip().lower() for name in header_line] != ["movieid", "title", "genres"]:
            raise DataError(
                f"expected the header 'movieId,title,genres', got {','.join(header_line)!r}",
                path,
                line=1,
            )
        start = reader.line_num
        line = start + 1
        for record in reader:
            start = reader.line_num
            if len(record) != 3:
                column = fields[min(len(record), 2)]
                raise DataError(
                    f"expected 3 fields, got {len(record)}", path, line=line, column=column
                )
            ids.append(_parse_movie_id(record[0], path, line, "movieId"))
            genres.append(_split_genres(record[2]))
            lines.append(line)
            line = start + 1
    except csv.Error as exc:
        # The record that failed starts at ``line``; find its oversized field, if that is it.
        record = itertools.islice(io.StringIO(text, newline=""), line - 1, line + 63)
        field = _oversized_field("".join(record), csv.field_size_limit())
        column = None if field is None else fields[min(field, 2)]
        raise DataError(f"cannot parse the line as CSV: {exc}", path, line, column) from None
    return np.asarray(ids, dtype=np.int64), genres, np.asarray(lines, dtype=np.int64)


def _oversized_field(text: str, limit: int) -> int | None:
    """0-based index of the first field longer than ``limit`` characters in the CSV record at
    the start of ``text`` (comma-separated, double quotes honoured), or None."""
    index, length, quoted = 0, 0, False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            index, length = index + 1, 0
        elif char in "\r\n" and not quoted:
            return None
        else:
            length += 1
            if length > limit:
                return index
    return None


def _read_movies_dat(path: Path) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    ids: list[int] = []
    genres: list[list[str]] = []
    lines: list[int] = []
    with open(path, encoding="latin-1", newline="") as handle:
        for line, text in enumerate(handle, start=1):
            text = text.rstrip("\r\n")
            fields = text.split("::")
            if len(fields) < 3:
                column = ("MovieID", "Title", "Genres")[min(len(fields), 2)]
                raise DataError(
                    f"expected 3 fields separated by '::', got {len(fields)}",
                    path,
                    line=line,
                    column=column,
                )
            ids.append(_parse_movie_id(fields[0], path, line, "MovieID"))
            genres.append(_split_genres(fields[-1]))
            lines.append(line)
    return np.asarray(ids, dtype=np.int64), genres, np.asarray(lines, dtype=np.int64)


def _split_genres(text: str) -> list[str]:
    names = [name.strip() for name in text.split("|") if name.strip()]
    return names or [NO_GENRE]


def _genre_categories(genres: list[list[str]], rule: str) -> tuple[np.ndarray, list[str]]:
    """Category id of each movie under ``rule`` and the sorted genre vocabulary."""
    vocabulary = sorted({name for names in genres for name in names})
    index = {name: i for i, name in enumerate(vocabulary)}
    if rule == "first":
        chosen = [index[names[0]] for names in genres]
    else:
        counts = np.zeros(len(vocabulary), dtype=np.int64)
        for names in genres:
            for name in set(names):
                counts[index[name]] += 1
        # min by (count, sorted position): ids are in sorted name order already.
        chosen = [min((counts[index[n]], index[n]) for n in names)[1] for names in genres]
    return np.asarray(chosen, dtype=np.int64), vocabulary


# ---------------------------------------------------------------------------------------------
# Taobao UserBehavior


def load_userbehavior(path: str | Path) -> pd.DataFrame:
    """Load Taobao ``UserBehavior.csv`` (no header; user, item, category, behaviour, timestamp).

    Read by pyarrow with explicit types: ids as int32 (int64 if any id does not fit),
    ``timestamp`` int64, ``behavior_type`` dictionary-encoded and returned as a Categorical; no
    Python object is built per row. About 100M rows take roughly 2 GB of memory.

    Args:
        path: the csv file.

    Returns:
        The canonical behaviour table in file order (int32 ids).

    Raises:
        DataError: a missing or empty file, or a bad row (unparsable number, an integer beyond
            int64, wrong number of fields, a blank line, negative id, unknown behaviour type, a
            byte that is not UTF-8, a line over :data:`BLOCK_SIZE` bytes), naming the file, line
            and column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError("no such file", path)
    id_type = pa.int32()
    while True:
        spec = _CsvSpec(
            names=COLUMNS,
            types={
                "user_id": id_type,
                "item_id": id_type,
                "category_id": id_type,
                "behavior_type": pa.dictionary(pa.int32(), pa.string()),
                "timestamp": pa.int64(),
            },
            header=False,
        )
        try:
            table = _read_csv(path, spec)
            break
        except _BadCell as bad:
            if id_type == pa.int32() and _fits_int64(bad.value):
                logger.info("%s: ids beyond int32 (line %d); reading int64", path, bad.line)
                id_type = pa.int64()
                continue
            raise DataError(
                _cell_message(bad.value, bad.target), path, line=bad.line, column=bad.column
            ) from None
    for column in ("user_id", "item_id", "category_id"):
        ids = table.column(column)
        if len(ids) and pc.min(ids).as_py() < 0:
            row = pc.index(pc.less(ids, 0), True).as_py()
            raise DataError(f"negative id {ids[row].as_py()}", path, line=row + 1, column=column)
    types = table.column("behavior_type")
    known = pc.is_in(types, value_set=pa.array(BEHAVIOR_TYPES))
    if len(types) and not pc.all(known).as_py():
        row = pc.index(known, False).as_py()
        raise DataError(
            f"unknown behaviour type {_shown(types[row].as_py())} "
            f"(known: {', '.join(BEHAVIOR_TYPES)})",
            path,
            line=row + 1,
            column="behavior_type",
        )
    frame = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    frame["behavior_type"] = frame["behavior_type"].astype("category")
    frame["behavior_type"] = frame["behavior_type"].cat.set_categories(list(BEHAVIOR_TYPES))
    logger.info("UserBehavior: %d rows from %s", len(frame), path)
    return frame


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _fits_int64(text: str) -> bool:
    """``text`` is a decimal integer (ASCII digits only, as pyarrow reads) that fits int64."""
    return bool(_INTEGER.fullmatch(text)) and -(2**63) <= int(text) < 2**63


# ---------------------------------------------------------------------------------------------
# Dispatch


def load_dataset(
    cfg: DataConfig, synthetic_cfg: SyntheticConfig, cache_dir: str | Path | None = None
) -> pd.DataFrame:
    """Load the behaviour table named by ``cfg.source``.

    Args:
        cfg: the ``data`` section: ``source`` is ``synthetic`` (generated from
            ``synthetic_cfg``), ``movielens`` (``path`` as in :func:`load_movielens`; uses
            ``min_rating`` and ``category_rule``) or ``userbehavior`` (``path`` is the csv file or a
            folder containing ``UserBehavior.csv``).
        synthetic_cfg: the ``synthetic`` section.
        cache_dir: download/extraction cache for MovieLens archives.

    Returns:
        The canonical behaviour table.

    Raises:
        DataError: unknown source, a missing path (named), or bad data.
    """
    if cfg.source == "synthetic":
        from tdm.data.synthetic import generate

        return generate(synthetic_cfg)
    if cfg.source not in ("movielens", "userbehavior"):
        raise DataError(f"unknown data source {cfg.source!r}")
    if not cfg.path:
        raise DataError(f"data.path must be set for source {cfg.source!r}")
    if cfg.source == "movielens":
        return load_movielens(cfg.path, cfg.min_rating, cfg.category_rule, cache_dir=cache_dir)
    path = userbehavior_file(cfg.path)
    if not path.is_file():
        raise DataError("no such file", path)
    return load_userbehavior(path)


def userbehavior_file(path: str | Path) -> Path:
    """The UserBehavior csv that ``data.path`` names: the file, or ``UserBehavior.csv`` in the
    folder."""
    path = Path(path).expanduser()
    return path / "UserBehavior.csv" if path.is_dir() else path
