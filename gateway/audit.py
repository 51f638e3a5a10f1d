"""The audit log: one JSON line per attempt, written by a core plugin on ``gateway_auth_finished``.

Fields: ``time`` (UTC, RFC 3339), ``request_id``, ``client``, ``front_door``, ``username``,
``method`` (the credential kinds presented), ``outcome``, ``reason``, ``step``, ``from_cache``,
``subject`` (on success) and ``latency_ms``; ``signed_in_as`` and ``answered_by`` only when
they say something. Never a password, token, certificate or hash.

Reads ``audit.file`` (``-`` is standard error). Each line is written, one ``write``, before
the attempt is answered (:class:`_LineWriter`): a process killed outright (SIGKILL, the OOM
killer, the watchdog, a segfault) has lost no line of an attempt it answered. Lines to standard
error are one ``write`` each too, in order with the log records they sit between.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import stat
import sys
import threading
import time
from collections import deque

import orjson

from gateway.model import API_CLIENT_KEY, FORWARDED_CERTIFICATE_KEY, Attempt, Decision, address_text
from gateway.registry import hookimpl

__all__ = ["AuditLog", "credential_kinds", "MAX_PENDING"]

#: Lines kept in memory while the audit file refuses writes (disk full); older ones are dropped.
MAX_PENDING = 100_000

_log = logging.getLogger("authgw.audit")


_KINDS = {(p, n, c): "+".join(kind for kind, present in (("password", p), ("negotiate", n), ("certificate", c))
                                if present) or "none"
          for p in (False, True) for n in (False, True) for c in (False, True)}


def credential_kinds(attempt: Attempt) -> str:
    """``password``, ``negotiate+certificate``..., ``session`` (the login door's single sign-on)
    or ``none`` (a table: this runs per attempt). A certificate is the TLS handshake's or one a
    trusted proxy forwarded (:data:`~gateway.model.FORWARDED_CERTIFICATE_KEY`)."""
    certificate = attempt.certificate is not None or attempt.stash.get(FORWARDED_CERTIFICATE_KEY, False)
    kinds = _KINDS[attempt.password is not None, attempt.negotiate is not None, certificate]
    return "session" if attempt.session is not None and kinds == "none" else kinds


def encode(record: dict) -> bytes:
    """One JSON object and a newline, UTF-8. orjson: ~1 µs against ~11 µs for :mod:`json` (measured
    on this record). A string orjson refuses (a lone surrogate) falls back to escaped ASCII."""
    try:
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return (json.dumps(record, ensure_ascii=True, default=str) + "\n").encode()
    if line.isascii():  # nearly always
        return line
    # U+0085, U+2028, U+2029 are valid raw in JSON, and line readers split on them (Python's
    # splitlines(), some shippers): a directory's display name made two lines of one record
    return line.replace(b"\xc2\x85", b"\\u0085").replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")


class _LineWriter:
    """Appends each line to a file descriptor with one ``write``, when the attempt is told
    (``gateway_auth_finished`` runs before the attempt's answer is written): an answer that
    left has its line in the kernel, which keeps it whatever happens to the process next
    (SIGKILL, the OOM killer, the watchdog, a segfault). A ``write`` to a local file's page
    cache costs ~1.2 µs; the batches this replaced saved less than that per line, and lost up to
    the last 100 ms of lines (accepted logins among them) when a worker was killed.

    A write the file refuses (disk full) keeps the line, and those after it, in order, for the
    next line's write, :meth:`flush` and exit; so does one it takes in part, its start blanked
    out where it is (:meth:`_blank`); the error is logged when writes start failing
    and when they work again, not per line. At most :data:`MAX_PENDING` lines are kept: older
    ones are dropped, and counted in the log.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()  # one writer at a time: lines stay whole and in order
        self._pending: deque[bytes] = deque()  # not written yet: oldest first
        self._failing = False
        self._torn = False  # the first waiting line is the rest of one partly written
        self._dropped = 0
        atexit.register(self.flush)

    def add(self, line: bytes) -> None:
        with self._lock:
            if self._fd < 0:  # as a closed file would: a line must not go astray silently
                raise ValueError("the audit log is closed")
            self._pending.append(line)
            self._write_pending()

    def _write_pending(self) -> None:
        """Write the waiting lines, oldest first; the lock is held."""
        pending = self._pending
        while pending:
            line = pending[0]
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                self._refused(exc)
                return
            if written < len(line):  # short: the disk filled up mid-line
                if not written or self._blank(written):  # the line waits whole, as one refused
                    self._refused(OSError(errno.ENOSPC, "a line was written in part (disk full); its start "
                                                        "was blanked out"))
                    return
                pending[0] = line[written:]  # its start could not be blanked out: the rest goes first
                self._torn = True
            else:
                pending.popleft()
                self._torn = False
        if self._failing:
            self._failing = False
            _log.warning("the audit log takes writes again: the lines kept meanwhile are written%s",
                         f", but the {self._dropped} oldest of them were dropped" if self._dropped else "")
            self._dropped = 0

    def _blank(self, written: int) -> bool:
        """Overwrite the *written* bytes this writer appended last with spaces and a newline, where
        they are: JSON whitespace, a blank line to a line reader, whatever was appended after them
        meanwhile. Left as they were, another worker's line was glued to the torn start and this
        line's rest came after it: two records that did not parse (review of the audit and static
        users). Cut off the file instead (``ftruncate`` while ``fstat`` said they still ended it),
        a line another worker appended between the two was cut with them: an answered attempt
        with no line (left from that review; reproduced by holding the worker in ``ftruncate``).
        Written in place, not cut, no lock is needed, on this rare path or on the hot one.
        Through a description of the file's own: ``pwrite`` on an ``O_APPEND`` one appends
        (pwrite(2), BUGS); ``/proc/self/fd`` names the file this one writes, renamed or not."""
        try:
            end = os.lseek(self._fd, 0, os.SEEK_CUR)  # O_APPEND: where this write ended
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size < end:  # cut short since (logrotate's copytruncate): the start went with it
                return True
            return os.pwrite(fd, b" " * (written - 1) + b"\n", end - written) == written
        except OSError:
            return False
        finally:
            os.close(fd)

    def _refused(self, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            _log.error("cannot write the audit log: %s; its lines are kept in memory (up to %d) until it "
                       "takes them", exc, MAX_PENDING)
        excess = len(self._pending) - MAX_PENDING
        if excess > 0:
            head = self._pending.popleft() if self._torn else None  # its start is in the file: kept
            for _ in range(excess):
                self._pending.popleft()
            if head is not None:
                self._pending.appendleft(head)
            if not self._dropped:
                _log.error("the audit log still refuses writes: dropping its oldest waiting lines")
            self._dropped += excess

    def flush(self) -> None:
        """Write the lines a refused write kept, if the file takes them now; at exit, say how
        many it still refused (they are lost)."""
        with self._lock:
            if self._pending and self._fd >= 0:
                self._write_pending()
                self._say_lost()

    def _say_lost(self) -> None:
        """The lines still waiting (and those dropped before) when the file is left: counted in
        the service log, the one record of them. They went without a word (review of
        reliability: 13 attempts answered, 12 lines in the file after a full disk)."""
        lost = len(self._pending) + self._dropped
        if lost:
            _log.error("the audit log still refuses writes at exit or reload: %d line(s) of answered attempts are "
                       "lost", lost)

    def close(self) -> None:
        atexit.unregister(self.flush)
        with self._lock:
            if self._fd < 0:
                return
            if self._pending:
                self._write_pending()
                self._say_lost()
            os.close(self._fd)
            self._fd = -1


class AuditLog:
    """Registered by the core as ``core.audit``.

    Lines are written straight to the stream (not through :mod:`logging`, whose per-record
    machinery cost more than everything else the core does for an attempt): one ``write`` per
    line, to a file (:class:`_LineWriter`) or to standard error, under a lock so that lines
    from concurrent attempts never interleave.
    """

    def __init__(self, destination: str, *, create: bool = True) -> None:
        """*create*: open (and create) the file now, as ``authgw serve`` does, so that a file it
        cannot write stops it at start. Commands that only read the configuration (``config
        check``, ``config show``, ``check``, plugin commands) open it at their first line, if
        any: run with sudo, they created the file root-owned before the service's first start
        (review of what the gateway writes)."""
        self._destination = destination
        self._writer = _LineWriter(self._open(destination)) if create and destination != "-" else None
        self._lock = threading.Lock()
        self._second = -1
        self._stamp = ""

    @staticmethod
    def _open(path: str) -> int:
        """Append to *path*, creating it 0600: audit lines name users and client addresses.
        An existing file keeps its mode (a log shipper may read it through its group), but one
        that others can read is reported."""
        try:
            # Non-blocking: a FIFO put where the log goes was waited on for a reader, and start-up
            # or a reload hung with it (review of the supervisor); it is refused below.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o600)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads
                raise OSError(exc.errno, "the audit log is a FIFO, not a regular file: set audit.file to a file, "
                                         "or - for standard error", path) from None
            if exc.errno != errno.ELOOP:
                raise
            # Not followed: a link planted where the log goes (a directory a log group can write
            # to) would have the gateway append to whatever file of its user the link names.
            raise OSError(exc.errno, "the audit log is a symbolic link, which is not followed: set audit.file "
                                     "to the file it names", path) from None
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISCHR(info.st_mode)):  # (/dev/null is a device)
            os.close(fd)
            raise OSError(errno.EINVAL, "the audit log is not a regular file: set audit.file to a file, or - for "
                                        "standard error", path)
        os.set_blocking(fd, True)  # each line one whole write, as before
        mode = stat.S_IMODE(info.st_mode)
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
        api_client = attempt.stash.get(API_CLIENT_KEY, None)
        if api_client is not None:  # which service called /v1/authenticate (its token's name)
            record["api_client"] = api_client
        if decision.answered_by:
            # which of the step's backends answered (a relay's connector, by the id the relay
            # enrolled and linked it under): the one to revoke when it vouched falsely
            record["answered_by"] = decision.answered_by
        line = encode(record)
        writer = self._writer
        if writer is None and self._destination != "-":
            writer = self._open_late()
        if writer is not None:
            writer.add(line)
            return
        stream = sys.stderr  # looked up per line: tests and daemons swap stderr
        with self._lock:
            stream.write(line.decode())

    def _open_late(self) -> _LineWriter:
        with self._lock:
            if self._writer is None:
                self._writer = _LineWriter(self._open(self._destination))
            return self._writer

    @hookimpl
    def gateway_shutdown(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Write the lines a refused write kept, if the file takes them now."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
