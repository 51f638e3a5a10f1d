"""One directory user reachable by three doors: a slapd entry (ppolicy overlay) with a password, a
Kerberos principal with a ticket cache in a real MIT KDC, and a client certificate from a test CA;
and an ``authgw serve`` with the chain ``[kerberos, client_cert, ldap]`` in front of them.

::

    with three_door_world(base, ["alice"], "my CA") as world:        # module fixture
        gateway = start_three_door_gateway(world, base / "gw")        # a GatewayProcess
        by_kerberos(world, gateway, "alice"); by_certificate(world, gateway, "alice")
        by_password(gateway, "alice")                                 # password "alice-pw"

Kerberos clients come from ``INSIDE`` (in ``allowed_networks``); certificates and passwords from
``PROXY`` (the trusted proxy that forwards the certificate in ``X-SSL-Client-Cert``).
"""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from support.gateway import GatewayProcess, write_conf
from support.http import Response, basic
from support.kdc import KDC, write_krb5_conf
from support.pki import CA, write_bundle
from support.slapd import Slapd

INSIDE = ("127.0.0.3", 0)  # a Kerberos client in allowed_networks
PROXY = ("127.0.0.1", 0)  # the TLS-terminating proxy that forwards certificates
SPN = "HTTP/localhost@EXAMPLE.TEST"


@contextlib.contextmanager
def three_door_world(base: Path, users: Iterable[str], ca_name: str,
                     extra: dict[str, dict] | None = None) -> Iterator[dict]:
    """Start slapd and a KDC under *base*; give each user an entry (password ``USER-pw``, with
    *extra* [user] as its further attributes), a principal (``USER-krb``) with a ticket cache and a
    client certificate. Yields the world dict: ``base slapd kdc env keytab caches certs dns``."""
    slapd = Slapd(base / "ldap", ppolicy=True).start()
    kdc = KDC(base / "kdc", "EXAMPLE.TEST")
    try:
        kdc.start()
        conf = write_krb5_conf(base / "krb5.conf", [kdc])
        env = {**kdc.env, "KRB5_CONFIG": str(conf)}
        kdc.kadmin(f"addprinc -randkey {SPN}")
        keytab = kdc.export("HTTP/localhost", base / "http.keytab")
        ca = CA.create(ca_name)
        write_bundle(base / "root.pem", ca)
        caches, certs, dns = {}, {}, {}
        for user in users:
            dns[user] = slapd.add_user(user, f"{user}-pw", mail=f"{user}@example.test",
                                       extra=(extra or {}).get(user))
            kdc.add_principal(user, f"{user}-krb")
            caches[user] = kdc.kinit(user, f"{user}-krb", base / f"{user}.cc", env=env)
            certs[user] = base64.b64encode(ca.issue(user, client=True).der).decode()
        yield {"base": base, "slapd": slapd, "kdc": kdc, "env": env, "keytab": keytab, "caches": caches,
               "certs": certs, "dns": dns}
    finally:
        kdc.stop()
        slapd.stop()


def start_three_door_gateway(world: dict, directory: Path, *, core: dict | None = None, ldap: dict | None = None,
                             refuses: bool | None = None, files: dict[str, str] | None = None) -> GatewayProcess:
    """Write ``directory/conf.d`` for the chain ``[kerberos, client_cert, ldap]`` and start it.

    *core* adds to gateway.yaml, *ldap* replaces the plain-LDAP plugin settings, *refuses* sets
    both doors' ``password_state_refuses`` (left out when None), *files* are further conf files."""
    kerberos = {"allowed_networks": ["127.0.0.3/32"], "keytab": str(world["keytab"]), "service_principal": SPN,
                "realms": ["EXAMPLE.TEST"]}
    mapping: dict = {"rules": ["cn"]}
    if refuses is not None:
        kerberos["password_state_refuses"] = mapping["password_state_refuses"] = refuses
    conf = write_conf(directory / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["kerberos", "client_cert", "ldap"], "trusted_proxies": ["127.0.0.1/32"],
                                    "throttle": {"enabled": False}, **(core or {})}),
        "kerberos.yaml": json.dumps({"kerberos": kerberos}),
        "client_cert.yaml": json.dumps({"client_cert": {
            "ca_bundle": str(world["base"] / "root.pem"), "revocation": "off",
            "headers": [{"name": "X-SSL-Client-Cert", "format": "pem"}], "mapping": mapping}}),
        "ldap.yaml": json.dumps({"ldap": ldap or world["slapd"].plugin_settings(mode="plain")}),
        **(files or {}),
    })
    gateway = GatewayProcess(conf, directory / "state", env=world["env"])
    try:
        return gateway.start()
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; log:\n{gateway.output()}") from None


def by_kerberos(world: dict, gateway: GatewayProcess, user: str) -> Response:
    token = world["kdc"].mint(world["caches"][user], [(SPN, 1)], env=world["env"])[0][0]
    return gateway.get("/auth", {"Authorization": "Negotiate " + base64.b64encode(token).decode()},
                       source_address=INSIDE)


def by_certificate(world: dict, gateway: GatewayProcess, user: str) -> Response:
    return gateway.get("/auth", {"X-SSL-Client-Cert": world["certs"][user]}, source_address=PROXY)


def by_password(gateway: GatewayProcess, user: str, spelling: str | None = None) -> Response:
    """*user*'s password, sent under *spelling* of the name when given."""
    return gateway.get("/auth", {"Authorization": basic(spelling or user, f"{user}-pw")}, source_address=PROXY)
