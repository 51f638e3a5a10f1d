"""A ticket's clear-text server name is the client's text: forged AP-REQs whose service name reads
like a GSSAPI message (``HTTP/replay cache@EXAMPLE.TEST``, ``request is a replay``, the replay
cache's path) are refused like any other forged ticket, never taken for the gateway's own failure
(review of the Kerberos plugin: MIT writes that name into the message the plugin used to match).

Real MIT KDC (tests/support/kdc.py) and real ``authgw serve`` processes with ``chain: [kerberos]``,
so ``/readyz`` turns false as soon as the plugin reports its keytab or replay cache unusable. The
forged tokens are built here byte by byte: a real ticket header with random bytes where the
encrypted parts go, bare (RFC 4121) or inside SPNEGO, with or without mutual-required (which
decides whether MIT answers with a KRB-ERROR).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from support.der import der
from support.gateway import GatewayProcess, write_conf
from support.kdc import KDC

SPN = "HTTP/localhost@EXAMPLE.TEST"
INSIDE = ("127.0.0.3", 0)
KRB5_OID = bytes.fromhex("06092a864886f712010202")  # 1.2.840.113554.1.2.2
SPNEGO_OID = bytes.fromhex("06062b0601050502")  # 1.3.6.1.5.5.2
REPLAY_CACHE_HINT = "the replay cache cannot be written"


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    d = tmp_path_factory.mktemp("krbcrafted")
    kdc = KDC(d / "kdc", "EXAMPLE.TEST").start()
    try:
        kdc.add_principal("alice", "alice-password")
        keytab = kdc.add_service("HTTP/localhost", d / "http.keytab")
        cache = kdc.kinit("alice", "alice-password", d / "alice.cc")
        yield {"kdc": kdc, "keytab": keytab, "alice": cache, "dir": d}
    finally:
        kdc.stop()


def kerberos_gateway(base: Path, realm: dict, *, service_principal: str | None, replay_cache: Path | None = None):
    lines = ["  allowed_networks: [127.0.0.0/8]", f"  keytab: {realm['keytab']}", "  realms: [EXAMPLE.TEST]"]
    if service_principal:
        lines.append(f"  service_principal: {service_principal}")
    if replay_cache:
        lines.append(f"  replay_cache: {replay_cache}")
    conf = write_conf(base / "conf.d", {
        "gateway.yaml": "chain: [kerberos]\nthrottle: {enabled: false}\n",
        "kerberos.yaml": "kerberos:\n" + "\n".join(lines) + "\n",
    })
    gateway = GatewayProcess(conf, base / "state", env=realm["kdc"].env)
    try:
        return gateway.start()
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; log:\n{gateway.output()}") from None


@pytest.fixture(scope="module", params=["service_principal", "any_key"])
def gateway(request, realm, tmp_path_factory):
    """With ``service_principal`` (a forged name is ``wrong_principal``) and without (any key in
    the keytab: a forged name is ``keytab_entry_missing``)."""
    named = request.param == "service_principal"
    gw = kerberos_gateway(tmp_path_factory.mktemp(request.param), realm, service_principal=SPN if named else None)
    yield gw, "kerberos.wrong_principal" if named else "kerberos.keytab_entry_missing"
    gw.stop()


# -- forging ------------------------------------------------------------------------------------------------


def integer(n: int) -> bytes:
    return der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True))


def forged(service: str, *, kvno: int = 1, etype: int = 18, shape: str = "bare", realm: str = "EXAMPLE.TEST") -> bytes:
    """An AP-REQ (RFC 4120 section 5.5.1) for *service* whose ticket and authenticator are random
    bytes. *shape*: ``bare`` (an RFC 4121 token), ``spnego`` (inside a NegTokenInit), ``mutual``
    (inside SPNEGO, with mutual-required: MIT then answers with a KRB-ERROR)."""
    components = service.split("/")
    sname = der(0x30, der(0xA0, integer(2)) + der(0xA1, der(0x30, b"".join(der(0x1B, c.encode()) for c in components))))
    enc = der(0x30, der(0xA0, integer(etype)) + der(0xA1, integer(kvno)) + der(0xA2, der(0x04, os.urandom(200))))
    ticket = der(0x61, der(0x30, der(0xA0, integer(5)) + der(0xA1, der(0x1B, realm.encode())) + der(0xA2, sname)
                           + der(0xA3, enc)))
    authenticator = der(0x30, der(0xA0, integer(etype)) + der(0xA2, der(0x04, os.urandom(100))))
    options = b"\x00\x20\x00\x00\x00" if shape == "mutual" else b"\x00" * 5  # APOptions bit 2: mutual-required
    ap_req = der(0x6E, der(0x30, der(0xA0, integer(5)) + der(0xA1, integer(14)) + der(0xA2, der(0x03, options))
                           + der(0xA3, ticket) + der(0xA4, authenticator)))
    token = der(0x60, KRB5_OID + b"\x01\x00" + ap_req)
    if shape == "bare":
        return token
    return der(0x60, SPNEGO_OID + der(0xA0, der(0x30, der(0xA0, der(0x30, KRB5_OID)) + der(0xA2, der(0x04, token)))))


def negotiate(gateway: GatewayProcess, token: bytes):
    return gateway.get("/auth", {"Authorization": "Negotiate " + base64.b64encode(token).decode()},
                       source_address=INSIDE)


def audit_of(gateway: GatewayProcess, response) -> dict:
    return gateway.audit_for(response.header("X-Request-Id"))


def log_lines(gateway: GatewayProcess, responses) -> list[str]:
    """The plugin's service log lines about these requests (they name the attempt)."""
    ids = {r.header("X-Request-Id") for r in responses}
    return [line for line in gateway.output().splitlines()
            if "authgw.plugin.kerberos" in line and any(f"(attempt {i})" in line for i in ids)]


