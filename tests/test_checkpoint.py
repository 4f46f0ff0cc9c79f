"""Checkpoints: NeMo config parsing, .nemo load/save, the HF format, the registry and cached downloads.

Everything runs on tiny configs and random weights built here; NeMo itself is never imported (its side of
the round trip is `tests/fixtures/nemo/check_save_roundtrip.py`).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import http.server
import io
import json
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
import torch
import yaml
from safetensors.torch import save_file

from streamer.asr.checkpoint import Checkpoint
from streamer.asr.hfformat import hf_to_nemo_key, load_hf, nemo_to_hf_key, to_hf_state_dict
from streamer.asr.interpolation import resolve_interpolations
from streamer.asr.loader import load_checkpoint
from streamer.asr.nemoconfig import parse_nemo_config
from streamer.asr.nemoconfigwriter import nemo_config_from
from streamer.asr.nemofile import load_nemo, save_nemo
from streamer.asr.shapes import check_state_dict, expected_shapes
from streamer.errors import CheckpointError, UnsupportedCheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny test corpus",
    "streaming speech recognition with transducers",
    "please turn on the kitchen light",
]


def train_tokenizer(tmp: Path, vocab: int = 32, eou: bool = False, model_type: str = "bpe") -> bytes:
    """A tiny SentencePiece model (identity normaliser keeps it at a few hundred bytes)."""
    (tmp / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"),
        model_prefix=str(tmp / "sp"),
        vocab_size=vocab,
        model_type=model_type,
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        user_defined_symbols=["<EOU>", "<EOB>"] if eou else [],
        minloglevel=2,
    )
    return (tmp / "sp.model").read_bytes()


def raw_config(vocab: int = 32, **overrides: Any) -> dict[str, Any]:
    """A model_config.yaml as NeMo writes it for a small cache-aware TDT model (cf. §3.1, §7.3)."""
    cfg: dict[str, Any] = {
        "target": "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel",
        "sample_rate": 16000,
        "model_defaults": {
            "enc_hidden": 32,
            "pred_hidden": 16,
            "joint_hidden": 20,
            "tdt_durations": [0, 1, 2, 3, 4],
            "num_tdt_durations": 5,
        },
        "tokenizer": {"dir": None, "type": "bpe", "model_path": "nemo:0123_tokenizer.model"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": "${model.sample_rate}",
            "normalize": "NA",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": 80,
            "n_fft": 512,
            "log_zero_guard_value": "tiny",
            "dither": 1e-5,
            "pad_to": 0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 80,
            "feat_out": -1,
            "n_layers": 2,
            "d_model": 32,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 16,
            "causal_downsampling": True,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": 4,
            "att_context_size": [[70, 13], [70, 1]],
            "att_context_style": "chunked_limited",
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "layer_norm",
            "conv_context_size": "causal",
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "blank_as_pad": True,
            "vocab_size": vocab,
            "prednet": {"pred_hidden": "${model_defaults.pred_hidden}", "pred_rnn_layers": 2},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "num_classes": vocab,
            "num_extra_outputs": 5,
            "jointnet": {
                "joint_hidden": 20,
                "activation": "relu",
                "dropout": 0.2,
                "encoder_hidden": "${model.model_defaults.enc_hidden}",
            },
        },
        "decoding": {"strategy": "greedy_batch", "model_type": "tdt", "durations": [0, 1, 2, 3, 4]},
        "loss": {"loss_name": "tdt", "tdt_kwargs": {"durations": [0, 1, 2, 3, 4]}},
        "optim": {"sched": {"max_steps": "${trainer.max_steps}"}},
    }
    for dotted, value in overrides.items():
        *parents, last = dotted.split("__")
        node = cfg
        for part in parents:
            node = node[part]
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


_DELETE = object()
# Overrides that turn the TDT config into a plain RNNT one.
RNNT: dict[str, Any] = {
    "joint__num_extra_outputs": 0,
    "model_defaults__tdt_durations": _DELETE,
    "loss": {"loss_name": "default"},
    "decoding": {"strategy": "greedy_batch"},
}


def random_state_dict(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the right shapes (BatchNorm step counters are int64, as in torch)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=gen)
        for key, shape in expected_shapes(config).items()
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def checkpoint(tokenizer: bytes) -> Checkpoint:
    size = sentencepiece.SentencePieceProcessor(model_proto=tokenizer).get_piece_size()
    config = parse_nemo_config(raw_config(size))
    return Checkpoint(config, random_state_dict(config), tokenizer, raw_config(size), "test")


# --------------------------------------------------------------------------- config parsing


def test_parse_streaming_tdt_config() -> None:
    """Every field is read, interpolations resolved, strings like "tiny" and "causal" translated."""
    cfg = parse_nemo_config(raw_config())
    f, e, t = cfg.features, cfg.encoder, cfg.transducer
    assert (f.sample_rate, f.n_mels, f.normalize, f.preemph, f.win_length, f.hop_length) == (
        16000,
        80,
        "NA",
        0.97,
        400,
        160,
    )
    assert f.log_zero_guard_value == torch.finfo(torch.float32).tiny
    assert e.att_context_sizes == ((70, 13), (70, 1)) and e.default_att_context_size == (70, 13)
    assert e.conv_context == (8, 0) and e.is_causal and e.conv_norm_type == "layer_norm"
    assert (e.d_model, e.n_layers, e.subsampling_conv_channels, e.use_bias) == (32, 2, 16, True)
    assert t is not None and t.durations == (0, 1, 2, 3, 4) and t.blank_id == 32 and t.num_outputs == 38
    assert (t.pred_hidden, t.pred_rnn_layers, t.joint_hidden, t.joint_dropout_layer, t.max_symbols) == (
        16,
        2,
        20,
        True,
        10,
    )
    assert cfg.ctc is None and cfg.model_class == "EncDecRNNTBPEModel"


def test_interpolations() -> None:
    """``${model.x}`` and ``${x}`` resolve from the root; resolvers and dangling paths stay as they are."""
    raw = {"a": 1, "b": {"c": "${model.a}", "d": "x${a}y", "e": "${oc.env:HOME}", "f": "${trainer.devices}"}}
    assert resolve_interpolations(raw)["b"] == {
        "c": 1,
        "d": "x1y",
        "e": "${oc.env:HOME}",
        "f": "${trainer.devices}",
    }
    with pytest.raises(CheckpointError, match="refers to itself"):
        resolve_interpolations({"a": "${b}", "b": "${a}"})


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"model_defaults__tdt_durations": _DELETE}, lambda c: c.transducer.durations == (0, 1, 2, 3, 4)),
        (
            {"encoder__att_context_size": [-1, -1], "encoder__att_context_style": "regular"},
            lambda c: c.encoder.att_context_sizes == ((-1, -1),),
        ),
        ({"encoder__att_context_size": None}, lambda c: c.encoder.att_context_sizes == ((-1, -1),)),
        ({"encoder__conv_context_size": [6, 2]}, lambda c: c.encoder.conv_context == (6, 2)),
        (
            {"encoder__conv_context_size": None},
            lambda c: c.encoder.conv_context == (4, 4) and not c.encoder.is_causal,
        ),
        ({"encoder__subsampling_conv_channels": -1}, lambda c: c.encoder.subsampling_conv_channels == 32),
        ({"joint__jointnet__dropout": 0.0}, lambda c: not c.transducer.joint_dropout_layer),
        (
            {"preprocessor__normalize": "per_feature", "preprocessor__preemph": None},
            lambda c: c.features.normalize == "per_feature" and c.features.preemph is None,
        ),
        ({"preprocessor__normalize": None}, lambda c: c.features.normalize == "NA"),
        ({"preprocessor__log_zero_guard_value": 1e-5}, lambda c: c.features.log_zero_guard_value == 1e-5),
        ({"decoding__greedy": {"max_symbols": 5}}, lambda c: c.transducer.max_symbols == 5),
        ({"target": _DELETE}, lambda c: c.model_class == "EncDecRNNTBPEModel"),
        (
            {
                "loss": {"loss_name": "default"},
                "decoding": {"strategy": "greedy_batch"},
                "joint__num_extra_outputs": 0,
                "model_defaults__tdt_durations": _DELETE,
            },
            lambda c: not c.transducer.is_tdt,
        ),
    ],
)
def test_parse_variants(overrides: dict[str, Any], check: Any) -> None:
    """Each supported spelling of a setting gives the value NeMo would use."""
    assert check(parse_nemo_config(raw_config(**overrides)))


def test_parse_hybrid_and_ctc() -> None:
    """Hybrid models get a `ctc_decoder` head, pure CTC models a `decoder` one; num_classes -1 means V."""
    hybrid = raw_config(
        target="nemo.collections.asr.models.hybrid_rnnt_ctc_bpe_models.EncDecHybridRNNTCTCBPEModel",
        aux_ctc={
            "decoder": {
                "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                "feat_in": None,
                "num_classes": -1,
                "vocabulary": [],
            }
        },
    )
    cfg = parse_nemo_config(hybrid)
    assert cfg.ctc is not None and (cfg.ctc.vocab_size, cfg.ctc.feat_in, cfg.ctc.key_prefix) == (
        32,
        32,
        "ctc_decoder",
    )
    ctc = raw_config(
        target="nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE",
        decoder={"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": 32, "num_classes": 32},
    )
    for key in ("joint", "decoding", "loss", "model_defaults"):
        ctc.pop(key)
    cfg = parse_nemo_config(ctc)
    assert cfg.transducer is None and cfg.ctc is not None and cfg.ctc.key_prefix == "decoder"
    assert cfg.model_class == "EncDecCTCModelBPE"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder__subsampling": "striding"}, "encoder.subsampling='striding' (supported: 'dw_striding')"),
        (
            {"encoder__self_attention_model": "abs_pos"},
            "self_attention_model='abs_pos' (supported: 'rel_pos', 'rel_pos_local_attn')",
        ),
        ({"encoder__conv_norm_type": "group_norm"}, "conv_norm_type='group_norm' (supported: 'batch_norm', "),
        (
            {"encoder__att_context_style": "chunked_limited_with_rc"},
            "att_context_style='chunked_limited_with_rc'",
        ),
        ({"preprocessor__normalize": "all_features"}, "preprocessor.normalize='all_features'"),
        ({"preprocessor__window": "hamming"}, "preprocessor.window='hamming' (supported: 'hann')"),
        ({"loss": {"loss_name": "multiblank_rnnt"}, "decoding__model_type": "rnnt"}, "multiblank_rnnt"),
        (
            {"target": "nemo.collections.asr.models.aed_multitask_models.EncDecMultiTaskModel"},
            "'EncDecMultiTaskModel' (Canary-style attention encoder-decoder (AED)) (supported: EncDecRNNTBPE",
        ),
        ({"target": "nemo.collections.asr.models.rnnt_models.EncDecRNNTModel"}, "character vocabulary"),
        ({"tokenizer__type": "wpe"}, "tokenizer.type='wpe' (supported: 'bpe')"),
    ],
)
def test_unsupported_configs(overrides: dict[str, Any], message: str) -> None:
    """Each unsupported setting gives one UnsupportedCheckpointError naming it and the alternatives."""
    with pytest.raises(UnsupportedCheckpointError) as info:
        parse_nemo_config(raw_config(**overrides))
    assert message in str(info.value)


def test_unsupported_settings_are_reported_together() -> None:
    """Several problems come in one error, so a user sees everything at once."""
    with pytest.raises(
        UnsupportedCheckpointError, match="subsampling='vggnet'.*conv_norm_type='instance_norm'"
    ):
        parse_nemo_config(raw_config(encoder__subsampling="vggnet", encoder__conv_norm_type="instance_norm"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder__d_model": _DELETE}, "lacks encoder.d_model"),
        ({"encoder__n_layers": "two"}, "encoder.n_layers = 'two' is not a int"),
        ({"joint__num_extra_outputs": 4}, "5 TDT durations [0, 1, 2, 3, 4] but joint.num_extra_outputs = 4"),
        ({"encoder__feat_in": 64}, "encoder.feat_in 64 != preprocessor.features 80"),
        ({"encoder__conv_context_size": [3, 3]}, "conv_context_size [3, 3] does not fit kernel 9"),
        ({"preprocessor": _DELETE}, "lacks the preprocessor section"),
    ],
)
def test_broken_configs(overrides: dict[str, Any], message: str) -> None:
    """Missing or inconsistent values give a CheckpointError (not "unsupported") naming the key."""
    with pytest.raises(CheckpointError) as info:
        parse_nemo_config(raw_config(**overrides))
    assert not isinstance(info.value, UnsupportedCheckpointError)
    assert message in str(info.value)


# --------------------------------------------------------------------------- .nemo


def test_nemo_round_trip(tmp_path: Path, checkpoint: Checkpoint) -> None:
    """save_nemo then load_nemo gives equal tensors, config and tokenizer; the archive looks like NeMo's."""
    path = tmp_path / "model.nemo"
    save_nemo(path, checkpoint)
    loaded = load_nemo(path)
    assert loaded.config == checkpoint.config and loaded.tokenizer_model == checkpoint.tokenizer_model
    assert loaded.state_dict.keys() == checkpoint.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in checkpoint.state_dict.items())
    assert loaded.has_feature_buffers and len(loaded.sha256) == 64 and loaded.source == str(path)
    with tarfile.open(path, "r:") as tar:  # uncompressed, "./"-prefixed names, artifacts named in the config
        names = set(tar.getnames())
    tok = loaded.raw_config["tokenizer"]
    assert {"./model_config.yaml", "./model_weights.ckpt"} <= names
    for key, suffix in (
        ("model_path", "_tokenizer.model"),
        ("vocab_path", "_vocab.txt"),
        ("spe_tokenizer_vocab", "_tokenizer.vocab"),
    ):
        assert tok[key].startswith("nemo:") and tok[key].endswith(suffix) and f"./{tok[key][5:]}" in names
    assert loaded.raw_config["optim"] == checkpoint.raw_config["optim"]  # the original config is kept


