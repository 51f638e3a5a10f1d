"""Issue 9 item 5: refusals that are not guesses lock nobody out. A storm of replayed Kerberos
tickets and malformed tokens from one address (a browser retrying, a proxy not in
`trusted_proxies`) leaves every user behind that address able to log in, by password and by
Kerberos. Real MIT KDC (tests/support/kdc.py) and a real ``authgw serve``."""

from __future__ import annotations

import base64

import pytest

from support.gateway import write_conf
from support.kdc import KDC

SPN = "HTTP/localhost"


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    d = tmp_path_factory.mktemp("krb")
    kdc = KDC(d / "kdc", "EXAMPLE.TEST").start()
    try:
        for user in ("alice", "bob"):
            kdc.add_principal(user, f"{user}-password")
        keytab = kdc.add_service(SPN, d / "http.keytab")
        caches = {user: kdc.kinit(user, f"{user}-password", d / f"{user}.cc") for user in ("alice", "bob")}
        yield kdc, keytab, caches
    finally:
        kdc.stop()


def negotiate(token: bytes) -> dict[str, str]:
    return {"Authorization": "Negotiate " + base64.b64encode(token).decode()}


def test_a_replay_storm_locks_nobody_else_out(realm, conf_dir, demo_hash, start_gateway):
    kdc, keytab, caches = realm
    conf = write_conf(conf_dir, {
        "gateway.yaml": "chain: [kerberos, static]\nthrottle: {client_failures: 5, window: 600}\n",
        "kerberos.yaml": f"kerberos:\n  allowed_networks: [127.0.0.0/8]\n  keytab: {keytab}\n"
                         f"  service_principal: {SPN}@EXAMPLE.TEST\n  realms: [EXAMPLE.TEST]\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "users/users.yaml": "users:\n" + "".join(f'  {u}:\n    password_hash: "{demo_hash}"\n'
                                                  for u in ("alice", "bob", "carol")),
    })
    gw = start_gateway(conf, env=kdc.env)
    token, fresh = kdc.mint(caches["alice"], [(SPN, 1)])[0][0], kdc.mint(caches["bob"], [(SPN, 1)])[0][0]
    assert gw.get("/auth", negotiate(token)).status == 200
    storm = [gw.get("/auth", negotiate(token)).status for _ in range(40)]  # the browser retrying
    storm += [gw.get("/auth", {"Authorization": "Negotiate %%%"}).status for _ in range(20)]
    storm += [gw.get("/auth", negotiate(b"\x60\x03garbage")).status for _ in range(20)]
    assert set(storm) == {401}, storm
    reasons = {a["reason"] for a in gw.audit()[-80:]}
    assert "kerberos.replay" in reasons and "throttled" not in reasons, reasons
    # Everyone else behind the same address still gets in, by password and by Kerberos.
    assert gw.auth("carol", "demo-password").status == 200
    r = gw.get("/auth", negotiate(fresh))
    assert (r.status, r.header("Remote-User")) == (200, "bob")
    # Password guesses from the address still count: five wrong passwords and it is refused.
    guesses = [gw.auth(f"user{i}", "wrong").status for i in range(6)]
    assert guesses == [401] * 5 + [429], guesses
