import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tdm.config import DataConfig, SyntheticConfig
from tdm.data.loaders import download, load_dataset, load_movielens, load_userbehavior
from tdm.data.schema import BEHAVIOR_TYPES, COLUMNS, DataError, check_table

MOVIES_CSV = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Comedy|Adventure|Animation|Children|Fantasy\n"
    '2,"Shawshank Redemption, The (1994)",Drama|Crime\n'
    "3,Heat (1995),Crime|Thriller|Action\n"
    "4,Some Film (2015),(no genres listed)\n"
    "5,Comedy Drama (1999),Comedy|Drama\n"
)
RATINGS_CSV = (
    "userId,movieId,rating,timestamp\n"
    "1,1,4.0,964982703\n"
    "1,2,3.5,964981247\n"
    "1,3,5.0,964982224\n"
    "2,4,4.5,964983815\n"
    "2,5,1.0,964982931\n"
    "2,2,4.0,964982400\n"
)
# Genre vocabulary, sorted: (no genres listed)=0 Action=1 Adventure=2 Animation=3 Children=4
# Comedy=5 Crime=6 Drama=7 Fantasy=8 Thriller=9. Movies per genre: Comedy 2, Crime 2, Drama 2,
# the others 1. "first" takes the genre listed first; "rarest" the genre with the fewest movies,
# ties to the name sorted first: movie 1: Comedy (2) loses to four genres of 1 -> Adventure;
# 2: Drama 2 = Crime 2 -> Crime; 3: Thriller 1 = Action 1, both rarer than Crime -> Action (not
# Thriller, listed earlier); 5: Comedy 2 = Drama 2 -> Comedy, as "first".
FIRST = {1: 5, 2: 7, 3: 6, 4: 0, 5: 5}
RAREST = {1: 2, 2: 6, 3: 1, 4: 0, 5: 5}


def write_csv_set(folder: Path, ratings: str = RATINGS_CSV, movies: str = MOVIES_CSV) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(ratings)
    (folder / "movies.csv").write_text(movies)
    return folder


