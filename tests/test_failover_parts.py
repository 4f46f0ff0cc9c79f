"""The parts of cross-replica resume, each on its own: signed resume tokens (tampered, expired, another cluster's),
the session facts in a real redis-server (written in order, read back, one take-over wins, expiry, deletion), the
``moved`` message on the wire, and the settings' secret."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from streamer.errors import ConfigError
from streamer.protocol import Final, Moved, WordTiming, parse_server_message
from streamer.server.session_facts import Facts, SessionFacts
from streamer.session.events import StartOptions
from streamer.session.resume_token import ResumeTokenError, TokenSigner, is_signed
from streamer.settings import ClusterSettings
from tests.fixtures_redis import RedisServer

SECRET = b"0123456789abcdef-test-secret"


def final(segment: int, text: str) -> Final:
    return Final("kitchen", segment, text, segment * 2.0, segment * 2.0 + 1.0,
                 (WordTiming(text, segment * 2.0, segment * 2.0 + 1.0, 0.9),), (5, 6), 0.9, False, "silence")


# ------------------------------------------------------------------ tokens


def test_a_token_verifies_on_any_signer_with_the_secret_and_says_what_it_carries() -> None:
    token, nonce = TokenSigner(SECRET, 600).issue("abc123", "kitchen.1", "node-a", now_s=1000.0)
    assert is_signed(token) and len(token) <= 256  # protocol.MAX_ID_CHARS
    claims = TokenSigner(SECRET, 600).verify(token, now_s=1500.0)
    assert (claims.session, claims.stream, claims.node, claims.expires_s, claims.nonce) == \
        ("abc123", "kitchen.1", "node-a", 1600, nonce)
    assert TokenSigner(SECRET, 600).issue("abc123", "kitchen.1", "node-a")[1] != nonce  # a fresh nonce each time


@pytest.mark.parametrize("field", [1, 2, 3, 4, 5, 6])
def test_a_tampered_token_is_refused(field: int) -> None:
    token, _ = TokenSigner(SECRET, 600).issue("abc123", "kitchen", "node-a")
    parts = token.split("~")
    parts[field] = parts[field][:-1] + ("x" if parts[field][-1] != "x" else "y")
    with pytest.raises(ResumeTokenError, match="signature does not verify|malformed"):
        TokenSigner(SECRET, 600).verify("~".join(parts))


def test_an_expired_token_another_clusters_token_and_garbage_are_refused_clearly() -> None:
    token, _ = TokenSigner(SECRET, 60).issue("abc123", "kitchen", "node-a", now_s=time.time() - 120)
    with pytest.raises(ResumeTokenError, match="expired 6\\d s ago"):
        TokenSigner(SECRET, 60).verify(token)
    other, _ = TokenSigner(b"another-cluster-secret!!", 60).issue("abc123", "kitchen", "node-a")
    with pytest.raises(ResumeTokenError, match="another cluster.resume_secret"):
        TokenSigner(SECRET, 60).verify(other)
    for garbage in ("", "c1~a~b", "c1~a~b~c~d~e~f~g", "plain-random-token"):
        with pytest.raises(ResumeTokenError, match="malformed"):
            TokenSigner(SECRET, 60).verify(garbage)
    with pytest.raises(ValueError, match="16 bytes"):
        TokenSigner(b"short", 60)


def test_the_secret_comes_from_the_settings_or_its_file(tmp_path: Path) -> None:
    assert ClusterSettings().resume_secret_bytes() is None
    assert ClusterSettings(resume_secret="s" * 20).resume_secret_bytes() == b"s" * 20  # type: ignore[arg-type]
    (tmp_path / "secret").write_text("t" * 32 + "\nignored\n")
    assert ClusterSettings(resume_secret_file=str(tmp_path / "secret")).resume_secret_bytes() == b"t" * 32
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        ClusterSettings(resume_secret="short").resume_secret_bytes()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot read"):
        ClusterSettings(resume_secret_file=str(tmp_path / "missing")).resume_secret_bytes()


# ------------------------------------------------------------------ the wire


def test_moved_goes_over_the_wire_and_back() -> None:
    moved = Moved("abc123", "kitchen", "c1~token", 3.25, 2)
    assert parse_server_message(moved.to_json()) == moved


# ------------------------------------------------------------------ facts in a real redis-server


async def test_facts_are_written_in_order_read_back_and_taken_over_once(redis_server: RedisServer) -> None:
    facts = SessionFacts(redis_server.url, ttl_s=30.0, max_finals=2, prefix="t")
    writer = asyncio.create_task(facts.run())
    try:
        options = StartOptions(22050, "pcm_s16le", stream="kitchen", live=True, endpointing={"max_segment_s": 5.0},
                               hotwords=("lights",))
        facts.put("s1", Facts("kitchen", "node-a", "n1", options, 0, 0).to_fields())
        for segment in range(3):
            facts.put("s1", {"next_segment": str(segment + 1), "audio_frames": str(1000 * (segment + 1))},
                      final(segment, f"words {segment}"))
        assert await facts.flush(10.0)
        got = await facts.get("s1")
        assert got is not None
        stored, finals = got
        assert stored == Facts("kitchen", "node-a", "n1", options, 3, 3000)
        assert [f.segment for f in finals] == [1, 2] and finals[1] == final(2, "words 2")  # the last max_finals
        assert await facts.get("nobody") is None
        assert not await facts.take_over("s1", "wrong", "n2", "node-b")
        results = await asyncio.gather(*(facts.take_over("s1", "n1", f"n-{i}", f"node-{i}") for i in range(5)))
        assert sorted(results) == [False] * 4 + [True]  # one resume wins
        got = await facts.get("s1")
        assert got is not None and got[0].node == f"node-{results.index(True)}"
        facts.forget("s1")
        assert await facts.flush(10.0)
        assert await facts.get("s1") is None
    finally:
        writer.cancel()
        await facts.close()


async def test_facts_expire_unless_refreshed(redis_server: RedisServer) -> None:
    facts = SessionFacts(redis_server.url, ttl_s=1.0, max_finals=5, prefix="t")
    writer = asyncio.create_task(facts.run())
    store = Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        options = StartOptions(16000, "pcm_s16le")
        for session in ("kept", "gone"):
            facts.put(session, Facts("x", "node-a", "n", options, 1, 5).to_fields(), final(0, "hi"))
        assert await facts.flush(10.0)
        assert 0 < await store.pttl("t:session:gone") <= 1000 and 0 < await store.pttl("t:session:gone:finals")
        async with asyncio.timeout(30):
            while await store.exists("t:session:gone"):
                facts.refresh(["kept"])
                await asyncio.sleep(0.2)
        assert await facts.get("kept") is not None
    finally:
        writer.cancel()
        await facts.close()
        await store.aclose()


async def test_an_unreachable_store_is_said_and_loses_no_order(tmp_path: Path) -> None:
    from streamer.server.stream_leases import LeaseStoreError
    from tests.fixtures_realpeers import free_port

    facts = SessionFacts(f"redis://127.0.0.1:{free_port()}/0", ttl_s=10.0, max_finals=5)
    writer = asyncio.create_task(facts.run())
    try:
        facts.put("s1", {"next_segment": "1"})
        assert await facts.flush(30.0)  # the failed write is logged, the queue goes on
        with pytest.raises(LeaseStoreError, match="unreachable"):
            await facts.get("s1")
    finally:
        writer.cancel()
        await facts.close()


def test_malformed_facts_are_refused() -> None:
    with pytest.raises(ValueError, match="malformed"):
        Facts.from_fields({"stream": "x", "node": "a", "nonce": "n", "options": "{", "next_segment": "1",
                           "audio_frames": "0"})
    with pytest.raises(ValueError, match="malformed"):
        Facts.from_fields({"stream": "x"})


# ------------------------------------------------------------------ the settings, the result log


def test_failover_needs_a_secret_and_a_resume_window() -> None:
    from streamer.server.cluster import make_failover
    from streamer.server.stream_leases import StreamLeases
    from streamer.settings import Settings

    leases = StreamLeases("redis://127.0.0.1:1/0", "node-a", "run", 10.0)
    assert make_failover(Settings(), leases) is None  # no secret: resume stays on its own replica
    with_secret = {"cluster": {"enabled": True, "resume_secret": "s" * 20}}
    failover = make_failover(Settings(**with_secret), leases)  # type: ignore[arg-type]
    assert failover is not None and failover.node == "node-a" and failover.lease_wait_s == 11.0
    assert failover.facts.ttl_s == 20.0  # the resume window plus the lease ttl
    with pytest.raises(ConfigError, match="resume_window_s above 0"):
        make_failover(Settings(server={"resume_window_s": 0}, **with_secret), leases)  # type: ignore[arg-type]


def test_a_continued_log_replays_what_the_client_lacks_and_withholds_what_it_has() -> None:
    from streamer.session.results import ResultLog

    class Sink:
        def __init__(self) -> None:
            self.got: list[tuple[object, bool]] = []

        def offer(self, event: object, replay: bool = False) -> None:
            self.got.append((event, replay))

    behind, sink = ResultLog(10), Sink()  # the store kept finals 0 and 1; the client has only final 0
    behind.preload([final(0, "zero"), final(1, "one")], skip_below=1)
    assert behind.attach(sink, 1) == 1 and sink.got == [(final(1, "one"), True)]
    behind.offer(final(2, "two"))
    assert sink.got[1:] == [(final(2, "two"), False)]

    ahead, sink = ResultLog(10), Sink()  # the old replica sent final 2 but died before storing it
    ahead.preload([final(0, "zero"), final(1, "one")], skip_below=3)
    assert ahead.attach(sink, 3) == 0 and sink.got == []
    ahead.offer(final(2, "two again"))  # recognized again here: the client has it already
    ahead.offer(final(3, "three"))
    assert sink.got == [(final(3, "three"), False)]