def test_regenerated_config_parses_to_the_same_model(tmp_path: Path, checkpoint: Checkpoint) -> None:
    """nemo_config_from writes a config that parses back to the same ModelConfig, for every head layout."""
    configs = [
        checkpoint.config,
        replace(
            checkpoint.config, model_class="EncDecHybridRNNTCTCBPEModel", ctc=type_ctc(32, 32, "ctc_decoder")
        ),
        replace(
            checkpoint.config,
            model_class="EncDecCTCModelBPE",
            transducer=None,
            ctc=type_ctc(32, 32, "decoder"),
        ),
    ]
    for config in configs:
        raw = nemo_config_from(config, checkpoint.tokenizer_model or b"", artifact_prefix="a" * 32)
        assert parse_nemo_config(yaml.safe_load(yaml.safe_dump(raw, allow_unicode=True))) == config
        assert (
            raw["preprocessor"]["pad_to"] == 0
            and raw["tokenizer"]["model_path"] == f"nemo:{'a' * 32}_tokenizer.model"
        )
    path = tmp_path / "regenerated.nemo"
    save_nemo(path, checkpoint, regenerate_config=True)
    assert load_nemo(path).config == checkpoint.config


def type_ctc(vocab: int, feat_in: int, prefix: str) -> Any:
    from streamer.asr.config import CTCConfig

    return CTCConfig(vocab_size=vocab, feat_in=feat_in, key_prefix=prefix)


