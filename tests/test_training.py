"""Training pipeline on a tiny synthetic corpus: batches, SpecAugment, WER, train/resume, run files, export."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor

from streamer.asr.encoder import rel_positional_table
from streamer.asr.model import AsrModel
from streamer.errors import ConfigError
from streamer.training.cli import add_training_parsers
from streamer.training.data import (
    BatchFeaturizer,
    Utterance,
    load_utterances,
    plan_epoch,
    spec_augment,
)
from streamer.training.evaluate import (
    character_error_rate,
    edit_distance,
    markdown_table,
    normalize_words,
    word_error_rate,
)
from streamer.training.optim import build_optimizer, learning_rate, scheduled_lr
from streamer.training.recipe import BatchingConfig, SpecAugmentConfig, load_recipe, recipe_from_dict
from streamer.training.rundir import export_nemo, load_run
from streamer.training.speed import TapDepthwiseConv2d, use_input_normalization
from streamer.training.step import bf16_supported, compute_loss, train_step, training_device
from streamer.training.tokenizer import train_tokenizer
from streamer.training.trainer import Trainer, train

WORDS = ["red", "green", "blue", "one", "two", "three", "stop", "go", "left", "right", "up", "down"]
RATE = 16000


def _word_audio(word: str) -> np.ndarray:
    """Each letter is a 50 ms tone of its own pitch: a learnable stand-in for speech."""
    t = np.arange(int(0.05 * RATE)) / RATE
    tones = [np.sin(2 * np.pi * (200 + 60 * (ord(c) - 96)) * t) for c in word]
    return np.concatenate([*tones, np.zeros(int(0.04 * RATE))])


def _write_split(root: Path, split: str, count: int, rng: np.random.Generator) -> list[str]:
    (root / split).mkdir(parents=True)
    audio, lines, texts, offset = [], [], [], 0
    for i in range(count):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(2, 5))]
        samples = np.concatenate([np.zeros(800), *(_word_audio(w) for w in words), np.zeros(800)])
        samples = (0.3 * samples + 0.003 * rng.standard_normal(len(samples))) * 32767
        audio.append(samples.astype(np.int16))
        text = " ".join(words)
        texts.append(text)
        lines.append(
            json.dumps(
                {
                    "id": f"{split}-{i}",
                    "audio": f"{split}/shard-00000.npy",
                    "offset": offset,
                    "num_samples": len(samples),
                    "duration_s": len(samples) / RATE,
                    "text": text,
                }
            )
        )
        offset += len(samples)
    np.save(root / split / "shard-00000.npy", np.concatenate(audio))
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    texts = _write_split(root, "train", 48, rng)
    _write_split(root, "dev", 6, rng)
    train_tokenizer(texts, root / "tokenizer.model", 40)
    return root


def _recipe(corpus: Path, **train: object) -> dict:
    return {
        "name": "tiny",
        "seed": 7,
        "data": {"corpus_dir": str(corpus), "dev_utterances": 6, "workers": 0, "min_duration_s": 0.1},
        "batching": {"max_batch_mel_frames": 1600, "max_batch_utterances": 8},
        "spec_augment": {"freq_masks": 1, "freq_width": 8, "time_masks": 1, "time_width": 0.05, "start_step": 2},
        "model": {
            "encoder": {
                "n_layers": 2,
                "d_model": 32,
                "n_heads": 2,
                "subsampling_conv_channels": 8,
                "conv_kernel_size": 5,
                "att_context_sizes": [[4, 1], [4, 0]],
            },
            "transducer": {"pred_hidden": 32, "joint_hidden": 32, "durations": [0, 1, 2]},
        },
        "loss": {"omega": 0.0},
        "optim": {"lr": 3.0e-3, "warmup_steps": 4},
        "train": {
            "device": "cpu",  # bit-exact resume checks; the CUDA tests below ask for the GPU themselves
            "threads": 1,
            "max_steps": 12,
            "log_every_steps": 4,
            "val_every_steps": 6,
            "val_att_context_sizes": [[4, 1]],
            **train,
        },
    }


# ------------------------------------------------------------------------------------------------
# Data


def _utts(lengths: list[int]) -> list[Utterance]:
    return [Utterance(str(i), "x.npy", 0, n * 160, "a", (1,)) for i, n in enumerate(lengths)]


def test_plan_epoch_packs_every_utterance_once_within_budget() -> None:
    """Each utterance appears once per epoch; padded frames stay within the budget; order is seeded."""
    rng = np.random.default_rng(1)
    utts = _utts(list(rng.integers(50, 900, 200)))
    cfg = BatchingConfig(max_batch_mel_frames=3000, max_batch_utterances=16, curriculum_epochs=1)
    for epoch in (0, 1):
        plan = plan_epoch(utts, cfg, seed=3, epoch=epoch)
        assert sorted(i for b in plan for i in b) == list(range(200))
        for batch in plan:
            longest = max(utts[i].num_mel_frames for i in batch)
            assert len(batch) == 1 or len(batch) * longest <= 3000
            assert len(batch) <= 16
        assert plan == plan_epoch(utts, cfg, seed=3, epoch=epoch)
    first = [max(utts[i].num_mel_frames for i in b) for b in plan_epoch(utts, cfg, 3, 0)]
    later = [max(utts[i].num_mel_frames for i in b) for b in plan_epoch(utts, cfg, 3, 1)]
    assert first[0] <= first[len(first) // 2] <= first[-1]  # curriculum: short batches first
    assert later != sorted(later)  # later epochs shuffle the batch order


def test_spec_augment_masks_what_it_says() -> None:
    """Masked cells hold mask_value, stay inside the bands and the utterance; no masks change nothing."""
    mel = torch.randn(3, 80, 200) + 5.0  # never exactly zero
    lengths = torch.tensor([200, 120, 40])
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=3, time_width=0.1, mask_value=0.0)
    out = spec_augment(mel, lengths, cfg, torch.Generator().manual_seed(0))
    masked = out == 0.0
    changed = out != mel
    assert torch.equal(masked, changed)
    for b in range(3):
        full_bins = masked[b].all(dim=1)  # frequency masks cover every frame
        other = masked[b] & ~full_bins[:, None]
        frames = other.any(dim=0).nonzero()[:, 0]
        assert int(full_bins.sum()) <= 2 * 9  # two bands of at most freq_width - 1 bins
        if len(frames):
            assert int(frames.max()) < int(lengths[b])  # time masks inside the utterance
            assert len(frames) <= 3 * max(1, int(0.1 * int(lengths[b])))
    none = SpecAugmentConfig(freq_masks=0, time_masks=0)
    assert torch.equal(spec_augment(mel, lengths, none, torch.Generator()), mel)


def test_featurizer_gives_unnormalised_log_mel(corpus: Path) -> None:
    """Batches hold raw log-mel (NeMo normalize NA), padded targets, and lengths S // 160."""
    from streamer.asr.config import FeatureConfig
    from streamer.asr.tokenizer import Tokenizer

    tok = Tokenizer.from_file(corpus / "tokenizer.model")
    utts = load_utterances(corpus, "dev", tok, min_duration_s=0.1)
    batch = BatchFeaturizer(corpus, FeatureConfig())(utts[:3])
    assert batch.mel.shape[:2] == (3, 80)
    assert batch.mel_lengths.tolist() == [u.num_samples // 160 for u in utts[:3]]
    assert batch.target_lengths.tolist() == [len(u.tokens) for u in utts[:3]]
    assert float(batch.mel[0, :, : int(batch.mel_lengths[0])].mean()) < -1.0  # log power, not z-scores


def test_extra_train_corpora_join_the_training_set(corpus: Path, tmp_path: Path) -> None:
    """data.extra_train: another corpus's first hours join training, read from its own folder, under their own ids."""
    extra = tmp_path / "replay"
    _write_split(extra, "train", 10, np.random.default_rng(5))
    entries = [json.loads(line) for line in (extra / "train.jsonl").read_text().splitlines()]
    first_four_h = sum(e["num_samples"] for e in entries[:4]) / RATE / 3600  # just past 3.5 utterances
    hours = (sum(e["num_samples"] for e in entries[:3]) / RATE / 3600 + first_four_h) / 2
    config = _recipe(corpus, max_steps=4, val_every_steps=4)
    config["data"]["extra_train"] = [{"corpus_dir": str(extra), "hours": hours}]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    trainer = Trainer(recipe_from_dict(config), tmp_path / "run")

    plain = Trainer(recipe_from_dict(_recipe(corpus)), tmp_path / "run")
    added = trainer.train_utts[len(plain.train_utts) :]
    assert trainer.train_utts[: len(plain.train_utts)] == plain.train_utts
    assert [u.text for u in added] == [e["text"] for e in entries[:4]]
    ids = [u.id for u in trainer.train_utts]
    assert len(set(ids)) == len(ids)  # "train-0" is in both corpora
    shard = np.load(extra / "train" / "shard-00000.npy")
    for utt, entry in zip(added, entries, strict=False):
        want = shard[entry["offset"] : entry["offset"] + entry["num_samples"]].astype(np.float32) / 32768
        assert np.array_equal(trainer.featurizer.waveform(utt), want)
    assert trainer.run() == 0


def test_extra_train_needs_a_corpus_dir(corpus: Path) -> None:
    config = _recipe(corpus)
    config["data"]["extra_train"] = [{"hours": 2}]
    with pytest.raises(ConfigError, match="corpus_dir"):
        recipe_from_dict(config)


# ------------------------------------------------------------------------------------------------
# WER


def test_word_error_rate() -> None:
    """Levenshtein over words; punctuation and case do not count."""
    assert edit_distance("a b c".split(), "a x c d".split()) == 2
    assert edit_distance([], "a b".split()) == 2
    assert normalize_words("Hello, World! it's") == ["hello", "world", "it's"]
    wer, errors, words = word_error_rate(["the cat sat", "on the mat"], ["the cat sat", "on mat"])
    assert (errors, words) == (1, 6) and math.isclose(wer, 1 / 6)
    # CER counts letters and the spaces between words: "on mat" lost "the " (4 of 21 characters)
    assert math.isclose(character_error_rate(["The cat sat.", "on the mat"], ["the cat sat", "on mat"]), 4 / 21)
    assert math.isclose(character_error_rate(["going to"], ["gary to"]), 4 / 8)


def test_results_csv_refuses_to_mix_columns(tmp_path: Path) -> None:
    """Rows are appended under their own header; a file with other columns gets a clear error, not mixed rows."""
    from streamer.training.evaluate import ResultRow, write_results

    row = ResultRow("m", "dev", "offline", "[70,13]", 1040.0, 1120.0, 3, 10, 12.5, 0.0, 0.0, cer_percent=4.0)
    path = tmp_path / "results.csv"
    write_results([row], path)
    write_results([row], path)
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 2 and read[1]["cer_percent"] == "4.0" and read[1]["wer_percent"] == "12.5"
    old = tmp_path / "old.csv"
    old.write_text("model,split,wer_percent\nm,dev,12.5\n")
    with pytest.raises(ValueError, match="give --results a new file"):
        write_results([row], old)
    assert old.read_text() == "model,split,wer_percent\nm,dev,12.5\n"


# ------------------------------------------------------------------------------------------------
# Training


def test_loss_goes_down(corpus: Path, tmp_path: Path) -> None:
    """A tiny model's loss on a fixed batch falls after a few steps."""
    recipe = recipe_from_dict(_recipe(corpus, max_steps=16))
    (tmp_path / "checkpoints").mkdir()
    trainer = Trainer(recipe, tmp_path)
    batch = next(trainer._batches())[2]

    def loss() -> float:
        with torch.no_grad():
            return float(compute_loss(trainer.model, batch, (4, 1), trainer.loss_fn, recipe)[0])

    before = loss()
    trainer.run()
    assert loss() < 0.8 * before


def test_the_last_step_is_validated_even_off_the_validation_interval(corpus: Path, tmp_path: Path) -> None:
    """max_steps 8 with validation every 6 steps: results.csv has rows for steps 6 and 8."""
    recipe = recipe_from_dict(_recipe(corpus, max_steps=8, val_every_steps=6))
    (tmp_path / "checkpoints").mkdir()
    assert Trainer(recipe, tmp_path).run() == 0
    with (tmp_path / "results.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == [6, 8]


def test_resume_continues_exactly(corpus: Path, tmp_path: Path) -> None:
    """Stopping at step 3 and resuming to step 6 gives the weights of 6 uninterrupted steps."""
    straight = recipe_from_dict(_recipe(corpus, max_steps=6))
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(straight.to_dict()))
    _, run_a = train(config, None, tmp_path / "a")
    _, run_b = train(config, None, tmp_path / "b", overrides={"train": {"max_steps": 3}})
    state_b = torch.load(run_b / "checkpoints" / "latest.pt", weights_only=False)
    assert state_b["progress"]["step"] == 3
    cfg = yaml.safe_load((run_b / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 6
    (run_b / "config.yaml").write_text(yaml.safe_dump(cfg))
    train(None, run_b, tmp_path / "b")
    a = torch.load(run_a / "checkpoints" / "latest.pt", weights_only=False)
    b = torch.load(run_b / "checkpoints" / "latest.pt", weights_only=False)
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    assert a["progress"]["batch_in_epoch"] == b["progress"]["batch_in_epoch"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    assert a["loss_rng"] == b["loss_rng"]


def test_sigterm_to_the_process_group_saves_and_exits_0(corpus: Path, tmp_path: Path) -> None:
    """Ctrl-C or systemctl stop signal the trainer and its data worker alike: it saves latest.pt and exits 0."""
    config = tmp_path / "recipe.yaml"
    recipe = _recipe(corpus, max_steps=100000, log_every_steps=1, val_every_steps=100000)
    recipe["data"]["workers"] = 1
    config.write_text(yaml.safe_dump(recipe))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "train", "--config", str(config), "--runs", str(tmp_path / "runs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # until a few steps are done
        lines.append(line)
        if " step 3 " in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out
    (run,) = (tmp_path / "runs").iterdir()
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    assert state["progress"]["step"] >= 3
    assert "Traceback" not in out


def test_run_directory_files(corpus: Path, tmp_path: Path) -> None:
    """config.yaml, train.log, metrics.json, results.csv and both checkpoints exist and parse."""
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_recipe(corpus)))
    status, run = train(config, None, tmp_path / "runs")
    assert status == 0 and run.parent == tmp_path / "runs" and run.name.endswith("_tiny")
    assert recipe_from_dict(yaml.safe_load((run / "config.yaml").read_text())).name == "tiny"
    assert "step 12" in (run / "train.log").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["best_wer_percent"] is not None
    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [6, 12]
    assert all(0.0 <= float(r["wer_4_1"]) for r in rows)
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "latest.pt").is_file()

    # Export: the .nemo reads back with equal outputs.
    out = tmp_path / "model.nemo"
    model = export_nemo(run, out, "latest")
    loaded = AsrModel.load(str(out))
    assert loaded.config.encoder == model.config.encoder and loaded.decoder_kinds == ("tdt", "ctc")
    mel = torch.randn(2, 80, 150, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for ctx in ((4, 1), (4, 0)):
            a, _ = model.encoder(mel, torch.tensor([150, 90]), ctx)
            b, _ = loaded.encoder(mel, torch.tensor([150, 90]), ctx)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert load_run(run, "best")[1] == (corpus / "tokenizer.model").read_bytes()


def test_warm_start_from_exported_nemo(corpus: Path, tmp_path: Path) -> None:
    """A run started from an exported .nemo begins with its weights and step count and re-warms the lr."""
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_recipe(corpus, max_steps=5)))
    _, first = train(config, None, tmp_path / "runs")
    out = tmp_path / "model" / "model.nemo"
    out.parent.mkdir()
    export_nemo(first, out, "latest")
    record = json.loads((out.parent / "training.json").read_text())
    assert record["step"] == 5 and record["audio_seconds"] > 0

    recipe = recipe_from_dict(_recipe(corpus, max_steps=9, init_from=str(out)))
    (tmp_path / "warm" / "checkpoints").mkdir(parents=True)
    trainer = Trainer(recipe, tmp_path / "warm")
    exported = AsrModel.load(str(out)).state_dict()
    for key, value in trainer.model.state_dict().items():  # float rounding through the input normalisation
        torch.testing.assert_close(value, exported[key], msg=key)
    assert trainer.progress.step == 5 and trainer.progress.warm_start_step == 5
    assert trainer.progress.audio_seconds == pytest.approx(record["audio_seconds"])
    rates = []
    for _ in range(3):
        rates.append(scheduled_lr(recipe, trainer.progress))
        trainer.progress.step += 1
    assert 0 < rates[0] < rates[1] < rates[2] <= learning_rate(recipe, 7)
    trainer.progress.step = 5
    assert trainer.run() == 0 and trainer.progress.step == 9
    changed = any(not torch.equal(v, exported[k]) for k, v in trainer.model.state_dict().items())
    assert changed

    wrong = _recipe(corpus, init_from=str(out))
    wrong["model"]["encoder"]["d_model"] = 16
    (tmp_path / "bad" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="model shape"):
        Trainer(recipe_from_dict(wrong), tmp_path / "bad")


def test_cooldown_takes_the_schedule_linearly_to_min_lr_at_max_steps(tmp_path: Path) -> None:
    """optim.anneal_steps: the schedule is untouched before the cooldown, then falls linearly to min_lr."""
    base = _recipe(tmp_path, max_steps=1000)
    base["optim"] = {"lr": 1.0e-3, "warmup_steps": 100, "min_lr": 1.0e-5}
    plain = recipe_from_dict(base)
    cooled = recipe_from_dict({**base, "optim": {**base["optim"], "anneal_steps": 300}})
    for step in (0, 99, 100, 500, 699):
        assert learning_rate(cooled, step) == learning_rate(plain, step)
    tail = [learning_rate(cooled, step) for step in range(700, 1000)]
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False))
    assert tail[0] == pytest.approx(learning_rate(plain, 700), rel=0.01)
    assert tail[150] == pytest.approx(1.0e-5 + (learning_rate(plain, 850) - 1.0e-5) * 149 / 300)
    assert tail[-1] == pytest.approx(1.0e-5)
    with pytest.raises(ConfigError, match="anneal_steps"):
        recipe_from_dict({**base, "optim": {**base["optim"], "anneal_steps": 1001}})


