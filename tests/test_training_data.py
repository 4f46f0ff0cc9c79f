"""Tests of the synthetic corpus pipeline: text, templates, augmentation, a tiny corpus, the tokenizer."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamer.training.augment import (
    AugmentConfig,
    augment,
    band_limit,
    change_speed,
    coloured_noise,
    mix_at_snr,
    power,
)
from streamer.training.corpus import add_corpus_args, build_corpus, load_audio, splits_from_args
from streamer.training.everyday import SLOTS, TEMPLATES, everyday_sentences, fill
from streamer.training.plan import SplitSpec, default_splits, plan_corpus
from streamer.training.sources import read_fortunes
from streamer.training.text import (
    normalise,
    number_to_words,
    ordinal_to_words,
    split_sentences,
    time_to_words,
    year_to_words,
)
from streamer.training.textpool import TextMix, build_text_pool, licences, word_frequencies
from streamer.training.tokenizer import encoder_frames, token_overflow, train_tokenizer

HAS_TTS = all(shutil.which(p) for p in ("espeak-ng", "flite", "festival"))
SR = 16000


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety nine"),
        (100, "one hundred"),
        (1205, "one thousand two hundred five"),
        (2_000_017, "two million seventeen"),
        (-3, "minus three"),
    ],
)
def test_number_to_words(n: int, words: str) -> None:
    """Cardinals are spelled in American style without "and"."""
    assert number_to_words(n) == words


def test_ordinals_years_times() -> None:
    """Ordinals, years and clock times read the way people say them."""
    assert [ordinal_to_words(n) for n in (1, 2, 3, 12, 20, 22, 40, 101)] == [
        "first", "second", "third", "twelfth", "twentieth", "twenty second", "fortieth", "one hundred first",
    ]  # fmt: skip
    assert year_to_words(1984) == "nineteen eighty four"
    assert year_to_words(1905) == "nineteen oh five"
    assert year_to_words(2005) == "two thousand five"
    assert year_to_words(1900) == "nineteen hundred"
    assert year_to_words(2024) == "twenty twenty four"
    assert time_to_words(7, 0) == "seven o'clock"
    assert time_to_words(7, 5) == "seven oh five"
    assert time_to_words(19, 45) == "nineteen forty five"


@pytest.mark.parametrize(
    ("written", "spoken"),
    [
        ("It costs $5.50, not $1!", "it costs five dollars fifty cents not one dollar"),
        ("Meet me at 7:45 on the 21st.", "meet me at seven forty five on the twenty first"),
        (
            "Born in 1984, he ran 3.14 miles.",
            "born in nineteen eighty four he ran three point one four miles",
        ),
        ("Prices rose 50% & more", "prices rose fifty percent and more"),
        ("Dr. Smith isn't here, Mrs. Jones is.", "doctor smith isn't here missus jones is"),
        ("It's 1,000,000 to 1", "it's one million to one"),
        ("“Well-known” — she said 'twice'", "well known she said twice"),
        (
            "Call 0712 now, from 1990-95",
            "call zero seven one two now from nineteen ninety to nineteen ninety five",
        ),
        ("Take 1/2 a cup", "take one half a cup"),
    ],
)
def test_normalise(written: str, spoken: str) -> None:
    """Numbers, money, times, symbols and abbreviations become words; punctuation goes."""
    assert normalise(written) == spoken


@pytest.mark.parametrize(
    "written",
    [
        "Two words",
        " ".join(["word"] * 31),
        "Having a dichotomous stem, adv.",
        "see {Dichotomy}",
        "the hdtv x",
    ],
)
def test_normalise_rejects(written: str) -> None:
    """Too short, too long, dictionary abbreviations, markup and vowelless or stray letters give None."""
    assert normalise(written) is None


def test_split_sentences() -> None:
    """Sentences split at . ! ? before a capital, not inside decimals."""
    text = 'It is 3.5 km away. Is it? "Yes!" he said.\nThen we left.'
    assert split_sentences(text) == ["It is 3.5 km away.", "Is it?", '"Yes!" he said.', "Then we left."]


def test_every_template_fills_and_normalises() -> None:
    """Every template has known slots, and every filled sentence is already a clean transcript."""
    rng = random.Random(0)
    for template in TEMPLATES:
        for _ in range(5):
            sentence = fill(template, rng)
            assert normalise(sentence, min_words=1) == sentence.replace("kids' room", "kids room"), template
    assert {"clock", "date", "day", "month", "name", "price", "phone"} <= set(SLOTS)


def test_everyday_sentences_are_deterministic_and_everyday() -> None:
    """The same seed gives the same sentences; days, months and number words show up often."""
    first = [s for _, s in zip(range(500), everyday_sentences(7), strict=False)]
    again = [s for _, s in zip(range(500), everyday_sentences(7), strict=False)]
    other = [s for _, s in zip(range(500), everyday_sentences(8), strict=False)]
    assert first == again and first != other
    words = " ".join(first).split()
    for word in ("monday", "minutes", "twenty", "timer", "lights", "o'clock"):
        assert word in words


def _write_fortunes(directory: Path) -> Path:
    directory.mkdir()
    fortunes = [
        "The cat sat on the mat. The dog sat on the log.\n\t\t-- Anonymous",
        "A stitch in time saves nine. Look before you leap!",
        "The early bird catches the worm, but the second mouse gets the cheese.",
        "Never put off till tomorrow what you can do the day after tomorrow.",
        "All that glitters is not gold. Still waters run deep.",
        "Where there is smoke there is fire. Actions speak louder than words.",
        "You can lead a horse to water but you cannot make it drink.",
        "The pen is mightier than the sword. Practice makes perfect.",
        "Every cloud has a silver lining. Better late than never.",
        "A journey of a thousand miles begins with a single step.",
        "Do not count your chickens before they hatch. Time flies like an arrow.",
        "Fruit flies like a banana. Two heads are better than one.",
    ]
    (directory / "proverbs").write_text("\n%\n".join(fortunes) + "\n%\n")
    (directory / "proverbs.dat").write_bytes(b"\0")  # index files are skipped
    return directory


def test_read_fortunes_drops_attributions(tmp_path: Path) -> None:
    """Fortune blocks split into sentences; "-- author" lines and index files are skipped."""
    sentences = list(read_fortunes(_write_fortunes(tmp_path / "fortunes")))
    assert sentences[:2] == ["The cat sat on the mat.", "The dog sat on the log."]
    assert not any("Anonymous" in s for s in sentences)


def test_text_pool_common_and_rare(tmp_path: Path) -> None:
    """Frequencies average over sources; a sentence with a word outside the top N is rare."""
    freq = word_frequencies({"a": ["x y", "x z"], "b": ["w w w w"]})
    assert freq["x"] == pytest.approx(0.25) and freq["w"] == pytest.approx(0.5)
    pool = build_text_pool(0, common_vocab_size=50, roots={"fortunes": _write_fortunes(tmp_path / "f")})
    assert pool.common and pool.rare
    assert {s.source for s in pool.common + pool.rare} == {"fortunes"}
    assert len({s.text for s in pool.common + pool.rare}) == len(pool.common) + len(pool.rare)
    assert "GPL" in licences()["gcide"]


def test_plan_keeps_held_out_sentences_out_of_train(tmp_path: Path) -> None:
    """No evaluation transcript is planned into train, even when train recycles a small pool."""
    pool = build_text_pool(0, common_vocab_size=50, roots={"fortunes": _write_fortunes(tmp_path / "f")})
    specs = default_splits(train_hours=0.2, eval_utterances=5)
    tasks = plan_corpus(specs, pool, seed=0, shard_utterances=7)
    texts: dict[str, set[str]] = {}
    for task in tasks:
        texts.setdefault(task.split, set()).update(u.sentence.text for u in task.utterances)
    held_out = set().union(*(t for name, t in texts.items() if name != "train"))
    assert texts["train"] and not texts["train"] & held_out
    assert sum(len(t.utterances) for t in tasks if t.split == "dev") == 5


def _tone(freq_hz: float, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq_hz * np.arange(int(seconds * SR)) / SR).astype(np.float32)


def _speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0, 1, int(seconds * 10)), SR // 10)
    return (0.3 * envelope * _tone(220, seconds) + 0.1 * envelope * _tone(1100, seconds)).astype(np.float32)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_mix_at_snr_measures_as_asked(snr_db: float) -> None:
    """The noise added is exactly snr_db below the speech power."""
    speech = _speechlike()
    noisy = mix_at_snr(speech, coloured_noise("pink", speech.size, np.random.default_rng(1)), snr_db)
    assert noisy.shape == speech.shape
    assert 10 * np.log10(power(speech) / power(noisy - speech)) == pytest.approx(snr_db, abs=0.01)


@pytest.mark.parametrize("seed", range(4))
def test_augment_noise_snr_and_length(seed: int) -> None:
    """augment() keeps the length and its recorded SNR is what one measures (up to the peak gain)."""
    speech = _speechlike(seed=seed)
    config = AugmentConfig(p_speed=0, p_formant=0, p_reverb=0, p_noise=1, p_telephone=0, p_lowpass=0, p_codec=0, p_dc=0)
    babble_sources = [_speechlike(1.3, seed=s) for s in range(10, 14)]
    out, record = augment(speech, np.random.default_rng(seed), config, babble_sources)
    assert out.shape == speech.shape
    noise = out / 10 ** (record["gain_db"] / 20) - speech
    assert 10 * np.log10(power(speech) / power(noise)) == pytest.approx(record["snr_db"], abs=0.05)
    assert np.abs(out).max() == pytest.approx(10 ** (record["peak_dbfs"] / 20), rel=1e-3)


def test_augment_full_chain_is_seeded_and_keeps_length() -> None:
    """Without a speed change every augmentation keeps the length; the same seed gives the same audio."""
    speech = _speechlike()
    config = AugmentConfig(p_speed=0, p_reverb=1, p_noise=1, p_telephone=0.5, p_lowpass=0.5, p_dc=1)
    a, record_a = augment(speech, np.random.default_rng(3), config)
    b, record_b = augment(speech, np.random.default_rng(3), config)
    assert a.shape == speech.shape and np.array_equal(a, b) and record_a == record_b
    assert {"rt60_s", "noise", "band_hz", "dc"} <= set(record_a)
    assert np.abs(a).max() <= 1.0


def test_classic_augmentation_never_warps_formants_or_uses_image_rooms_babble_or_codecs() -> None:
    """--augment classic: over many draws the full chain uses all four, the classic chain none of them."""
    speech = _speechlike(1.0)
    babble_sources = [_speechlike(1.3, seed=s) for s in range(10, 14)]

    def used(config: AugmentConfig) -> set[str]:
        seen: set[str] = set()
        for seed in range(60):
            _, record = augment(speech, np.random.default_rng(seed), config, babble_sources)
            seen |= {"formant"} if "formant_alpha" in record else set()
            seen |= {"image room"} if record.get("rir") == "image" else set()
            seen |= {"babble"} if record.get("noise") == "babble" else set()
            seen |= {"codec"} if "codec" in record else set()
            seen |= {"noise"} if record.get("noise") in ("white", "pink", "brown") else set()
            seen |= {"room"} if record.get("rir") == "noise" else set()
        return seen

    assert used(AugmentConfig()) >= {"formant", "image room", "babble", "codec", "noise", "room"}
    assert used(AugmentConfig.classic()) == {"noise", "room"}


@pytest.mark.parametrize("profile", ["full", "classic", "clean"])
def test_corpus_augment_option_sets_train_and_dev_only(profile: str) -> None:
    """streamer corpus --augment PROFILE: train and dev get the profile, the test splits stay clean."""
    parser = argparse.ArgumentParser()
    add_corpus_args(parser)
    specs = {s.name: s for s in splits_from_args(parser.parse_args(["--out", "x", "--augment", profile]))}
    expected = {"full": AugmentConfig(), "classic": AugmentConfig.classic(), "clean": AugmentConfig.clean()}[profile]
    assert specs["train"].augment == expected and specs["dev"].augment == expected
    for name in ("test_seen_voices", "test_heldout_engine", "everyday"):
        assert specs[name].augment == AugmentConfig.clean()
    assert parser.parse_args(["--out", "x"]).augment == "full"
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--augment", "loud"])


def test_band_limit_and_speed() -> None:
    """The telephone band cuts 100 Hz and 6 kHz by over 30 dB and passes 1 kHz; speed 1.1 shortens 1/1.1."""
    for freq_hz, passes in ((100, False), (1000, True), (6000, False)):
        ratio_db = 10 * np.log10(power(band_limit(_tone(freq_hz), 300, 3400)) / power(_tone(freq_hz)))
        assert (ratio_db > -0.5) if passes else (ratio_db < -30), (freq_hz, ratio_db)
    assert change_speed(_tone(440), 1.1).size == pytest.approx(SR / 1.1, abs=2)


def test_encoder_frames() -> None:
    """M = S // 160 mel frames, then three causal stride-2 convs L -> L // 2 + 1."""
    assert encoder_frames(16000) == 14  # 100 -> 51 -> 26 -> 14
    assert encoder_frames(160 * 8) == 2  # 8 -> 5 -> 3 -> 2
    assert encoder_frames(0) == 1  # 0 -> 1 -> 1 -> 1


