"""``streamer convert``: .nemo <-> Hugging Face directories, both ways, verified, on the committed NeMo fixtures.

Every fixture model under tests/fixtures/nemo/ either round-trips (nemo -> hf -> nemo with ``--verify``,
state dicts equal) or is refused with the reason transformers has no class for it; the transformers-made
directory round-trips hf -> nemo -> hf. A deliberately damaged conversion must fail verification.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
from streamer.asr.convertverify import synthetic_speech, verify
from streamer.asr.hfformat import model_config
from streamer.asr.hftokenizer import sentencepiece_from_tokenizer_json, tokenizer_json_from_sentencepiece
from streamer.asr.model import AsrModel
from streamer.asr.nemofile import load_nemo
from streamer.asr.tokenizer import Tokenizer
from streamer.cli import main
from tests.tiny import train_tokenizer

NEMO_FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
FIXTURES = sorted(p.parent.name for p in NEMO_FIXTURES.glob("*/model.nemo"))
HF_FIXTURES = sorted(p.parent.parent.name for p in NEMO_FIXTURES.glob("*/hf/config.json"))
# Fixtures transformers has a class for, and why the others have none (words the error must contain).
CONVERTIBLE = {"tdt_offline_sym": "parakeet_tdt", "rnnt_eou": "nemotron_asr_streaming", "local_switch": "parakeet_tdt"}
REFUSED = {
    "tdt_streaming": "cache-aware TDT",
    "hybrid_streaming": "no hybrid RNNT+CTC model class",
    "local_global_shared": "local attention",
    "local_global_separate": "local attention",
}

pytestmark = pytest.mark.checkpoint


def convert(*args: str | Path) -> int:
    return main(["convert", *map(str, args)])


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal


def test_every_fixture_has_a_decision() -> None:
    """A new fixture model must be added to CONVERTIBLE or REFUSED, so none is silently left out."""
    assert FIXTURES and sorted(FIXTURES) == sorted([*CONVERTIBLE, *REFUSED])
    assert HF_FIXTURES == ["tdt_offline_sym"]


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_nemo_to_hf_to_nemo(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = NEMO_FIXTURES / name / "model.nemo"
    assert convert(src, tmp_path / "hf", "--verify") == 0
    out = capsys.readouterr()
    assert "encoder offline" in out.out and "tokens offline" in out.out and "MISMATCH" not in out.out
    if name == "rnnt_eou":  # cache-aware: the streaming chunks and streaming tokens were compared too
        assert "encoder streaming 70,1" in out.out and "tokens streaming rnnt 70,1" in out.out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == CONVERTIBLE[name]
    assert convert(tmp_path / "hf", tmp_path / "back.nemo", "--to", "nemo", "--verify") == 0
    original, back = load_nemo(src), load_nemo(tmp_path / "back.nemo")
    assert_same_state(original.state_dict, back.state_dict)  # filterbank and window included
    assert back.config == original.config and back.config.model_class == original.config.model_class
    assert back.tokenizer_model == original.tokenizer_model


def test_hf_fixture_to_nemo_to_hf(tmp_path: Path) -> None:
    """The directory transformers' save_pretrained wrote comes back with the same weights and settings."""
    src = NEMO_FIXTURES / "tdt_offline_sym" / "hf"
    assert convert(src, tmp_path / "model.nemo", "--verify") == 0
    assert convert(tmp_path / "model.nemo", tmp_path / "hf", "--verify") == 0
    back = tmp_path / "hf"
    assert_same_state(load_file(src / "model.safetensors"), load_file(back / "model.safetensors"))
    assert model_config(back) == model_config(src)
    mine, theirs = (json.loads((d / "tokenizer.json").read_text()) for d in (back, src))
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "decoder"):
        assert mine[key] == theirs[key], key
    assert mine["model"]["vocab"] == theirs["model"]["vocab"]
    assert mine["model"]["merges"] == theirs["model"]["merges"]
    want = json.loads((src / "config.json").read_text())
    got = json.loads((back / "config.json").read_text())
    for key in ("architectures", "model_type", "vocab_size", "blank_token_id", "durations", "decoder_hidden_size"):
        assert got[key] == want[key], key
    assert {k: v for k, v in got["encoder_config"].items() if k in want["encoder_config"]} == want["encoder_config"]
    extractor = json.loads((src / "processor_config.json").read_text())["feature_extractor"]
    assert json.loads((back / "processor_config.json").read_text())["feature_extractor"] == extractor


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_without_a_transformers_class_are_refused(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert convert(NEMO_FIXTURES / name / "model.nemo", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "no Hugging Face transformers equivalent" in err and REFUSED[name] in err and name in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_existing_destination_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = NEMO_FIXTURES / "tdt_offline_sym" / "model.nemo"
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert(src, dst) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert convert(src, dst, "--force") == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    nemo = tmp_path / "m.nemo"
    nemo.write_bytes(b"old")
    assert convert(dst, nemo) == 2 and nemo.read_bytes() == b"old"
    assert convert(dst, nemo, "--force") == 0 and load_nemo(nemo).config.encoder.n_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.nemo"]  # no temporary files left


@pytest.mark.parametrize(
    ("make_src", "extra", "message"),
    [
        (lambda d: d / "missing.nemo", [], "no such file or directory"),
        (lambda d: d, [], "without config.json"),
        (lambda d: d / "notes.txt", [], "not a .nemo file"),
        (lambda d: NEMO_FIXTURES / "rnnt_eou" / "model.nemo", ["--to", "nemo"], "already a .nemo file"),
    ],
    ids=["missing", "empty-dir", "not-a-model", "wrong-direction"],
)
def test_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str], make_src, extra, message) -> None:
    work = tmp_path / "in"
    work.mkdir()
    (work / "notes.txt").write_text("not a model")
    dst = tmp_path / "out"
    assert convert(make_src(work), dst, *extra) == 2
    assert message in capsys.readouterr().err
    assert not dst.exists()