def test_training_device_names() -> None:
    """train.device: cpu, auto (the GPU only where torch sees one) and clear errors for the rest."""
    assert training_device("cpu") == torch.device("cpu")
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device"):
        training_device("gpu0")
    with pytest.raises(ConfigError, match="not supported"):
        training_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            training_device("cuda")


def test_bf16_trains_in_float32_where_the_cpu_has_no_native_bfloat16(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """train.bf16 (the recipe default) asks for bfloat16 autocast. On an AVX2-only CPU oneDNN's LSTM refuses
    bf16 ("could not create a primitive descriptor"), so there the run says so and trains in float32; where
    the CPU has it (AVX-512 bf16, AMX) the run keeps it. Either way a step trains."""
    recipe = recipe_from_dict(_recipe(corpus, bf16=True))
    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level("WARNING", logger="streamer.training.trainer"):
        trainer = Trainer(recipe, tmp_path)
    native = bf16_supported(torch.device("cpu"))
    assert trainer.recipe.train.bf16 is native
    assert ("no native bfloat16" in caplog.text) is (not native)
    batch = next(trainer._batches())[2]
    result = train_step(trainer.model, trainer.optimizer, batch, (4, 1), trainer.loss_fn, trainer.recipe, 1e-3)
    assert math.isfinite(result.loss) and math.isfinite(result.grad_norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_on_cuda_equals_a_step_on_the_cpu(corpus: Path, tmp_path: Path) -> None:
    """The same weights, batch and look-ahead: loss, gradient norm and updated weights agree (fp32)."""
    recipe = recipe_from_dict(_recipe(corpus, bf16=False))
    (tmp_path / "checkpoints").mkdir()
    trainer = Trainer(recipe, tmp_path)
    batch = next(trainer._batches())[2]
    results, weights = [], []
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(trainer.model).to(device)
        optimizer = build_optimizer(model, recipe)
        results.append(train_step(model, optimizer, batch, (4, 1), trainer.loss_fn, recipe, 1e-3))
        weights.append({k: v.cpu() for k, v in model.state_dict().items()})
    cpu, gpu = results
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-4)
    assert gpu.parts["ctc"] == pytest.approx(cpu.parts["ctc"], rel=1e-4)
    assert gpu.grad_norm == pytest.approx(cpu.grad_norm, rel=1e-3)
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_on_cuda_learns_and_exports_a_model_the_cpu_loads(corpus: Path, tmp_path: Path) -> None:
    """train.device=cuda (bf16): the loss falls, checkpoints and the exported .nemo load on the CPU."""
    recipe = recipe_from_dict(_recipe(corpus, device="cuda", max_steps=16))
    (tmp_path / "checkpoints").mkdir()
    trainer = Trainer(recipe, tmp_path)
    assert next(trainer.model.parameters()).device.type == "cuda"
    batch = next(trainer._batches())[2]

    def loss() -> float:
        with torch.no_grad():
            return float(compute_loss(trainer.model, batch, (4, 1), trainer.loss_fn, recipe)[0])

    before = loss()
    assert trainer.run() == 0
    assert loss() < 0.8 * before
    out = tmp_path / "model" / "model.nemo"
    out.parent.mkdir()
    model = export_nemo(tmp_path, out, "latest")
    assert next(model.parameters()).device.type == "cpu"
    loaded = AsrModel.load(str(out))
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.cpu(), msg=key)


