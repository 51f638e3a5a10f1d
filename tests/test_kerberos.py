"""The kerberos plugin through a real ``authgw serve``, against a real MIT KDC (tests/support/kdc.py).

Two realms: EXAMPLE.TEST (the gateway's) and OTHER.TEST (no cross-realm trust). Two gateways,
started once for the module:

* ``main``: ``service_principal: HTTP/localhost@EXAMPLE.TEST``, trusted proxy 127.0.0.1,
  ``allowed_networks`` 10.0.0.0/8 and 127.0.0.3/32, ``static`` answering ``gateway_lookup_user``.
  Loopback addresses stand for clients: 127.0.0.3 is inside, 127.0.0.2 outside, 127.0.0.1 is the
  proxy (its own address, 127.0.0.1, is outside; the ``X-Forwarded-For`` it sends decides).
* ``anykey``: any key in its keytab (HTTP/rotate.test, HTTP/aes128.test with only an AES-128 key,
  HTTP/localhost@OTHER.TEST), realm allowlist EXAMPLE.TEST plus a rule for carol@OTHER.TEST, no
  directory. Its keytab is rotated by a test.

The cross-realm tests add trusts for their own duration, and a third KDC: OTHER.TEST's
administrator's fake EXAMPLE.TEST.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.der import der
from support.gateway import GatewayProcess, write_conf
from support.kdc import KDC, write_krb5_conf

INSIDE = ("127.0.0.3", 0)
OUTSIDE = ("127.0.0.2", 0)
PROXY = ("127.0.0.1", 0)
SPN = "HTTP/localhost@EXAMPLE.TEST"


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realms(tmp_path_factory):
    base = tmp_path_factory.mktemp("krb")
    example, other = KDC(base / "example", "EXAMPLE.TEST"), KDC(base / "other", "OTHER.TEST")
    try:
        example.start()
        other.start()
        yield example, other
    finally:
        example.stop()
        other.stop()


@pytest.fixture(scope="module")
def krb(realms, tmp_path_factory):
    """Principals, keytabs, client caches, and the environment every subprocess gets."""
    example, other = realms
    d = tmp_path_factory.mktemp("krbclient")
    conf = write_krb5_conf(d / "krb5.conf", [example, other])
    env = {**example.env, "KRB5_CONFIG": str(conf)}
    for user in ("alice", "bob"):
        example.add_principal(user, f"{user}-password")
    for user in ("carol", "dave"):
        other.add_principal(user, f"{user}-password")
    for service in ("HTTP/localhost", "HTTP/other.test", "HTTP/missing.test", "HTTP/rotate.test", "HTTP/aes128.test"):
        example.kadmin(f"addprinc -randkey {example.principal(service)}")
    other.kadmin("addprinc -randkey HTTP/localhost@OTHER.TEST")
    main_keytab = d / "main.keytab"
    example.export("HTTP/localhost", main_keytab)
    example.export("HTTP/other.test", main_keytab)
    any_keytab = d / "any.keytab"
    example.export("HTTP/rotate.test", any_keytab)
    other.export("HTTP/localhost@OTHER.TEST", any_keytab)
    full = example.export("HTTP/aes128.test", d / "aes128-full.keytab")
    _keep_only_enctype(full, any_keytab, "aes128-cts-hmac-sha1-96", env)
    caches = {}
    for user, kdc in (("alice", example), ("bob", example), ("carol", other), ("dave", other)):
        caches[user] = kdc.kinit(user, f"{user}-password", d / f"{user}.cc", env=env)
    return {"example": example, "other": other, "env": env, "dir": d, "caches": caches,
            "main_keytab": main_keytab, "any_keytab": any_keytab}


def _keep_only_enctype(source: Path, target: Path, enctype: str, env: dict[str, str]) -> None:
    """Append to *target* the entries of *source* with *enctype* (ktutil: read, delete, write)."""
    listing = subprocess.run(["klist", "-k", "-e", str(source)], capture_output=True, text=True, env={**os.environ, **env},
                             check=True, timeout=30).stdout.splitlines()[3:]
    doomed = [i + 1 for i, line in enumerate(listing) if f"({enctype})" not in line]
    script = f"rkt {source}\n" + "".join(f"delent {n}\n" for n in reversed(doomed)) + f"wkt {target}\nq\n"
    subprocess.run(["ktutil"], input=script, capture_output=True, text=True, env={**os.environ, **env},
                   check=True, timeout=30)


def _start(conf_dir: Path, state: Path, env: dict[str, str]) -> GatewayProcess:
    gateway = GatewayProcess(conf_dir, state, env=env)
    try:
        return gateway.start()
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; log:\n{gateway.output()}") from None


@pytest.fixture(scope="module")
def main(krb, tmp_path_factory, demo_hash):
    d = tmp_path_factory.mktemp("main")
    conf = write_conf(d / "conf.d", {
        "gateway.yaml": """
            chain: [kerberos, static]
            trusted_proxies: [127.0.0.1/32]
            throttle: {enabled: false}
            """,
        "kerberos.yaml": f"""
            kerberos:
              allowed_networks: [10.0.0.0/8, 127.0.0.3/32, "fd00::/8"]
              keytab: {krb["main_keytab"]}
              service_principal: {SPN}
              realms: [EXAMPLE.TEST]
            """,
        "static.yaml": "static: {users_file: ../users.yaml}\n",
    })
    write_conf(d, {"users.yaml": f"""
            users:
              alice:
                password_hash: "{demo_hash}"
                display_name: Alice Liddell
                email: alice@example.test
                groups: [staff, sso-users]
            """})
    gateway = _start(conf, d / "state", krb["env"])
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def anykey(krb, tmp_path_factory):
    d = tmp_path_factory.mktemp("anykey")
    conf = write_conf(d / "conf.d", {
        "gateway.yaml": "chain: [kerberos]\nthrottle: {enabled: false}\n",
        "kerberos.yaml": f"""
            kerberos:
              allowed_networks: [127.0.0.0/8]
              keytab: {krb["any_keytab"]}
              realms: [EXAMPLE.TEST]
              rules:
                - {{match: '(carol)@OTHER\\.TEST', username: '\\1.other'}}
            """,
    })
    gateway = _start(conf, d / "state", krb["env"])
    yield gateway
    gateway.stop()


# -- helpers ----------------------------------------------------------------------------------------


def mint(krb, user: str, service: str = SPN, count: int = 1, cache: Path | None = None) -> list[bytes]:
    kdc = krb["other"] if service.endswith("@OTHER.TEST") else krb["example"]
    return kdc.mint(cache or krb["caches"][user], [(service, count)], env=krb["env"])[0]


def negotiate(gateway: GatewayProcess, token: bytes, source=INSIDE, headers: dict | None = None):
    return gateway.get("/auth", {"Authorization": "Negotiate " + base64.b64encode(token).decode(), **(headers or {})},
                       source_address=source)


def audit_of(gateway: GatewayProcess, response) -> dict:
    """The audit line of *response* (or of a request id)."""
    request_id = response if isinstance(response, str) else response.header("X-Request-Id")
    found = [line for line in gateway.audit() if line["request_id"] == request_id]
    assert len(found) == 1, f"no audit line for {request_id}"
    return found[0]


def assert_refused(gateway: GatewayProcess, response, reason: str) -> dict:
    assert response.status == 401, response.body
    line = audit_of(gateway, response)
    assert (line["outcome"], line["reason"], line["step"]) == ("invalid_credentials", f"kerberos.{reason}", "kerberos")
    assert response.header("Remote-User") is None
    return line


NTLM_OID = bytes.fromhex("060a2b06010401823702020a")  # 1.3.6.1.4.1.311.2.2.10
SPNEGO_OID = bytes.fromhex("06062b0601050502")  # 1.3.6.1.5.5.2
NTLM_NEGOTIATE = b"NTLMSSP\x00\x01\x00\x00\x00" + struct.pack("<I", 0xE2088297) + bytes(16)


def spnego_offering_only_ntlm() -> bytes:
    """RFC 4178 NegTokenInit: mechTypes [NTLM], mechToken = an NTLM NEGOTIATE_MESSAGE."""
    init = der(0xA0, der(0x30, der(0xA0, der(0x30, NTLM_OID)) + der(0xA2, der(0x04, NTLM_NEGOTIATE))))
    return der(0x60, SPNEGO_OID + init)


# A python-gssapi client in its own process (libkrb5 reads KRB5_CONFIG per process): it makes a
# token, sends it from 127.0.0.3, and completes mutual authentication with the 200's answer.
CLIENT = textwrap.dedent("""
    import base64, http.client, json, sys
    import gssapi
    url_port, ccache, spn = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    creds = gssapi.Credentials(usage="initiate", store={"ccache": ccache})
    ctx = gssapi.SecurityContext(name=gssapi.Name(spn, gssapi.NameType.kerberos_principal), creds=creds,
                                 usage="initiate", flags=gssapi.RequirementFlag.mutual_authentication)
    token = ctx.step()
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=15, source_address=("127.0.0.3", 0))
    conn.request("GET", "/auth", headers={"Authorization": "Negotiate " + base64.b64encode(token).decode()})
    resp = conn.getresponse()
    headers = {k: v for k, v in resp.getheaders()}
    answer = headers.get("WWW-Authenticate", "")
    mutual = False
    if resp.status == 200 and answer.startswith("Negotiate "):
        ctx.step(base64.b64decode(answer.split(" ", 1)[1]))
        mutual = ctx.complete
    json.dump({"status": resp.status, "headers": headers, "mutual": mutual}, sys.stdout)
