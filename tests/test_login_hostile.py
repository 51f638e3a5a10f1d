"""Hostile input at the login front door: each named check refused alone, with a vector that
fails only that check, never a 5xx, never a leak. Through a real ``authgw serve``; signed
requests made by pysaml2 (independent of the code under test)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import re
import datetime as dt
import ssl
import time
import zlib
from types import SimpleNamespace
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from gateway.plugins.login.saml import RSA_SHA256
from gateway.plugins.login.web import Refused
from gateway.plugins.login.xmlsafe import inflate_redirect, parse_xml
from support.login import LoginSite
from support.pki import CA
from support.saml_sp import SamlSP, rsa_pair
from support.slapd import Slapd

SP_ID, ACS = "https://sp.example.test/", "https://sp.example.test/acs"
SIGNED_ID, SIGNED_ACS = "https://signed.example.test/", "https://signed.example.test/acs"


def authn_request(idp_url: str, *, issuer: str = SP_ID, acs: str | None = ACS, destination: str | None = None,
                  issued: dt.datetime | None = None, binding: str | None = None, prolog: str = "",
                  request_id: str = "_r1", body: str = "") -> bytes:
    when = (issued or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    attrs = f' AssertionConsumerServiceURL="{acs}"' if acs else ""
    if destination != "":  # "": none at all
        attrs += f' Destination="{destination or idp_url + "/saml/sso"}"'
    attrs += f' ProtocolBinding="{binding}"' if binding else ""
    return (f'<?xml version="1.0"?>{prolog}<samlp:AuthnRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
            f'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="{request_id}" Version="2.0" '
            f'IssueInstant="{when}"{attrs}><saml:Issuer>{issuer}</saml:Issuer>{body}</samlp:AuthnRequest>').encode()


def deflated(xml: bytes) -> str:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return base64.b64encode(packer.compress(xml) + packer.flush()).decode()


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    slapd = Slapd(base / "slapd").start()
    slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
    signer = rsa_pair(base / "signer", "sp", "signed.example.test")
    site = LoginSite(base / "idp", slapd, CA.create(), login={"saml": {"service_providers": [
        {"entity_id": SP_ID, "acs_urls": [ACS]},
        {"entity_id": SIGNED_ID, "acs_urls": [SIGNED_ACS], "request_certificate": str(signer[0])}]}})
    site.gw = site.start()
    site.signer = signer
    site.metadata = site.client().get(f"{site.url}/saml/metadata").text
    yield site
    site.stop()
    slapd.stop()


def refused(response) -> str:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert "This sign-in request cannot be accepted." in response.text
    return response.headers["X-Refused-Reason"]


def redirect(idp, xml: bytes, **extra):
    return idp.client().get(f"{idp.url}/saml/sso?" + urlencode({"SAMLRequest": deflated(xml), **extra}),
                            allow_redirects=False)


def test_a_valid_request_reaches_the_form(idp):
    # The baseline every vector below departs from in one field only.
    response = redirect(idp, authn_request(idp.url))
    assert response.status_code == 303 and response.headers["Location"].startswith("/login?req=")


def test_xxe_is_refused_and_nothing_is_read(idp):
    prolog = '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    xml = authn_request(idp.url, prolog=prolog, issuer="&x;")
    for response in (redirect(idp, xml),
                     idp.client().post(f"{idp.url}/saml/sso", data={"SAMLRequest": base64.b64encode(xml)})):
        assert refused(response) == "login.xml_forbidden"
        assert "root:" not in response.text
    assert "root:" not in idp.gw.output()


def test_entity_expansion_is_refused(idp):
    lol = '<!DOCTYPE r [<!ENTITY a "lollollollollollol">' + "".join(
        f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8)) + "]>"
    assert refused(redirect(idp, authn_request(idp.url, prolog=lol, issuer="&i;"))) == "login.xml_forbidden"


def test_hostile_logout_responses_are_refused_like_requests(idp):
    prolog = '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    xxe = (f'{prolog}<samlp:LogoutResponse xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
           'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_a" Version="2.0" InResponseTo="_b" '
           'IssueInstant="2026-01-01T00:00:00Z"><saml:Issuer>&x;</saml:Issuer></samlp:LogoutResponse>').encode()
    client = idp.client()
    response = client.post(f"{idp.url}/saml/slo", data={"SAMLResponse": base64.b64encode(xxe)})
    assert refused(response) == "login.xml_forbidden" and "root:" not in response.text
    bomb = deflated(bytes(5_000_000))
    response = client.get(f"{idp.url}/saml/slo?" + urlencode({"SAMLResponse": bomb}), allow_redirects=False)
    assert refused(response) == "login.inflate_too_large"
    # well-formed, but an answer to nothing authgw sent
    stray = xxe.replace(prolog.encode(), b"").replace(b"&x;", SP_ID.encode())
    response = client.post(f"{idp.url}/saml/slo", data={"SAMLResponse": base64.b64encode(stray)})
    assert refused(response) == "saml.logout_unknown"
    # a LogoutRequest where a response belongs, and the reverse
    response = client.post(f"{idp.url}/saml/slo", data={"SAMLRequest": base64.b64encode(stray)})
    assert refused(response) == "saml.not_logout_request"
    response = client.post(f"{idp.url}/saml/slo", data={"SAMLResponse": base64.b64encode(
        stray.replace(b"LogoutResponse", b"LogoutRequest"))})
    assert refused(response) == "saml.not_logout_response"
    assert "root:" not in idp.gw.output()


def test_a_1_gb_deflate_bomb_is_refused_after_the_cap():
    packer, chunk, parts = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20), []
    for _ in range(1024):  # 1 GiB of zeros, compressed piecewise (about 1 MB)
        parts.append(packer.compress(chunk))
    bomb = base64.b64encode(b"".join(parts) + packer.flush()).decode()
    # CPU time of this thread, not the wall clock: a loaded machine's preemption does not count.
    started = time.thread_time()
    with pytest.raises(Refused) as caught:
        inflate_redirect(bomb, limit=262144, max_parameter=len(bomb))
    assert caught.value.reason == "login.inflate_too_large"
    capped = time.thread_time() - started
    small = deflated(bytes(200_000))
    started = time.thread_time()
    assert len(inflate_redirect(small, limit=262144, max_parameter=len(small))) == 200_000
    # Refusing the 1 GiB bomb costs about what inflating 256 KiB does, not what 1 GiB would
    # (about a thousand times that).
    assert capped < 50 * max(time.thread_time() - started, 0.001)


def test_a_deflate_bomb_through_the_server_is_refused(idp):
    bomb = deflated(bytes(5_000_000))  # fits a URL, inflates to 5 MB > max_inflated_bytes
    response = idp.client().get(f"{idp.url}/saml/sso?" + urlencode({"SAMLRequest": bomb}), allow_redirects=False)
    assert refused(response) == "login.inflate_too_large"


def test_parse_xml_alone_refuses_doctype_in_any_case():
    for doc in (b'<!doctype r><r/>', b'<?xml version="1.0"?>\n<!DOCTYPE r SYSTEM "http://127.0.0.1:1/x.dtd"><r/>'):
        with pytest.raises(Refused) as caught:
            parse_xml(doc)
        assert caught.value.reason == "login.xml_forbidden"


@pytest.mark.parametrize("change, reason", [
    ({"issuer": "https://unknown.example.test/"}, "saml.unknown_sp"),
    ({"acs": "https://evil.example.test/acs"}, "saml.acs_not_registered"),
    ({"acs": ACS + "/../../evil"}, "saml.acs_not_registered"),
    ({"acs": ACS + "?next=https://evil.example.test"}, "saml.acs_not_registered"),
    ({"binding": "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Artifact"}, "saml.binding_unsupported"),
    ({"destination": "https://elsewhere.example.test/saml/sso"}, "saml.destination_mismatch"),
    ({"issued": dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)}, "saml.request_expired"),
    ({"issued": dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)}, "saml.request_expired"),
])
def test_each_named_check_alone(idp, change, reason):
    assert refused(redirect(idp, authn_request(idp.url, **change))) == reason


def test_malformed_and_oversize_parameters(idp):
    client = idp.client()
    assert refused(client.get(f"{idp.url}/saml/sso")) == "login.malformed"
    assert refused(client.get(f"{idp.url}/saml/sso", params={"SAMLRequest": "%%%not base64"})) == "login.malformed"
    assert refused(client.get(f"{idp.url}/saml/sso", params={"SAMLRequest": deflated(b"<not-xml")})) == "login.malformed"
    not_request = b'<samlp:LogoutRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" ID="x" Version="2.0"/>'
    assert refused(client.get(f"{idp.url}/saml/sso", params={"SAMLRequest": deflated(not_request)})) \
        == "saml.not_authn_request"
    assert refused(redirect(idp, authn_request(idp.url), RelayState="r" * 81)) == "login.relay_state_too_large"
    big = base64.b64encode(authn_request(idp.url, body="<x>" + "a" * 20000 + "</x>")).decode()
    assert refused(client.post(f"{idp.url}/saml/sso", data={"SAMLRequest": big})) == "login.parameter_too_large"
    huge = client.post(f"{idp.url}/saml/sso", data={"SAMLRequest": "A" * 200_000})
    assert huge.status_code == 413
    assert refused(client.get(f"{idp.url}/saml/idp", params={"sp": "https://nobody/"})) == "saml.unknown_sp"


def test_signed_requests_are_required_checked_and_single_use(idp, tmp_path):
    sp = SamlSP(tmp_path, idp.metadata, acs=SIGNED_ACS, entity_id=SIGNED_ID, sign_requests=True, keys=idp.signer)
    client = idp.client()
    _, url = sp.redirect_request(relay_state="rs")
    assert "Signature=" in url
    first = client.get(url, allow_redirects=False)
    assert first.status_code == 303, first.text[:300]
    assert refused(client.get(url, allow_redirects=False)) == "saml.request_replayed"
    _, url = sp.redirect_request()
    query = dict(p.split("=", 1) for p in urlsplit(url).query.split("&"))
    signature = query["Signature"]  # one character changed (an "A" put over an "A" changed nothing: 1 run in 64)
    tampered = url.replace(signature, ("B" if signature[0] == "A" else "A") + signature[1:])
    assert refused(client.get(tampered, allow_redirects=False)) == "saml.signature_invalid"
    unsigned = url.split("&Signature=")[0].replace("&SigAlg=", "&x=")
    assert refused(client.get(unsigned, allow_redirects=False)) == "saml.signature_missing"
    # HTTP-POST binding: an enveloped XML signature (made by pysaml2/xmlsec1).
    _, fields = sp.post_request()
    assert client.post(f"{idp.url}/saml/sso", data=fields, allow_redirects=False).status_code == 303
    assert refused(client.post(f"{idp.url}/saml/sso", data=fields, allow_redirects=False)) == "saml.request_replayed"
    xml = base64.b64decode(sp.post_request()[1]["SAMLRequest"])
    xml = re.sub(rb'ID="([^"]+)"', lambda m: b'ID="' + m.group(1)[:-1] + (b"1" if m.group(1).endswith(b"0") else b"0") + b'"',
                 xml, count=1)  # one byte of the signed request changed
    response = client.post(f"{idp.url}/saml/sso", data={"SAMLRequest": base64.b64encode(xml)})
    assert refused(response) == "saml.signature_invalid"
    unsigned = authn_request(idp.url, issuer=SIGNED_ID, acs=SIGNED_ACS)
    response = client.post(f"{idp.url}/saml/sso", data={"SAMLRequest": base64.b64encode(unsigned)})
    assert refused(response) == "saml.signature_missing"


def test_a_signed_request_must_name_its_destination(idp):
    # SAML bindings 3.4.5.2: a signed request without Destination could be one the SP signed for
    # another IdP. The same request with it, signed the same way, is accepted.
    key = serialization.load_pem_private_key(idp.signer[1].read_bytes(), None)

    def signed(request_id: str, destination: str | None) -> str:
        message = quote(deflated(authn_request(idp.url, issuer=SIGNED_ID, acs=SIGNED_ACS, request_id=request_id,
                                               destination=destination)), safe="")
        octets = f"SAMLRequest={message}&SigAlg={quote(RSA_SHA256, safe='')}"
        signature = base64.b64encode(key.sign(octets.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()
        return f"/saml/sso?{octets}&Signature={quote(signature, safe='')}"

    assert refused(raw_get(idp, signed("_no_destination", ""))) == "saml.destination_mismatch"
    assert raw_get(idp, signed("_with_destination", None)).status_code == 303
    unsigned = idp.client().get(f"{idp.url}/saml/sso", params={"SAMLRequest": deflated(authn_request(
        idp.url, request_id="_unsigned", destination=""))}, allow_redirects=False)
    assert unsigned.status_code == 303  # optional in an unsigned request (bindings 3.4.5.2)


def test_a_binding_parameter_twice_is_refused_so_the_message_read_is_the_one_signed(idp, tmp_path):
    # A captured signed request and a forged unsigned one in one query: the signature check read
    # the last SAMLRequest, the message used was the first (a forged request, any RelayState).
    sp = SamlSP(tmp_path, idp.metadata, acs=SIGNED_ACS, entity_id=SIGNED_ID, sign_requests=True, keys=idp.signer)
    client = idp.client()
    _, url = sp.redirect_request(relay_state="legit")
    signed_query = urlsplit(url).query
    forged = deflated(authn_request(idp.url, issuer=SIGNED_ID, acs=SIGNED_ACS, request_id="_forged"))
    for order in (f"SAMLRequest={quote_plus(forged)}&RelayState=https%3A%2F%2Fevil.example%2F&{signed_query}",
                  f"{signed_query}&SAMLRequest={quote_plus(forged)}"):
        assert refused(client.get(f"{idp.url}/saml/sso?{order}", allow_redirects=False)) == "login.malformed"
    assert client.get(url, allow_redirects=False).status_code == 303  # the real one, alone, still works once
    # the same in a form, and at the logout endpoint
    fields = sp.post_request(relay_state="first")[1]
    assert fields["RelayState"] == "first"
    body = urlencode(list(fields.items()) + [("RelayState", "second")])
    response = client.post(f"{idp.url}/saml/sso", data=body, allow_redirects=False,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert refused(response) == "login.malformed"
    twice = f"SAMLRequest={quote_plus(forged)}&SAMLRequest={quote_plus(forged)}"
    assert refused(client.get(f"{idp.url}/saml/slo?{twice}", allow_redirects=False)) == "login.malformed"


def raw_get(idp, target: str):
    """GET with the request target sent byte for byte (requests would turn ``%53`` into ``S``)."""
    connection = http.client.HTTPSConnection("localhost", idp.port, timeout=15,
                                             context=ssl.create_default_context(cafile=str(idp.ca_file)))
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return SimpleNamespace(status_code=response.status, headers=dict(response.getheaders()),
                               text=response.read().decode("utf-8", "replace"))
    finally:
        connection.close()


def test_a_percent_encoded_relay_state_name_cannot_join_a_signed_request(idp, tmp_path):
    # Relay%53tate is RelayState to aiohttp's query reader, but was not part of the signed octets:
    # a RelayState of the attacker's choice rode on the SP's signed request.
    sp = SamlSP(tmp_path, idp.metadata, acs=SIGNED_ACS, entity_id=SIGNED_ID, sign_requests=True, keys=idp.signer)
    _, url = sp.redirect_request()
    assert "Signature=" in url and "RelayState" not in url
    response = raw_get(idp, url[len(idp.url):] + "&Relay%53tate=https%3A%2F%2Fevil.example%2F")
    assert refused(response) == "login.malformed"
    # the same request, unchanged, is still good (the refusal did not spend it)
    assert idp.client().get(url, allow_redirects=False).status_code == 303


def test_a_signature_over_another_message_does_not_open_a_forged_request(idp):
    # The attacker has a signed HTTP-Redirect message of the SP whose field is SAMLResponse (its
    # LogoutResponse), and sends it beside a forged AuthnRequest named SAML%52equest: the
    # signature was checked over SAMLResponse=..&SigAlg=.., the message read was the forgery.
    key = serialization.load_pem_private_key(idp.signer[1].read_bytes(), None)
    captured = quote(deflated(b"<LogoutResponse/>"), safe="")
    octets = f"SAMLResponse={captured}&SigAlg={quote(RSA_SHA256, safe='')}"
    signature = quote(base64.b64encode(key.sign(octets.encode(), padding.PKCS1v15(), hashes.SHA256())).decode(),
                      safe="")
    forged = quote(deflated(authn_request(idp.url, issuer=SIGNED_ID, acs=SIGNED_ACS, request_id="_forged")), safe="")
    response = raw_get(idp, f"/saml/sso?SAML%52equest={forged}&{octets}&Signature={signature}")
    assert refused(response) == "login.malformed"
    # the reverse at /saml/slo, and both message fields by their plain names
    response = raw_get(idp, f"/saml/slo?SAML%52equest={forged}&{octets}&Signature={signature}")
    assert refused(response) == "login.malformed"
    response = raw_get(idp, f"/saml/sso?SAMLRequest={forged}&{octets}&Signature={signature}")
    assert refused(response) == "login.malformed"
    assert refused(raw_get(idp, f"/saml/sso?{octets}&Signature={signature}")) == "login.malformed"
    assert "Traceback" not in idp.gw.output()


def test_the_redirect_query_is_read_once_raw_and_decoded_together():
    from gateway.plugins.login.saml import read_redirect_query

    query = read_redirect_query("x=1&SAMLRequest=a%2Bb%3D&Signature=c%3D&SigAlg=s%3Aa&RelayState=r+1%21")
    assert (query.field, query.message, query.relay_state, query.sig_alg, query.signature) == \
        ("SAMLRequest", "a+b=", "r 1!", "s:a", "c=")
    # bindings 3.4.4.1: the raw values, message, RelayState, SigAlg; Signature and others left out
    assert query.signed_octets == "SAMLRequest=a%2Bb%3D&RelayState=r+1%21&SigAlg=s%3Aa"
    assert read_redirect_query("SAMLResponse=a&SigAlg=s", None).signed_octets == "SAMLResponse=a&SigAlg=s"
    for raw, expected in [("SAML%52equest=a", "SAMLRequest"), ("SAMLRequest=a&Relay%53tate=b", "SAMLRequest"),
                          ("SAMLRequest=a&SAMLRequest=b", "SAMLRequest"), ("SAMLRequest=a&SigAlg=s&SigAlg=t", None),
                          ("SAMLRequest=a&SAMLResponse=b", None), ("SAMLResponse=a", "SAMLRequest"),
                          ("SAMLRequest=a", "SAMLResponse"), ("SAMLRequest=a&RelayState=%FF", "SAMLRequest")]:
        with pytest.raises(Refused) as caught:
            read_redirect_query(raw, expected)
        assert caught.value.reason == "login.malformed", raw


def test_a_signature_opens_one_request_even_if_it_was_checked_over_another():
    # Defence in depth: were a signature ever checked over another message than the one read (the
    # bug above), the same signature value still opens one request, whatever ID the forgery has.
    from gateway.plugins.login.saml import BindingMessage, SamlIdp, read_redirect_query

    seen: set[str] = set()

    async def first_use(ns, ident, _):
        return not ((ns, ident) in seen or seen.add((ns, ident)))

    sp = SimpleNamespace(entity_id=SIGNED_ID)
    idp = SimpleNamespace(
        checker=SimpleNamespace(certificates={SIGNED_ID: None}, verify_redirect_signature=lambda sp, query: None),
        settings=SimpleNamespace(saml=SimpleNamespace(request_lifetime=300), clock_skew=120),
        web=SimpleNamespace(sessions=SimpleNamespace(afirst_use=first_use)))
    query = read_redirect_query("SAMLRequest=a&SigAlg=s&Signature=" + quote(base64.b64encode(b"sig").decode()))
    message = BindingMessage("SAMLRequest", b"", "", query)
    asyncio.run(SamlIdp.verify_signed(idp, message, sp, parse_xml(b'<r ID="_one" Destination="d"/>')))
    with pytest.raises(Refused) as caught:
        asyncio.run(SamlIdp.verify_signed(idp, message, sp, parse_xml(b'<r ID="_two" Destination="d"/>')))
    assert caught.value.reason == "saml.request_replayed"


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded; charset=bogus", "multipart/form-data",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_cannot_be_read_is_a_400_never_a_500(idp, content_type):
    client = idp.client()
    for path in ("/login", "/logout", "/saml/sso", "/saml/slo", "/oidc/logout", "/oidc/token"):
        response = client.post(idp.url + path, data=b"a=b&SAMLRequest=x", headers={"Content-Type": content_type},
                               allow_redirects=False)
        assert response.status_code == 400, (path, response.status_code, response.text[:200])
        if path == "/oidc/token":
            assert response.json()["error"] == "invalid_request"
        else:
            assert response.headers["X-Refused-Reason"] == "login.malformed"
    assert "Traceback" not in idp.gw.output() and " 500 " not in idp.gw.output()


def test_a_connection_closed_after_an_unreadable_body_says_so_in_the_answer(idp):
    # The server closes a connection whose body it did not read (no lingering): that answer must
    # carry `Connection: close`, or a keep-alive client sends its next request into a closing
    # connection and gets no answer at all (seen: requests' RemoteDisconnected, once in a
    # suite run, on the test above).
    import socket

    context = ssl.create_default_context(cafile=str(idp.ca_file))
    body = b"a=b&SAMLRequest=x"
    for content_type in ("multipart/form-data", "multipart/form-data; boundary=x",
                         "application/x-www-form-urlencoded; charset=bogus"):
        for path in ("/login", "/saml/sso", "/oidc/token"):
            with socket.create_connection(("127.0.0.1", idp.port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                # The head first and the body later, as http.client sends them: a server that
                # refuses from the head alone answers before the body has come.
                tls.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost:{idp.port}\r\nContent-Type: {content_type}\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n".encode())
                tls.settimeout(0.5)
                try:
                    data = tls.recv(65536)
                except (socket.timeout, TimeoutError):
                    data = b""
                    tls.sendall(body)
                tls.settimeout(5)
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(65536)
                    assert chunk, (content_type, path, "closed before an answer")
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
                while len(rest) < length:
                    rest += tls.recv(65536)
                assert head.startswith(b"HTTP/1.1 400 "), (content_type, path, head[:200])
                says_close = re.search(rb"(?im)^connection: *close\r?$", head) is not None
                tls.settimeout(1.5)
                try:
                    closed = tls.recv(1) == b""
                except (socket.timeout, TimeoutError):
                    closed = False  # kept for the next request: fine either way
                except (ssl.SSLError, ConnectionError):
                    closed = True
                assert says_close or not closed, (content_type, path, head.decode(errors="replace"))


def test_a_relay_state_file_part_a_unicode_index_and_unreadable_signatures_are_refused(idp, tmp_path):
    client = idp.client()
    request = base64.b64encode(authn_request(idp.url)).decode()
    files = {"SAMLRequest": (None, request), "RelayState": ("r.txt", b"abc")}
    assert refused(client.post(f"{idp.url}/saml/sso", files=files, allow_redirects=False)) == "login.malformed"
    by_index = authn_request(idp.url, acs=None).replace(b"<samlp:AuthnRequest ",
                                                         b'<samlp:AuthnRequest AssertionConsumerServiceIndex="\xc2\xb2" ')
    assert refused(redirect(idp, by_index)) == "saml.acs_not_registered"
    sp = SamlSP(tmp_path, idp.metadata, acs=SIGNED_ACS, entity_id=SIGNED_ID, sign_requests=True, keys=idp.signer)
    # pysaml2's signature (xmlsec1), whatever prefix it gives the namespace
    for damage in (lambda x: re.subn(rb"<(\w+:)?SignedInfo\b.*?</(\w+:)?SignedInfo>", b"", x, flags=re.S),
                   lambda x: re.subn(rb"(<(\w+:)?SignatureValue\b[^>]*>)[^<]+", rb"\1", x)):
        xml, changed = damage(base64.b64decode(sp.post_request()[1]["SAMLRequest"]))
        assert changed == 1
        response = client.post(f"{idp.url}/saml/sso", data={"SAMLRequest": base64.b64encode(xml)},
                               allow_redirects=False)
        assert refused(response) == "saml.signature_invalid"
    assert "Traceback" not in idp.gw.output()


def test_a_line_break_in_a_refused_value_does_not_forge_a_log_line(idp):
    forged = "FORGED-LINE authgw.audit: success user=admin"
    assert refused(redirect(idp, authn_request(idp.url, acs=f"https://x/&#10;{forged}"))) == "saml.acs_not_registered"
    lines = idp.gw.output().splitlines()
    assert not [line for line in lines if line.startswith("FORGED-LINE")]
    assert any("\\nFORGED-LINE" in line for line in lines)


def test_no_refusal_leaks_details_and_none_is_a_5xx(idp):
    page = redirect(idp, authn_request(idp.url, acs="https://evil.example.test/acs"))
    assert "evil" not in page.text and "acs" not in page.text.lower()
    output = idp.gw.output()
    assert "saml.acs_not_registered" in output and " 500 " not in output and "Traceback" not in output


GARBAGE = ["", "%00", "\x00\x01", "A" * 5000, "<x/>", "=" * 100, "😀" * 50, "%ZZ", "../../etc/passwd",
           "javascript:alert(1)", "https://evil.example.test/", '"><script>x</script>', "%ED%A0%80"]


def test_garbage_in_every_parameter_of_every_route_is_never_a_5xx(idp):
    client = idp.client()
    routes = [("GET", "/login", ["req"]), ("POST", "/login", ["csrf", "req", "username", "password"]),
              ("POST", "/logout", ["csrf"]), ("GET", "/saml/sso", ["SAMLRequest", "RelayState", "SigAlg", "Signature"]),
              ("POST", "/saml/sso", ["SAMLRequest", "RelayState"]), ("GET", "/saml/idp", ["sp", "RelayState"]),
              ("GET", "/saml/slo", ["SAMLRequest"]), ("POST", "/saml/slo", ["SAMLRequest"]),
              ("GET", "/saml/slo", ["SAMLResponse", "RelayState", "SigAlg", "Signature"]),
              ("POST", "/saml/slo", ["SAMLResponse", "RelayState"]),
              ("GET", "/wsfed?wa=wsignout1.0", ["wtrealm", "wreply"]),
              ("GET", "/oidc/logout", ["id_token_hint", "client_id", "post_logout_redirect_uri", "state"]),
              ("POST", "/oidc/logout", ["id_token_hint", "client_id", "post_logout_redirect_uri", "state"]),
              ("GET", "/wsfed", ["wa", "wtrealm", "wreply", "wctx"]),
              ("GET", "/oidc/authorize", ["client_id", "redirect_uri", "response_type", "scope", "code_challenge"]),
              ("POST", "/oidc/token", ["grant_type", "code", "client_id", "client_secret", "client_assertion",
                                       "client_assertion_type", "code_verifier"]),
              ("GET", "/oidc/userinfo", [])]
    statuses = set()
    for method, path, names in routes:
        for value in GARBAGE:
            params = {name: value for name in names}
            if method == "GET":
                response = client.get(idp.url + path, params=params, allow_redirects=False,
                                      headers={"Authorization": "Bearer " + value[:100].encode("ascii", "replace").decode()})
            else:
                response = client.post(idp.url + path, data=params, allow_redirects=False,
                                       headers={"Authorization": "Basic " + value[:100].encode("ascii", "replace").decode()})
            statuses.add(response.status_code)
            # Cookies too: a hostile cookie value is just another parameter.
            client.cookies.set("__Host-authgw_session", value.encode("ascii", "replace").decode()[:300])
            client.cookies.set("__Host-authgw_csrf", value.encode("ascii", "replace").decode()[:300])
            assert response.status_code < 500, (method, path, value[:20], response.status_code, response.text[:200])
            if "html" in response.headers.get("Content-Type", ""):  # aiohttp's own 400s are text/plain
                assert "<script>x</script>" not in response.text, (method, path, response.text[:300])
            assert response.headers.get("Location", "/login?req=").startswith("/login?req="), (method, path)
    # aiohttp logs the requests its parser refused (control characters in headers); no exception
    # may come out of a handler.
    assert "_handle_request" not in idp.gw.output() and "plugins/login" not in idp.gw.output()
    assert statuses >= {400}


def test_an_unreachable_directory_says_sign_in_is_not_available(tmp_path):
    class Dead:  # a directory nobody listens on
        def plugin_settings(self, mode):
            return {"preset": "openldap", "base_dn": "dc=example,dc=com", "servers": [f"ldap://127.0.0.1:{port}"],
                    "insecure": True, "bind_dn": "cn=x,dc=example,dc=com", "bind_password": {"env": "AUTHGW_TEST_PW"}}

    from support.net import free_port
    port = free_port()
    site = LoginSite(tmp_path / "dead", Dead(), CA.create(), env={"AUTHGW_TEST_PW": "x"})
    site.start()
    try:
        page = site.sign_in(site.client(), "alice", "Alice-pw-1")
        assert page.status_code == 503 and "Sign-in is not available right now." in page.text
    finally:
        site.stop()
