"""The daemon's configuration: a TOML file, ``STREAMER_`` environment variables and command-line flags.

Precedence, highest first: command-line flags > environment (``STREAMER_<SECTION>__<KEY>``, e.g.
``STREAMER_MQTT__HOST=broker``) > the TOML file (``--config FILE``; otherwise
``/etc/streamer/streamer.toml`` when it exists) > defaults. Sections merge key by key across sources.
Unknown keys are errors that name the key (with a suggestion); unknown ``STREAMER_`` environment
variables are logged as warnings. ``configs/default.toml`` documents every key with its default.
``streamer config --print`` shows the effective configuration (secrets masked); ``streamer config
--check FILE`` validates a file.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from streamer.engine.endpoint import EndpointConfig
from streamer.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/streamer/streamer.toml")
ENV_PREFIX = "STREAMER_"
MASK = "********"
CLIENT_ENV = {"STREAMER_TOKEN"}  # read by the clients (ws_client.py, streamer mic), not a setting


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    """[model]: what to recognize with."""

    spec: str = Field("streamer-tdt-small", description="a .nemo file, a Hugging Face directory or id, or a name")
    att_context_size: tuple[int, int] | None = Field(None, description="[left, right] attention context; None: first")
    decoder: Literal["tdt", "rnnt", "ctc"] | None = Field(None, description="decoding head; None: the model's own")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None: torch's choice")


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be an access token (it must fit an HTTP header), or None when it can."""
    if not token:
        return "is empty"
    if not all("!" <= c <= "~" for c in token):
        return "has a space, a control or a non-ASCII character (use letters, digits and -._~)"
    return None


def origin_problem(origin: str) -> str | None:
    """Why ``origin`` cannot be an entry of ``server.allowed_origins``, or None when it can."""
    value = origin.strip().lower()
    if value in ("*", "null"):
        return None
    scheme, sep, rest = value.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or any(c in rest.rstrip("/") for c in "/?#@ "):
        return ("is no origin: give scheme://host[:port] as a browser sends it in the Origin header, e.g. "
                "'https://captions.example.org' or 'http://localhost:3000' (no path), or '*' for any page")
    return None