""")


# -- logging in --------------------------------------------------------------------------------------


def test_python_gssapi_client_logs_in_with_groups_and_mutual_auth(krb, main):
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(main.port), f"FILE:{krb['caches']['alice']}", SPN],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **krb["env"]})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == 200
    assert result["headers"]["Remote-User"] == "alice"
    assert result["headers"]["Remote-Groups"] == "staff,sso-users"
    assert result["headers"]["Remote-Name"] == "Alice Liddell"
    assert result["mutual"] is True, "the client could not verify the gateway's AP-REP"
    line = audit_of(main, result["headers"]["X-Request-Id"])
    assert (line["outcome"], line["step"], line["method"]) == ("success", "kerberos", "negotiate")
    assert line["subject"] == "static:alice"


def test_curl_negotiate_after_kinit_logs_in(krb, main):
    ccache = krb["dir"] / "alice-curl.cc"
    krb["example"].kinit("alice", "alice-password", ccache, env=krb["env"])
    proc = subprocess.run(
        ["curl", "-s", "-i", "--negotiate", "-u", ":", "--interface", "127.0.0.3",
         "--resolve", f"localhost:{main.port}:127.0.0.1", f"http://localhost:{main.port}/auth"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, **krb["env"], "KRB5CCNAME": f"FILE:{ccache}"})
    assert proc.returncode == 0, proc.stderr
    final = [block for block in proc.stdout.split("\n\n") if block.startswith("HTTP/")][-1]  # text mode: \n
    assert final.startswith("HTTP/1.1 200"), proc.stdout
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in final.splitlines()[1:] if ": " in line)}
    assert headers.get("remote-user") == "alice", proc.stdout
    assert headers["remote-groups"] == "staff,sso-users"
    assert headers["www-authenticate"].startswith("Negotiate ")


KRB5_OID = bytes.fromhex("06092a864886f712010202")  # 1.2.840.113554.1.2.2
MS_KRB5_OID = bytes.fromhex("06092a864882f712010202")  # 1.2.840.48018.1.2.2, as Windows sends it first


def test_windows_style_spnego_and_bare_kerberos_tokens_log_in(krb, main):
    """Windows lists [MS-KRB5, KRB5, NTLM] with a Kerberos optimistic token; some Java clients send
    a bare RFC 4121 token without SPNEGO. Both are Kerberos, so both log in."""
    windows, bare = krb["example"].mint(krb["caches"]["alice"], [(SPN, 2)], mech="1.2.840.113554.1.2.2",
                                        env=krb["env"])[0]
    mechs = der(0x30, MS_KRB5_OID + KRB5_OID + NTLM_OID)
    wrapped = der(0x60, SPNEGO_OID + der(0xA0, der(0x30, der(0xA0, mechs) + der(0xA2, der(0x04, windows)))))
    for token in (wrapped, bare):
        response = negotiate(main, token)
        assert response.status == 200 and response.header("Remote-User") == "alice"
        assert response.header("WWW-Authenticate").startswith("Negotiate ")


def test_a_token_under_microsofts_kerberos_oid_is_kerberos_not_a_keytab_outage(krb, main):
    """The acceptor's credentials were for MIT's default mechanisms, without Microsoft's Kerberos
    OID, which the token check lets through: a token under that OID, 22 bytes and no ticket, was
    a 503 blaming the keytab, /readyz false, a warning per request; a real ticket under it never
    logged in (review of the Kerberos plugin)."""
    crafted = der(0x60, MS_KRB5_OID + b"\x01\x00" + der(0x6E, der(0x30, b"")))  # an AP-REQ with nothing in it
    for token in (crafted, der(0x60, SPNEGO_OID + der(0xA0, der(0x30, der(0xA0, der(0x30, MS_KRB5_OID))
                                                              + der(0xA2, der(0x04, crafted)))))):
        response = negotiate(main, token)
        assert response.status == 401 and response.header("Retry-After") is None, response.body
        assert audit_of(main, response)["outcome"] == "invalid_credentials"
        assert main.get("/readyz").status == 200
    (bare,) = krb["example"].mint(krb["caches"]["alice"], [(SPN, 1)], mech="1.2.840.113554.1.2.2",
                                  env=krb["env"])[0]
    assert KRB5_OID in bare[:16]
    relabelled = bare.replace(KRB5_OID, MS_KRB5_OID, 1)
    response = negotiate(main, relabelled)
    assert response.status == 200 and response.header("Remote-User") == "alice"
    assert "keytab" not in "".join(line for line in main.output().splitlines() if "WARNING" in line)


def test_a_user_the_directory_does_not_know_is_not_logged_in(krb, main):
    response = negotiate(main, mint(krb, "bob")[0])
    assert response.status == 401
    line = audit_of(main, response)
    assert (line["outcome"], line["reason"], line["step"]) == ("user_not_found", "kerberos.user_not_found", "kerberos")


# -- who is offered Negotiate ----------------------------------------------------------------------------


def test_inside_the_allowed_networks_negotiate_is_offered(main):
    response = main.get("/auth", source_address=INSIDE)
    assert response.status == 401
    assert "Negotiate" in response.all("WWW-Authenticate")


def test_outside_no_challenge_and_the_token_is_ignored(krb, main):
    bare = main.get("/auth", source_address=OUTSIDE)
    assert bare.status == 401
    assert not [c for c in bare.all("WWW-Authenticate") if c.startswith("Negotiate")]
    assert bare.all("WWW-Authenticate"), "the other steps' challenges are still offered"
    token = mint(krb, "alice")[0]
    response = negotiate(main, token, source=OUTSIDE)
    assert response.status == 401
    assert not [c for c in response.all("WWW-Authenticate") if c.startswith("Negotiate")]
    line = audit_of(main, response)
    assert (line["outcome"], line["reason"], line["client"]) == ("not_applicable", "no_applicable_credentials", "127.0.0.2")
    # The very same token was not spent: from inside, it still logs in.
    assert negotiate(main, token, source=INSIDE).status == 200


def test_a_trusted_proxys_forwarded_client_inside_the_range_logs_in(krb, main):
    inside, outside, spoofed = mint(krb, "alice", count=3)
    response = negotiate(main, inside, source=PROXY, headers={"X-Forwarded-For": "192.0.2.9, 10.20.30.40"})
    assert response.status == 200
    assert response.header("Remote-User") == "alice"
    assert audit_of(main, response)["client"] == "10.20.30.40"
    # forwarded from outside the range: ignored, no offer
    response = negotiate(main, outside, source=PROXY, headers={"X-Forwarded-For": "192.0.2.9"})
    assert response.status == 401 and "Negotiate" not in response.all("WWW-Authenticate")
    assert audit_of(main, response)["reason"] == "no_applicable_credentials"
    # the same header from a peer that is not a trusted proxy moves nothing
    response = negotiate(main, spoofed, source=OUTSIDE, headers={"X-Forwarded-For": "10.20.30.40"})
    assert response.status == 401 and "Negotiate" not in response.all("WWW-Authenticate")
    assert audit_of(main, response)["client"] == "127.0.0.2"


# -- refused tokens --------------------------------------------------------------------------------------


def test_a_replayed_token_is_refused(krb, main):
    token = mint(krb, "alice")[0]
    assert negotiate(main, token).status == 200
    assert_refused(main, negotiate(main, token), "replay")
    assert_refused(main, negotiate(main, token, source=PROXY, headers={"X-Forwarded-For": "10.0.0.8"}), "replay")


def test_a_token_for_another_service_is_refused(krb, main):
    token = mint(krb, "alice", "HTTP/other.test@EXAMPLE.TEST")[0]  # in the keytab, but not ours
    assert_refused(main, negotiate(main, token), "wrong_principal")
    assert "HTTP/other.test@EXAMPLE.TEST" in main.output() and "check:" in main.output()


@pytest.mark.parametrize("token, reason", [
    (b"\x01\x02garbage that is no token", "malformed_token"),
    (b"\x60\x80\x06\x06\x2b\x06\x01\x05\x05\x02", "malformed_token"),  # indefinite length: not DER
    (NTLM_NEGOTIATE, "ntlm_not_supported"),
    (spnego_offering_only_ntlm(), "ntlm_not_supported"),
], ids=["garbage", "indefinite-length", "ntlmssp", "spnego-ntlm-only"])
def test_garbage_and_ntlm_are_refused(main, token, reason):
    assert_refused(main, negotiate(main, token), reason)


def test_a_truncated_kerberos_token_is_malformed(krb, main):
    token = mint(krb, "alice")[0]
    assert_refused(main, negotiate(main, token[: len(token) // 2]), "malformed_token")


def test_a_token_from_another_realm_without_trust_is_refused(krb, main):
    token = mint(krb, "carol", "HTTP/localhost@OTHER.TEST")[0]
    assert_refused(main, negotiate(main, token), "wrong_principal")


def test_a_client_with_a_skewed_clock_is_refused(krb, main):
    """MIT clients apply the time offset stored in their ccache header (tag 1, DeltaTime)."""
    cache = krb["dir"] / "skewed.cc"
    shutil.copy(krb["caches"]["alice"], cache)
    mint(krb, "alice", cache=cache)  # fetch the service ticket while the clock is right
    data = bytearray(cache.read_bytes())
    assert data[:2] == b"\x05\x04" and data[4:8] == b"\x00\x01\x00\x08", "expected a v4 ccache with DeltaTime"
    data[8:12] = struct.pack(">i", 900)  # 15 minutes ahead; the default clockskew is 5
    cache.write_bytes(bytes(data))
    assert_refused(main, negotiate(main, mint(krb, "alice", cache=cache)[0]), "clock_skew")
    assert "kerberos.clock_skew" in main.output() and "NTP" in main.output()


# -- any key in the keytab: key versions, enctypes, realms ------------------------------------------------


def test_a_ticket_for_a_principal_missing_from_the_keytab_is_refused(krb, anykey):
    assert_refused(anykey, negotiate(anykey, mint(krb, "alice", "HTTP/missing.test@EXAMPLE.TEST")[0]),
                   "keytab_entry_missing")


def test_a_ticket_in_an_enctype_the_keytab_lacks_is_refused(krb, anykey):
    assert_refused(anykey, negotiate(anykey, mint(krb, "alice", "HTTP/aes128.test@EXAMPLE.TEST")[0]),
                   "unsupported_enctype")
    assert "aes256-cts-hmac-sha1-96" in anykey.output()


def test_realm_allowlist_and_mapping_rules(krb, anykey):
    carol = negotiate(anykey, mint(krb, "carol", "HTTP/localhost@OTHER.TEST")[0])
    assert carol.status == 200 and carol.header("Remote-User") == "carol.other"
    assert_refused(anykey, negotiate(anykey, mint(krb, "dave", "HTTP/localhost@OTHER.TEST")[0]), "realm_not_allowed")


@pytest.fixture
def forged(krb, tmp_path):
    """What OTHER.TEST's administrator can do alone: create ``krbtgt/OTHER.TEST@EXAMPLE.TEST`` (a
    trust "from" EXAMPLE.TEST that EXAMPLE.TEST never made) and run a fake EXAMPLE.TEST KDC holding
    the same key and an ``alice``. The real OTHER.TEST KDC then issues a ticket for
    HTTP/localhost@OTHER.TEST whose client is alice@EXAMPLE.TEST. Two such tokens."""
    other, trust = krb["other"], "krbtgt/OTHER.TEST@EXAMPLE.TEST"
    fake = KDC(tmp_path / "fake", "EXAMPLE.TEST").start()
    try:
        for kdc in (other, fake):
            kdc.kadmin(f"addprinc -pw chosen-by-the-attacker {trust}")
        fake.add_principal("alice", "chosen-by-the-attacker")
        env = {**fake.env, "KRB5_CONFIG": str(write_krb5_conf(tmp_path / "attacker.conf", [fake, other]))}
        cache = fake.kinit("alice", "chosen-by-the-attacker", tmp_path / "alice.cc", env=env)
        yield fake.mint(cache, [("HTTP/localhost@OTHER.TEST", 2)], env=env)[0]
    finally:
        fake.stop()
        other.kadmin(f"delprinc -force {trust}")


def test_a_realm_whose_key_is_in_the_keytab_cannot_name_another_realms_users(krb, anykey, forged):
    """The ticket is genuine OTHER.TEST work, opened by OTHER.TEST's key; only its client is
    EXAMPLE.TEST's, and EXAMPLE.TEST is in ``realms``. Without ``service_principal`` a key of a
    realm not in ``realms`` carries only that realm's principals."""
    plain, relabelled = forged
    assert_refused(anykey, negotiate(anykey, plain), "cross_realm_not_allowed")
    assert "kerberos.cross_realm_not_allowed" in anykey.output()
    assert "alice@EXAMPLE.TEST was named by the KDC of OTHER.TEST" in anykey.output()
    # The ticket header's realm is the client's text, and MIT tries every key anyway: the realm
    # that counts is that of the key that opened the ticket.
    start = relabelled.index(b"OTHER.TEST")
    relabelled = relabelled[:start] + b"OTHER.TESX" + relabelled[start + len(b"OTHER.TESX"):]
    assert_refused(anykey, negotiate(anykey, relabelled), "cross_realm_not_allowed")


