"""Local + global attention (``rel_pos_local_attn``) and the long-audio path: NeMo parity, linear memory, windows.

The NeMo numbers come from tests/fixtures/nemo/make_goldens.py (``local_switch``: a full-context model switched
with ``change_attention_model``; ``local_global_*``: models configured with local attention and global tokens,
whose offline goldens test_golden_nemo.py checks like every fixture's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.asr.features import length_mask, normalize_per_feature
from streamer.asr.local_attention import LocalRelPositionMultiHeadAttention, local_positional_table
from streamer.asr.model import AsrModel
from streamer.audio.io import load_audio
from streamer.cli import main
from streamer.engine.recognizer import transcribe_offline
from streamer.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
SWITCH = FIXTURES / "local_switch"


def ctx_of(key: str) -> tuple[int, int]:
    left, right = key.split(",")
    return int(left), int(right)


@pytest.fixture(scope="module")
def switch_golden() -> dict:
    return torch.load(SWITCH / "golden.pt", weights_only=True)


def test_switched_encoder_and_tokens_match_nemo(switch_golden: dict) -> None:
    """A full-context checkpoint switched to local windows (symmetric, wider left, wider right, wider than the
    clip) gives NeMo's encoder output and tokens after ``change_attention_model``."""
    windows = switch_golden["attention_switch"]
    assert len(windows) >= 4
    for key, record in windows.items():
        model = AsrModel.load(str(SWITCH / "model.nemo"))
        model.change_attention("rel_pos_local_attn", ctx_of(key))
        assert model.config.encoder.is_local_attention and model.check_context(None) == ctx_of(key)
        for clip, want in record["encoder"].items():
            feats = switch_golden["features"][clip]
            with torch.inference_mode():
                out, lens = model.encoder(feats["feats"][None], torch.tensor([int(feats["length"])]))
            n = int(want["length"])
            assert int(lens[0]) == n
            torch.testing.assert_close(out[0, :n], want["out"][:n], rtol=1e-4, atol=1e-4, msg=key)
        for kind, per_clip in record["decode"].items():
            for clip, want in per_clip.items():
                audio = load_audio(SWITCH / f"{clip}.wav", 16000)
                got = transcribe_offline(model, audio, kind)
                assert list(got.token_ids) == list(want["token_ids"]), (key, clip)
                assert list(got.token_frames) == list(want["token_frames"]), (key, clip)
                assert list(got.token_durations) == list(want["token_durations"]), (key, clip)


def test_windows_change_the_output(switch_golden: dict) -> None:
    """The goldens are not all the same: a narrow window gives another output than full attention (so the
    parity above tests the window), while one wider than the clip gives full attention's."""
    full = switch_golden["encoder_offline"]["-1,-1"]["audio_0"]["out"]
    narrow = switch_golden["attention_switch"]["4,4"]["encoder"]["audio_0"]["out"]
    wide = switch_golden["attention_switch"]["64,64"]["encoder"]["audio_0"]["out"]
    assert (full - narrow).abs().max() > 1e-2
    torch.testing.assert_close(wide, full, rtol=1e-4, atol=1e-4)


def test_cli_switches_attention_and_reproduces_nemo(switch_golden: dict, capsys) -> None:
    """``streamer transcribe --attention local --att-context-size L,R --format json`` prints NeMo's tokens."""
    key = "6,2"
    want = switch_golden["attention_switch"][key]["decode"]["tdt"]["audio_1"]
    args = ["transcribe", "--format", "json", "--model", str(SWITCH / "model.nemo"), "--attention", "local",
            f"--att-context-size={key}", str(SWITCH / "audio_1.wav")]
    assert main(args) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["token_ids"] == list(want["token_ids"])
    assert obj["token_frames"] == list(want["token_frames"])
    assert obj["att_context_size"] == [6, 2]


def test_switched_model_saves_and_reloads(tmp_path: Path) -> None:
    """A switched model saved as .nemo loads back as a local-attention model with the same output."""
    model = AsrModel.load(str(SWITCH / "model.nemo"))
    model.change_attention("rel_pos_local_attn", (5, 3))
    path = tmp_path / "local.nemo"
    model.save(str(path))
    again = AsrModel.load(str(path))
    assert again.config.encoder.self_attention_model == "rel_pos_local_attn"
    assert again.check_context(None) == (5, 3)
    audio = load_audio(SWITCH / "audio_0.wav", 16000)
    assert transcribe_offline(again, audio).token_ids == transcribe_offline(model, audio).token_ids


def test_local_attention_refuses_what_it_cannot_do() -> None:
    """Bad windows and cache-aware streaming of a local-attention model fail with clear errors."""
    model = AsrModel.load(str(SWITCH / "model.nemo"))
    with pytest.raises(ConfigError, match="window"):
        model.change_attention("rel_pos_local_attn", (0, 0))
    with pytest.raises(ConfigError, match="not one of"):
        model.change_attention("abs_pos")
    model.change_attention("rel_pos_local_attn", (4, 4))
    with pytest.raises(ConfigError, match="offline only"):
        model.encoder.streaming()
    with pytest.raises(ConfigError, match="not one this model supports"):
        model.check_context((8, 8))


