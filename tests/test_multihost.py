"""Several hosts on one machine (issue 21 item 5): three replicas behind HAProxy, and faults.

Each part runs on its own host, a network namespace joined to the others by a bridge (tests/netns.py): redis-server
(the lease store), mosquitto (the results bus), HAProxy running the shipped deploy/haproxy/haproxy.cfg, three
``streamer serve`` replicas with [cluster] and [admission] (agent port, ``drain_timeout_s``), and the client
(tests/multihost_cluster.py). The client streams espeak-ng speech through HAProxy (tests/multihost_client.py);
what it saw at each fault is printed (``pytest -s``) and logged.

- (a) A viewer of the stream on each *other* replica gets every final, in order, once.
- (b) Drain: SIGTERM the replica holding a live session while audio flows. The session is not cut (every final,
  then ``end`` and close 1000), HAProxy sends new sessions to the other replicas meanwhile, and the replica exits 0
  once its session ended.
- (c) kill -9 of the replica holding a live session mid-utterance. What exists today: the client sees the
  connection drop (1006, no ``end``), reconnects through HAProxy, lands on another replica, whose answer to the
  resume is ``resume_failed`` (then ``stream_in_use`` until the dead replica's lease lapses), and a new session
  takes the audio not sent yet: the finals before the kill arrived once, the words of the utterance cut by the
  kill (sent to the dead replica, no final yet) would be lost without cross-replica resume. With
  ``cluster.resume_secret`` set on every replica (as this scenario runs), the same session resumes on another
  replica from the end of its last final, the client re-sends its audio from there, and every final arrives
  once, in order, numbering going on, with the cut words.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from streamer.protocol import Final
from streamer.training.evaluate import word_error_rate
from tests.multihost_client import LiveClient, Seen
from tests.multihost_cluster import DRAIN_TIMEOUT_S, LEASE_TTL_S, MODEL, REPLICAS, WAIT_S, Cluster, Replica
from tests.netns import Network, unavailable_reason
from tests.speech import espeak_sentences

logger = logging.getLogger(__name__)

SENTENCES = ("please turn off the lights in the kitchen", "set a timer for ten minutes",
             "what is the weather like tomorrow morning")
PAUSE_S = 1.5
RESUME_SECRET = "multihost-test-resume-secret-0123456789"
MAX_WER = 0.35

pytestmark = [
    pytest.mark.slow,
    pytest.mark.broker,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
    pytest.mark.skipif(any(shutil.which(p) is None for p in ("haproxy", "mosquitto", "redis-server")),
                       reason="needs haproxy, mosquitto and redis-server (setup.sh)"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """The hosts and their programs, for the whole module; every namespace and program is gone afterwards."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Network() as network:
        running = Cluster(network, tmp_path_factory.mktemp("multihost"))
        await running.start()
        yield running
        for log in sorted(running.folder.glob("asr*/serve*.log")):
            assert "Traceback" not in log.read_text(errors="replace"), f"{log}:\n{log.read_text()[-5000:]}"


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """The sentences, each followed by a pause, as s16le at espeak-ng's rate."""
    spoken = espeak_sentences(tmp_path_factory.mktemp("spoken"), SENTENCES, dtype="int16")
    rate = spoken[SENTENCES[0]][1]
    pause = np.zeros(round(PAUSE_S * rate), dtype=np.int16)
    return np.concatenate([part for text in SENTENCES for part in (spoken[text][0], pause)]).tobytes(), rate


def report(fault: str, lines: list[str]) -> None:
    """Print and log what the client saw (for the issue's note)."""
    text = "\n".join([f"== what the client saw: {fault}", *(f"   {line}" for line in lines)])
    print(text)
    logger.info(text)


def wer_of(finals: list[Final], sentences: tuple[str, ...]) -> tuple[float, str]:
    heard = " ".join(f.text for f in finals)
    wer, errors, words = word_error_rate([" ".join(sentences)], [heard])
    return wer, f"{errors}/{words} word errors: {heard!r}"


def start(stream: str, rate: int) -> str:
    return json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": stream})


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        return json.loads(await ws.recv())


