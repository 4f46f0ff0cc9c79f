"""The finals a resume may replay, kept across a crash: one SQLite database under the state directory.

A session keeps its last finals in memory (:class:`~streamer.session.results.ResultLog`) so a
client that lost its connection gets what it missed. That memory dies with the process. This journal keeps
a copy: each session's latest resume token (as a SHA-256 hash, never the token) and its finals, written on
a thread of its own after they went out (a commit never delays a result). A session that ends with its
client told (``end``) or whose resume window passed is deleted; one that was held for its client when the
daemon stopped or crashed stays.

After a restart the sessions left in the journal are *orphans*: the recognizer state and the open segment
are gone, but a client that comes back with a ``resume`` whose token matches gets error ``resume_failed``
saying the server restarted, then the kept finals from its ``next_segment`` on (their old stream name and
segment numbers), then a new session as for any failed resume. Orphans are kept for
``server.resume_window_s`` after the daemon is ready, then deleted.

Durability as in :mod:`streamer.server.journal`: WAL with ``synchronous=FULL``, an exclusive lock (a second
daemon on the same state directory gets a :class:`~streamer.errors.ConfigError`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final as Constant

from streamer.protocol import Final, MessageError, parse_server_message
from streamer.server.journal import open_state_db

logger = logging.getLogger(__name__)

FILE_NAME: Constant = "sessions.sqlite3"
SCHEMA_VERSION: Constant = 1


def token_hash(token: str) -> str:
    """What the journal stores of a resume token: enough to check one, useless to resume with."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(slots=True)
class Orphan:
    """A session the previous run held or served when it stopped: its token's hash and kept finals."""

    session: str
    stream: str
    token_sha256: str
    finals: list[Final] = field(default_factory=list)  # oldest first


# One write: ("token", session, stream, hash) | ("final", session, segment, json) | ("end", session).
Op = tuple[str, ...] | tuple[str, str, int, str]


class SessionJournal:
    """The database; every method blocks on the disk. Use :meth:`open`.

    Args:
        connection: an open connection, set up by :meth:`open`.
        path: the database file, for messages.
        max_finals: most finals kept per session (the resume log's bound).
    """

    def __init__(self, connection: sqlite3.Connection, path: Path, max_finals: int) -> None:
        self._db, self.path, self.max_finals = connection, path, max(1, max_finals)

    @classmethod
    def open(cls, directory: Path, max_finals: int) -> SessionJournal:
        """Open (creating if needed) ``directory/sessions.sqlite3`` and take its lock.

        Raises:
            ConfigError: the directory or file cannot be used, or another process holds it.
        """
        db = open_state_db(directory / FILE_NAME, "session journal", "sessions", SCHEMA_VERSION, [
            "CREATE TABLE IF NOT EXISTS sessions (session TEXT PRIMARY KEY, stream TEXT NOT NULL, "
            "token_sha256 TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS finals (session TEXT NOT NULL, segment INTEGER NOT NULL, "
            "payload TEXT NOT NULL, PRIMARY KEY (session, segment))",
        ])
        path = directory / FILE_NAME
        return cls(db, path, max_finals)

    def orphans(self) -> dict[str, Orphan]:
        """Every session the journal holds (at start-up: those the previous run left), with its finals."""
        found = {s: Orphan(s, stream, sha) for s, stream, sha in self._db.execute(
            "SELECT session, stream, token_sha256 FROM sessions")}
        for session, payload in self._db.execute("SELECT session, payload FROM finals ORDER BY session, segment"):
            orphan = found.get(session)
            if orphan is None:
                continue
            try:
                msg = parse_server_message(payload)
            except MessageError:  # written by this code, so never; a damaged row is skipped, not fatal
                logger.warning("session journal %s: an unreadable final of session %s was skipped", self.path, session)
                continue
            if isinstance(msg, Final):
                orphan.finals.append(msg)
        return found

    def apply(self, ops: Sequence[Op]) -> None:
        """Carry out ``ops`` in order, in one transaction."""
        if not ops:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                if op[0] == "token":
                    db.execute("INSERT INTO sessions VALUES (?, ?, ?) ON CONFLICT(session) DO UPDATE SET "
                               "stream = excluded.stream, token_sha256 = excluded.token_sha256", op[1:])
                elif op[0] == "final":
                    _, session, segment, payload = op
                    db.execute("INSERT OR REPLACE INTO finals VALUES (?, ?, ?)", (session, segment, payload))
                    db.execute("DELETE FROM finals WHERE session = ? AND segment <= ?",
                               (session, int(segment) - self.max_finals))
                else:  # "end"
                    db.execute("DELETE FROM finals WHERE session = ?", (op[1],))
                    db.execute("DELETE FROM sessions WHERE session = ?", (op[1],))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


