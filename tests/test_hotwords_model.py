"""Hotwords on whole models through the recognizer: the bundled model hears a name it misses without them, and
streams without hotwords decode token for token as without the feature when batched with one that has them.

Speech is made with espeak-ng at test time. The names were found by trying (see the report of issue 18 item 7),
again for each newly shipped model (run 15's: 48 names, "call NAME tomorrow"): without help the bundled model
writes "barnaby" as "barna betty" (TDT) and "reginald" as "reginaled" (CTC). Run 11 wrote "lysander" as
"lisa to"; run 15's half-way model does too, but with the name listed writes "lyndrow".
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from streamer.asr.model import AsrModel
from streamer.engine.hotwords import Hotwords, compile_hotwords
from streamer.engine.recognizer import Recognizer, Stream
from streamer.protocol.limits import DEFAULT_HOTWORD_WEIGHT
from tests.tiny import tiny_model

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout")


def speak(text: str, folder: Path, voice: str = "en-us") -> np.ndarray:
    path = folder / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    data, rate = sf.read(path, dtype="float32")
    return soxr.resample(data, rate, 16000).astype(np.float32)


def recognize(rec: Recognizer, audios: list[np.ndarray], hotwords: list[list[str] | None],
              weight: float = DEFAULT_HOTWORD_WEIGHT) -> list[Stream]:
    """Every audio as a stream of one batch (all fed at once, stepped together to the end)."""
    streams = []
    for audio, words in zip(audios, hotwords, strict=True):
        stream = rec.create_stream()
        if words:
            compiled = compile_hotwords(rec.model.tokenizer, Hotwords(tuple(words), weight), rec.device)
            assert compiled.tree is not None and compiled.phrases == tuple(words)
            stream.hotwords = compiled.tree
        stream.accept_waveform(audio)
        stream.input_finished()
        streams.append(stream)
    rec.run_to_end(streams)
    return streams


def timing(stream: Stream) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    return stream.tokens.token_ids, stream.tokens.token_frames, stream.tokens.token_durations


@pytest.fixture(scope="module")
def bundled() -> AsrModel:
    return AsrModel.load(str(MODEL))


@needs_model
@pytest.mark.parametrize(("decoder", "text", "name"), [("tdt", "call barnaby tomorrow", "barnaby"),
                                                       ("ctc", "call reginald tomorrow", "reginald")])
def test_the_bundled_model_hears_a_name_only_with_it_listed(
    bundled: AsrModel, tmp_path: Path, decoder: str, text: str, name: str
) -> None:
    """Without the list the name is misheard; with it (capitalised, at the default weight) it is right."""
    rec = Recognizer(bundled, decoder=decoder)  # type: ignore[arg-type]
    audio = speak(text, tmp_path)
    (plain,) = recognize(rec, [audio], [None])
    (boosted,) = recognize(rec, [audio], [[name.capitalize(), "kitchen lights"]])
    assert name not in plain.transcript().text.split()
    words = boosted.transcript().text.split()
    assert name in words and "call" in words, words


@needs_model
def test_the_default_weight_leaves_sentences_without_the_phrases_alone(bundled: AsrModel, tmp_path: Path) -> None:
    """Everyday sentences (those of the default-model test) with a list of names and phrases they do not hold, at
    the default weight: the same text as without the list (TDT, the model's own decoder). With the CTC head one
    word of the four sentences changes ("going" becomes "ging": the phrases' first piece "▁g" earns its bonus)."""
    rec = Recognizer(bundled)
    spoken = [("en-us", "please turn off the lights in the kitchen"),
              ("en", "what is the weather going to be like tomorrow"),
              ("en-us", "set a timer for ten minutes"), ("en", "i will call you back in the afternoon")]
    audios = [speak(text, tmp_path, voice) for voice, text in spoken]
    names = ["gertrude", "kowalski", "margaret", "rosalind", "humphrey", "lysander", "reginald", "archibald",
             "cornelius", "matilda", "garage door", "living room"]
    plain = recognize(rec, audios, [None] * 4)
    boosted = recognize(rec, audios, [names] * 4)
    assert [s.transcript().text for s in boosted] == [s.transcript().text for s in plain]


@needs_model
@pytest.mark.parametrize("decoder", ["tdt", "ctc"])
def test_bundled_streams_without_hotwords_are_unchanged_in_a_boosted_batch(
    bundled: AsrModel, tmp_path: Path, decoder: str
) -> None:
    """Four streams in one batch, one with hotwords that change its text: the others' tokens, frames and durations
    equal the same batch decoded without any hotwords."""
    rec = Recognizer(bundled, decoder=decoder)  # type: ignore[arg-type]
    texts = ["call lysander tomorrow", "please turn off the lights in the kitchen", "call reginald tomorrow",
             "set a timer for ten minutes"]
    audios = [speak(text, tmp_path) for text in texts]
    plain = recognize(rec, audios, [None] * 4)
    boosted = recognize(rec, audios, [None, None, ["reginald", "lysander"], None])
    assert boosted[2].transcript().text != plain[2].transcript().text
    for row in (0, 1, 3):
        assert timing(boosted[row]) == timing(plain[row])
        assert boosted[row].tokens.token_logprobs == pytest.approx(plain[row].tokens.token_logprobs, abs=1e-5)


@pytest.mark.parametrize("decoder", ["tdt", "ctc"])
def test_tiny_streams_without_hotwords_are_unchanged_in_a_boosted_batch(decoder: str) -> None:
    """The tiny random model on noise, streams of different lengths (the batch shrinks as they end): rows without
    hotwords decode token for token (frames and durations too) as without the feature; boosted rows change."""
    model = tiny_model()
    rec = Recognizer(model, decoder=decoder)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(4)
    audios = [(torch.randn(16000 * n // 2, generator=gen) * 0.3).numpy() for n in (3, 5, 2, 4, 6)]
    words = ["kitchen lights", "the weather", "timer"]  # the tiny tokenizer's own text
    plain = recognize(rec, audios, [None] * 5)
    boosted = recognize(rec, audios, [words, None, None, words[1:], None], weight=50.0)
    for row in (1, 2, 4):
        assert timing(boosted[row]) == timing(plain[row])
    assert timing(boosted[0]) != timing(plain[0]) or timing(boosted[3]) != timing(plain[3])
