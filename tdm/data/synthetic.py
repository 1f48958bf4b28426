"""A seeded synthetic behaviour log with structure a model can learn and a tree can exploit.

The generative story (all of it vectorised numpy; no Python loop over users or behaviours):

- **Taxonomy.** ``n_departments`` departments hold contiguous blocks of ``n_categories``
  categories; every category holds at least one of the ``n_items`` items (sizes vary). Raw
  ``item_id``/``category_id``/``user_id`` values are distinct random integers, so nothing can be
  read off their order. Within a category, item popularity is Zipf with exponent ``zipf_a``;
  categories differ in popularity too.
- **Users.** Each user has a home department and ``interests_per_user`` interests (categories):
  each interest lies in the home department with probability 0.8, otherwise anywhere, so a user's
  interests tend to share a department. Interest weights are Dirichlet(1).
- **Timeline.** A user has about ``behaviors_per_user`` behaviours (log-normal count, >= 1),
  grouped into sessions (a behaviour opens a new session with probability 1/6) whose starts are
  spread over ``days`` days from ``start_timestamp`` with a day/night profile; behaviours within a
  session are ~1.5 min apart. A session mostly follows one interest (75 % of its behaviours).
- **Drift.** Before each behaviour, with probability ``drift`` one interest moves to a nearby
  category (one or two steps along the ring of categories of its department), so a user's recent
  behaviour predicts the latter half of their timeline better than their oldest behaviour does.
- **Items.** A behaviour picks an item of its category by Zipf popularity; 10 % of behaviours
  revisit the user's previous item; a ``noise`` fraction is a uniformly random item. Behaviour
  types are ``pv`` 89 %, ``cart`` 5.5 %, ``fav`` 3 %, ``buy`` 2.5 % (close to UserBehavior).

**Chunks.** Users are generated ``chunk_rows // behaviors_per_user`` at a time (at least one), so
memory grows with the chunk and the item corpus, never with the number of rows;
:func:`write_synthetic_csv` appends chunk after chunk to one file. The taxonomy, the item and
category popularities and the raw item and category ids are drawn once from ``seed`` and shared
by every chunk, so an item keeps its category and its popularity throughout. Chunk ``c`` draws its
users from its own stream (``SeedSequence(seed, spawn_key=(c,))``) and gets raw user ids in its
own range, so user ids are unique and increasing across chunks and the whole log stays sorted by
(user, time). A configuration that fits in one chunk (the default one) draws everything from one
generator seeded with ``seed``, as before chunking existed, so its bytes never change. With more
users than one chunk the chunking fixes the draws: another ``chunk_rows`` gives other data.

UserBehavior's shape (987,994 users, 4,162,024 items, 9,439 categories, 100,150,807 behaviours
over 9 days; it has no departments, 100 gives ~94 categories each), ~100M rows, 3.4 GiB:

    tdm generate --out /tmp/UserBehavior.csv --set synthetic.n_users=1000000 \\
        --set synthetic.n_items=4162024 --set synthetic.n_categories=9439 \\
        --set synthetic.n_departments=100 --set synthetic.behaviors_per_user=100

The taxonomy takes O(n_items + n_categories) time and memory (and, transiently, 80 bytes per item
for drawing the distinct raw item ids); each chunk is O(its rows), with no loop over users,
behaviours or items. Measured on 2 shared cores: 100M rows (3.4 GiB) in 44 s at a 0.48 GiB peak
RSS with the default ``chunk_rows`` (2M); 10M-row chunks peak at 1.1 GiB and are slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from tdm.config import SyntheticConfig
from tdm.data.schema import BEHAVIOR_TYPES, COLUMNS
from tdm.io import atomic_file

logger = logging.getLogger(__name__)

SAME_DEPARTMENT = 0.8
SESSION_BREAK = 1.0 / 6.0
SESSION_FOCUS = 0.75
GAP_SECONDS = 90.0
REVISIT = 0.1
COUNT_SIGMA = 0.6
TYPE_PROBS = {"pv": 0.89, "buy": 0.025, "cart": 0.055, "fav": 0.03}
HOUR_PROFILE = np.array(
    [3, 2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 7, 6, 6, 6, 6, 7, 8, 10, 11, 11, 9, 6], dtype=np.float64
)


def _block_starts(block_of: np.ndarray, n_blocks: int) -> np.ndarray:
    """(n_blocks+1,) offsets of contiguous blocks given a sorted block index per element."""
    return np.concatenate([[0], np.cumsum(np.bincount(block_of, minlength=n_blocks))])


def _block_cumulative(weights: np.ndarray, block_of: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-block cumulative probabilities shifted by the block index: values of block b in (b, b+1].

    ``searchsorted(result, b + u, side="right")`` with ``u`` uniform in [0, 1) then samples an
    element of block ``b`` proportionally to ``weights``.
    """
    cumulative = np.cumsum(weights)
    before = np.concatenate([[0.0], cumulative])[starts[:-1]]
    totals = np.add.reduceat(weights, starts[:-1]) if len(weights) else weights
    within = (cumulative - before[block_of]) / totals[block_of]
    within[starts[1:] - 1] = 1.0
    return block_of + within