def test_nemo_destination_for_a_nemo_source_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert(NEMO_FIXTURES / "rnnt_eou" / "model.nemo", tmp_path / "x.nemo") == 2
    assert "name a directory" in capsys.readouterr().err


def _perturb(path: Path, key: str, delta: float) -> None:
    weights = load_file(path)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] += delta
    save_file(weights, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("key", "failing"),
    [
        ("encoder.layers.1.feed_forward2.linear1.weight", {"encoder offline 70,1", "encoder streaming 70,1"}),
        ("joint.head.bias", {"logits rnnt 70,1"}),
    ],
)
def test_verify_catches_a_changed_weight(tmp_path: Path, key: str, failing: set[str]) -> None:
    """One weight moved by 1e-3 after converting: verify reports it (the check can fail)."""
    src = NEMO_FIXTURES / "rnnt_eou" / "model.nemo"
    assert convert(src, tmp_path / "hf") == 0
    audio = (synthetic_speech(16000), "synthetic")
    assert verify(src, tmp_path / "hf", audio).ok
    _perturb(tmp_path / "hf" / "model.safetensors", key, 1e-3)
    report = verify(src, tmp_path / "hf", audio)
    bad = {row.check for row in report.rows if not row.ok}
    assert not report.ok and failing <= bad, report.table()
    assert "MISMATCH" in report.table()


def test_verify_catches_a_changed_tokenizer(tmp_path: Path) -> None:
    src = NEMO_FIXTURES / "tdt_offline_sym" / "model.nemo"
    assert convert(src, tmp_path / "hf") == 0
    (tmp_path / "hf" / "tokenizer.model").unlink()  # load_hf falls back to tokenizer.json
    data = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "t", "a"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(data))
    report = verify(src, tmp_path / "hf", (synthetic_speech(16000), "synthetic"))
    assert [row.check for row in report.rows if not row.ok] == ["tokenizer pieces"]


