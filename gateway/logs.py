"""The service log: its format and where the request id of a line comes from.

Reads the core settings ``log_level`` and ``log_format`` (``text`` or ``json``). In JSON, each
line is one object: ``time`` (UTC, RFC 3339), ``level``, ``logger``, ``pid``, ``message``, and
``request_id`` when the line was logged while an attempt was being decided (on a chain thread,
see :data:`gateway.pool.current`; on the event loop, :data:`current_request_id`) or when the
caller passed ``extra={"request_id": ...}``;
``exception`` holds a traceback. The audit log is separate (:mod:`gateway.audit`).
"""

from __future__ import annotations

import contextvars
import functools
import importlib.metadata as md
import json
import logging
import sys
import threading
import time
from collections import Counter

from gateway import pool

__all__ = ["JsonFormatter", "MULTILINE", "RateLimitedWarning", "TEXT_FORMAT", "TextFormatter", "authgw_version",
           "printable", "problem_lines", "setup_logging"]

#: The attempt the event loop's current task is deciding (set by ``Gateway.authenticate``).
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("authgw_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


@functools.lru_cache(maxsize=1)
def authgw_version() -> str:
    """The installed distribution's version (start-up log, ``--version``, ``/healthz``)."""
    try:
        return md.version("authgw")
    except md.PackageNotFoundError:  # a source tree that is not installed
        from gateway import __version__

        return __version__


def printable(text: object) -> str:
    """*text* with every character that is not printable written as an escape (``\\n``,
    ``\\x1b``, ``\\u2028``): an attacker's value in a log line or on a terminal cannot start
    a forged line or send control sequences."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _request_id(record: logging.LogRecord) -> str | None:
    explicit = getattr(record, "request_id", None)
    if explicit:
        return str(explicit)
    working = getattr(pool.current, "arg", None)  # the attempt a chain thread is deciding
    rid = getattr(working, "request_id", None)
    return rid if isinstance(rid, str) else current_request_id.get()


class RateLimitedWarning:
    """One WARNING per kind per *every* seconds on *logger*, counting what it did not log: for
    what a client can cause at will, so that it cannot fill the log. Thread-safe (chain threads
    and the event loop may share one)."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self.logger = logger
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def due(self, kind: str) -> tuple[bool, int]:
        """``(True, times not due since the last warning)`` when a warning of *kind* is due,
        else ``(False, 0)`` (counted)."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._skipped[kind] += 1
                return False, 0
            self._last[kind] = now
            return True, self._skipped.pop(kind, 0)

    def __call__(self, kind: str, message: str, *args) -> None:
        """Log *message* if a warning of *kind* is due, with how many were not logged before it."""
        due, skipped = self.due(kind)
        if due:
            self.logger.warning(message + (f" ({skipped} more since the last warning)" if skipped else ""), *args)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (journald, Loki, Elasticsearch)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        rid = _request_id(record)
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return one_line(json.dumps(entry, ensure_ascii=False))


#: Characters valid raw in JSON that line readers split on (Python's str.splitlines(), some log
#: shippers): a value holding one made two lines of one record (review of what the gateway writes).
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def one_line(text: str) -> str:
    """*text*, one JSON document, with the line breaks JSON allows raw escaped."""
    return text if text.isascii() else text.translate(_LINE_BREAKS)


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, each message on one line: its characters that are not printable
    escaped (:func:`printable`), whatever the call site passed. Values a client chose reach log
    messages in many places (an Issuer, a header, an error's detail), and one forgotten
    ``printable`` let a ``&#10;`` in a LogoutResponse's Issuer write a line of its choosing into
    the log (review of the login door). A traceback keeps its lines, and so does a message
    logged with ``extra=MULTILINE`` (a refused configuration's problems, one a line), whose
    caller escaped each line itself."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not getattr(record, "lines", False):
            record.message = printable(record.message)
        return super().formatMessage(record)


#: ``log.error(..., extra=MULTILINE)``: the message's line breaks are meant (:class:`TextFormatter`);
#: every value in it must have been made :func:`printable` by the caller.
MULTILINE = {"lines": True}


def problem_lines(exc: BaseException) -> str:
    """*exc* for a message logged with ``extra=MULTILINE``: a configuration error's problems
    (``ConfigError.problems``: file, line, key), each made printable, several one an indented
    line; one problem, or any other exception, on the message's own line."""
    problems = getattr(exc, "problems", None) or [str(exc)]
    if len(problems) == 1:
        return printable(problems[0])
    return "\n  " + "\n  ".join(map(printable, problems))


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the service log to standard error (the journal under systemd) in *fmt*."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))
    ignore_request_warnings()


def ignore_request_warnings() -> None:
    """Drop the warnings aiohttp raises about what a client sent: a multipart part's bad
    ``Content-Disposition`` is warned with the header as sent (a password's field, say), raw on
    stderr whatever the log format, and kept in the warnings registry, one entry per distinct
    header: a public form took 4.7 KB of memory and 4 KB of log per request (review of secret
    leakage). The form is refused (400) all the same."""
    import warnings

    try:
        from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam
    except ImportError:  # an aiohttp without them warns no such thing
        return
    for category in (BadContentDispositionHeader, BadContentDispositionParam):
        warnings.filterwarnings("ignore", category=category)