def test_a_listed_realms_cross_realm_trust_still_names_another_realms_users(krb, anykey, tmp_path):
    """The forest case of docs/plugins/kerberos.md: EXAMPLE.TEST (in ``realms``) trusts OTHER.TEST,
    so carol@OTHER.TEST gets a ticket for EXAMPLE.TEST's service; a rule maps her."""
    example, other, trust = krb["example"], krb["other"], "krbtgt/EXAMPLE.TEST@OTHER.TEST"
    for kdc in (example, other):
        kdc.kadmin(f"addprinc -pw shared-by-both-realms {trust}")
    try:
        cache = other.kinit("carol", "carol-password", tmp_path / "carol.cc", env=krb["env"])
        response = negotiate(anykey, mint(krb, "carol", "HTTP/rotate.test@EXAMPLE.TEST", cache=cache)[0])
        assert response.status == 200 and response.header("Remote-User") == "carol.other"
    finally:
        for kdc in (example, other):
            kdc.kadmin(f"delprinc -force {trust}")


def test_a_keytab_rotated_while_running_is_picked_up(krb, anykey):
    example, service = krb["example"], "HTTP/rotate.test@EXAMPLE.TEST"
    assert negotiate(anykey, mint(krb, "alice", service)[0]).status == 200
    old_token = mint(krb, "alice", service)[0]
    old_kvno = example.kvno(service)

    staged = krb["dir"] / "rotated.keytab"
    new_kvno = example.rotate_key(service, staged)  # the KDC now issues the new key version
    assert new_kvno == old_kvno + 1
    fresh_cache = example.kinit("alice", "alice-password", krb["dir"] / "alice-rotation.cc", env=krb["env"])
    new_token, newer_token = mint(krb, "alice", service, count=2, cache=fresh_cache)
    assert_refused(anykey, negotiate(anykey, new_token), "wrong_kvno")

    # deploy: the other principals' keys plus the new one, swapped in atomically
    deployed = krb["dir"] / "any-next.keytab"
    shutil.copy(krb["any_keytab"], deployed)
    _append_keytab(staged, deployed, krb["env"])
    os.replace(deployed, krb["any_keytab"])
    response = negotiate(anykey, newer_token)
    assert response.status == 200 and response.header("Remote-User") == "alice"
    # the old key is gone from the keytab now: a ticket made before the rotation is refused
    assert_refused(anykey, negotiate(anykey, old_token), "wrong_kvno")


