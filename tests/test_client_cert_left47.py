"""Two items about the client_cert plugin's mappings left by stop 46, through real ``authgw serve``
processes that read the certificate from their trusted proxy's header (127.0.0.1), a throwaway
PKI and a real slapd.

* ``require_directory_match`` read an ``X509:<I>..<SR>..`` mapping's serial in either byte order:
  a certificate of the same CA whose serial is the byte-reverse of alice's met alice's mapping
  and logged in as alice. Active Directory writes the serial byte-reversed (KB5014754: the
  mapping ``X509:<I>IssuerName<SR>1200000000AC11000000002B`` names the certificate whose serial
  ``certutil`` and ``openssl`` print ``2B0000000011AC0000000012``); ``mapping.serial_order``
  (``reversed`` by default, ``forward``, ``either``) now names the one order read, and a mapping
  in the other order is refused with a log line naming the setting.
* ``lowercase: true`` lowered ``ALİCE`` and ``alİce`` to ``ali\\u0307ce`` (``i`` and U+0307
  COMBINING DOT ABOVE), which slapd does not take for alice but for an account of that name:
  alice's certificate from a CA that uppercases in a Turkish locale logged in as that other
  account, and without ``lookup`` the services behind were told ``ali\\u0307ce``. ``İ`` is the
  one letter whose lowercase is not one letter; a ``lowercase`` rule now maps such a name to no
  one. The Kelvin sign and the ``ﬀ`` ligature were refused before (not in their one spelling),
  ``ẞ`` lowers to ``ß`` letter for letter.

The directory's ``altSecurityIdentities`` is slapd's ``description`` here, as in
test_stop46_cert_krb.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography import x509

from support.gateway import GatewayProcess, authgw, write_conf
from support.http import Response
from support.pki import CA, Issued, write_bundle
from support.slapd import Slapd

HEADER = "X-SSL-Client-Cert"
UPN = "alice@corp.example.com"
#: KB5014754's example: the certificate's serial as certutil prints it, and the mapping AD holds.
ALICE_SERIAL = 0x2B0000000011AC0000000012
AD_MAPPING_SERIAL = "1200000000AC11000000002B"
#: Carol's serial has its top bit set (DER adds a zero octet); her mapping is written forward,
#: as ``openssl x509 -noout -serial`` prints it: a directory filled before AD's order was known.
CAROL_SERIAL = 0x9A00000000000001


def _start(base: Path, client_cert: dict, extra: dict[str, str]) -> GatewayProcess:
    core = {"chain": ["client_cert", "ldap"], "trusted_proxies": ["127.0.0.1/32"], "throttle": {"enabled": False},
            "health": {"probe_interval": 3600}}
    conf = write_conf(base / "conf.d", {"gateway.yaml": json.dumps(core),
                                        "client_cert.yaml": json.dumps({"client_cert": client_cert}), **extra})
    return GatewayProcess(conf, base / "state").start()


def _login(gateway: GatewayProcess, cert: Issued) -> tuple[Response, dict]:
    """The answer to a certificate from the trusted proxy (bare base64 DER), and its audit line."""
    response = gateway.get("/auth", {HEADER: base64.b64encode(cert.der).decode()})
    return response, gateway.audit_for(response.header("X-Request-Id"))


def _issue_with_serial(ca: CA, serial: int, cn: str, upn: str) -> Issued:
    ca.serial = serial - 1  # CA.issue numbers its certificates from ca.serial + 1
    issued = ca.issue(cn, client=True, upn=upn)
    assert issued.cert.serial_number == serial
    return issued


# -- X509:<I>..<SR>..: one byte order -----------------------------------------------------------------


@pytest.fixture(scope="module")
def serial_world(tmp_path_factory):
    """The corporate issuing CA's certificates for alice (serial S, KB5014754's example), for
    mallory with alice's UPN and serial reverse(S) (as the CA's subscriber-supplied names or a
    mis-issuance would give; a CA numbering in sequence issues reversed serials in time), and for
    carol; slapd with alice's mapping as AD writes it and carol's written forward."""
    base = tmp_path_factory.mktemp("serial47")
    root = CA.create("stop47 root")
    corp = root.issue("stop47 corporate issuing CA", ca=True)
    write_bundle(base / "root.pem", root)
    write_bundle(base / "intermediates.pem", corp)
    certs = {
        "alice": _issue_with_serial(corp, ALICE_SERIAL, "Alice", UPN),
        "mallory": _issue_with_serial(corp, int(AD_MAPPING_SERIAL, 16), "Mallory", UPN),
        "carol": _issue_with_serial(corp, CAROL_SERIAL, "Carol", "carol@corp.example.com"),
    }
    issuer = ",".join(reversed(corp.cert.subject.rfc4514_string().split(",")))  # AD: most significant first
    slapd = Slapd(base / "slapd").start()
    try:
        slapd.add_user("alice", "alice-pw", extra={"description": f"X509:<I>{issuer}<SR>{AD_MAPPING_SERIAL}"})
        slapd.add_user("carol", "carol-pw", extra={"description": f"X509:<I>{issuer}<SR>{CAROL_SERIAL:X}"})
        yield base, slapd, certs
    finally:
        slapd.stop()


def _serial_gateway(serial_world, base: Path, serial_order: str | None) -> GatewayProcess:
    """A gateway binding certificates to slapd's mappings, reading their serial in *serial_order*
    (``None``: the key left out, the default)."""
    directory, slapd, _ = serial_world
    mapping = {"lookup": True, "require_directory_match": True,
               "rules": [{"type": "upn", "domains": ["corp.example.com"]}]}
    if serial_order is not None:
        mapping["serial_order"] = serial_order
    settings = {"ca_bundle": str(directory / "root.pem"), "intermediates": str(directory / "intermediates.pem"),
                "headers": [{"name": HEADER, "format": "pem"}], "revocation": {"policy": "off"}, "mapping": mapping}
    ldap = slapd.plugin_settings(mode="plain", attributes={"altSecurityIdentities": "description"})
    return _start(base, settings, {"ldap.yaml": json.dumps({"ldap": ldap})})


@pytest.fixture(scope="module")
def serial_gateways(serial_world, tmp_path_factory):
    """The default gateway (``default``), then one per ``serial_order`` as it is asked for (the
    default's tests run on code without the setting too)."""
    started: dict[str, GatewayProcess] = {}

    def gateway(name: str) -> GatewayProcess:
        if name not in started:
            started[name] = _serial_gateway(serial_world, tmp_path_factory.mktemp(f"gw-{name}"),
                                            None if name == "default" else name)
        return started[name]

    yield gateway
    for process in started.values():
        process.stop()


def test_the_mapping_as_active_directory_writes_it_names_alice(serial_world, serial_gateways):
    _, _, certs = serial_world
    response, audit = _login(serial_gateways("default"), certs["alice"])
    assert response.status == 200, audit
    assert response.header("Remote-User") == "alice"


def test_a_certificate_whose_serial_is_the_byte_reverse_of_alices_is_not_alice(serial_world, serial_gateways):
    # Same CA, alice's UPN, serial 0x1200000000AC11000000002B: read forward, that is alice's
    # mapping, so it logged in as alice (200).
    _, _, certs = serial_world
    gateway = serial_gateways("default")
    response, audit = _login(gateway, certs["mallory"])
    assert response.status == 401, audit
    assert response.header("Remote-User") is None
    assert (audit["outcome"], audit["reason"]) == ("invalid_credentials", "cert.directory_mismatch"), audit
    line = next(line for line in gateway.output().splitlines() if "serial=1200000000ac11000000002b" in line.lower()
                and "X509:<I>" in line)
    assert "only with its serial in forward byte order, and mapping.serial_order is reversed" in line, line
    assert "set mapping.serial_order: forward" in line and "byte-reverse of the mapped one's" in line, line


def test_a_mapping_written_forward_is_refused_by_default_and_the_log_says_what_to_set(serial_world,
                                                                                       serial_gateways):
    _, _, certs = serial_world
    gateway = serial_gateways("default")
    response, audit = _login(gateway, certs["carol"])
    assert (response.status, audit["reason"]) == (401, "cert.directory_mismatch"), audit
    assert any("'carol'" in line and "WARNING" in line and "set mapping.serial_order: forward" in line
               for line in gateway.output().splitlines())


def test_serial_order_forward_reads_forward_mappings_only(serial_world, serial_gateways):
    _, _, certs = serial_world
    gateway = serial_gateways("forward")
    response, audit = _login(gateway, certs["carol"])
    assert (response.status, response.header("Remote-User")) == (200, "carol"), audit
    # AD's mapping is now the other order: alice's own certificate is refused, and mallory's
    # (whose serial, read forward, is that mapping) is the one it names. Hence no default of
    # `forward` for AD, and a log line naming the setting.
    response, audit = _login(gateway, certs["alice"])
    assert (response.status, audit["reason"]) == (401, "cert.directory_mismatch"), audit
    assert any("'alice'" in line and "set mapping.serial_order: reversed" in line
               for line in gateway.output().splitlines())


def test_serial_order_either_is_a_migration_setting_and_says_so(serial_world, serial_gateways):
    _, _, certs = serial_world
    gateway = serial_gateways("either")
    output = gateway.output()
    assert "mapping.serial_order is `either`: a certificate whose serial is the byte-reverse" in output
    for name in ("alice", "carol"):
        response, audit = _login(gateway, certs[name])
        assert (response.status, response.header("Remote-User")) == (200, name), audit
    assert any("'carol'" in line and "accepted under mapping.serial_order: either" in line
               for line in gateway.output().splitlines())
    # The price `either` documents: the byte-reversed serial meets alice's mapping.
    response, _ = _login(gateway, certs["mallory"])
    assert response.header("Remote-User") == "alice"


def test_an_unknown_serial_order_is_a_configuration_error(serial_world, tmp_path):
    base, slapd, _ = serial_world
    settings = {"ca_bundle": str(base / "root.pem"), "headers": [{"name": HEADER, "format": "pem"}],
                "revocation": {"policy": "off"},
                "mapping": {"require_directory_match": True, "serial_order": "little-endian"}}
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert", "ldap"]}),
        "client_cert.yaml": json.dumps({"client_cert": settings}),
        "ldap.yaml": json.dumps({"ldap": slapd.plugin_settings(mode="plain")})})
    result = authgw("config", "check", "--config", str(conf), "--state-dir", str(tmp_path / "state"))
    assert result.returncode != 0
    assert "client_cert.mapping.serial_order: Input should be 'reversed', 'forward' or 'either'" in result.stderr


