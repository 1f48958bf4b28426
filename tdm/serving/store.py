"""The behaviour store: each user's most recent behaviours, the real-time feature server of the
paper's Fig. 3 (Sec. 4: behaviours assemble the features, page views read them).

``BehaviorStore`` is the interface the service uses; ``SqliteStore`` is the embedded default, one
SQLite file in WAL mode. A server-based store (Redis, a database) implements the same methods.

Durability: ``append`` returns only after SQLite committed the events, and the service answers
only after ``append`` returned, so an acknowledged event is on disk. In WAL mode a commit appends
to the ``-wal`` file; ``synchronous=FULL`` fsyncs that file on every commit, so acknowledged
events survive a power loss too. ``synchronous=NORMAL`` fsyncs only at checkpoints: a commit is
then in the operating system's page cache, which survives a killed server (``kill -9``: the
kernel still writes the file) but not a power loss or a kernel crash (SQLite's documentation,
"WAL mode ... synchronous=NORMAL"). ``serve.store_sync`` chooses; FULL is the default.
"""

from __future__ import annotations

import abc
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tdm.errors import TdmError

BEHAVIOR_TYPES = ("pv", "buy", "cart", "fav")  # tdm.data.schema's behaviour types


class StoreError(TdmError, RuntimeError):
    """A behaviour store that cannot be opened or used (a locked, corrupt or foreign file)."""


@dataclass(frozen=True)
class Event:
    """One behaviour: ``user_id`` did ``behavior_type`` on ``item_id`` at ``timestamp`` (Unix
    seconds)."""

    user_id: int
    item_id: int
    behavior_type: str
    timestamp: int


@dataclass(frozen=True)
class UserSummary:
    """A user of the store: how many behaviours it keeps and the latest one's time."""

    user_id: int
    events: int
    last_timestamp: int


