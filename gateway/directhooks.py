"""The per-attempt plain hooks called without pluggy's dispatch, where no plugin can tell.

Used by the core (gateway/chain.py) for ``gateway_precheck``, ``gateway_auth_finished`` and
``gateway_challenges``, the hooks every attempt calls. Decides, per hook and per set of
registered implementations, whether a direct call is allowed: only when every implementation is
the project's own code (the core and the built-in plugins, ``gateway.*`` modules) and none is a
wrapper. Reads no configuration.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import pluggy

__all__ = ["DirectHooks"]


class DirectHooks:
    """The per-attempt plain hooks (``gateway_precheck``, ``gateway_auth_finished``,
    ``gateway_challenges``) called without pluggy's dispatch when only the project's own code
    implements them: the core and the built-in plugins (``gateway.*`` modules), none a wrapper.
    The calls are pluggy's (last registered first, the arguments each implementation declares,
    the first non-None for a ``firstresult`` hook, an exception propagating at once), without
    its per-call machinery (~5-10 µs an attempt, docs/performance.md). Any other implementation
    registered for a hook, now or later, sends that hook through pluggy again."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._plans: dict[str, tuple[tuple[int, ...], list | None]] = {}

    def plan(self, name: str) -> list[tuple[Callable, tuple[str, ...]]] | None:
        impls = getattr(self._pm.hook, name).get_hookimpls()
        key = tuple(map(id, impls))
        known = self._plans.get(name)
        if known is not None and known[0] == key:
            return known[1]
        own = all(not (i.wrapper or i.hookwrapper) and _module(i.plugin).startswith("gateway.") for i in impls)
        plan = [(i.function, tuple(i.argnames)) for i in reversed(impls)] if own else None
        self._plans[name] = (key, plan)
        return plan

    def first(self, name: str, **kwargs: Any) -> Any:
        plan = self.plan(name)
        if plan is None:
            return getattr(self._pm.hook, name)(**kwargs)
        for function, argnames in plan:
            result = function(*[kwargs[a] for a in argnames])
            if result is not None:
                return result
        return None

    def every(self, name: str, **kwargs: Any) -> list:
        plan = self.plan(name)
        if plan is None:
            return getattr(self._pm.hook, name)(**kwargs)
        results = []
        for function, argnames in plan:
            result = function(*[kwargs[a] for a in argnames])
            if result is not None:
                results.append(result)
        return results


def _module(plugin: Any) -> str:
    return plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
