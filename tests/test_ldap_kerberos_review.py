"""Review of the LDAP and Kerberos plugins (this stop): what was found, against real components.

* Direct bind with a UPN template in a forest of several domains: a domain controller binds the
  UPN of a user of another domain (through the global catalog, as AD does) and "Who am I?" names
  that account ``u:EU\\jsmith``; the gateway searched its own domain for ``sAMAccountName=jsmith``
  and found ``CORP\\jsmith``, another person (a domain admin here), whose profile and groups the
  login got. The server here is tests/support/fakead.py, taught the forest: its searches under
  CORP's naming context never return EU's entries, and it answers AD's constructed
  ``msDS-PrincipalName`` (``DOMAIN\\sAMAccountName``).
* A directory (or anyone on the path to a plaintext one) sending an entry of millions of tiny
  values: each 16 MB entry held the worker's event loop about 2 s (``/healthz`` unanswered) and
  170 MB to decode, and a user search reads two. An entry carries at most
  ``wire.MAX_ENTRY_VALUES`` attributes and values; more is a broken server (503).
"""

from __future__ import annotations

import pytest
from ldap3.protocol.rfc4511 import ResponseValue

from support.der import der
from support.fakead import FakeAD
from support.hostile_ldap import message, result
from support.ldapgw import api_login, ldap_gateways
from test_ldap_hostile_server import HostileDirectory, _gateway

TOKEN = "review-token"
BASE = "DC=corp,DC=example,DC=com"
EU = "DC=eu,DC=corp,DC=example,DC=com"
PERSON = {"objectClass": ["top", "person", "user"], "objectCategory": ["person"], "userAccountControl": ["512"]}


def user(domain: str, sam: str, upn: str, password: str, **attrs) -> dict[str, list[str]]:
    return {**PERSON, "sAMAccountName": [sam], "userPrincipalName": [upn], "password": [password],
            "msDS-PrincipalName": [f"{domain}\\{sam}"], **attrs}


class ForestDC(FakeAD):
    """A domain controller of CORP in a forest with a child domain EU. It binds the UPN of an EU
    user, names that user ``u:EU\\name``, and its searches never return EU's entries (another
    naming context: AD sends a continuation reference, which the gateway does not follow).
    ``base_only``: ``msDS-PrincipalName`` comes only from a base search, as some constructed
    attributes do."""

    def __init__(self, users, *, base_only: bool = False, **kwargs) -> None:
        self.base_only = base_only
        super().__init__(users, **kwargs)

    def _search(self, bound, request):
        found, code = super()._search(bound, request)
        found = [(dn, attrs) for dn, attrs in found if not dn.lower().endswith(EU.lower())]
        if self.base_only and request["scope"] != 0:
            found = [(dn, {k: v for k, v in attrs.items() if k != "msds-principalname"}) for dn, attrs in found]
        return found, code

    def _who(self, bound):
        response = super()._who(bound)
        if bound is not None and bound.lower().endswith(EU.lower()):
            response["responseValue"] = ResponseValue(f"u:EU\\{self.users[bound]['samaccountname'][0]}".encode())
        return response


FOREST = {
    # CORP\jsmith: John, a domain admin.
    f"CN=John Smith,OU=Admins,{BASE}": user("CORP", "jsmith", "john.smith@corp.example.com", "john-pw",
                                             memberOf=[f"CN=Domain Admins,CN=Users,{BASE}"]),
    # EU\jsmith: Jim, whose UPN carries the forest's one suffix.
    f"CN=Jim Smith,OU=Staff,{EU}": user("EU", "jsmith", "jsmith@corp.example.com", "jim-pw"),
}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    yield from ldap_gateways(tmp_path_factory.mktemp("gw"), TOKEN)


def direct_ad(directory: FakeAD) -> dict:
    return {"preset": "active_directory", "servers": [directory.url], "insecure": True, "base_dn": BASE,
            "direct_bind": "{username}@corp.example.com", "groups": {"source": "memberof", "nested": False},
            "connect_timeout": 0.5, "receive_timeout": 1.0, "backoff": 0}


