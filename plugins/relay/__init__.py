"""``relay``: the cloud side of the connector link. Connectors enrol here from ticket URLs and
hold outbound WebSocket links; the chain step ``relay`` forwards password attempts (and
``gateway_lookup_user``, ``gateway_search_users``, ``gateway_list_groups``) over one of them (docs/connector.md, docs/link-protocol.md).

Decides
    password attempts, with the connector's outcome and reason code as its own (``step`` is
    ``relay``): ``SUCCESS`` with the connector's identity, ``INVALID_CREDENTIALS``,
    ``ACCOUNT_STATE``, ``THROTTLED``, ``ERROR``; ``ERROR`` ``relay.bad_answer`` for an answer out
    of shape, ``relay.identity_mismatch`` for a success naming another user than the one asked
    for (``answered_names``, :func:`same_user`). What comes of a connector's answer, a note
    included, names that connector (``answered_by`` in the audit line): the id of the link the
    request went on, never one the answer gives (:meth:`Hub.ask`).
Abstains
    when the attempt has no password; with a ``USER_NOT_FOUND`` note carrying the connector's
    reason; with an ``UNAVAILABLE`` note ``relay.no_connector`` (none linked), ``relay.busy``
    (every link at ``max_in_flight``), ``relay.timeout``, ``relay.link_lost`` (the link failed
    after the password was sent: never re-sent), ``relay.connector_unavailable`` or
    ``relay.connector_error``. With ``plugins: [cache]`` and ``cache: {methods: [relay]}`` the
    cache then answers users it has seen; not when a connector answered UNAVAILABLE itself (its
    directory down: its own cache had its say, and only it knows what that directory refused
    since), nor when the links are busy (a flood must not turn logins into cache answers).
    A lookup a connector answers ``found: false`` with ``looked_up: false`` (its directory cannot
    look anyone up) is ``None``, which the cache does not take for a deleted account
    (:attr:`RelayPlugin.looks_up_users`).
Settings (``relay:`` in conf.d)
    ``connection``, ``listen``, ``public_url``, ``public_names``, ``certificate``, ``key``,
    ``ticket_lifetime``, ``certificate_lifetime``, ``ping_interval``, ``max_in_flight``,
    ``relink_wait``, ``max_clock_skew``, ``redis``, ``answered_names``.
Health
    ``relay.CONNECTION``: the connectors linked to this process; the step cannot answer without
    one (``required``). ``relay.store`` (with ``redis:`` only): a ``PING`` on a client of its
    own every ``health.probe_interval``. The store is *not* required: with Redis down, logins
    through the links this process holds go on (they need neither Redis nor the registry), so a
    load balancer should keep sending them here and ``/readyz`` shows ``relay`` as degraded;
    what Redis carries stops, failing closed: routing to other instances (``relay.no_connector``),
    enrolment and new links (the registry, revocations included, cannot be read, so no
    connector, revoked or not, gets in; the links already up stay, a revocation closes them
    within a second of Redis answering again, an expiry at once; a renewal is answered
    ``unavailable`` and asked again). A process holding no link is not ready either way.
    A Redis that may evict keys (``maxmemory`` with a policy other than ``noeviction``) makes
    ``relay.store`` not ready, saying so, and closes enrolment (503 ``store_unavailable``) until
    it is fixed: an evicted connector record frees its id, revoked or not; the rest of what the
    relay keeps there fails closed when evicted (docs/link-protocol.md).
    SQLite is a local file: nothing to probe, its errors surface on the next operation.
Commands
    ``authgw relay connection add NAME``, ``authgw relay ticket CONNECTION``,
    ``authgw relay connectors``, ``authgw relay revoke CONNECTOR``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import re
import ssl
import time
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from gateway import (
    Attempt,
    BackendUnavailable,
    Command,
    ComponentState,
    Decision,
    Identity,
    Listener,
    Outcome,
    PluginContext,
    Route,
    UserPage,
    hookimpl,
)
from gateway.logs import printable
from gateway.model import folded_username

from gateway.health import StoreProbe
from gateway.plugins import linkproto as proto

from .ca import RelayCA
from .cli import relay_command
from .endpoints import STORE_ERRORS, Endpoints, close_link, log
from .hub import Hub, Unreachable
from .settings import RelaySettings
from .router import Router
from .store import RedisStore, SQLiteStore

__all__ = ["RelayPlugin"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: Outcomes a connector may answer that stop the relay's chain; the others are notes or nothing.
#: What a connector's ``reason`` may hold (it is logged and audited): reason codes, not text.
_REASON = re.compile(r"[A-Za-z0-9_.:-]{0,100}")
_DECIDING = {Outcome.SUCCESS, Outcome.INVALID_CREDENTIALS, Outcome.ACCOUNT_STATE, Outcome.THROTTLED, Outcome.ERROR}
_MAINTENANCE_INTERVAL = 1.0
#: Whether the connector that answered the lookup last made in this context (a chain thread, a
#: greenlet, ``asyncio.to_thread``'s copy) looked the user up: :attr:`RelayPlugin.looks_up_users`.
_LOOKED_UP: contextvars.ContextVar[bool] = contextvars.ContextVar("authgw_relay_looked_up", default=True)
#: What the CA conflict names a value under the CA key that is no relay CA this instance can read.
_NOT_A_CA = "(not a relay CA)"


class RelayPlugin:
    """Registered as ``relay`` (a chain step)."""

    Settings = RelaySettings
    #: What this step checks (readiness: which steps can serve password logins).
    credentials = ("password",)
    #: Down or hung, this step notes UNAVAILABLE and the chain goes on (gateway/steplimit.py).
    passes_when_unavailable = True

    def __init__(self, settings: RelaySettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.log = context.log
        self.state_dir = context.state_dir
        if settings.redis is not None:
            self.store = RedisStore(settings.redis)
        else:
            self.store = SQLiteStore(context.state_dir / "relay" / "relay.sqlite3")
        self.ca = RelayCA.load_or_create(context.state_dir, settings.connection)
        exposed = RelayCA.key_exposure(context.state_dir)
        if exposed:
            self.log.warning("relay: %s", exposed)
        #: What is wrong with the relay CA Redis holds (another than this instance's), ``""``
        #: when nothing: said at ERROR once, shown in ``/readyz`` as ``relay.ca`` (:meth:`_check_ca`).
        self.ca_conflict = ""
        self._ca_other = ""  # the fingerprint of that other CA
        #: :meth:`_check_ca`'s memory: this instance's CA as PEM (key, certificate), and the
        #: last value read from Redis with its fingerprint (parsed again only when it changes).
        self._ca_own: tuple[bytes, bytes] | None = None
        self._ca_seen: tuple[bytes, bytes, str] | None = None
        if settings.redis is not None:
            try:
                key_pem, cert_pem, _ = self.store.shared_ca(self.ca.key_pem, self.ca.pem.encode())
                shared = RelayCA.from_pem(key_pem, cert_pem)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                # No relay CA this instance can read (an encrypted key, garbage): it keeps its
                # own and overwrites nothing, as for another CA. It stopped every start, the
                # command line's too: `authgw relay revoke` could not be run (review of the relay).
                shared = None
                self._ca_conflict(_NOT_A_CA, self.log)
            if shared is not None and (shared.pem == self.ca.pem or not self.ca.shared_in(context.state_dir)):
                self.ca = shared  # a new instance adopts the CA of the others
                self.ca.save(context.state_dir)
            elif shared is not None:
                # This instance's CA was shared (connectors were enrolled with it) and Redis now
                # holds another: written by an instance that found it missing (Redis lost its
                # data). Adopting it overwrote the CA every connector pins, without a word.
                self._ca_conflict(shared.fingerprint, self.log)
        self.hub = Hub(settings.max_in_flight, relink_wait=settings.relink_wait, workers=context.gateway.workers)
        if settings.redis is None and context.gateway.workers > 1:
            self.log.warning("relay: with workers: %d and no `redis:`, a login reaches the connectors linked to "
                             "its own worker only; set workers: 1 or relay.redis", context.gateway.workers)
        self.link_url = "wss://" + settings.public_url.split("://", 1)[1] + "/link"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
        self._maintenance: asyncio.Task | None = None
        self._inbox: asyncio.Task | None = None
        #: Links the maintenance round is closing, each in its own task (:meth:`_end`).
        self._ending: set[asyncio.Task] = set()
        #: The Redis store's health (``redis:`` only), made on the worker's first health round.
        self._store_probe: StoreProbe | None = None
        self._probe_client: RedisStore | None = None
        #: The revoked connectors as the registry last listed them (each maintenance round);
        #: None until this process has read them once (:meth:`gateway_answerer_revoked`).
        self._revoked: frozenset[str] | None = None
        #: The connectors the registry listed as enrolled at the same read, and those this
        #: process admitted a link from since (id -> monotonic time), which that read may not
        #: list yet. A linked connector missing from both lost its record (a Redis that lost
        #: its data): nothing is answered on its word and its link is closed, as for a
        #: revocation, which could no longer be recorded for it.
        self._enrolled: frozenset[str] = frozenset()
        self._admitted: dict[str, float] = {}
        #: Every connector a read of the registry listed in this process: one listed before and
        #: missing now lost its record; one never listed may have enrolled since the last read.
        self._known: set[str] = set()

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(_NAME.fullmatch(name))  # not match: ``$`` lets a final newline through

    # -- listener and routes ------------------------------------------------------------------------

    @hookimpl
    def gateway_listeners(self) -> list[Listener]:
        if self._listener is None:
            if self.settings.certificate is not None:
                cert, key = self.settings.certificate, self.settings.key
            else:
                cert, key = self.ca.server_certificate(self.state_dir / "relay" / "tls", self.settings.names)
            ca_pem = self.ca.pem

            def factory() -> ssl.SSLContext:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(str(cert), str(key))
                # Optional: enrolment comes without a certificate; /link insists on one.
                context.verify_mode = ssl.CERT_OPTIONAL
                context.load_verify_locations(cadata=ca_pem)
                context.options |= ssl.OP_NO_RENEGOTIATION
                return context

            factory()  # a bad certificate or key stops start-up here, naming the plugin
            self._listener = Listener(f"{self.name}.link", self.settings.listen, factory, own_routes=True)
        return [self._listener]

    @hookimpl
    def gateway_http_routes(self, door) -> list[Route]:
        # Called on the worker's event loop while it builds its applications: the links live
        # on this loop, and the chain step's threads reach them through it.
        self.loop = asyncio.get_running_loop()
        if self.settings.redis is not None:
            self.hub.router = Router(self.settings.redis, self.store, self.hub, self.settings.ping_interval)
        self.loop.call_soon(self.ensure_maintenance)
        endpoints = Endpoints(self, door)
        listener = f"{self.name}.link"
        return [Route("GET", "/p/{token}", endpoints.ticket_info, listener),
                Route("POST", "/p/{token}", endpoints.enrol, listener),
                Route("GET", "/link", endpoints.link, listener),
                Route("GET", "/v1/relay/connectors", endpoints.connectors),
                Route("POST", "/v1/relay/selftest", endpoints.selftest),
                Route("GET", "/v1/relay/users", endpoints.users),
                Route("GET", "/v1/relay/users/{name}/groups", endpoints.groups)]

    @hookimpl
    def gateway_commands(self) -> list[Command]:
        return [relay_command(self)]

    def ensure_maintenance(self) -> None:
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        """Close revoked connectors' links at once, and links whose certificate ended; tell the
        registry who is online. While the registry does not answer, expiries still end links
        and the loss and the return are logged once each (``/readyz`` shows ``relay.store``)."""
        loop = asyncio.get_running_loop()
        last_seen_write = time.monotonic()
        router = self.hub.router
        if router is not None:
            self._inbox = loop.create_task(router.serve())
        away = False  # the registry failed last round: said once, not every second of an outage
        with contextlib.suppress(Exception):  # read now, not a round later: the cache waits for it
            await self._read_standing(loop)
        while True:
            await asyncio.sleep(_MAINTENANCE_INTERVAL)
            try:
                if router is not None:
                    await router.heartbeat()
                    await self._check_ca_safely(loop)
                revoked = await self._read_standing(loop)  # before any link is closed for it
            except Exception as exc:  # noqa: BLE001 - Redis away or SQLite busy: try again next round
                revoked = None
                if not away:
                    log.warning("relay maintenance: the registry does not answer (%s); revocations are checked "
                                "again when it does, new links and enrolments are refused until then",
                                exc.__class__.__name__)
                away = True
            else:
                if away:
                    log.warning("relay maintenance: the registry answers again")
                away = False
            try:
                now = time.time()
                for session in self.hub.all():
                    if session.closing:
                        continue
                    if revoked is not None and session.connector in revoked:
                        log.warning("connector %s revoked: closing its link", session.connector)
                        session.closing = True  # closed on purpose: no relink window to wait out
                        self.hub.remove(session)
                        self._end(session, 4003, b"revoked")
                    elif revoked is not None and not self._standing(session.connector):
                        log.warning("connector %s is no longer in the registry (its record was lost or removed): "
                                    "closing its link; it must enrol again with a new ticket", session.connector)
                        session.closing = True
                        self.hub.remove(session)
                        self._end(session, 4003, b"unknown connector")
                    elif session.not_after <= now:
                        # TLS checked the certificate once, at the handshake; its end ends the link.
                        log.warning("connector %s: certificate expired without renewal; closing its link "
                                    "(it must re-enrol with a new ticket)", session.connector)
                        session.closing = True
                        self.hub.remove(session)
                        self._end(session, 4001, b"certificate expired")
                if revoked is not None:
                    self._end_replaced(revoked)
                if revoked is not None and router is not None:
                    # after the closes above: a link closed for them is no route
                    try:
                        await router.restore(self.settings.connection)
                    except Exception as exc:  # noqa: BLE001 - Redis away since the read: next round
                        log.info("relay routing: cannot look at the routes of the links held here (%s)",
                                 exc.__class__.__name__)
                if revoked is not None and time.monotonic() - last_seen_write >= self.settings.ping_interval:
                    last_seen_write = time.monotonic()
                    until = time.time() + 3 * self.settings.ping_interval
                    for session in self.hub.all():
                        if session.ready:
                            await loop.run_in_executor(None, self.store.seen, session.connector,
                                                       session.version, until)
            except STORE_ERRORS as exc:  # the registry went away since the read: next round
                # A traceback for every Redis restart between the read and the write (review of
                # this stop's changes: a relay whose Redis stopped mid-round).
                log.warning("relay maintenance: the registry stopped answering during the round (%s); tried "
                            "again next round", exc.__class__.__name__)
            except Exception:  # what is not the registry's: say where
                log.exception("relay maintenance failed")

    async def _read_standing(self, loop: asyncio.AbstractEventLoop) -> frozenset[str]:
        """Read who is enrolled and who is revoked; the revoked ones."""
        started = time.monotonic()
        enrolled, revoked = await loop.run_in_executor(None, self.store.standing)
        self._enrolled, self._revoked = frozenset(enrolled), frozenset(revoked)
        self._known |= enrolled
        # an admission before this read began is in it, or its record is gone since
        self._admitted = {c: at for c, at in self._admitted.items() if at >= started}
        return self._revoked

    def admitted(self, connector: str) -> None:
        """A link from *connector* was let in on its registry record, just read."""
        self._admitted[connector] = time.monotonic()

    def _standing(self, connector: str) -> bool:
        return connector in self._enrolled or connector in self._admitted

    def _end_replaced(self, revoked: frozenset[str]) -> None:
        """Fail what the replaced links of revoked connectors (or of ones no longer in the
        registry) still carry, and close them: out of routing, they had a grace to answer, and a
        late "success" of theirs was taken after the revocation had closed the newer link
        (review of stop 42)."""
        for name, state in self.hub.connectors.items():
            if name not in revoked and self._standing(name):
                continue
            for session in list(state.links):
                if session.closing and (session.pending or not session.ws.closed):
                    session.lost()
                    if not session.ws.closed:
                        self._end(session, 4003, b"revoked")

    async def _check_ca_safely(self, loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`_check_ca`, whose failure never keeps the round from reading revocations: a
        value under the CA key that raised anything but ValueError (a private key that is
        encrypted, of an unsupported type) failed every round before the registry was read, and
        a revoked connector kept its link (review of the relay, items left). Redis not answering
        is raised (the round's registry warning)."""
        try:
            await loop.run_in_executor(None, self._check_ca)
        except STORE_ERRORS:
            raise
        except Exception:  # noqa: BLE001 - not the registry's: said, and the round goes on
            log.exception("relay: the check of the relay CA in Redis failed")

    def _check_ca(self) -> None:
        """Write this instance's CA back to Redis when Redis lost it (SET NX: never over
        another's), and say when Redis holds another one (:attr:`ca_conflict`). A CA lost from
        Redis stayed lost: the next instance to start made its own and wrote it, one that
        restarted then adopted it over the one its connectors were enrolled with, and links
        were refused by the TLS handshake at one instance or the other (review of the relay side)."""
        if self._ca_own is None:  # this instance's CA does not change while it runs
            self._ca_own = (self.ca.key_pem, self.ca.pem.encode())
        try:
            key_pem, cert_pem, written = self.store.shared_ca(*self._ca_own)
            # Parsed only when it changed since the last round (it is read every second): the
            # same bytes are the same CA.
            if self._ca_seen is None or self._ca_seen[:2] != (key_pem, cert_pem):
                try:
                    seen = RelayCA.from_pem(key_pem, cert_pem).fingerprint
                except (ValueError, TypeError, UnsupportedAlgorithm):
                    # An encrypted or unsupported key raises TypeError or UnsupportedAlgorithm:
                    # it failed every round before the registry was read (_check_ca_safely).
                    seen = _NOT_A_CA
                self._ca_seen = (key_pem, cert_pem, seen)
            fingerprint = self._ca_seen[2]
        except ValueError:  # garbage under the key: not ours to overwrite either
            fingerprint, written = _NOT_A_CA, False
        if written:
            log.warning("relay: the relay CA was missing in Redis (its data lost, evicted, a failover?); this "
                        "instance wrote its own back (SHA-256 %s)", self.ca.fingerprint)
        if fingerprint == self.ca.fingerprint:
            if self._ca_other:
                log.warning("relay: Redis holds this instance's relay CA again (SHA-256 %s)", self.ca.fingerprint)
            self._ca_other, self.ca_conflict = "", ""
        elif fingerprint != self._ca_other:  # said once per CA found there
            self._ca_conflict(fingerprint, log)

    def _ca_conflict(self, fingerprint: str, logger) -> None:
        self._ca_other = fingerprint
        self.ca_conflict = (f"Redis holds another relay CA (SHA-256 {fingerprint}) than this instance's "
                            f"(SHA-256 {self.ca.fingerprint}): connectors enrolled with one are refused by "
                            "the instances using the other. This instance keeps its own and overwrites "
                            "nothing. Keep the CA the connectors were enrolled with: delete the key "
                            f"{self.settings.redis.key_prefix}ca (an instance holding it writes it back within "
                            "a second), then restart the instances that made the other one after moving their "
                            f"STATE_DIR/relay/ca away (here: {self.state_dir / 'relay' / 'ca'})")
        logger.error("relay: %s", self.ca_conflict)

    def _end(self, session, code: int, message: bytes) -> None:
        """Close *session*'s link (already out of routing) in a task of its own: a close waits
        for the link's writes to drain, and a connector that stops reading would hold it until
        the write guard (``limits.write_timeout``) cut it, and with it every other revocation,
        expiry and heartbeat of this round (review of the relay)."""
        task = asyncio.get_running_loop().create_task(close_link(session.ws, code, message))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    # -- calling connectors from worker threads ------------------------------------------------------

    def _call(self, type_: str, body: dict[str, Any], timeout: float, *, retry: bool,
              password: str | None = None) -> tuple[dict[str, Any], str]:
        """The answer's body and the id of the connector that answered (:meth:`Hub.ask`)."""
        if self.loop is None:
            raise Unreachable("relay.no_connector", "the relay is not serving")
        future = asyncio.run_coroutine_threadsafe(
            self.hub.ask(self.settings.connection, type_, body, timeout, retry=retry, password=password), self.loop)
        try:
            return future.result(timeout + 0.5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Unreachable("relay.timeout") from None

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        if attempt.password is None:
            return None
        body = {"username": attempt.password.username, "client": str(attempt.client),
                "request_id": attempt.request_id, "front_door": attempt.front_door}
        try:
            # connector: the link this relay sent the password on (Hub.ask), for the audit line's
            # answered_by on whatever comes of its answer, refusals of the answer included
            answer, connector = self._call("authenticate", body, attempt.time_left(), retry=False,
                                           password=attempt.password.password)
        except Unreachable as exc:
            attempt.note(Outcome.UNAVAILABLE, step=self.name, reason=exc.reason, offline=exc.offline,
                         answered_by=exc.connector)
            return None
        try:
            outcome = Outcome(answer.get("outcome"))
            reason = answer.get("reason") or ""
            if not isinstance(reason, str) or not _REASON.fullmatch(reason):
                # logged and audited: a code only; the outcome stands (a step of the
                # connector's may give free text)
                reason = "relay.bad_reason"
            identity = _identity(answer.get("identity"), self.name) if outcome is Outcome.SUCCESS else None
        except (ValueError, TypeError, KeyError):
            log.warning("connector %s answered a malformed decision; denied", connector)
            return Decision.deny(Outcome.ERROR, step=self.name, reason="relay.bad_answer", answered_by=connector)
        if identity is not None and not self._answers_for(attempt.password.username, identity.username):
            return Decision.deny(Outcome.ERROR, step=self.name, reason="relay.identity_mismatch",
                                 answered_by=connector)
        if outcome in (Outcome.USER_NOT_FOUND, Outcome.UNAVAILABLE):
            # A connector that answers its directory is down has had its own cache's say (it
            # knows what that directory refused since): this relay's cache answers only while no
            # connector does (relay.no_connector, relay.timeout, relay.link_lost, ...).
            attempt.note(outcome, step=self.name, reason=reason or f"relay.{outcome.value}",
                         offline=outcome is not Outcome.UNAVAILABLE, answered_by=connector)
            return None
        if outcome not in _DECIDING:
            return None
        if outcome is Outcome.SUCCESS:
            # A connector's cache answer stays one here: settled as a live success it would
            # clear this relay's throttle counts, and be stored by its cache as a live login.
            return Decision.allow(identity, step=self.name, reason=reason,
                                  from_cache=answer.get("from_cache") is True, answered_by=connector)
        return Decision.deny(outcome, step=self.name, reason=reason, answered_by=connector)

    @property
    def looks_up_users(self) -> bool:
        """Whether this step's ``None`` to the lookup just made (in this context) means "no such
        user": not when the connector that answered it said its directory cannot look anyone up
        (``looked_up: false``: the ldap plugin with ``direct_bind`` and no service account). The
        credential cache reads it as each forget is decided (``_looks_up_users``): a Kerberos
        login at the relay, or a login session's recheck, took that connector's ``found: false``
        for a deleted account and forgot the password the ``relay`` step proved, which then got
        503 in the next outage of the link (items left by the review of the ldap plugin)."""
        return _LOOKED_UP.get()

    @hookimpl
    def gateway_lookup_user(self, username: str) -> Identity | None:
        _LOOKED_UP.set(True)  # a lookup that raises or finds says nothing of the connector's directory
        try:
            answer, _ = self._call("lookup_user", {"username": username}, 5.0, retry=True)
        except Unreachable as exc:
            raise BackendUnavailable(f"no connector answered: {exc.reason}") from None
        if not answer.get("found"):
            # Only an explicit false counts: a connector that does not say (an older version)
            # is taken at its word, as before, and the cache forgets (fail closed).
            _LOOKED_UP.set(answer.get("looked_up") is not False)
            return None
        try:
            identity = _identity(answer.get("identity"), self.name)
        except (ValueError, TypeError, KeyError):
            raise BackendUnavailable("relay.bad_answer: a malformed identity") from None
        if not self._answers_for(username, identity.username):
            raise BackendUnavailable("relay.identity_mismatch: the connector answered for another user")
        return identity

    @hookimpl
    def gateway_answerer_revoked(self, answered_by: str) -> bool | None:
        """Whether the connector a cached answer or a login session rests on was revoked: the
        cache then forgets it and the session ends, so a connector revoked for vouching falsely
        stops vouching within a maintenance round (a second), as its link closes. Only the ids
        of this relay's connection (``CONNECTION-xxxxxxxx``, exactly: ``acme`` does not answer
        for ``acme-eu``'s). From memory (asked on the event loop); before the first read of the
        registry nobody can tell, and nothing is answered on its word (fail closed). An id the
        registry lists as revoked is revoked whatever its name: one enrolled with a reusable
        ticket before ids were checked whole (``acme-x-0a1b2c3d``) escaped this by its name. One
        of this connection's ids the registry listed before and no longer lists (its record lost
        with a Redis's data, where ``relay revoke`` cannot name it) counts as revoked too, unless
        this process let a link from it in since that read; one it never listed cannot be told
        yet (enrolled since that read, at another worker or instance: not ended for that)."""
        revoked = self._revoked
        ours = answered_by.rpartition("-")[0] == self.settings.connection
        if not ours and (revoked is None or answered_by not in revoked):
            return None
        if revoked is None:
            raise BackendUnavailable("relay: the revoked connectors were not read yet")
        if answered_by in revoked or not ours or self._standing(answered_by):
            return answered_by in revoked
        if answered_by in self._known:
            return True
        raise BackendUnavailable(f"relay: connector {answered_by} is not in the registry as last read")

    def _answers_for(self, asked: str, answered: str) -> bool:
        """Whether a connector's identity *answered* is the user *asked* for (``answered_names``);
        else it is logged. A connector that answered a login or a look-up of one user with
        another's identity signed that user in as the other, while this relay's audit line and
        cache named the one asked for (review of the relay's trust in connectors)."""
        if self.settings.answered_names == "any" or same_user(asked, answered):
            return True
        log.warning("relay: a connector of %s answered for %s as %s; refused (relay.answered_names: any, "
                    "if that connection's directory signs login names in as other account names)",
                    self.settings.connection, printable(asked), printable(answered))
        return False

    @hookimpl
    def gateway_search_users(self, query: str, limit: int, cursor: str | None) -> UserPage | None:
        body = {"query": query, "limit": max(1, min(int(limit), proto.MAX_SEARCH_LIMIT)), "cursor": cursor}
        try:
            answer, _ = self._call("search_users", body, 10.0, retry=True)
        except Unreachable as exc:
            if exc.reason == "relay.connector_error" and str(exc).startswith("bad_request:"):
                raise ValueError(str(exc)) from None  # the caller's cursor or query
            raise BackendUnavailable(f"no connector answered: {exc.reason}") from None
        if not answer.get("found"):
            return None
        return search_page(answer)

    @hookimpl
    def gateway_list_groups(self, username: str) -> list[str] | None:
        try:
            answer, _ = self._call("list_groups", {"username": username}, 10.0, retry=True)
        except Unreachable as exc:
            raise BackendUnavailable(f"no connector answered: {exc.reason}") from None
        if not answer.get("found"):
            return None
        groups = answer.get("groups")
        try:
            if not isinstance(groups, list) or len(groups) > 10_000:
                raise TypeError("groups must be a list")
            return [_text(g) for g in groups]
        except TypeError as exc:
            # The hook's word for an answer it cannot take: a group that is no text (a number,
            # a lone surrogate) raised TypeError through it, a 500 in the plugin that asked
            # (review of the relay side).
            raise BackendUnavailable(f"relay.bad_answer: {exc}") from None

    @hookimpl
    def gateway_probe(self) -> None:
        """PING a Redis store (see Health in the module docstring). Its own client, made here in
        the worker: the store's client serves the executor's threads, whose calls may queue."""
        if self.settings.redis is None:
            return
        if self._store_probe is None:
            # the serving store's eviction watch: what the probe finds gates enrolment (endpoints.py)
            self._probe_client = RedisStore(self.settings.redis, eviction=self.store.eviction)
            self._store_probe = StoreProbe(f"{self.name}.store", self._probe_client.ping)
        self._store_probe.probe()

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState]:
        links = [s for s in self.hub.sessions.get(self.settings.connection, ()) if s.ready and not s.closing]
        # required: a ready store alone must not make the step look able to answer.
        states = [ComponentState(f"{self.name}.{self.settings.connection}", bool(links),
                                 f"{len(links)} connector link(s): " + ", ".join(s.connector for s in links)
                                 if links else "no connector linked", required=True)]
        if self._store_probe is not None:
            states.append(self._store_probe.state())
        if self.ca_conflict:  # not required: the links held here still serve
            states.append(ComponentState(f"{self.name}.ca", False, self.ca_conflict))
        return states

    @hookimpl
    def gateway_shutdown(self) -> None:
        self.store.close()
        if self._probe_client is not None:
            self._probe_client.close()


