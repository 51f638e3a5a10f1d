"""The audit log: one JSON line per attempt, written by a core plugin on ``gateway_auth_finished``.

Fields: ``time`` (UTC, RFC 3339), ``request_id``, ``client``, ``front_door``, ``username``,
``method`` (the credential kinds presented), ``outcome``, ``reason``, ``step``, ``from_cache``,
``subject`` (on success) and ``latency_ms``. Never a password, token, certificate or hash.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone

from gateway.model import Attempt, Decision
from gateway.registry import hookimpl

__all__ = ["AuditLog", "credential_kinds"]


def credential_kinds(attempt: Attempt) -> str:
    kinds = [kind for kind, present in (("password", attempt.password), ("negotiate", attempt.negotiate),
                                        ("certificate", attempt.certificate)) if present is not None]
    return "+".join(kinds) or "none"


class _StandardError(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is written, not when it was built."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class AuditLog:
    """Registered by the core as ``core.audit``."""

    def __init__(self, destination: str) -> None:
        self.logger = logging.getLogger("authgw.audit")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
        handler = _StandardError() if destination == "-" else logging.FileHandler(destination)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": "authgw.attempt",
            "request_id": attempt.request_id,
            "client": str(attempt.client),
            "front_door": attempt.front_door,
            "username": attempt.username if attempt.username is not None
            else (decision.identity.username if decision.identity else None),
            "method": credential_kinds(attempt),
            "outcome": decision.outcome.value,
            "reason": decision.reason,
            "step": decision.step,
            "from_cache": decision.from_cache,
            "subject": decision.identity.subject if decision.identity else None,
            "latency_ms": round((time.monotonic() - attempt.started) * 1000, 2),
        }
        self.logger.info(json.dumps(record, ensure_ascii=False))

    def close(self) -> None:
        for handler in self.logger.handlers:
            handler.close()