# -- lowercase: true and İ ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lower_world(tmp_path_factory):
    """slapd with alice, an account ``ali\\u0307ce`` (slapd keeps the combining dot: another name)
    and ``straße``; a CA."""
    base = tmp_path_factory.mktemp("lower47")
    ca = CA.create("stop47 lowercase CA")
    slapd = Slapd(base / "slapd").start()
    try:
        for uid in ("alice", "ali\u0307ce", "stra\u00dfe"):
            slapd.add_user(uid, f"{len(uid)}-pw")
        yield base, slapd, ca
    finally:
        slapd.stop()


@pytest.fixture(scope="module")
def lower_gateways(lower_world, tmp_path_factory):
    base, slapd, ca = lower_world
    ldap = {"ldap.yaml": json.dumps({"ldap": slapd.plugin_settings(mode="plain")})}
    root = write_bundle(base / "root.pem", ca)
    rules = {
        "cn": {"rules": [{"type": "cn", "lowercase": True}]},
        "upn": {"rules": [{"type": "upn", "lowercase": True}]},
        "cn_no_lookup": {"rules": [{"type": "cn", "lowercase": True}], "lookup": False},
    }
    started = {}
    try:
        for name, mapping in rules.items():
            settings = {"ca_bundle": str(root), "headers": [{"name": HEADER, "format": "pem"}],
                        "revocation": {"policy": "off"}, "mapping": mapping}
            started[name] = _start(tmp_path_factory.mktemp(f"lower-{name}"), settings, ldap)
        yield started
    finally:
        for gateway in started.values():
            gateway.stop()


