"""Wire protocol v1 of ``WS /v1/listen`` and ``WS /v1/captions``: typed messages, JSON in and out.

Standard library only, so a client can ``from streamer.protocol import ...`` without torch. The package holds
the messages (:mod:`~streamer.protocol.messages`), their parsing (:mod:`~streamer.protocol.parse`) and the limits
on a client's text message (:mod:`~streamer.protocol.limits`); everything public is importable from here. A
client's own bookkeeping (its recent audio, the session to resume) is in :mod:`streamer.client`.

Session on ``/v1/listen``
=========================

1. The client opens ``ws://HOST:8765/v1/listen`` and sends one text message, :class:`Start`::

       {"type": "start", "sample_rate": 48000, "encoding": "pcm_s16le", "channels": 1,
        "stream": "kitchen", "interim_results": true,
        "endpointing": {"trailing_silence_after_speech_s": 0.8}}

   Only ``type``, ``sample_rate`` and ``encoding`` are required. ``sample_rate`` is 8000-48000 Hz (the
   server resamples to the model's rate), ``encoding`` is ``pcm_s16le`` or ``pcm_f32le`` (little
   endian, channels interleaved), ``channels`` 1-8 (mixed down to mono). ``stream`` names the stream
   for ``/v1/captions`` and MQTT topics (letters, digits, ``_ . -``, at most 64; default: the session
   id); two live sessions cannot share a name. ``interim_results: false`` turns partials off for this
   client only. ``endpointing`` overrides the server's rules for this session (see
   ``streamer.engine.endpoint``). ``resume`` continues a session whose connection dropped (see
   "Resuming a session"). ``live`` (default false) says whether the source can wait (see "Flow
   control"). ``hotwords`` and ``hotword_weight`` boost words and phrases (see "Hotwords"). Unknown fields
   are errors.
2. The server answers :class:`Ready` (session id, stream, model, protocol version, att_context_size,
   sample rate, the step period ``chunk_s``, the effective endpointing rules and ``live``; when the server keeps
   sessions across reconnects, also ``resume_token``, ``resume_window_s``, ``resumed`` and ``audio_s``:
   see "Resuming a session" below; with hotwords, ``hotwords`` and ``hotword_weight``).
3. The client sends binary frames of audio in the declared encoding, of any length: the audio is a byte
   stream, and a frame may end in the middle of a sample (or of a sample frame of several channels), whose
   remaining bytes come first in the next frame. Only audio that ends on an incomplete sample frame loses
   those bytes (``end.incomplete_bytes`` says how many). Text messages in between: :class:`Finalize`
   (end the current segment now, keep listening), :class:`KeepAlive` (resets the idle timer),
   :class:`Stop` (no more audio: the server flushes the last segment, sends its final, then
   :class:`End` (with the seconds of audio received and dropped), and closes with 1000).
4. The server sends :class:`Partial` whenever the text of the open segment changes (``stable`` is the
   prefix of ``text`` that will not change any more) and exactly one :class:`Final` per segment,
   with words, times and confidence. Segments are numbered from 0 per stream; a segment in which
   nothing was recognized has no partial and no final and takes no number.

Times (``start``, ``end``, word times) are seconds on the stream's own clock: from its first sample,
counting audio the server dropped and not counting silence it padded in to flush a segment. No time lies
beyond the audio received so far (a partial's ``end`` is capped there, though its last token's predicted
duration may reach further). Endpointing rules are checked on every encoder frame (80 ms), not only at the
end of each model step, so a pause ends its segment whatever the look-ahead.

Hotwords
========

``"hotwords": ["Barnaby", "kitchen lights"]`` in ``start`` makes the recognizer prefer these words and phrases
for this session (names, product words, commands), and ``"hotword_weight": 1.5`` sets how hard (0 to
``MAX_HOTWORD_WEIGHT``, 10; default ``engine.hotword_weight``, 1.0). At most ``engine.max_hotwords`` phrases (100;
never more than ``MAX_HOTWORDS``, 1000), each at most ``MAX_HOTWORD_CHARS`` (100) characters without control
characters; whitespace is tidied and repeats count once. Breaking a rule gets ``bad_message`` naming it, and no
session starts (send a corrected ``start``). ``ready`` reports the phrases boosted and the weight. A phrase the
model's vocabulary cannot spell is not boosted: warning ``hotwords_ignored`` names it. A resumed session keeps
the hotwords it started with. How the boost works (NeMo's phrase boosting in greedy decoding) is in
``streamer.asr.boosting``.

Flow control
============

A client that can wait (the default: a file, a batch job, a replay) is never thinned: while its audio
waits for recognition beyond ``engine.ring_capacity_s``, the server stops reading its socket, so TCP
slows the sender down, and the whole file is recognized at the speed the box allows. Each scheduling
round gives such a client one step, like every other stream, and live streams are served first, so a
fast client cannot take the box from live ones. A live source (``"live": true``: a microphone, or any
client paced at real time that must not fall behind) cannot wait: when the server falls more than
``engine.lag_warning_s`` behind it, it gets warning ``falling_behind`` (``seconds``: how far behind;
once, and again after it has caught up to half of that), and beyond ``engine.ring_capacity_s`` its
oldest audio is dropped with warning ``audio_dropped`` (``seconds``: how much). ``ready.live`` says which
rule applies; ``end.dropped_s`` is the account. ``/metrics`` has each live stream's lag
(``streamer_stream_lag_seconds{stream=...}``). The caption page, ``streamer mic --url`` and
``ws_client.py --mic/--realtime`` send ``"live": true``; ``ws_client.py FILE`` does not.

Resuming a session
==================

When ``server.resume_window_s`` is above 0 (default 10 s), every ``ready`` carries ``resume_token``
(a secret for this session, new in every ``ready``: a token resumes once), ``resume_window_s``,
``resumed`` (false for a new session) and ``audio_s`` (0 for a new session).

If the connection breaks without ``stop`` (no close frame from the client: a network drop, a laptop
that roams or sleeps, a server-side keepalive timeout), the server keeps the session for
``resume_window_s``: its recognizer state, open segment, stream name and the results its client may
have missed. Its partials and finals keep going to ``/v1/captions`` subscribers and MQTT meanwhile
(a final made while the client is away goes out to them at once and is kept for the client). A client
that closes the WebSocket itself (any close frame) without ``stop`` has hung up: its session ends at
once, as does one closed by the server for a policy reason (slow consumer, frame too large).

To resume, a new connection sends ``start`` with the same ``sample_rate``, ``encoding`` and
``channels`` (``stream`` and ``endpointing`` may be left out; if given they must match) and::

    "resume": {"session": "<session from ready>", "token": "<resume_token from the latest ready>",
               "next_segment": 3}

``next_segment`` is the number of the first segment whose final the client has not received (the
count of finals it has, since finals are numbered from 0; default 0: every final the server kept).
The server answers ``ready`` with ``resumed: true``, the same ``session`` and ``stream``, a new
``resume_token`` and ``audio_s``: the seconds of audio it received in the session so far, exact
(``audio_s * sample_rate``, rounded, is the number of sample frames). The client re-sends its audio
from that point on (clients keep a bounded buffer of recent audio for this; :class:`streamer.client.ClientSession`
does a client's bookkeeping) and then continues live.
After ``ready`` come, in order, the finals from ``next_segment`` on (those sent on the broken
connection, which may not have arrived, and those made while away), warnings made while away, the
open segment's latest partial, then live results. When the server no longer keeps some finals from
``next_segment`` on (it keeps the last ``server.max_pending_messages``), warning ``results_lost`` naming
them comes first. The replay does not count against the slow-consumer limit (see below). A session
whose old connection the server still believes open (it has not noticed the drop yet) is taken over:
that connection is dropped.

If the session cannot be resumed, the server sends error ``resume_failed`` saying why (no such
session, or it ended or its window expired; a wrong token; a token used already; a format, stream
or endpointing that differs from the session's; a server with resume off) and then treats the
``start`` as a new session without ``resume`` (which gets its own ``ready``, or its own error such as
``stream_in_use`` while the old session is still held). A mismatched ``start`` leaves the held session
alone. When the window passes without a resume, the session ends as a disconnect always did: its
open segment is flushed as a final with reason ``disconnect`` to the other sinks. A held session
counts against ``server.max_sessions`` until it ends; when only held sessions fill the cap, a new
connection is let in but may only resume one of them (a new session gets ``server_busy``, close
1013). At shutdown held sessions are flushed like any other. A resume is a ``/v1/listen`` request like
any other and needs the daemon's access token when it has tokens; the resume token is a second
secret, bound to its session, and is never logged.

After a restart of the server (a crash, or a stop while the session was held), with a state directory
(``state.dir``), the session cannot go on, but what it had is not lost: a ``start`` that resumes it with
its latest token gets error ``resume_failed`` saying the server restarted, then the finals from
``next_segment`` on that the session kept (their old stream name and segment numbers; warning
``results_lost`` first when some are no longer kept), then the ``start`` goes on as a new session. This
works once per session, within ``resume_window_s`` of the restarted server being ready.

In a cluster whose replicas share ``cluster.resume_secret`` (``README.md`` "Sessions that survive a replica"),
a ``start`` with ``resume`` is answered by any replica: when the session's replica died, another one continues
it, after waiting up to ``cluster.lease_ttl_s`` + 1 s for the dead replica's stream lease to lapse (a client waits
that long for ``ready``). Its ``ready`` says ``resumed: true`` and, as ``audio_s``, the end of the session's last
final, which may be earlier than what the dead replica had received: the client re-sends from there as after
any resume; finals go on with the next segment number, the ones the client lacks are replayed, and none it has
is sent again. A replica that is stopped gracefully first sends each live session's client, after the final of
the segment it cut there::

    {"type": "moved", "session": "<id>", "stream": "<name>", "resume_token": "<token>", "audio_s": 4.69,
     "next_segment": 2}

and closes with 1012: the client reconnects (through the load balancer) and resumes with that token (its latest
``ready``'s); the answering ``ready`` has the same ``audio_s``. A client that ignores ``moved`` just sees the
connection close and resumes as after any drop. A token that was altered, is another cluster's, has expired, was
spent, or names a session the cluster no longer keeps gets ``resume_failed`` saying which.

Errors and limits
=================

An :class:`Error` names the offending input by ``code``; the offending message or frame is discarded
and the session goes on (the client may, for example, send a corrected ``start``). Codes:

- ``bad_json``: a text message that is not JSON (or not UTF-8);
- ``bad_message``: not an object, an unknown ``type``, a missing, unknown or ill-typed field; anything
  sent on ``/v1/captions`` (see there); a text message over one of the limits below (checked before or
  while the JSON is parsed; the reason names the limit);
- ``no_start``: audio or ``finalize``/``stop`` before ``start``;
- ``already_started``: a second ``start``;
- ``unsupported_audio``: sample rate, encoding or channel count out of range;
- ``bad_audio``: NaN or infinite float samples (the frame is dropped whole);
- ``stream_in_use``: another live source (or a session held for a resume, or in a cluster another replica,
  which the message names) already sends that stream name;
- ``resume_failed``: the ``start`` could not resume the session it names (see above); a new session
  is started instead;
- ``server_busy``: the session cap is reached (then closed with 1013);
- ``not_ready``: the server is starting or stopping (then closed with 1013); or, at ``start`` in a cluster,
  its stream-name lease store is unreachable (the connection stays open; a later ``start`` may succeed);
- ``start_timeout``: no ``start`` within ``server.start_timeout_s`` of connecting, keepalive or not (then 1008);
- ``idle_timeout``: nothing received for ``server.idle_timeout_s`` (the open segment is flushed,
  ``end`` sent, then closed with 1008);
- ``internal_error``: the server failed while handling this message (a bug: it is logged with a
  traceback and counted in ``streamer_protocol_errors_total``); the message is discarded and the
  session goes on.

Limits on a client's text message (a frame larger than ``server.max_frame_bytes`` is refused before
any of these, with close 1009), each refused with ``bad_message`` and a reason naming it:

- at most ``MAX_TEXT_BYTES`` (64 KiB) of UTF-8;
- arrays and objects nested at most ``MAX_JSON_DEPTH`` (16) deep (counted before the text is parsed);
- integers of at most ``MAX_INT_DIGITS`` (32) digits; other numbers of at most ``MAX_NUMBER_CHARS`` (64)
  characters whose value is a finite float (``1e400`` is refused); ``NaN``, ``Infinity`` and
  ``-Infinity`` are not JSON, and every field refuses them by name (e.g. "endpointing.max_segment_s must
  be a number of seconds, got nan");
- strings (and keys) of Unicode scalar values: a lone surrogate escape such as ``"\\ud800"`` is refused;
- ``resume.session`` and ``resume.token``: at most ``MAX_ID_CHARS`` (256) characters, no control
  characters.

Every number the server writes is valid JSON: a value it cannot state as a finite number (a
``confidence`` computed from absurd input, say) is sent as ``null``, and the cause is logged once.

A :class:`Warning` discards nothing the client sent: ``audio_dropped`` (a live session: the server fell
behind and dropped ``seconds`` of the oldest audio), ``falling_behind`` (a live session is ``seconds``
behind real time), ``audio_clipped`` (``pcm_f32le`` samples beyond [-1, 1] were clipped to it; said once
per session), ``empty_frame`` (an empty binary frame was ignored), ``hotwords_ignored`` (phrases the model
cannot spell, not boosted),
``results_lost`` (a resumed session could not replay every final from ``next_segment`` on: the server
keeps the last ``server.max_pending_messages``).

Close codes: 1000 after ``end``; 1001 when the server shuts down (every open segment is flushed and
``end`` sent first); 1008 idle timeout or a client too slow to read its results; 1009 a frame larger
than ``server.max_frame_bytes``; 1011 an internal error outside the handling of a text message (a
failure while handling one is error ``internal_error`` instead, and the session goes on); 1012 after ``moved``
(a cluster replica draining: resume on another); 1013 session cap reached or not ready.

Captions on ``/v1/captions?stream=NAME``
========================================

A read-only subscription to the partials and finals of a named stream (the microphone, a file
source or a ``/v1/listen`` session; in a cluster, also a stream another replica recognizes, relayed from
the results bus, with warning ``results_bus_down`` when this replica loses the bus), in the same JSON as
above. Partials may be skipped when the
subscriber is behind (the latest wins); finals are never skipped: a subscriber that leaves
``server.max_pending_messages`` finals unread is closed with 1008. A subscriber sends nothing: the
first text or binary message it sends anyway gets error ``bad_message`` (``/v1/captions`` is
read-only; audio goes to ``/v1/listen``), and it and any later ones are dropped (the later ones
silently); the subscription goes on. A bad or missing name gets error ``bad_message`` and close 1008;
the subscription cap (``server.max_subscribers``) error ``server_busy`` and close 1013. At shutdown
subscribers get the flushed finals, then close 1001.

Each ``final`` and ``partial`` is also published to MQTT when enabled:
``<prefix>/<device>/<stream>/partial`` (QoS 0) and ``<prefix>/<device>/<stream>/final`` (QoS 1), with
the same JSON plus one last field ``run``, plus a retained ``<prefix>/<device>/status`` of
``online``/``offline``. ``run`` is a new id at every start of the daemon (its UTC start time and random
digits, e.g. ``"20250314T091502Z-3fa9c1"``; compare it for equality only). Segment numbers start again
at 0 after a restart, so a subscriber tells results apart by ``(run, segment)`` on a stream's topic.

Finals reach the broker at least once and in order per stream. With a state directory (``state.dir``,
by default systemd's ``StateDirectory=``) every final is committed to an SQLite journal on disk before
it is published and deleted once the broker acknowledged it: finals made while the broker is away
survive a crash, ``kill -9`` or a power cut, and are delivered first after the next start, with their
original payload (and so their old ``run``). A final whose acknowledgement was lost with the connection
or the process is sent again (a subscriber may see it twice: same ``run`` and ``segment``). While the
broker is connected no final is dropped; while it is away at most ``mqtt.outbox_size`` are kept, and
beyond that the oldest are dropped (counted in ``streamer_mqtt_finals_dropped_total``).

What a crash (``kill -9``, power loss) still loses: the open segment of every stream (its audio and
partials: it never becomes a final), a ``/v1/listen`` session and its resume state (a client that
reconnects with its ``resume`` gets ``resume_failed`` and a new session whose segments start at 0), and
the finals kept for a replay to that client (they were published to MQTT, and reach the broker there).
"""

