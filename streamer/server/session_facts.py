"""What a resume on another replica needs of a session, kept in the cluster's Redis store ([cluster] with
``resume_secret``; ``README.md`` "Scaling out", "Sessions that survive a replica").

Per session two keys: ``<prefix>:session:<id>``, a hash of :class:`Facts` (stream, node, the nonce of its latest
resume token, its start options, the number of its next final and where its last final ended in the client's
audio), and ``<prefix>:session:<id>:finals``, a list of its last finals (JSON), which a resume replays to a client
that lacks some. Both expire ``ttl_s`` after the last write or refresh: the replica that runs
the session refreshes them every ``ttl_s / 3``; when it dies they outlive it by ``ttl_s`` (the resume window plus
the lease ttl, so a resume may wait for the dead replica's stream lease to lapse).

Writes (:meth:`SessionFacts.put`, :meth:`~SessionFacts.forget`, :meth:`~SessionFacts.refresh`) never block the
caller: they queue, and one task (:meth:`SessionFacts.run`) sends them in order, each under ``OP_TIMEOUT_S``. A
failure is logged; the session goes on (a resume elsewhere then finds stale facts or none, and says so).
:meth:`SessionFacts.flush` waits for the queue (a draining replica before it tells clients to move).

Hand-over requests travel on Redis pub/sub, channel ``<prefix>:handover:<node>``: a replica that is to resume a
session which another live replica holds (its client's connection broke and the balancer chose another replica)
asks that replica to let it go (:meth:`SessionFacts.request_handover`, :meth:`SessionFacts.handover_requests`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamer.protocol import Final, MessageError, parse_server_message
from streamer.server.stream_leases import OP_TIMEOUT_S, LeaseStoreError
from streamer.session.events import StartOptions

logger = logging.getLogger(__name__)

# KEYS[1]: the facts hash; ARGV: the nonce expected, the new nonce, the new node. 1: taken over; 0: not.
_TAKE_OVER = """
if redis.call('HGET', KEYS[1], 'nonce') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'nonce', ARGV[2], 'node', ARGV[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class Facts:
    """One session's facts in the store.

    Attributes:
        stream: its stream name.
        node: the replica that runs (or ran) it.
        nonce: the nonce of its latest resume token (an older token is spent).
        options: its start options.
        next_segment: the number of its next final (finals before it were offered to the client).
        audio_frames: client sample frames up to the end of its last final: where a resume re-sends from.
    """

    stream: str
    node: str
    nonce: str
    options: StartOptions
    next_segment: int
    audio_frames: int

    def to_fields(self) -> dict[str, str]:
        """The hash's fields."""
        options = asdict(self.options)
        options["hotwords"] = list(options["hotwords"])
        return {"stream": self.stream, "node": self.node, "nonce": self.nonce, "options": json.dumps(options),
                "next_segment": str(self.next_segment), "audio_frames": str(self.audio_frames)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Facts:
        """Read the hash back.

        Raises:
            ValueError: a field is missing or malformed (a store written by something else).
        """
        try:
            options = json.loads(fields["options"])
            options["hotwords"] = tuple(options.get("hotwords") or ())
            return cls(fields["stream"], fields["node"], fields["nonce"], StartOptions(**options),
                       int(fields["next_segment"]), int(fields["audio_frames"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed session facts ({exc!r})") from exc


Operation = Callable[[], Awaitable[Any]]


class SessionFacts:
    """The sessions' facts in Redis; see the module docstring.

    Args:
        url: the store (``cluster.store_url``).
        ttl_s: how long facts live after their last write or refresh.
        max_finals: most finals kept per session.
        prefix: first part of every key (the MQTT prefix, like the stream leases').
        password: the store's password, if not in ``url``.
    """

    def __init__(self, url: str, ttl_s: float, max_finals: int, prefix: str = "streamer",
                 password: str | None = None) -> None:
        self.url, self.ttl_s, self._prefix, self._password = url, ttl_s, prefix, password
        self._ttl_ms, self._max_finals = max(1, round(ttl_s * 1000)), max(1, max_finals)
        self._redis: Redis = Redis.from_url(url, password=password, socket_timeout=OP_TIMEOUT_S,
                                            socket_connect_timeout=OP_TIMEOUT_S, decode_responses=True)
        self._take_over = self._redis.register_script(_TAKE_OVER)
        self._queue: asyncio.Queue[tuple[str, Operation]] = asyncio.Queue()

    def key(self, session: str) -> str:
        """The facts hash of ``session``."""
        return f"{self._prefix}:session:{session}"

    def _finals_key(self, session: str) -> str:
        return f"{self._prefix}:session:{session}:finals"

    # ------------------------------------------------------------------ queued writes

    def put(self, session: str, fields: Mapping[str, str], final: Final | None = None) -> None:
        """Set some of ``session``'s facts (and keep ``final``), renewing their expiry; queued."""
        key, finals_key, ttl_ms, keep = self.key(session), self._finals_key(session), self._ttl_ms, self._max_finals

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=dict(fields)).pexpire(key, ttl_ms)
                if final is not None:
                    pipe.rpush(finals_key, final.to_json()).ltrim(finals_key, -keep, -1).pexpire(finals_key, ttl_ms)
                await pipe.execute()

        self._queue.put_nowait((f"writing session {session}'s facts", write))

    def refresh(self, sessions: Sequence[str]) -> None:
        """Renew the expiry of these sessions' facts (they still run here); queued."""
        if not sessions:
            return
        ttl_ms = self._ttl_ms

        async def renew() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session in sessions:
                    pipe.pexpire(self.key(session), ttl_ms).pexpire(self._finals_key(session), ttl_ms)
                await pipe.execute()

        self._queue.put_nowait(("renewing sessions' facts", renew))

    def forget(self, session: str) -> None:
        """``session`` is over: delete its facts (a later resume is told it ended); queued."""
        keys = (self.key(session), self._finals_key(session))
        self._queue.put_nowait((f"deleting session {session}'s facts", lambda: self._redis.delete(*keys)))

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write was sent (or failed); False when ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Send the queued writes, in order, until cancelled."""
        while True:
            what, operation = await self._queue.get()
            try:
                await self._call(what, operation())
            except LeaseStoreError as exc:
                logger.warning("%s; a resume of that session on another replica may fail", exc)
            finally:
                self._queue.task_done()

    # ------------------------------------------------------------------ reads and the take-over

    async def get(self, session: str) -> tuple[Facts, list[Final]] | None:
        """``session``'s facts and kept finals, or None when the store has none (it ended, or expired).

        Raises:
            LeaseStoreError: the store is unreachable.
            ValueError: the facts are malformed.
        """
        async def read() -> tuple[dict[str, str], list[str]]:
            async with self._redis.pipeline(transaction=True) as pipe:
                fields, finals = await pipe.hgetall(self.key(session)).lrange(self._finals_key(session), 0, -1) \
                    .execute()
            return fields, finals

        fields, raw_finals = await self._call(f"reading session {session}'s facts", read())
        if not fields:
            return None
        finals = []
        for raw in raw_finals:
            try:
                msg = parse_server_message(raw)
            except MessageError as exc:
                raise ValueError(f"a kept final of session {session} is malformed ({exc})") from exc
            if isinstance(msg, Final):
                finals.append(msg)
        return Facts.from_fields(fields), finals

    async def take_over(self, session: str, nonce: str, new_nonce: str, node: str) -> bool:
        """Make ``node`` the session's replica if its latest token's nonce is still ``nonce`` (one resume wins).

        Raises:
            LeaseStoreError: the store is unreachable.
        """
        done = await self._call(f"taking session {session} over",
                                self._take_over(keys=[self.key(session)], args=[nonce, new_nonce, node]))
        return int(done) == 1

    # ------------------------------------------------------------------ hand-over requests

    def _handover_channel(self, node: str) -> str:
        return f"{self._prefix}:handover:{node}"

    async def request_handover(self, node: str, session: str, nonce: str) -> None:
        """Ask replica ``node`` to let ``session`` go (``nonce``: of the session's latest token, which the asker
        verified).

        Raises:
            LeaseStoreError: the store is unreachable.
        """
        await self._call(f"asking {node} to hand session {session} over",
                         self._redis.publish(self._handover_channel(node), f"{session} {nonce}"))

    async def handover_requests(self, node: str) -> AsyncIterator[tuple[str, str]]:
        """The hand-over requests sent to ``node``, as ``(session, nonce)``, until the connection fails.

        Raises:
            RedisError, OSError: the store went away (the caller subscribes again).
        """
        listener: Redis = Redis.from_url(self.url, password=self._password, socket_connect_timeout=OP_TIMEOUT_S,
                                         health_check_interval=30, decode_responses=True)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._handover_channel(node))
            async for message in pubsub.listen():
                session, _, nonce = str(message.get("data", "")).partition(" ")
                if session and nonce:
                    yield session, nonce
        finally:
            await pubsub.aclose()
            await listener.aclose()

    async def _call(self, what: str, operation: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            raise LeaseStoreError(f"the cluster's store {self.url} is unreachable ({type(exc).__name__}) while "
                                  f"{what}") from exc

    async def close(self) -> None:
        """Send what is queued (at most ``OP_TIMEOUT_S`` more) and close the connection."""
        await self.flush(OP_TIMEOUT_S)
        await self._redis.aclose()
