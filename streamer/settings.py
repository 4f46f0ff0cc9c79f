"""The daemon's configuration: a TOML file, ``STREAMER_`` environment variables and command-line flags.

Precedence, highest first: command-line flags > environment (``STREAMER_<SECTION>__<KEY>``, e.g.
``STREAMER_MQTT__HOST=broker``) > the TOML file (``--config FILE``; otherwise
``/etc/streamer/streamer.toml`` when it exists) > defaults. Sections merge key by key across sources.
Unknown keys are errors that name the key (with a suggestion); unknown ``STREAMER_`` environment
variables are logged as warnings. ``configs/default.toml`` documents every key with its default.
``streamer config --print`` shows the effective configuration (secrets masked); ``streamer config
--check FILE`` validates a file.

This module reads and shows the settings; the settings themselves (the sections, their defaults and checks)
are the models of :mod:`streamer.settings_models`, imported from here like everything else.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from streamer.errors import ConfigError
from streamer.settings_models import (
    CONFIG_FILE,
    ENV_PREFIX,
    SECTIONS,
    AdmissionSettings,
    ClusterSettings,
    DeepgramSettings,
    EndpointingSettings,
    EngineSettings,
    HermesSettings,
    MicSettings,
    ModelSettings,
    MqttSettings,
    ServerSettings,
    Settings,
    StateSettings,
    VoskSettings,
    WyomingSettings,
    origin_problem,
    state_directory,
    token_problem,
)

__all__ = [
    "CLIENT_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "SECTIONS",
    "ClusterSettings",
    "AdmissionSettings",
    "DeepgramSettings",
    "EndpointingSettings",
    "EngineSettings",
    "HermesSettings",
    "MicSettings",
    "ModelSettings",
    "MqttSettings",
    "ServerSettings",
    "Settings",
    "StateSettings",
    "WyomingSettings",
    "VoskSettings",
    "add_config_parser",
    "check_keys",
    "load_settings",
    "origin_problem",
    "parse_set",
    "read_toml",
    "state_directory",
    "to_toml",
    "token_problem",
]

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/streamer/streamer.toml")
MASK = "********"
CLIENT_ENV = {"STREAMER_TOKEN"}  # read by the clients (ws_client.py, streamer mic), not a setting
SECRET_KEYS = {"server": ("auth_tokens",), "mqtt": ("password",), "cluster": ("store_password",)}


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
