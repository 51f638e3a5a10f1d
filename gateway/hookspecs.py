"""The hooks authgw calls on its plugins. Each docstring is the contract.

Every hook is prefixed ``gateway_``. A plugin implements a hook by defining a method of the same
name marked with :data:`gateway.hookimpl`; it may accept any subset of the hook's parameters.
Hooks grow only by gaining optional parameters; a published hook is never broken.

Hooks run in the order of ``chain:`` in ``conf.d/gateway.yaml`` (then the plugins listed under
``plugins:``), on worker threads: implementations may block, within the attempt's deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import pluggy

if TYPE_CHECKING:
    from gateway.checks import Command, ComponentState, Listener, Route, SelfTest
    from gateway.http.app import FrontDoor
    from gateway.model import Attempt, Decision, Identity, UserPage

hookspec = pluggy.HookspecMarker("authgw")

# ---------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------


@hookspec
def gateway_startup() -> None:
    """Called once per worker process after every enabled plugin is registered, before the first
    request. Open pools, start background refreshers, warm caches here.

    Raising stops start-up: the operator sees the plugin's name and the error.

    .. versionadded:: 0.1
    """


@hookspec
def gateway_selftests() -> Iterable[SelfTest]:
    """Offer connectivity and configuration self-tests for ``authgw check`` and the console.

    :return: the plugin's :class:`~gateway.checks.SelfTest` records, in the order an operator
        should read them (for a directory: TCP, then TLS, then bind, then search). ``None`` or an
        empty iterable means the plugin has nothing to test. All plugins' results are collected.

    .. versionadded:: 0.1
    """


@hookspec
def gateway_listeners() -> Iterable[Listener]:
    """Ask for extra listening sockets, such as a TLS listener that requests client certificates.

    Called in the master process (which binds the sockets before forking workers) and again in
    every worker (which builds each listener's SSL context). Requests arriving on these
    listeners go through the same front doors; a verified TLS peer certificate reaches the
    attempt as ``attempt.certificate`` with ``source="tls"``.

    :return: :class:`~gateway.checks.Listener` records, or ``None``. All plugins' are collected;
        two listeners with one name or one address stop start-up.

    .. versionadded:: 0.1
    """


@hookspec
def gateway_http_routes(door: FrontDoor) -> Iterable[Route]:
    """Add HTTP routes: a front door of the plugin's own (a login page, SAML or OIDC endpoints, a
    relay's link endpoint, a console).

    Called in every worker when its HTTP applications are built. A handler that authenticates
    someone builds the attempt with ``door.attempt(request, front_door, password=...)`` (the
    client address comes from trusted proxies only, as for ``/auth``) and decides it with
    ``await door.decide(attempt)``: throttling, deadline, audit and metrics apply as on every
    front door. ``door.tls_certificate(request)`` is the verified peer certificate of a TLS
    listener, ``door.gateway.challenges(attempt)`` the ``WWW-Authenticate`` offers.

    :param door: the worker's :class:`~gateway.http.app.FrontDoor`.
    :return: :class:`~gateway.checks.Route` records, or ``None``. All plugins' are collected; a
        route that clashes with another (same method and path on one listener) stops start-up,
        and so does one naming a listener nobody asked for.

    .. versionadded:: 0.2
    """


@hookspec
def gateway_commands() -> Iterable[Command]:
    """Add ``authgw`` sub-commands for operators (``authgw cache purge USER``).

    Only enabled plugins are asked, after the configuration is loaded and the plugins are built
    (``gateway_startup`` has not run). A name that clashes with a core command or another
    plugin's stops the command line with an error.

    :return: :class:`~gateway.checks.Command` records, or ``None``.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------------------------
# Per attempt
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def gateway_authenticate(attempt: Attempt) -> Decision | None:
    """Decide an attempt, or pass it on. This is the chain; it stops at the first non-``None``.

    Return ``None`` ("not mine, ask the next step") when the attempt carries no credential of
    this plugin's kind or the client is outside the plugin's allowed networks. Also return
    ``None`` when the user does not exist in this plugin's backend, after
    ``attempt.note(Outcome.USER_NOT_FOUND, ...)``, and when the backend is unreachable or timed
    out, after ``attempt.note(Outcome.UNAVAILABLE, ...)`` (``offline=False`` when the backend's
    own side already gave what offline answer it could, as a relay's connector does: no cache
    then answers for this step).

    Return a :class:`~gateway.model.Decision` to stop the chain: ``INVALID_CREDENTIALS`` for a
    wrong password, bad token or bad certificate; ``ACCOUNT_STATE`` with a reason for a locked,
    disabled, expired or must-change account; ``SUCCESS`` with an identity.

    When no step decides, the core folds the notes: any ``UNAVAILABLE`` gives ``UNAVAILABLE``,
    else ``USER_NOT_FOUND``, else ``NOT_APPLICABLE``. An exception becomes a fail-closed deny
    (``ERROR``, reason ``internal_error``) logged with the plugin's name.

    Chain steps may not use ``tryfirst``/``trylast`` here: the operator's order is the order.
    Plugins listed under ``plugins:`` (not chain steps) may implement this hook as a
    ``wrapper=True`` around the whole chain; they then see the folded decision.

    :param attempt: the attempt, with its credentials, client address and deadline. Keep
        per-attempt state in ``attempt.stash``.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def gateway_precheck(attempt: Attempt) -> Decision | None:
    """Answer an attempt before the chain runs, from state the plugin already holds.

    For shortcuts that save a backend's work, such as a hot cache of recent successes for
    forward-auth (a pluggy wrapper cannot skip the implementations it wraps). A result saves
    only the work of one step: a success stands in for the chain step that decided when the
    identity was remembered (``attempt.stash[gateway.chain.PRECHECK_STEP]``, set beside the
    answer; else ``identity.method``); the steps before that one are still asked in order (a
    policy step such as a deny list may refuse), and every ``gateway_authenticate`` wrapper sees
    the decision, as for a live one. A success for no step of ``chain:`` is not used (the chain
    runs as without it); a deny stands for every step (the wrappers still see it). It runs on the event loop: it must not block (no
    I/O, no slow hashing) and must never answer with a success the chain would not give for
    the same credentials.

    :param attempt: the attempt, as the chain would see it.
    :return: a :class:`~gateway.model.Decision`, or ``None`` to run the chain. An exception is a
        fail-closed deny, as in ``gateway_authenticate``.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def gateway_lookup_user(username: str) -> Identity | None:
    """Look up a user's directory profile without a password.

    Methods that prove who the user is without the directory (Kerberos, client certificates)
    call this to get the display name, email and groups. A directory plugin answers with an
    :class:`~gateway.model.Identity` whose ``method`` is its own name (callers replace it).

    The answer must report the account's state: a user the directory holds but would refuse
    (disabled, locked, expired account) is returned with :attr:`~gateway.model.Identity.account_state`
    set to the reason code its password path uses, and a password that expired or must be changed
    with :attr:`~gateway.model.Identity.password_state`; never as ``None`` (the next plugin would
    be asked) nor as a usable identity. Callers refuse such identities with ``ACCOUNT_STATE``
    (docs/security.md, "account state on every path").

    :param username: the name as the calling method mapped it (no realm, no domain).
    :return: the identity, or ``None`` when this plugin does not know the user (the next plugin
        is asked). Raise :class:`~gateway.errors.BackendUnavailable` when the directory cannot
        be reached, so the caller can tell "no such user" from "cannot tell".

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def gateway_search_users(query: str, limit: int, cursor: str | None) -> UserPage | None:
    """Search the directory for users whose login name starts with, or display name contains,
    *query* (an admin console's user picker, a relay's ``GET /v1/relay/users``).

    *query* is user text: the plugin escapes it for its backend (LDAP: RFC 4515) and matches it
    literally, never as a pattern. The search is bounded: the plugin caps *limit* and the work
    done per call, whatever the caller asks. Each identity carries its account state as a
    ``gateway_lookup_user`` answer does, and never a password or a hash; groups may be empty
    (ask ``gateway_list_groups`` for one user's groups).

    :param query: the text to match; empty matches every user (still bounded).
    :param limit: the most users to return (the plugin may return fewer).
    :param cursor: ``None`` for the first page, else the ``next_cursor`` of the previous page.
    :return: a :class:`~gateway.model.UserPage`, or ``None`` when this plugin has no directory
        (the next plugin is asked). Raise :class:`~gateway.errors.BackendUnavailable` when the
        directory cannot answer, and :class:`ValueError` for a cursor it did not issue.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def gateway_list_groups(username: str) -> list[str] | None:
    """List a user's group names, nested memberships resolved as for a login.

    :param username: the name as a login would give it (no realm, no domain).
    :return: the sorted group names (empty when the user is in none), or ``None`` when this
        plugin does not know the user (the next plugin is asked). Raise
        :class:`~gateway.errors.BackendUnavailable` when the directory cannot answer.

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def gateway_answerer_revoked(answered_by: str) -> bool | None:
    """Whether the backend that answered a past login has been revoked since.

    Whatever keeps a success to answer on it again later asks this before it does, for a
    success whose step named its backend (:attr:`~gateway.model.Decision.answered_by`): the
    credential cache before an offline or hot answer, the login door before a session signs in
    to a service again. A relay's connector that vouched falsely and was revoked for it must not
    go on vouching through them. ``True``: the success is no longer taken (the cache forgets
    it, the session ends); ``False``: it stands.

    Runs on the event loop: answer from memory, no I/O.

    :param answered_by: the backend's id, as the step named it (a relay's connector:
        ``CONNECTION-xxxxxxxx``).
    :return: ``True`` or ``False`` for an id this plugin gave, ``None`` for any other (the next
        plugin is asked; no answer at all means not revoked). Raise
        :class:`~gateway.errors.BackendUnavailable` when this process cannot tell yet (its list
        of revocations not read since it started): the caller then does not answer on that
        word, and forgets nothing.

    .. versionadded:: 0.2
    """


@hookspec
def gateway_challenges(attempt: Attempt) -> str | None:
    """Offer a ``WWW-Authenticate`` challenge for a 401 answer to this attempt.

    Called only when the attempt is denied with a 401. Offer a challenge only where it can
    succeed: a Kerberos plugin offers ``Negotiate`` only to clients inside its allowed networks.

    :return: one header value such as ``Basic realm="authgw", charset="UTF-8"``, or ``None``.
        All plugins' answers are collected, de-duplicated, in chain order.

    .. versionadded:: 0.1
    """


@hookspec
def gateway_probe() -> None:
    """Check a backend's health with I/O (ping a store, re-read a keytab, fetch a CRL), off the
    request path, so that ``gateway_readiness`` can answer from memory.

    Called on the worker's health thread once at start-up (after ``gateway_startup``, before the
    first request) and then every ``health.probe_interval`` seconds; every plugin is called, one
    after the other, each with its exceptions caught and logged. Bound the time you take (a
    short timeout per connection): the other plugins' probes wait for yours. The core logs each
    change of the components you then report at WARNING; do not log them again.

    .. versionadded:: 0.2
    """


@hookspec
def gateway_readiness() -> Iterable[ComponentState]:
    """Report backend health for ``/readyz`` and ``authgw check``.

    Must return quickly from state the plugin already holds (for a directory: which server is
    active and which are backing off; what ``gateway_probe`` found last); it must not open
    connections or files.

    :return: :class:`~gateway.checks.ComponentState` records, or ``None``. The gateway is ready
        when at least one chain step that reports has a ready component (or a ready ``fallback``
        component can answer for them) and the core's own components are ready; a step with none
        ready is then listed as ``degraded`` (docs/design.md point 16).

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------------------------
# Notification
# ---------------------------------------------------------------------------------------------


@hookspec
def gateway_auth_finished(attempt: Attempt, decision: Decision) -> None:
    """Be told the final decision of every attempt (audit sinks, metrics, caches).

    Called after the chain, also for denials, errors and throttled attempts, on a worker thread
    or (for throttled and pre-checked attempts) on the event loop: return quickly and hand slow
    work to a queue of your own. The return value is ignored; an exception is logged and does
    not change the decision, nor keep the other plugins (the audit log, metrics, the cache)
    from being told.

    :param attempt: the attempt as decided.
    :param decision: the decision the front door is about to answer with.

    .. versionadded:: 0.1
    """


# ---------------------------------------------------------------------------------------------
# Shut-down
# ---------------------------------------------------------------------------------------------


@hookspec
def gateway_shutdown() -> None:
    """Called once per worker process on a clean stop (SIGTERM/SIGINT), after the listeners
    closed and in-flight attempts finished, and for the configuration a reload replaced. Close
    pools and flush buffers here. An exception is logged; the other plugins still shut down.
    In ``authgw serve`` the plugins' shut-downs have 5 seconds together: one still running then
    is named in the log and the process goes on without waiting for it (it is not interrupted).

    .. versionadded:: 0.1
    """
