"""The kerberos plugin's pure parts: token classification, principal mapping, keytab reading,
settings. Tokens are built here byte by byte (not with the plugin's own code)."""

from __future__ import annotations

import ipaddress
import logging
import struct
import sys
import textwrap
import time

import pytest

from support.der import der
from support.gateway import authgw, write_conf

from gateway import Attempt, NegotiateCredential, Outcome
from gateway.plugins.kerberos import KerberosPlugin, KerberosSettings
from gateway.plugins.kerberos.keytab import KeytabError, read_keytab
from gateway.plugins.kerberos.mapping import CrossRealmPolicy, MappingRule, PrincipalMapper, split_principal
from gateway.plugins.kerberos.tokens import TokenProblem, TokenRefused, inspect_token, krb_error_of


OID = {
    "spnego": bytes.fromhex("06062b0601050502"),
    "krb5": bytes.fromhex("06092a864886f712010202"),
    "mskrb5": bytes.fromhex("06092a864882f712010202"),
    "ntlm": bytes.fromhex("060a2b06010401823702020a"),
    "negoex": bytes.fromhex("060a2b06010401823702021e"),
}
NTLM_NEGOTIATE = b"NTLMSSP\x00\x01\x00\x00\x00" + bytes(20)


def gs(text: str) -> bytes:
    return der(0x1B, text.encode())


def krb5_ap_req(service=("HTTP", "web.example.test"), realm="EXAMPLE.TEST", etype=18, kvno=7) -> bytes:
    """An RFC 4121 initial token carrying an AP-REQ whose ticket header is real DER; the encrypted
    parts are filler (only GSSAPI could read them, and it is not asked here)."""
    sname = der(0x30, der(0xA0, der(0x02, b"\x02")) + der(0xA1, der(0x30, b"".join(gs(c) for c in service))))
    enc = der(0x30, der(0xA0, der(0x02, bytes([etype]))) + der(0xA1, der(0x02, bytes([kvno]))) + der(0xA2, der(0x04, b"\x00" * 32)))
    ticket = der(0x61, der(0x30, der(0xA0, der(0x02, b"\x05")) + der(0xA1, gs(realm)) + der(0xA2, sname) + der(0xA3, enc)))
    authenticator = der(0x30, der(0xA0, der(0x02, bytes([etype]))) + der(0xA2, der(0x04, b"\x00" * 16)))
    ap_req = der(0x6E, der(0x30, der(0xA0, der(0x02, b"\x05")) + der(0xA1, der(0x02, b"\x0e"))
                           + der(0xA2, der(0x03, b"\x00\x00\x00\x00\x00")) + der(0xA3, ticket) + der(0xA4, authenticator)))
    return der(0x60, OID["krb5"] + b"\x01\x00" + ap_req)


def spnego(mechs: list[str], mech_token: bytes | None) -> bytes:
    fields = der(0xA0, der(0x30, b"".join(OID[m] for m in mechs)))
    if mech_token is not None:
        fields += der(0xA2, der(0x04, mech_token))
    return der(0x60, OID["spnego"] + der(0xA0, der(0x30, fields)))


# -- tokens ---------------------------------------------------------------------------------------------


def test_a_spnego_token_reveals_the_tickets_clear_text_header():
    token = inspect_token(spnego(["mskrb5", "krb5", "ntlm"], krb5_ap_req()))
    assert token.spnego and token.mechs[0] == "1.2.840.48018.1.2.2"
    ticket = token.ticket()
    assert (ticket.service, ticket.etype, ticket.kvno) == ("HTTP/web.example.test@EXAMPLE.TEST", 18, 7)
    bare = inspect_token(krb5_ap_req(kvno=3))
    assert not bare.spnego and bare.ticket().kvno == 3


