"""Running an attempt through the chain: deadline, fail-closed handling, folding, notification.

Layers of one attempt, outermost first::

    Gateway.authenticate      throttle (counted before the chain), deadline, failure timing
      gateway_precheck        on the event loop: an answer for one step (a hot cache hit)
      wrappers (plugins:)     e.g. the credential cache, policies; they see every decision
        ChainFolder           innermost wrapper: exception -> ERROR deny; no decision -> fold notes
          PrecheckStandIn     on a precheck answer: the steps before the answered one, then it
          chain steps         in the operator's order, firstresult

A precheck answer saves only the work of the step it stands for (the directory bind): the
steps before that step and every wrapper still see the attempt, so a policy (a deny list, a
group rule) is never skipped by a cache.

Where the chain runs: on the pool's threads (plugins block), except for a precheck answer that
leaves nothing blocking to run. When the answered step is the chain's first (or the answer stands
for the whole chain) and every ``gateway_authenticate`` wrapper is marked :func:`loop_safe`, the
wrappers run on the event loop, as ``gateway_precheck`` does: a hot cache hit then costs no
thread hand-off (about half of its CPU, docs/performance.md). And when every chain step is
``loop_capable`` (its waits go through :mod:`gateway.aio`: the ldap plugin) and every wrapper is
``loop_safe(live=True)``, the whole chain runs on the event loop in a greenlet per attempt, up to
``threads`` at a time: an LDAP login then costs no hand-off either. The deadline and a client
that hung up are checked as a chain thread would check them; throttling, failure timing and the
audit are the same code on every path. Reads ``deadline``, ``threads``, ``limits.queue``,
``limits.queue_wait``, ``failure_timing`` and ``throttle``.

A network throttle store (Redis) is called on threads of its own (``threads`` of them, never the
loop's default executor), and the attempt waits for it until its deadline at most: a store that
does not answer in time refuses the attempt (503, ``throttle_unavailable``), and a call whose
attempt gave up while it waited is not made. A call that never got a thread by then is this
worker's burst, not the store's fault: ``overloaded``, nothing said of the store. An outage is
logged at ERROR once, then summed up every minute until the store answers again.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import threading
import time
import types
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterable

import pluggy

from gateway import aio, logs
from gateway.checks import CheckResult, ComponentState, Listener, Route, SelfTest
from gateway.errors import PluginLoadError
from gateway.failtiming import FailureTiming
from gateway.health import HealthWatch, Readiness, StoreProbe, decide
from gateway.model import Attempt, Decision, IPAddress, Outcome
from gateway.pool import Abandoned, ChainPool, DeadlineExpired, Overloaded
from gateway.registry import Planned, hookimpl, one_by_one
from gateway.settings import GatewaySettings
from gateway.stash import StashKey
from gateway.throttle import StoreLocked, StoreUnavailable, Throttle

__all__ = ["AFTER_THE_CHAIN", "PRECHECK_STEP", "SERVICE_CALLER", "ChainFolder", "Gateway", "PrecheckStandIn", "fold", "loop_safe", "may_run_on_loop",
           "stands_for"]

log = logging.getLogger("authgw.chain")

#: Characters no response header may carry (and that, taken out, would make another name): the
#: set gateway/http/app.py's ``_UNSAFE`` keeps out of ``Remote-*`` (C0, DEL, C1, U+2028, U+2029).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: The decision an attempt was first told with (in a 1-tuple, unique to that call).
_TOLD: StashKey[tuple] = StashKey()
#: A header value: no control character (CR or LF would end the header; gateway/http/app.py).
_PRINTABLE_HEADER = re.compile(r"[^\x00-\x1f\x7f]*")
#: The arguments of gateway_auth_finished, as an implementation that takes both declares them.
_FINISHED_ARGS = ("attempt", "decision")
#: Refusals held back to the common failure time (gateway/failtiming.py).
_REFUSALS = frozenset({Outcome.INVALID_CREDENTIALS, Outcome.USER_NOT_FOUND, Outcome.ACCOUNT_STATE})
#: An attempt given up before it ran, or before its costly part: its client hung up, or its
#: deadline passed (:mod:`gateway.pool`). Decisions are immutable: one of each serves every attempt.
_CLIENT_GONE = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="client_gone")
#: A request cancelled by the server while its chain ran: a stop, or a reload, whose grace ran out.
_CANCELLED = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="cancelled")
_DEADLINE_EXCEEDED = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="deadline_exceeded")
#: The ``gateway_precheck`` answer of an attempt, for :class:`PrecheckStandIn`.
PRECHECKED: StashKey[Decision] = StashKey()
#: Set by a front door whose attempt comes from a service acting for many users (a connector's
#: link, for a login a relay received at its API): no per-client throttle on that service.
SERVICE_CALLER: StashKey[bool] = StashKey()
#: Set by a ``gateway_precheck`` implementation beside its success: the chain step that decided
#: when the identity was remembered, which the answer stands in for (:func:`stands_for`).
PRECHECK_STEP: StashKey[str] = StashKey()
#: A :data:`PRECHECK_STEP` that stands for no step: every chain step is asked first, and the
#: answer decides only when none does. The login door's session reuse: it sets
#: :data:`PRECHECKED` itself, on an attempt whose only credential is the session
#: (:class:`~gateway.model.SessionCredential`), so deny lists and wrappers see single sign-on.
AFTER_THE_CHAIN = "*"


#: Throttle store calls a worker queues at least (``limits.queue`` if larger): a call's wait is
#: bounded by its attempt's deadline, the queue only by memory.
_STORE_QUEUE = 4096


class _StoreOutage:
    """Logs a throttle store outage: its first failure at ERROR, then a summary at most every
    :attr:`EVERY` seconds while it lasts, and its end at WARNING. One line per refused attempt
    flooded the log of a gateway under attack exactly when its store was down. Thread-safe."""

    EVERY = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic start of the outage, None while the store answers
        self._next = 0.0
        self._refused = self._unsettled = 0  # since the last line
        self._total = 0  # refused attempts in the whole outage

    def failed(self, request_id: str, detail: str, *, refused: bool = True) -> None:
        """A call failed: *refused*, an attempt was answered 503; else a reservation may be
        kept that should have been given back."""
        now = time.monotonic()
        with self._lock:
            if refused:
                self._refused += 1
                self._total += 1
            else:
                self._unsettled += 1
            if self._since is None:
                self._since, self._next = now, now + self.EVERY
                self._refused = self._unsettled = 0
                first = True
            elif now >= self._next:
                self._next = now + self.EVERY
                refused_n, unsettled_n = self._refused, self._unsettled
                self._refused = self._unsettled = 0
                first = False
            else:
                return
        if first:
            log.error("throttle store unavailable; %s (fail closed): %s. Logged once per outage, then summed up "
                      "every %.0f s until the store answers again",
                      f"password attempt {request_id} refused, and every password attempt until it answers"
                      if refused else f"attempt {request_id} not settled", detail, self.EVERY)
        else:
            log.error("throttle store still unavailable: %d password attempt(s) refused (503) and %d not settled "
                      "in the last %.0f s: %s", refused_n, unsettled_n, self.EVERY, detail)

    def answered(self) -> None:
        """The store answered: the end of an outage, if there was one."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._since is None:
                return
            lasted, total = time.monotonic() - self._since, self._total
            self._since, self._total = None, 0
        log.warning("throttle store answers again after %.0f s; %d password attempt(s) were refused meanwhile",
                    lasted, total)