def test_eou_token_ids(tmp_path: Path) -> None:
    """The ids of <EOU>/<EOB> come from the tokenizer."""
    tok = train_tokenizer(tmp_path, vocab=34, eou=True)
    config = parse_nemo_config(raw_config(34))
    save_nemo(tmp_path / "eou.nemo", Checkpoint(config, random_state_dict(config), tok, raw_config(34), "t"))
    assert load_nemo(tmp_path / "eou.nemo").config.eou_token_ids == (1, 2)


def _repack(
    src: Path, dst: Path, *, drop: str = "", rename: dict[str, str] | None = None, compress: bool = False
) -> None:
    """Copy a .nemo, dropping or renaming members (old archives had un-hashed names, or gzip)."""
    with tarfile.open(src, "r:") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    with tarfile.open(dst, "w:gz" if compress else "w:") as out:
        for name, data in members.items():
            if drop and name.endswith(drop):
                continue
            for old, new in (rename or {}).items():
                name = name.replace(old, new) if name.endswith(old) else name
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_gzip_and_legacy_names(tmp_path: Path, checkpoint: Checkpoint) -> None:
    """Gzip archives (before NeMo 1.7) load; a tokenizer under another name is found by its suffix."""
    save_nemo(tmp_path / "a.nemo", checkpoint)
    _repack(tmp_path / "a.nemo", tmp_path / "gz.nemo", compress=True)
    with open(tmp_path / "gz.nemo", "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    assert load_nemo(tmp_path / "gz.nemo").tokenizer_model == checkpoint.tokenizer_model
    with tarfile.open(tmp_path / "a.nemo") as tar:
        name = next(n for n in tar.getnames() if n.endswith("_tokenizer.model"))
    _repack(tmp_path / "a.nemo", tmp_path / "legacy.nemo", rename={name: "./tokenizer.model"})
    assert load_nemo(tmp_path / "legacy.nemo").tokenizer_model == checkpoint.tokenizer_model


def test_missing_tokenizer(tmp_path: Path, checkpoint: Checkpoint) -> None:
    """No tokenizer: an error that says so, or None when the caller allows it."""
    save_nemo(tmp_path / "a.nemo", checkpoint)
    _repack(tmp_path / "a.nemo", tmp_path / "b.nemo", drop="_tokenizer.model")
    with pytest.raises(CheckpointError, match="no SentencePiece tokenizer in the archive"):
        load_nemo(tmp_path / "b.nemo")
    assert load_nemo(tmp_path / "b.nemo", require_tokenizer=False).tokenizer_model is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, c: None, "model file not found"),
        (lambda p, c: p.write_bytes(b"not a tar at all" * 100), "is not a .nemo file (not a tar archive)"),
        (lambda p, c: p.write_bytes(gzip.compress(b"x" * 1000)), "not a tar archive"),
        (lambda p, c: _repack(_saved(p, c), p, drop="model_config.yaml"), "no model_config.yaml"),
        (lambda p, c: _repack(_saved(p, c), p, drop="model_weights.ckpt"), "no model_weights.ckpt"),
        (lambda p, c: p.write_bytes(_saved(p, c).read_bytes()[:30000]), "is damaged"),
    ],
    ids=["missing", "not-tar", "gzip-not-tar", "no-config", "no-weights", "truncated"],
)
def test_broken_archives(tmp_path: Path, checkpoint: Checkpoint, make: Any, message: str) -> None:
    """Each broken file gives one CheckpointError line saying what is wrong."""
    path = tmp_path / "broken.nemo"
    make(path, checkpoint)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_nemo(path)


