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

A Redis that refuses ``INFO`` to this client (an ACL without it, as ``-@dangerous`` gives, or the
command renamed) cannot be told: it is used, and a WARNING says once that it is not checked. A
Redis that does not answer (a timeout, a dropped connection) tells nothing either: that error is
raised, and the last answer stands (a probe that timed out between its PING and its INFO made an
evicting Redis used again until the next round: review of the eviction watch).
"""

from __future__ import annotations

import logging

__all__ = ["EvictingRedis", "EvictionWatch", "eviction_problem", "refused"]

log = logging.getLogger("authgw.redis")


def refused(exc: BaseException) -> bool:
    """Whether *exc* is Redis refusing one command to this client (``NOPERM``: an ACL without it;
    ``unknown command``: renamed or disabled), as opposed to Redis not answering or failing."""
    from redis.exceptions import NoPermissionError, ResponseError

    return isinstance(exc, NoPermissionError) or (
        type(exc) is ResponseError and str(exc).lower().startswith("unknown command"))


def _read(client) -> tuple[str | None, str | None]:
    """``(problem, why it is not known)`` of *client*'s Redis (:func:`eviction_problem`)."""
    try:
        info = client.info("memory")
    except Exception as exc:
        if refused(exc):
            return None, f"INFO is refused to this client ({exc.__class__.__name__})"
        raise  # not answered: nothing is known, and the caller's last answer stands
    policy = info.get("maxmemory_policy", "noeviction")
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    try:
        limit = int(info.get("maxmemory", 0))
    except (TypeError, ValueError):
        limit = 0
    if limit <= 0 or policy == "noeviction":
        return None, None
    return (f"maxmemory-policy {policy} with maxmemory {limit}: Redis evicts keys when full, and an evicted "
            "count or mark is a check that no longer holds; set maxmemory-policy noeviction (and give this "
            "Redis its own memory)"), None


def eviction_problem(client) -> str | None:
    """Why *client*'s Redis may evict keys (``maxmemory`` with a policy that evicts), or None.
    ``INFO memory`` is read (``CONFIG GET`` is often forbidden on managed Redis); a Redis that
    refuses it (:func:`refused`) cannot be told: None. Raises the client's error when Redis
    does not answer (a timeout is no "noeviction")."""
    return _read(client)[0]


class EvictingRedis(RuntimeError):
    """A store's probe found that its Redis may evict keys; the message says why (no secret)."""


class EvictionWatch:
    """What the last health probe found of a store's Redis (:func:`eviction_problem`), shared by
    every client of that store in the worker (the probe may use a client of its own): calls
    refuse while :attr:`problem` is set. A change is logged once: ERROR when it starts, WARNING
    when it ends or when Redis refuses ``INFO``.

    :param what: the store, as the lines name it (``"throttle store"``).
    :param logger: the logger of the lines (``authgw.redis`` by default).
    :param error_line: the ERROR line, a :meth:`str.format` template of ``{what}``, ``{location}``
        and ``{problem}``; *fixed_line*: the WARNING line when the policy keeps keys again
        (``{what}``, ``{location}``). Each store says what it stops doing (the credential
        cache: no offline answers).
    """

    def __init__(self, what: str, *, logger: logging.Logger | None = None,
                 error_line: str = "{what} {location} is not used: {problem}",
                 fixed_line: str = "{what} {location}: its eviction policy keeps keys again") -> None:
        self.what = what
        self.log = logger or log
        self.error_line = error_line
        self.fixed_line = fixed_line
        self.problem: str | None = None
        #: Why the last probe could not tell (Redis refused ``INFO``), or None.
        self.unchecked: str | None = None

    def check(self, client, location: str) -> str | None:
        """Ask *client*'s Redis (a probe's question): the problem, or None. Raises, and changes
        nothing, when Redis does not answer."""
        problem, unchecked = _read(client)
        if problem != self.problem:
            if problem is not None:
                self.log.error(self.error_line.format(what=self.what, location=location, problem=problem))
            elif unchecked is None:
                self.log.warning(self.fixed_line.format(what=self.what, location=location))
        if unchecked is not None and unchecked != self.unchecked:
            self.log.warning("%s %s: %s, so whether this Redis may evict keys is not checked: it is used; "
                             "allow INFO to this client (ACL +info, the command not renamed) and set "
                             "maxmemory-policy noeviction", self.what, location, unchecked)
        elif unchecked is None and self.unchecked is not None and problem is None:
            self.log.info("%s %s: INFO answered again: the eviction policy keeps keys", self.what, location)
        self.problem, self.unchecked = problem, unchecked
        return problem