class _StoreBusy(StoreUnavailable):
    """The throttle store's calls of this worker are queued beyond what the attempt can wait for
    (a burst of logins, not the store failing): the attempt is refused as ``overloaded``, and
    nothing is said of the store (no outage logged, ``/readyz`` unchanged)."""


class _Handover:
    """A ticket reserved on a store thread, and whether its attempt still waits for it: a
    reservation made after the attempt gave up (its deadline) is given back, not kept as a guess."""

    __slots__ = ("_lock", "_state", "_ticket")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "waiting"
        self._ticket = None

    def deliver(self, ticket) -> bool:
        """On the store thread: False when the attempt gave up (the caller gives *ticket* back)."""
        with self._lock:
            if self._state == "gave_up":
                return False
            self._state, self._ticket = "delivered", ticket
            return True

    def give_up(self):
        """On the loop: the ticket already delivered (to give back), or None."""
        with self._lock:
            ticket = self._ticket if self._state == "delivered" else None
            self._state = "gave_up"
            return ticket


def stands_for(attempt: Attempt, answer: Decision) -> str | None:
    """The chain step a precheck *answer* stands in for: :data:`PRECHECK_STEP` when the plugin
    set it, else the remembered identity's ``method``; None for a deny (it stands for all)."""
    if answer.identity is None:
        return None
    return attempt.stash.get(PRECHECK_STEP, None) or answer.identity.method
#: Set by a front door: says, cheaply and from any thread, that the attempt's client has gone
#: (its connection closed), so a chain thread drops the attempt unrun (gateway/pool.py).
CLIENT_GONE: StashKey[Callable[[], bool]] = StashKey()


def loop_safe(function=None, *, live: bool = False):
    """Mark a ``gateway_authenticate`` wrapper as one that never blocks for an attempt
    ``gateway_precheck`` answered: for such an attempt (it sees that answer, or an ``ERROR``
    deny) it does no I/O, no slow computation and waits for no lock held across either. When
    every wrapper is marked, pre-checked attempts skip the chain threads (see the module
    docstring); one unmarked wrapper (any third-party one) keeps them on the pool.

    ``@loop_safe(live=True)``: never blocks for any attempt, so a chain whose steps are all
    ``loop_capable`` may run on the event loop with this wrapper around it."""
    def mark(fn):
        fn.__authgw_loop_safe__ = True
        if live:
            fn.__authgw_loop_live__ = True
        return fn

    return mark(function) if function is not None else mark


def may_run_on_loop(impl: pluggy.HookImpl) -> bool:
    """Whether a hook implementation may run on the event loop for a live attempt: a wrapper
    marked ``loop_safe(live=True)``, or any other of a ``loop_capable`` plugin."""
    if impl.wrapper or impl.hookwrapper:
        return getattr(impl.function, "__authgw_loop_live__", False)
    return isinstance(impl.plugin, PrecheckStandIn) or getattr(impl.plugin, "loop_capable", False) is True


def fold(attempt: Attempt) -> Decision:
    """The result when every step passed (DESIGN.md section 3): UNAVAILABLE over USER_NOT_FOUND
    over NOT_APPLICABLE. The first note of the winning kind names the step and reason (and
    who answered so, for the audit line)."""
    for outcome in (Outcome.UNAVAILABLE, Outcome.USER_NOT_FOUND):
        for note in attempt.notes:
            if note.outcome is outcome:
                return Decision.deny(outcome, step=note.step, reason=note.reason, answered_by=note.answered_by)
    return Decision.deny(Outcome.NOT_APPLICABLE, step="", reason="no_applicable_credentials")


