"""Paraformer: integrate-and-fire by hand, the losses, greedy decoding, and a tiny run through train, export,
transcribe, eval, buffered streaming and the daemon's file endpoint."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from streamer.asr.paraformer import (
    CONFIG_FILE,
    ParaformerConfig,
    ParaformerModel,
    cif_weights,
    integrate_and_fire,
    is_paraformer_dir,
)
from streamer.cli import main
from streamer.engine.buffered_paraformer import transcribe_buffered_paraformer
from streamer.engine.factory import load_recognizer
from streamer.engine.recognizer import transcribe_offline
from streamer.errors import CheckpointError, ConfigError
from streamer.settings import EngineSettings, ModelSettings
from streamer.training.curves import read_run
from streamer.training.evaluate import evaluate
from streamer.training.recipe import recipe_from_dict
from streamer.training.rundir import export_paraformer, load_run
from streamer.training.step import compute_loss
from streamer.training.tokenizer import train_tokenizer
from streamer.training.trainer import Trainer, train
from tests.serve_process import TIMEOUT, serve
from tests.test_training import RATE, _write_split

# --------------------------------------------------------------------------------------------------
# Integrate-and-fire by hand


def _fire(alphas: list[float], tail: float | None = 0.5) -> tuple[list[int], list[int], torch.Tensor]:
    """(count, fire frames, embeddings) with one-hot frames, so an embedding shows each frame's share."""
    a = torch.tensor([alphas])
    fired = integrate_and_fire(torch.eye(len(alphas))[None], a, torch.tensor([len(alphas)]), 1.0, tail)
    n = int(fired.counts[0])
    return [n], fired.frames[0, :n].tolist(), fired.embeds[0, :n]


def test_cif_splits_the_crossing_frame_between_two_tokens() -> None:
    # sums 0.3, 0.8, 1.2 (fires: frame 2 gives 0.2 to token 0 and 0.2 to token 1), 2.1 (fires), 2.3: leftover 0.3
    count, frames, embeds = _fire([0.3, 0.5, 0.4, 0.9, 0.2])
    assert count == [2] and frames == [2, 3]
    torch.testing.assert_close(embeds, torch.tensor([[0.3, 0.5, 0.2, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8, 0.0]]))


def test_cif_fires_a_tail_token_from_a_large_leftover_only() -> None:
    count, frames, embeds = _fire([0.3, 0.5, 0.4, 0.9, 0.4])  # leftover 0.5 -> a tail token at the last frame
    assert count == [3] and frames == [2, 3, 4]
    torch.testing.assert_close(embeds[2], torch.tensor([0.0, 0.0, 0.0, 0.1, 0.4]))
    assert _fire([0.3, 0.5, 0.4, 0.9, 0.4], tail=None)[0] == [2]  # a chunk mid-stream keeps its leftover
    assert _fire([0.3, 0.5, 0.4, 0.9, 0.3])[0] == [2]  # leftover 0.4 < 0.5


def test_cif_fires_twice_in_one_frame_when_its_weight_crosses_two_thresholds() -> None:
    count, frames, embeds = _fire([0.6, 1.7, 0.7])  # sums 0.6, 2.3 (crosses 1 and 2), 3.0
    assert count == [3] and frames == [1, 1, 2]
    torch.testing.assert_close(embeds, torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 0.7]]))


def test_cif_ignores_padded_frames_and_gives_each_token_unit_weight() -> None:
    alphas = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.9, 0.9], [0.7, 0.7, 0.6, 0.0, 0.0, 0.0]])
    fired = integrate_and_fire(torch.ones(2, 6, 1), alphas, torch.tensor([4, 3]), 1.0, None)
    assert fired.counts.tolist() == [2, 2] and fired.frames.tolist() == [[1, 3], [1, 2]]
    torch.testing.assert_close(fired.embeds[..., 0], torch.ones(2, 2))
    # training: alphas scaled to sum to U fire exactly U tokens of weight 1 each
    scaled = torch.rand(3, 20, generator=torch.Generator().manual_seed(0))
    scaled = scaled * (torch.tensor([5.0, 7.0, 1.0]) / scaled.sum(1))[:, None]
    w = cif_weights(scaled, 7)
    torch.testing.assert_close(w.sum(2), torch.tensor([[1.0] * 5 + [0.0] * 2, [1.0] * 7, [1.0] + [0.0] * 6]))


# --------------------------------------------------------------------------------------------------
# A tiny corpus, recipe and run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    texts = _write_split(root, "train", 32, rng)
    _write_split(root, "dev", 4, rng)
    train_tokenizer(texts, root / "tokenizer.model", 40)
    return root


