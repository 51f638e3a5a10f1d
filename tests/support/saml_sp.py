"""An independent SAML 2.0 service provider for tests: pysaml2's ``Saml2Client`` (it validates
the IdP's signatures with ``xmlsec1``, the audience, recipient, destination, InResponseTo and the
time window itself).

::

    sp = SamlSP(tmp_path, idp_metadata_xml, acs="https://127.0.0.1:PORT/acs", sign_requests=False)
    request_id, url = sp.redirect_request(relay_state="abc")     # HTTP-Redirect binding
    request_id, fields = sp.post_request()                       # HTTP-POST binding (form fields)
    result = sp.accept(saml_response_b64, request_id)            # raises on any failed check
    result.name_id, result.attributes, result.session_index
    sp.cert_file                                                 # the SP's signing certificate (RSA)
"""

from __future__ import annotations

import datetime as dt
import html
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.client import Saml2Client
from saml2.config import SPConfig

__all__ = ["SamlSP", "rsa_pair"]


def rsa_pair(directory: Path, stem: str, cn: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2)).sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


@dataclass
class Result:
    name_id: str
    name_id_format: str
    attributes: dict[str, list[str]]
    session_index: str
    issuer: str


class SamlSP:
    def __init__(self, directory: Path, idp_metadata: str, *, acs: str, entity_id: str = "https://sp.example.test/",
                 sign_requests: bool = False, want_response_signed: bool = True,
                 allow_unsolicited: bool = False, keys: tuple[Path, Path] | None = None,
                 slo: str | None = None, sign_logout: bool = False) -> None:
        self.entity_id = entity_id
        self.acs = acs
        self.cert_file, self.key_file = keys or rsa_pair(directory, "sp", "sp.example.test")
        self.idp = re.search(r'entityID="([^"]+)"', idp_metadata).group(1)
        config = SPConfig()
        config.load({
            "entityid": entity_id,
            "xmlsec_binary": "/usr/bin/xmlsec1",
            "key_file": str(self.key_file),
            "cert_file": str(self.cert_file),
            "service": {"sp": {
                "endpoints": {"assertion_consumer_service": [(acs, BINDING_HTTP_POST)],
                              **({"single_logout_service": [(slo, BINDING_HTTP_POST)]} if slo else {})},
                "authn_requests_signed": sign_requests,
                "want_response_signed": want_response_signed,
                "want_assertions_signed": True,
                "allow_unsolicited": allow_unsolicited,
                "logout_requests_signed": sign_logout,
                "logout_responses_signed": sign_logout,
                "signing_algorithm": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
                "digest_algorithm": "http://www.w3.org/2001/04/xmlenc#sha256",
            }},
            "metadata": {"inline": [idp_metadata]},
            "allow_unknown_attributes": True,
        })
        self.client = Saml2Client(config)

    def redirect_request(self, relay_state: str = "", **kw) -> tuple[str, str]:
        request_id, info = self.client.prepare_for_authenticate(entityid=self.idp, relay_state=relay_state,
                                                                binding=BINDING_HTTP_REDIRECT, **kw)
        return request_id, dict(info["headers"])["Location"]

    def post_request(self, relay_state: str = "", **kw) -> tuple[str, dict[str, str]]:
        request_id, info = self.client.prepare_for_authenticate(entityid=self.idp, relay_state=relay_state,
                                                                binding=BINDING_HTTP_POST, **kw)
        page = info["data"]
        fields = {html.unescape(m.group(1)): html.unescape(m.group(2))
                  for m in re.finditer(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page)}
        return request_id, fields

    def logout_request(self, destination: str, result: Result, binding: str = BINDING_HTTP_REDIRECT,
                       relay_state: str = "") -> tuple[str, dict]:
        """A LogoutRequest for the session of *result*: ``(request id, pysaml2's binding info)``;
        signed (query signature, or enveloped for POST) when made with ``sign_logout``."""
        from saml2.saml import NameID

        sign = self.client.config.getattr("logout_requests_signed", "sp")
        request_id, request = self.client.create_logout_request(
            destination, self.idp, name_id=NameID(text=result.name_id, format=result.name_id_format),
            session_indexes=[result.session_index], sign=bool(sign and binding == BINDING_HTTP_POST))
        extra = {"sign": True} if sign and binding == BINDING_HTTP_REDIRECT else {}
        return request_id, self.client.apply_binding(binding, str(request), destination, relay_state=relay_state,
                                                     **extra)

    def receive_logout(self, saml_request: str) -> tuple[object, str, dict[str, str]]:
        """pysaml2's handling of a LogoutRequest posted by the IdP (HTTP-POST binding): the
        signature must be there and verify against the IdP's metadata, the subject (NameID as it
        was issued) is logged out of the SP's cache; returns ``(the request, where the
        LogoutResponse goes, its form fields)``. Raises on any failed check."""
        import base64

        if not self.client.sec.correctly_signed_logout_request(base64.b64decode(saml_request).decode(), must=True):
            raise AssertionError("pysaml2 refused the LogoutRequest's signature")
        request = self.client.parse_logout_request(saml_request, BINDING_HTTP_POST)
        if request is None:
            raise AssertionError("pysaml2 refused the LogoutRequest")
        info = self.client.handle_logout_request(saml_request, request.message.name_id, BINDING_HTTP_POST)
        fields = {html.unescape(m.group(1)): html.unescape(m.group(2))
                  for m in re.finditer(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', info["data"])}
        return request.message, info["url"], fields

    def _redirect_signature_ok(self, url: str, field: str) -> dict[str, str]:
        """The query of an HTTP-Redirect message, once pysaml2 verified its signature with a
        signing certificate of the IdP's metadata (raises otherwise)."""
        from urllib.parse import parse_qs, urlsplit

        from saml2.sigver import verify_redirect_signature

        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        message = {k: query[k] for k in (field, "RelayState", "SigAlg", "Signature") if k in query}
        certs = self.client.sec.metadata.certs(self.idp, "any", "signing")
        if "Signature" not in message or not any(verify_redirect_signature(message, self.client.sec.sec_backend, cert)
                                                 for _, cert in certs):
            raise AssertionError("pysaml2 refused the query signature")
        return query

    def receive_logout_redirect(self, url: str) -> tuple[object, str]:
        """As :meth:`receive_logout` for the HTTP-Redirect binding: ``(the request, the URL of
        the LogoutResponse, by HTTP-Redirect)``."""
        query = self._redirect_signature_ok(url, "SAMLRequest")
        request = self.client.parse_logout_request(query["SAMLRequest"], BINDING_HTTP_REDIRECT)
        if request is None:
            raise AssertionError("pysaml2 refused the LogoutRequest")
        info = self.client.handle_logout_request(query["SAMLRequest"], request.message.name_id, BINDING_HTTP_REDIRECT,
                                                 relay_state=query.get("RelayState"))
        return request.message, dict(info["headers"])["Location"]

    def accept_logout_redirect(self, url: str):
        """pysaml2's check of a LogoutResponse by HTTP-Redirect (query signature required)."""
        query = self._redirect_signature_ok(url, "SAMLResponse")
        response = self.client.parse_logout_request_response(query["SAMLResponse"], BINDING_HTTP_REDIRECT)
        if response is None:
            raise AssertionError("pysaml2 refused the LogoutResponse")
        return response.response, query.get("RelayState")

    def accept_logout(self, saml_response: str):
        """pysaml2's check of a LogoutResponse (signature, destination, issuer); returns it."""
        response = self.client.parse_logout_request_response(saml_response, BINDING_HTTP_POST)
        if response is None:
            raise AssertionError("pysaml2 refused the LogoutResponse")
        return response.response

    def accept(self, saml_response: str, request_id: str | None) -> Result:
        outstanding = {request_id: "/"} if request_id else {}
        response = self.client.parse_authn_request_response(saml_response, BINDING_HTTP_POST, outstanding=outstanding)
        if response is None:
            raise AssertionError("pysaml2 refused the response")
        name_id = response.name_id
        statement = response.assertion.authn_statement[0]
        return Result(name_id.text, name_id.format, {k: list(v) for k, v in response.ava.items()},
                      statement.session_index, response.response.issuer.text)
