"""The audit log: one JSON line per attempt, written by a core plugin on ``gateway_auth_finished``.

Fields: ``time`` (UTC, RFC 3339), ``request_id``, ``client``, ``front_door``, ``username``,
``method`` (the credential kinds presented), ``outcome``, ``reason``, ``step``, ``from_cache``,
``subject`` (on success) and ``latency_ms``. Never a password, token, certificate or hash.

Reads ``audit.file`` (``-`` is standard error). Lines to a file are written in batches, one
``write`` each: at most :data:`FLUSH_INTERVAL` seconds after the attempt (sooner when
:data:`MAX_BATCH` lines wait), and all of them on a clean stop (``gateway_shutdown`` and
``close``, which SIGTERM reaches) or interpreter exit. A process killed outright (SIGKILL, the
OOM killer, a segfault) loses at most the lines of its last :data:`FLUSH_INTERVAL`; what was
written is in the kernel and survives the process. Lines to standard error stay one ``write``
each, in order with the log records they sit between.

In a worker the batches are written by its event loop, not by a thread (:class:`_BatchWriter`).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import stat
import sys
import threading
import time

import orjson

from gateway.model import Attempt, Decision, address_text
from gateway.registry import hookimpl

__all__ = ["AuditLog", "credential_kinds", "FLUSH_INTERVAL", "MAX_BATCH"]

FLUSH_INTERVAL = 0.1  # seconds: the most a crash (not a clean stop) can lose
MAX_BATCH = 512  # lines: wake the writer early under load, bounding the memory a batch holds


_KINDS = {(p, n, c): "+".join(kind for kind, present in (("password", p), ("negotiate", n), ("certificate", c))
                                if present) or "none"
          for p in (False, True) for n in (False, True) for c in (False, True)}


def credential_kinds(attempt: Attempt) -> str:
    """``password``, ``negotiate+certificate``..., ``session`` (the login door's single sign-on)
    or ``none`` (a table: this runs per attempt)."""
    kinds = _KINDS[attempt.password is not None, attempt.negotiate is not None, attempt.certificate is not None]
    return "session" if attempt.session is not None and kinds == "none" else kinds


def encode(record: dict) -> bytes:
    """One JSON object and a newline, UTF-8. orjson: ~1 µs against ~11 µs for :mod:`json` (measured
    on this record). A string orjson refuses (a lone surrogate) falls back to escaped ASCII."""
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return (json.dumps(record, ensure_ascii=True, default=str) + "\n").encode()


class _BatchWriter:
    """Appends lines to a file descriptor, a batch per ``write``.

    The hot path only appends to a list under a lock (~0.2 µs). The batch is written by the
    worker's event loop once the server hands it over (:meth:`use_loop`), with a timer its first
    line sets (lines added on other threads reach it through ``call_soon_threadsafe``, once per
    batch); without one (commands, tests, a loop that has closed), by a thread of its own,
    started by the first line, so that a runtime built only to validate a configuration (or in
    a master before it forks) never has one.

    Not a thread in a worker: a thread that wakes up needs the GIL, which the loop holds nearly
    all the time and releases at every callback; the woken thread loses the race again and
    again until the switch interval forces a hand-over, and each round costs both threads CPU
    (in-process, with one GIL release per attempt: ~600 wake-ups and ~4 ms of the writer's CPU
    per batch, 8 µs an attempt; docs/performance.md). The loop's write goes to the page cache
    of a local file: ~0.2 ms per 100 KB batch, at most every :data:`FLUSH_INTERVAL` or
    :data:`MAX_BATCH` lines (``audit.file`` on a network file system would stall the loop).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()  # guards _pending
        self._write_lock = threading.Lock()  # one flusher at a time: batches stay in order
        self._pending: list[bytes] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        atexit.register(self.flush)

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write the batches from *loop* (a worker's, which runs as long as this log is open)."""
        self._loop = loop

    def add(self, line: bytes) -> None:
        with self._lock:
            if self._closed:  # as a closed file would: a line must not go astray silently
                raise ValueError("the audit log is closed")
            self._pending.append(line)
            waiting = len(self._pending)
        if waiting == 1:
            self._arrange(FLUSH_INTERVAL)
        elif waiting == MAX_BATCH:
            self._arrange(0.0)

    def _arrange(self, delay: float) -> None:
        """Have the waiting lines written within *delay* seconds."""
        loop = self._loop
        if loop is not None:
            try:
                here = asyncio.get_running_loop()
            except RuntimeError:
                here = None
            try:
                if here is not loop:
                    loop.call_soon_threadsafe(self._arrange, delay)
                elif delay > 0:
                    loop.call_later(delay, self._write_from_loop)
                else:
                    loop.call_soon(self._write_from_loop)
                return
            except RuntimeError:  # the loop has closed: the thread writes from now on
                self._loop = None
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="authgw-audit", daemon=True)
                self._thread.start()
        if delay <= 0:
            self._wake.set()

    def _write_from_loop(self) -> None:
        try:
            self.flush()
        except OSError as exc:  # disk full, say: report it; the lines are kept for the next batch
            logging.getLogger("authgw.audit").error("cannot write the audit log: %s", exc)
            self._arrange(FLUSH_INTERVAL)

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
            if not lines or self._fd < 0:  # closed: a timer that fires late writes nothing
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
        atexit.unregister(self.flush)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self.flush()
        finally:
            with self._write_lock:
                os.close(self._fd)
                self._fd = -1


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
        record = {
            "time": self._time(),
            "event": "authgw.attempt",
            "request_id": attempt.request_id,
            "client": address_text(attempt.client),
            "front_door": attempt.front_door,
            "username": username if username is not None else (identity.username if identity else None),
            "method": credential_kinds(attempt),
            "outcome": decision.outcome.value,
            "reason": decision.reason,
            "step": decision.step,
            "from_cache": decision.from_cache,
            "subject": identity.subject if identity else None,
            "latency_ms": round((time.monotonic() - attempt.started) * 1000, 2),
        }
        if identity is not None and username is not None and identity.username != username:
            # signed in under another name than the one presented (a UPN login answered with the
            # account name, a relayed login): the audit says which, so a search for either finds it
            record["signed_in_as"] = identity.username
        line = encode(record)
        if self._writer is not None:
            self._writer.add(line)
            return
        stream = sys.stderr  # looked up per line: tests and daemons swap stderr
        with self._lock:
            stream.write(line.decode())

    def use_loop(self, loop) -> None:
        """Write the file's batches from *loop*, the worker's event loop (:class:`_BatchWriter`)."""
        if self._writer is not None:
            self._writer.use_loop(loop)

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
