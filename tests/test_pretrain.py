"""Best-RQ pretraining (`streamer pretrain`) on a few espeak-ng clips: quantizer, masking, runs, resume, init_from."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import soxr
import torch
import yaml

from streamer.errors import ConfigError
from streamer.training.bestrq import (
    RandomProjectionQuantizer,
    expected_mask_share,
    make_targets,
    span_mask,
    stack_to_encoder_frames,
)
from streamer.training.pretrain_checkpoint import load_pretrain_file, load_pretrained_encoder
from streamer.training.pretrain_recipe import BestRqSection, load_pretrain_recipe, pretrain_recipe_from_dict
from streamer.training.pretrainer import Pretrainer, pretrain
from streamer.training.recipe import recipe_from_dict
from streamer.training.trainer import Trainer
from tests.test_training import _recipe as tdt_recipe
from tests.test_training import corpus as corpus  # noqa: F401 - the TDT corpus fixture, used by init_from

SENTENCES = [
    "turn on the kitchen lights",
    "set a timer for ten minutes",
    "what is the weather like tomorrow",
    "play some quiet music in the living room",
    "remind me to call my sister at six",
    "how long does it take to boil an egg",
    "open the garage door please",
    "the quick brown fox jumps over the lazy dog",
    "switch off every light downstairs",
    "what time is it in tokyo",
]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten espeak-ng sentences in three formats and rates, in nested folders (what `transcribe` reads)."""
    root = tmp_path_factory.mktemp("unlabelled")
    (root / "a" / "b").mkdir(parents=True)
    for i, text in enumerate(SENTENCES):
        wav = root / f"s{i}.wav"
        voice = ["en-us", "en", "en-gb-x-rp"][i % 3]
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True)  # 22.05 kHz
        if i % 3 == 1:  # FLAC at 16 kHz in a subfolder
            samples, rate = sf.read(wav)
            sf.write(root / "a" / f"s{i}.flac", soxr.resample(samples, rate, 16000), 16000)
            wav.unlink()
        elif i % 3 == 2 and i > 2:  # Ogg Vorbis two folders down
            samples, rate = sf.read(wav)
            sf.write(root / "a" / "b" / f"s{i}.ogg", samples, rate)
            wav.unlink()
    (root / "notes.txt").write_text("not audio: ignored by extension")
    return root


def _pretrain_recipe(audio: Path, **train: object) -> dict:
    return {
        "name": "tiny-bestrq",
        "seed": 3,
        "data": {"audio_dir": str(audio), "dev_clips": 2, "workers": 0, "min_duration_s": 0.5},
        "batching": {"max_batch_mel_frames": 1600, "max_batch_utterances": 4},
        "bestrq": {"codebook_size": 64, "code_dim": 16},
        "model": {
            "encoder": {
                "n_layers": 2,
                "d_model": 32,
                "n_heads": 2,
                "subsampling_conv_channels": 8,
                "conv_kernel_size": 5,
                "att_context_sizes": [[4, 1], [4, 0]],
            }
        },
        "optim": {"lr": 3.0e-3, "warmup_steps": 4},
        "train": {
            "device": "cpu",
            "threads": 1,
            "max_steps": 8,
            "log_every_steps": 4,
            "val_every_steps": 4,
            "val_att_context_size": [4, 1],
            **train,
        },
    }


def _write(tmp_path: Path, recipe: dict) -> Path:
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(recipe))
    return config


# ------------------------------------------------------------------------------------------------
# The method


def test_quantizer_is_frozen_and_deterministic() -> None:
    """Same seed -> same projection, codebook and targets; another seed -> other targets; nothing trains."""
    cfg = BestRqSection(codebook_size=256, code_dim=16, num_codebooks=2)
    a, b, c = (RandomProjectionQuantizer(640, cfg, s) for s in (5, 5, 6))
    assert not list(a.parameters())  # buffers only: no optimizer sees them
    assert set(dict(a.named_buffers())) == {"projection", "codebook"}
    torch.testing.assert_close(a.codebook.norm(dim=-1), torch.ones(2, 256))
    x = torch.randn(500, 640, generator=torch.Generator().manual_seed(0))
    codes = a(x)
    assert codes.shape == (500, 2) and codes.dtype == torch.int64
    assert torch.equal(codes, b(x))
    assert (codes != c(x)).float().mean() > 0.5
    assert len(codes[:, 0].unique()) > 50  # random inputs spread over the codebook