def write_dat_set(folder: Path, ratings: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    movies = (
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Léon: The Professional (1994)::Crime|Drama|Thriller\n"
        "3::Heat (1995)::Action|Crime|Thriller\n"
    )
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    ratings = ratings or (
        "1::1::5::978300760\n1::2::3::978302109\n2::2::4::978301968\n2::3::4::978300275\n"
    )
    (folder / "ratings.dat").write_text(ratings)
    return folder


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------- MovieLens csv
def test_movielens_csv_keeps_ratings_from_min_rating_as_pv(tmp_path):
    df = load_movielens(write_csv_set(tmp_path / "ml"))
    assert list(df.columns) == list(COLUMNS)
    check_table(df, "ml")
    assert df[["user_id", "item_id"]].values.tolist() == [[1, 1], [1, 3], [2, 4], [2, 2]]
    assert df["timestamp"].tolist() == [964982703, 964982224, 964983815, 964982400]
    assert set(df["behavior_type"]) == {"pv"}
    assert all(df[c].dtype == np.int64 for c in ("user_id", "item_id", "category_id"))
    lenient = load_movielens(tmp_path / "ml", min_rating=3.5)
    assert len(lenient) == 5


@pytest.mark.parametrize("rule,expected", [("first", FIRST), ("rarest", RAREST)])
def test_movielens_genre_rules(tmp_path, rule, expected):
    assert {m for m in FIRST if FIRST[m] != RAREST[m]} == {1, 2, 3}  # the rules disagree here
    ratings = "userId,movieId,rating,timestamp\n" + "".join(
        f"1,{m},5.0,{100 + m}\n" for m in expected
    )
    df = load_movielens(write_csv_set(tmp_path / "ml", ratings=ratings), category_rule=rule)
    assert dict(zip(df["item_id"], df["category_id"], strict=True)) == expected


def test_movielens_rarest_prefers_least_frequent_genre(tmp_path):
    movies = "movieId,title,genres\n1,A,Drama|Noir\n2,B,Drama\n3,C,Drama|Action\n4,D,Action\n"
    ratings = "userId,movieId,rating,timestamp\n1,1,5,1\n1,3,5,2\n"
    folder = write_csv_set(tmp_path / "ml", ratings=ratings, movies=movies)
    # vocabulary: Action=0 Drama=1 Noir=2; counts: Drama 3, Action 2, Noir 1
    rarest = load_movielens(folder, category_rule="rarest")
    first = load_movielens(folder, category_rule="first")
    assert rarest["category_id"].tolist() == [2, 0]
    assert first["category_id"].tolist() == [1, 1]


def test_movielens_dat_latin1(tmp_path):
    df = load_movielens(write_dat_set(tmp_path / "ml1m"))
    assert df[["user_id", "item_id"]].values.tolist() == [[1, 1], [2, 2], [2, 3]]
    # Action=0 Animation=1 Children's=2 Comedy=3 Crime=4 Drama=5 Thriller=6
    assert df["category_id"].tolist() == [1, 4, 0]
    assert df["timestamp"].tolist() == [978300760, 978301968, 978300275]


def test_movielens_finds_files_in_a_subfolder_and_a_local_zip(tmp_path):
    write_csv_set(tmp_path / "outer" / "ml-latest-small")
    assert len(load_movielens(tmp_path / "outer")) == 4
    archive = make_zip(tmp_path / "ml.zip", tmp_path / "outer")
    assert len(load_movielens(archive, cache_dir=tmp_path / "cache")) == 4


@pytest.mark.parametrize(
    "bad_line,line,column,fragment",
    [
        ("1,abc,4.0,964982703", 3, "movieId", "'abc'"),
        ("1,2,4.0", 3, "timestamp", "expected 4 fields"),
        ("1,2,4.0,96498,7", 3, "timestamp", "got 5"),
        ("1,2,,964982703", 3, "rating", "''"),
        ("1,99,4.0,964982703", 3, "movieId", "movie 99"),
    ],
)
def test_movielens_csv_bad_row_names_file_line_column(tmp_path, bad_line, line, column, fragment):
    ratings = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n" + bad_line + "\n1,3,4,5\n"
    message = error_of(load_movielens, write_csv_set(tmp_path / "ml", ratings=ratings))
    assert "ratings.csv" in message
    assert f"line {line}," in message
    assert f"column {column!r}" in message
    assert fragment in message


def test_movielens_movies_bad_row(tmp_path):
    movies = MOVIES_CSV + "x6,Bad (2000),Drama\n"
    message = error_of(load_movielens, write_csv_set(tmp_path / "ml", movies=movies))
    assert "movies.csv" in message and "line 7," in message and "'movieId'" in message


@pytest.mark.parametrize(
    "bad_line,column,fragment",
    [
        ("2::3::x::978300275", "Rating", "'x'"),
        ("2::3::4", "Timestamp", "expected 4 fields separated by '::', got 3"),
        ("2::3::4::5::6", "Timestamp", "got 5"),
    ],
)
def test_movielens_dat_bad_row_names_file_line_column(tmp_path, bad_line, column, fragment):
    ratings = "1::1::5::978300760\n1::2::3::978302109\n" + bad_line + "\n2::2::4::978301968\n"
    message = error_of(load_movielens, write_dat_set(tmp_path / "ml", ratings=ratings))
    assert "ratings.dat" in message and "line 3," in message
    assert f"column {column!r}" in message and fragment in message


def test_movielens_missing_folder(tmp_path):
    assert str(tmp_path / "nope") in error_of(load_movielens, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "ratings.csv" in error_of(load_movielens, tmp_path / "empty")


# ------------------------------------------------------------------------------- download
def make_zip(path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder))
    return path


def test_download_file_url_zip_and_load(tmp_path):
    write_csv_set(tmp_path / "src" / "ml-tiny")
    archive = make_zip(tmp_path / "ml-tiny.zip", tmp_path / "src")
    cache = tmp_path / "cache"
    got = download(archive.as_uri(), cache)
    assert got == cache / "ml-tiny.zip" and zipfile.is_zipfile(got)
    assert [p.name for p in cache.iterdir()] == ["ml-tiny.zip"]  # no temp file left
    df = load_movielens(archive.as_uri(), cache_dir=cache)
    assert len(df) == 4
    again = load_movielens(archive.as_uri(), cache_dir=cache)  # cached archive and extraction
    pd.testing.assert_frame_equal(df, again)


def test_download_rejects_non_zip_and_leaves_nothing(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    cache = tmp_path / "cache"
    message = error_of(download, fake.as_uri(), cache)
    assert "fake.zip" in message and "zip" in message
    assert list(cache.iterdir()) == []


def test_download_missing_url_names_it(tmp_path):
    url = (tmp_path / "missing.zip").as_uri()
    assert url in error_of(download, url, tmp_path / "cache")


# ------------------------------------------------------------------------------- UserBehavior
UB_ROWS = "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,pv,1511561733\n2,2576651,149192,buy,1511572885\n3,3830808,4181361,cart,1511593493\n3,4365585,2520377,fav,1511596146\n"  # noqa: E501


def test_userbehavior_reads_exact_format(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text(UB_ROWS)
    df = load_userbehavior(path)
    assert list(df.columns) == list(COLUMNS)
    check_table(df, path)
    assert df["user_id"].dtype == np.int32 and df["timestamp"].dtype == np.int64
    assert list(df["behavior_type"].cat.categories) == list(BEHAVIOR_TYPES)
    assert df["behavior_type"].tolist() == ["pv", "pv", "buy", "cart", "fav"]
    assert df.iloc[2].tolist() == [2, 2576651, 149192, "buy", 1511572885]


def test_userbehavior_wide_ids_fall_back_to_int64(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text(UB_ROWS + "4,9999999999,1,pv,1511596146\n")
    df = load_userbehavior(path)
    assert df["item_id"].iloc[-1] == 9999999999


@pytest.mark.parametrize(
    "bad,column,fragment",
    [
        ("3,x,4181361,cart,1511593493", "item_id", "'x'"),
        ("3,1,4181361,click,1511593493", "behavior_type", "'click'"),
        ("3,1,4181361,pv", "timestamp", "expected 5 fields"),
        ("3,1,-5,pv,1511593493", "category_id", "negative"),
        ("3,1,5,pv,15115.5", "timestamp", "'15115.5'"),
    ],
)
def test_userbehavior_bad_row_names_file_line_column(tmp_path, bad, column, fragment):
    path = tmp_path / "UserBehavior.csv"
    path.write_text(UB_ROWS + bad + "\n" + UB_ROWS)
    message = error_of(load_userbehavior, path)
    assert str(path) in message and "line 6," in message
    assert f"column {column!r}" in message and fragment in message


def test_userbehavior_error_line_deep_in_a_large_file(tmp_path):
    # Several pyarrow blocks (1 MiB each): line numbers must count across blocks, and the
    # first offender wins whether it is a conversion or a field-count error.
    good = "1,2268318,2520377,pv,1511544070\n" * 100_000
    path = tmp_path / "ub.csv"
    path.write_text(good + "1,2,3,pv\n" + good + "1,zz,3,pv,4\n" + good)
    message = error_of(load_userbehavior, path)
    assert "line 100001," in message and "column 'timestamp'" in message
    path.write_text(good + "1,zz,3,pv,4\n" + good + "1,2,3,pv\n")
    message = error_of(load_userbehavior, path)
    assert "line 100001," in message and "column 'item_id'" in message
    path.write_text(good + good + "1,2,3,pv,4\n1,2,3,xx,4\n")
    assert "line 200002," in error_of(load_userbehavior, path)


# ------------------------------------------------------------------------------- dispatch
def test_load_dataset_dispatch(tmp_path):
    small = SyntheticConfig(n_users=50, n_items=80, n_categories=8, n_departments=2)
    generated = load_dataset(DataConfig(source="synthetic"), small)
    assert len(generated) > 0
    (tmp_path / "UserBehavior.csv").write_text(UB_ROWS)
    via_folder = load_dataset(DataConfig(source="userbehavior", path=str(tmp_path)), small)
    assert len(via_folder) == 5
    write_csv_set(tmp_path / "ml")
    ml = load_dataset(DataConfig(source="movielens", path=str(tmp_path / "ml")), small)
    assert len(ml) == 4


def test_load_dataset_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "UserBehavior.csv"
    cfg = DataConfig(source="userbehavior", path=str(missing))
    assert str(missing) in error_of(load_dataset, cfg, SyntheticConfig())
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(source="movielens", path=None), SyntheticConfig())


# ------------------------------------------------------------------------------- check_table
def good_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 1, 2],
            "item_id": [5, 6, 7],
            "category_id": [0, 0, 1],
            "behavior_type": ["pv", "buy", "pv"],
            "timestamp": [10, 20, 30],
        }
    )


