"""Load and save model checkpoints: NeMo ``.nemo`` archives, Hugging Face directories, registry names.

Every loader returns a `Checkpoint`: the typed `ModelConfig`, the weights under NeMo's state-dict key
names (nemo-reference.md §9, Appendix B), the SentencePiece model and the raw NeMo config. The
shapes of the weights are checked against the config here, so a model builder can load them with
``strict=True``.

Shapes use the legend: F mel bins, D encoder width, P prediction width, J joint width,
V vocabulary without blank, N TDT durations, K conv kernel, H heads, L LSTM layers.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import logging
import os
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from streamer.asr.config import ModelConfig
from streamer.asr.nemoconfig import TOKENIZER_ARTIFACTS, nemo_config_from, parse_nemo_config
from streamer.errors import CheckpointError, UnsupportedCheckpointError

logger = logging.getLogger(__name__)

FEATURE_BUFFER_KEYS = ("preprocessor.featurizer.window", "preprocessor.featurizer.fb")
EOU_PIECES = ("<EOU>", "<EOB>")  # NeMo's EOU_STRING / EOB_STRING (nemo-reference.md §11)
# Keys old NeMo versions saved that today's modules no longer have (non-persistent buffers).
_OBSOLETE_KEYS = ("encoder.pos_enc.pe",)

__all__ = [
    "Checkpoint",
    "check_state_dict",
    "eou_token_ids",
    "expected_shapes",
    "load_checkpoint",
    "load_hf",
    "load_nemo",
    "nemo_config_from",
    "parse_nemo_config",
    "save_nemo",
]


@dataclass
class Checkpoint:
    """A model read from disk, ready for a model builder.

    Attributes:
        config: the typed model configuration.
        state_dict: weights under NeMo's key names. HF checkpoints lack the feature buffers
            (`FEATURE_BUFFER_KEYS`); see `has_feature_buffers`.
        tokenizer_model: the serialized SentencePiece model, or None when the file had none.
        raw_config: the NeMo ``model_config.yaml`` as a dict (for HF checkpoints: one generated
            with `nemo_config_from`).
        source: where it came from (a path, a registry name or a Hugging Face id).
        sha256: hex digest of the weights file (the ``.nemo`` archive, or the safetensors files).
    """

    config: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer_model: bytes | None
    raw_config: dict[str, Any]
    source: str
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_feature_buffers(self) -> bool:
        """False when the mel filterbank and window must be computed (HF checkpoints do not store them)."""
        return all(key in self.state_dict for key in FEATURE_BUFFER_KEYS)


# ---------------------------------------------------------------------------------------------------
# State-dict shapes (Appendix B)


def _linear(prefix: str, n_out: int, n_in: int, bias: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}.weight": (n_out, n_in)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _subsampling_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`dw_striding`: conv 0, then (depthwise 3i-1, pointwise 3i) per extra stage, then `out` (§2.1)."""
    e = config.encoder
    c, shapes = e.subsampling_conv_channels, {}
    stages = e.subsampling_factor.bit_length() - 1
    freq = e.feat_in
    for stage in range(stages):
        # Causal subsampling pads (k-1, s-1) = (2, 1), otherwise (1, 1), on the frequency axis too.
        freq = freq // 2 + 1 if e.causal_downsampling else (freq - 1) // 2 + 1
        if stage == 0:
            shapes |= {
                "encoder.pre_encode.conv.0.weight": (c, 1, 3, 3),
                "encoder.pre_encode.conv.0.bias": (c,),
            }
            continue
        dw, pw = f"encoder.pre_encode.conv.{3 * stage - 1}", f"encoder.pre_encode.conv.{3 * stage}"
        shapes |= {
            f"{dw}.weight": (c, 1, 3, 3),
            f"{dw}.bias": (c,),
            f"{pw}.weight": (c, c, 1, 1),
            f"{pw}.bias": (c,),
        }
    return shapes | _linear("encoder.pre_encode.out", e.d_model, c * freq, True)


