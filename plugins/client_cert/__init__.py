"""``client_cert``: log users in with the X.509 certificate their browser, smart card or device
presents (docs/plugins/client_cert.md).

Certificates arrive on the plugin's own TLS listener (``listener:``; the core puts the verified
leaf into ``attempt.certificate``) or, behind a TLS-terminating proxy, in a request header
(``headers:``) believed only when the socket peer is one of ``trusted_proxies``, and only the
one header configured for that proxy (``headers[].proxies``); empty or ``-`` there means "no
certificate" and no other header is read.

Decides
    attempts that carry a certificate. ``INVALID_CREDENTIALS`` with ``cert.malformed``,
    ``cert.expired``, ``cert.not_yet_valid``, ``cert.untrusted``, ``cert.wrong_usage``,
    ``cert.policy_missing``, ``cert.revoked``, ``cert.revocation_unknown`` (hard-fail),
    ``cert.ambiguous`` (a rule found two names) or ``cert.directory_mismatch`` (the directory
    does not hold this certificate for the user); ``ACCOUNT_STATE`` with the directory's reason
    (``ldap.disabled``, ``ldap.locked``, ``ldap.account_expired``, ``static.disabled``; the
    password states only with ``mapping.password_state_refuses``); ``SUCCESS`` with the mapped
    identity.
Abstains
    when the attempt has no certificate (so Basic or Negotiate can answer: an empty, ``-`` or
    absent header from the proxy means none), when a certificate header comes from a peer that
    is not a trusted proxy or is not the one header that proxy sets (ignored and logged), at the
    API front door (``/v1/authenticate`` checks a username and password, and a forwarded
    certificate there is the calling service's); with a
    ``USER_NOT_FOUND`` note ``cert.unmapped`` (no rule found a name) or ``cert.user_not_found``
    (the directory knows none of the names as the certificate spells them); with an ``UNAVAILABLE`` note
    ``cert.directory_unavailable`` when ``gateway_lookup_user`` cannot reach the directory.
Settings (``client_cert:`` in conf.d)
    ``ca_bundle``, ``intermediates``, ``listener`` (``address``, ``certificate``, ``key``,
    ``key_password``, ``minimum_tls_version``, ``check_validity_in_handshake``), ``headers``
    (``name``, ``format: pem|xfcc``, ``proxies``), ``clock_tolerance``, ``extended_key_usages``,
    ``require_digital_signature``, ``required_policies``, ``max_chain_depth``, ``revocation``
    (``policy: off|soft-fail|hard-fail``, CRL and OCSP settings), ``mapping`` (``rules``,
    ``lookup``, ``require_directory_match``, ``serial_order``, ``password_state_refuses``), ``verify_cache_seconds``.
    From the core: ``health.probe_interval`` (CRL sources and a configured OCSP responder are
    probed in the background; ``/readyz`` reports them, :mod:`~gateway.plugins.client_cert.health`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from cryptography import x509

from gateway import (
    Attempt,
    BackendUnavailable,
    ComponentState,
    FORWARDED_CERTIFICATE_KEY,
    Decision,
    Identity,
    Listener,
    Outcome,
    PluginContext,
    SelfTest,
    hookimpl,
)

from gateway.chain import may_run_on_loop
from gateway.logs import printable
from gateway.model import folded_username

from .headers import parse_pem_header, parse_xfcc
from .listener import build_listener
from .mapping import (candidates, directory_binding_matches, issuer_serial_orders, lowers_letter_for_letter,
                      misspelt, subject_syntax_in_values, thumbprint)
from .health import RevocationHealth
from .revocation import RevocationChecker
from .selftests import selftests
from .settings import ClientCertSettings, HeaderSource, MappingRule
from .status import Status
from .verify import CertError, TrustStore, UsagePolicy, describe, load_bundle, parse_der

__all__ = ["ClientCertPlugin"]


class ClientCertPlugin:
    """Registered as ``client_cert``."""

    Settings = ClientCertSettings
    #: What this step checks (readiness: which steps can serve password logins).
    credentials = ("certificate",)
    #: Down or hung, this step notes UNAVAILABLE and the chain goes on (gateway/steplimit.py).
    passes_when_unavailable = True

    def __init__(self, settings: ClientCertSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.log = context.log
        self.hook = context.hook
        roots = load_bundle(settings.ca_bundle)
        intermediates = load_bundle(settings.intermediates) if settings.intermediates else []
        usage = UsagePolicy(frozenset(settings.extended_key_usages), settings.require_digital_signature,
                            frozenset(settings.required_policies), settings.clock_tolerance)
        self.trust = TrustStore(roots, intermediates, usage, max_chain_depth=settings.max_chain_depth,
                                cache_seconds=settings.verify_cache_seconds)
        revocation = settings.revocation
        responder = None
        if revocation.ocsp_responder_certificate:
            responder = load_bundle(revocation.ocsp_responder_certificate)[0]
        self.revocation = RevocationChecker(revocation, self.log, settings.clock_tolerance, responder,
                                            [*roots, *intermediates])
        #: The CAs the operator configured: an ``X509:<I>..<SR>..`` mapping names one of them
        #: (:meth:`map_user`), never a CA of the same name from a client's forwarded chain.
        self._configured_cas = frozenset([*roots, *intermediates])
        self.health = RevocationHealth(self.name, settings, self.revocation, (intermediates or roots)[0])
        #: Certificate headers watched for, to log (and ignore) those the peer does not set.
        self._cert_headers = tuple(dict.fromkeys([*(h.name for h in settings.headers), *_KNOWN_CERT_HEADERS]))
        self.listener: Listener | None = None
        if settings.listener is not None:
            # The handshake trusts exactly what the plugin trusts (see listener.py on intermediates).
            self.listener = build_listener(self.name, settings.listener, [*roots, *intermediates])
        trusted = context.gateway.trusted_proxies
        for source in settings.headers:
            for net in source.proxies:
                if not any(net.version == t.version and net.subnet_of(t) for t in trusted):  # type: ignore[arg-type]
                    self.log.warning("%s: headers: %s is named for %s but is not in trusted_proxies; its "
                                     "header will be ignored", self.name, net, source.name)
        if settings.mapping.require_directory_match and settings.mapping.serial_order == "either":
            self.log.warning("%s: mapping.serial_order is `either`: a certificate whose serial is the byte-reverse "
                             "of a mapped certificate's meets that X509:<I>..<SR>.. mapping; use it only while "
                             "rewriting the directory's mappings in one order", self.name)
        if settings.listener is None and not settings.headers:
            self.log.warning("%s has neither a listener nor headers: it will never see a certificate "
                             "(unless another plugin's listener hands one over)", self.name)

    @property
    def loop_capable(self) -> bool:
        """Whether this step may run on the event loop (gateway/aio.py). Its own work does not
        wait: the path is validated in memory (cached per chain, ``verify_cache_seconds``) and the
        mapping rules read the certificate, so a certificate login needs no chain thread, as long as
        nothing asks the network: revocation checks fetch CRLs and ask OCSP responders with
        blocking sockets, so with ``revocation.policy`` other than ``off`` logins stay on the
        chain threads; with ``mapping.lookup``, every ``gateway_lookup_user`` must be able to run
        on the loop too (the ldap plugin's is)."""
        if self.revocation.enabled:
            return False
        if self.settings.mapping.lookup:
            return all(map(may_run_on_loop, self.hook.gateway_lookup_user.get_hookimpls()))
        return True

    # -- lifecycle -----------------------------------------------------------------------------

    @hookimpl
    def gateway_listeners(self) -> list[Listener] | None:
        return [self.listener] if self.listener else None

    @hookimpl
    def gateway_startup(self) -> None:
        self.revocation.start()

    @hookimpl
    def gateway_shutdown(self) -> None:
        self.revocation.stop()

    # -- the chain step --------------------------------------------------------------------------

    def header_for(self, attempt: Attempt) -> HeaderSource | None:
        """The one header the socket peer (a trusted proxy) sets, or ``None``."""
        peer = attempt.peer
        if peer is None:
            return None
        for source in self.settings.headers:
            if any(peer.version == net.version and peer in net for net in source.proxies):
                return source
        return next((source for source in self.settings.headers if not source.proxies), None)

    def presented(self, attempt: Attempt) -> tuple[tuple[bytes, ...], str] | None:
        """The certificate chain (DER, leaf first) and where it came from, or ``None``.

        Behind a proxy exactly one header is read: the one configured for that proxy. Empty or
        ``-`` there means the client presented no certificate, and that ends the certificate path;
        no other header is consulted, because the proxy passes headers it does not set through
        from the client unchanged (docs/security.md, "forwarded certificates").
        """
        if attempt.certificate is not None:
            return attempt.certificate.chain, attempt.certificate.source
        if attempt.front_door == "api":
            # The API asks whether a username and password hold; a certificate its trusted proxy
            # forwards is the calling service's, not that user's. Read, it answered "success" as
            # the service's certificate user for any name and any password (review of the
            # client_cert plugin).
            return None
        source = self.header_for(attempt) if attempt.trusted_peer else None
        ignored = [name for name in self._cert_headers
                   if (source is None or name != source.name) and _header_values(attempt.headers, name)]
        if ignored:
            # Anyone can send these; only the header the peer itself sets means a TLS handshake
            # happened (DESIGN.md section 5).
            why = ("which is not a trusted proxy" if not attempt.trusted_peer else
                   "a trusted proxy that sets no certificate header" if source is None else
                   f"a trusted proxy that sets {source.name}")
            self.log.warning("ignored the %s header from %s, %s (request %s)", ", ".join(ignored),
                             attempt.peer, why, attempt.request_id)
        if source is None:
            return None
        values = _header_values(attempt.headers, source.name)
        if not values:
            return None
        if len(values) > 1:
            # The proxy must set the header, replacing any the client sent; two copies mean one
            # of them may be the client's own.
            attempt.stash[FORWARDED_CERTIFICATE_KEY] = True  # the audit's method: presented, refused
            raise CertError("cert.malformed", f"the {source.name} header came {len(values)} times")
        if values[0].strip() in ("", "-"):
            return None  # nginx: the client presented no certificate
        chain = parse_pem_header(values[0]) if source.format == "pem" else parse_xfcc(values[0])
        if not chain:
            return None  # an XFCC without a certificate element: none presented
        attempt.stash[FORWARDED_CERTIFICATE_KEY] = True  # the audit's method (the handshake's is attempt.certificate)
        return chain, "header"

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        chain: tuple[bytes, ...] = ()
        source = attempt.certificate.source if attempt.certificate is not None else "header"
        try:
            presented = self.presented(attempt)
            if presented is None:
                return None
            chain, source = presented
            path = self.trust.verify(chain)
            revocation = self.check_revocation(path, attempt)
        except CertError as exc:
            self.log.info("certificate refused (%s) from %s via %s: %s%s [request %s]", exc.reason, attempt.client,
                          source, exc.detail, _describe_der(chain), attempt.request_id)
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason=exc.reason)
        return self.map_user(attempt, path[0], revocation, path[1] if len(path) > 1 else None)

    def check_revocation(self, path: list[x509.Certificate], attempt: Attempt) -> str:
        """``good``, ``unknown`` (allowed under soft-fail) or ``not_checked``; raises CertError."""
        if not self.revocation.enabled:
            return "not_checked"
        verdict = self.revocation.check(path, attempt.deadline)
        if verdict.status is Status.REVOKED:
            raise CertError("cert.revoked", verdict.detail)
        if verdict.status is Status.GOOD:
            return "good"
        if self.settings.revocation.policy == "hard-fail":
            raise CertError("cert.revocation_unknown", verdict.detail)
        self.log.warning("revocation status unknown, allowed under soft-fail: %s; %s [request %s]",
                         verdict.detail, describe(path[0]), attempt.request_id)
        return "unknown"

    def map_user(self, attempt: Attempt, leaf: x509.Certificate, revocation: str,
                 issuer: x509.Certificate | None = None) -> Decision | None:
        """*issuer*: the CA that issued *leaf* on its verified path (``None``: *leaf* is itself a
        configured certificate). An ``X509:<I>..<SR>..`` mapping names a CA by its name only, and
        any CA the gateway trusts can make another of that name (a partner CA without a path
        length limit), whose certificate a proxy forwards with the client's chain: such a
        certificate with alice's serial met her mapping and logged in as alice (stop 46 review).
        It counts only when *issuer* is a CA of ``ca_bundle`` or ``intermediates``; so does an
        ``issuer_serial`` rule's table, which names CAs the same way."""
        mapping = self.settings.mapping
        claims = {**_leaf_claims(leaf), "certificate_revocation": revocation}
        looked_up: list[str] = []
        configured_issuer = issuer is None or issuer in self._configured_cas
        for rule in mapping.rules:
            names = candidates(rule, leaf)
            if names and rule.type == "issuer_serial" and not configured_issuer:
                # The table names the CA by its name: a CA of that name from a client's chain is
                # another CA (see above), and its serials are its own.
                self.log.info("certificate not mapped by rule issuer_serial: its issuer %r is not a configured CA "
                              "but one of the same name from the presented chain: %s [request %s]",
                              issuer.subject.rfc4514_string(), describe(leaf), attempt.request_id)
                names = []
            if names:  # a good name beside one spelt so it is none: two identities
                names += [ascii(raw)[:80] for raw in misspelt(rule, leaf)]
            if len(names) > 1:
                self.log.info("certificate maps to %d names by rule %s (%s); refused: %s [request %s]",
                              len(names), rule.type, ", ".join(names), describe(leaf), attempt.request_id)
                return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason="cert.ambiguous")
            if not names:
                if rule.type == "subject":
                    self._log_subject_syntax(attempt, leaf)
                elif rule.lowercase:
                    self._log_no_lowercase(attempt, rule, leaf)
                continue
            username = names[0]
            if not mapping.lookup:
                return Decision.allow(self.trusted_identity(username, leaf, claims), step=self.name)
            try:
                identity = self.hook.gateway_lookup_user(username=username)
            except BackendUnavailable as exc:
                self.log.warning("directory unavailable while mapping a certificate: %s [request %s]",
                                 exc, attempt.request_id)
                attempt.note(Outcome.UNAVAILABLE, step=self.name, reason="cert.directory_unavailable")
                return None
            if identity is None:
                looked_up.append(username)
                continue
            if self._other_spelling(rule, username, identity.username):
                # Directories find a name ignoring case, and slapd reads ``İ`` as ``i``: without
                # this, certificates for ``ALICE`` and ``alİce`` logged in as alice (review of
                # the client_cert plugin; the Kerberos plugin's ``_other_case``). The directory
                # does not know the name the certificate holds, so it is refused as an unknown
                # one, and a client cannot tell from the answer that alice exists.
                self.log.info("certificate names %r by rule %s, which the directory knows only as %r; taken as "
                              "unknown (a rule with `lowercase: true` accepts names that differ in case only): "
                              "%s [request %s]", username, rule.type, identity.username, describe(leaf),
                              attempt.request_id)
                looked_up.append(username)
                continue
            refusal = identity.refusal(password_state_refuses=mapping.password_state_refuses)
            if refusal:
                # A certificate outlives the account it was issued to: the directory's account
                # state decides, with the password path's reason codes (docs/security.md).
                self.log.info("certificate of %r refused: the account state is %s: %s [request %s]", username,
                              refusal, describe(leaf), attempt.request_id)
                return Decision.deny(Outcome.ACCOUNT_STATE, step=self.name, reason=refusal)
            if mapping.require_directory_match and not self._directory_binds(attempt, username, identity.claims,
                                                                              leaf, configured_issuer):
                return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason="cert.directory_mismatch")
            merged = {k: v for k, v in identity.claims.items() if _json_safe(v)}
            return Decision.allow(dataclasses.replace(identity, method=self.name, claims={**merged, **claims}),
                                  step=self.name)
        reason = "cert.user_not_found" if looked_up else "cert.unmapped"
        self.log.info("certificate maps to no user (%s%s): %s [request %s]", reason,
                      f": {', '.join(looked_up)} unknown to the directory" if looked_up else "",
                      describe(leaf), attempt.request_id)
        attempt.note(Outcome.USER_NOT_FOUND, step=self.name, reason=reason)
        return None

    def _directory_binds(self, attempt: Attempt, username: str, claims: dict[str, Any], leaf: x509.Certificate,
                         configured_issuer: bool) -> bool:
        """Whether the directory's *claims* for *username* bind *leaf* (``require_directory_match``),
        logging why not. An ``X509:<I>..<SR>..`` mapping is read in the byte order
        ``serial_order`` names: read in both, alice's mapping was met by a certificate of the same
        CA whose serial is the byte-reverse of hers (stop 47). A mapping that names the
        certificate only in the other order is either one written in that order (a directory
        filled from ``openssl x509 -serial``, a migration) or such a certificate: the log line
        says which setting reads it, and the certificate is refused."""
        order = self.settings.mapping.serial_order
        if directory_binding_matches(claims, leaf, issuer_serial=configured_issuer, serial_order=order):
            if order == "either" and issuer_serial_orders(claims, leaf) == {"forward"}:
                self.log.info("the directory entry of %r names this certificate by an X509:<I>..<SR>.. mapping with "
                              "its serial in forward byte order, accepted under mapping.serial_order: either; rewrite "
                              "it byte-reversed, as Active Directory writes it (KB5014754), and set serial_order: "
                              "reversed: %s [request %s]", username, describe(leaf), attempt.request_id)
            return True
        other = issuer_serial_orders(claims, leaf) if configured_issuer else set()
        if other:
            found = "forward" if order == "reversed" else "reversed"  # `either` would have matched it
            self.log.warning(
                "the directory entry of %r names this certificate by an X509:<I>..<SR>.. mapping only with its "
                "serial in %s byte order, and mapping.serial_order is %s; refused. Active Directory writes the "
                "serial byte-reversed (KB5014754), `openssl x509 -serial` prints it forward. If the directory's "
                "mappings are written %s, set mapping.serial_order: %s (or `either` while rewriting them, which "
                "lets a certificate whose serial is the byte-reverse of a mapped one's meet that mapping); else "
                "this is another certificate of that CA whose serial is the byte-reverse of the mapped one's: %s "
                "[request %s]", username, found, order, found, found, describe(leaf), attempt.request_id)
        else:
            self.log.info("the directory entry of %r holds no matching certificate mapping; refused: %s "
                          "[request %s]", username, describe(leaf), attempt.request_id)
        return False

    def _log_no_lowercase(self, attempt: Attempt, rule: MappingRule, leaf: x509.Certificate) -> None:
        odd = [raw for raw in misspelt(rule, leaf) if not lowers_letter_for_letter(raw)]
        if odd:
            self.log.info("certificate not mapped by rule %s with `lowercase: true`: %s holds a letter whose "
                          "lowercase is not one letter (U+0130, capital I with dot above: i and U+0307 by Unicode, "
                          "i to a Turkish reader and to slapd); it names no one by this rule: %s [request %s]",
                          rule.type, ", ".join(ascii(raw)[:80] for raw in odd), describe(leaf), attempt.request_id)

    def _log_subject_syntax(self, attempt: Attempt, leaf: x509.Certificate) -> None:
        odd = subject_syntax_in_values(leaf)
        if odd:
            self.log.info("certificate not mapped by rule subject: its subject's values hold RFC 4514 syntax "
                          "(%s), which a pattern could read as an RDN boundary: %s [request %s]",
                          printable("; ".join(odd)), describe(leaf), attempt.request_id)

    @staticmethod
    def _other_spelling(rule: MappingRule, username: str, known_as: str | None) -> bool:
        """Whether the directory found *username* under another spelling of the same letters
        (case, ``İ`` for ``i``: what :func:`~gateway.model.folded_username` folds, at least as
        loosely as a directory matches names). A rule with ``lowercase`` is the operator's word
        that names differ in case only, so the directory's ``Alice`` is that rule's ``alice``;
        no other spelling is. A name that the directory answers with another attribute's value
        (a full UPN looked up, the account name answered) is not another spelling, and is the
        directory's to match."""
        if not known_as or known_as == username:
            return False
        if rule.lowercase and known_as.lower() == username:
            return False
        return folded_username(known_as) == folded_username(username)

    def trusted_identity(self, username: str, leaf: x509.Certificate, claims: dict[str, Any]) -> Identity:
        display_name, email = _profile(leaf)
        return Identity(subject=f"{self.name}:{username}", username=username, method=self.name,
                        display_name=display_name, email=email, claims=claims)

    # -- operations ------------------------------------------------------------------------------

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        return selftests(self)

    @hookimpl
    def gateway_probe(self) -> None:
        self.health.probe()

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState]:
        return [ComponentState(f"{self.name}.trust", True, f"{len(self.trust.roots)} root(s), "
                               f"{len(self.trust.intermediates)} intermediate(s)"), *self.health.states()]


