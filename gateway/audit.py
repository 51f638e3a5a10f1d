"""The audit log: one JSON line per attempt, written by a core plugin on ``gateway_auth_finished``.

Fields: ``time`` (UTC, RFC 3339), ``request_id``, ``client``, ``front_door``, ``username``,
``method`` (the credential kinds presented), ``outcome``, ``reason``, ``step``, ``from_cache``,
``subject`` (on success) and ``latency_ms``. Never a password, token, certificate or hash.

Reads ``audit.file`` (``-`` is standard error). Lines to a file are written in batches by a
writer thread: at most :data:`FLUSH_INTERVAL` seconds after the attempt (sooner when
:data:`MAX_BATCH` lines wait), and all of them on a clean stop (``gateway_shutdown`` and
``close``, which SIGTERM reaches) or interpreter exit. A process killed outright (SIGKILL, the
OOM killer, a segfault) loses at most the lines of its last :data:`FLUSH_INTERVAL`; what was
written is in the kernel and survives the process. Lines to standard error stay one ``write``
each, in order with the log records they sit between.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import stat
import sys
import threading
import time

import orjson

from gateway.model import Attempt, Decision
from gateway.registry import hookimpl

__all__ = ["AuditLog", "credential_kinds", "FLUSH_INTERVAL", "MAX_BATCH"]

FLUSH_INTERVAL = 0.1  # seconds: the most a crash (not a clean stop) can lose
MAX_BATCH = 512  # lines: wake the writer early under load, bounding the memory a batch holds


_KINDS = {(p, n, c): "+".join(kind for kind, present in (("password", p), ("negotiate", n), ("certificate", c))
                                if present) or "none"
          for p in (False, True) for n in (False, True) for c in (False, True)}


def credential_kinds(attempt: Attempt) -> str:
    """``password``, ``negotiate+certificate``... or ``none`` (a table: this runs per attempt)."""
    return _KINDS[attempt.password is not None, attempt.negotiate is not None, attempt.certificate is not None]


def encode(record: dict) -> bytes:
    """One JSON object and a newline, UTF-8. orjson: ~1 µs against ~11 µs for :mod:`json` (measured
    on this record). A string orjson refuses (a lone surrogate) falls back to escaped ASCII."""
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return (json.dumps(record, ensure_ascii=True, default=str) + "\n").encode()


class _BatchWriter:
    """Appends lines to a file descriptor from a thread of its own, a batch per ``write``.

    The hot path only appends to a list under a lock (~0.2 µs); the thread is started by the
    first line, so a runtime built only to validate a configuration (or in a master before it
    forks) never has one."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()  # guards _pending
        self._write_lock = threading.Lock()  # one flusher at a time: batches stay in order
        self._pending: list[bytes] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, line: bytes) -> None:
        with self._lock:
            if self._closed:  # as a closed file would: a line must not go astray silently
                raise ValueError("the audit log is closed")
            self._pending.append(line)
            if self._thread is None:
                self._start()
            elif len(self._pending) == MAX_BATCH:
                self._wake.set()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="authgw-audit", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            try:
                self.flush()
            except OSError as exc:  # disk full, say: report it and keep the lines for the next try
                logging.getLogger("authgw.audit").error("cannot write the audit log: %s", exc)

    def flush(self) -> None:
        with self._write_lock:
            with self._lock:
                lines, self._pending = self._pending, []
            if not lines:
                return
            data = memoryview(b"".join(lines))
            try:
                while data:
                    data = data[os.write(self._fd, data):]
            except OSError:
                rest = bytes(data)
                with self._lock:  # not lost: first in the next batch
                    self._pending.insert(0, rest)
                raise

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        if self._thread is not None:
            atexit.unregister(self.flush)
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
        try:
            self.flush()
        finally:
            os.close(self._fd)


class AuditLog:
    """Registered by the core as ``core.audit``.

    Lines are written straight to the stream (not through :mod:`logging`, whose per-record
    machinery cost more than everything else the core does for an attempt): to a file in
    batches (:class:`_BatchWriter`), to standard error one ``write`` per line under a lock so
    that lines from concurrent attempts never interleave.
    """

    def __init__(self, destination: str) -> None:
        self._writer = None if destination == "-" else _BatchWriter(self._open(destination))
        self._lock = threading.Lock()
        self._second = -1
        self._stamp = ""
        self._clients: dict = {}

    @staticmethod
    def _open(path: str) -> int:
        """Append to *path*, creating it 0600: audit lines name users and client addresses.
        An existing file keeps its mode (a log shipper may read it through its group), but one
        that others can read is reported."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o007:
            logging.getLogger("authgw.audit").warning("audit log %s is readable by others (mode %o); chmod 600 it "
                                                      "(or 640 with the log reader's group)", path, mode)
        return fd

    def _client_text(self, client) -> str:
        """``str()`` of an address costs more than a dict look-up; few clients (proxies) repeat."""
        text = self._clients.get(client)
        if text is None:
            if len(self._clients) >= 4096:  # bounded: a scan from many addresses cannot grow it
                self._clients.clear()
            text = self._clients[client] = str(client)
        return text

    def _time(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once an attempt
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        identity = decision.identity
        username = attempt.username
        line = encode({
            "time": self._time(),
            "event": "authgw.attempt",
            "request_id": attempt.request_id,
            "client": self._client_text(attempt.client),
            "front_door": attempt.front_door,
            "username": username if username is not None else (identity.username if identity else None),
            "method": credential_kinds(attempt),
            "outcome": decision.outcome.value,
            "reason": decision.reason,
            "step": decision.step,
            "from_cache": decision.from_cache,
            "subject": identity.subject if identity else None,
            "latency_ms": round((time.monotonic() - attempt.started) * 1000, 2),
        })
        if self._writer is not None:
            self._writer.add(line)
            return
        stream = sys.stderr  # looked up per line: tests and daemons swap stderr
        with self._lock:
            stream.write(line.decode())

    @hookimpl
    def gateway_shutdown(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Write every waiting line now."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