# ------------------------------------------------------------------------------------------------
# Pieces


def test_tap_depthwise_conv_equals_conv2d() -> None:
    """The training depthwise conv gives Conv2d's outputs and gradients."""
    conv = torch.nn.Conv2d(6, 6, 3, 2, groups=6).double()
    x = torch.randn(2, 6, 15, 11, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    ref = conv(x)
    ref.backward(grad)
    expected = (ref.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad, conv.weight.grad, conv.bias.grad = None, None, None
    conv.__class__ = TapDepthwiseConv2d
    out = conv(x)
    out.backward(grad)
    for got, want in zip((out.detach(), x.grad, conv.weight.grad, conv.bias.grad), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_input_normalization_keeps_the_model_and_its_state_dict() -> None:
    """The reparametrised first conv computes the same function and saves/loads plain NeMo weights."""
    from tests.tiny import tiny_model

    model = tiny_model()
    mel = torch.randn(2, 80, 120, generator=torch.Generator().manual_seed(3)) * 6 - 5
    lengths = torch.tensor([120, 77])
    with torch.no_grad():
        before, _ = model.encoder(mel, lengths, (70, 1))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    conv = use_input_normalization(model.encoder, mean=-5.0, std=6.0)
    torch.testing.assert_close(conv.weight, plain["encoder.pre_encode.conv.0.weight"] * 6.0)  # what Adam sees
    with torch.no_grad():
        after, _ = model.encoder(mel, lengths, (70, 1))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    saved = model.state_dict()
    assert saved.keys() == plain.keys()
    for key, value in plain.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-5, msg=key)
    with torch.no_grad():  # a new function, loaded from plain weights, computes what the plain model computes
        conv.weight.mul_(0.5)
    model.load_state_dict(plain)
    with torch.no_grad():
        again, _ = model.encoder(mel, lengths, (70, 1))
    torch.testing.assert_close(again, before, rtol=1e-4, atol=1e-4)


def _front_end_output(trainer: Trainer) -> Tensor:
    """The xscaled pre_encode output over the valid frames of every train utterance."""
    enc = trainer.model.encoder
    batch = trainer.featurizer(trainer.train_utts)
    with torch.no_grad():
        y, _, lengths = enc.pre_encode(
            batch.mel.transpose(1, 2), torch.zeros_like(batch.mel_lengths), batch.mel_lengths
        )
    y = y * (enc.xscale or 1.0)
    valid = torch.arange(y.size(1))[None, :] < lengths[:, None]
    return y[valid]


def test_center_front_end_removes_the_constant_the_blocks_would_inherit(corpus: Path, tmp_path: Path) -> None:
    """The front end's output starts dominated by one constant vector; centring leaves it zero-mean and unit-std."""
    plain = Trainer(recipe_from_dict(_recipe(corpus)), tmp_path / "plain")
    centred = Trainer(recipe_from_dict(_recipe(corpus, center_front_end=True)), tmp_path / "centred")
    before = _front_end_output(plain)
    after = _front_end_output(centred)
    assert float(before.mean(0).norm()) > float((before - before.mean(0)).std())  # the constant dominates
    assert float(after.mean(0).norm()) < 0.05 * float(after.std())
    assert float((after - after.mean(0)).std()) == pytest.approx(1.0, rel=0.05)
    keys = {k: v.shape for k, v in plain.model.state_dict().items()}
    assert {k: v.shape for k, v in centred.model.state_dict().items()} == keys


def test_zero_residual_branches_start_every_block_as_its_layer_norm(corpus: Path, tmp_path: Path) -> None:
    """residual_init_scale 0: each block starts as LayerNorm(input), so the audio's signal passes every block."""
    trainer = Trainer(recipe_from_dict(_recipe(corpus, residual_init_scale=0.0)), tmp_path)
    enc = trainer.model.encoder
    x = torch.randn(2, 40, enc.cfg.d_model, generator=torch.Generator().manual_seed(5))
    pos = rel_positional_table(40, enc.cfg.d_model)
    with torch.no_grad():
        for layer in enc.layers:
            y = layer(x, layer.self_attn.project_pos(pos), None, None)
            torch.testing.assert_close(y, layer.norm_out(x))
    default = Trainer(recipe_from_dict(_recipe(corpus)), tmp_path / "default").model.encoder.layers[0]
    with torch.no_grad():
        y = default(x, default.self_attn.project_pos(pos), None, None)
    assert not torch.allclose(y, default.norm_out(x), atol=1e-3)


def test_recipe_rejects_unknown_keys() -> None:
    """A typo in a recipe is an error that suggests the right key."""
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        recipe_from_dict({"train": {"max_step": 3}})
    with pytest.raises(ConfigError, match="multiple of right"):
        recipe_from_dict(
            {"model": {"encoder": {"att_context_sizes": [[70, 2]]}}, "train": {"val_att_context_sizes": [[70, 2]]}}
        )


def test_recipe_reads_exponent_numbers_without_a_dot() -> None:
    """YAML 1.1 reads ``3e-4`` as a string (``--set optim.lr=3e-4`` gave one and AdamW crashed on it)."""
    assert recipe_from_dict({"optim": {"lr": "3e-4"}}).optim.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="optim.lr' must be a number"):
        recipe_from_dict({"optim": {"lr": "fast"}})


def test_recipe_errors_name_the_file_every_wrong_key_and_what_it_must_be(tmp_path: Path) -> None:
    """A recipe file with several mistakes gets one error naming the file and each key; empty sections are defaults."""
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\ntrain:\n  max_steps: '3'\n  bf16: yes please\noptim:\n  schedule: linear\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"recipe {path}: ")
    assert "'train.max_steps' must be an integer, got '3'" in message
    assert "'train.bf16' must be true or false" in message
    assert "'optim.schedule'" in message and "'noam' or 'cosine'" in message
    with pytest.raises(ConfigError, match=r"att_context_sizes\[0\]'.* at least 2 items"):
        recipe_from_dict({"model": {"encoder": {"att_context_sizes": [[70]]}}})
    with pytest.raises(ConfigError, match="recipe section 'data' must be a mapping"):
        recipe_from_dict({"data": ["corpus"]})
    path.write_text("name: tiny\ndata:\nmodel:\n  encoder:\n")
    assert load_recipe(path).to_dict() == {**recipe_from_dict({}).to_dict(), "name": "tiny"}


def test_cli_registers_training_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """corpus, train, eval and export parse, and their help explains resuming and exporting."""
    parser = argparse.ArgumentParser(prog="streamer")
    add_training_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--resume", "runs/x"])
    assert args.resume == Path("runs/x") and callable(args.func)
    assert parser.parse_args(["export", "runs/x", "--out", "m.nemo"]).checkpoint == "best"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_markdown_table_lists_splits_and_latency() -> None:
    """The model-card table has one row per split and a latency row per streaming look-ahead."""
    from streamer.training.evaluate import ResultRow

    rows = [
        ResultRow("m", "dev", mode, "[70,1]", 80.0, 160.0, 3, 10, 12.5, 4.0 if mode == "streaming" else 0.0, 30.0)
        for mode in ("offline", "streaming")
    ]
    table = markdown_table(rows)
    assert "| dev | 12.50% | 12.50% |" in table and "| [70,1] 80 ms | 160 ms |" in table