def _header_values(headers: Any, name: str) -> list[str]:
    """Every copy of header *name*: the front door's view has ``getall``, a plain mapping not."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name))
    value = headers.get(name)
    return [] if value is None else [value]


def _describe_der(chain: tuple[bytes, ...]) -> str:
    """``; subject=... issuer=... serial=...`` of a refused certificate, when it parses at all."""
    try:
        return f"; {describe(parse_der(chain[0]))}" if chain else ""
    except CertError:
        return ""


#: Headers proxies commonly forward certificates in (nginx recipes, Envoy, Traefik, HAProxy,
#: Apache): a client that sends one is trying something, so it is logged when ignored.
_KNOWN_CERT_HEADERS = ("x-ssl-client-cert", "x-forwarded-client-cert", "x-forwarded-tls-client-cert",
                       "ssl-client-cert", "x-client-cert", "x-ssl-cert")

_EMAIL_RULES = (MappingRule(type="email"), MappingRule(type="subject_email"))


# Verified paths are cached, so the same Certificate object comes back for a returning client:
# derive its texts once (rfc4514_string and fingerprints are not free on the hot path).
@functools.lru_cache(maxsize=4096)
def _leaf_claims(leaf: x509.Certificate) -> dict[str, str]:
    return {
        "certificate_sha256": thumbprint(leaf),
        "certificate_subject": leaf.subject.rfc4514_string(),
        "certificate_issuer": leaf.issuer.rfc4514_string(),
        "certificate_serial": f"{leaf.serial_number:x}",
    }


@functools.lru_cache(maxsize=4096)
def _profile(leaf: x509.Certificate) -> tuple[str, str]:
    """Display name (subject CN) and email (SAN, else subject emailAddress) for a trusted name."""
    emails = [e for rule in _EMAIL_RULES for e in candidates(rule, leaf)]
    common = leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return (str(common[0].value) if common else ""), (emails[0] if emails else "")


def _json_safe(value: Any) -> bool:
    """Directory claims are passed on, except binary values (a DER userCertificate) that the
    JSON front door could not encode."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return False
    if isinstance(value, (list, tuple)):
        return all(_json_safe(v) for v in value)
    return True
