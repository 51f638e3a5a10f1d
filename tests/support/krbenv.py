"""A throw-away Kerberos realm (a real MIT KDC, support.kdc) and real ``authgw serve`` gateways
that take Negotiate logins for ``HTTP/localhost`` in it: the fixture and helpers the Kerberos
plugin's tests share.

A test module takes its realm fixture by name::

    realm = realm_fixture("krbleft45", "alice", "bob")
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.gateway import GatewayProcess, write_conf
from support.kdc import KDC, SPNEGO

__all__ = ["INSIDE", "KRB5_OID", "SPN", "SPNEGO_OID", "kerberos_yaml", "outcome", "plugin_lines",
           "realm_fixture", "start", "tokens"]

SPN = "HTTP/localhost@EXAMPLE.TEST"
#: A client address inside ``allowed_networks`` (127.0.0.0/8).
INSIDE = ("127.0.0.3", 0)
KRB5_OID = bytes.fromhex("06092a864886f712010202")
SPNEGO_OID = bytes.fromhex("06062b0601050502")


def realm_fixture(name: str, *users: str):
    """A module-scoped ``realm`` fixture: a KDC for EXAMPLE.TEST in a temporary directory named
    after *name*, each of *users* a principal (password ``pw-`` and its name, ``/`` as ``-``)
    with a credential cache, and the service's keytab. It yields a dict: ``kdc``, ``keytab``,
    ``caches`` (user to ccache path) and ``dir``."""

    @pytest.fixture(scope="module")
    def realm(tmp_path_factory):
        d = tmp_path_factory.mktemp(name)
        kdc = KDC(d / "kdc", "EXAMPLE.TEST").start()
        try:
            for user in users:
                kdc.add_principal(user, "pw-" + user.replace("/", "-"))
            keytab = kdc.add_service("HTTP/localhost", d / "http.keytab")
            caches = {user: kdc.kinit(user, "pw-" + user.replace("/", "-"), d / f"{user.replace('/', '_')}.cc")
                      for user in users}
            yield {"kdc": kdc, "keytab": keytab, "caches": caches, "dir": d}
        finally:
            kdc.stop()

    return realm


def start(base: Path, realm: dict, files: dict[str, str], *, workers: int = 1) -> GatewayProcess:
    """A gateway over ``base/conf.d`` written from *files*, with the realm's environment (its
    krb5.conf); its log is in the error when it does not start."""
    conf = write_conf(base / "conf.d", files)
    gateway = GatewayProcess(conf, base / "state", env=realm["kdc"].env, workers=workers)
    try:
        return gateway.start()
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; log:\n{gateway.output()}") from None


def kerberos_yaml(keytab: Path, extra: str = "") -> str:
    """kerberos.yaml for :data:`SPN` from *keytab*, clients on 127.0.0.0/8, and *extra* (lines
    under ``kerberos:``, indented two spaces)."""
    return (f"kerberos:\n  allowed_networks: [127.0.0.0/8]\n  keytab: {keytab}\n  service_principal: {SPN}\n"
            f"  realms: [EXAMPLE.TEST]\n{extra}")


def tokens(realm: dict, user: str = "alice", count: int = 1, mech: str = SPNEGO) -> list[bytes]:
    """*count* initiator tokens of *user* for :data:`SPN` (SPNEGO unless *mech* says otherwise)."""
    return realm["kdc"].mint(realm["caches"][user], [(SPN, count)], mech=mech)[0]


def outcome(gateway: GatewayProcess, response) -> tuple[int, str, str]:
    """The answer's status, and the outcome and reason its audit line gives."""
    line = gateway.audit_for(response.header("X-Request-Id"))
    return response.status, line["outcome"], line["reason"]


def plugin_lines(gateway: GatewayProcess, response) -> list[str]:
    """The kerberos plugin's log lines about the attempt that gave *response*."""
    request_id = gateway.audit_for(response.header("X-Request-Id"))["request_id"]
    return [line for line in gateway.output().splitlines()
            if "authgw.plugin.kerberos" in line and f"(attempt {request_id})" in line]
