"""A small durable queue of MQTT finals: one SQLite database in WAL mode under the state directory.

`FinalJournal` is synchronous and owned by one thread at a time; `MqttSink` runs every call on one
dedicated writer thread, so the event loop never waits for the disk. A final is committed here before
the MQTT client sees it and deleted after the broker acknowledged it (PUBACK); whatever a crash leaves
in the table is delivered, in order, after the next start.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: every commit is fsynced to the write-ahead
log before it returns, so a committed final survives ``kill -9``, a kernel panic and a power cut (as
far as the disk honours flushes). ``synchronous=NORMAL`` would survive a killed process only; a commit
costs about 0.4 ms with FULL against 0.04 ms with NORMAL on an SSD (more on an SD card), paid on the
writer thread and shared by every final of a batch. ``locking_mode=EXCLUSIVE`` keeps a second daemon
from delivering the same queue: it gets a `ConfigError` naming the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from streamer.errors import ConfigError

FILE_NAME: Final = "mqtt-outbox.sqlite3"
SCHEMA_VERSION: Final = 1


def open_state_db(path: Path, what: str, keeps: str, version: int, schema: Sequence[str]) -> sqlite3.Connection:
    """Open (creating if needed) one of the daemon's databases in the state directory, set up as the module
    docstring says (WAL, ``synchronous=FULL``, an exclusive lock held until close), with ``schema`` created.

    Args:
        path: the database file.
        what: its name in messages ("MQTT outbox journal").
        keeps: what it keeps, for the hint to turn it off ("finals").
        version: the schema version this code writes; a file of another (non-zero) version is refused.
        schema: ``CREATE TABLE IF NOT EXISTS`` statements.

    Raises:
        ConfigError: the directory cannot be created, the file cannot be opened or is no such database, or
            another process holds it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A writer thread uses the connection after this thread opened it; calls never overlap.
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.0)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open the {what} {path}: {exc}; set state.dir to a writable directory, or "
                          f'state.dir = "" to keep {keeps} in memory only') from exc
    try:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, not WAL (a network file system?)")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, and keeps it until close
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found not in (0, version):
            raise sqlite3.DatabaseError(f"schema version {found}, this streamer knows {version}")
        for statement in schema:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={version}")
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        db.close()
        busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
        why = "another streamer uses it (give each daemon its own state.dir)" if busy else str(exc)
        raise ConfigError(f"cannot use the {what} {path}: {why}") from exc
    return db


@dataclass(frozen=True, slots=True)
class Row:
    """One queued final: its row id (increasing in queue order), MQTT topic and payload."""

    row: int
    topic: str
    payload: str


class FinalJournal:
    """The queue's database; see the module docstring. Use `open`; every method blocks on the disk.

    Args:
        connection: an open connection, set up by `open`.
        path: the database file, for messages.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db, self.path = connection, path

    @classmethod
    def open(cls, directory: Path) -> FinalJournal:
        """Open (creating if needed) ``directory/mqtt-outbox.sqlite3`` and take its lock.

        Raises:
            ConfigError: the directory cannot be created, the file cannot be opened or is no such
                database, or another process holds it.
        """
        path = directory / FILE_NAME
        db = open_state_db(path, "MQTT outbox journal", "finals", SCHEMA_VERSION, [
            "CREATE TABLE IF NOT EXISTS finals (row INTEGER PRIMARY KEY AUTOINCREMENT, "
            "topic TEXT NOT NULL, payload TEXT NOT NULL)",
        ])
        return cls(db, path)

    def rows(self) -> list[Row]:
        """Every queued final, oldest first."""
        return [Row(*r) for r in self._db.execute("SELECT row, topic, payload FROM finals ORDER BY row")]

    def apply(self, add: Sequence[tuple[str, str]], delete: Sequence[int] = ()) -> list[int]:
        """In one transaction: append ``add`` ((topic, payload) pairs, in order) and delete rows ``delete``.

        Returns the new rows' ids, in the order given. Nothing is written when both are empty.
        """
        if not add and not delete:
            return []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = [int(self._db.execute("INSERT INTO finals (topic, payload) VALUES (?, ?)", pair).lastrowid or 0)
                    for pair in add]
            self._db.executemany("DELETE FROM finals WHERE row = ?", ((row,) for row in delete))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return rows

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM finals").fetchone()[0])

    def close(self) -> None:
        """Checkpoint the log into the database file and release the lock."""
        self._db.close()
