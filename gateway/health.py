"""Honest health: backends probed off the request path, readiness decided, changes logged once.

Reads ``health.probe_interval``. One :class:`HealthWatch` per worker (per served configuration)
runs one daemon thread. Each round, at start-up and then every ``probe_interval`` seconds, it

1. calls the core's own probes (a Redis throttle store's ``PING``) and every plugin's
   ``gateway_probe`` (the I/O: ping a store, re-read a keytab, fetch a CRL), each plugin on its
   own so one that raises does not stop the others' probes;
2. asks ``gateway_readiness`` (memory only) through :meth:`Gateway.readiness
   <gateway.chain.Gateway.readiness>` and logs each component whose state *changed* since the
   last round, and a change of the gateway's own readiness, in one line per round and worker:
   a loss at WARNING, a recovery at WARNING too (operators run at WARNING and must see both).

:func:`decide` is the readiness rule (docs/design.md point 16): the gateway is ready when at
least one chain step that reports components has one ready (or an offline ``fallback`` such as
the credential cache can answer for it) and no core component that every password login needs
(the shared throttle store) is down; and, when the chain takes passwords, one of the steps
that check them (a plugin's ``credentials`` attribute says which it checks) is up too. A
component that fails while something covers it shows in the details and its plugin in
``degraded``, but does not turn ``/readyz`` false.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

from gateway.checks import ComponentState

if TYPE_CHECKING:
    from gateway.chain import Gateway

__all__ = ["HealthWatch", "Readiness", "StoreProbe", "decide", "redis_location"]

log = logging.getLogger("authgw.health")


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` says: ready, why not (a code, no URLs or paths), what is degraded."""

    ready: bool
    reason: str | None = None
    #: Plugins with a component down while the gateway stays ready (another server, step or
    #: the cache covers it, or the policy lets logins go on, as ``soft-fail`` does).
    degraded: tuple[str, ...] = ()
    components: list[ComponentState] = field(default_factory=list)


def decide(core: list[ComponentState], reports: list[tuple[str, list[ComponentState]]],
           chain: list[str], password_steps: frozenset[str] | None = None) -> Readiness:
    """The readiness rule. *core*: the core's components (each one needed by every password
    login); *reports*: (plugin name, its components) in plugin order; *chain*: the step names;
    *password_steps*: the steps that check passwords (None: any step may)."""
    components = list(core)
    serving: dict[str, bool] = {}
    fallback = False
    impaired: list[str] = []  # plugins with a component down
    for name, states in reports:
        components.extend(states)
        if not states:
            continue
        if any(s.ready and s.fallback for s in states):
            fallback = True
        if name in chain:
            serving[name] = any(s.ready for s in states) and all(s.ready for s in states if s.required)
        if not all(s.ready for s in states):
            impaired.append(name)
    steps_down = [name for name, ok in serving.items() if not ok]
    # Password logins are what a load balancer sends most of: a chain that takes them but whose
    # password steps are all down cannot serve them, even if a certificate step still can.
    password = {name: ok for name, ok in serving.items() if password_steps is None or name in password_steps}
    problems = []
    if steps_down and len(steps_down) == len(serving) and not fallback:
        problems.append(f"no ready backend: {', '.join(steps_down)}")
    elif password and not any(password.values()) and not fallback:
        problems.append(f"no ready backend for password logins: {', '.join(password)}")
    problems.extend(f"{s.name} unavailable" for s in core if not s.ready)
    if problems:
        return Readiness(False, "; ".join(problems), (), components)
    return Readiness(True, None, tuple(impaired), components)


def redis_location(url: str) -> str:
    """``scheme://host:port`` of a Redis URL, what readiness details and errors name: never the
    password the URL may carry."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}:{parts.port or 6379}"


class StoreProbe:
    """The last answer of a network store's ping, kept for readiness (memory only).

    *ping* raises on failure; its message is the detail (no secrets: stores name only their
    ``scheme://host:port``). ``None`` before the first round: reported as not ready, "not probed
    yet", which start-up never shows because the first round runs before serving."""

    def __init__(self, name: str, ping: Callable[[], str]) -> None:
        self.name = name
        self._ping = ping
        self.last: ComponentState | None = None

    def probe(self) -> None:
        try:
            detail = self._ping()
        except Exception as exc:  # noqa: BLE001 - any failure of the store is "down", with its text
            self.last = ComponentState(self.name, False, str(exc) or exc.__class__.__name__)
        else:
            self.last = ComponentState(self.name, True, detail)

    def failed(self, detail: str) -> None:
        """A real call failed between two probes: down now, until the next probe says otherwise."""
        self.last = ComponentState(self.name, False, detail)

    def state(self) -> ComponentState:
        return self.last or ComponentState(self.name, False, "not probed yet")


class HealthWatch:
    """The worker's health thread: probe, decide, log changes (see the module docstring)."""

    def __init__(self, gateway: Gateway, interval: float) -> None:
        self.gateway = gateway
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, ComponentState] = {}
        self._ready: bool | None = None

    def start(self) -> None:
        """The first round now (start-up runs before serving: ``/readyz`` is known from the
        first request), then every ``interval`` on a daemon thread."""
        self.round()
        self._thread = threading.Thread(target=self._run, name="authgw-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.round()
            except Exception:  # noqa: BLE001 - the health thread must outlive any one bad round
                log.exception("a health round raised; the next one runs in %.0fs", self.interval)

    def round(self) -> None:
        self.gateway.probe()
        self.note(self.gateway.health())

    def note(self, readiness: Readiness) -> None:
        """Log what changed since the last round, in one line (the first round: only what is
        not ready), so an outage is one WARNING line per worker and its end another."""
        changes = []
        for state in readiness.components:
            before = self._seen.get(state.name)
            self._seen[state.name] = state
            if before is None and state.ready:
                continue
            if before is None or before.ready != state.ready:
                changes.append(f"{state.name} is {'ready again' if state.ready else 'NOT ready'}: {state.detail}")
        if readiness.ready != self._ready and (self._ready is not None or not readiness.ready):
            changes.append(f"/readyz: ready{' (degraded: ' + ', '.join(readiness.degraded) + ')' if readiness.degraded else ''}"
                           if readiness.ready else f"/readyz: NOT ready ({readiness.reason})")
        self._ready = readiness.ready
        if changes:
            log.warning("health: %s", "; ".join(changes))
