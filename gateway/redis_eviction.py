"""Whether a Redis may evict the gateway's keys.

A Redis with ``maxmemory`` set and a ``maxmemory-policy`` other than ``noeviction`` deletes keys
when it is full: ``volatile-*`` policies (a common managed-Redis default) pick among the keys
with a time to live, which are exactly the gateway's: the throttle's failure counts, the login
door's replay marks (an AuthnRequest ID, a client assertion's ``jti``), the cache's forgotten
markers. Each one evicted is a check that no longer holds (review: 22 password guesses past a
lockout, an AuthnRequest ID accepted twice). The stores on Redis ask :func:`eviction_problem` in
their health probe and refuse to be used while it answers (fail closed, as when Redis is down):
``/readyz`` and the log say why and what to set.

    problem = eviction_problem(client)     # None, or what is wrong and what to set
    watch = EvictionWatch("login session store")   # shared by the clients of one store
    watch.check(client, location)          # in the probe: problem, logged when it changes
    watch.problem                          # on each call: not None, refuse
"""

from __future__ import annotations

import logging

__all__ = ["EvictingRedis", "EvictionWatch", "eviction_problem"]

log = logging.getLogger("authgw.redis")


def eviction_problem(client) -> str | None:
    """Why *client*'s Redis may evict keys (``maxmemory`` with a policy that evicts), or None.
    ``INFO memory`` is read (``CONFIG GET`` is often forbidden on managed Redis); a Redis that
    does not answer it (an ACL without ``info``) cannot be told: None, logged at DEBUG. Errors
    reaching Redis at all are the caller's (its ping raises them first)."""
    try:
        info = client.info("memory")
    except Exception as exc:  # noqa: BLE001 - NOPERM or an old server: cannot be told
        log.debug("redis: INFO memory not answered (%s): the eviction policy is not checked",
                  exc.__class__.__name__)
        return None
    policy = info.get("maxmemory_policy", "noeviction")
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    try:
        limit = int(info.get("maxmemory", 0))
    except (TypeError, ValueError):
        limit = 0
    if limit <= 0 or policy == "noeviction":
        return None
    return (f"maxmemory-policy {policy} with maxmemory {limit}: Redis evicts keys when full, and an evicted "
            "count or mark is a check that no longer holds; set maxmemory-policy noeviction (and give this "
            "Redis its own memory)")


class EvictingRedis(RuntimeError):
    """A store's probe found that its Redis may evict keys; the message says why (no secret)."""


class EvictionWatch:
    """What the last health probe found of a store's Redis (:func:`eviction_problem`), shared by
    every client of that store in the worker (the probe may use a client of its own): calls
    refuse while :attr:`problem` is set. A change is logged (ERROR when it starts)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.problem: str | None = None

    def check(self, client, location: str) -> str | None:
        problem = eviction_problem(client)
        if problem != self.problem:
            if problem is not None:
                log.error("%s %s is not used: %s", self.what, location, problem)
            else:
                log.warning("%s %s: its eviction policy keeps keys again", self.what, location)
        self.problem = problem
        return problem
