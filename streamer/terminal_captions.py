"""Captions in a terminal or a pipe, for ``streamer mic``: on a terminal the open segment's partial is rewritten in
place on one line (``\\r`` and clear to end of line; the part that may still change is dimmed) and finals scroll;
otherwise only finals are printed, one per line; or every message as one JSON line. Status lines go to stderr.
"""

from __future__ import annotations

import shutil
from typing import TextIO

from streamer.protocol import Error, Final, Moved, Partial, ServerMessage, Warning

CLEAR_LINE = "\r\x1b[K"
DIM, NORMAL = "\x1b[2m", "\x1b[0m"


class Captions:
    """Writes captions to a terminal or a pipe; see the module docstring.

    Args:
        out: where captions go.
        err: where status lines, warnings and errors go.
        as_json: print every message as one JSON line instead.
        inplace: rewrite partials in place; default: when ``out`` is a terminal.
        width: columns of the terminal (default: asked on every partial, so resizing works).
    """

    def __init__(
        self, out: TextIO, err: TextIO, as_json: bool = False, inplace: bool | None = None, width: int | None = None
    ) -> None:
        self.out, self.err, self.as_json = out, err, as_json
        self.inplace = (not as_json and out.isatty()) if inplace is None else inplace
        self._width = width
        self._partial = ""  # the partial line on screen, as written (escapes included)
        self.finals = 0

    def show(self, msg: ServerMessage) -> None:
        """Print one message from the recognizer or the server."""
        if self.as_json:
            self.out.write(msg.to_json() + "\n")
            self.out.flush()
        elif isinstance(msg, Partial):
            if self.inplace:
                self._partial = self._fit(msg.text, msg.stable)
                self.out.write(CLEAR_LINE + self._partial)
                self.out.flush()
        elif isinstance(msg, Final):
            if msg.text:
                self.out.write((CLEAR_LINE if self.inplace else "") + msg.text + "\n")
                self.out.flush()
            elif self._partial:
                self.out.write(CLEAR_LINE)
                self.out.flush()
            self._partial = ""
        elif isinstance(msg, Warning | Error):
            self.status(f"{msg.type}: {msg.code}: {msg.message}")
        elif isinstance(msg, Moved):
            self.status("the server is going away: the session resumes on another one")
        if isinstance(msg, Final):
            self.finals += 1

    def status(self, text: str) -> None:
        """One line on ``err``, without tearing the partial line apart on a shared terminal."""
        if self._partial:
            self.out.write(CLEAR_LINE)
            self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()
        if self._partial:
            self.out.write(self._partial)
            self.out.flush()

    def _fit(self, text: str, stable: str) -> str:
        """The tail of ``text`` that fits on one line (a wrapped line cannot be rewritten), unstable part dimmed."""
        width = (self._width or shutil.get_terminal_size((80, 24)).columns) - 1
        stable_len = len(stable) if text.startswith(stable) else 0
        if len(text) > width:
            cut = len(text) - (width - 1)
            text, stable_len = "…" + text[cut:], max(0, stable_len - cut) + 1
        if stable_len >= len(text):
            return text
        return text[:stable_len] + DIM + text[stable_len:] + NORMAL