def test_check_table_names_first_offender():
    check_table(good_table(), "t")
    bad = good_table()
    bad.loc[2, "item_id"] = -3
    assert error_of(check_table, bad, "t.csv") == "t.csv, row 3, column 'item_id': negative id -3"
    bad = good_table()
    bad.loc[1, "behavior_type"] = "click"
    message = error_of(check_table, bad, "t.csv", lines=np.array([4, 5, 6]))
    assert message.startswith("t.csv, line 5, column 'behavior_type': unknown behaviour type")
    assert "'timestamp'" in error_of(check_table, good_table().drop(columns="timestamp"), "t")
    bad = good_table().astype({"user_id": "float64"})
    bad.loc[0, "user_id"] = np.nan
    assert "row 1, column 'user_id': missing value" in error_of(check_table, bad, "t")


def test_movielens_csv_without_header_is_refused(tmp_path):
    ratings = RATINGS_CSV.split("\n", 1)[1]  # data rows only
    message = error_of(load_movielens, write_csv_set(tmp_path / "ml", ratings=ratings))
    assert "ratings.csv, line 1, column 'userId'" in message and "header" in message


# ------------------------------------------------------------------------------- edge cases
# Each must be one DataError naming the file, line and column, never a pyarrow, csv or
# UnicodeDecodeError traceback.
UB_LINE = UB_ROWS.splitlines()[0] + "\n"


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data", [b"", b"\n", b"\r\n\n  \n"])
def test_userbehavior_empty_file(tmp_path, data):
    path = write_bytes(tmp_path / "UserBehavior.csv", data)
    message = error_of(load_userbehavior, path)
    assert message == f"{path}: empty file" + (" (only blank lines)" if data else "")


