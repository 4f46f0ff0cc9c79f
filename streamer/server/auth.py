"""Access tokens for the port: who may use ``/v1/listen``, ``/v1/captions`` and ``/metrics``.

A request carries a token as ``Authorization: Bearer <token>`` or as ``?token=<token>`` in the URL
(browsers cannot set headers on a WebSocket), exactly once: a request that carries several (``?token=``
twice, several ``Authorization`` headers, or both kinds) is refused as ambiguous, so that one request
cannot try many guesses. Tokens come from ``server.auth_tokens`` and
``server.auth_token_file``; with none configured every request is let in, as before tokens existed.
The comparison runs over every token with :func:`hmac.compare_digest`, so its time does not say
which token came close.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from streamer.errors import ConfigError
from streamer.server.origin import is_loopback
from streamer.settings import token_problem

if TYPE_CHECKING:
    from websockets.http11 import Request

    from streamer.settings import ServerSettings

PROTECTED_PATHS = frozenset({"/v1/listen", "/v1/captions", "/metrics", "/v1/audio/transcriptions", "/v1/realtime"})


class Refusal(enum.Enum):
    """Why a request was refused; the value is the ``reason`` label of ``streamer_auth_failures_total``."""

    MISSING = "missing"
    INVALID = "invalid"
    AMBIGUOUS = "ambiguous"  # more than one credential in one request (HTTP 400)


def read_token_file(path: str) -> list[str]:
    """The tokens in ``path``: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: the file cannot be read, holds no token, or a line is no valid token.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"server.auth_token_file: cannot read {path}: {exc}") from exc
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        problem = token_problem(token)
        if problem:  # the message names the line, never its content
            raise ConfigError(f"server.auth_token_file: {path} line {number}: the token {problem}")
        tokens.append(token)
    if not tokens:
        raise ConfigError(f"server.auth_token_file: {path} holds no token (one per line; '#' starts a comment); "
                          "unset auth_token_file to run without authentication")
    return tokens


class TokenAuth:
    """Checks requests against a fixed set of tokens.

    Args:
        tokens: the accepted tokens; empty lets every request in.
    """

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self._tokens = tuple(dict.fromkeys(t.encode() for t in tokens))  # unique, in order

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> TokenAuth:
        """``server.auth_tokens`` together with the tokens of ``server.auth_token_file``.

        Raises:
            ConfigError: ``auth_token_file`` is set but missing, unreadable or empty.
        """
        tokens = [t.get_secret_value() for t in settings.auth_tokens]
        if settings.auth_token_file is not None:
            tokens += read_token_file(settings.auth_token_file)
        return cls(tokens)

    @property
    def is_enabled(self) -> bool:
        return bool(self._tokens)

    @property
    def token_count(self) -> int:
        return len(self._tokens)

    def check(self, request: Request, every_path: bool = False) -> Refusal | None:
        """None when ``request`` may go on; otherwise why not. Only :data:`PROTECTED_PATHS` are checked, or every
        path with ``every_path`` (a port that serves one protocol on any path, as the Vosk port does)."""
        url = urlsplit(request.path)
        if not self._tokens or (url.path not in PROTECTED_PATHS and not every_path):
            return None
        offered = parse_qs(url.query, keep_blank_values=True).get("token", [])
        headers = request.headers.get_all("Authorization")
        if len(offered) + len(headers) > 1:
            return Refusal.AMBIGUOUS
        for value in headers:
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                offered.append(credentials.strip())
        return self.check_credentials(offered)

    def check_credentials(self, offered: Sequence[str]) -> Refusal | None:
        """None when no tokens are configured or ``offered`` is exactly one accepted token; otherwise why not.

        For adapters that read a protocol's own credentials (Deepgram's ``Authorization: Token <key>``), each
        value the request carried, however it carried it.
        """
        if not self._tokens:
            return None
        if len(offered) > 1:
            return Refusal.AMBIGUOUS
        if not offered:
            return Refusal.MISSING
        return None if self._matches(offered[0]) else Refusal.INVALID

    def _matches(self, offered: str) -> bool:
        given = offered.encode()
        found = False
        for token in self._tokens:  # no early exit: every token is compared
            found |= hmac.compare_digest(given, token)
        return found


def exposure_warnings(host: str, auth: TokenAuth, has_tls: bool) -> list[str]:
    """What to warn about at startup when ``host`` serves more than this machine."""
    if is_loopback(host):
        return []
    if not auth.is_enabled:
        return [f"listening on {host or 'every address'} without tokens: anyone who can reach the port can stream "
                "audio and read captions and metrics; set server.auth_tokens or server.auth_token_file"]
    if not has_tls:
        return ["tokens travel in clear text without TLS: set server.tls_cert and server.tls_key, "
                "or put a TLS reverse proxy in front"]
    return []