def _issue(ca: CA, gateway_name: str, name: str) -> Issued:
    if gateway_name == "upn":
        return ca.issue("someone", client=True, upn=f"{name}@corp.example.com")
    return ca.issue(name, client=True)


@pytest.mark.parametrize("gateway_name", ["cn", "upn", "cn_no_lookup"])
@pytest.mark.parametrize("name", ["AL\u0130CE", "al\u0130ce", "\u0130"])
def test_a_name_with_a_dotted_capital_i_names_no_one_by_a_lowercase_rule(lower_world, lower_gateways,
                                                                          gateway_name, name):
    # Lowered, it was ``ali\u0307ce``: the other account's name (200 as that account), or with
    # no lookup the name the services behind were given.
    _, _, ca = lower_world
    gateway = lower_gateways[gateway_name]
    response, audit = _login(gateway, _issue(ca, gateway_name, name))
    assert response.status == 401, audit
    assert response.header("Remote-User") is None
    assert (audit["outcome"], audit["reason"]) == ("user_not_found", "cert.unmapped"), audit
    assert any("whose lowercase is not one letter" in line and ascii(name)[1:-1] in line
               for line in gateway.output().splitlines())


@pytest.mark.parametrize("gateway_name", ["cn", "upn", "cn_no_lookup"])
@pytest.mark.parametrize("name, user", [("ALICE", "alice"), ("ali\u0307ce", "ali\u0307ce"),
                                        ("STRA\u1e9eE", "stra\u00dfe"), ("STRA\u00dfE", "stra\u00dfe")])
def test_names_that_lower_letter_for_letter_still_map(lower_world, lower_gateways, gateway_name, name, user):
    _, _, ca = lower_world
    response, audit = _login(lower_gateways[gateway_name], _issue(ca, gateway_name, name))
    assert response.status == 200, audit
    assert audit["username"] == user, audit


@pytest.mark.parametrize("name", ["\u212aELVIN", "a\ufb00", "STRASSE"])
def test_kelvin_sign_ligatures_and_ss_map_to_no_one(lower_world, lower_gateways, name):
    # Not in their one spelling (the Kelvin sign is K, the ligature ff): cert.unmapped before and
    # after. ``strasse`` is not straße to slapd: unknown.
    _, _, ca = lower_world
    response, audit = _login(lower_gateways["cn"], ca.issue(name, client=True))
    assert response.status == 401, audit
    assert audit["reason"] in ("cert.unmapped", "cert.user_not_found"), audit


def test_a_dotted_capital_i_beside_a_good_name_is_ambiguous(lower_world, lower_gateways):
    # One certificate, two UPNs: one unreadable by the rule makes it name two identities.
    _, _, ca = lower_world
    cert = ca.issue("someone", client=True, upn="alice@corp.example.com", upns=["AL\u0130CE@corp.example.com"])
    response, audit = _login(lower_gateways["upn"], cert)
    assert (response.status, audit["reason"]) == (401, "cert.ambiguous"), audit