def test_userbehavior_blank_line_is_named(tmp_path):
    path = write_bytes(tmp_path / "ub.csv", (UB_ROWS + "\n" + UB_ROWS).encode())
    assert error_of(load_userbehavior, path) == f"{path}, line 6: blank line (no values)"


@pytest.mark.parametrize(
    "bad,column,shown",
    [
        (b"3,1,5,p\xffv,1511593493", "behavior_type", "'p\\xffv'"),
        (b"3,1\xfe,5,pv,1511593493", "item_id", "'1\\xfe'"),
        (b'3,1,5,"p,\xff",1511593493', "behavior_type", "'\"p,\\xff\"'"),  # quoted comma
    ],
)
def test_userbehavior_non_utf8_byte(tmp_path, bad, column, shown):
    path = write_bytes(tmp_path / "ub.csv", UB_ROWS.encode() + bad + b"\n" + UB_ROWS.encode())
    message = error_of(load_userbehavior, path)
    assert message.startswith(f"{path}, line 6, column {column!r}: byte 0x")
    assert "is not UTF-8" in message and message.endswith(shown)


def test_userbehavior_first_offender_wins_over_a_later_bad_byte(tmp_path):
    path = tmp_path / "ub.csv"
    write_bytes(path, (UB_ROWS + "1,x,3,pv,4\n").encode() + b"1,2,3,p\xffv,5\n")
    assert "line 6, column 'item_id': cannot read 'x'" in error_of(load_userbehavior, path)
    write_bytes(path, UB_ROWS.encode() + b"1,2,3,p\xffv,5\n1,x,3,pv,4\n")
    assert "line 6, column 'behavior_type': byte 0xff" in error_of(load_userbehavior, path)


def test_userbehavior_line_over_1mb(tmp_path):
    long = "1,2,3,pv," + "9" * (2 << 20) + "\n"
    path = write_bytes(tmp_path / "ub.csv", (UB_ROWS * 3 + long + UB_ROWS).encode())
    message = error_of(load_userbehavior, path)
    assert message.startswith(f"{path}, line 16, column 'timestamp': line longer than 1048576")
    assert len(message) < 300
    long = "1,2,3," + "p" * (2 << 20) + ",5\n"
    write_bytes(path, (UB_ROWS + long).encode())
    assert "line 6, column 'behavior_type': line longer" in error_of(load_userbehavior, path)
    # just over 1 MiB: pyarrow may read it (it depends on where the line falls); then the
    # value itself is refused, and the message shows only its start
    long = "1,2,3," + "p" * (1 << 20) + ",5\n"
    write_bytes(path, (UB_ROWS + long).encode())
    message = error_of(load_userbehavior, path)
    assert "line 6, column 'behavior_type'" in message and len(message) < 300


def test_userbehavior_byte_scan_across_chunks(tmp_path, monkeypatch):
    # Small scan chunks: lines and offsets must carry over from chunk to chunk, and a line
    # longer than a chunk (carried over unfinished) must still be measured.
    from tdm.data import loaders

    monkeypatch.setattr(loaders, "_SCAN_CHUNK", 100)
    path = tmp_path / "ub.csv"
    write_bytes(path, (UB_ROWS * 40).encode() + b"1,2,3,p\xffv,5\n" + UB_ROWS.encode())
    assert "line 201, column 'behavior_type': byte 0xff" in error_of(load_userbehavior, path)
    write_bytes(path, (UB_ROWS * 40 + "1,2,3,pv," + "9" * (1 << 21) + "\n").encode())
    assert "line 201, column 'timestamp': line longer" in error_of(load_userbehavior, path)


