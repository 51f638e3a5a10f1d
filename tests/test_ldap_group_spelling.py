"""Group searches name the user as the directory spells the name, not as it was typed.

``{username}`` in a group filter (the OpenLDAP preset's ``memberUid={username}``) was filled with
the typed name: ``uid`` matches ignoring case, ``memberUid`` is case-exact, so ``ALICE`` signed in
as alice with fewer of her groups, and that list was cached under her entry for ``cache_ttl``,
for every later login of hers (review of the LDAP plugin). Real slapd, real ``authgw serve``.
"""

from __future__ import annotations

import json

from support.gateway import GatewayProcess, write_conf
from support.slapd import Slapd


def test_a_login_typed_in_another_case_gets_the_users_whole_group_list(tmp_path):
    slapd = Slapd(tmp_path / "slapd").start()
    gateway = None
    try:
        slapd.add_user("alice", "Alice-pw-1", groups=["staff"])
        slapd.add_entry(f"cn=devs,{slapd.groups_dn}", {"objectClass": ["top", "posixGroup"], "cn": "devs",
                                                       "gidNumber": "5000", "memberUid": "alice"})
        conf = write_conf(tmp_path / "conf.d", {
            "gateway.yaml": "chain: [ldap]\nthrottle: {enabled: false}\n",
            "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain"))})
        gateway = GatewayProcess(conf, tmp_path / "state").start()
        for typed in ("ALICE", "alice"):  # the first fills the group cache for both
            answer = gateway.auth(typed, "Alice-pw-1")
            assert answer.status == 200 and answer.header("Remote-User") == "alice", answer.body
            assert answer.header("Remote-Groups").split(",") == ["devs", "staff"], (typed, answer.header("Remote-Groups"))
    finally:
        if gateway is not None:
            gateway.stop()
        slapd.stop()
