"""Segmentation on the sans-I/O recognizer: partials, exactly one final per segment, clocks, channels, scheduler."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.asr.hypothesis import TokenSpan
from streamer.asr.model import AsrModel
from streamer.audio.io import load_audio
from streamer.engine.channel import Channel
from streamer.engine.endpoint import EndpointConfig
from streamer.engine.recognizer import Recognizer, transcribe_streaming
from streamer.engine.scheduler import Scheduler, StepStats
from streamer.engine.segmenting import Clock, Segmenter
from streamer.protocol import Final, Partial, Warning

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
# Pieces of the tiny model's tokenizer (tests/tiny.py): "▁the" "▁s" "on" "▁t" "he"
THE, S_, ON, T_, HE = 8, 4, 5, 1, 2


@pytest.fixture(scope="module")
def model() -> AsrModel:
    from tests.tiny import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def speech(speech_wav: Path) -> np.ndarray:
    return load_audio(speech_wav)


def span(ids: Sequence[int], frames: Sequence[int], durations: Sequence[int] | None = None) -> TokenSpan:
    n = len(ids)
    return TokenSpan(tuple(ids), tuple(frames), tuple(durations or [1] * n), (0.9,) * n, (-0.1,) * n)


def segmenter(model: AsrModel, **rules: float) -> Segmenter:
    return Segmenter(model, "s", EndpointConfig(**rules), Clock(16000))


# ---------------------------------------------------------------- Clock


def test_clock_counts_dropped_audio_and_not_padding() -> None:
    """Dropped samples move the stream clock ahead; padded silence stands still on it."""
    clock = Clock(16000)
    assert clock.seconds(16000) == 1.0
    clock.dropped(16000, 8000)  # half a second lost before fed sample 16000
    assert clock.seconds(16000) == 1.5 and clock.seconds(32000) == 2.5
    clock.padded(32000, 4000)  # a quarter second of silence padded in
    assert clock.seconds(33000) == 2.5 and clock.seconds(36000) == 2.5 and clock.seconds(52000) == 3.5
    clock.forget_before(40000)
    assert clock.seconds(52000) == 3.5


# ---------------------------------------------------------------- Segmenter on synthetic tokens


def test_partials_only_when_text_changes_with_a_stable_prefix(model: AsrModel) -> None:
    """A partial per text change; none for an empty step; the stable prefix grows and is a prefix."""
    seg = segmenter(model)
    first = seg.add(span([THE], [2]), frames_done=5)
    assert [type(e) for e in first] == [Partial] and first[0].text == "the" and first[0].stable == ""
    assert seg.add(span([], []), frames_done=6) == []  # no new token, same text: nothing
    (p,) = seg.add(span([S_], [7]), frames_done=8)
    assert p.text == "the s" and p.stable == "the"  # "the" is complete: a later token cannot change it
    (p2,) = seg.add(span([ON], [8]), frames_done=9)
    assert p2.text == "the son" and p2.text.startswith(p2.stable) and p2.stable == "the"
    assert (p.segment, p2.segment) == (0, 0) and (p2.start, p2.end) == (0.16, 0.72)


def test_trailing_silence_gives_exactly_one_final(model: AsrModel) -> None:
    """After 1.0 s without tokens the segment ends with one final; the next segment is number 1."""
    seg = segmenter(model, trailing_silence_after_speech_s=1.0)
    seg.add(span([THE, S_, ON], [10, 12, 13]), frames_done=14)
    assert seg.add(span([], []), frames_done=20) == []
    (final,) = seg.add(span([], []), frames_done=27)  # 13 frames = 1.04 s after the last token's end (14)
    assert isinstance(final, Final) and final.reason == "silence" and final.segment == 0
    assert final.text == "the son" and [w.word for w in final.words] == ["the", "son"]
    assert final.start == 0.8 and final.end == 1.12 and final.token_ids == (THE, S_, ON)
    assert final.confidence == 0.9 and final.eou is False
    assert seg.add(span([], []), frames_done=40) == []  # silence after a final: no empty final
    (p,) = seg.add(span([T_], [41]), frames_done=42)
    assert p.segment == 1 and p.start == 3.28


def test_silence_without_speech_discards_without_a_final(model: AsrModel) -> None:
    """An empty segment is discarded: no final, no segment number used."""
    seg = segmenter(model, silence_without_speech_s=2.0)
    assert seg.add(span([], []), frames_done=30) == []
    assert seg.segment == 0
    seg.add(span([THE], [31]), frames_done=32)
    (final,) = seg.cut("finalize", 33)
    assert final.segment == 0 and final.reason == "finalize"


def test_max_segment_length_cuts_a_non_stop_talker(model: AsrModel) -> None:
    """Tokens every frame: the segment still ends after max_segment_s, then a new one starts."""
    seg = segmenter(model, max_segment_s=1.0)
    events = []
    for frame in range(0, 30):
        events += seg.add(span([T_ if frame % 2 == 0 else HE], [frame]), frames_done=frame + 1)
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.reason for f in finals] == ["max_length"] * 2 and [f.segment for f in finals] == [0, 1]
    assert [e.segment for e in events if isinstance(e, Partial)] == sorted(e.segment for e in events
                                                                             if isinstance(e, Partial))


def test_cut_with_nothing_recognized_sends_nothing(model: AsrModel) -> None:
    """finalize, stop or shutdown on an empty segment produce no final."""
    seg = segmenter(model)
    assert seg.cut("stop", 10) == [] and seg.segment == 0


def test_end_of_utterance_token_ends_the_segment(model: AsrModel) -> None:
    """An EOU model's <EOU> token ends the segment at once; tokens after it start the next one."""
    eou_model = AsrModel(dataclasses.replace(model.config, eou_token_ids=(0,)), model.tokenizer)
    seg = Segmenter(eou_model, "s", EndpointConfig(), Clock(16000))
    events = seg.add(span([THE, S_, 0, T_], [1, 2, 3, 5]), frames_done=6)
    assert [type(e) for e in events] == [Final, Partial]
    final, partial = events
    assert final.reason == "eou" and final.eou and final.segment == 0 and final.token_ids == (THE, S_, 0)
    assert partial.segment == 1 and partial.text == "t"