def _saved(path: Path, checkpoint: Checkpoint) -> Path:
    good = path.with_name("good.nemo")
    save_nemo(good, checkpoint)
    return good


def test_state_dict_validation(checkpoint: Checkpoint) -> None:
    """Shape and key mismatches name the key; obsolete buffers and absent feature buffers are accepted."""
    state = dict(checkpoint.state_dict)
    state["joint.joint_net.2.weight"] = torch.zeros(37, 20)
    with pytest.raises(CheckpointError, match=r"joint.joint_net.2.weight has shape \[37, 20\], .*\[38, 20\]"):
        check_state_dict(checkpoint.config, state, "x")
    state = dict(checkpoint.state_dict) | {"encoder.layers.0.conv.batch_norm.running_mean": torch.zeros(32)}
    with pytest.raises(CheckpointError, match="unexpected key encoder.layers.0.conv.batch_norm.running_mean"):
        check_state_dict(checkpoint.config, state, "x")
    state = {k: v for k, v in checkpoint.state_dict.items() if k != "encoder.layers.1.norm_out.bias"}
    with pytest.raises(CheckpointError, match="lacks encoder.layers.1.norm_out.bias"):
        check_state_dict(checkpoint.config, state, "x")
    state = {k: v for k, v in checkpoint.state_dict.items() if not k.startswith("preprocessor.")}
    check_state_dict(checkpoint.config, state | {"encoder.pos_enc.pe": torch.zeros(1, 9, 32)}, "x")