def test_stacking_gives_each_encoder_frame_the_mel_frames_it_sees() -> None:
    """Causal 8x: encoder frame t sees mel frames up to 8t, and its target stacks frames 8t-7..8t."""
    m = 37
    mel = torch.arange(1, m + 1, dtype=torch.float32)[None, None, :].repeat(1, 2, 1)  # (1, F=2, M), value = index + 1
    stacked = stack_to_encoder_frames(mel, frames=5)  # causal 8x of 37 frames: 5 encoder frames
    assert stacked.shape == (1, 5, 16)
    first_bin = stacked[0, :, 0::2]  # (T, 8): bin 0 of each stacked mel frame
    for t in range(5):
        expected = [i + 1 if 0 <= i < m else 0 for i in range(8 * t - 7, 8 * t + 1)]
        assert first_bin[t].tolist() == expected


def test_masking_covers_the_configured_share() -> None:
    """Spans of 40 frames starting with p = 0.01 cover 1 - 0.99^40 = 33.1% of long inputs; none past the end.

    64 rows x 6000 frames hold ~3,800 spans: the measured share's standard deviation is below 0.005, so
    +-0.02 fails only when the share is wrong.
    """
    cfg = BestRqSection()
    lengths = torch.full((64,), 6000)
    lengths[1] = 3000
    mask = span_mask(lengths, 6000, cfg, torch.Generator().manual_seed(1))
    assert not mask[1, 3000:].any()
    share = float(mask[:, 200:2800].float().mean())  # away from the edges
    assert share == pytest.approx(expected_mask_share(cfg), abs=0.02)
    assert expected_mask_share(cfg) == pytest.approx(0.331, abs=0.001)
    # A run of masked frames is at least one span long (unless cut by the end of the utterance).
    row = mask[0].int().tolist()
    runs, n = [], 0
    for v in [*row[:5000], 0]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert runs and min(runs) >= 40
    other = BestRqSection(mask_start_prob=0.004, mask_span_frames=20)
    share = float(span_mask(lengths, 6000, other, torch.Generator().manual_seed(2))[:, 200:2800].float().mean())
    assert share == pytest.approx(expected_mask_share(other), abs=0.02)


def test_every_short_utterance_gets_a_span_and_masked_frames_become_noise() -> None:
    """An utterance that drew no span still carries loss; masked input is noise around its own level."""
    cfg = BestRqSection(codebook_size=32)
    q = RandomProjectionQuantizer(640, cfg, 0)
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(8, 80, 120, generator=g) * 3 - 5
    lengths = torch.tensor([120, 100, 80, 60, 120, 100, 80, 60])
    targets = make_targets(q, mel, lengths, cfg, torch.Generator().manual_seed(4))
    assert targets.loss_frames.any(1).all()
    assert not (targets.loss_frames & ~targets.valid_frames).any()
    kept = ~targets.mel_mask[:, None, :].expand_as(mel)
    assert torch.equal(targets.masked_mel[kept], mel[kept])
    masked = targets.masked_mel.transpose(1, 2)[targets.mel_mask]  # (frames, F)
    assert float(masked.mean()) == pytest.approx(-5, abs=0.3)  # each bin's mean, plus 0.1 std of noise
    assert 0.1 < float(masked.std()) < 1.5


# ------------------------------------------------------------------------------------------------
# Runs