# ---------------------------------------------------------------- Channel on the real (tiny) recognizer


def run_channel(channel: Channel) -> list:
    """Loop-side take + inference-side absorb/step, synchronously, until nothing is due."""
    events: list = []
    while channel.is_due:
        events += channel.absorb(channel.take())
        if channel.stream.is_ready and not channel.is_closed:
            (span_,) = channel.recognizer.step([channel.stream])
            events += channel.after_step(span_)
        channel.settle()
    return events


def check_segments(events: list) -> list[Final]:
    """Exactly one final per segment, numbered 0, 1, ...; each partial belongs to a segment not yet final."""
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.segment for f in finals] == list(range(len(finals)))
    done = -1
    for e in events:
        if isinstance(e, Final):
            done = e.segment
        elif isinstance(e, Partial):
            assert e.segment == done + 1
    return finals


def test_channel_tokens_equal_plain_streaming(model: AsrModel, speech: np.ndarray) -> None:
    """Segmentation changes nothing about recognition: the finals' tokens are the streaming transcript's."""
    expected = transcribe_streaming(model, speech, att_context_size=(70, 1))
    channel = Channel(Recognizer(model, (70, 1)), "s", EndpointConfig(max_segment_s=0.5), 10.0)
    events = []
    for i in range(0, speech.size, 1234):
        channel.write(speech[i : i + 1234])
        events += run_channel(channel)
    channel.close("stop")
    events += run_channel(channel)
    finals = check_segments(events)
    assert len(finals) > 2 and finals[-1].reason == "stop" and channel.is_closed
    assert sum((f.token_ids for f in finals), ()) == expected.token_ids
    assert all(a.end <= b.start + 1e-9 for a, b in zip(finals, finals[1:], strict=False))
    assert finals[-1].end <= speech.size / 16000 + 0.001