def test_key_inventory_matches_the_reference() -> None:
    """Shapes for the streaming large model agree with nemo-reference.md Appendix B."""
    cfg = parse_nemo_config(
        raw_config(
            1024,
            encoder__d_model=512,
            encoder__n_heads=8,
            encoder__n_layers=17,
            encoder__subsampling_conv_channels=256,
            model_defaults__enc_hidden=512,
            model_defaults__pred_hidden=640,
            decoder__prednet__pred_rnn_layers=1,
            joint__jointnet__joint_hidden=640,
            **RNNT,
        )
    )
    shapes = expected_shapes(cfg)
    assert shapes["encoder.pre_encode.out.weight"] == (512, 2816)
    assert shapes["encoder.pre_encode.conv.5.weight"] == (256, 1, 3, 3)
    assert shapes["encoder.pre_encode.conv.6.weight"] == (256, 256, 1, 1)
    assert shapes["encoder.layers.16.self_attn.pos_bias_u"] == (8, 64)
    assert shapes["encoder.layers.0.conv.depthwise_conv.weight"] == (512, 1, 9)
    assert shapes["decoder.prediction.dec_rnn.lstm.weight_ih_l0"] == (2560, 640)
    assert shapes["joint.joint_net.2.weight"] == (1025, 640) and shapes["preprocessor.featurizer.fb"] == (
        1,
        80,
        257,
    )


# --------------------------------------------------------------------------- Hugging Face format


def hf_tokenizer_json(tok: bytes) -> dict[str, Any]:
    """tokenizer.json the way transformers' ParakeetConverter writes it (identity normaliser)."""
    sp = sentencepiece.SentencePieceProcessor(model_proto=tok)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    added = [
        {"id": i, "content": sp.id_to_piece(i), "special": sp.is_control(i), "normalized": False}
        for i in range(sp.get_piece_size())
        if sp.is_control(i) or sp.id_to_piece(i) in ("<EOU>", "<EOB>")
    ]
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": True, "vocab": vocab, "merges": []},
    }


def write_hf_dir(
    directory: Path, checkpoint: Checkpoint, model_type: str, *, tokenizer_json: bool = False
) -> None:
    """A transformers-format directory holding ``checkpoint``'s weights under HF names."""
    directory.mkdir(parents=True, exist_ok=True)
    e, t = checkpoint.config.encoder, checkpoint.config.transducer
    assert t is not None
    encoder = {
        "hidden_size": e.d_model,
        "num_hidden_layers": e.n_layers,
        "num_attention_heads": e.n_heads,
        "intermediate_size": e.d_model * e.ff_expansion_factor,
        "num_mel_bins": e.feat_in,
        "conv_kernel_size": e.conv_kernel_size,
        "subsampling_conv_channels": e.subsampling_conv_channels,
        "scale_input": e.xscaling,
        "attention_bias": e.use_bias,
        "convolution_bias": e.use_bias,
    }
    if model_type == "nemotron_asr_streaming":
        encoder |= {"sliding_window": 71, "default_num_lookahead_tokens": 13}
    config = {
        "model_type": model_type,
        "vocab_size": t.vocab_size + 1,
        "blank_token_id": t.vocab_size,
        "decoder_hidden_size": t.pred_hidden,
        "num_decoder_layers": t.pred_rnn_layers,
        "durations": list(t.durations),
        "encoder_config": encoder,
    }
    (directory / "config.json").write_text(json.dumps(config))
    save_file(to_hf_state_dict(checkpoint.state_dict, model_type), str(directory / "model.safetensors"))
    if tokenizer_json:
        (directory / "tokenizer.json").write_text(
            json.dumps(hf_tokenizer_json(checkpoint.tokenizer_model or b""))
        )
    else:
        (directory / "tokenizer.model").write_bytes(checkpoint.tokenizer_model or b"")


def offline_checkpoint(tokenizer: bytes) -> Checkpoint:
    """A parakeet-style (offline, BatchNorm, symmetric conv) TDT model with random weights."""
    raw = raw_config(
        encoder__causal_downsampling=False,
        encoder__conv_norm_type="batch_norm",
        encoder__conv_context_size=None,
        encoder__att_context_size=[-1, -1],
        encoder__att_context_style="regular",
        preprocessor__normalize="per_feature",
        model_defaults__pred_hidden=20,  # HF has one decoder_hidden_size for both
    )
    config = parse_nemo_config(raw)
    return Checkpoint(config, random_state_dict(config), tokenizer, raw, "offline")


