"""The outbox of :class:`~streamer.server.mqtt.MqttSink`: what waits for the broker, and its journal writer.

A :class:`FinalOutbox` holds every final until the broker acknowledged it, in order, and the latest partial of each
stream; it decides what the connection may publish next and which final goes when it is full while the broker is
away. With a state directory, a :class:`JournalWriter` commits each final to the
:class:`~streamer.server.journal.FinalJournal` before it may be published, and deletes it once acknowledged or
dropped: batch by batch, in one transaction each, on its own thread, so the event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from streamer.server.journal import FinalJournal, Row

logger = logging.getLogger("streamer.server.mqtt")  # the sink's logger: one name for everything MQTT does


@dataclass(slots=True, eq=False)
class QueuedFinal:
    """One final in the outbox."""

    seq: int  # order of offer, this process; finals from the journal come first
    topic: str
    payload: str
    saved: bool  # committed to the journal (or there is none): it may be handed to the client
    row: int | None = None  # its journal row, once committed


class JournalWriter:
    """Commits offered finals to ``journal`` and deletes acknowledged or dropped ones, batch by batch on one thread.

    `run` as a task while the sink runs; `flush` waits for everything pending; `close` closes the journal.

    Args:
        journal: the durable queue of finals; the writer owns it from here on.
        is_kept: whether a final is still in the outbox (one dropped while being written is deleted again).
        on_saved: called on the loop after each batch, written or failed (its finals may be published now).
    """

    def __init__(
        self, journal: FinalJournal, is_kept: Callable[[QueuedFinal], bool], on_saved: Callable[[], None]
    ) -> None:
        self._journal, self._is_kept, self._on_saved = journal, is_kept, on_saved
        self._thread = ThreadPoolExecutor(1, "mqtt-journal")
        self._to_save: list[QueuedFinal] = []
        self._to_delete: list[int] = []  # journal rows of finals acknowledged or dropped
        self._writing: asyncio.Future[list[int]] | None = None
        self._failed = False
        self._pending = asyncio.Event()

    @property
    def path(self) -> Path:
        """The journal's file."""
        return self._journal.path

    def rows(self) -> list[Row]:
        """The finals a previous run left, oldest first (on the calling thread: at start only)."""
        return self._journal.rows()

    def save(self, final: QueuedFinal) -> None:
        """Commit ``final`` with the next write; it becomes ``saved`` then."""
        self._to_save.append(final)
        self._pending.set()

    def forget(self, row: int) -> None:
        """Delete a journal row (acknowledged or dropped) with the next write."""
        self._to_delete.append(row)
        self._pending.set()

    async def run(self) -> None:
        """Write what is pending, batch by batch, until cancelled."""
        while True:
            await self._pending.wait()
            self._pending.clear()
            await self._write_batch()

    async def _write_batch(self) -> None:
        """One transaction on the writer thread: what was offered and acknowledged since the last one."""
        if not (self._to_save or self._to_delete):
            return
        batch, self._to_save = self._to_save, []
        deletes, self._to_delete = self._to_delete, []
        pairs = [(final.topic, final.payload) for final in batch]
        writing = self._writing = asyncio.get_running_loop().run_in_executor(
            self._thread, self._journal.apply, pairs, deletes
        )
        # Book the result whoever waits for it: a cancelled caller must not leave finals unsendable.
        writing.add_done_callback(lambda done: self._saved(batch, deletes, done))
        await asyncio.shield(writing)

    def _saved(self, batch: list[QueuedFinal], deletes: list[int], done: asyncio.Future[list[int]]) -> None:
        """The writer thread finished a batch: its finals may now be published."""
        error = None if done.cancelled() else done.exception()
        if error is None and not done.cancelled():
            if self._failed:
                logger.warning("MQTT outbox journal writes again")
                self._failed = False
            for final, row in zip(batch, done.result(), strict=True):
                final.saved, final.row = True, row
                if not self._is_kept(final):  # dropped while being written
                    self.forget(row)
        else:
            if not self._failed:
                logger.error("cannot write the MQTT outbox journal %s (%s): finals are kept in memory only "
                             "until it works again", self._journal.path, error)
                self._failed = True
            for final in batch:
                final.saved = True  # publish them anyway: the broker is the next best place
            self._to_delete = deletes + self._to_delete
        self._on_saved()

    async def flush(self) -> None:
        """Wait for the write in progress, then commit everything still pending."""
        if self._writing is not None and not self._writing.done():
            await asyncio.wait({self._writing})
        await self._write_batch()

    async def close(self) -> None:
        """Close the journal (after `flush`; its undelivered finals wait for the next start) and the thread."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._journal.close)
        self._thread.shutdown()


class FinalOutbox:
    """The finals not yet acknowledged (in order) and the latest unsent partial per stream; no I/O of its own.

    Args:
        size: most finals held while the broker is not connected; the oldest is dropped beyond that.
        journal: where finals are committed before they may be published (its queued finals come first, see
            `recover`); None: memory only. Written through a :class:`JournalWriter`, which owns it.
        broker: ``host:port``, for the log.
        on_saved: called on the loop after each journal write (committed finals may be published now).
    """

    def __init__(
        self, size: int, journal: FinalJournal | None, broker: str, on_saved: Callable[[], None] = lambda: None
    ) -> None:
        self.size, self._broker = size, broker
        self.journal = JournalWriter(journal, self.is_kept, on_saved) if journal is not None else None
        self._durable = journal is not None
        self.finals: dict[int, QueuedFinal] = {}  # seq -> every final not yet acknowledged, saved or not, in order
        self._unsent: deque[QueuedFinal] = deque()  # this connection's finals still to publish (dropped ones skipped)
        self._in_flight: set[int] = set()  # seqs being published
        self.partials: dict[str, tuple[str, str]] = {}  # stream -> (topic, payload), latest only
        self._next_seq = 0
        self.dropped = 0
        self.dropped_in_outage = 0

    def recover(self) -> int:
        """Queue the finals a previous run left in the journal, ahead of any new one; how many."""
        if self.journal is None:
            return 0
        rows = self.journal.rows()
        for row in rows:
            self.finals[self._next_seq] = final = QueuedFinal(self._next_seq, row.topic, row.payload, True, row.row)
            self._unsent.append(final)
            self._next_seq += 1
        if rows:
            logger.info("MQTT: %d final(s) from before the restart wait in %s; they are delivered first",
                        len(rows), self.journal.path)
        return len(rows)

    @property
    def unsaved(self) -> int:
        """Finals not yet committed to the journal (all of them without one): what a crash now would lose."""
        if not self._durable:
            return len(self.finals)
        return sum(not final.saved for final in self.finals.values())

    def add_final(self, stream: str, topic: str, payload: str, connected: bool) -> None:
        """Queue a final (it supersedes its stream's unsent partial); while not ``connected``, beyond ``size``
        finals, drop the oldest."""
        self.partials.pop(stream, None)
        final = QueuedFinal(self._next_seq, topic, payload, saved=self.journal is None)
        self._next_seq += 1
        self.finals[final.seq] = final
        self._unsent.append(final)
        if self.journal is not None:
            self.journal.save(final)
        while not connected and len(self.finals) > self.size:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """The broker is away and the outbox full: drop the oldest final that is not being published."""
        seq = next(s for s in self.finals if s not in self._in_flight)
        dropped = self.finals.pop(seq)
        if dropped.row is not None:
            self._forget(dropped.row)
        self.sendable()  # forget it in this connection's send order too, which would otherwise grow
        self.dropped += 1
        self.dropped_in_outage += 1
        if self.dropped_in_outage == 1:
            logger.warning(
                "MQTT outbox full (%d finals) and broker %s unreachable: dropping the oldest final for each "
                "new one until it is back (counted in streamer_mqtt_finals_dropped_total); first dropped: %s. "
                "Raise mqtt.outbox_size to hold more",
                self.size, self._broker, dropped.topic,
            )  # fmt: skip

    def _forget(self, row: int) -> None:
        """Delete a journal row (acknowledged or dropped) with the next write."""
        if self.journal is not None:
            self.journal.forget(row)

    def is_kept(self, final: QueuedFinal) -> bool:
        """Whether ``final`` is still here (not acknowledged, not dropped)."""
        return final.seq in self.finals

    def reconnected(self) -> None:
        """A new connection starts again from the oldest unacknowledged final."""
        self._unsent = deque(self.finals.values())

    def sendable(self) -> bool:
        """Whether the next final of this connection may be published now (committed, not dropped)."""
        while self._unsent and self._unsent[0].seq not in self.finals:
            self._unsent.popleft()  # dropped
        return bool(self._unsent) and self._unsent[0].saved

    def take(self) -> QueuedFinal:
        """The next final to publish (after `sendable`), in flight until `published`."""
        final = self._unsent.popleft()
        self._in_flight.add(final.seq)
        return final

    def published(self, final: QueuedFinal, acknowledged: bool) -> bool:
        """The publish of ``final`` ended (``acknowledged`` or not); True when it left the outbox just now."""
        self._in_flight.discard(final.seq)
        if not acknowledged or self.finals.pop(final.seq, None) is None:
            return False
        if final.row is not None:
            self._forget(final.row)
        return True