def test_tokenizer_trains_on_tiny_text(tmp_path: Path) -> None:
    """A BPE model trains on a few sentences; <unk> is 0 and there are no BOS/EOS pieces."""
    import sentencepiece as spm

    texts = [s.lower().rstrip(".!?") for s in split_sentences(" ".join(_write_fortunes_text()))]
    model = train_tokenizer(texts, tmp_path / "tokenizer.model", vocab_size=40)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.unk_id() == 0 and sp.bos_id() == -1 and sp.eos_id() == -1
    assert sp.get_piece_size() <= 40 and (tmp_path / "tokenizer.vocab").exists()
    assert sp.decode(sp.encode("the cat sat on the mat")) == "the cat sat on the mat"
    stats = token_overflow(model, [{"text": "the cat sat on the mat", "num_samples": 1600}])
    assert stats["fraction_tokens_exceed_frames"] == 1.0  # 0.1 s gives 3 encoder frames


def _write_fortunes_text() -> list[str]:
    return ["The cat sat on the mat.", "The dog sat on the log.", "A stitch in time saves nine."] * 5


@pytest.mark.skipif(not HAS_TTS, reason="needs espeak-ng, flite and festival")
def test_tiny_corpus_builds_and_resumes(tmp_path: Path) -> None:
    """Two workers write consistent shards; splits are disjoint; a rerun redoes only the missing shard."""
    roots = {"fortunes": _write_fortunes(tmp_path / "fortunes")}
    mix = TextMix(everyday=0.5, common=0.5, rare=0.0)
    clean = AugmentConfig.clean()
    seen = {"espeak": 0.5, "flite": 0.5}
    specs = [
        SplitSpec("train", seen, mix=mix, hours=0.006, excluded_voices=("flite:kal16",)),
        SplitSpec("dev", seen, mix=mix, num_utterances=3, excluded_voices=("flite:kal16",)),
        SplitSpec("test_heldout_engine", {"festival": 1.0}, mix=mix, augment=clean, num_utterances=2),
    ]
    out = tmp_path / "corpus"
    summary = build_corpus(out, specs, workers=2, seed=5, shard_utterances=3, vocab_size=48, text_roots=roots)

    entries = {s.name: [json.loads(x) for x in (out / f"{s.name}.jsonl").read_text().splitlines()] for s in specs}
    assert summary["splits"]["dev"]["utterances"] == 3 and len(entries["test_heldout_engine"]) == 2
    assert len(entries["train"]) >= 4
    for split, rows in entries.items():
        for row in rows:
            audio = load_audio(out, row)
            assert audio.dtype == np.int16 and audio.size == row["num_samples"] > SR // 5
            assert row["duration_s"] == pytest.approx(audio.size / SR, abs=1e-3)
            assert np.abs(audio).max() > 1000, row["id"]  # speech, not silence
            assert (row["engine"] == "festival") == (split == "test_heldout_engine")
            assert row["voice"] != "flite:kal16"
    texts = {split: {r["text"] for r in rows} for split, rows in entries.items()}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test_heldout_engine"]
    assert (out / "tokenizer.model").exists() and (out / "plan.json").exists()

    shard = out / "train" / "shard-00001"
    kept = out / "train" / "shard-00000.npy"
    before_audio, kept_mtime = np.load(f"{shard}.npy"), kept.stat().st_mtime_ns
    Path(f"{shard}.jsonl").unlink()
    build_corpus(out, specs, workers=1, seed=5, shard_utterances=3, vocab_size=0, text_roots=roots)
    assert kept.stat().st_mtime_ns == kept_mtime  # finished shards are skipped
    assert np.array_equal(np.load(f"{shard}.npy"), before_audio)  # the redone shard is identical
    assert Path(f"{shard}.jsonl").exists()