def assert_ready(gateway: GatewayProcess) -> None:
    ready = gateway.get("/readyz")
    assert ready.status == 200, ready.body
    assert b'"name": "kerberos.keytab", "ready": true' in ready.body, ready.body


SHAPES = ["bare", "spnego", "mutual"]


# -- the client's server name is not the gateway's failure ------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_a_server_name_saying_replay_cache_is_refused_and_leaves_the_gateway_ready(gateway, shape):
    gateway, refused_as = gateway
    rcache = gateway.state_dir / "kerberos" / "replay.rcache2"
    names = ["HTTP/replay cache", "replay cache", f"HTTP/{rcache}", "HTTP/Replay Cache failure"]
    responses = []
    for name in names:
        response = negotiate(gateway, forged(name, shape=shape))
        responses.append(response)
        line = audit_of(gateway, response)
        assert (response.status, line["outcome"], line["reason"]) == \
            (401, "invalid_credentials", refused_as), name
        assert_ready(gateway)
    logged = log_lines(gateway, responses)
    assert len(logged) == len(names), logged
    assert not [line for line in logged if "replay_cache_unavailable" in line or REPLAY_CACHE_HINT in line], logged
    assert "kerberos.replay_cache_unavailable" not in gateway.output()


@pytest.mark.parametrize("shape", SHAPES)
def test_a_server_name_saying_request_is_a_replay_is_not_a_replay(gateway, shape):
    gateway, refused_as = gateway
    responses = [negotiate(gateway, forged(name, shape=shape))
                 for name in ("HTTP/request is a replay", "Request is a replay", "HTTP/clock skew too great")]
    for response in responses:
        line = audit_of(gateway, response)
        assert (response.status, line["reason"]) == (401, refused_as)
    logged = log_lines(gateway, responses)
    assert len(logged) == len(responses), logged
    assert not [line for line in logged if re.search(r"kerberos\.(replay|clock_skew) ", line)], logged


def test_forged_key_versions_and_names_warn_once_then_go_to_info(realm, tmp_path):
    """A stale keytab must still reach the operator, but a client writing kvno 7 or another
    service into its ticket header may not fill the log with warnings: one per reason (per
    worker and minute), every refusal still logged, at info."""
    gateway = kerberos_gateway(tmp_path, realm, service_principal=SPN)
    try:
        batches = {
            "wrong_kvno": [forged("HTTP/localhost", kvno=7, shape=shape) for shape in SHAPES * 2],
            "wrong_principal": [forged(f"HTTP/host{i}.example.test") for i in range(6)],
            "key_mismatch": [forged("HTTP/localhost", shape="bare") for _ in range(6)],
        }
        for reason, tokens in batches.items():
            responses = [negotiate(gateway, token) for token in tokens]
            assert {(r.status, audit_of(gateway, r)["reason"]) for r in responses} == {(401, f"kerberos.{reason}")}
            logged = log_lines(gateway, responses)
            assert len(logged) == len(tokens), logged
            levels = [line.split()[2] for line in logged]
            assert levels == ["WARNING"] + ["INFO"] * (len(tokens) - 1), logged
            assert all("check:" in line for line in logged)
        assert_ready(gateway)
    finally:
        gateway.stop()


# -- the gateway's own failures are still its own --------------------------------------------------------------


def test_a_replay_cache_that_cannot_be_written_is_still_unavailable(realm, tmp_path):
    """The acceptor checks its replay cache itself when no error code explains a failure (MIT's
    ``file2`` cache reports errno values, which reach the plugin as the KRB-ERROR's generic code
    and, through SPNEGO, as a stand-in minor status): a path under a file (ENOTDIR) is the
    gateway's problem, 503 and ``/readyz`` false, for SPNEGO and bare tokens alike; a good login
    once it is repaired makes it ready again."""
    cache_dir = tmp_path / "rcache"
    cache_dir.mkdir(mode=0o700)
    gateway = kerberos_gateway(tmp_path, realm, service_principal=SPN, replay_cache=cache_dir / "replay.rcache2")
    kdc = realm["kdc"]
    try:
        assert negotiate(gateway, kdc.mint(realm["alice"], [(SPN, 1)])[0][0]).status == 200
        shutil.rmtree(cache_dir)
        cache_dir.write_text("not a directory")
        spnego, = kdc.mint(realm["alice"], [(SPN, 1)])[0]
        bare, = kdc.mint(realm["alice"], [(SPN, 1)], mech="1.2.840.113554.1.2.2")[0]
        responses = [negotiate(gateway, spnego), negotiate(gateway, bare)]
        for response in responses:
            line = audit_of(gateway, response)
            assert (response.status, line["outcome"], line["reason"]) == \
                (503, "unavailable", "kerberos.replay_cache_unavailable"), gateway.output()[-3000:]
        ready = gateway.get("/readyz")
        assert ready.status == 503 and str(cache_dir).encode() in ready.body, ready.body
        logged = log_lines(gateway, responses)
        assert logged and all(" WARNING " in line and REPLAY_CACHE_HINT in line for line in logged), logged

        cache_dir.unlink()
        cache_dir.mkdir(mode=0o700)
        response = negotiate(gateway, kdc.mint(realm["alice"], [(SPN, 1)])[0][0])
        assert response.status == 200 and response.header("Remote-User") == "alice"
        assert_ready(gateway)
    finally:
        gateway.stop()