@pytest.mark.parametrize("token, problem", [
    (NTLM_NEGOTIATE, TokenProblem.NTLM),
    (spnego(["ntlm"], NTLM_NEGOTIATE), TokenProblem.NTLM),
    (spnego(["ntlm"], None), TokenProblem.NTLM),
    (spnego(["ntlm", "krb5"], NTLM_NEGOTIATE), TokenProblem.NTLM),  # prefers NTLM: no ticket
    (spnego(["krb5", "ntlm"], NTLM_NEGOTIATE), TokenProblem.NTLM),  # says Kerberos, sends NTLM
    (spnego(["negoex", "krb5"], b"NEGOEXTS" + bytes(40)), TokenProblem.UNSUPPORTED_MECHANISM),
    (spnego(["krb5"], None), TokenProblem.UNSUPPORTED_MECHANISM),
    (spnego([], None), TokenProblem.UNSUPPORTED_MECHANISM),
    (der(0x60, OID["ntlm"] + NTLM_NEGOTIATE), TokenProblem.UNSUPPORTED_MECHANISM),
    (der(0xA1, der(0x30, der(0xA0, der(0x0A, b"\x00")))), TokenProblem.MALFORMED),  # a NegTokenResp first
    (spnego(["krb5"], b"\x00\x01junk"), TokenProblem.MALFORMED),
    (krb5_ap_req() + b"\x00", TokenProblem.MALFORMED),
    (krb5_ap_req()[:-3], TokenProblem.MALFORMED),
    (der(0x60, OID["krb5"] + b"\x02\x00" + bytes(8)), TokenProblem.MALFORMED),  # not an AP-REQ
    (b"\x60\x84\xff\xff\xff\xff" + bytes(10), TokenProblem.MALFORMED),
    (b"\x7f\x81\x01" + bytes(10), TokenProblem.MALFORMED),  # high tag number
    (b"", TokenProblem.MALFORMED),
])
def test_tokens_that_can_never_be_a_kerberos_login(token, problem):
    with pytest.raises(TokenRefused) as refused:
        inspect_token(token)
    assert refused.value.problem is problem


def test_the_krb_error_inside_an_error_token_is_read():
    krb_error = der(0x7E, der(0x30, der(0xA0, der(0x02, b"\x05")) + der(0xA1, der(0x02, b"\x1e"))
                               + der(0xA4, der(0x18, b"20260101000000Z")) + der(0xA5, der(0x02, b"\x00"))
                               + der(0xA6, der(0x02, b"\x25")) + der(0xA9, gs("EXAMPLE.TEST"))))
    gss = der(0x60, OID["krb5"] + b"\x03\x00" + krb_error)
    resp = der(0xA1, der(0x30, der(0xA0, der(0x0A, b"\x02")) + der(0xA2, der(0x04, gss))))
    assert krb_error_of(resp).code == 37 == krb_error_of(gss).code  # KRB_AP_ERR_SKEW
    assert krb_error_of(b"\xa1\x03\x30\x01") is None and krb_error_of(None) is None


# -- principal mapping -----------------------------------------------------------------------------------


def test_strip_realm_with_an_allowlist_and_rules():
    mapper = PrincipalMapper(["CORP.EXAMPLE"], [MappingRule(match=r"(?P<u>[^/@]+)@EU\.CORP\.EXAMPLE", username=r"eu-\g<u>"),
                                                MappingRule(match=r"svc-(\w+)/batch@CORP\.EXAMPLE", username=r"\1")], False)
    assert mapper.map("alice@CORP.EXAMPLE").username == "alice"
    assert mapper.map("bob@EU.CORP.EXAMPLE").username == "eu-bob"
    assert mapper.map("svc-report/batch@CORP.EXAMPLE").username == "report"
    assert mapper.map("alice@corp.example").reason == "realm_not_allowed"  # realms are case-sensitive
    assert mapper.map("alice@EVIL.EXAMPLE").reason == "realm_not_allowed"
    assert mapper.map("alice/admin@CORP.EXAMPLE").reason == "principal_not_mapped"
    assert mapper.map("HTTP/web@CORP.EXAMPLE").reason == "principal_not_mapped"
    # a rule must match the whole principal, not a prefix
    assert mapper.map("bob@EU.CORP.EXAMPLE.EVIL").reason == "realm_not_allowed"
    assert PrincipalMapper(["R"], [], True).map("Alice@R").username == "alice"
    # lower-cased only once plainly spelt, and plainly spelt after: the Kelvin sign lowers to k
    assert PrincipalMapper(["R"], [], True).map("fran\u212a@R").reason == "principal_not_mapped"