class BehaviorStore(abc.ABC):
    """Each user's last ``max_history`` behaviours, safe to call from several threads."""

    max_history: int

    @abc.abstractmethod
    def append(self, events: Sequence[Event]) -> None:
        """Add events durably (returns once they would survive a crash of the server) and keep
        only each user's last ``max_history`` behaviours by time (ties: arrival order)."""

    @abc.abstractmethod
    def histories(self, user_ids: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
        """``user_id -> [(item_id, timestamp), ...]`` oldest first (by time, then arrival), for
        the users that have behaviours; unknown users are absent."""

    def history(self, user_id: int) -> list[Event]:
        """One user's kept behaviours, oldest first (empty for an unknown user)."""
        return [
            Event(user_id, item, "pv", stamp)
            for item, stamp in self.histories([user_id]).get(user_id, [])
        ]

    @abc.abstractmethod
    def users(self, limit: int = 50, offset: int = 0) -> list[UserSummary]:
        """Users with behaviours, most recently active first."""

    @abc.abstractmethod
    def count_users(self) -> int:
        """Number of users with behaviours."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreError when the store cannot answer (``/readyz``)."""

    def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release connections."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS behaviors (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    behavior_type TEXT NOT NULL,
    timestamp INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS behaviors_user_time ON behaviors (user_id, timestamp, seq);
"""
_TRIM = """
DELETE FROM behaviors WHERE user_id = ?1 AND seq NOT IN (
    SELECT seq FROM behaviors WHERE user_id = ?1 ORDER BY timestamp DESC, seq DESC LIMIT ?2
)
"""
_IN_CHUNK = 500  # users per ``IN (...)`` query (SQLite allows 32766 parameters)


class SqliteStore(BehaviorStore):
    """The behaviour store in one SQLite file in WAL mode: one table ``behaviors`` (``seq``,
    ``user_id``, ``item_id``, ``behavior_type``, ``timestamp``), indexed by user and time.

    One writer connection behind a lock; every reading thread has its own connection (WAL lets
    reads run beside a write).

    Args:
        path: the database file (created with its folder when missing).
        max_history: behaviours kept per user (``data.max_history``: what the model reads).
        synchronous: ``"full"`` (fsync every commit) or ``"normal"`` (see the module docstring).
    """

    def __init__(self, path: str | Path, max_history: int, synchronous: str = "full") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = Path(path)
        self.max_history = int(max_history)
        self.synchronous = synchronous.upper()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        try:
            self._writer = self._connect()
            mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self._writer.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable behaviour store ({exc})") from None

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path, timeout=30.0, check_same_thread=False, isolation_level=None
        )
        connection.execute(f"PRAGMA synchronous={self.synchronous}")
        connection.execute("PRAGMA busy_timeout=30000")
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    def _reader(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def append(self, events: Sequence[Event]) -> None:
        if not events:
            return
        rows = [(e.user_id, e.item_id, e.behavior_type, e.timestamp) for e in events]
        users = sorted({e.user_id for e in events})
        with self._write_lock:
            db = self._writer
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO behaviors (user_id, item_id, behavior_type, timestamp) "
                    "VALUES (?, ?, ?, ?)",
                    rows,
                )
                db.executemany(_TRIM, [(user, self.max_history) for user in users])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def histories(self, user_ids: Iterable[int]) -> dict[int, list[tuple[int, int]]]:
        users = sorted({int(u) for u in user_ids})
        out: dict[int, list[tuple[int, int]]] = {}
        db = self._reader()
        for start in range(0, len(users), _IN_CHUNK):
            chunk = users[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT user_id, item_id, timestamp FROM behaviors WHERE user_id IN ({marks}) "
                "ORDER BY user_id, timestamp, seq",
                chunk,
            ).fetchall()
            for user, item, stamp in rows:
                out.setdefault(user, []).append((item, stamp))
        return out

    def history(self, user_id: int) -> list[Event]:
        rows = (
            self._reader()
            .execute(
                "SELECT item_id, behavior_type, timestamp FROM behaviors WHERE user_id = ? "
                "ORDER BY timestamp, seq",
                (int(user_id),),
            )
            .fetchall()
        )
        return [Event(int(user_id), item, kind, stamp) for item, kind, stamp in rows]

    def users(self, limit: int = 50, offset: int = 0) -> list[UserSummary]:
        rows = (
            self._reader()
            .execute(
                "SELECT user_id, COUNT(*), MAX(timestamp) FROM behaviors GROUP BY user_id "
                "ORDER BY MAX(timestamp) DESC, user_id LIMIT ? OFFSET ?",
                (int(limit), int(offset)),
            )
            .fetchall()
        )
        return [UserSummary(*row) for row in rows]

    def count_users(self) -> int:
        return int(
            self._reader().execute("SELECT COUNT(DISTINCT user_id) FROM behaviors").fetchone()[0]
        )

    def ping(self) -> None:
        try:
            self._reader().execute("SELECT 1 FROM behaviors LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.close()
            except sqlite3.Error:
                pass


def import_prepared(
    store: BehaviorStore, prepared_dir: str | Path, splits=("test", "valid")
) -> int:
    """Put the known histories (first halves, Sec. 5.1) of the evaluation users of a prepared
    folder into ``store``, as raw item ids: users to try the service with. Returns the number
    of users imported."""
    import numpy as np

    from tdm.data.protocol import load_prepared

    prepared = load_prepared(prepared_dir)
    item_ids = prepared.items.sort_values("item_index")["item_id"].to_numpy()
    events: list[Event] = []
    n_users = 0
    for name in splits:
        split = getattr(prepared, name)
        rows = np.repeat(np.arange(len(split.users)), np.diff(split.hist_offsets))
        users = np.asarray(split.users)[rows]
        items = item_ids[split.hist_items]
        events += [
            Event(int(u), int(i), "pv", int(t))
            for u, i, t in zip(users, items, split.hist_times, strict=True)
        ]
        n_users += len(split.users)
    store.append(events)
    return n_users
