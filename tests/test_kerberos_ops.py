"""Operating the kerberos plugin: self-tests (``authgw check``) against a real KDC, a keytab that
disappears while serving, the replay cache shared by workers, and directory groups from slapd."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from support.gateway import authgw, write_conf
from support.kdc import KDC, write_krb5_conf
from support.net import free_port, wait_for

SPN = "HTTP/localhost@EXAMPLE.TEST"


@pytest.fixture(scope="module")
def kdc(tmp_path_factory):
    realm = KDC(tmp_path_factory.mktemp("krbops"), "EXAMPLE.TEST")
    realm.start()
    try:
        realm.add_principal("alice", "alice-password")
        realm.add_service("HTTP/localhost", realm.dir / "http.keytab")
        realm.kadmin("addprinc -randkey HTTP/stale.test@EXAMPLE.TEST")
        realm.kinit("alice", "alice-password", realm.dir / "alice.cc")
        yield realm
    finally:
        realm.stop()


def kerberos_conf(conf_dir: Path, keytab: Path, *, chain: str = "[kerberos]", spn: str = SPN, extra: str = "",
                  files: dict[str, str] | None = None) -> Path:
    return write_conf(conf_dir, {
        "gateway.yaml": f"chain: {chain}\nthrottle: {{enabled: false}}\n",
        "kerberos.yaml": f"""
            kerberos:
              allowed_networks: [127.0.0.0/8]
              keytab: {keytab}
              service_principal: {spn}
              realms: [EXAMPLE.TEST]
            {extra}""",
        **(files or {}),
    })


def check(conf: Path, state: Path, env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Run ``authgw check``; return its exit code and ``{test name: status}``."""
    result = authgw("check", "--config", str(conf), "--state-dir", str(state), env=env)
    statuses = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "WARN", "FAIL", "SKIP") and rest.strip().startswith("kerberos."):
            statuses[rest.strip().split(":")[0]] = status
    return result.returncode, statuses | {"_output": result.stdout + result.stderr}


def negotiate_header(kdc: KDC, service: str = SPN) -> dict[str, str]:
    token = kdc.mint(kdc.dir / "alice.cc", [(service, 1)])[0][0]
    return {"Authorization": "Negotiate " + base64.b64encode(token).decode()}


# -- self-tests ------------------------------------------------------------------------------------------


def test_selftests_pass_against_a_healthy_realm(kdc, tmp_path):
    code, found = check(kerberos_conf(tmp_path / "conf.d", kdc.dir / "http.keytab"), tmp_path / "state", kdc.env)
    names = ["kerberos.keytab", "kerberos.keytab_keys", "kerberos.service_principal", "kerberos.kdc_kvno",
             "kerberos.clock_skew"]
    assert [found.get(n) for n in names] == ["PASS"] * 5, found["_output"]
    assert code == 0
    assert "KDC issues kvno 1 (aes256-cts-hmac-sha1-96)" in found["_output"]
    assert "a fresh ticket was accepted" in found["_output"]


def test_selftests_find_a_stale_keytab_a_missing_spn_and_loose_permissions(kdc, tmp_path):
    stale = kdc.export("HTTP/stale.test", tmp_path / "stale.keytab")  # kvno 1
    kdc.rotate_key("HTTP/stale.test", tmp_path / "discarded.keytab")  # the KDC moves to kvno 2
    conf = kerberos_conf(tmp_path / "stale.d", stale, spn="HTTP/stale.test@EXAMPLE.TEST")
    code, found = check(conf, tmp_path / "state", kdc.env)
    assert code != 0
    assert found["kerberos.keytab"] == "PASS" and found["kerberos.kdc_kvno"] == "FAIL", found["_output"]
    assert "refused the keytab's key" in found["_output"] and "re-export" in found["_output"]
    # with a user's ticket (as `kinit alice; kvno SPN`) the KDC's kvno is compared with the keytab's
    code, found = check(conf, tmp_path / "state", {**kdc.env, "KRB5CCNAME": f"FILE:{kdc.dir / 'alice.cc'}"})
    assert code != 0 and found["kerberos.kdc_kvno"] == "FAIL", found["_output"]
    assert "KDC issues kvno 2" in found["_output"] and "kerberos.wrong_kvno" in found["_output"]

    conf = kerberos_conf(tmp_path / "nospn.d", kdc.dir / "http.keytab", spn="HTTP/nothere@EXAMPLE.TEST")
    code, found = check(conf, tmp_path / "state", kdc.env)
    assert code != 0 and found["kerberos.service_principal"] == "FAIL", found["_output"]
    assert found["kerberos.kdc_kvno"] == "SKIP"

    loose = Path(shutil.copy(kdc.dir / "http.keytab", tmp_path / "loose.keytab"))
    loose.chmod(0o644)
    code, found = check(kerberos_conf(tmp_path / "loose.d", loose), tmp_path / "state", kdc.env)
    assert code != 0 and found["kerberos.keytab"] == "FAIL", found["_output"]
    assert "chmod 600" in found["_output"]
    assert found["kerberos.kdc_kvno"] == "SKIP"


def test_selftests_warn_when_the_kdc_cannot_be_reached(kdc, tmp_path):
    unreachable = KDC.__new__(KDC)
    unreachable.realm, unreachable.port = "EXAMPLE.TEST", free_port()  # nothing listens there
    conf_file = write_krb5_conf(tmp_path / "krb5.conf", [unreachable])
    code, found = check(kerberos_conf(tmp_path / "conf.d", kdc.dir / "http.keytab"), tmp_path / "state",
                        {**kdc.env, "KRB5_CONFIG": str(conf_file)})
    assert found["kerberos.keytab"] == "PASS" and found["kerberos.kdc_kvno"] == "WARN", found["_output"]
    assert found["kerberos.clock_skew"] == "WARN"
    assert code == 0


