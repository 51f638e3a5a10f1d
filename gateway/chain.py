"""Running an attempt through the chain: deadline, fail-closed handling, folding, notification.

Layers of one attempt, outermost first::

    Gateway.authenticate      throttle, deadline, metrics; catches what escapes everything below
      gateway_precheck        on the event loop: shortcuts that skip the chain (a hot cache)
      wrappers (plugins:)     e.g. the credential cache; they see the folded decision
        ChainFolder           innermost wrapper: exception -> ERROR deny; no decision -> fold notes
          chain steps         in the operator's order, firstresult
"""

from __future__ import annotations

import asyncio
import functools
import logging
import types
from typing import Any, Iterable

import pluggy

from gateway.checks import ComponentState, Listener, Route, SelfTest
from gateway.errors import PluginLoadError
from gateway.model import Attempt, Decision, Outcome
from gateway.pool import ChainPool, DeadlineExpired, Overloaded
from gateway.registry import hookimpl
from gateway.settings import GatewaySettings
from gateway.throttle import Throttle

__all__ = ["ChainFolder", "Gateway", "fold"]

log = logging.getLogger("authgw.chain")

#: Outcomes that count as a failed guess for throttling.
_FAILURES = frozenset({Outcome.INVALID_CREDENTIALS, Outcome.USER_NOT_FOUND, Outcome.ACCOUNT_STATE})


def fold(attempt: Attempt) -> Decision:
    """The result when every step passed (DESIGN.md section 3): UNAVAILABLE over USER_NOT_FOUND
    over NOT_APPLICABLE. The first note of the winning kind names the step and reason."""
    for outcome in (Outcome.UNAVAILABLE, Outcome.USER_NOT_FOUND):
        for note in attempt.notes:
            if note.outcome is outcome:
                return Decision.deny(outcome, step=note.step, reason=note.reason)
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
                    code = getattr(getattr(plugin, attr, None), "__code__", None)
                    if isinstance(code, types.CodeType) and attr.startswith("gateway_"):
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

    @hookimpl(wrapper=True, trylast=True)
    def gateway_authenticate(self, attempt: Attempt):
        try:
            decision = yield
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
        return decision


class Gateway:
    """The core, as the front doors use it: one per worker process."""

    def __init__(self, settings: GatewaySettings, pm: pluggy.PluginManager, plugins: dict[str, Any],
                 folder: ChainFolder) -> None:
        self.settings = settings
        self.pm = pm
        self.plugins = plugins
        self.folder = folder
        self.throttle = Throttle(settings.throttle)
        self.pool = ChainPool(settings.threads, max_queue=settings.limits.queue)
        self.unready_reason: str | None = None  # set by readiness()

    # -- per attempt ----------------------------------------------------------------------------

    def decide(self, attempt: Attempt) -> Decision:
        """Run the chain synchronously (on a worker thread). Never raises, never returns None."""
        try:
            decision = self.pm.hook.gateway_authenticate(attempt=attempt)
        except BaseException as exc:  # a wrapper raised outside the ChainFolder (SystemExit too)
            return self._crashed(exc, attempt, "around the chain")
        if not isinstance(decision, Decision):
            return Decision.deny(Outcome.ERROR, step="unknown", reason="internal_error")
        return decision

    def precheck(self, attempt: Attempt) -> Decision | None:
        """Ask ``gateway_precheck`` (on the event loop: its implementations hold no I/O)."""
        try:
            decision = self.pm.hook.gateway_precheck(attempt=attempt)
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
        try:
            self.pm.hook.gateway_auth_finished(attempt=attempt, decision=decision)
        except Exception:
            log.exception("a gateway_auth_finished implementation raised; the decision stands")

    @staticmethod
    def throttle_client(attempt: Attempt) -> str | None:
        """The client key for throttling. API callers are services acting for many users, so
        only the per-user limit applies to them."""
        return None if attempt.front_door == "api" else str(attempt.client)

    async def authenticate(self, attempt: Attempt) -> Decision:
        """Decide *attempt* within its deadline; the front doors' one entry into the core."""
        client = self.throttle_client(attempt)
        if self.throttle.blocked(attempt.username, client):
            decision = Decision.deny(Outcome.THROTTLED, step="gateway", reason="throttled")
            self.notify(attempt, decision)
            return decision
        decision = self.precheck(attempt)
        if decision is not None:
            self.notify(attempt, decision)
        else:
            decision = await self._run_chain(attempt)
        if decision.outcome in _FAILURES:
            self.throttle.record_failure(attempt.username, client)
        elif decision.success:
            self.throttle.record_success(attempt.username)
        return decision

    async def _run_chain(self, attempt: Attempt) -> Decision:
        """The chain on the pool (plugins block), waited for until the attempt's deadline.
        A full queue refuses at once (``overloaded``, 503 with ``Retry-After``), on the loop."""
        try:
            future = self.pool.run(self._decide_and_notify, attempt, deadline=attempt.deadline)
        except Overloaded:
            decision = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="overloaded")
            self.notify(attempt, decision)
            return decision
        try:
            return await asyncio.wait_for(future, timeout=attempt.time_left())
        except (asyncio.TimeoutError, DeadlineExpired):
            log.warning("attempt %s exceeded its deadline (%.1fs); a plugin did not answer in time",
                        attempt.request_id, self.settings.deadline)
            decision = Decision.deny(Outcome.UNAVAILABLE, step="gateway", reason="deadline_exceeded")
            self.pool.submit(functools.partial(self.notify, attempt), decision)
            return decision

    # -- other hooks ----------------------------------------------------------------------------

    def challenges(self, attempt: Attempt) -> list[str]:
        offers: list[str] = []
        try:
            results = self.pm.hook.gateway_challenges(attempt=attempt)
        except Exception:
            log.exception("a gateway_challenges implementation raised")
            results = []
        for offer in results:
            if offer and offer not in offers:
                offers.append(offer)
        return offers

    def readiness(self) -> tuple[bool, list[ComponentState]]:
        """Ready when every chain step that reports components has at least one ready; else
        :attr:`unready_reason` names the steps (a code for load balancers, no URLs or paths)."""
        components: list[ComponentState] = []
        unready: list[str] = []
        for impl in self.pm.hook.gateway_readiness.get_hookimpls():
            try:
                states = list(impl.function() or ())
            except Exception as exc:
                states = [ComponentState(impl.plugin_name, False, f"readiness check raised {exc.__class__.__name__}")]
            components.extend(states)
            if impl.plugin_name in self.settings.chain and states and not any(s.ready for s in states):
                unready.append(impl.plugin_name)
        self.unready_reason = f"no ready backend: {', '.join(unready)}" if unready else None
        return not unready, components

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
        for batch in self.pm.hook.gateway_selftests():
            yield from batch or ()

    def startup(self) -> None:
        self.pm.hook.gateway_startup()

    def shutdown(self) -> None:
        try:
            self.pm.hook.gateway_shutdown()
        finally:
            self.pool.shutdown()