def test_negotiate_logins_are_decided_on_the_event_loop_without_a_chain_thread(krb, tmp_path):
    """chain: [kerberos] with no blocking lookup: the chain runs on the loop (gateway/aio.py).
    The pool starts its threads with its first work, so a login that went through it would
    add them (issue 15); the replay cache holds on the loop as on a thread."""
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": "chain: [kerberos]\nthreads: 4\nthrottle: {enabled: false}\n",
        "kerberos.yaml": f"""
            kerberos:
              allowed_networks: [127.0.0.0/8]
              keytab: {krb["main_keytab"]}
              service_principal: {SPN}
              realms: [EXAMPLE.TEST]
            """,
    })
    gateway = _start(conf, tmp_path / "state", krb["env"])
    try:
        def threads() -> int:
            status = Path(f"/proc/{gateway.proc.pid}/status").read_text()
            return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))

        before = threads()
        token, other = mint(krb, "alice", count=2)
        response = negotiate(gateway, token)
        assert response.status == 200 and response.header("Remote-User") == "alice"
        assert_refused(gateway, negotiate(gateway, token), "replay")
        assert negotiate(gateway, other).status == 200
        assert threads() == before
    finally:
        gateway.stop()


def _append_keytab(source: Path, target: Path, env: dict[str, str]) -> None:
    listing = subprocess.run(["klist", "-k", str(target)], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}, timeout=30).stdout.splitlines()[3:]
    rotating = [i + 1 for i, line in enumerate(listing) if "HTTP/rotate.test@" in line]
    script = f"rkt {target}\n" + "".join(f"delent {n}\n" for n in reversed(rotating)) + \
             f"rkt {source}\nwkt {target}.new\nq\n"
    subprocess.run(["ktutil"], input=script, capture_output=True, text=True, check=True,
                   env={**os.environ, **env}, timeout=30)
    os.replace(f"{target}.new", target)
    os.chmod(target, 0o600)