def test_global_tokens_see_everything_and_everything_sees_them() -> None:
    """With global tokens, changing a far-away frame changes the global token's output (it attends to all) and,
    through it... only the frames whose window or global keys include that frame; without them, a frame far
    outside a window leaves the output unchanged."""
    torch.manual_seed(0)
    d, t = 16, 60
    for global_tokens in (0, 2):
        att = LocalRelPositionMultiHeadAttention(2, d, True, (3, 3), global_tokens, 5).eval()
        x = torch.randn(1, t, d)
        y = x.clone()
        y[0, 40] += 1.0  # a frame far from frames 0..10
        outs = []
        with torch.inference_mode():
            p = att.project_pos(local_positional_table((3, 3), d))
            for inp in (x, y):
                q, k, v = att.linear_q(inp), att.heads(att.linear_k, inp), att.heads(att.linear_v, inp)
                outs.append(att.attend_local(inp, q, k, v, p, None))
        changed = (outs[0] - outs[1]).abs().amax(-1)[0] > 1e-6  # [T]
        assert changed[37:44].all() and not changed[45:].any()
        if global_tokens:
            assert changed[0] and changed[5] and not changed[1:5].any() and not changed[10:36].any()
        else:
            assert not changed[:37].any()


def test_local_attention_memory_is_linear() -> None:
    """No T x T tensor: on 4000 frames the largest allocation of the attention stays far below one T x T score
    matrix (what full attention allocates per head), measured with the torch profiler."""
    torch.manual_seed(0)
    d, h, t = 32, 4, 4000
    att = LocalRelPositionMultiHeadAttention(h, d, True, (16, 16), 1, 1).eval()
    x = torch.randn(1, t, d)
    with torch.inference_mode():
        p = att.project_pos(local_positional_table((16, 16), d))
        q, k, v = att.linear_q(x), att.heads(att.linear_k, x), att.heads(att.linear_v, x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            att.attend_local(x, q, k, v, p, None)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < t * t * 4 // 8, largest  # a T x T float32 matrix is 64 MB; we allow 8 MB


def test_chunked_front_end_equals_one_shot() -> None:
    """Long inputs: features computed 60 s at a time and the subsampling run in windows equal the one-shot
    results (bit for bit for the features; the convs on windows up to float rounding), padded batches included."""
    for name in ("tdt_offline_sym", "tdt_streaming"):  # non-causal and causal subsampling
        model = AsrModel.load(str(FIXTURES / name / "model.nemo"))
        feat = model.preprocessor.featurizer
        rng = np.random.default_rng(0)
        audio = torch.from_numpy(rng.standard_normal((2, 16000 * 4 + 123)).astype(np.float32) * 0.1)
        lengths = torch.tensor([audio.size(1), 16000 * 3 + 5])
        one_shot, lens = feat(audio, lengths)
        frames = one_shot.size(2)
        for window in (97, 1000, frames):
            windows = feat._log_mel_in_windows(audio, lengths, frames, window)
            if feat.is_normalized:
                windows = normalize_per_feature(windows, lens)
            windows = windows.masked_fill(~length_mask(lens, frames)[:, None, :], feat.cfg.pad_value)
            assert torch.equal(windows, one_shot), (name, window)
        mel = torch.randn(2, model.config.features.n_mels, 1001).transpose(1, 2)
        lengths = torch.tensor([1001, 517])
        with torch.inference_mode():
            whole, whole_len = model.encoder.subsample(mel, lengths)
            parts, parts_len = model.encoder.subsample(mel, lengths, window_mel_frames=96)
        assert torch.equal(whole_len, parts_len) and whole.shape == parts.shape
        for row, n in enumerate(whole_len.tolist()):
            torch.testing.assert_close(parts[row, :n], whole[row, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_long_file_in_one_pass_keeps_word_times(tmp_path: Path, capsys) -> None:
    """Four minutes of speech (a sentence every few seconds, at known times) through the bundled model switched to
    local attention, in one pass: words of the last sentences start at the times the same sentence's words get on
    its own, shifted by where it was placed (within two encoder frames)."""
    import soundfile as sf
    import soxr

    from tests.speech import espeak_sentences

    texts = ["the river runs past the old mill", "seven green apples fell from the tree"]
    clips = [soxr.resample(a, sr, 16000).astype(np.float32) for a, sr in espeak_sentences(tmp_path, texts).values()]
    audio = np.zeros(16000 * 240, np.float32)
    placed: list[tuple[float, int]] = []
    pos = 16000
    while pos + 16000 * 6 < audio.size:
        which = len(placed) % 2
        audio[pos : pos + clips[which].size] = clips[which]
        placed.append((pos / 16000, which))
        pos += clips[which].size + 16000 * 2
    path = tmp_path / "long.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")
    local = ["--attention", "local", "--att-context-size=70,70"]
    assert main(["transcribe", "--format", "json", *local, str(path)]) == 0
    words = json.loads(capsys.readouterr().out)["words"]
    alone = []
    for which, clip in enumerate(clips):  # each sentence on its own, with the same second of silence before it
        single = tmp_path / f"alone{which}.wav"
        sf.write(single, np.concatenate([np.zeros(16000, np.float32), clip, np.zeros(32000, np.float32)]), 16000,
                 subtype="PCM_16")
        assert main(["transcribe", "--format", "json", *local, str(single)]) == 0
        alone.append(json.loads(capsys.readouterr().out)["words"])
    matched = total = 0
    for start, which in placed[-4:]:
        for w in alone[which]:
            total += 1
            at = w["start_s"] - 1.0 + start
            matched += any(abs(v["start_s"] - at) <= 0.16 for v in words)  # this small model's spelling varies
    assert total > 10 and matched >= 0.7 * total, (matched, total)
    assert words[-1]["end_s"] <= audio.size / 16000
