"""Fetched CRLs that must not be believed (review of the certificate plugin: CRL cache poisoning).

A CRL distribution point is plain http, so whoever is on the path can serve anything there: a CRL
with the CA's name signed by another key, another CA's CRL, one dated years ahead so that the
CA's next CRL looks older, or one of the CA's CRLs numbered lower than the one held. None of them
may replace the CRL held, or decide when the next one is fetched. The real plugin runs in-process
(``build_runtime``) against a real CRL server on loopback (``support.ocsp.PkiServer``), and
:meth:`CrlStore.refresh` is called as the background thread calls it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway import Attempt, CertificateCredential, Decision, Outcome
from gateway.plugins.client_cert.crl import CrlStore
from gateway.runtime import Runtime, build_runtime
from support.gateway import write_conf
from support.ocsp import PkiServer
from support.pki import CA, Issued, partition, write_bundle

UTC = dt.timezone.utc
ISSUING = "poison issuing CA"


@pytest.fixture(scope="module")
def server():
    pki_server = PkiServer().start()
    yield pki_server
    pki_server.stop()


@pytest.fixture(scope="module")
def root() -> CA:
    return CA.create("poison root CA", days=365)


@pytest.fixture(scope="module")
def issuing(root) -> CA:
    return root.issue(ISSUING, ca=True, not_after=dt.datetime.now(UTC) + dt.timedelta(days=200))


@pytest.fixture
def start(tmp_path, root, issuing):
    """``start(policy, **revocation)``: the gateway's core with only ``client_cert`` in its chain
    (names by CN, no lookup, no OCSP, failed URLs asked again at once)."""
    runtimes: list[Runtime] = []

    def build(policy: str, **revocation) -> Runtime:
        conf_d = tmp_path / "conf.d"
        write_bundle(conf_d / "root.pem", root)
        write_bundle(conf_d / "issuing.pem", issuing)
        settings = {"ca_bundle": "root.pem", "intermediates": "issuing.pem",
                    "mapping": {"rules": ["cn"], "lookup": False},
                    "revocation": {"policy": policy, "ocsp": False, "retry_after_failure": 0, **revocation}}
        conf = write_conf(conf_d, {
            "gateway.yaml": json.dumps({"chain": ["client_cert"], "throttle": {"enabled": False}}),
            "client_cert.yaml": json.dumps({"client_cert": settings}),
        })
        runtimes.append(build_runtime(conf, state_dir=tmp_path / "state"))
        return runtimes[-1]

    yield build
    for runtime in runtimes:
        runtime.discard()


def _decide(runtime: Runtime, cert: Issued) -> Decision:
    return runtime.gateway.decide(Attempt(
        request_id="t", client=ipaddress.ip_address("127.0.0.1"), front_door="forward_auth",
        deadline=time.monotonic() + 5, certificate=CertificateCredential((cert.der,), "tls")))


def _login(runtime: Runtime, cert: Issued) -> tuple[Outcome, str]:
    decision = _decide(runtime, cert)
    return decision.outcome, decision.reason


def _store(runtime: Runtime) -> CrlStore:
    return runtime.gateway.pm.get_plugin("client_cert").revocation.crls


def _refresh(store: CrlStore, url: str) -> None:
    """The background refresh, with *url*'s periodic re-fetch due now. (Not ``fetched = 0``:
    monotonic() counts from boot, and a machine may have been up for less than the interval.)"""
    store._urls[url].fetched -= store.settings.crl_refresh_interval
    store.refresh()


def _crl(ca: CA, revoked: list[Issued], *, number: int, this_update: dt.datetime) -> bytes:
    """A CRL of *ca* with the CRLNumber given (``support.pki`` derives it from thisUpdate)."""
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(this_update).next_update(this_update + dt.timedelta(days=1))
               .add_extension(x509.CRLNumber(number), critical=False))
    for cert in revoked:
        builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(
            cert.cert.serial_number).revocation_date(this_update).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


SAME_NAME, OTHER_CA = "the CA's name, another key", "another trusted CA"


def _forger(kind: str, root: CA) -> CA:
    if kind == SAME_NAME:
        return CA.create(ISSUING)
    return root.issue("poison other issuing CA", ca=True)  # trusted, but not the issuer of this URL


GOOD = (Outcome.SUCCESS, "")
REVOKED = (Outcome.INVALID_CREDENTIALS, "cert.revoked")


@pytest.mark.parametrize("kind", [SAME_NAME, OTHER_CA])
@pytest.mark.parametrize("policy", ["soft-fail", "hard-fail"])
def test_a_forged_crl_does_not_replace_the_one_held(start, server, root, issuing, policy, kind, caplog):
    name = f"forged-{policy}-{kind.replace(' ', '-')}.crl?token=s3cret"  # a query a log must not show
    url = server.put_crl(name, b"")
    revoked, good = (issuing.issue("amy", client=True, crl_url=url) for _ in range(2))
    server.put_crl(name, issuing.crl([revoked]))
    runtime = start(policy)
    store = _store(runtime)
    assert (_login(runtime, revoked), _login(runtime, good)) == (REVOKED, GOOD)

    forger = _forger(kind, root)
    server.put_crl(name, forger.crl([], this_update=dt.datetime.now(UTC)))  # newer than the one held
    with caplog.at_level(logging.WARNING, logger="authgw.plugin.client_cert"):
        for _ in range(2):
            _refresh(store, url)
            assert (_login(runtime, revoked), _login(runtime, good)) == (REVOKED, GOOD)
    assert server.hits[f"/crl/{name}"] == 3

    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, refusals  # rate-limited
    shown = url.partition("?")[0] + "?…"
    assert f"CRL from {shown} refused, the CRL held is kept" in refusals[0]
    error = store.fetch_errors()[url]
    assert ("signature does not verify" if kind == SAME_NAME else "is not a CA this URL serves") in error, error
    assert "s3cret" not in caplog.text + error


@pytest.mark.parametrize("kind", [SAME_NAME, "the CA, its clock ten years ahead"])
def test_a_crl_dated_in_the_future_does_not_shut_out_the_cas_next_one(start, server, issuing, kind):
    """Soft-fail, where the forged CRL let a revoked certificate in: once held, its thisUpdate in
    2036 made the CA's real CRL "older", refused as a rollback."""
    url = server.put_crl(f"future-{kind.replace(' ', '-')}.crl", issuing.crl([]))
    name = url.rpartition("/")[2]
    victim = issuing.issue("amy", client=True, crl_url=url)
    runtime = start("soft-fail")
    store = _store(runtime)
    assert _login(runtime, victim) == GOOD

    signer = CA.create(ISSUING) if kind == SAME_NAME else issuing
    ahead = dt.datetime.now(UTC) + dt.timedelta(days=3650)
    server.put_crl(name, signer.crl([], this_update=ahead, next_update=ahead + dt.timedelta(days=1)))
    _refresh(store, url)
    decision = _decide(runtime, victim)
    assert decision.success and decision.identity.claims["certificate_revocation"] == "good"  # the CA's CRL
    error = store.fetch_errors()[url]
    assert ("is in the future" if signer is issuing else "signature does not verify") in error, error

    server.put_crl(name, issuing.crl([victim], this_update=dt.datetime.now(UTC)))  # the CA revokes amy
    _refresh(store, url)
    assert _login(runtime, victim) == REVOKED
    assert url not in store.fetch_errors()


