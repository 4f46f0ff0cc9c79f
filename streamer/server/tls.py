"""TLS for the port (``server.tls_cert``, ``server.tls_key``): ``wss://`` and ``https://`` without a proxy."""

from __future__ import annotations

import ssl

from streamer.errors import ConfigError


def server_ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server context for ``cert`` (PEM, the chain may follow) and its unencrypted PEM ``key``; None without both.

    Raises:
        ConfigError: only one file is given, or a file is missing, unreadable, not PEM, or the key
            does not belong to the certificate. The message names the setting and the file.
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("tls_cert", "tls_key") if cert is not None else ("tls_key", "tls_cert")
        raise ConfigError(f"server.{given} is set but server.{missing} is not: TLS needs both PEM files")
    _read_head("server.tls_cert", cert)
    if b"ENCRYPTED" in _read_head("server.tls_key", key):  # PKCS#8 "ENCRYPTED PRIVATE KEY", or "Proc-Type: 4,ENCRYPTED"
        raise ConfigError(f"server.tls_key: {key} is encrypted; give an unencrypted copy "
                          f"(openssl pkey -in {key} -out NEW.pem, mode 0600)")
    try:  # OpenSSL says only "PEM lib" for either file: look at the certificate alone first
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise ConfigError(f"server.tls_cert: {cert} holds no PEM certificate ({_why(exc)})") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 at least, the library's default ciphers
    try:
        # An encrypted key missed above would make OpenSSL prompt on the terminal; the empty password fails instead.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls_key: {key} is not the unencrypted PEM private key of server.tls_cert {cert} "
            f"({_why(exc)})"
        ) from exc
    return context


def _read_head(setting: str, path: str) -> bytes:
    """The first 4 KiB of ``path``, or a ConfigError naming ``setting`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


def _why(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words: ``KEY_VALUES_MISMATCH`` -> ``key values mismatch``; "not PEM" for "PEM lib"."""
    return exc.reason.replace("_", " ").lower() if exc.reason else "not PEM"