@pytest.mark.parametrize("model_type", ["parakeet_tdt", "nemotron_asr_streaming"])
def test_hf_key_mapping_both_ways(checkpoint: Checkpoint, model_type: str) -> None:
    """NeMo -> HF -> NeMo is the identity on every weight key; the names follow §9.2."""
    keys = [k for k in expected_shapes(checkpoint.config) if not k.startswith("preprocessor.")]
    assert [hf_to_nemo_key(nemo_to_hf_key(k, model_type) or "", model_type) for k in keys] == keys
    hf = {nemo_to_hf_key(k, model_type) for k in keys}
    assert len(hf) == len(keys) and nemo_to_hf_key("preprocessor.featurizer.fb", model_type) is None
    common = {
        "encoder.layers.1.self_attn.relative_k_proj.weight",
        "encoder.layers.0.self_attn.bias_u",
        "encoder.layers.0.conv.norm.weight",
        "encoder.subsampling.linear.weight",
        "encoder_projector.weight",
        "decoder.decoder_projector.bias",
        "decoder.embedding.weight",
        "decoder.lstm.weight_hh_l1",
        "joint.head.weight",
        "encoder.layers.1.self_attn.o_proj.weight",
    }
    assert common <= hf
    if model_type == "parakeet_tdt":
        assert {"encoder.subsampling.layers.0.weight", "encoder.subsampling.layers.6.weight"} <= hf
    else:
        assert {
            "encoder.subsampling.conv_in.weight",
            "encoder.subsampling.layers.0.depthwise_conv.weight",
            "encoder.subsampling.layers.1.pointwise_conv.bias",
        } <= hf
    assert hf_to_nemo_key("ctc_head.weight", "parakeet_ctc") == "decoder.decoder_layers.0.weight"
    assert nemo_to_hf_key("decoder.decoder_layers.0.bias", "parakeet_ctc") == "ctc_head.bias"


def test_load_hf_parakeet(tmp_path: Path, tokenizer: bytes) -> None:
    """An HF Parakeet TDT directory loads with NeMo key names and an offline-encoder config."""
    checkpoint = offline_checkpoint(tokenizer)
    write_hf_dir(tmp_path / "hf", checkpoint, "parakeet_tdt")
    loaded = load_hf(tmp_path / "hf")
    assert not loaded.has_feature_buffers
    assert all(
        torch.equal(loaded.state_dict[k], v)
        for k, v in checkpoint.state_dict.items()
        if not k.startswith("preprocessor.")
    )
    e, f, t = loaded.config.encoder, loaded.config.features, loaded.config.transducer
    assert (e.att_context_sizes, e.att_context_style, e.causal_downsampling) == (
        ((-1, -1),),
        "regular",
        False,
    )
    assert (e.conv_norm_type, e.conv_context, f.normalize, f.n_mels) == (
        "batch_norm",
        (4, 4),
        "per_feature",
        80,
    )
    assert t is not None and t.durations == (0, 1, 2, 3, 4) and t.vocab_size == 32
    assert loaded.tokenizer_model == checkpoint.tokenizer_model
    assert parse_nemo_config(loaded.raw_config) == loaded.config  # a NeMo config can be written for it


def test_load_hf_nemotron_with_tokenizer_json(tmp_path: Path, checkpoint: Checkpoint) -> None:
    """Nemotron streaming: causal, LayerNorm, 70 frames of left context; the tokenizer rebuilt from JSON."""
    tok = train_tokenizer(tmp_path, vocab=34, eou=True)
    config = parse_nemo_config(raw_config(34, model_defaults__pred_hidden=20, **RNNT))
    write_hf_dir(
        tmp_path / "hf",
        Checkpoint(config, random_state_dict(config), tok, {}, "t"),
        "nemotron_asr_streaming",
        tokenizer_json=True,
    )
    (tmp_path / "hf" / "processor_config.json").write_text(
        json.dumps({"supported_num_lookahead_tokens": [13, 1]})
    )
    loaded = load_hf(tmp_path / "hf")
    e = loaded.config.encoder
    assert (e.att_context_sizes, e.att_context_style, e.conv_norm_type) == (
        ((70, 13), (70, 1)),
        "chunked_limited",
        "layer_norm",
    )
    assert e.is_causal and loaded.config.features.normalize == "NA" and loaded.config.eou_token_ids == (1, 2)
    original = sentencepiece.SentencePieceProcessor(model_proto=tok)
    rebuilt = sentencepiece.SentencePieceProcessor(model_proto=loaded.tokenizer_model)
    pieces = range(original.get_piece_size())
    assert [rebuilt.id_to_piece(i) for i in pieces] == [original.id_to_piece(i) for i in pieces]
    for text in [*CORPUS, "the kitchen<EOU>"]:
        assert rebuilt.encode(text) == original.encode(text)
        assert rebuilt.decode(original.encode(text)) == original.decode(original.encode(text))


