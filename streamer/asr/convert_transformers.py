"""``--verify`` against transformers' own classes, when transformers is importable (it is optional).

The HF directory is loaded with the class its ``config.json`` names (``ParakeetForTDT``,
``NemotronAsrStreamingForRNNT``, ...) and its feature extractor; on the same audio and the same inputs
their features, encoder output and logits are compared with streamer's model. transformers computes
relative positions and attention masks with other arithmetic than NeMo (nemo-reference.md §12), so the
tolerance is `HF_ATOL` (tests/fixtures/nemo/check_hf_mapping.py measured below it).

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from streamer.asr.hfformat import NEMOTRON_TYPE
from streamer.asr.model import AsrModel, DecoderKind
from streamer.asr.verifyreport import FEATURE_ATOL, SENTENCE, Row, head_logits, max_abs_diff
from streamer.engine.recognizer import transcribe_offline

HF_ATOL = 1e-4


def _hf_logits(hf: Any, kind: DecoderKind, enc: Tensor, token_ids: list[int], blank: int) -> Tensor:
    if kind == "ctc":
        return torch.log_softmax(hf.ctc_head(enc), dim=-1)
    pred = hf.decoder(torch.tensor([[blank, *token_ids]], dtype=torch.long))  # (1, U+1, P), projected
    return hf.joint(decoder_hidden_states=pred[:, None], encoder_hidden_states=hf.encoder_projector(enc)[:, :, None])


def _tokenizer_rows(directory: Path, model: AsrModel) -> list[Row]:
    """transformers' tokenizer from ``tokenizer.json``: the same pieces (plus the blank) and text encoding."""
    import transformers  # noqa: PLC0415

    ours = model.tokenizer
    assert ours is not None
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    pieces = theirs.convert_ids_to_tokens(list(range(len(ours.pieces) + 1)))
    wrong = sum(a != b for a, b in zip(pieces, [*ours.pieces, "<blank>"], strict=True))
    ids_ours, ids_theirs = ours.encode(SENTENCE), theirs.encode(SENTENCE, add_special_tokens=False)
    return [
        Row("transformers tokenizer pieces", float(wrong), 0.0, type(theirs).__name__),
        Row("transformers tokenizer encode", float(ids_ours != ids_theirs), 0.0, f"{len(ids_ours)} ids"),
    ]


def _load(directory: Path) -> tuple[Any, Any, str]:
    import transformers  # noqa: PLC0415

    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    architecture = (config.get("architectures") or [""])[0]
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise LookupError(f"transformers {transformers.__version__} has no class {architecture!r}")
    model = cls.from_pretrained(str(directory)).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(str(directory))
    return model, extractor, f"{architecture} (transformers {transformers.__version__})"


def transformers_rows(directory: Path, model: AsrModel, audio: np.ndarray) -> tuple[list[Row], str]:
    """Comparisons of transformers' class for the HF ``directory`` with ``model`` (loaded from it or its twin).

    Returns:
        The rows, and a line saying what was run or why nothing was.
    """
    if importlib.util.find_spec("transformers") is None:
        return [], "transformers is not installed: its own classes were not compared"
    try:
        hf, extractor, name = _load(directory)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers is a mismatch to report
        return [Row("transformers load", float("nan"), 0.0, f"{type(exc).__name__}: {exc}")], "transformers failed"
    sample_rate = model.config.features.sample_rate
    nemotron = hf.config.model_type == NEMOTRON_TYPE
    try:
        rows = _tokenizer_rows(directory, model)
    except Exception as exc:  # noqa: BLE001 - as above
        rows = [Row("transformers tokenizer", float("nan"), 0.0, f"{type(exc).__name__}: {exc}")]
    with torch.inference_mode():
        x = torch.from_numpy(audio)[None]
        feats, lens = model.preprocessor(x, torch.tensor([x.size(1)]))
        n = int(lens[0])
        theirs = extractor(audio, sampling_rate=sample_rate, return_tensors="pt")["input_features"]
        rows.append(Row("transformers features", max_abs_diff(feats[0, :, :n].T, theirs[0, :n]), FEATURE_ATOL, name))
        feats = feats[:, :, :n]  # no padding: both encoders see exactly the valid frames
        for ctx in model.config.encoder.att_context_sizes:
            ours, _ = model.encoder(feats, lens, ctx)
            kwargs = {"num_lookahead_tokens": ctx[1]} if nemotron else {}
            enc = hf.encoder(input_features=feats.transpose(1, 2), **kwargs).last_hidden_state
            label = f"{ctx[0]},{ctx[1]}"
            rows.append(Row(f"transformers encoder {label}", max_abs_diff(ours, enc), HF_ATOL))
            for kind in model.decoder_kinds:
                tokens = list(transcribe_offline(model, audio, kind, ctx).token_ids)
                blank = model.config.transducer.blank_id if model.config.transducer else 0
                diff = max_abs_diff(head_logits(model, kind, ours, tokens), _hf_logits(hf, kind, ours, tokens, blank))
                rows.append(Row(f"transformers logits {kind} {label}", diff, HF_ATOL, f"{len(tokens)} tokens"))
    return rows, f"transformers: compared {name}"
