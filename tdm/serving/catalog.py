"""What the service shows about items besides their ids: titles and category names.

The prepared item table (``items.parquet``) holds ids, categories and training popularity, not
titles. For MovieLens the titles and genre names come from the movies file of the data set
(``movies.csv`` or ``movies.dat``): the genre names are the category names, since
``tdm.data.loaders.load_movielens`` numbers the genres in sorted order of their names over every
genre label of that file. Any other data set may give a CSV with ``item_id,title`` columns (and
optionally ``category``). Without titles the service shows ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tdm.errors import TdmError

log = logging.getLogger(__name__)


class CatalogError(TdmError, ValueError):
    """A titles file that cannot be read."""


@dataclass(frozen=True)
class Catalog:
    """Titles and category names, aligned with a model's item table.

    Attributes:
        titles: (n_items,) object array, the title of each item index or None.
        category_names: category id -> name.
        source: where they came from ("" when nothing was read).
    """

    titles: np.ndarray
    category_names: dict[int, str] = field(default_factory=dict)
    source: str = ""

    @property
    def has_titles(self) -> bool:
        return self.source != "" and bool(np.any(self.titles != None))  # noqa: E711

    @classmethod
    def empty(cls, n_items: int) -> Catalog:
        return cls(np.full(n_items, None, dtype=object))

    def title(self, index: int) -> str | None:
        return self.titles[index] if 0 <= index < len(self.titles) else None

    def category(self, category_id: int) -> str | None:
        return self.category_names.get(int(category_id))


def _movies_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
            for name in ("movies.csv", "movies.dat"):
                if (folder / name).is_file():
                    return folder / name
    return None


def _read_movies(path: Path) -> tuple[pd.DataFrame, dict[int, str]]:
    """``item_id, title`` of a MovieLens movies file, and genre id -> name."""
    from tdm.data.loaders import _split_genres

    if path.suffix == ".dat":
        rows = [
            line.rstrip("\r\n").split("::")
            for line in path.read_text(encoding="latin-1").splitlines()
            if line.strip()
        ]
        frame = pd.DataFrame(
            [(r[0], r[1], r[2]) for r in rows if len(r) >= 3],
            columns=["movieId", "title", "genres"],
        )
    else:
        frame = pd.read_csv(path, dtype={"movieId": str, "title": str, "genres": str})
    if list(frame.columns[:3]) != ["movieId", "title", "genres"]:
        raise CatalogError(f"{path}: expected the columns movieId,title,genres")
    genres = [_split_genres(str(g) if isinstance(g, str) else "") for g in frame["genres"]]
    vocabulary = sorted({name for names in genres for name in names})
    titles = pd.DataFrame(
        {"item_id": pd.to_numeric(frame["movieId"], errors="coerce"), "title": frame["title"]}
    )
    return titles, dict(enumerate(vocabulary))


def load_catalog(path: str | Path | None, items: pd.DataFrame) -> Catalog:
    """Titles (and category names) for the item table ``items`` (``item_index``, ``item_id``,
    ``category_id``).

    Args:
        path: a MovieLens folder (or a sub-folder holding it), ``movies.csv`` / ``movies.dat``,
            or a CSV with ``item_id,title[,category_id,category]``; None: no titles.
        items: the model's item table.
    Returns:
        The catalog (``Catalog.empty`` when ``path`` is None).
    Raises:
        CatalogError: ``path`` is given but holds no titles.
    """
    items = items.sort_values("item_index")
    if path is None:
        return Catalog.empty(len(items))
    path = Path(path)
    movies = _movies_file(path)
    if movies is None:
        raise CatalogError(f"{path}: no movies.csv / movies.dat / titles CSV here")
    names: dict[int, str] = {}
    try:
        if movies.name in ("movies.csv", "movies.dat"):
            titles, names = _read_movies(movies)
        else:
            titles = pd.read_csv(movies)
            if not {"item_id", "title"} <= set(titles.columns):
                raise CatalogError(f"{movies}: needs item_id and title columns")
            if {"category_id", "category"} <= set(titles.columns):
                pairs = titles[["category_id", "category"]].dropna().drop_duplicates()
                names = {int(c): str(n) for c, n in pairs.itertuples(index=False)}
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CatalogError(f"{movies}: cannot read titles ({exc})") from None
    titles = titles.dropna(subset=["item_id"]).drop_duplicates("item_id")
    lookup = dict(zip(titles["item_id"].astype(np.int64), titles["title"].astype(str), strict=True))
    aligned = np.array([lookup.get(int(i)) for i in items["item_id"]], dtype=object)
    found = int(np.sum(aligned != None))  # noqa: E711
    log.info("titles from %s: %d of %d items", movies, found, len(items))
    return Catalog(aligned, names, str(movies))


def default_titles(meta: dict) -> str | None:
    """The titles of a model trained on MovieLens: its ``data.path`` when that is a local folder
    or file holding a movies file (the prepared ``meta.json`` records the data config)."""
    data = meta.get("data") or {}
    path = data.get("path")
    if data.get("source") != "movielens" or not path or "://" in str(path):
        return None
    return str(path) if _movies_file(Path(path)) is not None else None