def _recipe(corpus: Path, **train: object) -> dict:
    return {
        "name": "tinypf",
        "seed": 3,
        "data": {"corpus_dir": str(corpus), "dev_utterances": 4, "workers": 0, "min_duration_s": 0.1},
        "batching": {"max_batch_mel_frames": 1600, "max_batch_utterances": 8},
        "spec_augment": {"freq_masks": 1, "freq_width": 8, "time_masks": 1, "time_width": 0.05, "start_step": 2},
        "model": {
            "type": "paraformer",
            "encoder": {"n_layers": 2, "d_model": 32, "n_heads": 2, "subsampling_conv_channels": 8,
                        "conv_kernel_size": 5},
            "paraformer": {"decoder_layers": 1, "decoder_heads": 2, "decoder_ff": 64},
        },
        "optim": {"lr": 3.0e-3, "warmup_steps": 4},
        "train": {"device": "cpu", "threads": 1, "max_steps": 6, "log_every_steps": 3, "val_every_steps": 3,
                  **train},
    }


@pytest.fixture(scope="module")
def run_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(_recipe(corpus)))
    status, run = train(config, None, root / "runs")
    assert status == 0
    return run


@pytest.fixture(scope="module")
def model_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    export_paraformer(run_dir, out, "latest")
    return out


@pytest.fixture(scope="module")
def wav(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = json.loads((corpus / "dev.jsonl").read_text().splitlines()[0])
    samples = np.load(corpus / entry["audio"])[entry["offset"] : entry["offset"] + entry["num_samples"]]
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    sf.write(path, samples, RATE, subtype="PCM_16")
    return path


def test_the_recipe_selects_the_model_type_and_checks_its_head(corpus: Path) -> None:
    recipe = recipe_from_dict(_recipe(corpus))
    assert recipe.model.type == "paraformer" and recipe_from_dict({}).model.type == "tdt"
    with pytest.raises(ConfigError, match="decoder_heads 5 must divide"):
        recipe_from_dict({**_recipe(corpus), "model": {"type": "paraformer", "paraformer": {"decoder_heads": 5}}})
    with pytest.raises(ConfigError, match="model.type"):
        recipe_from_dict({"model": {"type": "las"}})
    with pytest.raises(ConfigError, match="did you mean 'decoder_layers'"):
        recipe_from_dict({"model": {"type": "paraformer", "paraformer": {"decoder_layer": 2}}})


def test_quantity_loss_is_the_mean_distance_of_the_alpha_sums_from_the_target_lengths(
    corpus: Path, tmp_path: Path
) -> None:
    recipe = _recipe(corpus, bf16=False)
    recipe["model"]["ctc_head"] = False
    trainer = Trainer(recipe_from_dict(recipe), tmp_path)
    batch = next(trainer._batches())[2]
    model = trainer.model.eval()  # no dropout: the two passes see the same network
    assert isinstance(model, ParaformerModel) and model.aux_ctc is None
    total, parts = compute_loss(model, batch, (-1, -1), trainer.loss_fn, trainer.recipe)
    assert sorted(parts) == ["ce", "quantity"]
    with torch.no_grad():
        enc, enc_len = model.encoder(batch.mel, batch.mel_lengths)
        sums = model.predictor(enc, enc_len).sum(1)
    expected = (sums - batch.target_lengths).abs().mean()
    torch.testing.assert_close(parts["quantity"].detach(), expected)
    torch.testing.assert_close(total.detach(), (parts["ce"] + parts["quantity"]).detach())
    assert float(parts["ce"].detach()) > 0


def test_the_auxiliary_ctc_head_adds_its_weighted_loss_per_target_token(corpus: Path, tmp_path: Path) -> None:
    recipe = _recipe(corpus, bf16=False)
    recipe["loss"] = {"ctc_weight": 0.4, "quantity_weight": 0.5}
    trainer = Trainer(recipe_from_dict(recipe), tmp_path)
    batch = next(trainer._batches())[2]
    model = trainer.model.eval()
    assert isinstance(model, ParaformerModel) and model.aux_ctc is not None and model.config.aux_ctc
    total, parts = compute_loss(model, batch, (-1, -1), trainer.loss_fn, trainer.recipe)
    with torch.no_grad():  # CTC over the head's classes with blank last, summed and divided by the target tokens
        enc, enc_len = model.encoder(batch.mel, batch.mel_lengths)
        logits = model.aux_ctc.decoder_layers(enc.transpose(1, 2)).transpose(1, 2)  # (B, T, V + 1)
        assert logits.size(-1) == model.config.vocab_size + 1
        per_utt = torch.nn.functional.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1), batch.targets, enc_len, batch.target_lengths,
            blank=model.config.vocab_size, reduction="none", zero_infinity=True,
        )
    torch.testing.assert_close(parts["ctc"].detach(), per_utt.sum() / batch.target_lengths.sum())
    expected = 0.6 * parts["ce"] + 0.4 * parts["ctc"] + 0.5 * parts["quantity"]
    torch.testing.assert_close(total.detach(), expected.detach())
    # the head trains the encoder: its gradient reaches the first encoder layer
    model.zero_grad()
    parts["ctc"].backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_a_tiny_run_writes_a_complete_run_directory(run_dir: Path) -> None:
    assert (run_dir / "config.yaml").is_file() and "step 6" in (run_dir / "train.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["best_wer_percent"] is not None
    last = metrics["last"]  # every part of the loss is logged by name
    assert {"ce_loss", "ctc_loss", "quantity_loss"} <= set(last) and "transducer_loss" not in last
    assert "(ce " in (run_dir / "train.log").read_text()
    curves = read_run(run_dir)  # the trainer drew curves.svg at its validations
    assert "dev WER, %" in (run_dir / "curves.svg").read_text()
    assert [s for s, _ in curves.panels["dev WER, %"][""]] == [3, 6]
    header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert "wer" in header.split(",")
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "latest.pt").is_file()
    model, _ = load_run(run_dir, "latest")
    assert isinstance(model, ParaformerModel)