def test_load_hf_sharded(tmp_path: Path, tokenizer: bytes) -> None:
    """Weights split over shards listed in model.safetensors.index.json load as one state dict."""
    checkpoint = offline_checkpoint(tokenizer)
    write_hf_dir(tmp_path, checkpoint, "parakeet_tdt")
    weights = to_hf_state_dict(checkpoint.state_dict, "parakeet_tdt")
    (tmp_path / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for i, (key, tensor) in enumerate(weights.items()):
        shards[list(shards)[i % 2]][key] = tensor
    for name, part in shards.items():
        save_file(part, str(tmp_path / name))
    index = {"weight_map": {key: name for name, part in shards.items() for key in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_hf(tmp_path)
    assert len(loaded.state_dict) == len(checkpoint.state_dict) - 2  # all but the feature buffers
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        load_hf(tmp_path)


def test_hf_unsupported_model_type(tmp_path: Path) -> None:
    """An HF model that is not Parakeet/Nemotron-streaming says which ones are."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(UnsupportedCheckpointError, match="'whisper' is not supported .*parakeet_tdt"):
        load_hf(tmp_path)


# --------------------------------------------------------------------------- registry and downloads


class _Hub(http.server.SimpleHTTPRequestHandler):
    """Serves ``<root>/<owner>/<name>/resolve/<revision>/<file>`` and records each GET.

    Like the Hub, every answer names the revision's commit (``X-Repo-Commit``), a file comes with its ETag,
    and a missing file is a 404 that says so (``X-Error-Code: EntryNotFound``): huggingface_hub needs the
    first two to cache a file, and remembers the third so it does not ask again.
    """

    requests: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).requests.append((self.path, self.headers.get("Authorization")))
        super().do_GET()

    def send_head(self) -> Any:
        parts = self.path.split("?")[0].split("/")  # "", owner, name, "resolve", revision, file...
        self.commit = hashlib.sha1(parts[4].encode() if len(parts) > 5 else b"").hexdigest()
        if not Path(self.translate_path(self.path)).is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", self.commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return super().send_head()

    def end_headers(self) -> None:
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("X-Repo-Commit", self.commit)
            # The Hub's ETag is the content's hash; this one adds the URL, so a revision holding the same
            # bytes is downloaded again instead of shared (and the test sees which revision was fetched).
            etag = hashlib.sha256(self.path.encode() + path.read_bytes()).hexdigest()
            self.send_header("ETag", f'"{etag}"')
        super().end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, list[tuple[str, str | None]]]]:
    """A local file server standing in for huggingface.co, plus an empty download cache."""
    root = tmp_path / "hub"
    root.mkdir()
    requests: list[tuple[str, str | None]] = []
    handler = type("Hub", (_Hub,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield root, requests
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_download_nemo_and_cache_hit(
    hub: tuple[Path, list[Any]], checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """An HF id downloads <name>.nemo with the token; the second call is served from the cache."""
    root, requests = hub
    save_nemo(root / "acme" / "tiny" / "resolve" / "main" / "tiny.nemo", checkpoint)
    first = load_checkpoint("acme/tiny", registry=tmp_path / "none.toml")
    assert first.source == "acme/tiny" and first.config == checkpoint.config
    assert requests == [("/acme/tiny/resolve/main/tiny.nemo", "Bearer secret")]
    # Hugging Face's own cache layout under HF_HOME, shared with NeMo and transformers
    repo_cache = tmp_path / "cache" / "hub" / "models--acme--tiny"
    cached = repo_cache / "snapshots" / (repo_cache / "refs" / "main").read_text() / "tiny.nemo"
    assert cached.is_file() and not list(repo_cache.glob("blobs/*.incomplete"))
    second = load_checkpoint("acme/tiny", registry=tmp_path / "none.toml")
    assert len(requests) == 1 and second.sha256 == first.sha256


def test_registry_entries(hub: tuple[Path, list[Any]], checkpoint: Checkpoint, tmp_path: Path) -> None:
    """Registry names resolve to a local path or to a Hub repo + file name (and a pinned revision)."""
    root, requests = hub
    save_nemo(root / "acme" / "big" / "resolve" / "v2" / "weights.nemo", checkpoint)
    save_nemo(tmp_path / "repo" / "models" / "local" / "model.nemo", checkpoint)
    registry = tmp_path / "repo" / "models" / "registry.toml"
    registry.write_text(
        '[models.local]\npath = "models/local/model.nemo"\n\n'
        '[models.remote]\nrepo = "acme/big"\nfilename = "weights.nemo"\nrevision = "v2"\n'
    )
    assert load_checkpoint("local", registry=registry).config == checkpoint.config
    assert not requests
    assert load_checkpoint("remote", registry=registry).source == "remote"
    assert load_checkpoint("acme/big", registry=registry).source == "acme/big"  # the repo id finds the entry
    assert [path for path, _ in requests] == ["/acme/big/resolve/v2/weights.nemo"]
    save_nemo(root / "acme" / "big" / "resolve" / "v3" / "big.nemo", checkpoint)
    assert (
        load_checkpoint("acme/big@v3", registry=registry).source == "acme/big@v3"
    )  # a revision: not the entry
    assert requests[-1][0] == "/acme/big/resolve/v3/big.nemo"


def test_download_hf_format_repo(hub: tuple[Path, list[Any]], tokenizer: bytes, tmp_path: Path) -> None:
    """A repo without <name>.nemo falls back to the transformers files, cached as a directory."""
    root, requests = hub
    write_hf_dir(
        root / "acme" / "parakeet" / "resolve" / "main", offline_checkpoint(tokenizer), "parakeet_tdt"
    )
    loaded = load_checkpoint("acme/parakeet", registry=tmp_path / "none.toml")
    assert loaded.config.encoder.conv_norm_type == "batch_norm" and not loaded.has_feature_buffers
    count = len(requests)
    load_checkpoint("acme/parakeet", registry=tmp_path / "none.toml")
    assert len(requests) == count  # complete download: no network the second time


@pytest.mark.slow  # huggingface_hub retries a dead endpoint with backoff (about 25 s) before giving up
def test_offline_and_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing cached, offline mode and a dead endpoint each give one clear error."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the cache .* downloads are off"):
        load_checkpoint("acme/tiny", registry=tmp_path / "none.toml")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(
        CheckpointError, match="cannot download http://127.0.0.1:9/acme/tiny/resolve/main/tiny.nemo"
    ):
        load_checkpoint("acme/tiny", registry=tmp_path / "none.toml")
    with pytest.raises(CheckpointError, match="not a file, not in the registry"):
        load_checkpoint("no such thing", registry=tmp_path / "none.toml")
    with pytest.raises(CheckpointError, match="model file not found: models/missing.nemo"):
        load_checkpoint("models/missing.nemo", registry=tmp_path / "none.toml")


def test_bundled_registry_parses() -> None:
    """models/registry.toml names the default model and NVIDIA's public checkpoints."""
    from streamer.asr.download import read_registry

    entries = read_registry()
    assert entries["streamer-tdt-small"].path is not None
    assert entries["parakeet-tdt-0.6b-v3"].filename == "parakeet-tdt-0.6b-v3.nemo"
    assert all(e.repo is None or e.repo.startswith("nvidia/") for e in entries.values())


# --------------------------------------------------------------------------- NeMo-made fixtures


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*/model.nemo")), ids=lambda p: p.parent.name)
def test_nemo_fixtures(path: Path) -> None:
    """Every fixture .nemo (written by NeMo 3.0.0) loads, and the parsed config matches its yaml."""
    ckpt = load_nemo(path)
    raw, cfg = ckpt.raw_config, ckpt.config
    assert (
        cfg.encoder.d_model == raw["encoder"]["d_model"]
        and cfg.encoder.n_layers == raw["encoder"]["n_layers"]
    )
    assert cfg.features.n_mels == raw["preprocessor"]["features"]
    sizes = raw["encoder"].get("att_context_size") or [-1, -1]
    assert [list(s) for s in cfg.encoder.att_context_sizes] == (
        sizes if isinstance(sizes[0], list) else [sizes]
    )
    if cfg.transducer is not None:
        assert cfg.transducer.vocab_size == raw["decoder"]["vocab_size"]
        assert (
            cfg.transducer.num_outputs
            == ckpt.state_dict[
                f"joint.joint_net.{2 if cfg.transducer.joint_dropout_layer else 1}.weight"
            ].shape[0]
        )
    if cfg.ctc is not None:
        assert (
            ckpt.state_dict[f"{cfg.ctc.key_prefix}.decoder_layers.0.weight"].shape[0]
            == cfg.ctc.vocab_size + 1
        )
    assert copy.deepcopy(ckpt.raw_config) == raw


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"encoder": {"conv_norm_type": "batch_norm", "use_bias": False, "subsampling_factor": 4}},
        {"transducer": {"vocab_size": 40, "joint_dropout_layer": True, "pred_rnn_layers": 2, "durations": (0, 1, 2)}},
        {"ctc": {"vocab_size": 40, "feat_in": 32, "key_prefix": "ctc_decoder"}},
        {"transducer": None, "ctc": {"vocab_size": 40, "feat_in": 32, "key_prefix": "decoder"}},
    ],
)
def test_expected_shapes_are_those_of_the_built_model(overrides: dict[str, Any]) -> None:
    """The shape check's keys and shapes equal a model built on the CPU, for every head and layer variant."""
    from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
    from streamer.asr.network import AsrNetwork

    parts: dict[str, Any] = {
        "encoder": EncoderConfig(d_model=32, n_heads=2, subsampling_conv_channels=16),
        "transducer": TransducerConfig(vocab_size=40, pred_hidden=24, joint_hidden=24),
    }
    for name, value in overrides.items():
        kind = {"encoder": EncoderConfig, "transducer": TransducerConfig, "ctc": CTCConfig}[name]
        base = {"encoder": {"d_model": 32, "n_heads": 2, "subsampling_conv_channels": 16},
                "transducer": {"pred_hidden": 24, "joint_hidden": 24}, "ctc": {}}[name]
        parts[name] = None if value is None else kind(**(base | value))
    config = ModelConfig(FeatureConfig(n_mels=80), **parts)
    built = {key: tuple(t.shape) for key, t in AsrNetwork(config).state_dict().items()}
    assert expected_shapes(config) == built
