"""Every setting, by section: the pydantic models, their defaults and checks (``configs/default.toml`` documents each
key). Reading them from a file, the environment and flags is :mod:`streamer.settings`, which is also where every
name here is imported from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamer.engine.endpoint import EndpointConfig
from streamer.errors import ConfigError
from streamer.protocol.limits import DEFAULT_HOTWORD_WEIGHT, MAX_HOTWORD_WEIGHT, MAX_HOTWORDS

ENV_PREFIX = "STREAMER_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Section):
    """[model]: what to recognize with."""

    spec: str = Field("streamer-tdt-small", description="a .nemo file, a Hugging Face directory or id, or a name")
    att_context_size: tuple[int, int] | None = Field(None, description="[left, right] attention context; None: first")
    decoder: Literal["tdt", "rnnt", "ctc"] | None = Field(None, description="decoding head; None: the model's own")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="the encoder's weights and activations; float16 and bfloat16 on CUDA only"
    )
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; None: serve leaves one core to the event loop, others use all"
    )
    compile: Literal["off", "offline", "offline-dynamic", "offline-graphs"] = Field(
        "off", description="torch.compile of the offline encoder (length buckets; -dynamic; -graphs: CUDA graphs)"
    )

    @field_validator("device")
    @classmethod
    def _device_is_cpu_or_cuda(cls, device: str) -> str:
        problem = device_problem(device)
        if problem:
            raise ValueError(problem)
        return device.strip()


DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_problem(name: str) -> str | None:
    """Why ``name`` is no ``model.device``, or None when its form is right (whether the machine has it is
    checked when the model loads, :func:`streamer.asr.precision.check_device`)."""
    if DEVICE_PATTERN.fullmatch(name.strip()):
        return None
    return f"{name!r} is not a device streamer runs on: use cpu, cuda or cuda:N (N: the GPU's index)"


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
    openai_api: bool = Field(True, description="serve POST /v1/audio/transcriptions and WS /v1/realtime")
    max_upload_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="largest request body (an uploaded file), bytes; more gets HTTP 413"
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

    max_batch: int = Field(64, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    ring_capacity_s: float = Field(
        10.0, gt=0, description="audio buffered per stream: a live stream further behind loses its oldest audio"
    )
    lag_warning_s: float = Field(
        2.0, gt=0, description="a live stream this far behind real time gets warning falling_behind"
    )
    cuda_graphs: bool = Field(
        True, description="on CUDA, replay the encoder step as CUDA graphs at batch buckets 1, 2, 4, ...; "
        "ignored on the CPU"
    )
    hotword_weight: float = Field(
        DEFAULT_HOTWORD_WEIGHT, ge=0, le=MAX_HOTWORD_WEIGHT,
        description="how hard a session's hotwords are boosted when its start names no weight (NeMo's "
        "boosting_tree_alpha; 0: not at all)",
    )
    max_hotwords: int = Field(
        100, ge=0, le=MAX_HOTWORDS, description="the most hotword phrases one session may list; 0: none"
    )
    streaming: Literal["auto", "cache_aware", "buffered"] = Field(
        "auto", description="how live audio is recognized: cache_aware (the model's own streaming step; needs a "
        "cache-aware model), buffered (NeMo's buffered streaming: the offline encoder re-run on a sliding buffer, "
        "for full-context models such as parakeet-tdt-0.6b), auto: cache_aware when the model can, else buffered",
    )
    buffer_left_s: float = Field(10.0, ge=0, description="buffered streaming: audio before the chunk (context only)")
    buffer_chunk_s: float = Field(
        1.6, gt=0, description="buffered streaming: audio decoded per step (the step period)"
    )
    buffer_right_s: float = Field(
        1.6, ge=0, description="buffered streaming: look-ahead after the chunk; latency = chunk + right"
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


class HermesSettings(_Section):
    """[hermes]: Rhasspy's Hermes ASR over MQTT (``streamer.adapters.hermes``), on the broker of [mqtt]."""

    enabled: bool = False
    site_ids: list[str] = Field(default_factory=list, description="the sites (siteId) served; empty: every site")

    @field_validator("site_ids")
    @classmethod
    def _site_ids_are_topic_levels(cls, site_ids: list[str]) -> list[str]:
        for site in site_ids:
            if not site or any(c in site for c in "+#/\0"):
                raise ValueError(f"{site!r} is no site id: it must be non-empty, without '+', '#', '/' or NUL "
                                 "(it is an MQTT topic level)")
        return site_ids


