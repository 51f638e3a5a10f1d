"""What a Negotiate token is, before GSSAPI sees it, and what an error token says after.

RFC 4559 carries an RFC 2743 InitialContextToken (``[APPLICATION 0]`` with a mechanism OID): a
SPNEGO NegTokenInit (RFC 4178 section 4.2.1) from browsers and curl, or a bare Kerberos AP-REQ
token (RFC 4121 section 4.1) from some Java clients. :func:`inspect_token` refuses what can
never become a Kerberos login (NTLMSSP, SPNEGO without a Kerberos mechanism, garbage) so it is
never handed to a mechanism that might negotiate NTLM, and reads the ticket's clear-text header
(realm, service, kvno, enctype: RFC 4120 section 5.3) so that failures can be explained. Nothing
read here grants anything: GSSAPI decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway.logs import printable

from .der import DERError, TLV, TooMany, children, oid_text, read_int, read_one, tagged

__all__ = ["KRB5_MS_OID", "KRB5_OID", "KRB5_OIDS", "NTLM_OID", "SPNEGO_OID", "KrbError", "NegotiateToken", "TicketInfo", "TokenProblem",
           "TokenRefused", "enctype_name", "inspect_token", "krb_error_of", "unparse_principal"]

SPNEGO_OID = "1.3.6.1.5.5.2"
KRB5_OID = "1.2.840.113554.1.2.2"
#: Microsoft's mistaken encoding of the Kerberos OID, still sent first by Windows (RFC 4178 ex.).
KRB5_MS_OID = "1.2.840.48018.1.2.2"
KRB5_OIDS = frozenset({KRB5_OID, KRB5_MS_OID})
NTLM_OID = "1.3.6.1.4.1.311.2.2.10"
NTLMSSP_SIGNATURE = b"NTLMSSP\x00"
#: How many of a client's SPNEGO mechanisms a refusal names.
_LISTED = 4
#: The most mechanisms a NegTokenInit may list (Windows lists four or five). Each costs a
#: microsecond or more here and in MIT's SPNEGO: 4,000 of them, 11 ms a request.
_MOST_MECHS = 32
#: How much of a ticket's service name a log line shows (real ones are a few dozen characters).
_SHOWN = 200

#: RFC 3961/3962/8009 and RFC 4757 numbers, with MIT's names (as ``klist -e`` prints them).
ENCTYPES = {
    1: "des-cbc-crc", 3: "des-cbc-md5", 16: "des3-cbc-sha1", 17: "aes128-cts-hmac-sha1-96",
    18: "aes256-cts-hmac-sha1-96", 19: "aes128-cts-hmac-sha256-128", 20: "aes256-cts-hmac-sha384-192",
    23: "arcfour-hmac", 24: "arcfour-hmac-exp", 25: "camellia128-cts-cmac", 26: "camellia256-cts-cmac",
}
#: Deprecated by RFC 6649 and RFC 8429; AD still issues RC4 tickets when an account lacks AES keys.
WEAK_ENCTYPES = frozenset({1, 3, 16, 23, 24})


def enctype_name(number: int) -> str:
    return ENCTYPES.get(number, f"enctype-{number}")


def unparse_principal(components: list[str], realm: str) -> str:
    """MIT's text form: components joined by ``/``, then ``@REALM``, separators escaped."""
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("/", "\\/").replace("@", "\\@")
    return "/".join(esc(c) for c in components) + "@" + esc(realm)


class TokenProblem(enum.Enum):
    NTLM = "ntlm_not_supported"
    MALFORMED = "malformed_token"
    UNSUPPORTED_MECHANISM = "unsupported_mechanism"


