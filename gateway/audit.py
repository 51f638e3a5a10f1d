"""The audit log: one JSON line per attempt, written by a core plugin on ``gateway_auth_finished``.

Fields: ``time`` (UTC, RFC 3339), ``request_id``, ``client``, ``front_door``, ``username``,
``method`` (the credential kinds presented), ``outcome``, ``reason``, ``step``, ``from_cache``,
``subject`` (on success) and ``latency_ms``. Never a password, token, certificate or hash.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import threading
import time

from gateway.model import Attempt, Decision
from gateway.registry import hookimpl

__all__ = ["AuditLog", "credential_kinds"]


def credential_kinds(attempt: Attempt) -> str:
    kinds = [kind for kind, present in (("password", attempt.password), ("negotiate", attempt.negotiate),
                                        ("certificate", attempt.certificate)) if present is not None]
    return "+".join(kinds) or "none"


class AuditLog:
    """Registered by the core as ``core.audit``.

    Lines are written straight to the stream (not through :mod:`logging`, whose per-record
    machinery cost more than everything else the core does for an attempt), one ``write`` per
    line under a lock so that lines from concurrent attempts never interleave.
    """

    def __init__(self, destination: str) -> None:
        self._file = None if destination == "-" else self._open(destination)
        self._lock = threading.Lock()
        self._encode = json.JSONEncoder(ensure_ascii=False).encode
        self._second = -1
        self._stamp = ""

    @staticmethod
    def _open(path: str):
        """Append to *path*, creating it 0600: audit lines name users and client addresses.
        An existing file keeps its mode (a log shipper may read it through its group), but one
        that others can read is reported."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o007:
            logging.getLogger("authgw.audit").warning("audit log %s is readable by others (mode %o); chmod 600 it "
                                                      "(or 640 with the log reader's group)", path, mode)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")

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
            "client": str(attempt.client),
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
        line = self._encode(record) + "\n"
        stream = self._file or sys.stderr  # looked up per line: tests and daemons swap stderr
        with self._lock:
            stream.write(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
