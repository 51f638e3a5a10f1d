"""The link protocol between a connector (``link``) and a relay (``relay``), sans-I/O.

Both plugins import this module and nothing of each other. It holds no sockets, clocks or
threads: callers pass ``now`` (wall-clock seconds, :func:`time.time`) in and get typed messages
or JSON text out. docs/link-protocol.md is the specification for third parties.

Frames are WebSocket text frames holding one JSON object each:

* a **request** ``{"v": 2, "id", "type", "deadline", "nonce", "body"}``: ``deadline`` is a
  wall-clock Unix time (requests cross machines, so no monotonic clock can be shared), ``nonce``
  a one-time random string; the receiver refuses an expired request (``expired``), a nonce it
  has already seen (``replayed``), and a deadline too far ahead (``bad_request``), which bounds
  the memory a replay guard needs. Each end tolerates a configured clock skew with the other
  both ways (``decode(skew=)``), and remembers a nonce for as long as that makes its request
  acceptable.
* an **answer** ``{"v": 2, "id", "type": "answer", "body"}`` or an **error**
  ``{"v": 2, "id", "type": "error", "body": {"code", "detail"}}``, ``id`` being the request's.
  Error frames keep that shape in every version, so each end can read the other's refusal of
  its version.

Passwords travel sealed to the connector's public key with HPKE (RFC 9180, DHKEM(P-256,
HKDF-SHA256), HKDF-SHA256, AES-256-GCM) from ``cryptography``, with the request's context as
HPKE ``info`` (:func:`password_info`: id, nonce, deadline, the connector it is sealed for, and
the body fields that say what the password is for): a TLS-inspecting proxy sees ciphertext only,
and a sealed password lifted into a request that differs in any of those does not open.
Version 1 bound the id alone: a copy with a fresh nonce and another username opened.
"""

from __future__ import annotations

import base64
import heapq
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

try:  # HPKE is recent in cryptography; the link refuses to run without it (no home-made ECIES)
    from cryptography.hazmat.primitives import hpke
except ImportError:  # pragma: no cover - depends on the installed cryptography
    hpke = None

__all__ = [
    "ANSWER", "CONTROL_BURST", "CONTROL_RATE", "ERROR", "MAX_AHEAD", "MAX_FRAME", "MAX_SEARCH_LIMIT", "REQUEST_TYPES", "SEALED_FIELDS", "VERSION",
    "ControlBudget", "Message", "ProtocolError", "ReplayGuard", "Stamp", "answer", "decode", "error", "new_id", "new_stamp",
    "open_password", "password_info", "request", "seal_password", "utf8",
]

#: 2: the sealed password is bound to the request's whole context (version 1: to its id only).
VERSION = 2
#: Largest frame either side accepts (bytes); WebSocket readers are configured with it too.
MAX_FRAME = 64 * 1024
#: Largest ``deadline - now`` a receiver accepts (plus the clock skew it tolerates): nonces are
#: remembered this long (plus that skew), no longer.
MAX_AHEAD = 120.0
#: Most users one ``search_users`` answer holds: a page of profiles must fit one frame.
MAX_SEARCH_LIMIT = 100
#: WebSocket pings and pongs either end accepts from the other: a burst of :data:`CONTROL_BURST`,
#: then :data:`CONTROL_RATE` a second (:class:`ControlBudget`); beyond it the link is closed
#: (1008 "too many pings"). An honest end pings once per ``ping_interval`` and answers the
#: other's pings: a few a second at most.
CONTROL_BURST = 100
CONTROL_RATE = 50.0