def _layer_shapes(config: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    e = config.encoder
    d, ff, heads, bias, p = (
        e.d_model,
        e.d_model * e.ff_expansion_factor,
        e.n_heads,
        e.use_bias,
        f"encoder.layers.{i}",
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("norm_feed_forward1", "norm_conv", "norm_self_att", "norm_feed_forward2", "norm_out"):
        shapes |= _norm(f"{p}.{name}", d)
    for ffn in ("feed_forward1", "feed_forward2"):
        shapes |= _linear(f"{p}.{ffn}.linear1", ff, d, bias) | _linear(f"{p}.{ffn}.linear2", d, ff, bias)
    for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
        shapes |= _linear(f"{p}.self_attn.{proj}", d, d, bias)
    shapes |= _linear(f"{p}.self_attn.linear_pos", d, d, False)
    if e.untie_biases:
        shapes |= {
            f"{p}.self_attn.pos_bias_u": (heads, d // heads),
            f"{p}.self_attn.pos_bias_v": (heads, d // heads),
        }
    conv = f"{p}.conv"
    shapes[f"{conv}.pointwise_conv1.weight"] = (2 * d, d, 1)
    shapes[f"{conv}.depthwise_conv.weight"] = (d, 1, e.conv_kernel_size)
    shapes[f"{conv}.pointwise_conv2.weight"] = (d, d, 1)
    if bias:
        shapes |= {
            f"{conv}.pointwise_conv1.bias": (2 * d,),
            f"{conv}.depthwise_conv.bias": (d,),
            f"{conv}.pointwise_conv2.bias": (d,),
        }
    shapes |= _norm(f"{conv}.batch_norm", d)  # NeMo keeps the name for a LayerNorm too
    if e.conv_norm_type == "batch_norm":
        shapes |= {
            f"{conv}.batch_norm.running_mean": (d,),
            f"{conv}.batch_norm.running_var": (d,),
            f"{conv}.batch_norm.num_batches_tracked": (),
        }
    return shapes


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key a NeMo model with ``config`` has, with its shape (incl. the feature buffers)."""
    f, e = config.features, config.encoder
    shapes: dict[str, tuple[int, ...]] = {
        "preprocessor.featurizer.window": (f.win_length,),
        "preprocessor.featurizer.fb": (1, f.n_mels, f.n_fft // 2 + 1),
    }
    shapes |= _subsampling_shapes(config)
    if not e.untie_biases:  # one pair shared by all layers, owned by the encoder
        shapes |= {
            "encoder.pos_bias_u": (e.n_heads, e.d_model // e.n_heads),
            "encoder.pos_bias_v": (e.n_heads, e.d_model // e.n_heads),
        }
    for i in range(e.n_layers):
        shapes |= _layer_shapes(config, i)
    if (t := config.transducer) is not None:
        shapes["decoder.prediction.embed.weight"] = (t.vocab_size + 1, t.pred_hidden)  # blank row = padding
        for k in range(t.pred_rnn_layers):
            lstm = "decoder.prediction.dec_rnn.lstm"
            shapes |= {
                f"{lstm}.weight_ih_l{k}": (4 * t.pred_hidden, t.pred_hidden),
                f"{lstm}.weight_hh_l{k}": (4 * t.pred_hidden, t.pred_hidden),
                f"{lstm}.bias_ih_l{k}": (4 * t.pred_hidden,),
                f"{lstm}.bias_hh_l{k}": (4 * t.pred_hidden,),
            }
        out = f"joint.joint_net.{2 if t.joint_dropout_layer else 1}"  # ReLU, [Dropout], Linear
        shapes |= _linear("joint.enc", t.joint_hidden, e.d_model, True)
        shapes |= _linear("joint.pred", t.joint_hidden, t.pred_hidden, True)
        shapes |= _linear(out, t.num_outputs, t.joint_hidden, True)
    if (c := config.ctc) is not None:
        shapes |= {
            f"{c.key_prefix}.decoder_layers.0.weight": (c.vocab_size + 1, c.feat_in, 1),
            f"{c.key_prefix}.decoder_layers.0.bias": (c.vocab_size + 1,),
        }
    return shapes


def check_state_dict(config: ModelConfig, state_dict: dict[str, Tensor], source: str) -> None:
    """Check that ``state_dict`` has exactly the keys and shapes ``config`` implies.

    The feature buffers may be absent (HF checkpoints); obsolete non-persistent buffers are removed.

    Raises:
        CheckpointError: naming the first missing, unexpected or mis-shaped key.
    """
    for key in _OBSOLETE_KEYS:
        state_dict.pop(key, None)
    expected = expected_shapes(config)
    optional = set(FEATURE_BUFFER_KEYS) if not any(k in state_dict for k in FEATURE_BUFFER_KEYS) else set()
    missing = [key for key in expected if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has the unexpected key {unexpected[0]}"
        counts = f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        raise CheckpointError(f"{source}: weights do not match the config: it {what} {counts}")
    for key, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"{source}: weight {key} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{source}: weight {key} has shape {list(tensor.shape)}, "
                f"the config implies {list(expected[key])}"
            )


# ---------------------------------------------------------------------------------------------------
# Tokenizer helpers


def _sentencepiece(tokenizer_model: bytes, source: str) -> Any:
    import sentencepiece  # noqa: PLC0415

    try:
        return sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{source}: the tokenizer is not a SentencePiece model: {exc}") from exc


def eou_token_ids(tokenizer_model: bytes, source: str = "tokenizer") -> tuple[int, ...]:
    """Ids of the ``<EOU>``/``<EOB>`` pieces the tokenizer has (empty for models without them)."""
    sp = _sentencepiece(tokenizer_model, source)
    return tuple(sp.piece_to_id(p) for p in EOU_PIECES if sp.id_to_piece(sp.piece_to_id(p)) == p)


def _with_tokenizer(config: ModelConfig, tokenizer_model: bytes | None, source: str) -> ModelConfig:
    """Check the vocabulary size against the tokenizer and fill in the EOU ids."""
    if tokenizer_model is None:
        return config
    size = _sentencepiece(tokenizer_model, source).get_piece_size()
    for head in (config.transducer, config.ctc):
        if head is not None and head.vocab_size != size:
            raise CheckpointError(
                f"{source}: the model has a vocabulary of {head.vocab_size} "
                f"but the tokenizer has {size} pieces"
            )
    return replace(config, eou_token_ids=eou_token_ids(tokenizer_model, source))


def _vocab_files(tokenizer_model: bytes) -> tuple[bytes, bytes]:
    """SentencePiece's ``tokenizer.vocab`` (piece, score) and NeMo's ``vocab.txt`` (BERT-style pieces)."""
    sp = _sentencepiece(tokenizer_model, "tokenizer")
    spe, bert = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        spe.append(f"{piece}\t{sp.get_score(i):g}\n")
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            # NeMo's create_spt_model rule: "▁word" -> "word", "ab" -> "##ab", a bare "▁" stays.
            word = piece[1:] if piece.startswith("▁") else f"##{piece}"
            bert.append(f"{word or piece}\n")
    return "".join(spe).encode(), "".join(bert).encode()


# ---------------------------------------------------------------------------------------------------
# .nemo


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _open_tar(path: Path) -> tarfile.TarFile:
    """Open a .nemo: uncompressed since NeMo 1.7, gzip before (§9.1)."""
    for mode in ("r:", "r:gz"):
        try:
            return tarfile.open(path, mode)  # noqa: SIM115 - the caller closes it
        except (tarfile.ReadError, gzip.BadGzipFile, EOFError):
            continue
    raise CheckpointError(f"{path} is not a .nemo file (not a tar archive)")


def _member(
    members: dict[str, tarfile.TarInfo], reference: str | None, suffix: str
) -> tarfile.TarInfo | None:
    """Find an artifact: the name the config gives (``nemo:<uuid>_tokenizer.model``), else by suffix."""
    if reference:
        name = os.path.basename(reference.removeprefix("nemo:"))
        if name in members:
            return members[name]
    candidates = sorted(name for name in members if name.endswith(suffix))
    return members[candidates[0]] if candidates else None


def _read_weights(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> dict[str, Tensor]:
    fileobj = tar.extractfile(info)
    if fileobj is None:
        raise CheckpointError(f"{path}: model_weights.ckpt is not a regular file")
    try:  # the member is seekable, so torch reads it in place without a second copy in memory
        state = torch.load(fileobj, map_location="cpu", weights_only=True)
    except (tarfile.TarError, EOFError, zlib.error):
        raise  # the archive itself is cut short: reported as damaged by the caller
    except Exception as exc:  # torch raises several unrelated types for a bad pickle
        raise CheckpointError(f"{path}: cannot read model_weights.ckpt: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a Lightning checkpoint rather than a bare state dict
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: model_weights.ckpt holds a {type(state).__name__}, not a state dict")
    return dict(state)


def load_nemo(path: str | os.PathLike[str], *, require_tokenizer: bool = True) -> Checkpoint:
    """Read a NeMo ``.nemo`` archive (nemo-reference.md §9.1).

    Args:
        path: the ``.nemo`` file.
        require_tokenizer: if False, a missing tokenizer gives ``tokenizer_model=None`` instead of an error.

    Raises:
        CheckpointError: the file is missing, not a tar archive, lacks the config, the weights or the
            tokenizer, or its weights do not fit its config.
        UnsupportedCheckpointError: the model uses something streamer does not implement.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        raw, tokenizer, state_dict = _read_archive(path)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CheckpointError(f"{path} is damaged (truncated download?): {exc}") from exc
    try:
        config = parse_nemo_config(raw)
    except CheckpointError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    if tokenizer is None and require_tokenizer:
        reference = (raw.get("tokenizer") or {}).get("model_path")
        raise CheckpointError(
            f"{path}: no SentencePiece tokenizer in the archive (config says {reference!r})"
        )
    check_state_dict(config, state_dict, str(path))
    config = _with_tokenizer(config, tokenizer, str(path))
    return Checkpoint(config, state_dict, tokenizer, raw, str(path), _sha256([path]))


def _read_archive(path: Path) -> tuple[dict[str, Any], bytes | None, dict[str, Tensor]]:
    """The raw config, the tokenizer (if any) and the weights of a .nemo file."""
    with _open_tar(path) as tar:
        members = {os.path.normpath(m.name): m for m in tar.getmembers() if m.isfile()}
        if "model_config.yaml" not in members:
            raise CheckpointError(f"{path}: no model_config.yaml in the archive; is it a NeMo model?")
        if "model_weights.ckpt" not in members:
            raise CheckpointError(f"{path}: no model_weights.ckpt in the archive")
        try:
            raw = yaml.safe_load(_extract(tar, members["model_config.yaml"]))
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{path}: model_config.yaml is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: model_config.yaml is not a mapping")
        info = _member(members, (raw.get("tokenizer") or {}).get("model_path"), "tokenizer.model")
        tokenizer = _extract(tar, info) if info is not None else None
        return raw, tokenizer, _read_weights(tar, members["model_weights.ckpt"], path)


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    fileobj = tar.extractfile(info)
    if fileobj is None:
        raise CheckpointError(f"{tar.name}: {info.name} is not a regular file")
    return fileobj.read()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(f"./{name}")
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def save_nemo(
    path: str | os.PathLike[str], checkpoint: Checkpoint, *, regenerate_config: bool = False
) -> None:
    """Write ``checkpoint`` as a ``.nemo`` archive that NeMo 3.0.0's ``restore_from`` loads.

    The config written is ``checkpoint.raw_config``, or one generated from ``checkpoint.config`` with
    `nemo_config_from` when ``regenerate_config`` is set or there is none; its tokenizer paths are
    pointed at the archive's own tokenizer files. The file appears atomically.

    Raises:
        CheckpointError: there is no tokenizer, or no mel filterbank/window (HF checkpoints: save the
            state dict of a built model instead, which has computed ones).
    """
    path = Path(path)
    if checkpoint.tokenizer_model is None:
        raise CheckpointError(f"cannot save {path}: the checkpoint has no tokenizer")
    if not checkpoint.has_feature_buffers:
        raise CheckpointError(
            f"cannot save {path}: NeMo needs {' and '.join(FEATURE_BUFFER_KEYS)}; take the state dict "
            "from a built model, which computes them"
        )
    check_state_dict(checkpoint.config, checkpoint.state_dict, str(path))
    # Name the artifacts after the tokenizer's content: the same tokenizer always gets the same names.
    prefix = hashlib.sha256(checkpoint.tokenizer_model).hexdigest()[:32]
    if regenerate_config or not checkpoint.raw_config:
        config = nemo_config_from(checkpoint.config, checkpoint.tokenizer_model, artifact_prefix=prefix)
    else:
        config = copy.deepcopy(checkpoint.raw_config)
        tokenizer = config.setdefault("tokenizer", {"dir": None, "type": "bpe"})
        tokenizer |= {key: f"nemo:{prefix}_{name}" for key, name in TOKENIZER_ARTIFACTS.items()}
    spe_vocab, vocab_txt = _vocab_files(checkpoint.tokenizer_model)
    weights = io.BytesIO()
    torch.save({k: _detached(v) for k, v in checkpoint.state_dict.items()}, weights)
    files = {
        "model_config.yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode(),
        "model_weights.ckpt": weights.getvalue(),
        f"{prefix}_tokenizer.model": checkpoint.tokenizer_model,
        f"{prefix}_tokenizer.vocab": spe_vocab,
        f"{prefix}_vocab.txt": vocab_txt,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:") as tar:
            for name, data in files.items():
                _tar_add(tar, name, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _detached(tensor: Tensor) -> Tensor:
    """A CPU tensor that owns exactly its data (a view would drag its whole storage into the file)."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


# ---------------------------------------------------------------------------------------------------
# Hugging Face directories and the dispatcher


def load_hf(directory: str | os.PathLike[str], *, require_tokenizer: bool = True) -> Checkpoint:
    """Read a Hugging Face transformers Parakeet / Nemotron-streaming directory (§9.2).

    Weights are renamed to NeMo's keys; the mel filterbank and window are absent
    (``has_feature_buffers`` is False), so the model builder keeps its computed ones. The tokenizer is
    ``tokenizer.model`` when present, else a SentencePiece model rebuilt from ``tokenizer.json``
    (decoding is exact; encoding text, needed only for training, may differ from the original).

    Raises:
        CheckpointError: files are missing or do not fit together.
        UnsupportedCheckpointError: the ``model_type`` is not one streamer implements.
    """
    from streamer.asr import hfformat  # noqa: PLC0415 - safetensors is only needed here

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; not a Hugging Face model directory")
    config = hfformat.model_config(directory)
    weight_files = hfformat.weight_files(directory)
    state_dict = hfformat.to_nemo_state_dict(hfformat.read_weights(weight_files), config)
    tokenizer = hfformat.tokenizer_model(directory)
    if tokenizer is None and require_tokenizer:
        raise CheckpointError(f"{directory}: no tokenizer.model or tokenizer.json")
    check_state_dict(config, state_dict, str(directory))
    config = _with_tokenizer(config, tokenizer, str(directory))
    raw = nemo_config_from(config, tokenizer, artifact_prefix="0" * 32) if tokenizer is not None else {}
    return Checkpoint(
        config, state_dict, tokenizer, raw, str(directory), _sha256(weight_files), extra={"format": "hf"}
    )


def load_checkpoint(
    spec: str | os.PathLike[str],
    *,
    registry: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
) -> Checkpoint:
    """Load a model given as a ``.nemo`` path, an HF directory, a registry name or a Hugging Face id.

    Args:
        spec: what ``--model`` says. Existing paths win over names; ``owner/name[@revision]`` that is
            neither a path nor a registry entry is downloaded from the Hugging Face Hub (and cached).
        registry: the registry file (default: :func:`streamer.resources.default_registry`).
        offline: never use the network (default: ``$HF_HUB_OFFLINE``); cached files still work.

    Raises:
        CheckpointError: nothing matches ``spec``, or the download failed with nothing cached.
    """
    from streamer.asr import hub  # noqa: PLC0415

    path = hub.resolve(str(spec), registry=registry, offline=offline)
    if path.is_dir():
        checkpoint = load_hf(path)
    elif path.suffix == ".nemo" or tarfile.is_tarfile(path):
        checkpoint = load_nemo(path)
    else:
        raise UnsupportedCheckpointError(f"{path}: expected a .nemo file or a Hugging Face directory")
    checkpoint.source = str(spec)
    return checkpoint