class ChainFolder:
    """The core's innermost ``gateway_authenticate`` wrapper (registered as ``core.chain``)."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._code_owner: dict[types.CodeType, str] | None = None

    def culprit(self, exc: BaseException) -> str:
        """The name of the plugin whose hook raised *exc*, found from the traceback.

        The innermost hook frame wins. A frame is matched by its ``self`` (two steps may be
        instances of one class) and else by its code object (module-level hook functions).
        """
        if self._code_owner is None:
            owners: dict[types.CodeType, str] = {}
            for plugin_name, plugin in self._pm.list_name_plugin():
                for attr in dir(plugin):
                    if not attr.startswith("gateway_"):  # before getattr: a property may raise
                        continue
                    try:
                        code = getattr(getattr(plugin, attr, None), "__code__", None)
                    except Exception:  # noqa: BLE001 - not a hook function, whatever it is
                        continue
                    if isinstance(code, types.CodeType):
                        owners[code] = plugin_name
            self._code_owner = owners
        by_identity = {id(plugin): plugin_name for plugin_name, plugin in self._pm.list_name_plugin()}
        name = "unknown"
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            owner = self._code_owner.get(frame.f_code)
            if owner is not None:
                name = by_identity.get(id(frame.f_locals.get("self")), owner)
            tb = tb.tb_next
        return name

    @loop_safe(live=True)
    @hookimpl(wrapper=True, trylast=True)
    def gateway_authenticate(self, attempt: Attempt):
        try:
            decision = yield
        except (Abandoned, asyncio.CancelledError):
            # A step saw its attempt given up before costly work (pool.check_wanted), or, on the
            # event loop, the request's task was cancelled while a step waited (gateway.aio).
            return _CLIENT_GONE
        except DeadlineExpired:
            return _DEADLINE_EXCEEDED
        except BaseException as exc:  # SystemExit too: a plugin never ends the worker (issue 10)
            step = self.culprit(exc)
            log.error("plugin %r raised %s during attempt %s; denied (fail closed)",
                      step, exc.__class__.__name__, attempt.request_id, exc_info=exc)
            return Decision.deny(Outcome.ERROR, step=step, reason="internal_error")
        if decision is None:
            return fold(attempt)
        if not isinstance(decision, Decision):
            log.error("a chain step returned %r instead of a Decision; denied", type(decision).__name__)
            return Decision.deny(Outcome.ERROR, step="unknown", reason="internal_error")
        return _vetted(attempt, decision)


#: The success :func:`_vetted` last passed for an attempt: :meth:`Gateway.decide` checks only a
#: decision a wrapper made after the fold (a hot hit's identity is not checked twice).
_VETTED: StashKey[Decision] = StashKey()


def _vetted(attempt: Attempt, decision: Decision) -> Decision:
    """*decision*, or an ``ERROR`` deny when it signs in an identity no header can carry.

    Checked where the steps' decision leaves the fold (so no wrapper, the cache included, sees or
    remembers such an identity) and again on what the wrappers return: a policy wrapper that
    rewrote a success with a group that is a number had it audited and answered with a 500, and
    one with an empty username or a line feed in it a 200 with an empty ``Remote-User`` (review
    of the front door)."""
    identity = decision.identity
    if identity is None or attempt.stash.get(_VETTED, None) is decision:
        return decision
    if shape := identity.shape_error():
        # A third party's: the built-in plugins give the documented shape. Before, the
        # success was audited and the answer was a 500 (groups holding a number).
        log.error("step %r signed in an identity with %s; denied (fail closed)", decision.step, shape)
        return Decision.deny(Outcome.ERROR, step=decision.step, reason="malformed_identity")
    name = identity.username
    if not name or name[0].isspace() or name[-1].isspace() or (not name.isprintable() and _CONTROL.search(name)):
        # No header can carry it: without its control characters it would name another user,
        # and white space at its ends is not part of a header's value (RFC 9110 section 5.5), so
        # a directory entry found by its mail whose uid is "admin " reached the application
        # behind nginx as admin (review of the front door). An empty Remote-User is one some
        # proxies fill with the client's own. A typed name is refused or trimmed before the
        # chain; this is a directory's, a principal's or a certificate's.
        log.error("step %r signed in a username no header can carry: empty, with white space at an end or "
                  "holding a control character (%r); denied (fail closed)", decision.step, name)
        return Decision.deny(Outcome.ERROR, step=decision.step, reason="unrepresentable_username")
    if not name.isascii() and not unicodedata.is_normalized("NFKC", name):
        # A directory's uid "ａｄｍｉｎ" (full width) is found by a typed "admin": LDAP matches
        # names in NFKC (RFC 4518), so it is the same name to slapd. Signed in as spelt, it reached
        # an application that folds names (Django's normalize_username, any NFKC lookup) as
        # admin. A typed name is in NFKC before the chain; this is a directory's, a principal's or
        # a certificate's, and its entry is to be fixed, not guessed at.
        log.error("step %r signed in a username not in Unicode normal form KC (%r, %r in that form), which "
                  "directories and applications take for that other spelling; denied (fail closed)",
                  decision.step, name, unicodedata.normalize("NFKC", name))
        return Decision.deny(Outcome.ERROR, step=decision.step, reason="unnormalised_username")
    attempt.stash[_VETTED] = decision
    return decision


class PrecheckStandIn:
    """Registered by the core as ``core.precheck``: puts a ``gateway_precheck`` answer in the
    chain at the place of the step it stands for.

    The first non-wrapper implementation called (``tryfirst``; chain steps may not use it). For
    an attempt with a precheck answer it calls the chain steps *before* the step that proved the
    remembered identity (:func:`stands_for`) in order, and returns the first decision of theirs,
    else the answer; that step and the ones after it are not called. A deny stands for the
    whole chain. A success for no step of this chain is not used: the chain runs as without an
    answer (it stood for the whole chain before, so a hot hit relayed from a connector, whose
    identity names the connector's step, skipped the relay hub's deny list). An answer standing
    for :data:`AFTER_THE_CHAIN` comes after every step: each is asked first, and only its
    refusals count (a success of a step is not who signed in). The wrappers
    around see the result either way. Without an answer it returns None at once.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        #: The chain steps in the order pluggy calls them, and their names.
        self._steps = Planned(pm, self._chain_steps)

    def _chain_steps(self) -> tuple[list[pluggy.HookImpl], frozenset[str]]:
        steps = [impl for impl in reversed(self._pm.hook.gateway_authenticate.get_hookimpls())
                 if not (impl.wrapper or impl.hookwrapper) and impl.plugin is not self]
        return steps, frozenset(impl.plugin_name for impl in steps)

    @hookimpl(tryfirst=True)
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        answer = attempt.stash.get(PRECHECKED, None)
        if answer is None:
            return None
        if answer.identity is None:  # a deny: for every step
            return answer
        steps, names = self._steps.get()
        step = stands_for(attempt, answer)
        if step not in names and step != AFTER_THE_CHAIN:
            return None  # for no step of this chain: the chain decides, as without an answer
        for impl in steps:
            if impl.plugin_name == step:
                break
            # A policy step before the directory: still asked (with the arguments it declares,
            # as pluggy would call it).
            decision = impl.function(*(attempt for _name in impl.argnames))
            if decision is not None and not (step == AFTER_THE_CHAIN and decision.success):
                return decision
            # (after the chain, only refusals count: the answer is who signed in)
        return answer