def test_only_a_named_realms_kdc_may_name_another_realms_principals():
    """The realm of the key that opened the ticket against the client's realm (tests/test_kerberos.py
    has the forged ticket itself, from real KDCs)."""
    anykey = CrossRealmPolicy(["CORP.EXAMPLE"], service_principal_set=False)
    assert anykey.refusal("carol@OTHER.TEST", "HTTP/web@OTHER.TEST") is None  # its own principals
    assert anykey.refusal("bob@EU.CORP.EXAMPLE", "HTTP/web@CORP.EXAMPLE") is None  # a listed realm's trusts
    refused = anykey.refusal("alice@CORP.EXAMPLE", "HTTP/web@OTHER.TEST")
    assert (refused.username, refused.reason) == (None, "cross_realm_not_allowed")
    assert "the KDC of OTHER.TEST" in refused.detail
    assert anykey.refusal("alice@CORP.EXAMPLE", "HTTP/web@corp.example").reason == "cross_realm_not_allowed"
    # the operator named the service (and so its realm): its KDC's trusts are theirs
    resource = CrossRealmPolicy(["USERS.EXAMPLE"], service_principal_set=True)
    assert resource.refusal("alice@USERS.EXAMPLE", "HTTP/web@RESOURCE.EXAMPLE") is None


def test_escaped_principals_split_like_mit():
    assert split_principal(r"a\/b@R") == (["a/b"], "R")
    assert split_principal(r"x\@y/host@R\@S") == (["x@y", "host"], "R@S")
    assert PrincipalMapper(["R"], [], False).map(r"a\/b@R").username == "a/b"


@pytest.mark.parametrize("principal", [r"\bob@R", r"\tom@R", r"\nancy@R", r"al\0ice@R"])
def test_mits_escapes_for_control_characters_are_read_as_them(principal):
    r"""MIT's display form writes backspace, TAB, LF and NUL as ``\b \t \n \0``. Dropping the
    backslash mapped the principal backspace+``ob`` to bob (review of the Kerberos plugin):
    they are read as the control characters they stand for, which map to no one."""
    mapped = PrincipalMapper(["R"], [], False).map(principal)
    assert (mapped.username, mapped.reason) == (None, "principal_not_mapped")
    assert split_principal(r"\bob@R") == (["\bob"], "R")
    assert split_principal(r"a\xb@R") == (["axb"], "R")  # any other escaped character stands for itself


@pytest.mark.parametrize("principal", [
    "alice@CORP.EXAMPLE", "HTTP/web.corp.example@CORP.EXAMPLE", "alice", "", "@", "@R", "a@", "/", "a//b@R",
    "a/b/c@R", "a@b@c", "a@R/x", "host/a@R@S/t", "üser/ünicode@RÉALM", "a b@R", "/a@", "a\tb@R",
])
def test_principals_without_escapes_split_as_the_escape_aware_loop_splits_them(principal):
    """split_principal's quick path (no backslash) and the character loop agree."""
    from gateway.plugins.kerberos.mapping import _split_escaped

    assert split_principal(principal) == _split_escaped(principal)


# -- keytab ------------------------------------------------------------------------------------------------


def keytab_entry(components: list[str], realm: str, kvno: int, enctype: int, kvno32: int | None = None) -> bytes:
    def counted(b: bytes) -> bytes:
        return struct.pack(">H", len(b)) + b
    body = struct.pack(">H", len(components)) + counted(realm.encode()) + b"".join(counted(c.encode()) for c in components)
    body += struct.pack(">IIBH", 1, 1700000000, kvno & 0xFF, enctype) + counted(b"K" * 32)
    if kvno32 is not None:
        body += struct.pack(">I", kvno32)
    return struct.pack(">i", len(body)) + body


