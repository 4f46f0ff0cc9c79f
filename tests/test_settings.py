"""Configuration: defaults file, precedence CLI > env > file > defaults, unknown keys, --print and --check."""

from __future__ import annotations

import argparse
import logging
import re
import tomllib
from pathlib import Path

import pytest

from streamer import settings as settings_module
from streamer.errors import ConfigError
from streamer.service import add_serve_parser, parse_source, settings_from_args
from streamer.settings import SECTIONS, Settings, add_config_parser, load_settings, parse_set

DEFAULT_TOML = Path(__file__).parents[1] / "configs" / "default.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STREAMER_ setting from the environment leaks into these tests, and /etc is not read."""
    import os

    for var in list(os.environ):
        if var.startswith("STREAMER_") and not var.startswith("STREAMER_TEST_"):
            monkeypatch.delenv(var)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", Path("/nonexistent/streamer.toml"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamer")
    sub = p.add_subparsers()
    add_config_parser(sub)
    add_serve_parser(sub)
    return p


def test_default_toml_equals_the_defaults() -> None:
    """configs/default.toml loads to exactly the built-in defaults."""
    assert load_settings(DEFAULT_TOML) == Settings()


def test_default_toml_documents_every_key() -> None:
    """Every setting appears in configs/default.toml (set, or commented out when unset), under a comment."""
    text = DEFAULT_TOML.read_text()
    data = tomllib.loads(text)
    sections = re.split(r"^\[(\w+)\]$", text, flags=re.M)[1:]
    bodies = dict(zip(sections[::2], sections[1::2], strict=True))
    assert list(bodies) == list(SECTIONS)
    for section, model in SECTIONS.items():
        for key in model.model_fields:
            match = re.search(rf"^(# )?{key} = ", bodies[section], flags=re.M)
            assert match, f"{section}.{key} is not documented in configs/default.toml"
            before = bodies[section][: match.start()].rstrip().splitlines()
            assert before and before[-1].startswith("#"), f"{section}.{key} has no comment"
            if match.group(1) is None:
                assert key in data[section]
            else:
                assert getattr(Settings(), section).model_dump()[key] is None


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each source overrides the one below it, key by key; untouched keys keep their defaults."""
    config = tmp_path / "streamer.toml"
    config.write_text('[mqtt]\nhost = "file-broker"\nport = 1885\nprefix = "file"\n[server]\nport = 9000\n')
    monkeypatch.setenv("STREAMER_MQTT__PORT", "1999")
    monkeypatch.setenv("STREAMER_MQTT__PREFIX", "env")
    s = load_settings(config, parse_set(["mqtt.prefix=cli"]))
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.prefix) == ("file-broker", 1999, "cli")
    assert s.server.port == 9000 and s.server.host == "127.0.0.1" and s.mqtt.outbox_size == 1000


def test_serve_flags_map_to_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve's flags and --set land in the right sections and beat the environment."""
    monkeypatch.setenv("STREAMER_SERVER__PORT", "7000")
    args = parser().parse_args(["serve", "--model", "m.nemo", "--port", "0", "--att-context-size", "70,1",
                                "--set", "engine.max_batch=4", "--set", "mic.device=USB Mic"])
    s = settings_from_args(args)
    assert s.model.spec == "m.nemo" and s.model.att_context_size == (70, 1) and s.server.port == 0
    assert s.engine.max_batch == 4 and s.mic.device == "USB Mic"