@pytest.mark.parametrize("base_only", [False, True], ids=["in-the-search", "base-search-only"])
def test_another_domains_account_of_the_same_name_does_not_lend_its_profile(start, base_only) -> None:
    dc = ForestDC(FOREST, base_only=base_only)
    try:
        gateway = start(direct_ad(dc))
        # Jim's own UPN and password: the DC binds EU\jsmith; CORP\jsmith is not him.
        status, body = api_login(gateway, TOKEN, "jsmith", "jim-pw")
        assert status == 200, body
        assert (body["outcome"], body["reason"]) == ("account_state", "ldap.account_state_unreadable"), body
        assert "identity" not in body or not body["identity"]
        assert "another domain's" in gateway.output()
        # John, bound as CORP\jsmith, is read as himself.
        status, body = api_login(gateway, TOKEN, "john.smith", "john-pw")
        assert body["outcome"] == "success", body
        assert (body["identity"]["claims"]["dn"], body["identity"]["groups"]) == (
            f"CN=John Smith,OU=Admins,{BASE}", ["Domain Admins"])
    finally:
        dc.stop()


def test_a_directory_without_msds_principalname_is_asked_for_it_once(start) -> None:
    """A directory that names accounts ``u:DOMAIN\\name`` but has no msDS-PrincipalName (an
    AD-compatible server): the first login reads the entry again for it, then no login does
    (an extra round trip per login that checked nothing; review of this stop's diff)."""
    users = {dn: {k: v for k, v in attrs.items() if k != "msDS-PrincipalName"} for dn, attrs in FOREST.items()}
    dc = ForestDC(users)
    try:
        gateway = start(direct_ad(dc))
        assert api_login(gateway, TOKEN, "john.smith", "john-pw")[1]["outcome"] == "success"
        first = dc.requests["searchRequest"]
        assert api_login(gateway, TOKEN, "john.smith", "john-pw")[1]["outcome"] == "success"
        again = dc.requests["searchRequest"] - first
        assert api_login(gateway, TOKEN, "john.smith", "john-pw")[1]["outcome"] == "success"
        assert dc.requests["searchRequest"] - first == 2 * again, "every login reads the entry again"
        assert first >= again + 1  # the first login's base read
    finally:
        dc.stop()


class ManyValues(HostileDirectory):
    """Answers every bind with success and a search with one entry of *values* empty values."""

    def __init__(self, values: int) -> None:
        super().__init__("many values")
        self.searches = 0
        self._entry = der(0x04, b"uid=victim,dc=example,dc=com") + der(
            0x30, der(0x30, der(0x04, b"cn") + der(0x31, b"\x04\x00" * values)))
        self.start()

    async def answer(self, writer, message_id: bytes, op: int) -> bool:
        if op == 0x63:  # search
            self.searches += 1
            writer.write(message(message_id, der(0x64, self._entry)) + message(message_id, result(0x65)))
            return True
        return await super().answer(writer, message_id, op)  # binds succeed, an unbind hangs up


def test_an_entry_of_endless_tiny_values_is_a_broken_server_not_decoded(tmp_path) -> None:
    directory = ManyValues(200_000)  # 400 kB: 50 ms of the loop then; a 16 MB one held it 2 s
    gateway = _gateway(tmp_path, directory.port)
    try:
        gateway.start()
        answer = gateway.auth("victim", "a-password", timeout=60)
        assert directory.searches >= 1
        assert answer.status == 503, answer.body  # an outage, never a login (the server binds anyone)
        assert "attributes and values" in gateway.output(), gateway.output()[-3000:]
        assert gateway.get("/healthz", timeout=30).status == 200
        assert "Traceback" not in gateway.output()
    finally:
        gateway.stop()
        directory.stop()