def test_the_keytab_table_of_contents(tmp_path):
    path = tmp_path / "http.keytab"
    hole = struct.pack(">i", -12) + bytes(12)
    path.write_bytes(b"\x05\x02" + keytab_entry(["HTTP", "web"], "R", 2, 18) + hole
                     + keytab_entry(["HTTP", "web"], "R", 44, 17, kvno32=300) + keytab_entry(["host", "web"], "R", 1, 23))
    index = read_keytab(path)
    assert index.principals == ["HTTP/web@R", "host/web@R"]
    assert index.kvnos("HTTP/web@R") == [2, 300]
    assert index.describe("HTTP/web@R") == "kvno 2 (aes256-cts-hmac-sha1-96); kvno 300 (aes128-cts-hmac-sha1-96)"
    assert "K" * 8 not in repr(index)  # keys are skipped, not kept
    path.write_bytes(b"\x05\x01" + bytes(8))
    with pytest.raises(KeytabError):
        read_keytab(path)
    path.write_bytes(b"\x05\x02" + keytab_entry(["HTTP", "web"], "R", 2, 18)[:-10])
    with pytest.raises(KeytabError):
        read_keytab(path)


# -- settings and packaging ---------------------------------------------------------------------------------


def test_settings_need_a_mapping_and_valid_rules():
    with pytest.raises(ValueError, match="realms"):
        KerberosSettings(allowed_networks=["10.0.0.0/8"], keytab="/k")
    with pytest.raises(ValueError, match="regular expression"):
        KerberosSettings(allowed_networks=["10.0.0.0/8"], keytab="/k", rules=[{"match": "(", "username": "x"}])
    with pytest.raises(ValueError):
        KerberosSettings(allowed_networks=[], keytab="/k", realms=["R"])
    with pytest.raises(ValueError):
        KerberosSettings(allowed_networks=["10.0.0.1/8"], keytab="/k", realms=["R"])  # host bits: a typo


