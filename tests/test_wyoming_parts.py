"""The Wyoming adapter's parts without a daemon: framing against the ``wyoming`` package's own reader and writer,
the streamed transcript's deltas, the ``info`` event as the package parses it, the ``[wyoming]`` settings."""

from __future__ import annotations

import asyncio
import json

import pytest
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Info

from streamer.adapters.wyoming.framing import (
    MAX_DATA_BYTES,
    MAX_HEADER_BYTES,
    EventReader,
    FramingError,
    WyomingEvent,
    encode_event,
)
from streamer.adapters.wyoming.info import info_event
from streamer.adapters.wyoming.transcript import TranscriptStream
from streamer.errors import ConfigError
from streamer.protocol import Final, Partial
from streamer.session import ModelInfo
from streamer.settings import Settings, load_settings, parse_set


def stream_of(data: bytes) -> asyncio.StreamReader:
    """A real StreamReader holding ``data`` and then the end of the stream."""
    reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_events_the_wyoming_package_writes_are_read_whole() -> None:
    """Its writer puts data in a block after the header (data_length); ours merges it and reads the payload."""
    writer_side = asyncio.StreamReader()

    class Sink:  # the writer interface async_write_event uses
        def writelines(self, lines: list[bytes]) -> None:
            writer_side.feed_data(b"".join(lines))

        def write(self, data: bytes) -> None:
            writer_side.feed_data(data)

        async def drain(self) -> None:
            pass

    await async_write_event(Event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x02" * 5), Sink())
    await async_write_event(Event("audio-stop", {"timestamp": 5}), Sink())
    writer_side.feed_eof()
    events = EventReader(writer_side, 1 << 20)
    chunk, stop = await events.read(), await events.read()
    assert chunk == WyomingEvent("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x02" * 5)
    assert stop == WyomingEvent("audio-stop", {"timestamp": 5})
    assert await events.read() is None


async def test_events_we_write_are_what_the_wyoming_package_reads() -> None:
    """Data inline, payload after the header: the package's reader gets type, data and payload back."""
    sent = WyomingEvent("transcript", {"text": "zwölf lights", "language": "en"}, b"\x00\xff")
    reader = stream_of(encode_event(sent) + encode_event(WyomingEvent("transcript-stop")))
    first, second = await async_read_event(reader), await async_read_event(reader)
    assert first is not None and (first.type, first.data, first.payload) == (sent.type, sent.data, sent.payload)
    assert second is not None and (second.type, second.data, second.payload) == ("transcript-stop", {}, None)
    assert json.loads(encode_event(sent).split(b"\n")[0])["version"] == "1.10.2"


async def test_a_data_block_overrides_the_header_data_and_blank_lines_are_skipped() -> None:
    block = json.dumps({"language": "en", "name": "x"}).encode()
    header = json.dumps({"type": "transcribe", "data": {"language": "de", "context": {}}, "data_length": len(block)})
    reader = EventReader(stream_of(b"\n\r\n" + header.encode() + b"\n" + block), 100)
    assert await reader.read() == WyomingEvent("transcribe", {"language": "en", "context": {}, "name": "x"})
    assert await reader.read() is None


@pytest.mark.parametrize(
    ("data", "code", "in_sync", "words"),
    [
        (b"not json\n", "bad_event", False, "one line of JSON"),
        (b'{"type": ""}\n', "bad_event", False, "'type'"),
        (b'{"type": "x", "payload_length": true}\n', "bad_event", False, "payload_length"),
        (b'{"type": "x", "data_length": 1.5}\n', "bad_event", False, "data_length"),
        (b"x" * (MAX_HEADER_BYTES + 10) + b"\n", "bad_event", False, "longer than"),
        (b'{"type": "x", "data": [1], "payload_length": 3}\nabc', "bad_event", True, "JSON object"),
        (b'{"type": "x", "data_length": 3, "payload_length": 3}\n[1]abc', "bad_event", True, "data block"),
        (json.dumps({"type": "x", "data_length": MAX_DATA_BYTES + 1}).encode() + b"\n" + b" " * (MAX_DATA_BYTES + 1),
         "too_large", True, "data block"),
        (b'{"type": "x", "payload_length": 101}\n' + bytes(101), "too_large", True, "server.max_frame_bytes"),
    ],
    ids=["not-json", "empty-type", "bool-length", "float-length", "long-line", "data-list", "bad-block",
         "big-block", "big-payload"],
)
async def test_bad_events_raise_and_say_whether_the_next_event_is_found(
    data: bytes, code: str, in_sync: bool, words: str
) -> None:
    """A refused event whose bytes are known is consumed whole: the describe after it is read as the next event."""
    reader = EventReader(stream_of(data + b'{"type": "describe"}\n'), 100)
    with pytest.raises(FramingError) as info:
        await reader.read()
    assert (info.value.code, info.value.in_sync) == (code, in_sync) and words in str(info.value)
    if in_sync:
        assert await reader.read() == WyomingEvent("describe")


async def test_the_end_of_the_stream_inside_an_event_is_the_end() -> None:
    """A payload cut off by the end of the stream is no event; waiting_for says how far it came."""
    source = asyncio.StreamReader()
    reader = EventReader(source, 1000)
    source.feed_data(b'{"type": "audio-chunk", "payload_length": 50}\n' + bytes(20))
    task = asyncio.create_task(reader.read())
    await asyncio.sleep(0.01)
    assert reader.waiting_for == "the payload (payload_length) of event 'audio-chunk' (20 of 50 bytes came)"
    source.feed_eof()
    assert await task is None


def partial(text: str, stable: str, segment: int = 0) -> Partial:
    return Partial("s", segment, text, stable, 0.0, 1.0)


def final(text: str, segment: int = 0) -> Final:
    return Final("s", segment, text, 0.0, 1.0, (), (), 0.9, False, "silence")


def test_chunks_follow_the_stable_text_and_add_up_to_the_transcript() -> None:
    """A partial's last word may still change: chunks follow the stable prefix; each final adds the rest; finals
    of several segments are joined by a space."""
    stream = TranscriptStream()
    deltas = [
        stream.partial(partial("turn of", "turn")),
        stream.partial(partial("turn off the", "turn off")),
        stream.partial(partial("turn off the lie", "turn off the")),
        stream.final(final("turn off the lights")),
        stream.partial(partial("in", "", segment=1)),
        stream.partial(partial("in the kitch", "in the", segment=1)),
        stream.final(final("in the kitchen", segment=1)),
    ]
    assert deltas == ["turn", " off", " the", " lights", "", " in the", " kitchen"]
    assert "".join(deltas) == stream.text == "turn off the lights in the kitchen"


def test_a_final_that_contradicts_the_chunks_stops_them(caplog: pytest.LogCaptureFixture) -> None:
    """Should a final ever not start with what was streamed, no wrong delta is sent (the transcript has the text)."""
    stream = TranscriptStream()
    assert stream.partial(partial("turn off it", "turn off")) == "turn off"
    assert stream.final(final("turn of it")) == ""
    assert stream.final(final("now", segment=1)) == ""
    assert stream.text == "turn of it now" and stream.is_broken
    assert sum("no prefix" in r.message for r in caplog.records) == 1


def test_info_is_what_home_assistant_reads() -> None:
    """Parsed by the package's own Info: an installed ASR program with transcript streaming, the model and its
    languages; a Hugging Face model is attributed to its owner."""
    info = Info.from_event(Event("info", info_event(ModelInfo("nvidia/parakeet", (70, 1), 0.16), ["en", "de"]).data))
    (program,) = info.asr
    assert program.installed and program.supports_transcript_streaming and program.name == "streamer"
    (model,) = program.models
    assert (model.name, model.installed, model.languages) == ("nvidia/parakeet", True, ["en", "de"])
    assert model.attribution.url == "https://huggingface.co/nvidia/parakeet" and model.attribution.name == "nvidia"
    assert "[70,1]" in (model.description or "") and "0.16 s" in (model.description or "")


def test_wyoming_settings_default_off_and_set_from_the_command_line() -> None:
    assert Settings().wyoming.model_dump() == {"enabled": False, "host": "127.0.0.1", "port": 10300,
                                              "zeroconf": False, "languages": ["en"]}
    s = load_settings(None, parse_set(["wyoming.enabled=true", "wyoming.port=10301", 'wyoming.languages=["en","de"]']))
    assert (s.wyoming.enabled, s.wyoming.port, s.wyoming.languages) == (True, 10301, ["en", "de"])
    for bad in ("wyoming.port=70000", "wyoming.languages=[]", 'wyoming.languages=["en us"]'):
        with pytest.raises(ConfigError, match="wyoming"):
            load_settings(None, parse_set([bad]))