class SessionStore:
    """The loop side of the journal: queue writes (never awaits), commit them on a thread; the orphans.

    Args:
        journal: the database, or None to keep nothing across a restart (``state.dir = ""``).
    """

    def __init__(self, journal: SessionJournal | None) -> None:
        self._journal = journal
        self._writer = ThreadPoolExecutor(1, "session-journal") if journal is not None else None
        self._pending: list[Op] = []
        self._writing = 0  # writes handed to the thread, not yet committed
        self._wake = asyncio.Event()
        self._failed = False
        self.orphans: dict[str, Orphan] = journal.orphans() if journal is not None else {}
        if self.orphans:
            count = sum(len(o.finals) for o in self.orphans.values())
            logger.info("%d session(s) of the previous run kept for a resume (%d final(s)) in %s",
                        len(self.orphans), count, journal.path if journal else "?")

    def token(self, session: str, stream: str, token: str) -> None:
        """A session's latest resume token (its ``ready``)."""
        self._queue(("token", session, stream, token_hash(token)))

    def final(self, session: str, final: Final) -> None:
        """A final of a session's result log."""
        self._queue(("final", session, final.segment, final.to_json()))

    def end(self, session: str) -> None:
        """The session is over for good: forget it."""
        self._queue(("end", session))

    @property
    def unsaved(self) -> int:
        """Writes queued or being committed: what a crash now could lose of what a resume would replay."""
        return len(self._pending) + self._writing

    def take_orphan(self, session: str, token: str) -> Orphan | None:
        """The orphan ``session`` if ``token`` is its latest token; it is then forgotten (a token works once)."""
        orphan = self.orphans.get(session)
        if orphan is None or not hmac.compare_digest(token_hash(token), orphan.token_sha256):
            return None
        del self.orphans[session]
        self.end(session)
        return orphan

    def _queue(self, op: Op) -> None:
        if self._journal is not None:
            self._pending.append(op)
            self._wake.set()

    async def run(self, orphan_window_s: float) -> None:
        """Commit queued writes until cancelled; forget orphans ``orphan_window_s`` after starting.

        Cancelling commits what is queued first (waiting for the disk), so a graceful stop keeps everything.
        """
        loop = asyncio.get_running_loop()
        expire = loop.call_later(orphan_window_s, self._expire_orphans)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._commit()
        finally:
            expire.cancel()
            await asyncio.shield(self._commit())
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if self._journal is not None:
                self._journal.close()

    def _expire_orphans(self) -> None:
        if self.orphans:
            logger.info("%d session(s) of the previous run were not resumed; forgetting them", len(self.orphans))
        for session in list(self.orphans):
            self.end(session)
        self.orphans.clear()

    async def _commit(self) -> None:
        if self._journal is None or self._writer is None or not self._pending:
            return
        ops, self._pending = self._pending, []
        self._writing = len(ops)
        try:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._journal.apply, ops)
        except sqlite3.Error as exc:
            if not self._failed:
                logger.error("cannot write the session journal %s (%s): a crash now loses what a resume would "
                             "replay (logged once until it works again)", self._journal.path, exc)
            self._failed = True
            return
        finally:
            self._writing = 0
        if self._failed:
            logger.warning("the session journal %s is written again", self._journal.path)
            self._failed = False