class ControlBudget:
    """The WebSocket pings and pongs the other end may still send (a token bucket:
    :data:`CONTROL_BURST`, refilled at :data:`CONTROL_RATE` a second)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._tokens = float(CONTROL_BURST)
        self._at = clock()

    def spend(self) -> bool:
        """Take one frame; False when none is left (the link that sent it is to be closed)."""
        at = self._clock()
        self._tokens = min(float(CONTROL_BURST), self._tokens + max(0.0, at - self._at) * CONTROL_RATE)
        self._at = at
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

ANSWER, ERROR = "answer", "error"
#: Requests the relay sends to a connector, and those a connector sends to the relay.
RELAY_TO_CONNECTOR = frozenset({"authenticate", "lookup_user", "search_users", "list_groups", "selftest", "ping"})
CONNECTOR_TO_RELAY = frozenset({"hello", "renew", "drain"})
REQUEST_TYPES = RELAY_TO_CONNECTOR | CONNECTOR_TO_RELAY

#: Error codes (docs/link-protocol.md#errors).
ERROR_CODES = frozenset({"bad_request", "expired", "replayed", "unknown_type", "unavailable",
                         "forbidden", "internal", "not_found", "too_many_links"})


class ProtocolError(Exception):
    """A frame the receiver refuses; ``code`` is one of :data:`ERROR_CODES`. ``peer_version`` is
    set when the frame is of another protocol version: the refusal is then sent in that
    version's envelope (``error(..., version=peer_version)``) so that the peer can read it."""

    def __init__(self, code: str, detail: str, request_id: str | None = None, *,
                 peer_version: int | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.peer_version = peer_version


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded frame. ``deadline`` and ``nonce`` are set on requests only."""

    id: str
    type: str
    body: dict[str, Any] = field(repr=False)
    deadline: float | None = None
    nonce: str | None = None

    @property
    def is_request(self) -> bool:
        return self.type not in (ANSWER, ERROR)


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def new_id() -> str:
    return secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Stamp:
    """What makes one request unlike any other: its id, its one-time nonce and its deadline
    (wall-clock, rounded to the millisecond as it is sent). Made before the body when the body
    is bound to it (a sealed password), possibly by another relay instance (router.py)."""

    id: str
    nonce: str
    deadline: float


def new_stamp(*, now: float, timeout: float, request_id: str | None = None) -> Stamp:
    """A fresh stamp; *timeout* is capped at :data:`MAX_AHEAD`."""
    deadline = now + min(max(timeout, 0.0), MAX_AHEAD)
    return Stamp(request_id or new_id(), secrets.token_urlsafe(16), round(deadline, 3))


def request(type_: str, body: dict[str, Any], *, now: float | None = None, timeout: float | None = None,
            stamp: Stamp | None = None) -> tuple[str, str]:
    """A new request frame; returns ``(id, text)``. Give *now* and *timeout* for a fresh stamp,
    or the *stamp* the body was bound to (:func:`seal_password`)."""
    if type_ not in REQUEST_TYPES:
        raise ValueError(f"unknown request type {type_!r}")
    if stamp is None:
        if now is None or timeout is None:
            raise TypeError("request() needs `now` and `timeout`, or a `stamp`")
        stamp = new_stamp(now=now, timeout=timeout)
    return stamp.id, _dump({"v": VERSION, "id": stamp.id, "type": type_, "deadline": stamp.deadline,
                            "nonce": stamp.nonce, "body": body})


def answer(request_id: str, body: dict[str, Any]) -> str:
    return _dump({"v": VERSION, "id": request_id, "type": ANSWER, "body": body})


def error(request_id: str | None, code: str, detail: str, *, version: int = VERSION) -> str:
    """An error frame; *version* is another end's protocol version when refusing that version
    (:attr:`ProtocolError.peer_version`): error frames have the same shape in every version."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return _dump({"v": version, "id": request_id or "", "type": ERROR, "body": {"code": code, "detail": detail}})


def _not_json(name: str) -> None:
    """Python reads ``NaN`` and ``Infinity``, RFC 8259 JSON has no such numbers: a frame holding
    one is refused, so none reaches an identity, a claim or a JSON answer (review of the relay)."""
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent; ``1e400`` is valid JSON that Python reads as
    infinity, which no JSON answer can carry: refused as NaN is."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large a number")
    return value