class Gateway:
    """The core, as the front doors use it: one per worker process."""

    def __init__(self, settings: GatewaySettings, pm: pluggy.PluginManager, plugins: dict[str, Any],
                 folder: ChainFolder, *, state_dir: Path | None = None, workers: int | None = None) -> None:
        """*workers*: the worker processes actually run (``authgw serve --workers``), else
        ``workers:``; it decides the throttle store of ``store: auto``."""
        self.settings = settings
        self.pm = pm
        self.plugins = plugins
        self.folder = folder
        self.throttle = Throttle(settings.throttle, state_dir=state_dir, workers=workers or settings.workers)
        #: A network throttle store's calls: threads of their own, a bounded queue (module docstring).
        # Its queue is long (a page of a hundred assets behind Basic auth is a hundred checks at
        # once): what bounds a call's wait is the attempt's deadline, not the queue.
        # A local store's calls run on the loop, and on these threads only when the SQLite file's
        # lock is held by another process (StoreLocked): the threads start at the first call.
        self._store_pool = ChainPool(settings.threads, name="authgw-throttle",
                                     max_queue=max(_STORE_QUEUE, settings.limits.queue or 0))
        self._outage = _StoreOutage()
        timing = settings.failure_timing
        self.failure_timing = FailureTiming(enabled=timing.enabled, floor=timing.floor,
                                            percentile=timing.percentile, max_floor=timing.max_floor)
        self.pool = ChainPool(settings.threads, max_queue=settings.limits.queue,
                              max_wait=settings.limits.queue_wait)
        self.unready_reason: str | None = None  # set by readiness()
        self.degraded: tuple[str, ...] = ()  # set by readiness()
        self.shutting_down: str | None = None  # the plugin in its gateway_shutdown, during shutdown()
        ping = getattr(self.throttle.store, "ping", None)  # a shared store: every password login needs it
        self.throttle_probe = StoreProbe("gateway.throttle_store", ping) if ping else None
        self.health_watch = HealthWatch(self, settings.health.probe_interval)
        # The chain steps that can serve password logins (a plugin without ``credentials`` is
        # taken to): readiness needs one of them up. Fixed here, as the chain is: a reload builds
        # a new Gateway, so health() need not work it out again on every call.
        self._password_steps = frozenset(name for name in settings.chain
                                         if "password" in getattr(pm.get_plugin(name), "credentials", ("password",)))
        if pm.get_plugin("core.precheck") is None:
            pm.register(PrecheckStandIn(pm), name="core.precheck")
        #: kind -> whether such attempts run on the loop, for the registrations as they are
        self._on_loop: Planned = Planned(pm, dict)
        #: The (function, plugin, arguments) calls that tell a decision (gateway_auth_finished).
        self._finished = Planned(pm, self._plan_finished)
        #: The gateway_precheck implementations as (function, takes the attempt) in pluggy's
        #: order, or None to call the hook through pluggy (a wrapper, a monitor).
        self._prechecks = Planned(pm, self._plan_precheck)
        self._live_running = 0  # attempts in _run_live_on_loop

    def _loop_verdict(self, kind: tuple, decide: Callable[[list], bool]) -> bool:
        """``decide(implementations)`` of ``gateway_authenticate``, remembered per *kind* until
        the registrations change (a plugin registered later is seen)."""
        verdicts = self._on_loop.get()
        known = verdicts.get(kind)
        if known is None:
            known = decide(self.pm.hook.gateway_authenticate.get_hookimpls())
            if len(verdicts) >= 64:  # bounded: the steps an answer may name are few
                verdicts.clear()
            verdicts[kind] = known
        return known

    def runs_on_loop(self, answer: Decision, step: str | None = None) -> bool:
        """Whether an attempt with the precheck *answer*, standing for chain *step*
        (:func:`stands_for`; None for a deny), runs its chain on the event loop: no step is asked
        before the answered one, and every wrapper is :func:`loop_safe`."""
        if step is None and answer.identity is not None:
            step = answer.identity.method
        # as PrecheckStandIn decides which steps it still asks

        def decide(impls: list) -> bool:
            steps = [i for i in reversed(impls) if not (i.wrapper or i.hookwrapper)
                     and not isinstance(i.plugin, PrecheckStandIn)]
            names = [i.plugin_name for i in steps]
            if step is not None and step not in names:
                return False  # the answer is not used: the whole chain runs, on the pool
            before = names[:names.index(step)] if step in names else []
            return not before and all(
                getattr(getattr(i.plugin, "gateway_authenticate", None), "__authgw_loop_safe__", False)
                for i in impls if i.wrapper or i.hookwrapper)

        return self._loop_verdict(("answer", step), decide)

    def live_on_loop(self) -> bool:
        """Whether an attempt runs its whole chain on the event loop (:meth:`_run_live_on_loop`):
        every chain step is ``loop_capable`` (its waits go through :mod:`gateway.aio`) and every
        wrapper is :func:`loop_safe` with ``live=True``."""
        return self._loop_verdict(("live",), lambda impls: all(map(may_run_on_loop, impls)))

    # -- per attempt ----------------------------------------------------------------------------

    def decide(self, attempt: Attempt) -> Decision:
        """Run the chain synchronously (on a worker thread). Never raises, never returns None."""
        try:
            decision = self.pm.hook.gateway_authenticate(attempt=attempt)
        except BaseException as exc:  # a wrapper raised outside the ChainFolder (SystemExit too)
            return self._crashed(exc, attempt, "around the chain")
        if not isinstance(decision, Decision):  # a wrapper's: the fold answers a Decision
            log.error("a plugins: wrapper returned %r instead of a Decision; denied (fail closed)",
                      type(decision).__name__)
            return Decision.deny(Outcome.ERROR, step="unknown", reason="internal_error")
        return _vetted(attempt, decision)  # a wrapper's success too

    def _plan_precheck(self) -> list[tuple[Callable[..., Any], bool]] | None:
        impls = self.pm.hook.gateway_precheck.get_hookimpls()
        if getattr(self.pm, "monitored", 1) or any(impl.wrapper or impl.hookwrapper for impl in impls):
            return None
        return [(impl.function, bool(impl.argnames)) for impl in reversed(impls)]

    def precheck(self, attempt: Attempt) -> Decision | None:
        """Ask ``gateway_precheck`` (on the event loop: its implementations hold no I/O).

        Its plain implementations are called here as pluggy calls a ``firstresult`` hook (last
        registered first, the first answer that is not None wins, an exception goes through):
        pluggy's dispatch cost a hot hit more than the lookup it made (docs/performance.md).
        A wrapper or a monitor on the hook (pluggy's tracing) gets pluggy's call."""
        try:
            calls = self._prechecks.get()
            if calls is None:
                decision = self.pm.hook.gateway_precheck(attempt=attempt)
            else:
                decision = None
                for function, takes_attempt in calls:
                    decision = function(attempt) if takes_attempt else function()
                    if decision is not None:
                        break
        except BaseException as exc:
            return self._crashed(exc, attempt, "in gateway_precheck")
        if decision is not None and not isinstance(decision, Decision):
            return Decision.deny(Outcome.ERROR, step="unknown", reason="internal_error")
        return decision

    def _crashed(self, exc: BaseException, attempt: Attempt, where: str) -> Decision:
        step = self.folder.culprit(exc)
        log.error("plugin %r raised %s %s (attempt %s); denied (fail closed)",
                  step, exc.__class__.__name__, where, attempt.request_id, exc_info=exc)
        return Decision.deny(Outcome.ERROR, step=step, reason="internal_error")

    def _decide_and_notify(self, attempt: Attempt) -> Decision:
        decision = self.decide(attempt)
        self.notify(attempt, decision)
        return decision

    def notify(self, attempt: Attempt, decision: Decision) -> None:
        """Tell the plugins *decision*, once per attempt: the first decision told is the one its
        client got; a step that answers after the deadline (its thread still ran) is logged,
        not audited a second time (:meth:`_claim`)."""
        if self._claim(attempt, decision):
            self._tell(attempt, decision)

    @staticmethod
    def _claim(attempt: Attempt, decision: Decision) -> bool:
        """Whether *decision* is the first told for *attempt* (atomic: a dict's setdefault)."""
        mine = (decision,)
        first = attempt.stash.setdefault(_TOLD, mine)
        if first is not mine:
            log.info("attempt %s: %s (%s) came after the attempt was answered %s (%s); not told again",
                     attempt.request_id, decision.outcome.value, decision.reason or decision.step,
                     first[0].outcome.value, first[0].reason or first[0].step)
            return False
        return True

    def _tell(self, attempt: Attempt, decision: Decision) -> None:
        """Tell every ``gateway_auth_finished`` implementation, in pluggy's order, each one on
        its own: one that raises is logged and the others are still told. Through pluggy, the
        first exception ended the call, so a third-party plugin's broken hook (registered after
        the core's, so called before them) lost the attempt's audit line, its metrics and the
        cache's forgetting of a failed user's hot entries. No plugin may wrap this hook
        (:data:`gateway.registry.ONE_BY_ONE`)."""
        for function, name, argnames in self._finished.get():
            try:
                if argnames == _FINISHED_ARGS:
                    function(attempt, decision)
                else:  # an implementation may take fewer arguments, by name (as pluggy passes them)
                    function(*[attempt if n == "attempt" else decision for n in argnames])
            except BaseException:  # noqa: BLE001 - SystemExit too: a plugin's, never the worker's end
                log.exception("gateway_auth_finished of plugin %r raised on attempt %s; the decision stands "
                              "and the other plugins were told", name, attempt.request_id)

    def _plan_finished(self) -> list[tuple[Callable[..., Any], str, tuple[str, ...]]]:
        impls = one_by_one(self.pm.hook.gateway_auth_finished.get_hookimpls())
        return [(i.function, i.plugin_name, i.argnames) for i in reversed(impls)]

    def throttle_client(self, attempt: Attempt) -> str | None:
        """The client key for throttling. API callers are services acting for many users, so
        only the per-user limit applies to them: at the API front door, and for an attempt a
        relay forwarded from its own API (:data:`SERVICE_CALLER`). An IPv6 client is counted by
        its network (``throttle.ipv6_prefix``, a /64: what one host is given), or every address
        of it would be a client with a budget of its own. An address a relay names (the ``link``
        door) is counted apart from the same address at this gateway's own doors: a hostile
        relay naming ``client: 10.0.0.5`` in wrong passwords spent that intranet address's
        budget here, and its users got 429 at ``/auth`` (fourth review of the link)."""
        if attempt.front_door == "api" or attempt.stash.get(SERVICE_CALLER, False):
            return None
        if attempt.front_door == "link":
            return "link " + self.client_key(attempt.client)
        return self.client_key(attempt.client)

    def client_key(self, client: IPAddress) -> str:
        """*client* as one client is counted: its address, an IPv6 one's network."""
        if client.version == 6 and client.ipv4_mapped is None:
            prefix = self.settings.throttle.ipv6_prefix
            if prefix < 128:
                return str(ipaddress.IPv6Network((int(client) >> (128 - prefix) << (128 - prefix), prefix)))
        return str(client)

    def carry_over(self, previous: Gateway) -> None:
        """Take over from *previous* (the configuration a reload replaces) what must outlive the
        reload, before this one serves: the throttle's counts (:meth:`Throttle.carry_over`) and,
        when ``failure_timing`` is unchanged, its samples (a fresh floor reopened the timing gap
        between kinds of refusal after every reload). Metrics carry over in ``build_runtime``."""
        self.throttle.carry_over(previous.throttle)
        if self.settings.failure_timing == previous.settings.failure_timing:
            self.failure_timing = previous.failure_timing

    async def _store_call(self, work: Callable[[Any], Any], deadline: float, *, must_run: bool = False):
        """``work(None)`` on a throttle store thread, waited for until *deadline* at most. Raises
        :class:`StoreUnavailable` when the store cannot answer in time; a call still queued then
        is not made (:class:`_StoreBusy` when it never started: this worker's burst, not the
        store). With *must_run* (giving a reservation back) the call is made however late, the
        wait for it still ends at *deadline* (a moment at least), and nothing is raised."""
        pool = self._store_pool
        started: list[bool] = []

        def call(arg):
            started.append(True)
            return work(arg)

        try:
            future = pool.run(call, None, deadline=None if must_run else deadline)
        except Overloaded:
            if must_run:
                pool.submit(work, None)
                return None
            raise _StoreBusy(f"throttle store: {pool.waiting()} calls of this worker wait for it; this one would "
                             "miss the attempt's deadline") from None
        try:
            if must_run:  # shielded: when the wait ends, the call is still made (it is not unwanted)
                future.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, if late
                return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.05, deadline - time.monotonic()))
            return await asyncio.wait_for(future, timeout=max(0.0, deadline - time.monotonic()))
        except (asyncio.TimeoutError, DeadlineExpired, Abandoned):
            if must_run:
                return None
            if not started:
                raise _StoreBusy("throttle store: the call waited for a thread until the attempt's deadline") from None
            raise StoreUnavailable("throttle store: no answer within the attempt's deadline") from None

    async def _admit_off_loop(self, attempt: Attempt, user: str, client: str | None):
        handover = _Handover()

        def work(_arg):
            ticket = self.throttle.admit(user, client)
            if not handover.deliver(ticket):  # the attempt was refused meanwhile: nobody uses it
                self._give_back(ticket, attempt.request_id)
            return ticket

        try:
            return await self._store_call(work, attempt.deadline)
        except StoreUnavailable:
            # A reservation delivered after the wait ended is given back here; one whose call
            # raised (a Redis timeout: Redis may still run it) the store takes back itself.
            late = handover.give_up()
            if late is not None:
                self._store_pool.submit(lambda _arg: self._give_back(late, attempt.request_id), None)
            raise

    def _give_back(self, ticket, request_id: str) -> None:
        if ticket is not None:
            self._settle_logged(functools.partial(self.throttle.settle, ticket, Outcome.UNAVAILABLE), request_id)

    def _settle_logged(self, settle: Callable[[], None], request_id: str) -> None:
        try:
            settle()
        except StoreLocked:
            raise  # on the loop: made again on a thread (_settled_on_loop)
        except StoreUnavailable as exc:
            self._outage.failed(request_id, str(exc), refused=False)

    def _settled_on_loop(self, settle: Callable[[], None], request_id: str) -> bool:
        """Settle on the loop; False when the store's lock is held by another process, to be
        settled again off the loop (every step of a settle may be made twice: each deletes)."""
        try:
            self._settle_logged(settle, request_id)
        except StoreLocked:
            return False
        return True

    async def _settle_off_loop(self, settle: Callable[[], None], attempt: Attempt) -> None:
        """Settle on a store thread; waited for while the attempt has time left (at least a
        moment), then left to finish on its own: the answer is decided already."""
        await self._store_call(lambda _arg: self._settle_logged(settle, attempt.request_id), attempt.deadline,
                               must_run=True)

    async def authenticate(self, attempt: Attempt) -> Decision:
        """Decide *attempt* within its deadline; the front doors' one entry into the core.

        A password attempt is counted by the throttle *before* the chain runs (so concurrent
        guesses count) and settled after; a refused password is held back to the common failure
        time (gateway/failtiming.py); a precheck answer still goes through the chain's wrappers
        and the steps before the one it stands for (:class:`PrecheckStandIn`).
        """
        token = logs.current_request_id.set(attempt.request_id)  # for lines logged on the loop
        try:
            return await self._authenticate(attempt)
        finally:
            logs.current_request_id.reset(token)

    async def _authenticate(self, attempt: Attempt) -> Decision:
        ticket = None
        if attempt.password is not None and self.throttle.settings.enabled:  # off: nothing to count or key
            try:
                user, client = attempt.user_key, self.throttle_client(attempt)
                # a local store answers at once: only a network store is worth a coroutine and a
                # thread, and a wait bounded by the attempt's deadline
                if self.throttle.blocking:
                    ticket = await self._admit_off_loop(attempt, user, client)
                else:
                    try:
                        ticket = self.throttle.admit(user, client)
                    except StoreLocked:  # another process holds the file: wait for it on a thread
                        ticket = await self._admit_off_loop(attempt, user, client)
            except _StoreBusy:  # a burst of this worker's own: overloaded (audited), the store is fine
                decision = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="overloaded")
                self.notify(attempt, decision)
                return decision
            except StoreUnavailable as exc:
                self._outage.failed(attempt.request_id, str(exc))  # once per outage, not once per attempt
                if self.throttle_probe is not None:  # /readyz says so before the next probe
                    self.throttle_probe.failed(str(exc))
                decision = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="throttle_unavailable")
                self.notify(attempt, decision)
                return decision
            self._outage.answered()
            if ticket is None:
                decision = Decision.deny(Outcome.THROTTLED, step="gateway", reason="throttled")
                self.notify(attempt, decision)
                return decision
        decision = _CLIENT_GONE  # if cancelled: not a guess (settle), nor a crash
        try:
            # A front door may bring the answer (a reused session: AFTER_THE_CHAIN); else ask.
            answer = attempt.stash.get(PRECHECKED, None) or self.precheck(attempt)
            if answer is not None and answer.outcome is Outcome.ERROR:  # a precheck crashed: fail closed
                self.notify(attempt, answer)
                decision = answer
            else:
                if answer is not None:
                    attempt.stash[PRECHECKED] = answer
                if answer is not None and self.runs_on_loop(answer, stands_for(attempt, answer)):
                    decision = self._run_on_loop(attempt)
                elif self._live_running < self.settings.threads and self.live_on_loop():
                    decision = await self._run_live_on_loop(attempt)
                else:
                    decision = await self._run_chain(attempt)
        finally:
            if ticket is not None:
                settle = functools.partial(self.throttle.settle, ticket, decision.outcome,
                                           live=not decision.from_cache)
                if self.throttle.blocking or not self._settled_on_loop(settle, attempt.request_id):
                    await self._settle_off_loop(settle, attempt)
        if attempt.password is not None and (decision.outcome in _REFUSALS or decision.outcome is Outcome.ERROR):
            elapsed = time.monotonic() - attempt.started
            if decision.outcome is not Outcome.ERROR:  # a crash's time sets no floor
                # Per reason, not per (step, outcome): a step's instant refusals (ldap's
                # nul_in_password) shared the samples of its slow ones (a wrong password's bind),
                # and seventy of them pulled the floor down to an unknown user's time
                # (gateway/failtiming.py).
                self.failure_timing.record((decision.step, decision.outcome.value, decision.reason), elapsed)
            # A crash is answered as a refusal (401), and as slowly: one after a right password
            # only (a bug in a later lookup) would otherwise tell it apart (review of the front door).
            delay = self.failure_timing.delay(elapsed, attempt.time_left())
            if delay > 0:
                await asyncio.sleep(delay)
        return decision

    async def _run_chain(self, attempt: Attempt) -> Decision:
        """The chain on the pool (plugins block), waited for until the attempt's deadline.
        A full queue refuses at once (``overloaded``, 503 with ``Retry-After``), on the loop."""
        try:
            future = self.pool.run(self._decide_and_notify, attempt, deadline=attempt.deadline,
                                   abandoned=attempt.stash.get(CLIENT_GONE, None))
        except Overloaded:
            decision = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="overloaded")
            self.notify(attempt, decision)
            return decision
        try:
            return await asyncio.wait_for(future, timeout=attempt.time_left())
        except Abandoned:
            decision = _CLIENT_GONE
            self.notify(attempt, decision)
            return decision
        except (asyncio.TimeoutError, DeadlineExpired):
            log.warning("attempt %s exceeded its deadline (%.1fs); a plugin did not answer in time",
                        attempt.request_id, self.settings.deadline)
            decision = _DEADLINE_EXCEEDED
            # Told now, on the loop (as a pre-checked attempt is): queued on the chain pool behind
            # the busy threads, the line was dropped with the queue at a stop or reload, for an
            # attempt already answered 503 (review of reliability).
            self.notify(attempt, decision)
            return decision
        except asyncio.CancelledError:
            # Cancelled while its chain ran (a stop or a reload whose grace ran out): told now,
            # while this generation's audit log is open; its step's late answer is not told.
            self.notify(attempt, _CANCELLED)
            raise
        except Exception:  # the pool itself failed (decide and notify never raise): fail closed
            log.exception("attempt %s: the chain pool failed", attempt.request_id)
            decision = Decision.deny(Outcome.ERROR, step="gateway", reason="internal_error")
            self.notify(attempt, decision)
            return decision

    async def _run_live_on_loop(self, attempt: Attempt) -> Decision:
        """The whole chain on the event loop, each wait of its steps parking the attempt's
        greenlet (:mod:`gateway.aio`): no thread hand-off, which cost an LDAP login more CPU than
        its own work (docs/performance.md). At most ``threads`` attempts at a time, as on the
        pool, so a step's connections stay bounded; beyond that they go to the pool, whose
        bounded queue refuses the excess. The steps bound their waits by the attempt's deadline
        (the ``loop_capable`` contract), as they do on a thread."""
        self._live_running += 1
        try:
            return await aio.run(self._run_on_loop, attempt)
        finally:
            self._live_running -= 1

    def _run_on_loop(self, attempt: Attempt) -> Decision:
        """The chain on the event loop: the wrappers around a precheck answer (nothing in them
        blocks: :meth:`runs_on_loop`), or in a greenlet the whole chain (:meth:`live_on_loop`).
        What a chain thread checks before it runs an attempt is checked here too: a passed
        deadline and a client that hung up."""
        gone = attempt.stash.get(CLIENT_GONE, None)
        if attempt.deadline <= time.monotonic():
            decision = _DEADLINE_EXCEEDED
        elif gone is not None and gone():
            decision = _CLIENT_GONE
        else:
            try:
                return self._decide_and_notify(attempt)
            except BaseException as exc:  # an auth_finished hook's SystemExit never ends the worker
                return self._crashed(exc, attempt, "after the chain")
        self.notify(attempt, decision)
        return decision

    # -- other hooks ----------------------------------------------------------------------------

    def challenges(self, attempt: Attempt) -> list[str]:
        """The ``WWW-Authenticate`` offers of every plugin, each asked on its own (one that
        raises loses only its own), in pluggy's order, without duplicates. An offer that is not
        a header value (not text, or with a control character such as CR or LF, which would
        end the header) is dropped and logged: it would break the 401 it rides on."""
        offers: list[str] = []
        for impl in reversed(one_by_one(self.pm.hook.gateway_challenges.get_hookimpls())):
            try:
                offer = impl.function(*(attempt for _name in impl.argnames))
            except BaseException:  # noqa: BLE001 - logged (SystemExit too); the other offers still go out
                log.exception("the gateway_challenges of plugin %r raised", impl.plugin_name)
                continue
            if offer is not None and (not isinstance(offer, str) or not _PRINTABLE_HEADER.fullmatch(offer)):
                log.error("the gateway_challenges of plugin %r offered %r, which is not a header value; dropped",
                          impl.plugin_name, offer if isinstance(offer, (str, bytes)) else type(offer))
                continue
            if offer and offer not in offers:
                offers.append(offer)
        return offers

    def readiness(self) -> tuple[bool, list[ComponentState]]:
        """(ready, components) from memory (:func:`gateway.health.decide`); :attr:`unready_reason`
        says why not (a code for load balancers, no URLs or paths), :attr:`degraded` which plugins
        have a component down while something covers it. :meth:`health` gives all in one."""
        health = self.health()
        return health.ready, health.components

    def health(self) -> Readiness:
        """Ask every ``gateway_readiness`` (memory only) and decide; safe from any thread."""
        reports: list[tuple[str, list[ComponentState]]] = []
        for impl in one_by_one(self.pm.hook.gateway_readiness.get_hookimpls()):
            try:
                states = list(impl.function() or ())
                if not all(isinstance(state, ComponentState) for state in states):
                    raise TypeError("its answer is not a list of ComponentState")
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: a not-ready component, never a 500
                states = [ComponentState(impl.plugin_name, False, f"readiness check raised {exc.__class__.__name__}")]
            reports.append((impl.plugin_name, states))
        reports.reverse()  # pluggy lists implementations last-registered first
        core = [self.throttle_probe.state()] if self.throttle_probe is not None else []
        health = decide(core, reports, self.settings.chain, self._password_steps)
        self.unready_reason, self.degraded = health.reason, health.degraded
        return health

    def probe(self) -> None:
        """One round of probes with I/O: the core's, then every plugin's ``gateway_probe``
        (each alone: one that raises does not stop the others). On the health thread only."""
        if self.throttle_probe is not None:
            self.throttle_probe.probe()
        for impl in reversed(one_by_one(self.pm.hook.gateway_probe.get_hookimpls())):
            try:
                impl.function()
            except BaseException:  # noqa: BLE001 - a broken probe (SystemExit too) is logged, the round goes on
                log.exception("the gateway_probe of plugin %r raised", impl.plugin_name)

    def listeners(self) -> list[Listener]:
        """Extra listeners plugins asked for; names and addresses must be unique."""
        result: list[Listener] = []
        for batch in self.pm.hook.gateway_listeners():
            for listener in batch or ():
                clash = [x for x in result if x.name == listener.name or x.address == listener.address]
                if clash or listener.address in self.settings.listen:
                    raise PluginLoadError(f"listener {listener.name} ({listener.address}) clashes with "
                                          + (clash[0].name if clash else "`listen:`"))
                result.append(listener)
        return result

    def http_routes(self, door) -> list[Route]:
        """HTTP routes plugins add (``gateway_http_routes``), in plugin order."""
        routes: list[Route] = []
        for batch in self.pm.hook.gateway_http_routes(door=door):
            routes.extend(batch or ())
        return routes

    def selftests(self) -> Iterable[SelfTest]:
        """Every plugin's self-tests, asked plugin by plugin: one whose ``gateway_selftests``
        raises shows as one failed test of its own, the others' tests still run."""
        for impl in reversed(one_by_one(self.pm.hook.gateway_selftests.get_hookimpls())):
            try:
                batch = list(impl.function() or ())
            except Exception as exc:  # noqa: BLE001 - reported as a failed test, named
                message = f"gateway_selftests raised {exc.__class__.__name__}: {exc}"
                batch = [SelfTest(f"{impl.plugin_name}.selftests", lambda message=message: CheckResult.fail(message))]
            yield from batch

    def startup(self) -> None:
        self.pm.hook.gateway_startup()
        self.health_watch.start()  # the first probe round before serving, then periodic

    def shutdown(self) -> None:
        """Stop probing, then every plugin's ``gateway_shutdown``, each alone: one that raises is
        logged and the others still close their pools and flush their buffers."""
        try:
            self.health_watch.stop()
            for impl in reversed(one_by_one(self.pm.hook.gateway_shutdown.get_hookimpls())):
                self.shutting_down = impl.plugin_name  # named by a caller that stops waiting
                try:
                    impl.function()
                except BaseException:  # noqa: BLE001 - logged (SystemExit too); the others still shut down
                    log.exception("the gateway_shutdown of plugin %r raised", impl.plugin_name)
        finally:
            self.shutting_down = None
            self.pool.shutdown()
            self._store_pool.shutdown()
            self.throttle.close()