class VoskSettings(_Section):
    """[vosk]: the Vosk server's WebSocket protocol on a port of its own (``streamer.adapters.vosk``)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(2700, ge=0, le=65535)
    sample_rate: int = Field(
        8000, ge=8000, le=48000, description="the rate of a client that sends no config (vosk-server's default)"
    )


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


class WyomingSettings(_Section):
    """[wyoming]: speech-to-text for Home Assistant over the Wyoming protocol (its own TCP port)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(10300, ge=0, le=65535, description="TCP port (10300 is Wyoming's custom for speech-to-text)")
    zeroconf: bool = Field(False, description="advertise _wyoming._tcp.local. over mDNS for Home Assistant")
    languages: list[str] = Field(
        default_factory=lambda: ["en"], min_length=1, description="the model's languages, as 'info' lists them"
    )

    @field_validator("languages")
    @classmethod
    def _languages_are_tags(cls, languages: list[str]) -> list[str]:
        for language in languages:
            if not language or len(language) > 35 or not all(c.isalnum() or c in "-_" for c in language):
                raise ValueError(f"{language!r} is no language tag: give tags like 'en' or 'en-US'")
        return languages



class DeepgramSettings(_Section):
    """[deepgram]: the Deepgram-compatible live API on the main port (``streamer.adapters.deepgram``)."""

    enabled: bool = True
    idle_timeout_s: float = Field(
        10.0, gt=0, description="a connection without audio or a text message this long is closed (NET-0001)"
    )


NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ClusterSettings(_Section):
    """[cluster]: replicas that share one results bus (the [mqtt] broker) and one lease store (Redis), so a viewer
    may land on any replica and a stream name is unique across all of them (``streamer.server.results_bus``,
    ``streamer.server.stream_leases``)."""

    enabled: bool = False
    node_id: str | None = Field(
        None, pattern=NODE_ID_PATTERN, description="this replica's name in leases and logs; None: the host name"
    )
    bus: Literal["mqtt"] = Field("mqtt", description="where replicas exchange results: the broker of [mqtt]")
    store_url: str = Field("redis://localhost:6379/0", description="the lease store: redis://, rediss:// or unix://")
    store_password: SecretStr | None = Field(None, description="the store's password, if not in store_url")
    lease_ttl_s: float = Field(
        10.0, ge=1.0, le=3600.0, description="a stream name's lease lives this long unless renewed (every ttl/3)"
    )
    resume_secret: SecretStr | None = Field(
        None, description="shared by every replica: signs resume tokens so any replica resumes a session; None: off"
    )
    resume_secret_file: str | None = Field(None, description="file whose first line is resume_secret")
    resume_token_ttl_s: float = Field(
        86400.0, ge=60.0, le=30 * 86400.0, description="a signed resume token is valid this long after its 'ready'"
    )
    drain_timeout_s: float = Field(
        10.0, gt=0, le=600.0, description="at SIGTERM, how long moving the sessions to other replicas may take"
    )

    def resume_secret_bytes(self) -> bytes | None:
        """The resume secret (from ``resume_secret`` or ``resume_secret_file``), or None when neither is set.

        Raises:
            ConfigError: the file cannot be read, or the secret is shorter than 16 bytes.
        """
        if self.resume_secret is not None:
            secret = self.resume_secret.get_secret_value()
        elif self.resume_secret_file is not None:
            try:
                lines = Path(self.resume_secret_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cluster.resume_secret_file: cannot read {self.resume_secret_file}: "
                                  f"{exc.strerror or exc}") from exc
            secret = lines[0].strip() if lines else ""
        else:
            return None
        if len(secret.encode()) < 16:
            raise ConfigError("cluster.resume_secret must be at least 16 bytes (32 random ones are best: "
                              "`openssl rand -base64 32`), the same on every replica")
        return secret.encode()

    @field_validator("store_url")
    @classmethod
    def _store_url_is_redis(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{url!r} is no Redis URL: give redis://HOST:PORT/DB, rediss://... or unix://PATH")
        return url
class AdmissionSettings(_Section):
    """[admission]: what one box takes before a load balancer should send sessions elsewhere (``/readyz``, the
    load in ``/metrics``, HAProxy's agent check); the defaults change nothing."""

    capacity_streams: int | Literal["auto"] = Field(
        0, description="sessions this box serves in real time; 0: no capacity (server.max_sessions is the only "
        "cap); 'auto': measured at start-up by timing the engine's batched step"
    )
    agent_port: int | None = Field(
        None, ge=0, le=65535, description="HAProxy agent-check TCP port (weight, ready, drain); None: off; 0: any free"
    )
    agent_host: str | None = Field(None, description="the agent check's address; None: server.host")
    drain_timeout_s: float = Field(
        0.0, ge=0, le=86400, description="on SIGTERM, wait this long for sessions to end (refusing new ones, "
        "/readyz 503, agent 'drain') before flushing and closing the rest; 0: flush at once"
    )
    retry_after_s: int = Field(2, ge=0, le=3600, description="Retry-After of an HTTP 503 refusal at capacity")

    @field_validator("capacity_streams")
    @classmethod
    def _capacity_is_count_or_auto(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value} is no capacity: give a number of streams (0: none) or 'auto'")
        return value


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
    wyoming: WyomingSettings = WyomingSettings()
    hermes: HermesSettings = HermesSettings()
    vosk: VoskSettings = VoskSettings()
    deepgram: DeepgramSettings = DeepgramSettings()
    cluster: ClusterSettings = ClusterSettings()
    admission: AdmissionSettings = AdmissionSettings()

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