def test_decode_gives_token_ids_with_their_fire_frames(run_dir: Path, corpus: Path) -> None:
    model, _ = load_run(run_dir, "latest")
    assert isinstance(model, ParaformerModel)
    with torch.no_grad():  # the predictor starts near 0.5 per frame: tokens fire
        model.predictor.out.bias.fill_(0.0)
        model.predictor.out.weight.mul_(0.01)
    audio = torch.from_numpy(np.load(corpus / "dev" / "shard-00000.npy")[:16000].astype(np.float32) / 32768)
    mel, mel_len = model.preprocessor(torch.stack([audio, audio]), torch.tensor([16000, 9000]))
    with torch.inference_mode():
        spans = model.decode(mel, mel_len)
        enc, enc_len = model.encoder(mel, mel_len)
        alphas = model.predictor(enc, enc_len)
    for span, total, frames in zip(spans, alphas.sum(1).tolist(), enc_len.tolist(), strict=True):
        fired = int(total + 1e-4) + (total - int(total + 1e-4) >= 0.5)
        assert len(span) == fired > 3
        assert all(0 <= t < model.config.vocab_size for t in span.token_ids)
        assert list(span.token_frames) == sorted(span.token_frames) and span.token_frames[-1] < frames


def test_the_model_saves_and_loads_back(run_dir: Path, model_dir: Path) -> None:
    assert is_paraformer_dir(model_dir) and (model_dir / "training.json").is_file()
    model, _ = load_run(run_dir, "latest")
    loaded = ParaformerModel.load(model_dir)
    mel = torch.randn(2, 80, 150, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = model.decode(mel, torch.tensor([150, 90])), loaded.decode(mel, torch.tensor([150, 90]))
    assert a == b
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert loaded.config.aux_ctc and "aux_ctc.decoder_layers.0.weight" in loaded.state_dict()
    # a paraformer.json written before the auxiliary head existed reads as a model without one
    record = json.loads((model_dir / CONFIG_FILE).read_text())["config"]
    del record["aux_ctc"]
    assert not ParaformerConfig.from_dict(record).aux_ctc


def test_checkpoint_averaging_writes_a_paraformer_directory(
    run_dir: Path, tmp_path: Path, tiny_nemo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """streamer average on a Paraformer run's two checkpoints: a model directory holding their mean."""
    best, latest = run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "latest.pt"
    out = tmp_path / "avg"
    assert main(["average", str(best), str(latest), "--out", str(out)]) == 0
    a, b = load_run(run_dir, "best")[0].state_dict(), load_run(run_dir, "latest")[0].state_dict()
    averaged = ParaformerModel.load(out).state_dict()
    for key, value in averaged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (a[key] + b[key]) / 2, msg=key)
    assert json.loads((out / "training.json").read_text())["averaged"][1]["source"] == str(latest)
    assert main(["average", str(best), str(tiny_nemo), "--out", str(tmp_path / "x.nemo")]) != 0
    assert "only models of one kind" in capsys.readouterr().err and not (tmp_path / "x.nemo").exists()


def test_a_broken_model_directory_says_what_is_wrong(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "m"
    broken.mkdir()
    for name in ("paraformer.json", "tokenizer.model"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ParaformerModel.load(broken)
    (broken / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    record = json.loads((model_dir / CONFIG_FILE).read_text())
    record["config"]["decoder_layers"] = 2
    (broken / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="do not fit"):
        ParaformerModel.load(broken)


def test_transcribe_model_dir_prints_json(model_dir: Path, wav: Path) -> None:
    cmd = [sys.executable, "-m", "streamer", "transcribe", "--model", str(model_dir), "--format", "json", str(wav)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120 * TIMEOUT, check=True).stdout
    result = json.loads(out)
    assert result["decoder"] == "paraformer" and result["file"] == str(wav)
    assert len(result["token_ids"]) == len(result["token_frames"])
    streaming = subprocess.run([*cmd[:-1], "--mode", "streaming", str(wav)], capture_output=True, text=True,
                               timeout=120 * TIMEOUT)
    assert streaming.returncode != 0 and "Paraformer is full context" in streaming.stderr


def test_eval_gives_offline_rows_with_token_and_sequence_accuracy(model_dir: Path, corpus: Path) -> None:
    model = ParaformerModel.load(model_dir)
    rows = evaluate(model, {"dev": corpus / "dev.jsonl"}, [(70, 13)], "tinypf")
    assert [(r.split, r.mode, r.att_context) for r in rows] == [("dev", "offline", "[-1,-1]")]
    row = rows[0]
    assert row.utterances == 4 and row.words > 0 and row.rtf > 0
    assert 0 <= row.token_accuracy_percent <= 100 and 0 <= row.sequence_accuracy_percent <= 100
    with pytest.raises(ConfigError, match="--mode"):
        evaluate(model, {"dev": corpus / "dev.jsonl"}, [(70, 13)], "tinypf", modes=("streaming",))


def test_buffered_streaming_fires_at_the_offline_frames_when_each_buffer_holds_the_whole_clip(
    model_dir: Path, corpus: Path
) -> None:
    model = ParaformerModel.load(model_dir)
    with torch.no_grad():
        model.predictor.out.bias.fill_(0.0)
        model.predictor.out.weight.mul_(0.01)
    audio = np.load(corpus / "dev" / "shard-00000.npy")[:24000].astype(np.float32) / 32768
    offline = transcribe_offline(model, audio)
    # chunks of 0.32 s, but left and right contexts that reach past both ends: the same alphas, carried over
    chunked = transcribe_buffered_paraformer(model, audio, 10.0, 0.32, 10.0)
    assert len(offline.token_frames) > 4 and chunked.token_frames == offline.token_frames


def test_the_daemon_refuses_cache_aware_streaming_with_a_paraformer(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="Paraformer model is full context"):
        load_recognizer(ModelSettings(spec=str(model_dir)), EngineSettings(streaming="cache_aware"))


@pytest.mark.slow
async def test_the_daemon_file_endpoint_transcribes_with_a_paraformer(model_dir: Path, wav: Path,
                                                                     tmp_path: Path) -> None:
    expected = transcribe_buffered_paraformer(ParaformerModel.load(model_dir), sf.read(wav, dtype="float32")[0]).text
    env = {"STREAMER_STATE__DIR": "", "STREAMER_MODEL__SPEC": str(model_dir)}
    async with serve(tmp_path, env) as served:
        status, body = await asyncio.to_thread(_post_wav, served.port, wav.read_bytes())
    assert status == 200, body
    assert expected and json.loads(body)["text"] == expected


def _post_wav(port: int, data: bytes) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    form = io.BytesIO()
    form.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nparaformer\r\n".encode())
    form.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip.wav\"\r\n"
               "Content-Type: audio/wav\r\n\r\n".encode())
    form.write(data + f"\r\n--{boundary}--\r\n".encode())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60 * TIMEOUT)
    try:
        conn.request("POST", "/v1/audio/transcriptions", form.getvalue(),
                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_the_example_recipe_builds_a_model_the_size_of_the_tdt_default() -> None:
    from streamer.asr.network import AsrNetwork
    from streamer.training.recipe import load_recipe, model_config, paraformer_config

    root = Path(__file__).resolve().parents[1] / "models"
    recipe = load_recipe(root / "streamer-paraformer-small" / "recipe.yaml")
    tdt = load_recipe(root / "streamer-tdt-small" / "recipe.yaml")
    assert recipe.model.type == "paraformer" and recipe.model.encoder == tdt.model.encoder.model_copy(
        update={"att_context_sizes": recipe.model.encoder.att_context_sizes})
    size = ParaformerModel(paraformer_config(recipe, 256)).num_parameters
    tdt_size = sum(p.numel() for p in AsrNetwork(model_config(tdt, 256)).parameters())
    assert abs(size - tdt_size) < 0.05 * tdt_size
