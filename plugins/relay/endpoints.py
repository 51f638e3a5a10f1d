"""The relay listener's routes: enrolment (``GET|POST /p/{token}``) and the link (``GET /link``,
a WebSocket over mutual TLS).

The listener asks for a client certificate but does not require one (``CERT_OPTIONAL``): a
connector enrolling has none yet, and both routes share the one public port (443 through the
firewall). OpenSSL verifies a presented certificate against the relay CA, validity included, so
the link handler only has to insist that one was presented, then checks the registry: the
connector is known, its connection matches, it is not revoked.

Every refusal is a 4xx with ``{"error": CODE, "detail": ...}``; nothing a client sends can
produce a 5xx (bodies are size-capped, JSON is type-checked, the CSR is parsed defensively).
When the registry cannot be read (its Redis is down), enrolment and new links are refused with
503 ``store_unavailable``: no connector, revoked or not, gets a link its registry entry was not
checked for (the links already up go on; ``/readyz`` shows ``relay.store``). While that Redis
may evict keys (``maxmemory`` with a policy other than ``noeviction``), enrolment is refused the
same way: an evicted record would free a revoked connector's id for a new enrolment.

Before the registry is read, new links are bounded in rate per connector id (429
``too_many_dials``) and requests without a certificate per client address (429
``too_many_requests``): :data:`.hub.DIAL_RATE`, :data:`.hub.ANONYMOUS_RATE`, budgets of the
relay as a whole, each worker holding its share (:class:`.hub.DialBudgets`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import secrets
import sqlite3
import time
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestPayloadError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gateway import UserPage
from gateway.http.app import read_body
from gateway.plugins import linkproto as proto

from .ca import CSRRefused
from .hub import ANONYMOUS_BURST, ANONYMOUS_RATE, DIAL_BURST, DIAL_RATE, MAX_LINKS, MAX_PROBES, LinkSession, \
    Unreachable
from .store import TicketRefused

if TYPE_CHECKING:
    from . import RelayPlugin

try:
    from redis import RedisError
except ImportError:  # authgw[redis] not installed: the SQLite registry only
    RedisError = sqlite3.Error
#: The registry's own failures (not a refusal of what the client sent).
STORE_ERRORS = (sqlite3.Error, RedisError)

__all__ = ["Endpoints"]

log = logging.getLogger("authgw.plugin.relay")

_MAX_CSR_BODY = 16 * 1024
#: A link that sends this many refused frames is closed (a confused or hostile peer).
_MAX_BAD_FRAMES = 20
#: Seconds a link replaced by a newer one of its connector has to answer what it carries.
_REPLACED_GRACE = 5.0
#: Seconds a new link has to say hello (probe or not) before it is closed (1008): a connector
#: sends it first thing and gives up on it after 10 s itself; a link that says nothing holds a
#: connection and one of its connector's MAX_LINKS for nothing.
_HELLO_TIMEOUT = 10.0
#: Close codes (docs/link-protocol.md#the-link).
_CLOSE_VERSION, _CLOSE_REPLACED, _CLOSE_TOO_MANY = 4002, 4004, 4005
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _refuse(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers={"Cache-Control": "no-store"})


def _same_key(pem: str, cert: x509.Certificate) -> bool:
    """Whether the certificate *pem* (the registry's) and *cert* hold the same public key."""
    try:
        recorded = x509.load_pem_x509_certificate(pem.encode()).public_key()
    except ValueError:
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return (recorded.public_bytes(serialization.Encoding.DER, spki)
            == cert.public_key().public_bytes(serialization.Encoding.DER, spki))


def _closing(request: web.Request, response: web.Response) -> web.Response:
    """*response*, and the connection closed right after it: what is left of a body is not
    waited for (gateway.http.protocol.GuardedRequestHandler.no_linger)."""
    response.force_close()
    no_linger = getattr(request.protocol, "no_linger", None)
    if no_linger is not None:
        no_linger()
    return response


class StoreUnavailable(Exception):
    """The registry did not answer (``/readyz`` shows it as ``relay.store``)."""


def _unavailable() -> web.Response:
    return _refuse(503, "store_unavailable", "the relay cannot read its registry now; try again later")




def _new_connector_id(connection: str) -> str:
    return f"{connection}-{secrets.token_hex(4)}"


async def _send(ws: web.WebSocketResponse, frame: str) -> None:
    """Send unless the peer already went away (its problem, not a server error)."""
    try:
        await ws.send_str(frame)
    except ConnectionError:
        pass


async def _pong(ws: web.WebSocketResponse, payload: bytes) -> None:
    """Answer a ping (RFC 6455 5.5.3: the same payload), unless the peer already went away."""
    try:
        await ws.pong(payload)
    except ConnectionError:
        pass


def _network(request: web.Request) -> str:
    """The client a request comes from, as the rate bound before identification counts it: its
    address, an IPv6 one by its /64 (one host holds a whole /64), an IPv4-mapped one as IPv4."""
    remote = request.remote or ""
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _token(request: web.Request) -> str | None:
    token = request.match_info.get("token", "")
    return token if 20 <= len(token) <= 100 and set(token) <= _TOKEN_CHARS else None


class Endpoints:
    def __init__(self, plugin: RelayPlugin, door) -> None:
        self.plugin = plugin
        self.door = door
        self.settings = plugin.settings

    def _anonymous_refusal(self, request: web.Request) -> web.Response | None:
        """A 429 (connection closed) when the request's client spent its budget of requests
        before identification (:data:`~.hub.ANONYMOUS_RATE`), else None. Checked before the
        registry is read or a body waited for."""
        key = _network(request)
        budgets = self.plugin.hub.anonymous
        if budgets.take(key):
            return None
        count = budgets.should_log(key)
        if count is not None:
            log.warning("refused %d request(s) from %s at the relay listener without a connector certificate "
                        "(enrolment or a link without one) beyond %d, then %g a second; said at most once a minute",
                        count, key, ANONYMOUS_BURST, ANONYMOUS_RATE)
        return _closing(request, _refuse(429, "too_many_requests", "too many requests from this address; "
                                         "try again in a few seconds"))

    def _evicting(self, request: web.Request) -> web.Response | None:
        """A 503 while the registry's Redis may evict keys (the health probe's finding), else
        None. Enrolment is what an eviction turns into a fail-open: a connector's record evicted
        (``allkeys-*``) makes its id free again, and a revoked connector's id enrolled anew was
        no longer revoked; tickets expire, so a ``volatile-*`` policy evicts them first. The
        links already up, new links of enrolled connectors (a record evicted is refused) and
        revocations go on; ``/readyz`` shows ``relay.store`` not ready, saying why."""
        problem = getattr(self.plugin.store, "evicting", None)
        if problem is None:
            return None
        log.info("relay: refused an enrolment request: the registry's Redis may evict keys")
        return _closing(request, _refuse(503, "store_unavailable", "the relay's registry may lose keys now "
                                         "(its Redis evicts keys); enrolment is closed until the operator fixes it"))

    async def _store(self, method, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, method, *args)
        except STORE_ERRORS as exc:
            # INFO: the health round already said it at WARNING, once; connectors retry often.
            log.info("relay registry unavailable (%s): refused %s", exc.__class__.__name__, method.__name__)
            raise StoreUnavailable() from None

    # -- enrolment ---------------------------------------------------------------------------------

    async def ticket_info(self, request: web.Request) -> web.Response:
        refused = self._anonymous_refusal(request) or self._evicting(request)
        if refused is not None:
            return refused
        token = _token(request)
        if token is None:
            return _refuse(404, "ticket_unknown", "no such ticket; ask the relay operator for a new one")
        try:
            connection, connector, expires = await self._store(self.plugin.store.ticket, token, time.time())
        except TicketRefused as exc:
            return _refuse(410 if exc.code != "ticket_unknown" else 404, exc.code, exc.detail)
        except StoreUnavailable:
            return _unavailable()
        if not connector:  # a reusable ticket: each enrolment gets a new id
            connector = _new_connector_id(connection)
        return web.json_response({"protocol": proto.VERSION, "connection": connection, "connector": connector,
                                  "expires": expires, "csr_subject": f"CN={connector}", "key": "P-256",
                                  "link_url": self.plugin.link_url}, headers={"Cache-Control": "no-store"})

    async def enrol(self, request: web.Request) -> web.Response:
        # This listener is public and needs no credentials: nothing is read or kept open for a
        # request that cannot be a real enrolment (no such ticket, a body too large), and the
        # body must arrive within limits.body_timeout. Before, a slow body held the connection
        # for ever: a few thousand of them filled max_connections and stopped every listener.
        refused = self._anonymous_refusal(request) or self._evicting(request)
        if refused is not None:
            return refused
        token = _token(request)
        if token is None:
            return _closing(request, _refuse(404, "ticket_unknown",
                                             "no such ticket; ask the relay operator for a new one"))
        too_large = f"the request body is limited to {_MAX_CSR_BODY} bytes"
        if (request.content_length or 0) > _MAX_CSR_BODY:
            return _closing(request, _refuse(413, "too_large", too_large))
        try:
            await self._store(self.plugin.store.ticket, token, time.time())
        except TicketRefused as exc:
            return _closing(request, _refuse(410 if exc.code != "ticket_unknown" else 404, exc.code, exc.detail))
        except StoreUnavailable:
            return _closing(request, _unavailable())
        try:
            body = await asyncio.wait_for(read_body(request, _MAX_CSR_BODY),
                                          self.door.gateway.settings.limits.body_timeout)
        except asyncio.TimeoutError:
            return _closing(request, _refuse(400, "bad_request", "the body did not arrive in time"))
        except RequestPayloadError:  # a Content-Encoding that does not decode
            return _closing(request, _refuse(400, "bad_request", "the body could not be decoded"))
        if len(body) > _MAX_CSR_BODY:
            return _closing(request, _refuse(413, "too_large", too_large))
        try:
            data = json.loads(body)
            csr = data["csr"] if isinstance(data, dict) else None
            if not isinstance(csr, str):
                raise ValueError
        except (ValueError, KeyError, UnicodeDecodeError, RecursionError):  # deep JSON too: never a 500
            return _refuse(400, "bad_request", 'expected {"csr": "<PEM certificate request>"}')
        store = self.plugin.store
        reusable = False
        try:
            connection, connector, _ = await self._store(store.ticket, token, time.time())
            if not connector:  # reusable ticket: the CSR names a new id of this connection
                reusable = True
                connector = self.plugin.ca.requested_name(csr)
                # Exactly CONNECTION-<8 hex>, matched whole: a pattern with ``$`` let a final
                # newline through (an id that `relay revoke` could not name), and one that only
                # began with the connection let a connector choose ``acme-x-0a1b2c3d``, which
                # revocation took for another connection's (review of the relay).
                if not re.fullmatch(re.escape(connection) + r"-[0-9a-f]{8}", connector) \
                        or await self._store(store.connector, connector) is not None:
                    raise CSRRefused("csr_wrong_name", f"the CSR must name a new connector id: CN={connection}-"
                                     "<8 hex digits> (as GET on the ticket suggests)")
            # Sign before using the ticket up: a typo in the CSR should not cost a new ticket,
            # nor should a signing that fails (the connector got a 500 and lost its ticket).
            cert = self.plugin.ca.sign(csr, connector_id=connector, connection=connection,
                                       lifetime=self.settings.certificate_lifetime)
            used, _ = await self._store(store.use_ticket, token, time.time())
            if used != connection:  # not expected: a ticket keeps its connection
                connection = used
                cert = self.plugin.ca.sign(csr, connector_id=connector, connection=connection,
                                           lifetime=self.settings.certificate_lifetime)
        except TicketRefused as exc:
            return _refuse(410 if exc.code != "ticket_unknown" else 404, exc.code, exc.detail)
        except CSRRefused as exc:
            return _refuse(400, exc.code, exc.detail)
        except StoreUnavailable:
            return _unavailable()
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        try:
            if reusable:  # the id must still be new: two enrolments naming it at once, one wins
                if not await self._store(store.add_connector, connector, connection, cert.serial_number,
                                         cert.not_valid_after_utc.timestamp(), pem):
                    # Not this ticket's fault: its use counts again (a refused CSR does not burn it).
                    await self._store(store.give_back, token)
                    return _refuse(400, "csr_wrong_name", f"{connector} was enrolled meanwhile; name a new id")
            else:
                await self._store(store.record_connector, connector, connection, cert.serial_number,
                                  cert.not_valid_after_utc.timestamp(), pem)
        except StoreUnavailable:  # the ticket is used up, the certificate not recorded: it cannot link
            return _unavailable()
        log.info("connector %s of %s enrolled (certificate serial %x, valid until %s)", connector, connection,
                 cert.serial_number, cert.not_valid_after_utc.isoformat())
        return web.json_response({
            "protocol": proto.VERSION, "connection": connection, "connector": connector,
            "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            "ca": self.plugin.ca.pem, "link_url": self.plugin.link_url,
        }, headers={"Cache-Control": "no-store"})

    # -- operators' view (main listener, API token) -------------------------------------------------

    async def connectors(self, request: web.Request) -> web.Response:
        """``GET /v1/relay/connectors``: the links this relay process holds, live."""
        if self.door.api_client(request) is None:
            return _refuse(401, "unauthorized", "a valid API token is required")
        hub = self.plugin.hub
        return web.json_response({"connection": self.settings.connection, "links": [
            {"connector": s.connector, "version": s.version, "ready": s.ready, "probe": s.probe,
             "in_flight": s.in_flight, "served": s.served, "not_after": s.not_after} for s in hub.all()],
            # what each connector id holds here: open links (said hello or not, replaced ones until
            # closed) and its replay record (nonces and ids), against their limits
            "connectors": [{"connector": name, "open_links": len(state.links),
                            "probes": sum(1 for s in state.links if s.probe),
                            "replay_entries": len(state.guard), "replay_capacity": state.guard.max_entries}
                           for name, state in hub.connectors.items()]},
            headers={"Cache-Control": "no-store"})

    async def selftest(self, request: web.Request) -> web.Response:
        """``POST /v1/relay/selftest``: one connector runs its self-tests (the configuration log)
        and answers over the link."""
        if self.door.api_client(request) is None:
            return _refuse(401, "unauthorized", "a valid API token is required")
        try:
            body = await self.plugin.hub.call(self.settings.connection, "selftest", {}, 20.0, retry=True)
        except Unreachable as exc:
            return _refuse(503, exc.reason, str(exc))
        results = body.get("results")
        if not isinstance(results, list):
            return _refuse(502, "relay.bad_answer", "the connector's answer has no results")
        answer: dict = {"results": results}
        ran_at = body.get("ran_at")  # when the connector's run began: results are reused for minutes
        if isinstance(ran_at, (int, float)) and not isinstance(ran_at, bool) and math.isfinite(ran_at):
            answer["ran_at"] = ran_at
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def users(self, request: web.Request) -> web.Response:
        """``GET /v1/relay/users?q=TEXT&limit=N&cursor=C``: one page of a directory search on a
        connector (login name prefix, display name substring; docs/link-protocol.md)."""
        if self.door.api_client(request) is None:
            return _refuse(401, "unauthorized", "a valid API token is required")
        query, cursor = request.query.get("q", ""), request.query.get("cursor") or None
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return _refuse(400, "bad_request", "`limit` must be an integer")
        if not 1 <= limit <= proto.MAX_SEARCH_LIMIT or len(query) > 256 or len(cursor or "") > 1024:
            return _refuse(400, "bad_request", f"`limit` 1-{proto.MAX_SEARCH_LIMIT}, `q` at most 256 characters")
        body = await self._directory("search_users", {"query": query, "limit": limit, "cursor": cursor})
        if isinstance(body, web.Response):
            return body
        from . import search_page  # the package imports this module first

        try:
            page = search_page(body) if body.get("found") else UserPage(())
        except Exception as exc:  # BackendUnavailable: a malformed answer
            return _refuse(502, "relay.bad_answer", str(exc)[:200])
        return web.json_response({"users": [_user(u) for u in page.users], "next_cursor": page.next_cursor},
                                 headers={"Cache-Control": "no-store"})

    async def groups(self, request: web.Request) -> web.Response:
        """``GET /v1/relay/users/{name}/groups``: a user's groups, nested ones resolved."""
        if self.door.api_client(request) is None:
            return _refuse(401, "unauthorized", "a valid API token is required")
        name = request.match_info["name"]
        if not 0 < len(name) <= 256:
            return _refuse(400, "bad_request", "the name must be 1-256 characters")
        body = await self._directory("list_groups", {"username": name})
        if isinstance(body, web.Response):
            return body
        if not body.get("found"):
            return _refuse(404, "not_found", "the directory does not know this user")
        groups = body.get("groups")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            return _refuse(502, "relay.bad_answer", "the connector's answer has no group list")
        return web.json_response({"username": name, "groups": groups}, headers={"Cache-Control": "no-store"})

    async def _directory(self, type_: str, body: dict) -> dict | web.Response:
        """A read-only request to one connector (retried on another when its link is lost)."""
        try:
            return await self.plugin.hub.call(self.settings.connection, type_, body, 10.0, retry=True)
        except Unreachable as exc:
            if exc.reason == "relay.connector_error" and str(exc).startswith("bad_request:"):
                return _refuse(400, "bad_request", str(exc)[len("bad_request: "):])
            return _refuse(503, exc.reason, str(exc))

    # -- the link ----------------------------------------------------------------------------------

    async def link(self, request: web.Request) -> web.StreamResponse:
        presented = self.door.tls_certificate(request)
        if presented is None:
            refused = self._anonymous_refusal(request)
            if refused is not None:
                return refused
            return _refuse(401, "certificate_required", "the link needs the connector certificate from enrolment")
        cert = x509.load_der_x509_certificate(presented.leaf)  # OpenSSL verified it against the relay CA
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        connector = names[0].value if names else ""
        connection = units[0].value if units else ""
        # New links are bounded in rate per connector id (the certificate's, verified), before
        # the registry is read: bounded in number only, one dialling in a loop cost a registry
        # read, an upgrade and two log lines a link, and other connectors' logins waited.
        dials = self.plugin.hub.dials
        if not dials.take(connector):
            count = dials.should_log(connector)
            if count is not None:
                log.warning("refused %d new link(s) of connector %s (last from %s): more than %d, then %g a "
                            "second; said at most once a minute (a connector dialling in a loop? a stolen key?)",
                            count, connector, request.remote, DIAL_BURST, DIAL_RATE)
            return _closing(request, _refuse(429, "too_many_dials", f"this connector opened more than {DIAL_BURST} "
                                             f"links, then {DIAL_RATE:g} a second; dial again in a few seconds"))
        try:
            known = await self._store(self.plugin.store.connector, connector)
        except StoreUnavailable:  # revocations cannot be checked: fail closed
            return _unavailable()
        if known is None or known.connection != connection:
            return _refuse(403, "unknown_connector", "this certificate names no enrolled connector")
        if connection != self.settings.connection:
            # Another connection's connector (its registry is shared): this relay forwards to
            # `relay.connection` only, so such a link would count as ready and serve nothing.
            log.warning("refused a link from connector %s of connection %s: this relay serves %s",
                        connector, connection, self.settings.connection)
            return _refuse(403, "wrong_connection", "this relay does not serve this connector's connection")
        if known.revoked is not None:
            log.warning("refused a link from revoked connector %s", connector)
            return _refuse(403, "revoked", "this connector was revoked; enrol again with a new ticket")
        now = time.time()
        if not cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp():
            # OpenSSL checks the dates on a full handshake only: a resumed TLS session brings back
            # a certificate that has expired since (re-enrol with a new ticket, not renew).
            log.warning("refused a link from connector %s: its certificate is not valid now", connector)
            return _refuse(403, "certificate_expired", "the link certificate is not valid now; enrol again "
                           "with a new ticket")
        if known.cert and not _same_key(known.cert, cert):
            # one key per connector: the registry's (renewal keeps it), not another certificate for the id
            log.warning("refused a link from connector %s: its key is not the one enrolled", connector)
            return _refuse(403, "unknown_connector", "this certificate is not the one enrolled for the connector")
        self.plugin.admitted(connector)
        # autoping off: pings and pongs reach the loop below, which counts them against the
        # connector's budget (Hub.control_frame) and answers the pings itself. The heartbeat
        # does not need it: any frame received ends its wait for a pong.
        ws = web.WebSocketResponse(heartbeat=self.settings.ping_interval, max_msg_size=proto.MAX_FRAME,
                                   autoping=False, compress=False)  # no frame is inflated on the loop
        session = LinkSession(ws, connector, connection, cert.public_key(), cert.not_valid_after_utc.timestamp(),
                              peer=str(request.remote))
        hub = self.plugin.hub
        # Counted (and given its connector's shared replay record) before the upgrade, with no
        # await in between: one connector id holds at most MAX_LINKS, however fast it dials.
        if not hub.admit(session, self.settings.max_clock_skew):
            return _refuse(429, "too_many_links", f"this connector holds {MAX_LINKS} links at this relay already "
                           "(its link, probes and links not past hello); close one, and give each connector "
                           "process its own enrolment")
        try:
            await ws.prepare(request)
        except BaseException:
            hub.release(session)
            raise
        hub.add(session)
        self.plugin.ensure_maintenance()
        log.info("connector %s of %s linked from %s", connector, connection, request.remote)
        no_hello = asyncio.get_running_loop().call_later(_HELLO_TIMEOUT, _close_without_hello, session)
        bad = 0
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.PING, WSMsgType.PONG):
                    if not hub.control_frame(session):
                        await _cut(request, ws, 1008, b"too many pings")
                        break
                    if msg.type == WSMsgType.PING:
                        await _pong(ws, msg.data)
                    continue
                if msg.type == WSMsgType.BINARY:
                    bad += 1
                    await _send(ws, proto.error(None, "bad_request", "text frames only"))
                elif msg.type != WSMsgType.TEXT:  # ERROR (e.g. an oversized frame: aiohttp closes 1009)
                    break
                else:
                    try:
                        # Deadlines are the connector's clock: one running behind could never
                        # say hello otherwise. The session's guard keeps nonces as long (decode).
                        message = proto.decode(msg.data, now=time.time(), skew=self.settings.max_clock_skew,
                                               guard=session.guard, accept=proto.CONNECTOR_TO_RELAY)
                    except proto.ProtocolError as exc:
                        bad += 1
                        if exc.peer_version is not None:  # answered in its version, so that it can read it
                            log.warning("connector %s speaks link protocol %d, this relay %d: closing its link "
                                        "(upgrade the connector)", connector, exc.peer_version, proto.VERSION)
                            await _send(ws, proto.error(exc.request_id, exc.code, exc.detail,
                                                        version=exc.peer_version))
                            await ws.close(code=_CLOSE_VERSION, message=b"unsupported link protocol version")
                            break
                        await _send(ws, proto.error(exc.request_id, exc.code, exc.detail))
                    else:
                        if message.is_request:
                            await _send(ws, await self._serve(session, message))
                            if session.refused:  # a probe beyond MAX_PROBES: told, then closed
                                await ws.close(code=_CLOSE_TOO_MANY, message=b"too many links of this connector")
                                break
                        elif not session.answered(message) and message.id:
                            bad += 1  # an answer to nothing this link asked (or a second one)
                if bad >= _MAX_BAD_FRAMES:
                    await ws.close(code=1008, message=b"too many refused frames")
                    break
        finally:
            no_hello.cancel()
            hub.remove(session)
            hub.release(session)
            log.info("connector %s link closed (%s)", connector, ws.close_code)
            if hub.router is not None and not hub.holds(connector):  # not when a newer link replaced it
                try:
                    # A ready link lost: every instance learns of the relink window (router.py).
                    await hub.router.unlinked(connection, connector, lost=session.dropped)
                except Exception as exc:  # the route entry goes stale; forwarders skip dead instances
                    log.warning("relay routing: cannot unregister %s: %s", connector, exc)
        return ws

    async def _serve(self, session: LinkSession, message: proto.Message) -> str:
        """Requests a connector sends: ``hello`` (first, marks the link ready), ``drain`` (it is
        stopping) and ``renew``."""
        if message.type == "hello":
            if message.body.get("probe") is True:  # `authgw check`: answered, never routed to, replaces nothing
                if not session.ready and not session.probe:
                    if not self.plugin.hub.may_probe(session):  # logged there, once per burst
                        session.refused = True
                        return proto.error(message.id, "too_many_links", f"this connector holds {MAX_PROBES} "
                                           "probe links at this relay already; try again when one is closed")
                    session.probe = True
                session.greeted = True
                return proto.answer(message.id, {"time": time.time(), "connector": session.connector,
                                                 "not_after": session.not_after})
            if session.closing:  # a newer link of this connector said hello first
                return proto.error(message.id, "unavailable", "a newer link of this connector replaced this one")
            version = message.body.get("version", "")
            # shown in `authgw relay connectors`: printable text only (a terminal's escapes are not)
            session.version = version[:64] if isinstance(version, str) and version.isprintable() else "?"
            try:  # recorded before the link is used: with the registry gone it fails closed, as a new link does
                await self._store(self.plugin.store.seen, session.connector, session.version,
                                  time.time() + 3 * self.settings.ping_interval)
                if self.plugin.hub.router is not None:
                    await self.plugin.hub.router.linked(session.connection, session.connector)
            except (StoreUnavailable, RedisError) as exc:
                if isinstance(exc, RedisError):  # the route; _store has said it for the registry
                    log.info("relay registry unavailable (%s): refused the hello of connector %s",
                             exc.__class__.__name__, session.connector)
                return proto.error(message.id, "unavailable", "the relay cannot record this link now; try again later")
            for old in self.plugin.hub.make_ready(session):
                # One link per connector id: a connector that lost its link (a network blip)
                # dials again before the old one is known dead, and must get its requests on the
                # new one; two processes sharing one enrolment (a copied key) show up here, in turn.
                log.warning("connector %s linked again from %s: closing its older link from %s",
                            session.connector, session.peer, old.peer)
                asyncio.ensure_future(_close_replaced(old))
            session.greeted = True
            return proto.answer(message.id, {"time": time.time(), "connector": session.connector,
                                             "not_after": session.not_after})
        if not session.greeted or session.probe:
            # A connector's link, after its hello: a probe link (`authgw check`) is answered and
            # never routed to, and renews nothing (review of the relay).
            return proto.error(message.id, "bad_request", f"{message.type} needs a link that said hello, not a probe")
        if message.type == "drain":
            session.draining = True
            log.info("connector %s is stopping: no new requests on its link", session.connector)
            return proto.answer(message.id, {"in_flight": session.in_flight})
        # renew: same name, same rules as enrolment, over the authenticated link
        csr = message.body.get("csr")
        if not isinstance(csr, str) or len(csr) > _MAX_CSR_BODY:
            return proto.error(message.id, "bad_request", "renew needs `csr`")
        try:  # revoked since the link was made: its link closes within a second; no new certificate meanwhile
            record = await self._store(self.plugin.store.connector, session.connector)
        except StoreUnavailable:
            return proto.error(message.id, "unavailable", "the relay cannot read its registry now; try again later")
        if record is None:  # a registry that lost it: its link is cut (maintenance), nothing renewed
            return proto.error(message.id, "forbidden", "this connector is not enrolled; enrol again with a new ticket")
        if record.revoked is not None:
            return proto.error(message.id, "forbidden", "this connector is revoked")
        try:
            cert = self.plugin.ca.sign(csr, connector_id=session.connector, connection=session.connection,
                                       lifetime=self.settings.certificate_lifetime)
        except CSRRefused as exc:
            return proto.error(message.id, "bad_request", f"{exc.code}: {exc.detail}")
        except ValueError as exc:  # the relay CA expired: answered, the link (and its loop) lives on
            log.error("cannot renew connector %s's certificate: %s", session.connector, exc)
            return proto.error(message.id, "internal", "the relay cannot sign certificates now")
        if cert.public_key().public_numbers() != session.public_key.public_numbers():
            # Renewal keeps the key the link was authenticated with; a new key needs a new ticket.
            return proto.error(message.id, "forbidden", "renewal must keep the connector's key")
        try:
            await self._store(self.plugin.store.record_connector, session.connector, session.connection,
                              cert.serial_number, cert.not_valid_after_utc.timestamp(),
                              cert.public_bytes(serialization.Encoding.PEM).decode())
        except StoreUnavailable:  # unrecorded, so not given: the connector keeps its certificate, asks again
            return proto.error(message.id, "unavailable", "the relay cannot record the renewal now; try again later")
        session.not_after = cert.not_valid_after_utc.timestamp()  # this link now runs on the new one
        log.info("connector %s renewed its certificate (valid until %s)", session.connector,
                 cert.not_valid_after_utc.isoformat())
        return proto.answer(message.id, {"certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                                         "ca": self.plugin.ca.pem})


def _close_without_hello(session: LinkSession) -> None:
    """The hello timeout: a link that has not said hello (answered) is closed (1008)."""
    if session.greeted or session.ws.closed:
        return
    log.info("connector %s: closing its link from %s, which said no hello within %gs", session.connector,
             session.peer, _HELLO_TIMEOUT)
    asyncio.ensure_future(close_link(session.ws, 1008, b"no hello in time"))


async def close_link(ws: web.WebSocketResponse, code: int, message: bytes) -> None:
    try:
        await ws.close(code=code, message=message)
    except ConnectionError:
        pass


async def _cut(request: web.Request, ws: web.WebSocketResponse, code: int, message: bytes) -> None:
    """Fail the WebSocket connection (RFC 6455 7.1.7): the close frame, then the TCP connection
    closed without waiting for the peer's close frame. A close waits up to 10 s for it, reading
    and dropping every frame before it: a connector flooding pings that never answers the close
    kept the relay parsing its flood all that time, link after link."""
    closing = asyncio.ensure_future(close_link(ws, code, message))
    await asyncio.sleep(0)  # its first step writes the close frame
    if request.transport is not None:
        request.transport.close()  # the close frame is still sent; what comes after reaches no parser
    await closing


async def _close_replaced(session: LinkSession) -> None:
    """Close a link a newer one of its connector replaced (already out of routing): what it
    carries gets up to :data:`_REPLACED_GRACE` seconds to be answered, then the close (the
    link's handler then fails what is left as ``relay.link_lost``; a password is never re-sent)."""
    if session.pending:
        await asyncio.wait(list(session.pending.values()), timeout=_REPLACED_GRACE)
    try:
        await session.ws.close(code=_CLOSE_REPLACED, message=b"replaced by a newer link of this connector")
    except ConnectionError:
        pass


def _user(identity) -> dict:
    return {"username": identity.username, "subject": identity.subject, "display_name": identity.display_name,
            "email": identity.email, "account_state": identity.account_state,
            "password_state": identity.password_state}
