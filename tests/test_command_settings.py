"""Every command that loads a model reads the same [model] settings as ``streamer serve``.

``--config FILE``, ``STREAMER_MODEL__<KEY>`` and ``--set model.KEY=VALUE`` reach ``transcribe``, ``mic``
and ``eval``; the command's own flags win (flags > environment > file > defaults). ``transcribe
--format json`` reports the look-ahead and decoder it ran with, so the real model shows what arrived.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import streamer.settings as settings_module
from streamer import mic_command
from streamer.cli import main


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's /etc/streamer/streamer.toml, if any, must not leak into the tests."""
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", Path("/nonexistent/streamer.toml"))


def transcribe_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["transcribe", "--format", "json", *args]) == 0, capsys.readouterr().err
    (line,) = capsys.readouterr().out.splitlines()
    return json.loads(line)


def test_transcribe_reads_the_environment_file_and_set(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_nemo: Path,
    speech_wav: Path,
) -> None:
    """The model, look-ahead and decoder come from [model] settings when no flag gives them."""
    assert transcribe_json(capsys, "--model", str(tiny_nemo), str(speech_wav))["att_context_size"] == [70, 13]

    monkeypatch.setenv("STREAMER_MODEL__SPEC", str(tiny_nemo))
    monkeypatch.setenv("STREAMER_MODEL__ATT_CONTEXT_SIZE", "[70,1]")
    got = transcribe_json(capsys, str(speech_wav))
    assert (got["att_context_size"], got["decoder"]) == ([70, 1], "tdt")

    config = tmp_path / "streamer.toml"
    config.write_text('[model]\natt_context_size = [70, 6]\ndecoder = "ctc"\n')
    got = transcribe_json(capsys, "--config", str(config), str(speech_wav))
    assert (got["att_context_size"], got["decoder"]) == ([70, 1], "ctc"), "the environment beats the file"

    monkeypatch.delenv("STREAMER_MODEL__ATT_CONTEXT_SIZE")
    got = transcribe_json(capsys, "--config", str(config), str(speech_wav))
    assert (got["att_context_size"], got["decoder"]) == ([70, 6], "ctc")

    got = transcribe_json(capsys, "--config", str(config), "--set", "model.decoder=tdt", str(speech_wav))
    assert (got["att_context_size"], got["decoder"]) == ([70, 6], "tdt"), "--set beats the file"

    got = transcribe_json(capsys, "--config", str(config), "--att-context-size", "70,0", "--decoder", "tdt",
                          str(speech_wav))
    assert (got["att_context_size"], got["decoder"]) == ([70, 0], "tdt"), "flags beat everything"


def test_transcribe_names_a_bad_setting_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, speech_wav: Path
) -> None:
    """STREAMER_MODEL__SPEC is the model transcribe loads; an unknown key in --config is one error line."""
    monkeypatch.setenv("STREAMER_MODEL__SPEC", str(tmp_path / "missing.nemo"))
    assert main(["transcribe", str(speech_wav)]) == 2
    assert capsys.readouterr().err.strip() == f"streamer: error: model file not found: {tmp_path / 'missing.nemo'}"

    config = tmp_path / "bad.toml"
    config.write_text("[model]\natt_context = [70, 1]\n")
    assert main(["transcribe", "--config", str(config), str(speech_wav)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"streamer: error: {config}: unknown key model.att_context (did you mean model.att_context_size?)"]


def test_mic_loads_the_model_its_settings_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`streamer mic` (in process) loads model.spec from --config; --model beats it; --set is checked."""
    import streamer.audio.mic
    from streamer.audio.mic import InputDevice

    monkeypatch.setattr(streamer.audio.mic, "list_devices", lambda: [InputDevice(0, "mic", 1, 16000, "ALSA", True)])
    config = tmp_path / "streamer.toml"
    config.write_text(f'[model]\nspec = "{tmp_path / "from-file.nemo"}"\n')
    assert mic_command.main(["--config", str(config), "--seconds", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"model file not found: {tmp_path / 'from-file.nemo'}")

    flag_model = tmp_path / "from-flag.nemo"
    assert mic_command.main(["--config", str(config), "--model", str(flag_model), "--seconds", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"model file not found: {flag_model}")

    assert main(["mic", "--set", "model.threads=0", "--seconds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.threads: Input should be greater than or equal to 1" in err[0]


def test_eval_reads_the_model_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`streamer eval` without --model evaluates STREAMER_MODEL__SPEC."""
    manifest = tmp_path / "dev.jsonl"
    manifest.write_text("")
    monkeypatch.setenv("STREAMER_MODEL__SPEC", str(tmp_path / "env.nemo"))
    assert main(["eval", "--manifest", str(manifest), "--results", str(tmp_path / "r.csv")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"model file not found: {tmp_path / 'env.nemo'}")


def test_bench_measures_the_look_ahead_and_threads_of_the_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`streamer bench` without --att-context-sizes or --threads measures model.att_context_size on model.threads."""
    monkeypatch.setenv("STREAMER_MODEL__THREADS", "1")
    argv = ["bench", "--set", "model.att_context_size=[70,0]", "--streams", "1", "--steps", "1", "--warmup", "0",
            "--dtypes", "float32", "--no-decoder", "--nemo", "off", "--onnx", "off", "--format", "json"]
    import torch

    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # bench sets them for the whole process
    (row,) = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (row["att_context_size"], row["threads"], row["streams"]) == ("70,0", 1, 1)