def test_finalize_flushes_the_audio_before_it_and_keeps_listening(model: AsrModel, speech: np.ndarray) -> None:
    """A finalize mid-stream gives a final ending no later than the finalize point; later audio forms new segments."""
    channel = Channel(Recognizer(model, (70, 13)), "s", EndpointConfig(max_segment_s=60), 10.0)
    cut = 20000  # 1.25 s: mid-chunk for the 1.12 s chunks of (70, 13)
    channel.write(speech[:cut])
    channel.finalize()
    channel.write(speech[cut:])  # written before the round runs: must not leak into the finalized segment
    events = run_channel(channel)
    first = check_segments(events)
    assert [f.reason for f in first] == ["finalize"] and first[0].end <= cut / 16000 + 0.001
    channel.close("stop")
    finals = check_segments(events + run_channel(channel))
    assert [f.reason for f in finals] == ["finalize", "stop"]
    assert finals[1].start >= cut / 16000 - 1e-9 and finals[1].end <= speech.size / 16000 + 0.001


def test_dropped_audio_moves_the_clock(model: AsrModel, speech: np.ndarray) -> None:
    """When the ring overflows, the oldest audio is dropped and counted, and times stay on the stream's clock."""
    rec = Recognizer(model, (70, 1))
    channel = Channel(rec, "s", EndpointConfig(max_segment_s=60), ring_capacity_s=0.5)
    dropped = channel.write(speech)  # 2.5 s into a 0.5 s ring
    assert dropped == speech.size - 8000
    wanted = channel.samples_wanted
    work = channel.take()  # one step's worth; the rest of the backlog waits in the ring
    assert work.dropped == dropped and work.samples.size == wanted < 8000 and channel.dropped_samples == dropped
    assert channel.buffered_samples == 8000 - wanted
    events = channel.absorb(work)
    channel.close("stop")
    events += run_channel(channel)
    (final,) = check_segments(events)
    assert final.start >= dropped / 16000 - 0.08 and final.end <= speech.size / 16000 + 0.001


# ---------------------------------------------------------------- Scheduler


async def test_scheduler_batches_streams_and_flushes_on_close(model: AsrModel, speech: np.ndarray) -> None:
    """Three streams fed together are stepped in shared batches; close() returns after each one's last final."""
    published: dict[str, list] = {}
    stats: list[StepStats] = []
    rec = Recognizer(model, (70, 1))
    scheduler = Scheduler(rec, lambda name, ev: published.setdefault(name, []).extend(ev), max_batch=4,
                          max_wait_ms=20, on_step=stats.append)
    channels = [scheduler.open(f"s{i}", EndpointConfig(max_segment_s=1.0)) for i in range(3)]
    with pytest.raises(ValueError, match="already open"):
        scheduler.open("s0", EndpointConfig())
    runner = asyncio.create_task(scheduler.run())
    try:
        for i in range(0, speech.size, 3200):
            for c in channels:
                c.write(speech[i : i + 3200])
                scheduler.poke(c)
            await asyncio.sleep(0)
        async with asyncio.timeout(30 * TIMEOUT):
            await asyncio.gather(*(scheduler.close(c, "stop") for c in channels))
    finally:
        runner.cancel()
    assert scheduler.channels == {}
    assert max(s.batch_size for s in stats) >= 2
    texts = []
    for name in ("s0", "s1", "s2"):
        finals = check_segments(published[name])
        assert finals[-1].reason == "stop"
        texts.append(" ".join(f.text for f in finals))
    assert texts[0] == texts[1] == texts[2]  # same audio, same words, whatever the batch composition


