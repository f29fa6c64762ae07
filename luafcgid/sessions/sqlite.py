"""Sessions in one SQLite file shared by every worker process of a host.

WAL mode: readers never wait for the writer, and a write is one short transaction
(``synchronous = NORMAL``: a power cut may lose the last writes, never the file).
Each thread has its own connection (sqlite3 connections are not shared between
threads), opened on first use in the process that uses it: a connection never
crosses a fork. ``busy_timeout`` bounds how long a writer waits for another.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterator, List, Optional

from luafcgid.sessions import sqlite_url
from luafcgid.sessions.base import Identity, Store, StoreError, Variable, Weights, new_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    expires REAL NOT NULL,
    address BLOB NOT NULL,
    agent BLOB NOT NULL,
    language BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE TABLE IF NOT EXISTS variables (
    key TEXT NOT NULL,
    realm BLOB NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (key, realm, name)
) WITHOUT ROWID;
"""

# Seconds: the expiry a read leaves alone (see SqliteStore.refresh_after).
REFRESH_AFTER = 60.0

# Milliseconds a writer waits for another process's transaction before failing.
BUSY_TIMEOUT_MS = 5000


class SqliteStore(Store):
    """Sessions in the SQLite file ``path`` (created with its tables when missing)."""

    def __init__(self, path: str, lifetime: int, weights: Weights, key_length: int) -> None:
        super().__init__(lifetime, weights, key_length)
        self.path = path
        # Reads refresh the expiry at most this often: a write per read would cost more
        # than the read (measured in-process: 91 us against ~20 us per request reading a
        # session; 7 us without Session).
        self.refresh_after = min(REFRESH_AFTER, lifetime / 10)
        self.name = sqlite_url(path)
        self._local = threading.local()
        self._connections: List[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- connections ------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema made) on first use."""
        local = self._local
        db = getattr(local, "db", None)
        if db is not None and local.pid == os.getpid():
            return db
        with self._db_errors():
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                 isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
        local.db, local.pid = db, os.getpid()
        with self._lock:
            self._connections.append(db)
        return db

    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        """SQLite errors inside, told as :class:`StoreError`."""
        try:
            yield
        except sqlite3.Error as error:
            raise self._failed(error) from None

    def _failed(self, error: sqlite3.Error) -> StoreError:
        hint = ("check that the directory exists and belongs to the workers' user, "
                "or set session_store")
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            hint = "another process held the database longer than the busy timeout"
        return StoreError(f"session store {self.name}: {error}; {hint}")

    # -- the Store interface ----------------------------------------------------------

    def open(self, key: str, identity: Identity) -> Optional[List[Variable]]:
        db = self._db()
        now = time.time()
        with self._db_errors():
            rows = db.execute(
                "SELECT s.address, s.agent, s.language, s.expires, v.realm, v.name, v.value "
                "FROM sessions AS s LEFT JOIN variables AS v ON v.key = s.key "
                "WHERE s.key = ? AND s.expires >= ?", (key, now)).fetchall()
            if not rows or not self.weights.accepts(Identity(*rows[0][:3]), identity):
                return None
            # A read is a write only when it must be: a new identity, or an expiry
            # REFRESH_AFTER seconds old (the slide's granularity).
            if rows[0][:3] != identity or rows[0][3] < now + self.lifetime - self.refresh_after:
                db.execute("UPDATE sessions SET expires = ?, address = ?, agent = ?, "
                           "language = ? WHERE key = ?", (now + self.lifetime, *identity, key))
            return [row[4:] for row in rows if row[4] is not None]

    def create(self, identity: Identity) -> str:
        db = self._db()
        with self._db_errors():
            while True:
                key = new_key(self.key_length)
                inserted = db.execute(
                    "INSERT OR IGNORE INTO sessions VALUES (?, ?, ?, ?, ?)",
                    (key, time.time() + self.lifetime, *identity)).rowcount
                if inserted:
                    return key

    def set(self, key: str, realm: bytes, name: bytes, value: Optional[bytes]) -> bool:
        db = self._db()
        now = time.time()
        with self._db_errors():
            with db:  # one transaction: the session is alive when the variable lands
                db.execute("BEGIN IMMEDIATE")
                alive = db.execute("UPDATE sessions SET expires = ? WHERE key = ? "
                                   "AND expires >= ?", (now + self.lifetime, key, now)).rowcount
                if not alive:
                    return False
                if value is None:
                    db.execute("DELETE FROM variables WHERE key = ? AND realm = ? AND name = ?",
                               (key, realm, name))
                else:
                    db.execute("INSERT OR REPLACE INTO variables VALUES (?, ?, ?, ?)",
                               (key, realm, name, value))
            return True

    def clear(self, key: str, realm: Optional[bytes]) -> None:
        db = self._db()
        with self._db_errors():
            if realm is None:
                db.execute("DELETE FROM variables WHERE key = ?", (key,))
            else:
                db.execute("DELETE FROM variables WHERE key = ? AND realm = ?", (key, realm))

    def delete(self, key: str) -> None:
        db = self._db()
        with self._db_errors():
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM variables WHERE key = ?", (key,))
                db.execute("DELETE FROM sessions WHERE key = ?", (key,))

    def sweep(self) -> int:
        db = self._db()
        now = time.time()
        with self._db_errors():
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM variables WHERE key IN "
                           "(SELECT key FROM sessions WHERE expires < ?)", (now,))
                return db.execute("DELETE FROM sessions WHERE expires < ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()
