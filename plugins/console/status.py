"""What the status page shows, read from the running core and never from the secrets.

* components: every plugin's ``gateway_readiness`` records (directory servers and their
  back-off, the link and its relay with its round trip, the cache store), grouped by plugin;
* certificate expiry: a component whose ``valid_until`` (the link's certificate, the relay's)
  is within ``certificate_warning_days`` is a warning;
* throttling: the core's limits;
* recent audit events: the tail of the audit file when ``audit.file`` is a file (every worker
  writes there), else the ones this worker saw; filtered by user and outcome. Audit lines hold
  no password, token or certificate by construction (gateway/audit.py), and only known fields
  are shown;
* versions of authgw and of the enabled plugins.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gateway import Attempt, Decision

__all__ = ["Expiry", "RecentEvents", "collect", "expiries"]

#: Audit fields the page shows (nothing else from a line is displayed).
FIELDS = ("time", "client", "front_door", "username", "method", "outcome", "reason", "step", "from_cache")
_TAIL_BYTES = 256 * 1024


@dataclass(frozen=True)
class Expiry:
    """A certificate a component reports, ending within the warning window (or ended)."""

    component: str
    until: str
    days_left: float


def expiries(components, warning_days: float, now: float | None = None) -> dict[str, Expiry]:
    """Components whose certificate ends within *warning_days*, by component name."""
    now = time.time() if now is None else now
    return {c.name: Expiry(c.name, datetime.fromtimestamp(c.valid_until, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           (c.valid_until - now) / 86400)
            for c in components if c.valid_until is not None and c.valid_until - now <= warning_days * 86400}


class RecentEvents:
    """The audit events this worker saw (when the audit log goes to standard error)."""

    def __init__(self, size: int) -> None:
        self._events: collections.deque[dict] = collections.deque(maxlen=max(size, 1))
        self._lock = threading.Lock()

    def add(self, attempt: Attempt, decision: Decision, stamp: str) -> None:
        event = {"time": stamp, "client": str(attempt.client), "front_door": attempt.front_door,
                 "username": attempt.username, "method": "", "outcome": decision.outcome.value,
                 "reason": decision.reason, "step": decision.step, "from_cache": decision.from_cache}
        with self._lock:
            self._events.append(event)

    def list(self) -> list[dict]:
        with self._lock:
            return list(self._events)


def audit_tail(path: Path, count: int) -> list[dict]:
    try:
        with open(path, "rb") as source:
            source.seek(0, 2)
            size = source.tell()
            source.seek(max(0, size - _TAIL_BYTES))
            data = source.read().decode("utf-8", "replace")
    except OSError:
        return []
    events = []
    for line in data.splitlines()[-count * 4:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "authgw.attempt":
            events.append({key: record.get(key) for key in FIELDS})
    return events


def collect(gateway, recent: RecentEvents, count: int, user: str = "", outcome: str = "",
            warning_days: float = 14.0) -> dict:
    import gateway as core
    from gateway.registry import discover

    _, components = gateway.readiness()
    groups: dict[str, list] = {}
    for component in components:
        groups.setdefault(component.name.split(".", 1)[0].split("[", 1)[0], []).append(component)
    audit_file = gateway.settings.audit.file
    events = audit_tail(Path(audit_file), count) if audit_file != "-" else recent.list()
    if user:
        events = [e for e in events if (e.get("username") or "").casefold() == user.casefold()]
    if outcome:
        events = [e for e in events if e.get("outcome") == outcome]
    found = discover()
    enabled = [*gateway.settings.chain, *gateway.settings.plugins]
    return {
        "groups": groups,
        "expiring": expiries(components, warning_days),
        "warning_days": warning_days,
        "throttle": gateway.settings.throttle,
        "events": list(reversed(events[-count:])) if count else [],
        "audit_source": audit_file if audit_file != "-" else "this worker (audit.file is standard error)",
        "version": core.__version__,
        "plugins": [(name, found[name].distribution, found[name].version) for name in enabled if name in found],
        "chain": gateway.settings.chain,
    }
