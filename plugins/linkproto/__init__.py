"""The link protocol between a connector (``link``) and a relay (``relay``), sans-I/O.

Both plugins import this module and nothing of each other. It holds no sockets, clocks or
threads: callers pass ``now`` (wall-clock seconds, :func:`time.time`) in and get typed messages
or JSON text out. docs/link-protocol.md is the specification for third parties.

Frames are WebSocket text frames holding one JSON object each:

* a **request** ``{"v": 1, "id", "type", "deadline", "nonce", "body"}``: ``deadline`` is a
  wall-clock Unix time (requests cross machines, so no monotonic clock can be shared), ``nonce``
  a one-time random string; the receiver refuses an expired request (``expired``), a nonce it
  has already seen (``replayed``), and a deadline too far ahead (``bad_request``), which bounds
  the memory a replay guard needs.
* an **answer** ``{"v": 1, "id", "type": "answer", "body"}`` or an **error**
  ``{"v": 1, "id", "type": "error", "body": {"code", "detail"}}``, ``id`` being the request's.

Passwords travel sealed to the connector's public key with HPKE (RFC 9180, DHKEM(P-256,
HKDF-SHA256), HKDF-SHA256, AES-256-GCM) from ``cryptography``, the request id bound in as
HPKE ``info``: a TLS-inspecting proxy sees ciphertext only, and a sealed password lifted from
one request does not open under another id.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

try:  # HPKE is recent in cryptography; the link refuses to run without it (no home-made ECIES)
    from cryptography.hazmat.primitives import hpke
except ImportError:  # pragma: no cover - depends on the installed cryptography
    hpke = None

__all__ = [
    "ANSWER", "ERROR", "MAX_AHEAD", "MAX_FRAME", "MAX_SEARCH_LIMIT", "REQUEST_TYPES", "VERSION",
    "Message", "ProtocolError", "ReplayGuard", "answer", "decode", "error", "new_id", "open_password",
    "request", "seal_password",
]

VERSION = 1
#: Largest frame either side accepts (bytes); WebSocket readers are configured with it too.
MAX_FRAME = 64 * 1024
#: Largest ``deadline - now`` a receiver accepts: nonces are remembered this long, no longer.
MAX_AHEAD = 120.0
#: Most users one ``search_users`` answer holds: a page of profiles must fit one frame.
MAX_SEARCH_LIMIT = 100

ANSWER, ERROR = "answer", "error"
#: Requests the relay sends to a connector, and those a connector sends to the relay.
RELAY_TO_CONNECTOR = frozenset({"authenticate", "lookup_user", "search_users", "list_groups", "selftest", "ping"})
CONNECTOR_TO_RELAY = frozenset({"hello", "renew", "drain"})
REQUEST_TYPES = RELAY_TO_CONNECTOR | CONNECTOR_TO_RELAY

#: Error codes (docs/link-protocol.md#errors).
ERROR_CODES = frozenset({"bad_request", "expired", "replayed", "unknown_type", "unavailable",
                         "forbidden", "internal", "not_found"})


class ProtocolError(Exception):
    """A frame the receiver refuses; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.request_id = request_id


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


def request(type_: str, body: dict[str, Any], *, now: float, timeout: float,
            request_id: str | None = None) -> tuple[str, str]:
    """A new request frame; returns ``(id, text)``. *timeout* is capped at :data:`MAX_AHEAD`.
    Pass *request_id* (from :func:`new_id`) when the body must be bound to it (a sealed password)."""
    if type_ not in REQUEST_TYPES:
        raise ValueError(f"unknown request type {type_!r}")
    request_id = request_id or new_id()
    deadline = now + min(max(timeout, 0.0), MAX_AHEAD)
    return request_id, _dump({"v": VERSION, "id": request_id, "type": type_, "deadline": round(deadline, 3),
                              "nonce": secrets.token_urlsafe(16), "body": body})


def answer(request_id: str, body: dict[str, Any]) -> str:
    return _dump({"v": VERSION, "id": request_id, "type": ANSWER, "body": body})