def test_default_config_path_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config, /etc/streamer/streamer.toml is used if it exists."""
    config = tmp_path / "etc.toml"
    config.write_text("[engine]\nmax_batch = 3\n")
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", config)
    assert load_settings().engine.max_batch == 3


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[mqtt]\nhots = "x"\n', "unknown key mqtt.hots (did you mean mqtt.host?)"),
        ("[mqqt]\nhost = 1\n", "unknown section [mqqt] (did you mean mqtt?)"),
        ("[server]\nport = 70000\n", "server.port: Input should be less than or equal to 65535"),
        ('[server]\nport = "eighty"\n', "server.port"),
        ("[endpointing]\nmax_segment_s = 0\n", "endpointing.max_segment_s: Input should be greater than 0"),
        ('[model]\ndecoder = "beam"\n', "model.decoder"),
        ("model = 1\n", "model must be a table"),
        ("[server\nport = 1\n", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, toml: str, message: str) -> None:
    """Unknown keys and bad values are errors that name the key (and the file)."""
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert message in str(info.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """An explicit --config that does not exist is an error, not silently ignored."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_bad_overrides_and_env(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """--set with an unknown key fails naming it; an unknown STREAMER_ variable is logged; a bad env value fails."""
    with pytest.raises(ConfigError, match="unknown key server.prot"):
        load_settings(None, parse_set(["server.prot=1"]))
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_set(["port=1"])
    monkeypatch.setenv("STREAMER_MQTT__HOTS", "x")
    with pytest.raises(ConfigError, match="unknown key mqtt.hots .did you mean mqtt.host.. .from STREAMER_MQTT__HOTS"):
        load_settings()
    monkeypatch.delenv("STREAMER_MQTT__HOTS")
    monkeypatch.setenv("STREAMER_MQQT__HOST", "x")  # pydantic-settings ignores unknown sections: we warn
    with caplog.at_level(logging.WARNING, logger="streamer.settings"):
        load_settings()
    assert "STREAMER_MQQT__HOST is not a setting and is ignored (did you mean STREAMER_MQTT__...?)" in caplog.text
    monkeypatch.setenv("STREAMER_SERVER__PORT", "-1")
    with pytest.raises(ConfigError, match="server.port"):
        load_settings()


def test_print_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """config --print shows the effective config as TOML that loads back, with the password masked."""
    config = tmp_path / "s.toml"
    config.write_text('[mqtt]\nenabled = true\nusername = "u"\npassword = "hunter2"\n')
    monkeypatch.setenv("STREAMER_ENGINE__MAX_BATCH", "2")
    args = parser().parse_args(["config", "--print", "--config", str(config), "--set", "server.port=1234"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and 'password = "********"' in out
    printed = tomllib.loads(out)
    assert printed["mqtt"]["username"] == "u" and printed["engine"]["max_batch"] == 2
    assert printed["server"]["port"] == 1234


def test_print_masks_tokens_and_env_takes_them_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """auth_tokens from the file or STREAMER_SERVER__AUTH_TOKENS (a JSON list) load; config --print masks each."""
    config = tmp_path / "s.toml"
    config.write_text('[server]\nauth_tokens = ["file-token-1"]\nauth_token_file = "/run/credentials/tokens"\n')
    args = parser().parse_args(["config", "--print", "--config", str(config)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "file-token-1" not in out and 'auth_tokens = ["********"]' in out
    assert tomllib.loads(out)["server"]["auth_token_file"] == "/run/credentials/tokens"
    monkeypatch.setenv("STREAMER_SERVER__AUTH_TOKENS", '["env-token-a", "env-token-b"]')
    s = load_settings(config)
    assert [t.get_secret_value() for t in s.server.auth_tokens] == ["env-token-a", "env-token-b"]  # env wins
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "env-token" not in out and 'auth_tokens = ["********", "********"]' in out
    monkeypatch.setenv("STREAMER_SERVER__AUTH_TOKENS", "env-token-a,env-token-b")
    with pytest.raises(ConfigError, match=r"lists take JSON in the environment, e.g. STREAMER_SERVER__AUTH_TOKENS="):
        load_settings(config)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('auth_tokens = ["good-token", ""]', "server.auth_tokens: Value error, token 2 is empty"),
        ('auth_tokens = ["secret token"]', "server.auth_tokens: Value error, token 1 has a space"),
        ('auth_tokens = ["secret-token"]\ntls_cert = "/etc/c.pem"', "server.tls_cert is set but server.tls_key is not"),
        ('auth_tokens = ["secret-token"]\ntls_key = "/etc/k.pem"', "server.tls_key is set but server.tls_cert is not"),
    ],
)
def test_bad_security_settings_name_the_key_never_the_token(tmp_path: Path, toml: str, message: str) -> None:
    """A bad token or half a TLS setup is a ConfigError naming the key; the message never shows a token."""
    config = tmp_path / "bad.toml"
    config.write_text(f"[server]\n{toml}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert message in str(info.value)
    assert "secret" not in str(info.value) and "good-token" not in str(info.value)


def test_streamer_token_is_no_setting_and_no_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """STREAMER_TOKEN belongs to the clients: the daemon neither reads it nor warns about it."""
    monkeypatch.setenv("STREAMER_TOKEN", "client-token")
    with caplog.at_level(logging.WARNING, logger="streamer.settings"):
        assert load_settings().server.auth_tokens == []
    assert "STREAMER_TOKEN" not in caplog.text


def test_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """config --check FILE says ok for a valid file and raises a ConfigError naming the key otherwise."""
    args = parser().parse_args(["config", "--check", str(DEFAULT_TOML)])
    assert args.func(args) == 0 and capsys.readouterr().out.strip().endswith(": ok")
    bad = tmp_path / "bad.toml"
    bad.write_text("[mic]\nenable = true\n")
    args = parser().parse_args(["config", "--check", str(bad)])
    with pytest.raises(ConfigError, match="unknown key mic.enable .did you mean mic.enabled"):
        args.func(args)


def test_source_spec(tmp_path: Path) -> None:
    """--source file:PATH[?realtime=1&name=NAME] parses; unknown options and missing files are errors."""
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"")
    spec = parse_source(f"file:{wav}?realtime=1&name=replay")
    assert spec.path == wav and spec.realtime and spec.name == "replay"
    assert parse_source(f"file:{wav}").realtime is False
    with pytest.raises(ConfigError, match="unknown option 'speed'"):
        parse_source(f"file:{wav}?speed=2")
    with pytest.raises(ConfigError, match="no such file"):
        parse_source(f"file:{tmp_path}/missing.wav")
    with pytest.raises(ConfigError, match="expected file:PATH"):
        parse_source("mic:0")