class Viewer:
    """A ``/v1/captions`` subscriber that records every message in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.messages = ws, []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.messages.append(json.loads(message))
        except ConnectionClosed:
            pass

    def finals(self) -> list[tuple[int, str]]:
        return [(m["segment"], m["text"]) for m in self.messages if m["type"] == "final"]


async def test_a_viewer_on_another_replica_gets_every_final_in_order(
    cluster: Cluster, speech: tuple[bytes, int]
) -> None:
    pcm, rate = speech
    await cluster.restart_exited()
    viewers = {r.name: Viewer(await cluster.ws(r.url("/v1/captions?stream=hall"))) for r in cluster.replicas}
    async with await cluster.ws(f"{cluster.lb_url}/v1/listen") as client:
        await client.send(start("hall", rate))
        assert (await recv(client))["type"] == "ready"
        holder = await cluster.holder()
        for i in range(0, len(pcm), 8820):
            await client.send(pcm[i : i + 8820])
        await client.send(json.dumps({"type": "stop"}))
        messages = [await recv(client)]
        while messages[-1]["type"] != "end":
            messages.append(await recv(client))
    finals = [(m["segment"], m["text"]) for m in messages if m["type"] == "final"]
    heard = " ".join(text for _, text in finals)
    wer, errors, words = word_error_rate([" ".join(SENTENCES)], [heard])
    assert len(finals) >= len(SENTENCES) and wer <= MAX_WER, f"{errors}/{words} word errors: {finals}"
    others = [name for name in REPLICAS if name != holder.name]
    async with asyncio.timeout(WAIT_S):
        while any(viewers[name].finals() != finals for name in REPLICAS):
            for name in REPLICAS:
                assert len(viewers[name].finals()) <= len(finals), (name, viewers[name].finals(), finals)  # once
            await asyncio.sleep(0.05)
    for name in others:
        segments = [m["segment"] for m in viewers[name].messages if m["type"] in ("partial", "final")]
        assert segments == sorted(segments), (name, segments)  # in order, partials included
    for viewer in viewers.values():
        await viewer.ws.close()
        await viewer.task
    report("(a) through HAProxy, viewers on every replica", [
        f"session on {holder.name}; client finals: {finals}",
        *(f"viewer on {name}: the same {len(viewers[name].finals())} finals, in order" for name in others)])


async def test_b_drain_does_not_cut_the_session_and_new_ones_go_elsewhere(
    cluster: Cluster, speech: tuple[bytes, int]
) -> None:
    """SIGTERM after the first final; the client saw nothing of it: one connection, finals #0, #1, #2 (reason
    silence), ``end`` with all of its audio, close 1000. Two sessions opened through HAProxy meanwhile went to the
    other two replicas. (With cross-replica resume and a ``cluster.resume_secret``, a drain moves the session
    instead: ``moved``, close 1012, a resume elsewhere; this test is about [admission]'s drain without a secret.)
    """
    pcm, rate = speech
    await cluster.restart_exited()
    client = LiveClient(cluster, pcm, rate, "drain", is_stop_held=True)
    running = asyncio.create_task(client.run())
    try:
        await client.wait_until(lambda c: bool(c.seen and c.seen[0].ready))
        holder = await cluster.holder()
        client.seen[0].replica = holder.name
        await client.wait_until(lambda c: len(c.finals) >= 1)  # mid-stream: the first sentence is recognized
        at_signal_s = client.session.sent / rate
        cluster.kill(holder, signal.SIGTERM)
        await holder.wait_for_log(f"draining: waiting up to {DRAIN_TIMEOUT_S:g} s for 1 session(s) to end")
        await cluster.wait_states({name: name != holder.name for name in REPLICAS})
        landed = [await open_and_close_one(cluster, f"during-drain-{i}", rate, holder) for i in range(2)]
        client.release()
        async with asyncio.timeout(WAIT_S):
            await running
    finally:
        running.cancel()
    seen = client.seen[0]
    report("(b) SIGTERM (drain) of the replica holding the session", [
        f"SIGTERM at {at_signal_s:.2f} s of the client's audio; new sessions meanwhile went to {landed}",
        *(s.summary() for s in client.seen)])
    assert len(client.seen) == 1, "the connection was cut"
    assert seen.end is not None and seen.close_code == 1000 and not seen.errors, seen.summary()
    assert abs((seen.end.audio_s or 0.0) - client.session.session_audio_s) <= 0.002  # every sample arrived
    assert [f.segment for f in seen.finals] == list(range(len(seen.finals)))
    wer, said = wer_of(seen.finals, SENTENCES)
    assert wer <= MAX_WER, said
    assert await holder.wait_exit() == 0  # its last session ended: the drain is over


async def open_and_close_one(cluster: Cluster, stream: str, rate: int, draining: Replica) -> str:
    """A session through HAProxy while ``draining`` drains: where it landed (never there)."""
    async with await cluster.ws(f"{cluster.lb_url}/v1/listen") as ws:
        await ws.send(start(stream, rate))
        assert (await recv(ws))["type"] == "ready"
        by_replica = await cluster.sessions_by_replica()
        assert by_replica[draining.name] == 1, by_replica  # only the draining session there
        landed = [name for name, count in by_replica.items() if count and name != draining.name]
        assert len(landed) == 1, by_replica
    async with asyncio.timeout(WAIT_S):
        while sum((await cluster.sessions_by_replica()).values()) > 1:
            await asyncio.sleep(0.05)
    return landed[0]


@dataclass
class Killed:
    """What happened around the kill -9: the client's record and where its connections went."""

    client: LiveClient
    killed: str
    at_kill_s: float  # the client's audio sent when the replica died
    partial_at_kill: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kill9(cluster: Cluster, speech: tuple[bytes, int]) -> Killed:
    """Scenario (c), run once for both tests below: kill -9 the holder while the second sentence is being said.

    What the client saw (a 2-core machine, main without cross-replica resume): the kill at 4.5 s of its audio, the
    holder's partial then ``'set a tim'``; on that connection the final ``#0 'please turn off the lights in the
    kitchen'``, then close 1006 without ``end``. Its reconnection through HAProxy reached another replica, which
    answered the ``start`` with resume 8 times with ``stream_in_use`` (the dead replica's lease, ttl 2 s), then
    ``resume_failed`` (no such session) and a new session's ``ready``, 1.5-2.2 s after the kill; the audio not sent
    yet (from 4.6 s) went there: finals ``#0 'ten minutes'``, ``#1 'what is the weather like ...'``, ``end``, close
    1000. Lost: "set a timer for", sent to the dead replica after its last final. With the wt-failover branch and a
    ``cluster.resume_secret``, the same client resumed the session on another replica (``resumed: true``,
    ``audio_s`` 2.0, the end of its last final), re-sent its audio from there and got ``#1 'set a timer for ten
    minutes'``, ``#2 ...``: every final once, in order, no word lost.
    """
    pcm, rate = speech
    await with_resume_secret(cluster)
    client = LiveClient(cluster, pcm, rate, "porch")
    running = asyncio.create_task(client.run())
    try:
        await client.wait_until(lambda c: bool(c.seen and c.seen[0].ready))
        holder = await cluster.holder()
        client.seen[0].replica = holder.name
        await client.wait_until(lambda c: any(p.segment >= 1 and p.text for p in c.seen[0].partials))
        at_kill_s, partial = client.session.sent / rate, client.seen[0].partials[-1].text
        killed_at = asyncio.get_running_loop().time()
        cluster.kill(holder, signal.SIGKILL)
        await holder.wait_exit()
        await client.wait_until(lambda c: any(s.ready for s in c.seen[1:]))
        landed = await cluster.holder()
        next(s for s in client.seen[1:] if s.ready).replica = landed.name
        async with asyncio.timeout(len(pcm) / 2 / rate + WAIT_S):
            await running
    finally:
        running.cancel()
    lost = missing_words(SENTENCES[1], client.finals)
    back_at = next(s.ready_at_s for s in client.seen[1:] if s.ready_at_s is not None)
    report("(c) kill -9 of the replica holding the session, mid-utterance", [
        f"killed {holder.name} at {at_kill_s:.2f} s of the client's audio, its partial then: {partial!r}",
        *(s.summary() for s in client.seen),
        f"a session again {back_at - killed_at:.1f} s after the kill (lease ttl {LEASE_TTL_S:g} s)",
        f"words of the cut utterance {SENTENCES[1]!r} in no final: {lost}"])
    return Killed(client, holder.name, at_kill_s, partial)


async def test_c_kill9_client_reconnects_through_haproxy_to_another_replica(kill9: Killed) -> None:
    first, later = kill9.client.seen[0], [s for s in kill9.client.seen[1:] if s.ready]
    assert first.end is None and first.close_code != 1000, first.summary()  # dropped, not ended
    assert [f.segment for f in first.finals] == [0], first.summary()  # the first sentence's final, once
    wer, said = wer_of(first.finals, SENTENCES[:1])
    assert wer <= MAX_WER, said
    assert len(later) == 1 and later[0].replica not in ("?", kill9.killed), summaries(kill9.client.seen)
    last = kill9.client.seen[-1]
    assert last is later[0] and last.end is not None and last.close_code == 1000, last.summary()
    segments = [f.segment for f in last.finals]
    assert segments == sorted(set(segments)), segments  # in order, each once
    missing = missing_words(SENTENCES[2], last.finals)  # the speech after the reconnection is recognized
    assert len(missing) <= len(SENTENCES[2].split()) // 2, (missing, last.summary())


async def test_c_kill9_finals_arrive_exactly_once_in_order_with_the_words(kill9: Killed) -> None:
    later = [s for s in kill9.client.seen[1:] if s.ready]
    assert later and all(s.ready and s.ready.resumed for s in later), summaries(kill9.client.seen)
    sessions = {s.ready.session for s in kill9.client.seen if s.ready}
    assert len(sessions) == 1, sessions  # the same session goes on
    segments = [f.segment for f in kill9.client.finals]
    assert segments == list(range(len(segments))), segments  # numbering goes on: none lost, none twice
    wer, said = wer_of(kill9.client.finals, SENTENCES)  # the words cut by the kill are there
    assert wer <= MAX_WER, said


async def with_resume_secret(cluster: Cluster) -> None:
    """Every replica with the same ``cluster.resume_secret`` (cross-replica resume, drains that move sessions):
    restarted once (an idle replica's SIGTERM only waits for sessions that are not there)."""
    if cluster.replica_env.get("STREAMER_CLUSTER__RESUME_SECRET") == RESUME_SECRET:
        await cluster.restart_exited()
        return
    cluster.replica_env["STREAMER_CLUSTER__RESUME_SECRET"] = RESUME_SECRET
    for replica in cluster.replicas:
        if replica.is_running:
            cluster.kill(replica, signal.SIGTERM)
            await replica.wait_exit()
    await cluster.restart_exited()


async def test_d_drain_with_a_resume_secret_moves_the_session(cluster: Cluster, speech: tuple[bytes, int]) -> None:
    """SIGTERM of the replica holding a live session, every replica sharing a resume secret: the session is moved,
    not waited for. The client gets the open segment's final, ``moved`` and close 1012, resumes through HAProxy on
    another replica, and every final arrives once, in order, with the words; the drained replica exits 0."""
    pcm, rate = speech
    await with_resume_secret(cluster)
    client = LiveClient(cluster, pcm, rate, "hall")
    running = asyncio.create_task(client.run())
    try:
        await client.wait_until(lambda c: bool(c.seen and c.seen[0].ready))
        holder = await cluster.holder()
        client.seen[0].replica = holder.name
        await client.wait_until(lambda c: any(p.segment >= 1 and p.text for p in c.seen[0].partials))
        at_signal_s = client.session.sent / rate
        cluster.kill(holder, signal.SIGTERM)
        await client.wait_until(lambda c: any(s.ready for s in c.seen[1:]))
        exit_code = await holder.wait_exit()  # its session moved: the drain is over
        landed = await cluster.holder()
        next(s for s in client.seen[1:] if s.ready).replica = landed.name
        async with asyncio.timeout(len(pcm) / 2 / rate + WAIT_S):
            await running
    finally:
        running.cancel()
    report("(d) SIGTERM (drain) with a resume secret: the session moves", [
        f"SIGTERM to {holder.name} at {at_signal_s:.2f} s of the client's audio", *summaries(client.seen)])
    first, later = client.seen[0], [s for s in client.seen[1:] if s.ready]
    assert first.close_code == 1012, first.summary()
    assert later and all(s.ready.resumed for s in later) and later[0].replica != holder.name, summaries(client.seen)
    segments = [f.segment for f in client.finals]
    assert segments == list(range(len(segments))), segments  # none lost, none twice
    wer, said = wer_of(client.finals, SENTENCES)
    assert wer <= MAX_WER, said
    assert client.seen[-1].end is not None and client.seen[-1].close_code == 1000
    assert exit_code == 0


def summaries(seen: list[Seen]) -> list[str]:
    return [s.summary() for s in seen]


def missing_words(sentence: str, finals: list[Final]) -> list[str]:
    """The words of ``sentence`` in none of ``finals``."""
    heard = " ".join(f.text for f in finals).split()
    return [word for word in sentence.split() if word not in heard]