class ServerSettings(_Section):
    """[server]: the WebSocket and HTTP port."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    max_sessions: int = Field(16, ge=1)
    max_subscribers: int = Field(64, ge=1)
    max_pending_connections: int = Field(
        64, ge=1, description="/v1/listen connections that have not sent 'start' yet, at most"
    )
    start_timeout_s: float = Field(
        10.0, gt=0, description="time to finish the handshake, and again to send 'start'; keepalive does not extend it"
    )
    max_handshakes: int = Field(128, ge=1, description="connections still sending their HTTP request, at most")
    max_frame_bytes: int = Field(1 << 20, ge=1024)
    max_pending_messages: int = Field(100, ge=1)
    idle_timeout_s: float = Field(30.0, gt=0)
    ping_interval_s: float = Field(20.0, gt=0)
    ping_timeout_s: float = Field(20.0, gt=0)
    close_timeout_s: float = Field(5.0, gt=0)
    resume_window_s: float = Field(
        10.0, ge=0, le=3600, description="how long a /v1/listen session outlives a dropped connection; 0: not at all"
    )
    web_root: str | None = None
    auth_tokens: list[SecretStr] = Field(default_factory=list, description="tokens for /v1/*, /metrics; none: open")
    auth_token_file: str | None = Field(None, description="file with more tokens, one per line")
    tls_cert: str | None = Field(None, description="PEM certificate (chain) for wss:// and https://")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert, unencrypted")
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser origins let in besides the daemon's own; '*': any page"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="names in the Host header accepted besides the defaults; '*': any"
    )

    @field_validator("auth_tokens")
    @classmethod
    def _tokens_are_header_safe(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        for i, token in enumerate(tokens):
            problem = token_problem(token.get_secret_value())
            if problem:  # the message never repeats the token
                raise ValueError(f"token {i + 1} {problem}")
        return tokens

    @field_validator("allowed_origins")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        out = []
        for origin in origins:
            problem = origin_problem(origin)
            if problem:
                raise ValueError(f"{origin!r} {problem}")
            out.append(origin.strip().lower().rstrip("/"))
        return out

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_are_names(cls, hosts: list[str]) -> list[str]:
        out = []
        for host in hosts:
            name = host.strip().lower().rstrip(".")
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1]
            if not name or not all(c.isalnum() or c in "-._:*" for c in name) or ("*" in name and name != "*"):
                raise ValueError(f"{host!r} is no host name or address: give names like 'streamer.example.org' "
                                 "or addresses like '192.168.1.5', without a port or scheme, or '*' for any")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert is not None else ("tls_key", "tls_cert")
            raise ValueError(f"server.{given} is set but server.{missing} is not: TLS needs both PEM files")
        return self


class EngineSettings(_Section):
    """[engine]: batching and buffering."""

    max_batch: int = Field(8, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    ring_capacity_s: float = Field(
        10.0, gt=0, description="audio buffered per stream: a live stream further behind loses its oldest audio"
    )
    lag_warning_s: float = Field(
        2.0, gt=0, description="a live stream this far behind real time gets warning falling_behind"
    )


_RULES = EndpointConfig()  # the endpointing rules and their defaults live in streamer.engine.endpoint


class EndpointingSettings(_Section):
    """[endpointing]: when a segment ends (``streamer.engine.endpoint``)."""

    trailing_silence_after_speech_s: float = Field(_RULES.trailing_silence_after_speech_s, gt=0)
    silence_without_speech_s: float = Field(_RULES.silence_without_speech_s, gt=0)
    max_segment_s: float = Field(_RULES.max_segment_s, gt=0)


class MqttSettings(_Section):
    """[mqtt]: publishing results to a broker."""

    enabled: bool = False
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    prefix: str = "streamer"
    device_id: str | None = None
    outbox_size: int = Field(1000, ge=1, description="finals held while the broker is unreachable")
    max_inflight: int = Field(20, ge=1, le=1000, description="finals published and not yet acknowledged at once")
    keepalive_s: int = Field(30, ge=1)


class StateSettings(_Section):
    """[state]: where the daemon keeps what must survive a restart (the MQTT outbox journal)."""

    dir: str | None = Field(
        None, description='None: $STATE_DIRECTORY, else $XDG_STATE_HOME/streamer or ~/.local/state/streamer; "": off'
    )


def state_directory(state: StateSettings, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The state directory ``state.dir`` names; None when it is ``""`` (durability off).

    Unset: the first of systemd's ``$STATE_DIRECTORY`` (``StateDirectory=`` in the unit), else
    ``$XDG_STATE_HOME/streamer``, else ``~/.local/state/streamer``.
    """
    if state.dir is not None:
        return Path(state.dir).expanduser() if state.dir.strip() else None
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "streamer"


