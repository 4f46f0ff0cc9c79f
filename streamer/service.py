"""``streamer serve``: the composition root that builds the daemon and runs it until SIGTERM.

Start: load the model, warm it up with one step, measure the capacity if it is ``"auto"``, bind the port (and
the agent check's), start the scheduler, MQTT, the microphone, a file source and the systemd watchdog as named
tasks of one TaskGroup, then ``READY=1``. Stop (SIGTERM or SIGINT): ``STOPPING=1``; stop taking sessions (and
wait up to ``admission.drain_timeout_s`` for the open ones to end); stop taking audio; in a cluster with a resume
secret, move every live ``/v1/listen`` session to another replica (``streamer.server.drain``); flush every open
segment as a final to every sink; ``end`` and close 1001 for every client; MQTT ``offline``; exit 0. A failure
of the model, the scheduler, the microphone or MQTT's task ends the TaskGroup: exit 1 (systemd
restarts us).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from streamer.config_args import MODEL_FLAGS, Key, add_settings_args, parse_context
from streamer.config_args import settings_from_args as config_settings_from_args
from streamer.engine.endpoint import EndpointConfig
from streamer.engine.factory import load_recognizer
from streamer.errors import ConfigError, StreamerError
from streamer.protocol import STREAM_NAME
from streamer.server import sdnotify
from streamer.settings import DEFAULT_CONFIG_PATH, ModelSettings, Settings, state_directory

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 20.0  # within systemd/streamer.service's TimeoutStopSec=30


@dataclass(frozen=True, slots=True)
class FileSourceSpec:
    """``--source file:PATH[?realtime=1&name=NAME]``."""

    path: Path
    realtime: bool = False
    name: str = "file"


def parse_source(text: str) -> FileSourceSpec:
    """Parse ``--source``; only ``file:`` sources exist so far."""
    if not text.startswith("file:"):
        raise ConfigError(f"--source {text!r}: expected file:PATH[?realtime=1&name=NAME]")
    path, _, query = text[len("file:"):].partition("?")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(options) - {"realtime", "name"}
    if unknown:
        raise ConfigError(f"--source: unknown option {sorted(unknown)[0]!r}; known: realtime, name")
    name = options.get("name", "file")
    if not STREAM_NAME.fullmatch(name):
        raise ConfigError(f"--source: stream name {name!r} is invalid (letters, digits, '_', '.', '-')")
    if not Path(path).is_file():
        raise ConfigError(f"--source: {path}: no such file")
    return FileSourceSpec(Path(path), options.get("realtime", "0") in ("1", "true", "yes"), name)


def serving_model_settings(model: ModelSettings, cores: int | None = None) -> ModelSettings:
    """``model`` with torch's threads decided for the daemon: ``model.threads`` when set, else one less than the
    cores this process may run on (at least 1), so torch's threads never crowd out the event loop, which does the
    network, audio conversion and results (on 2 cores, 1 torch thread holds about half again as many live streams
    in ``streamer loadtest`` as 2: measured in the issue 16 notes)."""
    if model.threads is not None or not model.device.startswith("cpu"):
        return model
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - 1)
    logger.info("model.threads is unset: %d torch thread(s), one core left to the event loop (%d core(s))",
                threads, cores)
    return model.model_copy(update={"threads": threads})


def _model_name(spec: str) -> str:
    path = Path(spec)
    return path.name if path.exists() else spec  # never show clients a local path


class Daemon:
    """The running daemon's parts; :meth:`start` builds and binds them, :meth:`run` serves until ``stop``.

    Args:
        settings: the effective settings.
        recognizer: an already loaded recognizer (tests); None loads ``settings.model``.
    """

    def __init__(self, settings: Settings, recognizer: Any = None) -> None:
        self.settings, self.recognizer = settings, recognizer
        self.endpoint = EndpointConfig(**settings.endpointing.model_dump())
        self.server: Any = None
        self.scheduler: Any = None
        self.hub: Any = None
        self.metrics: Any = None
        self.mqtt: Any = None
        self.sessions: Any = None  # SessionStore: what a resume may replay after a restart
        self.core: Any = None  # SessionCore: every client's session, whatever its protocol
        self.wyoming: Any = None  # WyomingServer, with [wyoming] enabled
        self.mic: Any = None
        self.vosk: Any = None  # VoskServer, with vosk.enabled
        self.hermes: Any = None  # HermesAdapter, with hermes.enabled
        self.leases: Any = None  # StreamLeases, with [cluster]
        self.bus: Any = None  # ResultsBus, with [cluster]
        self.agent: Any = None  # AgentCheckServer, with admission.agent_port set
        self.failover: Any = None  # Failover, with [cluster] and a resume_secret
        self.ready = asyncio.Event()  # set when READY=1 is sent

    @property
    def port(self) -> int:
        return int(self.server.port)

    async def start(self) -> None:
        """Load and warm up the model, build the parts, bind the port (not yet ready).

        Raises:
            ConfigError: the token file or a TLS file does not load, or the MQTT or session journal cannot be
                opened (checked before the model loads).
        """
        from streamer.engine.capacity import resolve_capacity
        from streamer.engine.scheduler import Scheduler, StepStats
        from streamer.server.agent_check import start_agent_check
        from streamer.server.auth import TokenAuth
        from streamer.server.fanout import Hub
        from streamer.server.metrics import Metrics
        from streamer.server.tls import server_ssl_context
        from streamer.server.websocket import WebSocketServer
        from streamer.session import ModelInfo, SessionCore, SessionLimits

        settings = self.settings
        auth = TokenAuth.from_settings(settings.server)
        ssl_context = server_ssl_context(settings.server.tls_cert, settings.server.tls_key)
        self.metrics = metrics = Metrics()
        self.mqtt = _make_mqtt(settings, metrics)  # opens the finals journal: fail before the model loads
        self.sessions = sessions = _make_session_store(settings)  # likewise
        if settings.cluster.enabled:
            from streamer.server.cluster import make_bus, make_failover, make_leases

            self.leases = make_leases(settings, self.mqtt)
            self.failover = make_failover(settings, self.leases)
        metrics.session_journal_unsaved.source = lambda: sessions.unsaved
        if self.recognizer is None:
            sdnotify.notify(f"STATUS=loading model {settings.model.spec}")
            self.recognizer = await asyncio.to_thread(load_recognizer, serving_model_settings(settings.model),
                                                      settings.engine)
        recognizer = self.recognizer
        self.hub = Hub(self.mqtt, on_event=metrics.count_result)

        def on_step(stats: StepStats) -> None:
            metrics.observe_step(stats.seconds, stats.batch_size, stats.audio_seconds, stats.dropped_seconds)

        self.scheduler = Scheduler(
            recognizer, self.hub.publish, settings.engine.max_batch, settings.engine.max_wait_ms,
            max_channels=settings.server.max_sessions + 2, ring_capacity_s=settings.engine.ring_capacity_s,
            lag_warning_s=settings.engine.lag_warning_s, on_step=on_step,
        )
        channels = self.scheduler.channels
        metrics.streams.source = lambda: len(channels)
        lags = self.scheduler.lags_s
        metrics.stream_lag_seconds.source = lags
        metrics.max_stream_lag_seconds.source = lambda: max(lags().values(), default=0.0)
        sdnotify.notify("STATUS=warming up")
        await asyncio.to_thread(self.scheduler.warm_up)
        latency = getattr(recognizer, "latency_seconds", None)  # buffered streaming only
        model = ModelInfo(_model_name(settings.model.spec), tuple(recognizer.att_context_size),
                          round(recognizer.chunk_seconds, 3), None if latency is None else round(latency, 3))
        if settings.admission.capacity_streams == "auto":
            sdnotify.notify("STATUS=measuring capacity")
        capacity = await resolve_capacity(settings, recognizer)
        limits = SessionLimits.from_settings(settings.server, settings.engine, capacity)
        if self.leases is not None:
            self.bus = make_bus(settings, self.mqtt, self.hub, self.scheduler)
        self.core = SessionCore(limits, self.scheduler, self.hub, metrics, self.endpoint, model, sessions, self.leases,
                                self.failover)
        self.server = WebSocketServer(settings.server, self.core, self.hub, metrics, auth, ssl_context,
                                      settings.deepgram, settings.admission)
        await self.server.start()
        self.agent = await start_agent_check(self.core, settings.admission, settings.server.host)
        if settings.wyoming.enabled:
            from streamer.adapters.wyoming import WyomingServer

            self.wyoming = WyomingServer(settings.wyoming, settings.server, self.core)
            await self.wyoming.start()
        if settings.vosk.enabled:
            from streamer.adapters.vosk import VoskServer

            self.vosk = VoskServer(settings.vosk, settings.server, self.core, auth, ssl_context)
            await self.vosk.start()
        if settings.hermes.enabled:
            from streamer.adapters.hermes import HermesAdapter

            self.hermes = HermesAdapter(settings.hermes, settings.mqtt, self.core, settings.server.idle_timeout_s)

    async def run(self, stop: asyncio.Event, source: FileSourceSpec | None = None) -> int:
        """Serve until ``stop`` is set, then shut down in order; returns the exit status (0, or 1 on a failure)."""
        settings, server, scheduler = self.settings, self.server, self.scheduler
        address = server.url
        tasks: list[asyncio.Task[Any]] = []
        failures: list[Exception] = []
        try:
            async with asyncio.TaskGroup() as tg:
                tasks.append(tg.create_task(scheduler.run(), name="scheduler"))
                if self.mqtt is not None:
                    tasks.append(tg.create_task(self.mqtt.run(), name="mqtt"))
                for name, part in (("hermes", self.hermes), ("results-bus", self.bus), ("leases", self.leases)):
                    if part is not None:
                        tasks.append(tg.create_task(part.run(), name=name))
                if self.failover is not None:
                    core = self.core
                    tasks.append(tg.create_task(self.failover.facts.run(), name="session-facts"))
                    from streamer.session.handoff import run as run_failover

                    tasks.append(tg.create_task(run_failover(self.failover, lambda: list(core.sessions)),
                                                name="failover"))
                tasks.append(tg.create_task(self.sessions.run(settings.server.resume_window_s), name="sessions"))
                if settings.mic.enabled:
                    self.mic = await _start_mic(settings, scheduler, self.endpoint)
                    tasks.append(tg.create_task(self.mic.wait(), name="microphone"))
                if source is not None:
                    tasks.append(tg.create_task(_replay(source, scheduler, self.endpoint), name="file-source"))
                interval = sdnotify.watchdog_interval_s()
                if interval is not None:
                    limit_s = 4 * interval  # WATCHDOG_USEC is 2 * interval: a step stuck that long stops the pings
                    tasks.append(tg.create_task(
                        sdnotify.watchdog(lambda: not scheduler.is_stuck(limit_s), interval), name="watchdog"
                    ))
                server.is_ready = True
                self.ready.set()
                sdnotify.notify("READY=1", f"STATUS=listening on {address}")
                logger.info("ready: listening on %s, taking %d session(s)", address, self.core.limits.session_cap)
                await stop.wait()
                logger.info("stopping: flushing open segments")
                sdnotify.notify("STOPPING=1", "STATUS=flushing open segments")
                await self._shutdown(tasks)
        except* Exception as group:  # a task failed: the TaskGroup cancelled the rest (no flush is possible)
            failures.extend(group.exceptions)
        for exc in failures:
            if isinstance(exc, StreamerError):
                logger.error("%s", exc)
            else:
                logger.error("daemon failed: %r", exc, exc_info=exc)
        if failures:
            sdnotify.notify("STOPPING=1", f"STATUS=failed: {failures[0]}")
            await server.close()
            await self._close_adapters()
            return 1
        return 0

    async def _close_adapters(self) -> None:
        """Close the other protocols' servers (Wyoming, Vosk), the Hermes client, the agent check, the session
        facts store and the cluster's leases."""
        facts = self.failover.facts if self.failover is not None else None
        for adapter in (self.wyoming, self.vosk, self.hermes, self.agent, facts, self.leases):
            if adapter is not None:
                await adapter.close()

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Stop input, flush every segment to every sink, close clients and MQTT, then end the tasks."""
        server, scheduler = self.server, self.scheduler
        # No new sessions; the open ones may end on their own (with a resume secret they are moved at once below).
        await self.core.drain(0.0 if self.failover is not None else self.settings.admission.drain_timeout_s)
        for task in tasks:
            if task.get_name() == "file-source":
                task.cancel()
        if self.mic is not None:
            await self.mic.stop()  # delivers the resampler's tail first
        if self.wyoming is not None:
            self.wyoming.stop_accepting()
        if self.failover is not None:  # live /v1/listen sessions move to other replicas rather than end
            from streamer.server.drain import drain

            await drain(self.core, self.failover, self.settings.cluster.drain_timeout_s)
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await server.shutdown()  # every session (/v1/listen: final, end, 1001; Wyoming: transcript)
                await scheduler.close_all("shutdown")  # microphone, file
        except TimeoutError:
            logger.error("open segments not flushed within %.0f s", FLUSH_TIMEOUT_S)
        await server.close()  # caption subscribers get their finals, then 1001
        await self._close_adapters()  # their sessions' last results went out (and leases were released) with shutdown
        if self.mqtt is not None:
            await self.mqtt.close()  # delivers the outbox, publishes "offline"
        for task in tasks:
            task.cancel()


async def serve(settings: Settings, source: FileSourceSpec | None = None, port_file: Path | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    sdnotify.take_notify_socket()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        daemon = Daemon(settings)
        await daemon.start()
        print(f"streamer: listening on {daemon.server.url}", flush=True)
        if daemon.wyoming is not None:
            print(f"streamer: wyoming on {daemon.wyoming.url}", flush=True)
        if daemon.vosk is not None:
            print(f"streamer: vosk on {daemon.vosk.url}", flush=True)
        if daemon.agent is not None:
            print(f"streamer: agent check on {daemon.agent.address}", flush=True)
        if port_file is not None:
            port_file.write_text(f"{daemon.port}\n")
        return await daemon.run(stop, source)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _make_session_store(settings: Settings) -> Any:
    """What a resume may replay, kept in the state directory unless ``state.dir`` is ``""`` (or resume is off).

    Raises:
        ConfigError: the journal cannot be opened (an unwritable directory, another daemon holds it).
    """
    from streamer.server.session_journal import SessionJournal, SessionStore

    directory = state_directory(settings.state)
    if directory is None or settings.server.resume_window_s <= 0:
        return SessionStore(None)
    return SessionStore(SessionJournal.open(directory, settings.server.max_pending_messages))


def _make_mqtt(settings: Settings, metrics: Any) -> Any:
    """The MQTT sink, with its journal in the state directory unless ``state.dir`` is ``""``.

    Raises:
        ConfigError: the journal cannot be opened (an unwritable directory, another daemon holds it).
    """
    if not settings.mqtt.enabled:
        return None
    from streamer.server.journal import FinalJournal
    from streamer.server.mqtt import MqttSink

    directory = state_directory(settings.state)
    journal = FinalJournal.open(directory) if directory is not None else None
    m = settings.mqtt
    cluster = settings.cluster  # a replica's topics carry its node id unless mqtt.device_id says otherwise
    sink = MqttSink(
        m.host, m.port, prefix=m.prefix, device=m.device_id or (cluster.node_id if cluster.enabled else None),
        tls=m.tls, tls_ca_file=m.ca_file,
        tls_cert_file=m.cert_file, tls_key_file=m.key_file, username=m.username,
        password=m.password.get_secret_value() if m.password else None, outbox_size=m.outbox_size,
        max_inflight=m.max_inflight, keepalive_s=m.keepalive_s, journal=journal,
    )
    logger.info("MQTT run id %s; finals journal: %s", sink.run_id,
                journal.path if journal is not None else "none (state.dir is empty: finals live in memory only)")
    metrics.mqtt_outbox_depth.source = lambda: sink.outbox_depth
    metrics.mqtt_connected.source = lambda: int(sink.connected)
    metrics.mqtt_finals_published_total.source = lambda: sink.published_finals
    metrics.mqtt_finals_dropped_total.source = lambda: sink.dropped_finals
    metrics.mqtt_finals_unsaved.source = lambda: sink.unsaved_finals
    metrics.mqtt_finals_recovered.set(sink.recovered_finals)
    return sink


async def _start_mic(settings: Settings, scheduler: Any, endpoint: EndpointConfig) -> Any:
    from streamer.audio.mic import MicrophoneSource

    channel = scheduler.open(settings.mic.name, endpoint)

    def on_audio(samples: Any) -> None:
        channel.write(samples)
        scheduler.poke(channel)

    device = settings.mic.device
    mic = MicrophoneSource(int(device) if device is not None and device.isdigit() else device, on_audio)
    await mic.start()
    return mic


async def _replay(source: FileSourceSpec, scheduler: Any, endpoint: EndpointConfig) -> None:
    """Feed a file as stream ``source.name``; without real-time pacing, as fast as recognition goes."""
    from streamer.audio.filesrc import FileSource

    channel = scheduler.open(source.name, endpoint, is_live=source.realtime)
    started = time.monotonic()
    async for block in FileSource(source.path, realtime=source.realtime):
        if source.realtime:
            channel.write(block)
            scheduler.poke(channel)
        else:
            await scheduler.write_waiting(channel, block)  # never drop audio of a file
    await scheduler.close(channel, "stop")
    logger.info("file %s recognized in %.1f s", source.path, time.monotonic() - started)


# ---------------------------------------------------------------- `streamer serve`


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """``streamer serve``: flags for the common settings, ``--set`` for any other."""
    p = sub.add_parser(
        "serve",
        help="run the daemon: WebSocket /v1/listen and /v1/captions, HTTP health and metrics, MQTT",
        description="Run the recognition daemon until SIGTERM. Settings come from --config (default "
        f"{DEFAULT_CONFIG_PATH} if present), STREAMER_<SECTION>__<KEY> environment variables and these "
        "flags, in increasing precedence; see configs/default.toml.",
    )
    add_settings_args(p)
    p.add_argument("--model", help="model spec (model.spec)")
    p.add_argument("--device", help="torch device (model.device)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="encoder precision (model.dtype)")
    p.add_argument("--threads", type=int, help="torch threads (model.threads)")
    p.add_argument("--att-context-size", type=parse_context, metavar="L,R", help="look-ahead (model.att_context_size)")
    p.add_argument("--decoder", choices=("tdt", "rnnt", "ctc"), help="decoding head (model.decoder)")
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--port", type=int, help="port, 0 for any free one (server.port)")
    p.add_argument("--source", help="also recognize a file as a stream: file:PATH[?realtime=1&name=NAME]")
    p.add_argument("--port-file", type=Path, help="write the bound port to this file once listening")
    p.set_defaults(func=cmd_serve)


SERVE_FLAGS: dict[str, Key] = {
    **MODEL_FLAGS, "device": ("model", "device"), "dtype": ("model", "dtype"), "host": ("server", "host"),
    "port": ("server", "port"),
}


def settings_from_args(args: argparse.Namespace) -> Settings:
    """serve's settings: its flags > ``--set`` > environment > file > defaults."""
    return config_settings_from_args(args, SERVE_FLAGS)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    source = parse_source(args.source) if args.source else None
    return asyncio.run(serve(settings, source, args.port_file))