def _sample_in_blocks(
    shifted: np.ndarray, starts: np.ndarray, blocks: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One element index per entry of ``blocks``, drawn within that block by its weights."""
    index = np.searchsorted(shifted, blocks + rng.random(len(blocks)), side="right")
    return np.clip(index, starts[blocks], starts[blocks + 1] - 1)


def _zipf_ranks(sizes: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """0-based ranks in ``[0, sizes)`` with P(rank r) ~ (r + 1) ** -a (continuous approximation).

    Inverse CDF of the density x ** -a on [1, size + 1), floored: O(1) per draw.
    """
    u = rng.random(len(sizes))
    top = sizes.astype(np.float64) + 1.0
    if abs(a - 1.0) < 1e-9:
        x = np.power(top, u)
    else:
        b = 1.0 - a
        x = np.power(1.0 + u * (np.power(top, b) - 1.0), 1.0 / b)
    return np.minimum(x.astype(np.int64) - 1, sizes - 1).astype(np.int32)


def _distinct_ids(n: int, rng: np.random.Generator, sort: bool) -> np.ndarray:
    ids = rng.choice(10 * max(n, 1), size=n, replace=False).astype(np.int64) + 1
    return np.sort(ids) if sort else ids


@dataclass(frozen=True)
class _Taxonomy:
    """Departments own contiguous blocks of categories, categories contiguous blocks of items."""

    dept_of_cat: np.ndarray  # (C,) sorted department of each category
    dept_starts: np.ndarray  # (D+1,) first category of each department
    cat_of_item: np.ndarray  # (I,) sorted category of each item
    cat_starts: np.ndarray  # (C+1,) first item of each category
    cat_cum_in_dept: np.ndarray  # (C,) category popularity, cumulative within departments
    cat_cum_global: np.ndarray  # (C,) category popularity, cumulative over all categories
    dept_weight: np.ndarray  # (D,) total category popularity of each department


def _check(cfg: SyntheticConfig) -> None:
    if min(cfg.n_users, cfg.n_items, cfg.n_categories, cfg.n_departments) < 1:
        raise ValueError("synthetic: n_users, n_items, n_categories, n_departments must be >= 1")
    if cfg.interests_per_user < 1 or cfg.behaviors_per_user < 1 or cfg.days < 1:
        raise ValueError("synthetic: interests_per_user, behaviors_per_user, days must be >= 1")
    if cfg.chunk_rows < 1:
        raise ValueError("synthetic: chunk_rows must be >= 1")


def _taxonomy(cfg: SyntheticConfig, rng: np.random.Generator) -> _Taxonomy:
    """The shared corpus: O(n_items + n_categories) time and memory."""
    n_items = cfg.n_items
    n_cats = min(cfg.n_categories, n_items)
    n_depts = min(cfg.n_departments, n_cats)
    dept_of_cat = np.sort(np.arange(n_cats) % n_depts)
    dept_starts = _block_starts(dept_of_cat, n_depts)
    cat_weight = rng.lognormal(0.0, 0.75, n_cats)
    extra = rng.choice(n_cats, size=n_items - n_cats, p=rng.dirichlet(np.full(n_cats, 2.0)))
    cat_of_item = np.sort(np.concatenate([np.arange(n_cats), extra]))
    return _Taxonomy(
        dept_of_cat=dept_of_cat,
        dept_starts=dept_starts,
        cat_of_item=cat_of_item,
        cat_starts=_block_starts(cat_of_item, n_cats),
        cat_cum_in_dept=_block_cumulative(cat_weight, dept_of_cat, dept_starts),
        cat_cum_global=np.cumsum(cat_weight) / cat_weight.sum(),
        dept_weight=np.bincount(dept_of_cat, weights=cat_weight, minlength=n_depts),
    )


def _behaviours(
    cfg: SyntheticConfig, tax: _Taxonomy, n_users: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The behaviours of ``n_users`` users, as indices.

    Returns:
        ``(user, item, type_code, seconds)``, each (N,), sorted by (user, time): the user's index
        in ``[0, n_users)``, the item's index into ``tax.cat_of_item``, the index into
        ``BEHAVIOR_TYPES`` (int8) and the seconds since ``start_timestamp`` (int64).
    """
    n_items = len(tax.cat_of_item)
    n_cats = len(tax.dept_of_cat)
    n_depts = len(tax.dept_weight)
    k = cfg.interests_per_user
    dept_of_cat, dept_starts = tax.dept_of_cat, tax.dept_starts
    dept_sizes = np.diff(dept_starts)
    cat_starts = tax.cat_starts
    category_sizes = np.diff(cat_starts).astype(np.int32)

    # Users: a home department, k interests mostly inside it, Dirichlet(1) interest weights.
    home = rng.choice(n_depts, size=n_users, p=tax.dept_weight / tax.dept_weight.sum())
    interests = _sample_in_blocks(tax.cat_cum_in_dept, dept_starts, np.repeat(home, k), rng)
    anywhere = rng.random(n_users * k) >= SAME_DEPARTMENT
    anywhere_cats = np.searchsorted(tax.cat_cum_global, rng.random(int(anywhere.sum())), "right")
    interests[anywhere] = np.minimum(anywhere_cats, n_cats - 1)
    interests = interests.reshape(n_users, k)
    weight_cum = np.cumsum(rng.gamma(1.0, size=(n_users, k)), axis=1)
    weight_cum /= weight_cum[:, -1:]

    # Behaviour counts and the behaviour -> user map (users contiguous, in time order).
    mu = np.log(cfg.behaviors_per_user) - COUNT_SIGMA**2 / 2
    counts = np.maximum(1, np.rint(rng.lognormal(mu, COUNT_SIGMA, n_users))).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    user = np.repeat(np.arange(n_users, dtype=np.int32 if n < 2**31 else np.int64), counts)
    first = np.zeros(n, dtype=bool)
    first[offsets[:-1]] = True

    # Sessions: a behaviour opens a new one with probability SESSION_BREAK.
    opens = first | (rng.random(n) < SESSION_BREAK)
    session = np.cumsum(opens) - 1  # global session index, (n,)
    n_sessions = int(session[-1]) + 1
    session_user = user[opens]
    session_counts = np.bincount(session_user, minlength=n_users)

    # Session starts: sorted uniforms per user by normalised exponential spacings, then mapped
    # through the day/night profile (a monotone map, so they stay sorted).
    spacing_offsets = np.concatenate([[0], np.cumsum(session_counts + 1)])
    spacings = rng.exponential(size=int(spacing_offsets[-1]))
    spacing_cum = np.cumsum(spacings)
    base = np.concatenate([[0.0], spacing_cum])[spacing_offsets[:-1]]
    totals = spacing_cum[spacing_offsets[1:] - 1] - base
    is_start = np.ones(len(spacings), dtype=bool)
    is_start[spacing_offsets[1:] - 1] = False
    fraction = (spacing_cum[is_start] - base[session_user]) / totals[session_user]
    session_start = _timeline_seconds(fraction, cfg.days)
    del spacings, spacing_cum, is_start, fraction

    # Behaviour times: session start + exponential gaps; monotone within each user.
    gaps = rng.exponential(GAP_SECONDS, n)
    gaps[opens] = 0.0
    gap_cum = np.cumsum(gaps)
    within = gap_cum - gap_cum[np.flatnonzero(opens)][session]
    del gaps, gap_cum
    span = cfg.days * 86400
    seconds = np.minimum(np.floor(session_start[session] + within), span - 1).astype(np.int64)
    del within
    shifted = user.astype(np.int64) * span + seconds
    seconds = np.maximum.accumulate(shifted) - user.astype(np.int64) * span
    del shifted

    # Interest slot of each behaviour: mostly the session's slot.
    session_slot = (rng.random(n_sessions)[:, None] > weight_cum[session_user]).sum(axis=1)
    slot = session_slot.astype(np.int32)[session]
    del session_slot, session
    wander = np.flatnonzero(rng.random(n) >= SESSION_FOCUS)
    slot[wander] = (rng.random(len(wander))[:, None] > weight_cum[user[wander]]).sum(axis=1)
    np.minimum(slot, k - 1, out=slot)
    del wander

    # Drift: a random walk of each interest along its department's ring of categories.
    events = np.flatnonzero(rng.random(n) < cfg.drift)
    event_slot = rng.integers(0, k, len(events))
    event_step = rng.integers(-2, 2, len(events))
    event_step += event_step >= 0  # one or two steps either way
    walk = np.zeros(n, dtype=np.int32)
    moves = np.zeros(n, dtype=np.int32)
    for s in range(k):  # k interest slots, each an O(n) pass
        moves[:] = 0
        mine = event_slot == s
        moves[events[mine]] = event_step[mine]
        cum = np.cumsum(moves, dtype=np.int32)
        before = np.zeros(n_users, dtype=np.int32)
        before[1:] = cum[offsets[1:-1] - 1]
        cum -= before[user]
        walk = np.where(slot == s, cum, walk)
    del moves, cum
    start_cat = interests.astype(np.int32).ravel()[user * k + slot]
    dept = dept_of_cat.astype(np.int32)[start_cat]
    first_cat = dept_starts.astype(np.int32)[dept]
    category = first_cat + (start_cat - first_cat + walk) % dept_sizes.astype(np.int32)[dept]
    del walk, start_cat, dept, first_cat, slot

    # Items: Zipf within the category; revisits of the previous item; uniform noise.
    item = cat_starts[category] + _zipf_ranks(category_sizes[category], cfg.zipf_a, rng)
    del category
    revisit = (rng.random(n) < REVISIT) & ~first
    source = np.maximum.accumulate(np.where(revisit, 0, np.arange(n)))
    item = item[source]
    del revisit, source
    noisy = rng.random(n) < cfg.noise
    item[noisy] = rng.integers(0, n_items, int(noisy.sum()))

    type_codes = rng.choice(
        len(BEHAVIOR_TYPES), size=n, p=[TYPE_PROBS[name] for name in BEHAVIOR_TYPES]
    ).astype(np.int8)
    return user, item, type_codes, seconds


def _frame(
    cfg: SyntheticConfig,
    tax: _Taxonomy,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    category_ids: np.ndarray,
    behaviours: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> pd.DataFrame:
    """The canonical table of one chunk's behaviours, with raw ids."""
    user, item, type_codes, seconds = behaviours
    return pd.DataFrame(
        {
            "user_id": user_ids[user],
            "item_id": item_ids[item],
            "category_id": category_ids[tax.cat_of_item[item]],
            "behavior_type": pd.Categorical.from_codes(type_codes, categories=BEHAVIOR_TYPES),
            "timestamp": cfg.start_timestamp + seconds,
        },
        columns=list(COLUMNS),
    )


def users_per_chunk(cfg: SyntheticConfig) -> int:
    """Users generated at a time: ``chunk_rows // behaviors_per_user``, at least one."""
    return max(1, cfg.chunk_rows // cfg.behaviors_per_user)


def generate_chunks(cfg: SyntheticConfig) -> Iterator[pd.DataFrame]:
    """Generate the behaviour log chunk by chunk (see "Chunks" in the module docstring).

    Only one chunk is alive at a time (as long as the caller drops each before asking for the
    next), so memory is bounded by the chunk size and the item corpus.

    Args:
        cfg: the ``synthetic`` section; the same config (seed and ``chunk_rows`` included) gives
            identical chunks.

    Yields:
        Canonical behaviour tables (as :func:`generate`) of :func:`users_per_chunk` users each
        (the last one fewer); their concatenation is sorted by (user_id, timestamp), and raw ids
        are consistent across chunks.
    """
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    tax = _taxonomy(cfg, rng)
    n_items, n_cats = len(tax.cat_of_item), len(tax.dept_of_cat)
    per_chunk = users_per_chunk(cfg)
    if cfg.n_users <= per_chunk:  # one chunk, one generator: the draws of the pre-chunk code
        behaviours = _behaviours(cfg, tax, cfg.n_users, rng)
        user_ids = _distinct_ids(cfg.n_users, rng, sort=True)
        item_ids = _distinct_ids(n_items, rng, sort=False)
        category_ids = _distinct_ids(n_cats, rng, sort=False)
        yield _frame(cfg, tax, user_ids, item_ids, category_ids, behaviours)
        return
    item_ids = _distinct_ids(n_items, rng, sort=False)
    category_ids = _distinct_ids(n_cats, rng, sort=False)
    for chunk, first_user in enumerate(range(0, cfg.n_users, per_chunk)):
        n_users = min(per_chunk, cfg.n_users - first_user)
        chunk_rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(chunk,)))
        # Chunk c's raw user ids lie in (10 * first_user, 10 * (first_user + n_users)].
        user_ids = 10 * first_user + _distinct_ids(n_users, chunk_rng, sort=True)
        # The behaviours are a temporary: nothing of this chunk but user_ids outlives the yield.
        yield _frame(
            cfg, tax, user_ids, item_ids, category_ids, _behaviours(cfg, tax, n_users, chunk_rng)
        )


def true_taxonomy(cfg: SyntheticConfig) -> pd.DataFrame:
    """The taxonomy the generator draws from ``cfg``: every item's true category and department.

    The truth a learnt tree is measured against (``tdm.tree_build.truth_agreement``). It replays
    the draws of :func:`generate_chunks` up to the raw ids without changing them: the taxonomy,
    then (when the config fits in one chunk, where the ids are drawn after the behaviours) one
    chunk's behaviours, which are dropped. O(n_items + n_categories), plus one chunk's
    behaviours for a one-chunk config (the default: ~0.1 s).

    Args:
        cfg: the ``synthetic`` section the data was generated with.
    Returns:
        One row per item of the corpus (also the items no behaviour touches), in the generator's
        item order: ``item_id`` and ``category_id`` (int64 raw ids, as in the generated data)
        and ``department`` (int64, 0..n_departments-1; the data has no department column).
    """
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    tax = _taxonomy(cfg, rng)
    n_items, n_cats = len(tax.cat_of_item), len(tax.dept_of_cat)
    if cfg.n_users <= users_per_chunk(cfg):  # generate_chunks' one-chunk order of draws
        _behaviours(cfg, tax, cfg.n_users, rng)
        _distinct_ids(cfg.n_users, rng, sort=True)
    item_ids = _distinct_ids(n_items, rng, sort=False)
    category_ids = _distinct_ids(n_cats, rng, sort=False)
    return pd.DataFrame(
        {
            "item_id": item_ids,
            "category_id": category_ids[tax.cat_of_item],
            "department": tax.dept_of_cat[tax.cat_of_item].astype(np.int64),
        }
    )


def generate(cfg: SyntheticConfig) -> pd.DataFrame:
    """Generate a behaviour log in memory (see the module docstring for the story).

    Args:
        cfg: the ``synthetic`` section; the same config (seed included) gives an identical frame.

    Returns:
        The canonical behaviour table, sorted by (user_id, timestamp); int64 ids and timestamps,
        ``behavior_type`` as a Categorical: the chunks of :func:`generate_chunks`, concatenated
        (the file of :func:`write_synthetic_csv`, loaded). The default config (1,500 users x ~40
        behaviours) takes well under a second; 1M users take tens of seconds, and memory grows
        with the rows (:func:`write_synthetic_csv` does not).
    """
    chunks = list(generate_chunks(cfg))
    frame = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    del chunks
    _log_done(cfg, len(frame))
    return frame


def write_synthetic_csv(
    cfg: SyntheticConfig,
    path: str | Path,
    max_rows: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Generate the behaviour log into a ``UserBehavior.csv`` file, chunk by chunk, atomically.

    The chunks of :func:`generate_chunks` are appended to one temporary file next to ``path``
    that replaces ``path`` at the end (``tdm.io.atomic_file``); peak memory is that of one chunk
    plus the item corpus, whatever the number of rows. The bytes equal
    ``write_userbehavior_csv(generate(cfg), path)``.

    Args:
        cfg: the ``synthetic`` section.
        path: the csv file to (over)write.
        max_rows: stop after this many rows (the last user's timeline is cut there; chunks after
            it are not generated); None: all of them.
        progress: called with the number of rows written after each chunk.

    Returns:
        The number of rows written.
    """
    path = Path(path)
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    rows = 0
    with atomic_file(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        for frame in generate_chunks(cfg):
            if max_rows is not None and rows + len(frame) > max_rows:
                frame = frame.iloc[: max(max_rows - rows, 0)]
            pacsv.write_csv(_arrow_table(frame), sink, write_options=options)
            rows += len(frame)
            del frame  # before the next chunk is generated
            if progress is not None:
                progress(rows)
            if max_rows is not None and rows >= max_rows:
                break
    _log_done(cfg, rows)
    return rows


def _log_done(cfg: SyntheticConfig, rows: int) -> None:
    n_cats = min(cfg.n_categories, cfg.n_items)
    logger.info(
        "synthetic: %d behaviours, %d users, %d items, %d categories, %d departments",
        rows,
        cfg.n_users,
        cfg.n_items,
        n_cats,
        min(cfg.n_departments, n_cats),
    )


def _timeline_seconds(fraction: np.ndarray, days: int) -> np.ndarray:
    """Map fractions in [0, 1) monotonically to seconds of a ``days``-day day/night timeline."""
    hourly = np.tile(HOUR_PROFILE, days)
    edges = np.concatenate([[0.0], np.cumsum(hourly)]) / hourly.sum()
    hour = np.clip(np.searchsorted(edges, fraction, side="right") - 1, 0, len(hourly) - 1)
    inside = (fraction - edges[hour]) / (edges[hour + 1] - edges[hour])
    return (hour + inside) * 3600.0


def _string_array(values: pd.Series) -> pa.Array:
    """A string column as a pyarrow string array, without Python objects for a Categorical."""
    array = pa.Array.from_pandas(values)
    return array.cast(pa.string()) if not pa.types.is_string(array.type) else array


def write_userbehavior_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a behaviour table in the exact ``UserBehavior.csv`` format, atomically.

    No header; columns ``user_id,item_id,category_id,behavior_type,timestamp``; no quoting. The
    file is written to a temporary name in the same folder and renamed over ``path``.

    Args:
        df: a canonical behaviour table.
        path: the csv file to (over)write.

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_file(path) as tmp:
        pacsv.write_csv(
            _arrow_table(df),
            tmp,
            write_options=pacsv.WriteOptions(include_header=False, quoting_style="none"),
        )
    return path


def _arrow_table(df: pd.DataFrame) -> pa.Table:
    """The columns of ``UserBehavior.csv``, in its order, as a pyarrow table."""
    return pa.table(
        {
            "user_id": pa.array(df["user_id"].to_numpy(dtype=np.int64)),
            "item_id": pa.array(df["item_id"].to_numpy(dtype=np.int64)),
            "category_id": pa.array(df["category_id"].to_numpy(dtype=np.int64)),
            "behavior_type": _string_array(df["behavior_type"]),
            "timestamp": pa.array(df["timestamp"].to_numpy(dtype=np.int64)),
        }
    )