def test_loss_goes_down(audio_dir: Path, tmp_path: Path) -> None:
    """Three dozen steps on eight clips take the masked-code loss on two fixed batches 20% below its start.

    The bound: at the start the head knows nothing, so the loss is near ln(64) = 4.16 (measured 4.5).
    A head that learned only how often each code occurs would reach the entropy of the codes on the
    masked frames (measured 3.15, 0.70 of the start); 36 steps of this tiny model reached 3.37 (0.75)
    and 100 steps 3.23, so 0.8 asks for most of that and leaves room for float differences between
    CPUs. The masks and look-aheads of the measurement are fixed, so only the model changes between.
    """
    recipe = pretrain_recipe_from_dict(_pretrain_recipe(audio_dir, max_steps=36, val_every_steps=1000))
    (tmp_path / "checkpoints").mkdir()
    trainer = Pretrainer(recipe, tmp_path)
    batches = [item[2] for _, item in zip(range(2), trainer._batches(), strict=False)]

    def loss() -> float:
        trainer.model.eval()
        total = 0.0
        with torch.no_grad():
            for i, batch in enumerate(batches):
                g = torch.Generator().manual_seed(100 + i)
                targets = make_targets(trainer.model.quantizer, batch.mel, batch.mel_lengths, recipe.bestrq, g)
                total += float(trainer.model(targets, batch.mel_lengths, (4, 1))[0])
        trainer.model.train()
        return total / len(batches)

    quantizer = {k: v.clone() for k, v in trainer.model.quantizer.state_dict().items()}
    before = loss()
    assert before == pytest.approx(math.log(64), abs=0.5)
    trainer.progress.epoch = trainer.progress.batch_in_epoch = 0
    assert trainer.run() == 0 and trainer.progress.step == 36
    after = loss()
    assert after < 0.8 * before, (before, after)
    for key, value in trainer.model.quantizer.state_dict().items():  # frozen through training
        assert torch.equal(value, quantizer[key])


def test_run_directory_files_and_the_encoder_loads_back(audio_dir: Path, tmp_path: Path) -> None:
    """config.yaml, train.log, metrics.json, results.csv, clips.jsonl and both checkpoints; best.pt's
    encoder loads into a plain FastConformer with the trained weights."""
    status, run = pretrain(_write(tmp_path, _pretrain_recipe(audio_dir)), None, tmp_path / "runs")
    assert status == 0 and run.name.endswith("_tiny-bestrq")
    assert load_pretrain_recipe(run / "config.yaml").name == "tiny-bestrq"
    log = (run / "train.log").read_text()
    assert "step 8 " in log and "masked-code accuracy" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 8 and metrics["skipped_files"] == 0 and metrics["best_dev_loss"] > 0
    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert "masked-code accuracy on dev" in (run / "curves.svg").read_text()  # redrawn at each validation
    assert all(0.0 <= float(r["dev_accuracy"]) <= 1.0 and float(r["dev_loss"]) > 0 for r in rows)
    clips = [json.loads(line) for line in (run / "clips.jsonl").read_text().splitlines()]
    assert {Path(c["audio"]).suffix for c in clips} == {".wav", ".flac", ".ogg"}
    assert len(clips) == len(SENTENCES)

    best = load_pretrain_file(run / "checkpoints" / "best.pt")
    encoder, recipe = load_pretrained_encoder(run / "checkpoints" / "best.pt")
    assert recipe.model.encoder.d_model == 32
    weights = {k.removeprefix("encoder."): v for k, v in best["model"].items() if k.startswith("encoder.")}
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out, lengths = encoder(mel, torch.tensor([200]), (4, 1))
    assert out.shape == (1, 26, 32) and torch.isfinite(out).all()


