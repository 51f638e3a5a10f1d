"""The LDAP plugin with ``direct_bind`` and no service account, and the credential cache (item
left by the last stop): an account Active Directory refuses outright for its state (bind answered
49 with ``data 533``, ``775``, ``701``...) reads no entry, so the plugin names no account, and it
has no lookup. Refused under the name typed, the cache forgets that name's rows (and, through its
pointer row, the account's offline entry); the account's hot entries under its own name lived on
for ``hot.ttl``. Now the pointer row names the account for the hot cache too. A name the gateway
never saw signed in cannot be tied to its account without a service account (not tested here).

Real ``authgw serve`` processes in front of tests/support/fakead.py, which here answers an
account's right password with the state code the test gives it (``FakeAD.refuse``), as a domain
controller does.

Waits are bounded and wait for events, never for a time to pass.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from support.cacheenv import GATEWAY_YAML, source
from gateway.plugins.ldap.adcodes import AD_CODES
from support.fakead import FakeAD
from support.gateway import GatewayProcess, write_conf
from test_cache_left45b import reason

BASE = "DC=corp,DC=example,DC=com"
PERSON = {"objectClass": ["top", "person", "user"], "objectCategory": ["person"], "userAccountControl": ["512"]}
#: Dana's sAMAccountName is dana; her UPN is dana.jones@...: she signs in under either.
DANA = f"CN=Dana Jones,OU=Staff,{BASE}"
PASSWORD = "dana-Passw0rd"


@pytest.fixture
def ad():
    directory = FakeAD({DANA: {**PERSON, "sAMAccountName": ["dana"],
                                "userPrincipalName": ["dana.jones@corp.example.com"],
                                "password": [PASSWORD], "displayName": ["Dana Jones"]}})
    yield directory
    directory.stop()


def direct_gateway(tmp_path, directory: FakeAD, start_gateway) -> GatewayProcess:
    """One worker, ``chain: [ldap]`` with direct bind of ``NAME@corp.example.com`` and no service
    account, the cache with its hot cache, and the test's address as a trusted proxy."""
    ldap = {"preset": "active_directory", "servers": [directory.url], "insecure": True, "base_dn": BASE,
            "direct_bind": "{username}@corp.example.com", "groups": {"source": "memberof", "nested": False},
            "connect_timeout": 0.5, "receive_timeout": 1.0, "backoff": 0}
    return start_gateway(write_conf(tmp_path / "conf.d", {
        "gateway.yaml": GATEWAY_YAML + "    trusted_proxies: [127.0.0.1/32]\n",
        "ldap.yaml": "ldap: " + json.dumps(ldap),
        "cache.yaml": json.dumps({"cache": {"hot": {"enabled": True, "ttl": 600}}}),
    }))


def rows(gateway: GatewayProcess) -> list[str]:
    with sqlite3.connect(gateway.state_dir / "cache.sqlite3") as db:
        return [r[0] for r in db.execute("SELECT * FROM entries").fetchall()]


def at(client: str) -> dict[str, str]:
    """Headers of a request from *client* (the gateway trusts the test's proxy address): the hot
    cache keys its entries by client, so a refusal seen from another one reaches the directory."""
    return {"X-Forwarded-For": client}


@pytest.mark.parametrize("code", ["533", "775", "701", "532", "530", "531", "773"])
def test_an_account_refused_outright_for_its_state_under_another_name_loses_its_hot_entries(
        tmp_path, ad, start_gateway, code):
    """Dana signed in as ``dana`` and as ``dana.jones`` (her UPN's name): the cache holds her
    entry under ``dana``, a row under ``dana.jones`` that points at it, and hot entries under
    each. AD then refuses her bind outright for its state (49, ``data 533``...): no entry is read,
    so the plugin names no account and, without a service account, has no lookup. Before, the
    refusal under ``dana.jones`` ended that name's hot entries only, and ``dana`` went on being
    answered 200 from the hot cache (``cache.hot``) for ``hot.ttl``. A wrong password under
    ``dana.jones`` (``data 52e``) must still end nothing of ``dana``'s: a guess is no lever."""
    gateway = direct_gateway(tmp_path, ad, start_gateway)
    for name in ("dana", "dana.jones"):
        signed_in = gateway.auth(name, PASSWORD, at("10.0.0.1"))
        assert (signed_in.status, source(signed_in), signed_in.header("Remote-User")) == (200, "live", "dana")
    assert source(gateway.auth("dana", PASSWORD, at("10.0.0.1"))) == "cache"
    assert len(rows(gateway)) == 2  # her entry and the pointer of dana.jones

    guessed = gateway.auth("dana.jones", "a-wrong-guess", at("10.0.0.2"))
    assert guessed.status == 401 and reason(gateway, guessed) == ("invalid_credentials", "ldap.invalid_password")
    kept = gateway.auth("dana", PASSWORD, at("10.0.0.1"))
    assert (kept.status, source(kept)) == (200, "cache"), "a wrong guess under another name ended the hot entry"

    ad.refuse[DANA] = code
    expected = ("account_state", AD_CODES[code].reason)
    refused = gateway.auth("dana.jones", PASSWORD, at("10.0.0.2"))
    assert refused.status == 401 and reason(gateway, refused) == expected
    again = gateway.auth("dana", PASSWORD, at("10.0.0.1"))
    assert again.status == 401 and again.header("Remote-User") is None, (again.status, source(again))
    assert reason(gateway, again) == expected  # asked live, and refused
    ad.stop()
    offline = gateway.auth("dana", PASSWORD, at("10.0.0.3"))
    assert offline.status == 503 and offline.header("Remote-User") is None, (offline.status, source(offline))
