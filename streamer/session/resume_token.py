"""Resume tokens every replica of a cluster can verify: signed with a secret the replicas share ([cluster]
``resume_secret``), so a client whose replica died can resume on another one (``README.md`` "Scaling out").

A token is ``c1~<session>~<stream>~<node>~<expiry>~<nonce>~<mac>``: the session id, its stream name, the replica
that issued it, its expiry (Unix seconds), a random nonce (the store keeps the nonce of a session's latest token,
so a token resumes once), and HMAC-SHA256 over everything before the last ``~``, URL-safe base64 without padding.
None of the fields can hold ``~`` (ids, stream names and node ids are ``[A-Za-z0-9_.-]``; the nonce and the MAC
are URL-safe base64). Standard library only. Without [cluster] a token is a plain random string, as always.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from streamer.errors import StreamerError

PREFIX = "c1"
NONCE_BYTES = 12  # 96 random bits: 16 characters
SEPARATOR = "~"


class ResumeTokenError(StreamerError):
    """A resume token cannot be used: malformed, not signed by this cluster's secret, or expired."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says."""

    session: str
    stream: str
    node: str  # the replica that issued it
    expires_s: int  # Unix time
    nonce: str


def is_signed(token: str) -> bool:
    """True when ``token`` has the shape of a cluster token (it may still fail to verify)."""
    return token.startswith(PREFIX + SEPARATOR)


def _mac(secret: bytes, body: str) -> str:
    digest = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class TokenSigner:
    """Issues and verifies cluster resume tokens.

    Args:
        secret: the replicas' shared secret (at least 16 bytes; the settings check it).
        ttl_s: how long a token stays valid after it was issued.
    """

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        if len(secret) < 16:
            raise ValueError("a resume secret must be at least 16 bytes")
        self._secret, self.ttl_s = secret, ttl_s

    def issue(self, session: str, stream: str, node: str, now_s: float | None = None) -> tuple[str, str]:
        """A new token for ``session`` and its nonce (what the store keeps to make it one-use)."""
        nonce = secrets.token_urlsafe(NONCE_BYTES)
        expires = int((time.time() if now_s is None else now_s) + self.ttl_s)
        body = SEPARATOR.join((PREFIX, session, stream, node, str(expires), nonce))
        return f"{body}{SEPARATOR}{_mac(self._secret, body)}", nonce

    def verify(self, token: str, now_s: float | None = None) -> TokenClaims:
        """The claims of a token this cluster signed and that has not expired.

        Raises:
            ResumeTokenError: saying which: not a cluster token, tampered with (or another cluster's), expired.
        """
        parts = token.split(SEPARATOR)
        if len(parts) != 7 or parts[0] != PREFIX:
            raise ResumeTokenError("the resume token is not one this cluster issues (malformed)")
        body, mac = token.rpartition(SEPARATOR)[0], parts[6]
        if not hmac.compare_digest(mac.encode(), _mac(self._secret, body).encode()):
            raise ResumeTokenError("the resume token's signature does not verify: it was altered, or issued by a "
                                   "server with another cluster.resume_secret")
        _, session, stream, node, expires, nonce = parts[:6]
        if not expires.isdigit():
            raise ResumeTokenError("the resume token is malformed (its expiry is not a number)")
        now = time.time() if now_s is None else now_s
        if int(expires) < now:
            raise ResumeTokenError(f"the resume token expired {now - int(expires):.0f} s ago (tokens live "
                                   f"{self.ttl_s:g} s, cluster.resume_token_ttl_s)")
        return TokenClaims(session, stream, node, int(expires), nonce)
