"""The command-line side of the settings, shared by every command that loads a model.

Every command (``serve``, ``transcribe``, ``mic``, ``bench``, ``eval``) takes ``--config FILE`` and
``--set SECTION.KEY=VALUE`` and reads the same :class:`~streamer.settings.Settings`, so a config file
and ``STREAMER_MODEL__...`` variables mean the same everywhere. A command's own flags (``--model``,
``--att-context-size``...) are mapped onto settings keys and win over them: flags > environment >
file > defaults, as in :func:`~streamer.settings.load_settings`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from streamer.settings import DEFAULT_CONFIG_PATH, ModelSettings, Settings, load_settings, parse_set

DEFAULT_MODEL: str = ModelSettings.model_fields["spec"].default

Key = tuple[str, str]  # (section, key), e.g. ("model", "spec")

MODEL_FLAGS: dict[str, Key] = {
    "model": ("model", "spec"),
    "threads": ("model", "threads"),
    "att_context_size": ("model", "att_context_size"),
    "decoder": ("model", "decoder"),
}
"""argparse destinations -> the settings they override; each command adds its torch-device flag."""


def parse_context(text: str) -> tuple[int, int]:
    """``"70,1"`` or ``"[70,1]"`` -> ``(70, 1)``: an ``att_context_size`` (left, right) on the command line."""
    try:
        left, right = (int(v) for v in text.strip("[]() ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT such as 70,1; got {text!r}") from None
    return left, right


def add_settings_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--config FILE`` and ``--set SECTION.KEY=VALUE`` (repeatable)."""
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML config file (default: {DEFAULT_CONFIG_PATH} if present); see configs/default.toml")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. model.att_context_size=[70,1]")


def settings_from_args(args: argparse.Namespace, flags: Mapping[str, Key] = MODEL_FLAGS) -> Settings:
    """The effective settings: the flags in ``flags`` that were given > ``--set`` > environment > file.

    Args:
        args: parsed arguments with ``config`` and ``set`` (:func:`add_settings_args`); a flag left
            out (None) does not override.
        flags: argparse destination -> (section, key) it overrides.

    Raises:
        ConfigError: the file, a variable, ``--set`` or a flag's value is invalid.
    """
    overrides = parse_set(getattr(args, "set", None))
    for dest, (section, key) in flags.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return load_settings(getattr(args, "config", None), overrides)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ``(default: X)`` after each help text, left out where there is no default (None): such
    flags fall back to a setting, and their help says which."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