from __future__ import annotations

from streamer.protocol.limits import (
    MAX_HOTWORD_CHARS,
    MAX_HOTWORD_WEIGHT,
    MAX_HOTWORDS,
    MAX_ID_CHARS,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    MAX_TEXT_BYTES,
    check_hotword_weight,
    check_hotwords,
)
from streamer.protocol.messages import (
    BYTES_PER_SAMPLE,
    ENCODINGS,
    ENDPOINT_KEYS,
    MAX_CHANNELS,
    MAX_ENDPOINT_S,
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    PROTOCOL_VERSION,
    STREAM_NAME,
    ClientMessage,
    End,
    Error,
    Final,
    Finalize,
    KeepAlive,
    Message,
    MessageError,
    Moved,
    Partial,
    Ready,
    Resume,
    ServerMessage,
    Start,
    Stop,
    Warning,
    WordTiming,
    to_dict,
)
from streamer.protocol.parse import (
    parse_client_message,
    parse_server_message,
)

__all__ = [
    "BYTES_PER_SAMPLE",
    "ClientMessage",
    "ENCODINGS",
    "ENDPOINT_KEYS",
    "End",
    "Error",
    "Final",
    "Finalize",
    "KeepAlive",
    "MAX_CHANNELS",
    "MAX_ENDPOINT_S",
    "MAX_HOTWORDS",
    "MAX_HOTWORD_CHARS",
    "MAX_HOTWORD_WEIGHT",
    "MAX_ID_CHARS",
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_CHARS",
    "MAX_SAMPLE_RATE_HZ",
    "MAX_TEXT_BYTES",
    "MIN_SAMPLE_RATE_HZ",
    "Message",
    "MessageError",
    "Moved",
    "PROTOCOL_VERSION",
    "Partial",
    "Ready",
    "Resume",
    "STREAM_NAME",
    "ServerMessage",
    "Start",
    "Stop",
    "Warning",
    "WordTiming",
    "check_hotword_weight",
    "check_hotwords",
    "parse_client_message",
    "parse_server_message",
    "to_dict",
]