@pytest.mark.parametrize(
    "bad,column",
    [
        ("3,99999999999999999999,5,pv,1511593493", "item_id"),
        ("3,1,-9223372036854775809,pv,1511593493", "category_id"),
        ("3,1,5,pv,99999999999999999999", "timestamp"),
    ],
)
def test_userbehavior_values_beyond_int64(tmp_path, bad, column):
    path = write_bytes(tmp_path / "ub.csv", (UB_ROWS + bad + "\n").encode())
    message = error_of(load_userbehavior, path)
    value = bad.split(",")[("user_id", "item_id", "category_id", "pv", "timestamp").index(column)]
    assert message == f"{path}, line 6, column {column!r}: {value!r} does not fit a 64-bit integer"


def test_movielens_ratings_non_utf8_and_long_line(tmp_path):
    folder = tmp_path / "ml"
    write_csv_set(folder)
    ratings = folder / "ratings.csv"
    write_bytes(ratings, RATINGS_CSV.encode() + b"1,2,4\xff.0,964982400\n")
    message = error_of(load_movielens, folder)
    assert message.startswith(f"{ratings}, line 8, column 'rating': byte 0xff is not UTF-8")
    write_bytes(ratings, (RATINGS_CSV + "1,2,4.0," + "9" * (2 << 20) + "\n").encode())
    message = error_of(load_movielens, folder)
    assert message.startswith(f"{ratings}, line 8, column 'timestamp': line longer than")
    write_bytes(ratings, b"")
    assert error_of(load_movielens, folder) == f"{ratings}, line 1: empty file"


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_movielens_non_finite_rating(tmp_path, value):
    ratings = RATINGS_CSV + f"2,3,{value},964982400\n"
    message = error_of(load_movielens, write_csv_set(tmp_path / "ml", ratings=ratings))
    assert "ratings.csv, line 8, column 'rating': rating" in message
    assert message.endswith("is not a finite number")


def test_movielens_dat_non_finite_rating(tmp_path):
    ratings = "1::1::5::978300760\n1::2::nan::978302109\n"
    message = error_of(load_movielens, write_dat_set(tmp_path / "ml", ratings=ratings))
    assert "ratings.dat, line 2, column 'Rating': rating nan is not a finite number" in message


@pytest.mark.parametrize(
    "bad,column",
    [("99999999999999999999,1,4.0,964982400", "userId"), ("2,1,4.0,1e30", "timestamp")],
)
def test_movielens_ratings_beyond_int64(tmp_path, bad, column):
    message = error_of(load_movielens, write_csv_set(tmp_path / "ml", ratings=RATINGS_CSV + bad))
    assert f"ratings.csv, line 8, column {column!r}:" in message


def test_movielens_ratings_id_beyond_int64_says_so(tmp_path):
    ratings = RATINGS_CSV + "2,1,4.0,99999999999999999999\n"
    message = error_of(load_movielens, write_csv_set(tmp_path / "ml", ratings=ratings))
    assert message.endswith(
        "column 'timestamp': '99999999999999999999' does not fit a 64-bit integer"
    )


def test_movielens_movies_non_utf8_long_field_and_huge_id(tmp_path):
    folder = write_csv_set(tmp_path / "ml")
    movies = folder / "movies.csv"
    write_bytes(movies, MOVIES_CSV.encode() + b"6,Caf\xe9 (1999),Drama\n")
    message = error_of(load_movielens, folder)
    assert message == (
        f"{movies}, line 7, column 'title': byte 0xe9 is not UTF-8 (the file must be UTF-8 "
        "encoded): 'Caf\\xe9 (1999)'"
    )
    write_bytes(movies, (MOVIES_CSV + '6,"' + "x" * 200_000 + '",Drama\n').encode())
    message = error_of(load_movielens, folder)
    assert message.startswith(f"{movies}, line 7, column 'title': cannot parse the line as CSV")
    assert "field larger than field limit" in message
    write_bytes(movies, (MOVIES_CSV + "6,A,Drama|" + "y" * 200_000 + "\n").encode())
    assert "line 7, column 'genres': cannot parse" in error_of(load_movielens, folder)
    write_bytes(movies, (MOVIES_CSV + "99999999999999999999,Big (2000),Drama\n").encode())
    assert error_of(load_movielens, folder) == (
        f"{movies}, line 7, column 'movieId': '99999999999999999999' does not fit a 64-bit integer"
    )