class MicSettings(_Section):
    """[mic]: a local microphone as a stream."""

    enabled: bool = False
    device: str | None = None
    name: str = Field("mic", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


CONFIG_FILE: ContextVar[Path | None] = ContextVar("CONFIG_FILE", default=None)


class Settings(BaseSettings):
    """Every setting of ``streamer serve``; see ``configs/default.toml`` for each key."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = ModelSettings()
    server: ServerSettings = ServerSettings()
    engine: EngineSettings = EngineSettings()
    endpointing: EndpointingSettings = EndpointingSettings()
    mqtt: MqttSettings = MqttSettings()
    mic: MicSettings = MicSettings()
    state: StateSettings = StateSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = CONFIG_FILE.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)  # earlier wins; no .env or secrets directory


SECTIONS: dict[str, type[BaseModel]] = {
    name: info.annotation for name, info in Settings.model_fields.items()  # type: ignore[misc]
}
SECRET_KEYS = {"server": ("auth_tokens",), "mqtt": ("password",)}


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a config file and check its keys against the settings, naming any unknown one."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    check_keys(data, str(path))
    return data


def check_keys(data: dict[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` for a section or key that does not exist, suggesting the nearest."""
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]{_did_you_mean(section, SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: {section} must be a table ([{section}]), got {body!r}")
        known = SECTIONS[section].model_fields
        for key in body:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {section}.{key}{_did_you_mean(key, known, section + '.')}")


def _did_you_mean(name: str, choices: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else f"; known: {', '.join(prefix + c for c in choices)}"


def _warn_unknown_env() -> None:
    """pydantic-settings ignores STREAMER_<X> when X is no section (unknown keys in a section are errors)."""
    for var in os.environ:
        if not var.startswith(ENV_PREFIX) or var.startswith(ENV_PREFIX + "TEST_"):
            continue
        if var in CLIENT_ENV:
            continue
        section = var[len(ENV_PREFIX):].lower().partition("__")[0]
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0].upper()}__...?)" if close else ""
            logger.warning("environment variable %s is not a setting and is ignored%s", var, hint)


def load_settings(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """The effective settings: ``overrides`` (from the command line) > environment > file > defaults.

    Args:
        config: the TOML file; None uses ``/etc/streamer/streamer.toml`` if it exists.
        overrides: nested ``{section: {key: value}}`` from flags.

    Raises:
        ConfigError: the file is missing or malformed, or a key or value is invalid.
    """
    path = Path(config) if config is not None else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    if path is not None:
        read_toml(path)  # a clear error for unknown keys and syntax, naming the file
    overrides = overrides or {}
    check_keys(overrides, "command line")
    _warn_unknown_env()
    token = CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration{f' ({path})' if path else ''}: {problems}") from exc
    except SettingsError as exc:  # a STREAMER_ variable that should hold JSON (a list, a pair) does not
        raise ConfigError(f"{exc}: lists take JSON in the environment, e.g. "
                          """STREAMER_SERVER__AUTH_TOKENS='["token1", "token2"]'""") from exc
    finally:
        CONFIG_FILE.reset(token)


def _describe(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 2:
        section, key = (str(p) for p in err["loc"])
        known = SECTIONS[section].model_fields if section in SECTIONS else {}
        return (f"unknown key {where}{_did_you_mean(key, known, section + '.')} (from STREAMER_"
                f"{section.upper()}__{key.upper()}?)")
    if len(err["loc"]) < 2 or err["loc"][1] in SECRET_KEYS.get(str(err["loc"][0]), ()):
        return f"{where}: {err['msg']}"  # the input is a whole section or a secret: never echo it
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["mqtt.port=1884", "model.att_context_size=[70,1]"]`` -> nested dict (values parsed as JSON if they can be)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, e.g. mqtt.port=1884; got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def to_toml(settings: Settings) -> str:
    """The settings as TOML, secrets masked; unset optional keys appear commented out."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        values = getattr(settings, section)
        for key in type(values).model_fields:
            value = getattr(values, key)
            if value is None:
                lines.append(f"# {key} =   (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return json.dumps(MASK)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


# ---------------------------------------------------------------- `streamer config`


def add_config_parser(sub: argparse._SubParsersAction) -> None:
    """``streamer config --print | --check FILE``."""
    p = sub.add_parser(
        "config",
        help="print the effective configuration or check a config file",
        description="Print the effective configuration (file, STREAMER_ environment and --set; "
        "secrets masked), or check a config file for unknown keys and bad values.",
    )
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--print", dest="print_config", action="store_true", help="print the effective config as TOML")
    action.add_argument("--check", metavar="FILE", help="validate FILE and exit (0: valid)")
    p.add_argument("--config", metavar="FILE", help=f"config file (default: {DEFAULT_CONFIG_PATH} if present)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    if args.check:
        load_settings(args.check, parse_set(args.set))
        print(f"{args.check}: ok")
        return 0
    print(to_toml(load_settings(args.config, parse_set(args.set))), end="")
    return 0