class TokenRefused(ValueError):
    def __init__(self, problem: TokenProblem, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TicketInfo:
    """The clear-text part of the service ticket inside an AP-REQ (RFC 4120 section 5.3)."""

    service: str
    etype: int
    kvno: int | None

    def describe(self) -> str:
        """For logs: the service name and realm are the client's unauthenticated bytes, so they
        are escaped (a newline in them would start a forged log line) and cut short (a 40 KB
        realm made a 40 KB line per request)."""
        kvno = "no kvno" if self.kvno is None else f"kvno {self.kvno}"
        service = self.service if len(self.service) <= _SHOWN else \
            f"{self.service[:_SHOWN]}... ({len(self.service)} characters)"
        return f"ticket for {printable(service)} ({kvno}, {enctype_name(self.etype)})"


@dataclass(frozen=True, slots=True)
class NegotiateToken:
    """A token worth handing to GSSAPI. ``mechs`` is the client's SPNEGO list (or the bare mech);
    ``kerberos`` the RFC 4121 initial token inside (the whole token when it is bare Kerberos)."""

    spnego: bool
    mechs: tuple[str, ...]
    kerberos: bytes = field(repr=False)

    def ticket(self) -> TicketInfo | None:
        """The ticket's clear-text header; read only to explain a failure (it costs more than the
        framing checks), so ``None`` when it cannot be read rather than an exception."""
        try:
            outer = read_one(self.kerberos)
            _mech, pos = _gss_frame(outer)
            return _ticket_of_krb5(self.kerberos, pos, outer.end)
        except (DERError, KeyError, ValueError, IndexError):
            return None


@dataclass(frozen=True, slots=True)
class KrbError:
    """A KRB-ERROR (RFC 4120 section 5.9.1) the acceptor produced for the client."""

    code: int
    text: str = ""


def _gss_frame(tlv: TLV) -> tuple[str, int]:
    """RFC 2743 section 3.1: ``[APPLICATION 0] IMPLICIT SEQUENCE { thisMech OID, innerToken }``."""
    if tlv.tag != 0x60:
        raise DERError("not an RFC 2743 InitialContextToken")
    oid = read_one(tlv.data, tlv.start, tlv.end)
    return oid_text(oid), oid.end


def _ticket_of_krb5(data: bytes, pos: int, end: int) -> TicketInfo:
    """RFC 4121 section 4.1: two token-id octets, 01 00 for an AP-REQ, then the AP-REQ."""
    if data[pos:pos + 2] != b"\x01\x00":
        raise DERError("the Kerberos token is not an AP-REQ")
    ap_req = read_one(data, pos + 2, end)
    if ap_req.tag != 0x6E or ap_req.end != end:  # [APPLICATION 14]
        raise DERError("malformed AP-REQ")
    (body,) = children(ap_req)
    ticket_app = tagged(body)[3]
    if ticket_app.tag != 0x61:  # Ticket ::= [APPLICATION 1]
        raise DERError("malformed Ticket")
    (ticket_seq,) = children(ticket_app)
    ticket = tagged(ticket_seq)
    realm = ticket[1].value.decode("utf-8", "replace")
    sname = tagged(ticket[2])
    names = [c.value.decode("utf-8", "replace") for c in children(sname[1])]
    enc = tagged(ticket[3])
    kvno = read_int(enc[1]) if 1 in enc else None
    return TicketInfo(unparse_principal(names, realm), read_int(enc[0]), kvno)


def inspect_token(token: bytes) -> NegotiateToken:
    """Classify an ``Authorization: Negotiate`` token, or raise :class:`TokenRefused`."""
    if token.startswith(NTLMSSP_SIGNATURE):
        raise TokenRefused(TokenProblem.NTLM, "a raw NTLMSSP message")
    try:
        outer = read_one(token)
        if outer.end != len(token):
            raise DERError("bytes after the token")
        mech, pos = _gss_frame(outer)
        if mech in KRB5_OIDS:
            if token[pos:pos + 2] != b"\x01\x00":  # RFC 4121 section 4.1: an AP-REQ
                raise DERError("the Kerberos token is not an AP-REQ")
            return NegotiateToken(False, (mech,), token)
        if mech != SPNEGO_OID:
            raise TokenRefused(TokenProblem.UNSUPPORTED_MECHANISM, f"a token for mechanism {mech}")
        choice = read_one(token, pos, outer.end)
        if choice.tag != 0xA0:  # NegotiationToken ::= CHOICE { negTokenInit [0], negTokenResp [1] }
            raise DERError("an initial SPNEGO token must be a NegTokenInit")
        (init_seq,) = children(choice)
        init = tagged(init_seq)
        try:
            mechs = tuple(oid_text(m) for m in children(init[0], _MOST_MECHS)) if 0 in init else ()
        except TooMany:
            raise TokenRefused(TokenProblem.UNSUPPORTED_MECHANISM,
                               f"SPNEGO listing more than {_MOST_MECHS} mechanisms") from None
        mech_token = init[2].value if 2 in init else b""
    except TokenRefused:
        raise
    except (DERError, KeyError, ValueError, IndexError) as exc:
        raise TokenRefused(TokenProblem.MALFORMED, f"not a SPNEGO or Kerberos token ({exc})") from None
    # The optimistic token is for the client's first mechanism (RFC 4178 section 4.2.1). A client
    # that sends NTLMSSP, leads with NTLM, or offers nothing but NTLM wants NTLM, which this
    # plugin never negotiates; anything but Kerberos first would need a second round trip,
    # which stateless forward-auth cannot carry.
    # Named in the log line: a few, as a client may list thousands (each OID is short, above).
    listed = ", ".join(mechs[:_LISTED]) + (f" and {len(mechs) - _LISTED} more" if len(mechs) > _LISTED else "") \
        if mechs else "none"
    if mech_token.startswith(NTLMSSP_SIGNATURE) or (mechs and mechs[0] == NTLM_OID) or \
            (NTLM_OID in mechs and not KRB5_OIDS.intersection(mechs)):
        raise TokenRefused(TokenProblem.NTLM, f"SPNEGO offering NTLM (mechanisms {listed})")
    if not mechs or mechs[0] not in KRB5_OIDS or not mech_token:
        raise TokenRefused(TokenProblem.UNSUPPORTED_MECHANISM,
                           f"SPNEGO without an optimistic Kerberos token (mechanisms {listed})")
    try:
        inner = read_one(mech_token)
        inner_mech, pos = _gss_frame(inner)
        if inner_mech not in KRB5_OIDS or inner.end != len(mech_token):
            raise DERError(f"the optimistic token is for {inner_mech}, not Kerberos")
        if mech_token[pos:pos + 2] != b"\x01\x00":
            raise DERError("the Kerberos token is not an AP-REQ")
    except (DERError, KeyError, ValueError, IndexError) as exc:
        raise TokenRefused(TokenProblem.MALFORMED, f"the Kerberos token inside SPNEGO is malformed ({exc})") from None
    # The AP-REQ itself is GSSAPI's to parse (and refuse as a defective token); reading its
    # ticket header here would double the cost of every login for the sake of rare failures.
    return NegotiateToken(True, mechs, mech_token)


def krb_error_of(token: bytes | None) -> KrbError | None:
    """The KRB-ERROR inside an acceptor's error token (bare, or in a SPNEGO NegTokenResp)."""
    if not token:
        return None
    try:
        outer = read_one(token)
        if outer.tag == 0xA1:  # NegTokenResp: responseToken is [2]
            (resp_seq,) = children(outer)
            resp = tagged(resp_seq)
            if 2 not in resp:
                return None
            return krb_error_of(resp[2].value)
        mech, pos = _gss_frame(outer)
        if mech not in KRB5_OIDS or token[pos:pos + 2] != b"\x03\x00":  # RFC 4121: 03 00 = KRB-ERROR
            return None
        app = read_one(token, pos + 2, outer.end)
        if app.tag != 0x7E:  # [APPLICATION 30]
            return None
        (seq,) = children(app)
        fields = tagged(seq)
        text = fields[11].value.decode("utf-8", "replace") if 11 in fields else ""
        return KrbError(read_int(fields[6]), text)
    except (DERError, KeyError, ValueError, IndexError):
        return None