def _unix_time(value: Any) -> float | None:
    """*value* as a finite float, or ``None`` when it is no JSON number or none a clock can hold:
    ``10**400`` is a valid JSON integer that :func:`math.isfinite` and :class:`float` refuse with
    an ``OverflowError`` (review of time: it dropped the link instead of refusing the frame)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _integer(text: str) -> int:
    """A JSON integer; one beyond what a float holds (``10**400``) is refused as ``1e400`` is:
    any arithmetic with a float on it raises ``OverflowError`` rather than ``ValueError``."""
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"{text[:20]}... is too large a number") from None
    return value


def utf8(text: str) -> bool:
    """Whether *text* encodes as UTF-8: JSON escapes can spell lone surrogates, which do not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode(text: str | bytes, *, now: float, guard: ReplayGuard | None = None,
           accept: frozenset[str] = REQUEST_TYPES, skew: float = 0.0) -> Message:
    """Parse and check one frame. Requests are checked for version, type (*accept*), deadline
    and, with *guard*, replay. Raises :class:`ProtocolError` with the code to answer.

    *skew* is the clock difference with the sender tolerated, either way: a deadline is stamped
    with the sender's clock, so a request is expired only when it passed more than *skew* ago
    by ours, and too far ahead beyond ``now + skew +`` :data:`MAX_AHEAD`. The guard then keeps
    its nonce until ``deadline + skew``, all the time it could be accepted again."""
    if not 0.0 <= skew < math.inf:  # a NaN would pass every deadline check
        raise ValueError(f"skew must be finite seconds >= 0, not {skew!r}")
    if len(text) > MAX_FRAME:
        raise ProtocolError("bad_request", f"frame larger than {MAX_FRAME} bytes")
    try:
        data = json.loads(text, parse_constant=_not_json, parse_float=_finite, parse_int=_integer)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested deeper than json can read: not ours
        raise ProtocolError("bad_request", "not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "a frame is a JSON object")
    request_id = data.get("id")
    # Not text in UTF-8 (a lone surrogate, "\ud800" in JSON): the id is echoed in the answer or the
    # refusal, a text frame that could not be sent (the read loop raised, the link dropped).
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 64 or not utf8(request_id):
        raise ProtocolError("bad_request", "`id` must be a string of 1-64 characters")
    version, type_, body = data.get("v"), data.get("type"), data.get("body")
    if version != VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and type_ == ERROR and isinstance(body, dict) \
                and isinstance(body.get("code"), str) and isinstance(body.get("detail"), str):
            return Message(request_id, ERROR, body)  # the other end's refusal, of our version perhaps
        peer = version if isinstance(version, int) and not isinstance(version, bool) and 0 < version < 2**31 else None
        raise ProtocolError("bad_request", f"unsupported link protocol version {repr(version)[:40]}; "
                                           f"this end speaks {VERSION}", request_id, peer_version=peer)
    if not isinstance(type_, str) or not isinstance(body, dict):
        raise ProtocolError("bad_request", "`type` must be a string and `body` an object", request_id)
    if type_ in (ANSWER, ERROR):
        if type_ == ERROR and not (isinstance(body.get("code"), str) and isinstance(body.get("detail"), str)):
            raise ProtocolError("bad_request", "an error needs `code` and `detail`", request_id)
        return Message(request_id, type_, body)
    if type_ not in accept:
        raise ProtocolError("unknown_type", f"request type {type_[:40]!r} is not served here", request_id)
    deadline, nonce = _unix_time(data.get("deadline")), data.get("nonce")
    if deadline is None:
        raise ProtocolError("bad_request", "`deadline` must be a Unix time", request_id)
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise ProtocolError("bad_request", "`nonce` must be a string of 16-64 characters", request_id)
    if deadline < now - skew:
        beyond = f", more than the {skew:g}s of clock skew tolerated" if skew else ""
        raise ProtocolError("expired", f"deadline passed {now - deadline:.3f}s ago{beyond}", request_id)
    if deadline > now + skew + MAX_AHEAD:
        raise ProtocolError("bad_request", f"deadline more than {MAX_AHEAD + skew:.0f}s ahead", request_id)
    if guard is not None and not guard.fresh(nonce, deadline + skew, now, request_id):
        if guard.full:  # fail closed: nothing still inside its window is forgotten to make room
            raise ProtocolError("replayed", f"too many requests within the replay window ({guard.max_entries} "
                                "nonces and ids held): refused rather than forget one; try again later", request_id)
        raise ProtocolError("replayed", "this nonce or request id was already used", request_id)
    return Message(request_id, type_, body, deadline, nonce)


class ReplayGuard:
    """Nonces and request ids seen and not yet expired. Each is remembered until its request's
    deadline plus the clock skew tolerated, after which :func:`decode` refuses the request as
    expired anyway; :data:`MAX_AHEAD` and the skew bound that. A connector keeps one for its
    process, not one per link: a request copied onto the next link is a replay too; a relay
    keeps one per connector id, shared by that connector's links (relay/hub.py).

    At most *max_entries* are held: when that many are still inside their window, a new request
    is refused (``fresh`` is ``False`` and :attr:`full` is set; :func:`decode` answers
    ``replayed``, saying so) rather than a nonce forgotten that could still be replayed.

    Entries leave in the order their windows end (a heap beside the table): each call forgets
    only what ended since the last, in O(log n) each. A full guard used to rebuild its whole
    table whenever one window had ended: a relay that chose deadlines ending a few milliseconds
    apart made every frame cost tens of milliseconds of the connector's event loop (review of
    the connector's side of the link)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._ends: list[tuple[float, tuple[str, str]]] = []  # (until, key), a heap: the next to end first
        self._max = max_entries
        #: the last refusal was for want of room (not a repeat)
        self.full = False

    @property
    def max_entries(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._seen)

    def fresh(self, nonce: str, until: float, now: float, request_id: str | None = None) -> bool:
        """Record the request's nonce (and *request_id*) until *until*, when it can no longer be
        accepted; ``False`` if either was seen before, or if the guard is full of entries still
        inside their window (:attr:`full`)."""
        self.full = False
        ends, seen = self._ends, self._seen
        while ends and ends[0][0] < now:  # windows that ended: forgotten, in the order they ended
            ended, key = heapq.heappop(ends)
            if seen.get(key) == ended:
                del seen[key]
        keys = [("nonce", nonce)] + ([("id", request_id)] if request_id is not None else [])
        if any(key in seen for key in keys):
            return False
        if len(seen) + len(keys) > self._max:  # flooded with live nonces: refuse rather than forget
            self.full = True
            return False
        for key in keys:
            seen[key] = until
            heapq.heappush(ends, (until, key))
        return True


def _suite():
    if hpke is None:
        raise RuntimeError("the link needs HPKE (cryptography.hazmat.primitives.hpke): upgrade cryptography")
    return hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


#: The body fields of ``authenticate`` that say what its password is used for, bound in the seal:
#: the account it is tried on, the address throttled and audited, and how it is throttled.
SEALED_FIELDS = ("username", "client", "front_door")


def password_info(*, request_id: str, nonce: str, deadline: float, connector: str, body: dict[str, Any]) -> bytes:
    """The HPKE ``info`` a password is sealed under: the label ``authgw-link/2 password``, then
    the id, the nonce, the deadline in whole milliseconds, the connector id and the body's
    :data:`SEALED_FIELDS` (``""`` when absent), each as a 2-byte big-endian length and its UTF-8
    (docs/link-protocol.md#password-sealing). Any difference in one of them and it does not open."""
    fields = [request_id, nonce, str(round(deadline * 1000)), connector]
    for name in SEALED_FIELDS:
        value = body.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string")
        fields.append(value)
    info = bytearray(f"authgw-link/{VERSION} password".encode())
    for value in fields:
        raw = value.encode("utf-8", "surrogatepass")
        if len(raw) > 0xFFFF:
            raise ValueError("a sealed field is longer than 65535 bytes")
        info += len(raw).to_bytes(2, "big") + raw
    return bytes(info)


def seal_password(public_key: ec.EllipticCurvePublicKey, password: str, stamp: Stamp, *, connector: str,
                  body: dict[str, Any]) -> str:
    """*password* sealed (base64url) to *connector*'s P-256 key for the request of *stamp* whose
    body is *body*: it opens only in that request, at that connector."""
    info = password_info(request_id=stamp.id, nonce=stamp.nonce, deadline=stamp.deadline, connector=connector,
                         body=body)
    sealed = _suite().encrypt(password.encode("utf-8"), public_key, info=info)
    return base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")


def open_password(private_key: ec.EllipticCurvePrivateKey, sealed: str, message: Message, *, connector: str) -> str:
    """Open the password of *message* (an ``authenticate`` request) sealed by :func:`seal_password`
    to *connector*; :class:`ProtocolError` ``bad_request`` if it does not open."""
    try:
        info = password_info(request_id=message.id, nonce=message.nonce or "", deadline=message.deadline or 0.0,
                             connector=connector, body=message.body)
        raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        return _suite().decrypt(raw, private_key, info=info).decode("utf-8")
    except Exception:  # any failure is the same answer: it was not sealed to us for this request
        raise ProtocolError("bad_request", "the sealed password does not open with this connector's key",
                            message.id) from None