def test_a_lower_crl_number_is_refused_as_a_rollback(start, server, issuing):
    """Even signed by the CA and dated later: RFC 5280 5.2.3 numbers a CA's CRLs in increasing
    sequence, so a lower number is an older CRL."""
    now = dt.datetime.now(UTC) - dt.timedelta(minutes=5)
    url = server.put_crl("numbered.crl", b"")
    victim, later, good = (issuing.issue("amy", client=True, crl_url=url) for _ in range(3))
    server.put_crl("numbered.crl", _crl(issuing, [victim], number=100, this_update=now))
    runtime = start("hard-fail")
    store = _store(runtime)
    assert (_login(runtime, victim), _login(runtime, good)) == (REVOKED, GOOD)

    server.put_crl("numbered.crl", _crl(issuing, [], number=99, this_update=now + dt.timedelta(minutes=1)))
    _refresh(store, url)
    assert (_login(runtime, victim), _login(runtime, good)) == (REVOKED, GOOD)
    assert "CRLNumber 99 is lower than the held CRL's 100" in store.fetch_errors()[url]

    # The CA's next CRL, numbered higher, is held as before.
    next_crl = _crl(issuing, [victim, later], number=101, this_update=now + dt.timedelta(minutes=2))
    server.put_crl("numbered.crl", next_crl)
    _refresh(store, url)
    assert (_login(runtime, victim), _login(runtime, later), _login(runtime, good)) == (REVOKED, REVOKED, GOOD)


def _delta_crl(ca: CA, *, base: int, number: int, this_update: dt.datetime) -> bytes:
    """A delta CRL of *ca* (RFC 5280 5.2.4) listing nothing, on top of base CRL number *base*."""
    return (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
            .last_update(this_update).next_update(this_update + dt.timedelta(days=1))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.DeltaCRLIndicator(base), critical=True)
            .sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


NARROWER = ["another partition", "CA certificates only", "a delta CRL", "CA certificates only, naming this URL",
            "attribute certificates only, naming this URL", "some reasons only, naming this URL"]