def test_resume_continues_exactly(audio_dir: Path, tmp_path: Path) -> None:
    """Stopping at step 3 and resuming to step 7 gives the weights of 7 uninterrupted steps."""
    config = _write(tmp_path, _pretrain_recipe(audio_dir, max_steps=7, val_every_steps=5))
    _, run_a = pretrain(config, None, tmp_path / "a")
    _, run_b = pretrain(config, None, tmp_path / "b", overrides={"train": {"max_steps": 3}})
    assert load_pretrain_file(run_b / "checkpoints" / "latest.pt")["progress"]["step"] == 3
    cfg = yaml.safe_load((run_b / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 7
    (run_b / "config.yaml").write_text(yaml.safe_dump(cfg))
    pretrain(None, run_b)
    a = load_pretrain_file(run_a / "checkpoints" / "latest.pt")
    b = load_pretrain_file(run_b / "checkpoints" / "latest.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 7
    assert a["progress"]["epoch"] == b["progress"]["epoch"] > 0  # 8 train clips, ~2 batches an epoch
    assert a["progress"]["batch_in_epoch"] == b["progress"]["batch_in_epoch"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    # The validations after the resume (steps 5 and 7) measure the same as the uninterrupted run's.
    rows_a, rows_b = (list(csv.DictReader((run / "results.csv").read_text().splitlines())) for run in (run_a, run_b))
    assert [(r["step"], r["dev_loss"], r["dev_accuracy"]) for r in rows_a] == [
        (r["step"], r["dev_loss"], r["dev_accuracy"]) for r in rows_b if int(r["step"]) > 3
    ]


def test_init_from_loads_the_pretrained_encoder_and_train_runs(
    audio_dir: Path,
    corpus: Path,  # noqa: F811 - the fixture imported from test_training
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TDT run with train.init_from = a pretrain checkpoint starts from its encoder (pre_encode and
    layers), keeps its own decoder, joint and CTC head, trains from step 0, and refuses another shape."""
    recipe = _pretrain_recipe(audio_dir, max_steps=4)
    tdt = tdt_recipe(corpus, max_steps=3, val_every_steps=3)
    recipe["model"]["encoder"] = tdt["model"]["encoder"]
    _, run = pretrain(_write(tmp_path, recipe), None, tmp_path / "runs")
    best = run / "checkpoints" / "best.pt"
    pretrained = {k: v for k, v in load_pretrain_file(best)["model"].items() if k.startswith("encoder.")}

    tdt["train"]["init_from"] = str(best)
    (tmp_path / "ft" / "checkpoints").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="streamer"):
        trainer = Trainer(recipe_from_dict(tdt), tmp_path / "ft")
    assert "loaded the pretrained encoder" in caplog.text
    assert trainer.init_report is not None
    loaded, fresh = trainer.init_report
    assert set(loaded) == set(pretrained) and any(k.startswith("encoder.pre_encode.") for k in loaded)
    assert any(k.startswith("encoder.layers.1.") for k in loaded)
    assert {k.split(".")[0] for k in fresh} >= {"decoder", "joint", "ctc_decoder"}
    state = trainer.model.state_dict()
    for key, value in pretrained.items():  # float rounding through the input normalisation's round trip
        torch.testing.assert_close(state[key], value, msg=key)
    assert trainer.progress.step == 0 and trainer.progress.warm_start_step == -1
    assert trainer.run() == 0 and trainer.progress.step == 3
    assert any(not torch.equal(trainer.model.state_dict()[k], v) for k, v in pretrained.items())

    wrong = tdt_recipe(corpus, init_from=str(best))
    wrong["model"]["encoder"]["n_layers"] = 3
    (tmp_path / "bad" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="does not fit this recipe's model.encoder.*missing encoder.layers.2"):
        Trainer(recipe_from_dict(wrong), tmp_path / "bad")


# ------------------------------------------------------------------------------------------------
# Bad input


def test_empty_folder_and_a_folder_without_audio_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.md").write_text("no audio here")
    for folder in ("empty", "text"):
        config = _write(tmp_path, _pretrain_recipe(tmp_path / folder))
        with pytest.raises(ConfigError, match=r"no audio files \(.*\.wav.*\) under"):
            pretrain(config, None, tmp_path / "runs")
    config = _write(tmp_path, _pretrain_recipe(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is not a directory"):
        pretrain(config, None, tmp_path / "runs")


def test_unreadable_files_are_skipped_with_a_warning_and_counted(
    audio_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(audio_dir.rglob("*.wav"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    (folder / "empty.flac").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="streamer"):
        status, run = pretrain(_write(tmp_path, _pretrain_recipe(folder, max_steps=2)), None, tmp_path / "runs")
    assert status == 0
    assert "broken.wav" in caplog.text and "empty.flac" in caplog.text
    assert "2 of 6 audio files could not be read and were skipped" in caplog.text
    assert json.loads((run / "metrics.json").read_text())["skipped_files"] == 2
    assert len((run / "clips.jsonl").read_text().splitlines()) == 4

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "broken.wav").write_bytes(b"not a wave file")
    with pytest.raises(ConfigError, match=r"none of the 1 audio files .*\(1 unreadable\)"):
        pretrain(_write(tmp_path, _pretrain_recipe(only_bad)), None, tmp_path / "runs")


def test_recipe_errors_are_clear(audio_dir: Path, tmp_path: Path) -> None:
    base = _pretrain_recipe(audio_dir)
    with pytest.raises(ConfigError, match="unknown recipe key 'bestrq.codebok_size'; did you mean 'codebook_size'"):
        pretrain_recipe_from_dict({**base, "bestrq": {"codebok_size": 8}})
    with pytest.raises(ConfigError, match="exactly one of data.audio_dir"):
        pretrain_recipe_from_dict({**base, "data": {**base["data"], "corpus_dir": "x"}})
    with pytest.raises(ConfigError, match="mask_start_prob must lie in"):
        pretrain_recipe_from_dict({**base, "bestrq": {"mask_start_prob": 1.5}})
    few = _write(tmp_path, {**base, "data": {**base["data"], "dev_clips": 20}})
    with pytest.raises(ConfigError, match="10 clips of audio: pretraining needs more than data.dev_clips 20"):
        pretrain(few, None, tmp_path / "runs")


def test_the_shipped_pretrain_recipe_matches_the_tdt_encoder() -> None:
    models = Path(__file__).parent.parent / "models" / "streamer-tdt-small"
    pre = load_pretrain_recipe(models / "pretrain.yaml")
    tdt = recipe_from_dict(yaml.safe_load((models / "recipe.yaml").read_text()))
    assert pre.model.encoder == tdt.model.encoder


def test_cli_pretrains_a_corpus_split_without_its_text(
    corpus: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`streamer pretrain --config` on a corpus split (transcripts never read), then `--resume` adds steps."""
    recipe = _pretrain_recipe(tmp_path, max_steps=2, val_every_steps=2)
    recipe["data"] = {"corpus_dir": str(corpus), "corpus_split": "train", "dev_clips": 4, "workers": 1,
                      "min_duration_s": 0.3}  # fmt: skip
    config = _write(tmp_path, recipe)
    cmd = [sys.executable, "-m", "streamer", "pretrain", "--config", str(config), "--runs", str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert "step/s" in done.stderr or "s/step" in done.stderr  # the tqdm bar
    assert len((run / "clips.jsonl").read_text().splitlines()) == 48
    assert all(json.loads(line)["text"] == "" for line in (run / "clips.jsonl").read_text().splitlines())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    resume = [sys.executable, "-m", "streamer", "pretrain", "--resume", str(run)]
    done = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed at step 2" in done.stderr
    assert json.loads((run / "metrics.json").read_text())["step"] == 3


def test_data_train_hours_keeps_a_labelled_subset(
    corpus: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """data.train_hours (the fine-tuning half of the comparison): the leading utterances up to that much audio."""
    (tmp_path / "all" / "checkpoints").mkdir(parents=True)
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    everything = Trainer(recipe_from_dict(tdt_recipe(corpus)), tmp_path / "all").train_utts
    subset = tdt_recipe(corpus)
    subset["data"]["train_hours"] = 20 / 3600  # 20 s of the ~48 utterances' audio
    part = Trainer(recipe_from_dict(subset), tmp_path / "part").train_utts
    seconds = [u.num_samples / 16000 for u in part]
    assert part == everything[: len(part)] and 0 < len(part) < len(everything)
    assert sum(seconds[:-1]) < 20 <= sum(seconds)