async def test_scheduler_warns_when_a_stream_falls_behind(model: AsrModel, speech: np.ndarray) -> None:
    """Audio beyond the ring's capacity is dropped and the stream gets an audio_dropped warning with the seconds."""
    published: list = []
    scheduler = Scheduler(Recognizer(model, (70, 1)), lambda name, ev: published.extend(ev), ring_capacity_s=0.5)
    channel = scheduler.open("s", EndpointConfig())
    assert scheduler.ring_capacity_s > 0.5  # never below two chunks
    channel.write(np.concatenate([speech] * 3))
    runner = asyncio.create_task(scheduler.run())
    try:
        async with asyncio.timeout(30 * TIMEOUT):
            scheduler.poke(channel)
            await scheduler.close(channel, "stop")
    finally:
        runner.cancel()
    (warning,) = [e for e in published if isinstance(e, Warning)]
    assert warning.code == "audio_dropped" and warning.seconds == pytest.approx(3 * speech.size / 16000 -
                                                                                scheduler.ring_capacity_s, abs=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["tdt", "ctc"])
def test_streaming_on_cuda_equals_cpu(model: AsrModel, speech: np.ndarray, kind: str) -> None:
    """model.device = cuda: features stay on the CPU, the network runs on the GPU, the tokens are the CPU's."""
    on_cpu = transcribe_streaming(model, speech, kind, (70, 1))  # type: ignore[arg-type]
    gpu_model = copy.deepcopy(model).to_device("cuda")
    on_gpu = transcribe_streaming(gpu_model, speech, kind, (70, 1))  # type: ignore[arg-type]
    assert on_gpu.token_ids == on_cpu.token_ids and on_gpu.text == on_cpu.text


# ---------------------------------------------------------------- endpoints and times inside a step


def test_a_pause_inside_one_long_chunk_ends_the_segment(model: AsrModel) -> None:
    """With 1.12 s steps (14 frames), a 1.1 s pause that straddles two step ends still ends the segment: the rules
    run on every encoder frame of a step, and the words after the pause open the next segment."""
    seg = segmenter(model, trailing_silence_after_speech_s=1.0)
    assert [type(e) for e in seg.add(span([THE, S_], [1, 2]), frames_done=14)] == [Partial]  # 0.88 s of pause
    events = seg.add(span([T_, HE], [17, 18]), frames_done=28)  # the next words 1.12 s after "the s" ended
    final, partial = events
    assert isinstance(final, Final) and final.reason == "silence" and final.text == "the s" and final.segment == 0
    assert isinstance(partial, Partial) and partial.segment == 1 and partial.text == "the"
    assert partial.start == 1.36  # frame 17


def test_no_time_in_a_result_lies_beyond_the_audio_received(model: AsrModel) -> None:
    """A token's predicted duration may run past the audio so far: partial and final ends stop at the audio's end."""
    seg = segmenter(model)
    (p,) = seg.add(span([THE], [6], [20]), frames_done=7)  # "the" predicted to last 1.6 s
    assert p.end == 0.56 and p.start == 0.48
    (final,) = seg.cut("finalize", 7, end_fed=7 * 1280)
    assert final.end <= 0.56 and all(w.end <= 0.56 for w in final.words)


def test_partial_text_is_decoded_incrementally_and_equals_the_whole(model: AsrModel) -> None:
    """However the tokens come, each partial's text equals decoding all of the segment's tokens at once, while a step
    decodes only the tokens since the last word start: work per step does not grow with the segment."""
    tok = model.tokenizer
    assert tok is not None
    decoded: list[int] = []
    real_decode = tok.decode

    def counting_decode(ids, strip_special=False):  # type: ignore[no-untyped-def]
        ids = list(ids)
        decoded.append(len(ids))
        return real_decode(ids, strip_special)

    rng = np.random.default_rng(5)
    seg = segmenter(model, max_segment_s=3600.0)
    tok.decode = counting_decode  # type: ignore[method-assign]
    try:
        ids: list[int] = []
        for frame in range(3000):
            new = [int(t) for t in rng.integers(0, tok.vocab_size, size=rng.integers(0, 3))]
            ids += new
            decoded.clear()
            events = seg.add(span(new, [frame] * len(new)), frames_done=frame + 1)
            partials = [e for e in events if isinstance(e, Partial)]
            if partials:
                assert partials[-1].text == real_decode(ids, strip_special=True)
                assert max(decoded) <= 150, f"a step decoded {max(decoded)} tokens after {len(ids)}"
    finally:
        del tok.decode
    assert seg.segment == 0 and len(ids) > 2000
