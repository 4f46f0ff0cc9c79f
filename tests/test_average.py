"""``streamer average``: weighted means of model weights (WiSE-FT interpolation, checkpoint averaging)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml

from streamer.asr.model import AsrModel
from streamer.asr.tokenizer import Tokenizer
from streamer.cli import main
from streamer.errors import ConfigError
from streamer.training.average import Source, average_models, average_state_dicts, parse_source
from streamer.training.rundir import export_nemo
from streamer.training.trainer import train
from tests.test_training import _recipe, corpus  # noqa: F401 - the tiny corpus fixture
from tests.tiny import save_tiny, tiny_model


def _state(path: Path) -> dict[str, torch.Tensor]:
    return AsrModel.load(str(path)).state_dict()


def _other_tokenizer(vocab: int) -> Tokenizer:
    out = io.BytesIO()
    text = ["zebras quietly vex jumpy pilots", "sphinx of black quartz judge my vow", "pack my box with jugs"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 8), model_writer=out, vocab_size=vocab, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )
    return Tokenizer.from_bytes(out.getvalue())


def test_weights_parse_from_the_last_equals_sign() -> None:
    assert parse_source("a.nemo") == Source(Path("a.nemo"), 1.0)
    assert parse_source("runs/x=y/model.nemo=0.25") == Source(Path("runs/x=y/model.nemo"), 0.25)
    for bad in ("a.nemo=half", "a.nemo=-1", "a.nemo=nan", "a.nemo=inf"):
        with pytest.raises(ConfigError, match="weight"):
            parse_source(bad)


def test_every_float_tensor_is_the_weighted_mean_and_counters_come_from_the_first() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3), "h": torch.tensor([4.0], dtype=torch.float16)}
    b = {"w": torch.tensor([5.0, -2.0]), "n": torch.tensor(9), "h": torch.tensor([0.0], dtype=torch.float16)}
    out = average_state_dicts([a, b], [1.0, 3.0])
    assert out["w"].tolist() == [4.0, -1.0]  # 0.25 * a + 0.75 * b
    assert out["n"].item() == 3
    assert out["h"].dtype == torch.float16 and out["h"].item() == 1.0
    with pytest.raises(ConfigError, match="add up to 0"):
        average_state_dicts([a, b], [0.0, 0.0])
    with pytest.raises(ConfigError, match="shape"):
        average_state_dicts([a, {**b, "w": torch.zeros(3)}], [1.0, 1.0])
    with pytest.raises(ConfigError, match="other weights"):
        average_state_dicts([a, {"w": b["w"], "n": b["n"]}], [1.0, 1.0])


def test_cli_interpolates_two_nemo_files_and_records_what_went_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = save_tiny(tmp_path / "a.nemo", seed=0)
    b = save_tiny(tmp_path / "b.nemo", seed=1)
    out = tmp_path / "mix" / "model.nemo"
    assert main(["average", f"{a}=1", f"{b}=3", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    sa, sb, mixed = _state(a), _state(b), _state(out)
    differs = 0
    for key, value in mixed.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.25 * sa[key] + 0.75 * sb[key], msg=key)
            differs += not torch.equal(value, sa[key]) and not torch.equal(value, sb[key])
    assert differs > 10  # the random weights really were mixed, not copied from one side
    record = json.loads((out.parent / "training.json").read_text())
    assert [(p["source"], p["weight"]) for p in record["averaged"]] == [(str(a), 0.25), (str(b), 0.75)]

    # a weight of 0 leaves the other model exactly as it was
    only_a = tmp_path / "only-a" / "model.nemo"
    assert main(["average", f"{a}=2", f"{b}=0", "--out", str(only_a)]) == 0
    for key, value in _state(only_a).items():
        assert torch.equal(value, sa[key]), key


def test_models_of_another_architecture_or_tokenizer_are_refused(tmp_path: Path) -> None:
    tdt = save_tiny(tmp_path / "tdt.nemo")
    rnnt = save_tiny(tmp_path / "rnnt.nemo", tdt=False)
    with pytest.raises(ConfigError, match="configured differently"):
        average_models([Source(tdt, 1.0), Source(rnnt, 1.0)])
    other = tiny_model()
    other.tokenizer = _other_tokenizer(other.tokenizer.vocab_size)  # the same shapes, other pieces
    other.save(str(tmp_path / "tok.nemo"))
    with pytest.raises(ConfigError, match="different tokenizers"):
        average_models([Source(tdt, 1.0), Source(tmp_path / "tok.nemo", 1.0)])
    with pytest.raises(ConfigError, match="does not exist"):
        average_models([Source(tdt, 1.0), Source(tmp_path / "missing.nemo", 1.0)])


def test_wise_ft_of_a_run_and_the_model_it_started_from(corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    """The shape of the real use: a run warm-started from an exported .nemo, averaged with that .nemo by
    naming the run directory; the step count carries on from the run, so a later warm start counts on."""
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(_recipe(corpus, max_steps=4)))
    _, first = train(config, None, tmp_path / "runs")
    base = tmp_path / "base" / "model.nemo"
    export_nemo(first, base, "latest")
    config.write_text(yaml.safe_dump(_recipe(corpus, max_steps=8, init_from=str(base))))
    _, second = train(config, None, tmp_path / "runs")
    tuned = tmp_path / "tuned" / "model.nemo"
    export_nemo(second, tuned, "best")

    out = tmp_path / "wise" / "model.nemo"
    assert main(["average", f"{base}=0.4", f"{second}=0.6", "--out", str(out)]) == 0
    sb, st, mixed = _state(base), _state(tuned), _state(out)
    for key, value in mixed.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.4 * sb[key] + 0.6 * st[key], msg=key)
    record = json.loads((out.parent / "training.json").read_text())
    tuned_record = json.loads((tuned.parent / "training.json").read_text())
    assert record["step"] == tuned_record["step"] > 4
    assert [p["step"] for p in record["averaged"]] == [4, tuned_record["step"]]
    assert record["averaged"][1]["source"] == str(second / "checkpoints" / "best.pt")  # the file that went in
