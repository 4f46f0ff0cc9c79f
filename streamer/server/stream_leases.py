"""Cluster-unique stream names: a lease per name in Redis, taken when a session starts, renewed while its stream
lives, released when it ends ([cluster], ``README.md`` "Scaling out").

Key ``<prefix>:stream:<name>``, value ``<node_id>/<run>`` (the replica and this start of it). A claim is
``SET key value NX PX ttl``: it succeeds only where nobody holds the name; a name this process holds already is
granted without asking the store (a second session of one replica on one name is the scheduler's
``stream_in_use``). Every ``ttl / 3`` one script renews every lease this process holds (and takes back one that
expired meanwhile, say while the store was away); a lease another replica took in the meantime is logged as lost.
Release is a compare-and-delete script: only a lease that is still ours goes. A replica killed without releasing
leaves its names leased until the ttl passes.

Store unreachable: a new claim raises :class:`LeaseStoreError` and the session is refused (``not_ready``) rather
than started without the guarantee; streams already running go on, their renewals retried every ``ttl / 3``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from streamer.errors import StreamerError

logger = logging.getLogger(__name__)

OP_TIMEOUT_S = 2.0  # one store operation, connecting included

# KEYS: the names' keys; ARGV[1]: our value, ARGV[2]: ttl in ms. Per key: 1 renewed, 2 taken back, 0 held by another.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2]); out[i] = 1
  elseif not holder then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2]); out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""
# KEYS[1]: the key; ARGV[1]: our value. Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseStoreError(StreamerError):
    """The lease store cannot be reached (or failed): no name can be claimed now."""


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a claim: ``granted`` (``new``: by this call; else this process held it already), or the
    ``holder`` (a node id) that has it."""

    granted: bool
    new: bool = False
    holder: str = ""


class StreamLeases:
    """The stream names this process leases; see the module docstring.

    Args:
        url: the store, ``redis://HOST:PORT/DB`` (or ``rediss://``, ``unix://``).
        node_id: this replica's name (it names the holder in refusals).
        run_id: this start of the daemon (a restarted replica does not take its old leases for its own).
        ttl_s: a lease's life unless renewed.
        prefix: first part of every key (the MQTT prefix: one cluster per bus).
        password: the store's password, if not in ``url``.
    """

    def __init__(
        self, url: str, node_id: str, run_id: str, ttl_s: float, prefix: str = "streamer", password: str | None = None
    ) -> None:
        self.url, self.node_id, self.ttl_s = url, node_id, ttl_s
        self.owner = f"{node_id}/{run_id}"
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._redis: Redis = Redis.from_url(
            url, password=password, socket_timeout=OP_TIMEOUT_S, socket_connect_timeout=OP_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1), decode_responses=True,
        )
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self.held: set[str] = set()  # names leased by this process
        self._releasing: set[asyncio.Task[None]] = set()
        self.store_up: bool | None = None  # the last operation reached the store; None: none yet

    def key(self, name: str) -> str:
        """The store's key for stream ``name``."""
        return f"{self._prefix}:stream:{name}"

    async def claim(self, name: str) -> Claim:
        """Lease ``name`` for this process, or say who holds it.

        Raises:
            LeaseStoreError: the store did not answer within ``OP_TIMEOUT_S`` (or failed).
        """
        if name in self.held:
            return Claim(True)
        key = self.key(name)
        for _ in range(2):  # a holder whose lease expired between SET and GET: try once more
            taken, holder = await self._call(f"claiming stream {name!r}", self._set_or_get(key))
            if taken:
                self.held.add(name)
                return Claim(True, new=True)
            if holder == self.owner:  # a claim of this process on the same name won meanwhile
                return Claim(True)
            if holder is not None:
                return Claim(False, holder=holder.rpartition("/")[0] or holder)
        return Claim(False, holder="(unknown)")

    async def _set_or_get(self, key: str) -> tuple[bool, str | None]:
        if await self._redis.set(key, self.owner, nx=True, px=self._ttl_ms):
            return True, self.owner
        return False, await self._redis.get(key)

    async def _call(self, what: str, operation: Any) -> Any:
        """Await one store operation under ``OP_TIMEOUT_S``; a failure becomes `LeaseStoreError`."""
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                result = await operation
        except (RedisError, OSError, TimeoutError) as exc:
            if self.store_up is not False:
                logger.warning("lease store %s unreachable (%s): new streams are refused until it is back",
                               self.url, exc or type(exc).__name__)
            self.store_up = False
            raise LeaseStoreError(f"the cluster's lease store {self.url} is unreachable ({type(exc).__name__}) "
                                  f"while {what}") from exc
        if self.store_up is False:
            logger.info("lease store %s reachable again", self.url)
        self.store_up = True
        return result

    def release(self, name: str) -> None:
        """``name``'s stream ended: stop renewing its lease and delete it in the store if it is still ours."""
        if name not in self.held:
            return
        self.held.discard(name)
        task = asyncio.get_running_loop().create_task(self._release_in_store(name), name=f"lease-release-{name}")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_in_store(self, name: str) -> None:
        try:
            await self._call(f"releasing stream {name!r}", self._release(keys=[self.key(name)], args=[self.owner]))
        except LeaseStoreError as exc:
            logger.warning("%s; the lease expires by itself within %g s", exc, self.ttl_s)

    async def renew_once(self) -> None:
        """Renew every lease held (one script call); log each one another replica took meanwhile.

        Raises:
            LeaseStoreError: the store is unreachable (the leases live on until their ttl passes).
        """
        names = sorted(self.held)
        if not names:
            return
        keys = [self.key(name) for name in names]
        results = await self._call("renewing leases", self._renew(keys=keys, args=[self.owner, self._ttl_ms]))
        for name, result in zip(names, results, strict=True):
            if int(result) == 2:
                logger.warning("stream %s: its lease had expired (the store was away longer than %g s); taken back",
                               name, self.ttl_s)
            elif int(result) == 0 and name in self.held:
                self.held.discard(name)
                logger.error("stream %s: its lease expired and another replica holds the name now; both may send "
                             "results for it until this stream ends", name)

    async def run(self) -> None:
        """Renew every ``ttl / 3`` until cancelled."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew_once()
            except LeaseStoreError as exc:
                logger.debug("%s", exc)

    async def close(self) -> None:
        """Release every lease (waiting at most ``OP_TIMEOUT_S`` more) and close the connection."""
        for name in list(self.held):
            self.release(name)
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=OP_TIMEOUT_S)
        await self._redis.aclose()