def test_without_the_extra_enabling_the_plugin_names_it(tmp_path):
    """``import gssapi`` fails as it would without the extra; the core names what to install."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['gssapi'] = None\n")
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": "chain: [kerberos]\n",
        "kerberos.yaml": textwrap.dedent("""
            kerberos: {allowed_networks: [10.0.0.0/8], keytab: http.keytab, realms: [R]}
            """),
    })
    result = authgw("config", "check", "--config", str(conf), env={"PYTHONPATH": f"{blocker}:{':'.join(sys.path)}"})
    assert result.returncode != 0
    assert "pip install 'authgw[kerberos]'" in result.stderr + result.stdout


def in_process_plugin(tmp_path, **settings) -> KerberosPlugin:
    """The plugin as the core makes it, with no other plugin registered."""
    import pluggy

    from gateway import hookspecs
    from gateway.registry import PluginContext
    from gateway.settings import GatewaySettings

    pm = pluggy.PluginManager("authgw")
    pm.add_hookspecs(hookspecs)
    context = PluginContext(name="kerberos", config_dir=tmp_path, state_dir=tmp_path,
                            gateway=GatewaySettings(chain=["kerberos"]), hook=pm.hook,
                            log=logging.getLogger("test.kerberos"))
    return KerberosPlugin(KerberosSettings(**settings), context)


def negotiate_attempt(client: str, token: bytes) -> Attempt:
    return Attempt(request_id="t", client=ipaddress.ip_address(client), front_door="test",
                   deadline=time.monotonic() + 5, negotiate=NegotiateCredential(token))


def test_negotiate_is_offered_and_read_only_inside_the_allowed_networks(tmp_path):
    """Gating happens before any token parsing or keytab access (the keytab here does not exist)."""
    plugin = in_process_plugin(tmp_path, allowed_networks=["10.0.0.0/8", "fd00::/8"], keytab=tmp_path / "absent",
                               realms=["R"])

    def attempt(client: str) -> Attempt:
        return negotiate_attempt(client, NTLM_NEGOTIATE)

    for inside in ("10.1.2.3", "fd00::5"):
        assert plugin.gateway_challenges(attempt(inside)) == "Negotiate"
        decision = plugin.gateway_authenticate(attempt(inside))
        assert (decision.outcome, decision.reason) == (Outcome.INVALID_CREDENTIALS, "kerberos.ntlm_not_supported")
    for outside in ("192.0.2.1", "2001:db8::1", "11.0.0.1"):
        assert plugin.gateway_challenges(attempt(outside)) is None
        assert plugin.gateway_authenticate(attempt(outside)) is None


# -- log lines ---------------------------------------------------------------------------------------------

FORGED_SNAME = ("HTTP", "evil\n2026-01-01 00:00:00,000 WARNING [1] authgw: FORGED\r\x1b[2K\u2028\x00")


def test_the_tickets_clear_text_service_name_is_escaped_in_its_description():
    token = spnego(["krb5"], krb5_ap_req(service=FORGED_SNAME, realm="EXAMPLE.TEST\n"))
    detail = inspect_token(token).ticket().describe()
    assert detail.isprintable(), detail
    assert detail == ("ticket for HTTP/evil\\n2026-01-01 00:00:00,000 WARNING [1] authgw: FORGED\\r\\x1b[2K\\u2028\\x00"
                      "@EXAMPLE.TEST\\n (kvno 7, aes256-cts-hmac-sha1-96)")


def test_a_refusal_naming_a_forged_service_is_logged_on_one_line(tmp_path, monkeypatch, caplog):
    """The client's service name reaches a WARNING (wrong_principal: an operator's reason) through
    the plugin's own logging, escaped; the refusal is not changed by it."""
    (tmp_path / "krb5.conf").write_text("[libdefaults]\n  default_realm = EXAMPLE.TEST\n")
    monkeypatch.setenv("KRB5_CONFIG", str(tmp_path / "krb5.conf"))
    keytab = tmp_path / "http.keytab"
    keytab.write_bytes(b"\x05\x02" + keytab_entry(["HTTP", "localhost"], "EXAMPLE.TEST", 7, 18))
    keytab.chmod(0o600)
    plugin = in_process_plugin(tmp_path, allowed_networks=["10.0.0.0/8"], keytab=keytab,
                               service_principal="HTTP/localhost@EXAMPLE.TEST", realms=["EXAMPLE.TEST"])
    token = spnego(["krb5"], krb5_ap_req(service=FORGED_SNAME, realm="EXAMPLE.TEST"))
    with caplog.at_level(logging.INFO, logger="test.kerberos"):
        decision = plugin.gateway_authenticate(negotiate_attempt("10.1.2.3", token))
    assert (decision.outcome, decision.reason) == (Outcome.INVALID_CREDENTIALS, "kerberos.wrong_principal")
    (record,) = [r for r in caplog.records if "kerberos.wrong_principal" in r.getMessage()]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert message.isprintable() and "FORGED" in message, message
    assert "HTTP/evil\\n2026-01-01" in message and "\\x1b[2K\\u2028\\x00" in message


def test_the_spelling_check_folds_more_loosely_than_any_directory():
    """The directory's answer is compared with the mapped name through a fold looser than any
    directory's matching: slapd lowers character by character (``İ`` to ``i``), which
    ``casefold`` alone would not match (review of this stop's diff)."""
    from gateway.plugins.kerberos import _folded

    assert _folded("al\u0130ce") == _folded("ALICE") == _folded("Al\u00efce") == _folded("alice")
    assert _folded("bob") != _folded("alice")


def test_an_ipv4_mapped_allowed_network_is_the_ipv4_network_it_names(tmp_path):
    """The core unwraps an IPv4-mapped client (`::ffff:10.1.2.3`) to IPv4 before matching, so
    `allowed_networks: ['::ffff:10.0.0.0/104']` matched nobody (review of the Kerberos plugin):
    it is read as 10.0.0.0/8, as trusted_proxies is."""
    import ipaddress

    from gateway.plugins.kerberos import KerberosSettings

    keytab = tmp_path / "http.keytab"
    keytab.write_bytes(b"\x05\x02")
    settings = KerberosSettings.model_validate({"allowed_networks": ["::ffff:10.0.0.0/104", "192.0.2.0/24"],
                                                "keytab": str(keytab), "realms": ["EXAMPLE.TEST"]})
    assert settings.allowed_networks == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24")]