def _text(value: Any, limit: int = 1024) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no text, no header
            raise TypeError("expected text, not a lone surrogate") from None
    return value[:limit]


def same_user(asked: str, answered: str) -> bool:
    """Whether *answered*, the name in a connector's identity, is the user *asked* for: the same
    name in any case or spacing (directories ignore both), or one is the other's account name
    with a domain: ``alice@corp.example`` or ``CORP\\alice`` typed and ``alice`` answered (the
    ldap plugin's AD preset), or ``alice`` typed and ``alice@corp.example`` answered (a connector
    whose ``username`` attribute is the UPN)."""
    asked, answered = folded_username(asked), folded_username(answered)
    if not answered or not asked:
        return False
    return asked == answered or _account(asked) == answered or _account(answered) == asked


def _account(name: str) -> str | None:
    """The account name in ``name@domain`` or ``DOMAIN\\name``, else None."""
    local, at, domain = name.rpartition("@")
    if at and local and domain:
        return local
    domain, backslash, account = name.partition("\\")
    return account if backslash and domain and account else None


def _identity(data: Any, method: str = "relay") -> Identity:
    """An identity from a connector's answer, every field type-checked and bounded. Its
    ``method`` is *method*, the relay step's name, whatever the answer says: the relay asked for
    a password check, and the login doors state the method to relying parties (SAML's
    AuthnContextClassRef, WS-Fed's AuthenticationMethod, OIDC's ``acr``). A connector answering
    ``kerberos`` or ``client_cert`` had a password sign-in stated as Kerberos or X509, meeting
    what an SP asked of a stronger one (review of the relay side)."""
    if not isinstance(data, dict):
        raise TypeError("identity must be an object")
    username, subject = data["username"], data["subject"]
    if not isinstance(username, str) or not 0 < len(username) <= 256 or not username.isprintable():
        raise TypeError("username must be a printable name of at most 256 characters")
    if not isinstance(subject, str) or not subject or not subject.isprintable():
        raise TypeError("subject must be printable text")
    groups = data.get("groups", [])
    if not isinstance(groups, list) or len(groups) > 10_000:
        raise TypeError("groups must be a list")
    claims = data.get("claims", {})
    if not isinstance(claims, dict):
        raise TypeError("claims must be an object")
    return Identity(subject=_text(data["subject"]), username=_text(data["username"], 256),
                    method=method,
                    display_name=_text(data.get("display_name", "")), email=_text(data.get("email", "")),
                    groups=tuple(_text(g) for g in groups), claims=claims,
                    # The relay's own clock, as the answer comes: the proof is this call's. The
                    # connector's value was taken as it came, NaN and Infinity included, which
                    # made /v1/authenticate's JSON invalid and SAML's AuthnInstant an error.
                    authenticated_at=time.time(),
                    account_state=_text(data.get("account_state", ""), 100),
                    password_state=_text(data.get("password_state", ""), 100))



def search_page(answer: dict[str, Any]) -> UserPage:
    """A page from a connector's ``search_users`` answer, every field type-checked and bounded."""
    users, cursor = answer.get("users"), answer.get("next_cursor")
    try:
        if not isinstance(users, list) or len(users) > proto.MAX_SEARCH_LIMIT:
            raise TypeError("users must be a list")
        if cursor is not None:
            cursor = _text(cursor)
        return UserPage(tuple(_identity(u) for u in users), cursor)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise BackendUnavailable(f"relay.bad_answer: {exc}") from None
