import re

import numpy as np
import pandas as pd
import pytest

from tdm.config import SyntheticConfig
from tdm.data.loaders import load_userbehavior
from tdm.data.schema import COLUMNS, check_table
from tdm.data.synthetic import generate, write_userbehavior_csv

SMALL = SyntheticConfig(n_users=1500, n_items=2000, n_categories=48, n_departments=6)


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return generate(SMALL)


def test_deterministic_per_seed(small):
    pd.testing.assert_frame_equal(small, generate(SMALL))
    other = generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not other["item_id"].head(200).equals(small["item_id"].head(200))


def test_canonical_schema_and_ranges(small):
    assert list(small.columns) == list(COLUMNS)
    check_table(small, "synthetic")
    cfg = SMALL
    assert small["user_id"].nunique() == cfg.n_users
    assert small["item_id"].nunique() <= cfg.n_items
    assert small["category_id"].nunique() == cfg.n_categories
    ts = small["timestamp"].to_numpy()
    assert ts.min() >= cfg.start_timestamp and ts.max() < cfg.start_timestamp + cfg.days * 86400
    per_user = small.groupby("user_id").size()
    assert abs(per_user.mean() - cfg.behaviors_per_user) < 0.1 * cfg.behaviors_per_user
    assert per_user.std() > 5  # the counts vary
    shares = small["behavior_type"].value_counts(normalize=True)
    assert shares["pv"] > 0.8 and min(shares[t] for t in ("buy", "cart", "fav")) > 0.01
    # each item has exactly one category
    assert small.groupby("item_id")["category_id"].nunique().max() == 1
    # sorted by (user, time)
    assert small["user_id"].is_monotonic_increasing
    assert (small.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()


def test_sessions_cluster_in_time(small):
    gaps = small.groupby("user_id")["timestamp"].diff().dropna().to_numpy()
    # most consecutive behaviours are minutes apart, some are hours or days apart
    assert np.mean(gaps < 600) > 0.6 and np.mean(gaps > 3 * 3600) > 0.05


def test_structure_is_learnable_and_recency_matters(small):
    """Latter-half categories repeat first-half ones far above chance, recent ones most."""
    share = small["category_id"].value_counts(normalize=True)
    in_first = in_recent = in_oldest = chance = total = 0
    for _, cats in small.groupby("user_id")["category_id"]:
        c = cats.to_numpy()
        half = len(c) // 2
        if half < 8:
            continue
        later = c[half:]
        first_cats = np.unique(c[:half])
        in_first += np.isin(later, first_cats).sum()
        in_recent += np.isin(later, c[half - 5 : half]).sum()
        in_oldest += np.isin(later, c[:5]).sum()
        chance += share[first_cats].sum() * len(later)
        total += len(later)
    assert in_first / total > 5 * chance / total
    assert in_recent / total > in_oldest / total + 0.05


def test_users_revisit_popular_items_within_category(small):
    counts = small.groupby(["category_id", "item_id"]).size().sort_values(ascending=False)
    top = counts.groupby(level=0).head(1).sum() / counts.sum()
    assert top > 3 * small["category_id"].nunique() / small["item_id"].nunique()


def test_default_config_size():
    cfg = SyntheticConfig()
    frame = generate(cfg)
    per_user = frame.groupby("user_id").size()
    assert len(per_user) == cfg.n_users
    assert abs(per_user.mean() - cfg.behaviors_per_user) < 0.2 * cfg.behaviors_per_user


def test_userbehavior_csv_round_trip(tmp_path, small):
    path = tmp_path / "out" / "UserBehavior.csv"
    write_userbehavior_csv(small, path)
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(r"\d+,\d+,\d+,(pv|buy|cart|fav),\d+", first)
    back = load_userbehavior(path)
    pd.testing.assert_frame_equal(back, small, check_dtype=False)
    assert [p.name for p in path.parent.iterdir()] == ["UserBehavior.csv"]