# -- running --------------------------------------------------------------------------------------------------


def test_a_keytab_that_disappears_makes_kerberos_unavailable_not_a_500(kdc, tmp_path, start_gateway):
    keytab = Path(shutil.copy(kdc.dir / "http.keytab", tmp_path / "http.keytab"))
    keytab.chmod(0o600)
    conf = kerberos_conf(tmp_path / "conf.d", keytab)
    with open(conf / "gateway.yaml", "a") as core:  # the keytab is re-checked every second
        core.write("health: {probe_interval: 1}\n")
    gateway = start_gateway(conf, env=kdc.env)
    assert gateway.get("/auth", negotiate_header(kdc)).status == 200
    assert (tmp_path / "state0" / "kerberos" / "replay.rcache2").stat().st_mode & 0o077 == 0

    keytab.rename(tmp_path / "moved.keytab")
    response = gateway.get("/auth", negotiate_header(kdc))
    assert response.status == 503
    line = [a for a in gateway.audit() if a["request_id"] == response.header("X-Request-Id")][0]
    assert (line["outcome"], line["reason"]) == ("unavailable", "kerberos.keytab_unavailable")
    assert gateway.get("/readyz").status == 503

    (tmp_path / "moved.keytab").rename(keytab)
    # recovers by itself (the health probe), before any login
    wait_for(lambda: gateway.get("/readyz").status == 200, 30, what="/readyz to recover")
    assert gateway.get("/auth", negotiate_header(kdc)).status == 200


def test_the_replay_cache_is_shared_by_every_acceptor_using_it(kdc, tmp_path, monkeypatch):
    """Two acceptors on one ``file2`` cache stand for two workers: a token spent on one is a
    replay on the other. (In-process: libkrb5 reads KRB5_CONFIG per context, set just for this.)"""
    from gateway.plugins.kerberos.acceptor import AcceptFailed, Acceptor
    from gateway.plugins.kerberos.tokens import inspect_token

    monkeypatch.setenv("KRB5_CONFIG", str(kdc.krb5_conf))
    first, second = (Acceptor(kdc.dir / "http.keytab", tmp_path / "shared.rcache2", SPN) for _ in range(2))
    alone = Acceptor(kdc.dir / "http.keytab", tmp_path / "other.rcache2", SPN)
    token = kdc.mint(kdc.dir / "alice.cc", [(SPN, 1)])[0][0]
    accepted = first.accept(token, inspect_token(token))
    assert (accepted.principal, accepted.service) == ("alice@EXAMPLE.TEST", SPN)
    with pytest.raises(AcceptFailed) as refused:
        second.accept(token, inspect_token(token))
    assert refused.value.reason == "replay"
    # a separate cache is a separate replay domain: this is why all workers must share one
    assert alone.accept(token, inspect_token(token)).principal == "alice@EXAMPLE.TEST"
    # a cache that cannot be written is the gateway's problem (503), not the client's
    broken = Acceptor(kdc.dir / "http.keytab", tmp_path / "no-such-dir" / "x.rcache2", SPN)
    fresh = kdc.mint(kdc.dir / "alice.cc", [(SPN, 1)])[0][0]
    with pytest.raises(AcceptFailed) as refused:
        broken.accept(fresh, inspect_token(fresh))
    assert (refused.value.reason, refused.value.unavailable) == ("replay_cache_unavailable", True)


# -- groups from the directory ------------------------------------------------------------------------------


def test_groups_come_from_slapd_when_ldap_is_enabled_too(kdc, tmp_path, start_gateway):
    from support.slapd import Slapd

    slapd = Slapd(tmp_path / "ldap", base_dn="dc=example,dc=test").start()
    try:
        slapd.add_user("alice", "unused-password", cn="Alice Liddell", mail="alice@example.test",
                       groups=["staff", "sso-users"])
        conf = kerberos_conf(tmp_path / "conf.d", kdc.dir / "http.keytab", chain="[kerberos, ldap]", files={
            "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings(mode="plain")) + "\n"})
        gateway = start_gateway(conf, env=kdc.env)
        response = gateway.get("/auth", negotiate_header(kdc))
        assert response.status == 200, gateway.output()[-2000:]
        assert response.header("Remote-User") == "alice"
        assert sorted(response.header("Remote-Groups").split(",")) == ["sso-users", "staff"]
        assert response.header("Remote-Name") == "Alice Liddell"
        assert response.header("Remote-Email") == "alice@example.test"
        line = [a for a in gateway.audit() if a["request_id"] == response.header("X-Request-Id")][0]
        assert line["step"] == "kerberos" and line["subject"] and not line["subject"].startswith("kerberos:")
        # a principal the directory does not know is refused (require_directory_user defaults to true)
        kdc.add_principal("mallory", "mallory-password")
        kdc.kinit("mallory", "mallory-password", tmp_path / "mallory.cc")
        token = kdc.mint(tmp_path / "mallory.cc", [(SPN, 1)])[0][0]
        response = gateway.get("/auth", {"Authorization": "Negotiate " + base64.b64encode(token).decode()})
        assert response.status == 401
        line = [a for a in gateway.audit() if a["request_id"] == response.header("X-Request-Id")][0]
        assert (line["outcome"], line["reason"]) == ("user_not_found", "kerberos.user_not_found")
        # the directory down: the ticket is good, but who the user is cannot be told (503)
        slapd.stop()
        response = gateway.get("/auth", negotiate_header(kdc))
        assert response.status == 503
        line = [a for a in gateway.audit() if a["request_id"] == response.header("X-Request-Id")][0]
        assert (line["outcome"], line["reason"]) == ("unavailable", "kerberos.directory_unavailable")
    finally:
        slapd.stop()