@pytest.mark.parametrize("name", FIXTURES)
def test_tokenizer_json_round_trip(name: str) -> None:
    """tokenizer.json written from each fixture's SentencePiece model reads back to the same tokenizer."""
    original = load_nemo(NEMO_FIXTURES / name / "model.nemo").tokenizer_model
    assert original is not None
    rebuilt = sentencepiece_from_tokenizer_json(tokenizer_json_from_sentencepiece(original))
    a, b = Tokenizer.from_bytes(original), Tokenizer.from_bytes(rebuilt)
    assert a.pieces == b.pieces and a.special_ids == b.special_ids and a.eou_ids == b.eou_ids
    text = "The quick brown fox, by the river? Please call me back tonight."
    assert b.encode(text) == a.encode(text)


def test_transformers_classes_agree(tmp_path: Path) -> None:
    """Only where transformers is installed (not a dependency): its own classes load what we wrote."""
    pytest.importorskip("transformers")
    src = NEMO_FIXTURES / "rnnt_eou" / "model.nemo"
    assert convert(src, tmp_path / "hf") == 0
    report = verify(src, tmp_path / "hf", (synthetic_speech(16000), "synthetic"))
    assert report.ok, report.table()
    assert any(row.check.startswith("transformers encoder") for row in report.rows)


def offline_model(kind: str) -> AsrModel:
    """A random Parakeet-style (offline, BatchNorm, symmetric conv) RNNT or CTC model: no fixture has these."""
    tok = Tokenizer.from_bytes(train_tokenizer())
    v = tok.vocab_size
    enc = EncoderConfig(
        feat_in=80,
        n_layers=2,
        d_model=32,
        n_heads=4,
        subsampling_conv_channels=8,
        causal_downsampling=False,
        att_context_sizes=((-1, -1),),
        att_context_style="regular",
        conv_norm_type="batch_norm",
    )
    config = ModelConfig(
        features=FeatureConfig(n_mels=80, normalize="per_feature"),
        encoder=enc,
        transducer=TransducerConfig(vocab_size=v, pred_hidden=32, joint_hidden=32, joint_dropout_layer=True)
        if kind == "rnnt"
        else None,
        ctc=CTCConfig(vocab_size=v, feat_in=32, key_prefix="decoder") if kind == "ctc" else None,
        model_class="EncDecRNNTBPEModel" if kind == "rnnt" else "EncDecCTCModelBPE",
    )
    torch.manual_seed(3)
    model = AsrModel(config, tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("joint.", "decoder.decoder_layers")) and name.endswith("weight"):
                p.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize(("kind", "model_type"), [("rnnt", "parakeet_rnnt"), ("ctc", "parakeet_ctc")])
def test_offline_rnnt_and_ctc_round_trip(tmp_path: Path, kind: str, model_type: str) -> None:
    offline_model(kind).save(str(tmp_path / "a.nemo"))
    assert convert(tmp_path / "a.nemo", tmp_path / "hf", "--verify") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == model_type
    assert convert(tmp_path / "hf", tmp_path / "b.nemo", "--verify") == 0
    a, b = load_nemo(tmp_path / "a.nemo"), load_nemo(tmp_path / "b.nemo")
    assert_same_state(a.state_dict, b.state_dict)
    assert a.config == b.config


def test_hf_directory_naming_a_wrong_nemo_class_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert(NEMO_FIXTURES / "rnnt_eou" / "model.nemo", tmp_path / "hf") == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["nemo_model_class"] == "EncDecRNNTBPEEOUModel"
    config["nemo_model_class"] = "EncDecHybridRNNTCTCBPEModel"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert(tmp_path / "hf", tmp_path / "x.nemo") == 2
    assert "nemo_model_class='EncDecHybridRNNTCTCBPEModel'" in capsys.readouterr().err
    assert not (tmp_path / "x.nemo").exists()
