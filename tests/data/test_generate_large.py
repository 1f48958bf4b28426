"""Chunked generation (tdm.data.synthetic.generate_chunks / write_synthetic_csv): the same log in
bounded memory, at small sizes."""

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from tdm.config import SyntheticConfig
from tdm.data.loaders import load_userbehavior
from tdm.data.schema import check_table
from tdm.data.synthetic import (
    generate,
    generate_chunks,
    users_per_chunk,
    write_synthetic_csv,
    write_userbehavior_csv,
)

# 5 chunks of 100 users (~2,000 behaviours each)
CHUNKED = SyntheticConfig(
    n_users=480,
    n_items=3000,
    n_categories=40,
    n_departments=5,
    behaviors_per_user=20,
    chunk_rows=2000,
)


@pytest.fixture(scope="module")
def chunks() -> list[pd.DataFrame]:
    return list(generate_chunks(CHUNKED))


def test_chunks_are_deterministic_per_seed(chunks):
    assert users_per_chunk(CHUNKED) == 100
    assert [c["user_id"].nunique() for c in chunks] == [100, 100, 100, 100, 80]
    for again, chunk in zip(generate_chunks(CHUNKED), chunks, strict=True):
        pd.testing.assert_frame_equal(again, chunk)
    other = list(generate_chunks(SyntheticConfig(**{**CHUNKED.__dict__, "seed": 1})))
    for chunk, other_chunk in zip(chunks, other, strict=True):
        assert not np.array_equal(chunk["item_id"].head(200), other_chunk["item_id"].head(200))


def test_chunks_share_one_corpus_and_keep_users_apart(chunks):
    whole = pd.concat(chunks, ignore_index=True)
    check_table(whole, "synthetic")
    # every user lives in one chunk; ids increase across chunks, so the log is (user, time) sorted
    per_chunk = [set(c["user_id"]) for c in chunks]
    assert sum(map(len, per_chunk)) == whole["user_id"].nunique() == CHUNKED.n_users
    assert whole["user_id"].is_monotonic_increasing
    assert (whole.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()
    # one corpus: an item keeps its category in every chunk, and chunks share items
    assert whole.groupby("item_id")["category_id"].nunique().max() == 1
    assert whole["item_id"].nunique() <= CHUNKED.n_items
    assert whole["category_id"].nunique() == CHUNKED.n_categories
    assert len(set(chunks[0]["item_id"]) & set(chunks[-1]["item_id"])) > 100
    # ... and the same popularity: the most popular items of the first and last chunk overlap
    top = [set(c["item_id"].value_counts().index[:20]) for c in (chunks[0], chunks[-1])]
    assert len(top[0] & top[1]) >= 5


def test_file_is_the_chunks_in_order_and_counts_its_rows(tmp_path, chunks):
    path = tmp_path / "UserBehavior.csv"
    seen = []
    rows = write_synthetic_csv(CHUNKED, path, progress=seen.append)
    whole = pd.concat(chunks, ignore_index=True)
    assert rows == len(whole) == len(path.read_bytes().splitlines())
    assert seen == list(np.cumsum([len(c) for c in chunks]))
    pd.testing.assert_frame_equal(load_userbehavior(path), whole, check_dtype=False)
    pd.testing.assert_frame_equal(generate(CHUNKED), whole)
    assert [p.name for p in tmp_path.iterdir()] == ["UserBehavior.csv"]  # no temporary left


def test_max_rows_cuts_the_file_and_stops_generating(tmp_path, chunks):
    path = tmp_path / "UserBehavior.csv"
    seen = []
    rows = write_synthetic_csv(CHUNKED, path, max_rows=len(chunks[0]) + 7, progress=seen.append)
    assert rows == len(chunks[0]) + 7 == len(path.read_bytes().splitlines())
    assert seen == [len(chunks[0]), rows]  # the chunks after the cut are never generated
    expected = pd.concat(chunks[:2], ignore_index=True).iloc[:rows]
    pd.testing.assert_frame_equal(load_userbehavior(path), expected, check_dtype=False)


def test_one_chunk_is_the_in_memory_log(tmp_path):
    cfg = SyntheticConfig(n_users=300, n_items=500, n_categories=12, n_departments=3)
    assert cfg.n_users <= users_per_chunk(cfg)
    (only,) = generate_chunks(cfg)
    pd.testing.assert_frame_equal(only, generate(cfg))
    write_synthetic_csv(cfg, tmp_path / "chunked.csv")
    write_userbehavior_csv(generate(cfg), tmp_path / "in_memory.csv")
    assert (tmp_path / "chunked.csv").read_bytes() == (tmp_path / "in_memory.csv").read_bytes()


def test_chunk_size_past_one_chunk_changes_the_data_but_not_its_shape():
    small_chunks = SyntheticConfig(**{**CHUNKED.__dict__, "chunk_rows": 4000})
    a, b = generate(CHUNKED), generate(small_chunks)
    assert a["user_id"].nunique() == b["user_id"].nunique() == CHUNKED.n_users
    assert not a["item_id"].head(200).equals(b["item_id"].head(200))


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writing_memory_does_not_grow_with_the_rows(tmp_path):
    """Ten times the users (40 chunks instead of 4) leave the file writer's peak (numpy and
    pandas allocations) where it was, while the in-memory log grows with them."""
    base = {"n_items": 2000, "n_categories": 40, "n_departments": 5, "behaviors_per_user": 50}
    few = SyntheticConfig(n_users=400, chunk_rows=5000, **base)
    many = SyntheticConfig(n_users=4000, chunk_rows=5000, **base)
    path = tmp_path / "UserBehavior.csv"
    peak_few = _traced_peak(lambda: write_synthetic_csv(few, path))
    rows_few = len(path.read_bytes().splitlines())
    peak_many = _traced_peak(lambda: write_synthetic_csv(many, path))
    assert len(path.read_bytes().splitlines()) > 9 * rows_few
    assert peak_many < 1.5 * peak_few
    assert _traced_peak(lambda: generate(many)) > 5 * peak_many  # the check can see growth
