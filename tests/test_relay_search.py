"""Issue 13: ``search_users`` and ``list_groups`` from the relay to a connector and back. One relay
and two connectors (all ``authgw serve``) in front of a real slapd: the relay's HTTP API
(``/v1/relay/users``) and the same hooks called by a relay-side plugin travel the link to the
connector's ldap plugin."""

from __future__ import annotations

import urllib.parse

import pytest

from support.linkenv import Connector, Relay, linked_site
from support.slapd import Slapd

#: More users than one page holds.
MANY = [f"member{i:02d}" for i in range(13)]

#: A relay-side plugin that calls the directory hooks, as a console or SCIM plugin would.
PROBE = {"dirprobe.py": '''
    import asyncio
    from aiohttp import web
    from gateway import BackendUnavailable, Route, hookimpl

    class DirProbe:
        def __init__(self, settings, context):
            self.hook = context.hook

        @hookimpl
        def gateway_http_routes(self, door):
            async def run(fn):
                try:
                    return web.json_response(await asyncio.get_running_loop().run_in_executor(None, fn))
                except BackendUnavailable as exc:
                    return web.json_response({"unavailable": str(exc)}, status=503)

            async def search(request):
                q, cursor = request.query.get("q", ""), request.query.get("cursor") or None
                def fn():
                    page = self.hook.gateway_search_users(query=q, limit=int(request.query["limit"]), cursor=cursor)
                    return None if page is None else {"users": [u.username for u in page.users],
                                                      "states": [u.account_state for u in page.users],
                                                      "next_cursor": page.next_cursor}
                return await run(fn)

            async def groups(request):
                name = request.match_info["name"]
                return await run(lambda: self.hook.gateway_list_groups(username=name))
            return [Route("GET", "/probe/search", search), Route("GET", "/probe/groups/{name}", groups)]
'''}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_users((uid, "Passw0rd-" + uid) for uid in MANY)
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A", mail="alice@example.com", groups=["staff"])
    server.add_user("bob", "Bob-Passw0rd", cn="Bob B", groups=["ops"])
    server.add_group("employees", [server.group_dn("staff")])
    server.add_user("star*x", "Star-Passw0rd", cn="Star X")
    server.add_user("gone", "Gone-Passw0rd", cn="Gone G",
                    extra={"objectClass": "authgwAccountState", "nsAccountLock": "TRUE"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd):
    yield from linked_site(tmp_path_factory.mktemp("site"), slapd, ("dir-probe", {"dirprobe": "dirprobe:DirProbe"}, PROBE))


def _get(relay: Relay, path: str, **query):
    return relay.process.get(f"{path}?{urllib.parse.urlencode(query)}" if query else path,
                             {"Authorization": f"Bearer {relay.token}"})


def test_relay_api_pages_a_search_over_the_link(site):
    relay, _ = site
    assert relay.process.get("/v1/relay/users?q=member").status == 401
    seen, cursor, pages = [], None, 0
    while True:
        answer = _get(relay, "/v1/relay/users", q="member", limit=4, **({"cursor": cursor} if cursor else {}))
        assert answer.status == 200, answer.text
        body = answer.json()
        assert len(body["users"]) <= 4
        seen += [u["username"] for u in body["users"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == MANY and pages == 4  # 13 users: 4+4+4+1
    alice = _get(relay, "/v1/relay/users", q="ali", limit=5).json()["users"]
    assert [(u["username"], u["email"], u["account_state"]) for u in alice] == [("alice", "alice@example.com", "")]
    assert _get(relay, "/v1/relay/users", q="gone", limit=5).json()["users"][0]["account_state"] == "ldap.disabled"
    assert _get(relay, "/v1/relay/users", q="a", limit=0).status == 400
    assert _get(relay, "/v1/relay/users", q="a", limit=5, cursor="!!bad!!").status == 400


@pytest.mark.parametrize("query, expected", [("*)(uid=*", []), ("*", []), ("star*", ["star*x"]), ("a\x00", []),
                                             ("(", []), ("alice)(|(uid=*", [])])
def test_injection_attempts_over_the_link_match_only_literally(site, query, expected):
    relay, _ = site
    answer = _get(relay, "/v1/relay/users", q=query, limit=50)
    assert answer.status == 200, answer.text
    assert [u["username"] for u in answer.json()["users"]] == expected


def test_relay_api_lists_plain_and_nested_groups(site):
    relay, _ = site
    assert relay.process.get("/v1/relay/users/alice/groups").status == 401
    assert _get(relay, "/v1/relay/users/alice/groups").json()["groups"] == ["employees", "staff"]
    assert _get(relay, "/v1/relay/users/bob/groups").json()["groups"] == ["ops"]
    assert _get(relay, "/v1/relay/users/member00/groups").json()["groups"] == []
    assert _get(relay, "/v1/relay/users/nobody/groups").status == 404


def test_relay_side_plugins_call_the_same_hooks_over_the_link(site):
    relay, _ = site
    page = relay.process.get("/probe/search?q=member&limit=10").json()
    assert page["users"] == MANY[:10] and page["next_cursor"]
    rest = relay.process.get(f"/probe/search?q=member&limit=10&cursor={page['next_cursor']}").json()
    assert rest["users"] == MANY[10:] and rest["next_cursor"] is None
    assert relay.process.get("/probe/search?q=gone&limit=3").json()["states"] == ["ldap.disabled"]
    assert relay.process.get("/probe/groups/alice").json() == ["employees", "staff"]
    assert relay.process.get("/probe/groups/nobody").json() is None


def test_with_one_connector_stopped_the_other_answers_and_with_none_503(site):
    relay, connectors = site
    connectors[0].stop()
    try:
        for _ in range(4):
            assert [u["username"] for u in _get(relay, "/v1/relay/users", q="bob", limit=5).json()["users"]] == ["bob"]
        connectors[1].stop()
        assert _get(relay, "/v1/relay/users", q="bob", limit=5).status == 503
        assert relay.process.get("/probe/groups/alice").status == 503
    finally:
        for connector in connectors:
            connector.start().wait_linked(relay)


class _DeadDirectory:
    """Connector settings pointing the ldap plugin at a port nobody listens on."""

    def __init__(self, slapd: Slapd) -> None:
        self.slapd = slapd

    def plugin_settings(self, mode: str, **overrides) -> dict:
        from support.net import free_port

        return self.slapd.plugin_settings(mode, **{**overrides, "servers": [f"ldap://127.0.0.1:{free_port()}"],
                                                   "connect_timeout": 0.5})


def test_read_only_requests_retry_past_a_connector_whose_directory_is_down(site, slapd, tmp_path):
    relay, connectors = site
    dead = Connector(tmp_path / "dead", _DeadDirectory(slapd)).enroll(relay.ticket(), relay.ca_file).start()
    try:
        dead.wait_linked(relay)
        connectors[1].stop()  # left: one connector with a directory, one without
        for _ in range(6):  # least-in-flight ties alternate: the dead one is picked too
            answer = _get(relay, "/v1/relay/users", q="bob", limit=5)
            assert answer.status == 200, answer.text
            assert [u["username"] for u in answer.json()["users"]] == ["bob"]
            assert _get(relay, "/v1/relay/users/alice/groups").json()["groups"] == ["employees", "staff"]
        connectors[0].stop()  # only the dead directory is left: 503, not a wrong answer
        answer = _get(relay, "/v1/relay/users", q="bob", limit=5)
        assert answer.status == 503 and "relay.connector_unavailable" in answer.text
    finally:
        dead.stop()
        for connector in connectors:
            if connector.process.proc.poll() is not None:
                connector.start().wait_linked(relay)