def error(request_id: str | None, code: str, detail: str) -> str:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return _dump({"v": VERSION, "id": request_id or "", "type": ERROR, "body": {"code": code, "detail": detail}})


def decode(text: str | bytes, *, now: float, guard: ReplayGuard | None = None,
           accept: frozenset[str] = REQUEST_TYPES) -> Message:
    """Parse and check one frame. Requests are checked for version, type (*accept*), deadline
    and, with *guard*, replay. Raises :class:`ProtocolError` with the code to answer."""
    if len(text) > MAX_FRAME:
        raise ProtocolError("bad_request", f"frame larger than {MAX_FRAME} bytes")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_request", "not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "a frame is a JSON object")
    request_id = data.get("id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
        raise ProtocolError("bad_request", "`id` must be a string of 1-64 characters")
    if data.get("v") != VERSION:
        raise ProtocolError("bad_request", f"unsupported protocol version {data.get('v')!r}; this end speaks {VERSION}",
                            request_id)
    type_, body = data.get("type"), data.get("body")
    if not isinstance(type_, str) or not isinstance(body, dict):
        raise ProtocolError("bad_request", "`type` must be a string and `body` an object", request_id)
    if type_ in (ANSWER, ERROR):
        if type_ == ERROR and not (isinstance(body.get("code"), str) and isinstance(body.get("detail"), str)):
            raise ProtocolError("bad_request", "an error needs `code` and `detail`", request_id)
        return Message(request_id, type_, body)
    if type_ not in accept:
        raise ProtocolError("unknown_type", f"request type {type_[:40]!r} is not served here", request_id)
    deadline, nonce = data.get("deadline"), data.get("nonce")
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise ProtocolError("bad_request", "`deadline` must be a Unix time", request_id)
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise ProtocolError("bad_request", "`nonce` must be a string of 16-64 characters", request_id)
    if deadline < now:
        raise ProtocolError("expired", f"deadline passed {now - deadline:.3f}s ago", request_id)
    if deadline > now + MAX_AHEAD:
        raise ProtocolError("bad_request", f"deadline more than {MAX_AHEAD:.0f}s ahead", request_id)
    if guard is not None and not guard.fresh(nonce, deadline, now):
        raise ProtocolError("replayed", "this nonce was already used", request_id)
    return Message(request_id, type_, body, float(deadline), nonce)


class ReplayGuard:
    """Nonces seen and not yet expired. A request's nonce is remembered until its deadline,
    after which :func:`decode` refuses it as expired anyway; :data:`MAX_AHEAD` bounds that."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._seen: dict[str, float] = {}
        self._max = max_entries

    def fresh(self, nonce: str, deadline: float, now: float) -> bool:
        if nonce in self._seen:
            return False
        if len(self._seen) >= self._max:
            self._seen = {n: d for n, d in self._seen.items() if d >= now}
            if len(self._seen) >= self._max:  # flooded with live nonces: refuse rather than forget
                return False
        self._seen[nonce] = deadline
        return True


def _suite():
    if hpke is None:
        raise RuntimeError("the link needs HPKE (cryptography.hazmat.primitives.hpke): upgrade cryptography")
    return hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(request_id: str) -> bytes:
    return f"authgw-link/{VERSION} password {request_id}".encode()


def seal_password(public_key: ec.EllipticCurvePublicKey, password: str, request_id: str) -> str:
    """The password sealed to the connector's P-256 key for request *request_id* (base64url)."""
    sealed = _suite().encrypt(password.encode("utf-8"), public_key, info=_info(request_id))
    return base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")


def open_password(private_key: ec.EllipticCurvePrivateKey, sealed: str, request_id: str) -> str:
    """Open a password sealed by :func:`seal_password`; :class:`ProtocolError` if it does not."""
    try:
        raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        return _suite().decrypt(raw, private_key, info=_info(request_id)).decode("utf-8")
    except Exception:  # any failure is the same answer: it was not sealed to us for this id
        raise ProtocolError("bad_request", "the sealed password does not open with this connector's key",
                            request_id) from None
