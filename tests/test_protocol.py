"""Wire protocol v1: parsing client messages, serializing server messages, and every parse error."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from streamer.client import RESUME_BUFFER_S, ClientSession, SentAudio
from streamer.errors import ProtocolError
from streamer.protocol import (
    ENDPOINT_KEYS,
    End,
    Error,
    Final,
    Finalize,
    KeepAlive,
    MessageError,
    Partial,
    Ready,
    Resume,
    Start,
    Stop,
    Warning,
    WordTiming,
    parse_client_message,
    parse_server_message,
    to_dict,
)


def test_start_with_defaults() -> None:
    """Only type, sample_rate and encoding are required; the rest has documented defaults."""
    msg = parse_client_message('{"type":"start","sample_rate":48000,"encoding":"pcm_s16le"}')
    assert msg == Start(48000, "pcm_s16le")
    assert msg.channels == 1 and msg.stream is None and msg.interim_results and msg.endpointing == {}
    assert msg.frame_bytes == 2


def test_start_with_everything_round_trips() -> None:
    """A full start message parses to the same object its to_json gives back."""
    start = Start(44100, "pcm_f32le", 2, "kitchen", False, {"max_segment_s": 7.5})
    assert parse_client_message(start.to_json()) == start
    assert start.frame_bytes == 8


def test_start_with_resume_round_trips_and_checks_its_fields() -> None:
    """A resuming start carries session, token and next_segment; a malformed resume is refused, naming the field."""
    start = Start(48000, "pcm_s16le", resume=Resume("abc123", "t0k", 3))
    assert json.loads(start.to_json())["resume"] == {"session": "abc123", "token": "t0k", "next_segment": 3}
    assert parse_client_message(start.to_json()) == start
    assert "resume" not in json.loads(Start(48000, "pcm_s16le").to_json())  # an old client's start is unchanged
    base = '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "resume": '
    for resume, fragment in (("1", "'resume' must be an object"), ('{"session": "a"}', "'resume' needs 'token'"),
                             ('{"session": "a", "token": "b", "next_segment": -1}', "must be an integer >= 0"),
                             ('{"session": "a", "token": "b", "seq": 1}', "unknown field 'seq' in 'resume'")):
        with pytest.raises(MessageError) as info:
            parse_client_message(base + resume + "}")
        assert info.value.code == "bad_message" and fragment in str(info.value)
    ready = Ready("s", "k", "m", (70, 1), 16000, 0.16, {}, resume_token="t", resume_window_s=10.0, resumed=True,
                  audio_s=1.5)
    assert parse_server_message(ready.to_json()) == ready
    assert "resume_token" not in json.loads(Ready("s", "k", "m", (70, 1), 16000, 0.16, {}).to_json())


def test_start_with_hotwords_round_trips_tidied_and_ready_reports_them() -> None:
    """Hotwords parse to a tuple with whitespace tidied and repeats dropped (case kept); the weight is a float. A
    ready carries them back only when the session has some, so a session without them gets the ready it always did."""
    msg = parse_client_message('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": '
                               '["  Kitchen   lights ", "Lysander", "Kitchen lights"], "hotword_weight": 2}')
    assert isinstance(msg, Start) and msg.hotwords == ("Kitchen lights", "Lysander") and msg.hotword_weight == 2.0
    assert parse_client_message(msg.to_json()) == msg
    assert "hotwords" not in json.loads(Start(16000, "pcm_s16le").to_json())  # an older server takes it
    ready = Ready("s", "k", "m", (70, 1), 16000, 0.16, {}, hotwords=("Lysander",), hotword_weight=1.0)
    assert json.loads(ready.to_json())["hotwords"] == ["Lysander"]
    assert parse_server_message(ready.to_json()) == ready
    plain = json.loads(Ready("s", "k", "m", (70, 1), 16000, 0.16, {}).to_json())
    assert not {"hotwords", "hotword_weight"} & set(plain)


@pytest.mark.parametrize("cls", [Finalize, Stop, KeepAlive])
def test_control_messages_round_trip(cls: type) -> None:
    """finalize, stop and keepalive are bare {"type": ...} objects."""
    msg = cls()
    assert json.loads(msg.to_json()) == {"type": cls.type}
    assert parse_client_message(msg.to_json()) == msg


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("{not json", "bad_json", "not valid JSON"),
        (b"\xff\xfe", "bad_json", "not valid JSON"),
        ("[1, 2]", "bad_message", "JSON object"),
        ('{"sample_rate": 16000}', "bad_message", "no 'type'"),
        ('{"type": "hello"}', "bad_message", "unknown message type 'hello'"),
        ('{"type": "stop", "now": true}', "bad_message", "unknown field 'now'"),
        ('{"type": "start", "encoding": "pcm_s16le"}', "bad_message", "needs 'sample_rate'"),
        ('{"type": "start", "sample_rate": 16000}', "bad_message", "needs 'encoding'"),
        ('{"type": "start", "sample_rate": "16000", "encoding": "pcm_s16le"}', "bad_message", "must be an integer"),
        ('{"type": "start", "sample_rate": 16000.0, "encoding": "pcm_s16le"}', "bad_message", "must be an integer"),
        ('{"type": "start", "sample_rate": true, "encoding": "pcm_s16le"}', "bad_message", "must be an integer"),
        ('{"type": "start", "sample_rate": 4000, "encoding": "pcm_s16le"}', "unsupported_audio", "8000-48000"),
        ('{"type": "start", "sample_rate": 96000, "encoding": "pcm_s16le"}', "unsupported_audio", "out of range"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "opus"}', "unsupported_audio", "pcm_s16le, pcm_f32le"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 0}', "unsupported_audio",
         "channels must be 1-8"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 9}', "unsupported_audio",
         "channels must be 1-8"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "stream": "a/b"}', "bad_message",
         "stream name 'a/b' is invalid"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "stream": ""}', "bad_message",
         "is invalid"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "stream": 7}', "bad_message",
         "'stream' must be a string, got 7"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "interim_results": 1}', "bad_message",
         "true or false"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "version": 2}', "bad_message",
         "version 2 is not supported"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "rate": 1}', "bad_message",
         "unknown field 'rate'"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": 1}', "bad_message",
         "must be an object"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"rule1": 1}}',
         "bad_message", "unknown endpointing rule 'rule1'"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"max_segment_s": 0}}',
         "bad_message", "must be in (0, 3600]"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"max_segment_s": "5"}}',
         "bad_message", "number of seconds"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"max_segment_s": NaN}}',
         "bad_message", "number of seconds"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": "abc"}', "bad_message",
         "'hotwords' must be a list of strings"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": ["a", 1]}', "bad_message",
         "'hotwords' must be a list of strings"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": null}', "bad_message",
         "'hotwords' must be a list of strings"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": ["a", " "]}', "bad_message",
         "an empty phrase"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": ["' + "y" * 101 + '"]}',
         "bad_message", "has 101 characters, over the limit of 100"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": ["a\\u0000b"]}', "bad_message",
         "control character"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotwords": ['
         + ",".join(f'"w{i}"' for i in range(1001)) + "]}", "bad_message", "has 1001 phrases"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotword_weight": -1}', "bad_message",
         "'hotword_weight' must be a number from 0 to 10"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotword_weight": true}', "bad_message",
         "'hotword_weight' must be a number"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "hotword_weight": Infinity}',
         "bad_message", "'hotword_weight' must be a number"),
    ],
)
def test_parse_errors_name_the_problem(text: str | bytes, code: str, fragment: str) -> None:
    """Every malformed client message raises a ProtocolError with a code and a message that says what is wrong."""
    with pytest.raises(MessageError) as info:
        parse_client_message(text)
    assert isinstance(info.value, ProtocolError)
    assert info.value.code == code
    assert fragment in str(info.value)


def test_every_endpoint_rule_can_be_overridden() -> None:
    """The protocol accepts each rule the engine knows, and the engine knows each rule the protocol names."""
    from streamer.engine.endpoint import EndpointConfig

    body = {key: 2.5 for key in ENDPOINT_KEYS}
    msg = parse_client_message(json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le",
                                           "endpointing": body}))
    assert isinstance(msg, Start)
    assert EndpointConfig().with_overrides(msg.endpointing).to_dict() == body
    assert set(EndpointConfig().to_dict()) == set(ENDPOINT_KEYS)


def test_server_messages_serialize_with_type_first_and_parse_back() -> None:
    """Each server message is a JSON object with its type; clients parse them back to equal objects."""
    final = Final("mic", 3, "hello world", 1.0, 2.0,
                  (WordTiming("hello", 1.0, 1.4, 0.9), WordTiming("world", 1.5, 2.0, 0.8)),
                  (5, 6, 7), 0.85, False, "silence")
    messages = [
        Ready("abc", "mic", "tiny", (70, 13), 16000, 1.12, {"max_segment_s": 20.0}),
        Partial("mic", 3, "hello wor", "hello ", 1.0, 1.9),
        final,
        Warning("audio_dropped", "dropped", "mic", 0.5),
        Error("bad_audio", "odd bytes"),
        End("mic", 4),
    ]
    for msg in messages:
        obj = json.loads(msg.to_json())
        assert next(iter(obj)) == "type" and obj["type"] == msg.type
        assert parse_server_message(msg.to_json()) == msg
    assert json.loads(final.to_json())["words"][1] == {"word": "world", "start": 1.5, "end": 2.0, "confidence": 0.8}
    assert "stream" not in to_dict(Error("bad_json", "x"))  # unset optional fields are left out
    with pytest.raises(MessageError):
        parse_server_message('{"type": "bogus"}')


def test_parse_server_message_ignores_unknown_fields() -> None:
    """A newer server may add fields; an older client still parses the message."""
    msg = parse_server_message('{"type":"end","stream":"x","segments":1,"future":true}')
    assert msg == End("x", 1)


def test_protocol_imports_without_torch() -> None:
    """Clients import streamer.protocol without torch or numpy (standard library only)."""
    code = "import sys, streamer.protocol; bad = {'torch', 'numpy'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_client_bookkeeping_imports_without_torch_or_asyncio_in_the_protocol() -> None:
    """streamer.client (what clients copy with streamer.protocol) is standard library only too, and the protocol
    itself needs no asyncio: the client's asyncio lives in streamer.client."""
    code = ("import sys, streamer.protocol; no_asyncio = 'asyncio' not in sys.modules; import streamer.client; "
            "print(sorted({'torch', 'numpy'} & set(sys.modules)), no_asyncio)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"


def test_server_and_engine_layers_import_as_documented() -> None:
    """streamer.server imports no torch; streamer.engine.endpoint and the settings import no torch either."""
    code = (
        "import sys, streamer.server.websocket, streamer.server.fanout, streamer.server.metrics, "
        "streamer.server.sdnotify, streamer.engine.endpoint, streamer.settings; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- client bookkeeping for a resume

RATE = 16000
START = Start(RATE, "pcm_s16le", stream="desk")


def ready(session: str, token: str, resumed: bool, audio_s: float) -> Ready:
    return Ready(session, "desk", "m", (70, 1), RATE, 0.08, {}, resume_token=token, resume_window_s=10.0,
                 resumed=resumed, audio_s=audio_s)


def final(segment: int) -> Final:
    return Final("desk", segment, "hi", 0.0, 1.0, (), (), 1.0, False, "silence")


def silence(seconds: float) -> bytes:
    return bytes(round(seconds * RATE) * START.frame_bytes)


def send_all(session: ClientSession) -> int:
    """What a client's sender does on a live connection; returns the bytes sent."""
    sent = 0
    for payload in session.unsent():
        session.mark_sent(payload)
        sent += len(payload)
    return sent


def test_sent_audio_keeps_at_least_the_newest_max_frames_by_position() -> None:
    """Positions count frames across blocks; `since` cuts inside a block; old blocks go only beyond the bound."""
    audio = SentAudio(frame_bytes=2, max_frames=4)
    audio.add(b"aabbcc")  # frames 0-2
    assert (audio.start, audio.end) == (0, 3)
    assert audio.since(0) == [b"aabbcc"] and audio.since(1) == [b"bbcc"] and audio.since(3) == []
    audio.add(b"ddeeff")  # frames 3-5: 3 frames follow block 0, fewer than 4: kept
    assert audio.start == 0 and audio.since(2) == [b"cc", b"ddeeff"]
    audio.add(b"gghh")  # frames 6-7: 5 frames follow block 0 (it goes), 2 follow block 1
    assert (audio.start, audio.end) == (3, 8)
    assert audio.since(0) == [b"ddeeff", b"gghh"]  # from the oldest kept frame
    assert audio.since(5) == [b"ff", b"gghh"]
    audio.add(b"")
    assert audio.end == 8
    with pytest.raises(ValueError, match="not whole frames"):
        audio.add(b"iii")
    with pytest.raises(ValueError, match="must be positive"):
        SentAudio(frame_bytes=2, max_frames=0)


def test_client_session_resumes_with_the_latest_token_and_the_finals_it_has() -> None:
    """start resumes the session named in the latest ready, asking for the finals after those received; a resumed
    ready moves the sending position back to the server's audio_s."""
    session = ClientSession(START)
    assert session.audio.max_frames == RESUME_BUFFER_S * RATE
    assert session.start_message() == START  # nothing to resume yet
    session.audio.add(silence(0.5))
    assert session.on_ready(ready("s1", "tok1", False, 0.0)) == 0
    assert send_all(session) == len(silence(0.5)) and session.is_caught_up
    session.on_final(final(0))
    session.on_final(final(0))  # a replayed final counts once
    session.on_final(final(1))
    assert session.start_message() == replace(START, resume=Resume("s1", "tok1", 2))
    assert parse_client_message(session.start_message().to_json()) == session.start_message()

    session.audio.add(silence(0.25))  # the connection drops; captured while away
    assert session.on_ready(ready("s1", "tok2", True, 0.25)) == 0  # the server got only the first 0.25 s
    assert session.sent == 0.25 * RATE and not session.is_caught_up
    assert send_all(session) == len(silence(0.5))  # the 0.25 s lost on the way, and the 0.25 s since
    assert session.session_audio_s == 0.75
    assert session.start_message().resume == Resume("s1", "tok2", 2)
    session.on_end()
    assert session.start_message() == START  # the session is over: a new one next time


def test_client_session_after_a_failed_resume_starts_a_new_session_where_the_last_stopped() -> None:
    """A ready that is not resumed (after resume_failed) gets the audio not sent yet, counts finals from 0, and a
    later resume of it maps its audio_s onto the same positions."""
    session = ClientSession(START)
    session.audio.add(silence(0.5))
    session.on_ready(ready("s1", "tok1", False, 0.0))
    send_all(session)
    session.on_final(final(0))
    session.audio.add(silence(0.1))  # captured while away
    assert session.on_ready(ready("s2", "tok3", False, 0.0)) == 0
    assert session.sent == 0.5 * RATE and session.next_segment == 0
    assert send_all(session) == len(silence(0.1)) and session.session_audio_s == 0.1
    assert session.start_message().resume == Resume("s2", "tok3", 0)
    session.on_ready(ready("s2", "tok4", True, 0.05))
    assert session.sent == 0.55 * RATE


def test_client_session_skips_audio_that_fell_out_of_the_buffer_and_keeps_positions_in_step() -> None:
    """Away longer than the buffer: the frames the server needs but no longer kept are reported lost, and a later
    resume still re-sends from the right place (the server's audio_s does not count the gap)."""
    session = ClientSession(START, buffer_s=1.0)
    session.audio.add(silence(0.5))
    session.on_ready(ready("s1", "tok1", False, 0.0))
    send_all(session)
    for _ in range(4):  # 2 s captured while away, in 0.5 s blocks: the oldest kept starts at 1.5 s
        session.audio.add(silence(0.5))
    assert session.audio.start == 1.5 * RATE
    assert session.on_ready(ready("s1", "tok2", True, 0.25)) == 1.25 * RATE  # needed from 0.25 s on
    assert session.sent == 1.5 * RATE and session.session_audio_s == 1.25  # 0.25 s received + 1 s to send
    send_all(session)
    session.on_ready(ready("s1", "tok3", True, 0.75))  # got 0.5 s of the re-sent second, then dropped again
    assert session.sent == 2.0 * RATE