@pytest.mark.parametrize("kind", NARROWER)
def test_a_genuine_crl_of_narrower_scope_does_not_replace_the_one_held(start, server, issuing, kind):
    """Signed by the CA, newer and numbered higher, but about other certificates: whoever is on
    the plain-http path serves it at this URL. Held, it would leave this URL's certificates
    without an answer ("unknown"), which soft-fail lets in, revoked ones too."""
    name = f"narrower-{kind.replace(' ', '-')}.crl"
    url = server.put_crl(name, b"")
    revoked, later, good = (issuing.issue("amy", client=True, crl_url=url) for _ in range(3))
    now = dt.datetime.now(UTC) - dt.timedelta(minutes=5)
    server.put_crl(name, _crl(issuing, [revoked], number=100, this_update=now))
    runtime = start("soft-fail")
    store = _store(runtime)
    assert (_login(runtime, revoked), _login(runtime, good)) == (REVOKED, GOOD)

    newer = now + dt.timedelta(minutes=1)
    server.put_crl(name, {
        "another partition": lambda: issuing.crl([], this_update=newer, idp=partition(url + "-other")),
        "CA certificates only": lambda: issuing.crl([], this_update=newer, idp=partition(only_contains_ca_certs=True)),
        "a delta CRL": lambda: _delta_crl(issuing, base=100, number=101, this_update=newer),
        "CA certificates only, naming this URL":
            lambda: issuing.crl([], this_update=newer, idp=partition(url, only_contains_ca_certs=True)),
        "attribute certificates only, naming this URL":
            lambda: issuing.crl([], this_update=newer, idp=partition(url, only_contains_attribute_certs=True)),
        "some reasons only, naming this URL":
            lambda: issuing.crl([], this_update=newer, idp=partition(url, only_some_reasons=frozenset(
                {x509.ReasonFlags.key_compromise}))),
    }[kind]())
    _refresh(store, url)
    assert (_login(runtime, revoked), _login(runtime, good)) == (REVOKED, GOOD)
    assert _decide(runtime, good).identity.claims["certificate_revocation"] == "good"
    error = store.fetch_errors()[url]
    assert "CRL refused" in error and ("delta" in error if kind == "a delta CRL" else
                                       "covers less than the CRL held" in error if "naming this URL" in kind else
                                       "does not name this URL" in error), error

    # The CA moving this URL to a partition CRL that names it is believed: its next CRL.
    server.put_crl(name, issuing.crl([revoked, later], this_update=newer + dt.timedelta(minutes=1),
                                     idp=partition(url)))
    _refresh(store, url)
    assert url not in store.fetch_errors()
    assert (_login(runtime, revoked), _login(runtime, later), _login(runtime, good)) == (REVOKED, REVOKED, GOOD)


def test_a_configured_urls_crl_is_checked_from_the_start(start, server, issuing):
    """A configured URL is fetched before any certificate names it (start-up, readiness): it
    serves the configured CAs, so a forged CRL is refused then and there (readiness sees no CRL
    and the error), and a genuine one is held and used without another fetch."""
    path = "/crl/configured.crl"
    url = server.put_crl("configured.crl", CA.create(ISSUING).crl([]))
    victim, good = issuing.issue("amy", client=True), issuing.issue("amy", client=True)
    runtime = start("hard-fail", crl_urls=[url])
    store = _store(runtime)
    store.refresh()  # what start-up does
    assert server.hits[path] == 1 and dict(store.sources())[url] is None
    assert "CRL refused" in store.fetch_errors()[url]

    server.put_crl("configured.crl", issuing.crl([victim]))
    runtime = start("hard-fail", crl_urls=[url])  # the genuine CRL fetched at start-up
    store = _store(runtime)
    store.refresh()
    assert dict(store.sources())[url] is not None and url not in store.fetch_errors()
    assert (_login(runtime, victim), _login(runtime, good)) == (REVOKED, GOOD)
    assert server.hits[path] == 2  # checked at start-up, not fetched again

    server.put_crl("configured.crl", CA.create(ISSUING).crl([], this_update=dt.datetime.now(UTC)))
    _refresh(store, url)
    assert server.hits[path] == 3
    assert (_login(runtime, victim), _login(runtime, good)) == (REVOKED, GOOD)


def test_a_url_refused_for_want_of_its_issuer_is_fetched_again_when_it_learns_it(server, issuing):
    """A configured URL of a CA that is not configured (clients present it): its CRL is refused
    until a certificate of that CA is checked, and then fetched again at once, not after
    ``retry_after_failure`` (under hard-fail its certificates were refused meanwhile)."""
    from gateway.plugins.client_cert.settings import RevocationSettings
    from gateway.plugins.client_cert.status import Status

    path = "/crl/learned.crl"
    url = server.put_crl("learned.crl", issuing.crl([]))
    settings = RevocationSettings(policy="hard-fail", ocsp=False, crl_urls=[url], retry_after_failure=3600)
    store = CrlStore(settings, logging.getLogger("test"), 300.0, cas=())  # no configured CA serves it
    store.refresh()
    assert server.hits[path] == 1 and dict(store.sources())[url] is None
    assert "not a CA this URL serves" in store.fetch_errors()[url]

    good = issuing.issue("amy", client=True)
    verdict = store.status(good.cert, issuing.cert, time.monotonic() + 5)
    assert server.hits[path] == 2  # not blocked for an hour: its issuer is known now
    assert verdict.status is Status.GOOD, verdict
    assert url not in store.fetch_errors()
