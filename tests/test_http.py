"""The HTTP front doors, through a real ``authgw serve`` process and real HTTP."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import signal

import pytest

from support.fakedist import make_dist
from support.gateway import GatewayProcess, write_conf
from support.http import basic
from support.net import wait_for
from support.proc import children

PASSWORD = "Corr3ct-Horse-Battery"


def static_conf(conf_dir, password_hash, gateway_extra: str = "", chain: str = "[static]") -> object:
    return write_conf(conf_dir, {
        "gateway.yaml": f"chain: {chain}\nthrottle:\n  enabled: false\n{gateway_extra}",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "users/users.yaml": f"""
            users:
              alice:
                password_hash: "{password_hash}"
                display_name: Alice Liddell
                email: alice@example.test
                groups: [staff, wonderland]
              disabled-dan:
                password_hash: "{password_hash}"
                disabled: true
            """,
    })


@pytest.fixture(scope="module")
def alice_hash():
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


@pytest.fixture
def gw(conf_dir, alice_hash, start_gateway) -> GatewayProcess:
    return start_gateway(static_conf(conf_dir, alice_hash))


def test_auth_success_sets_identity_headers(gw):
    r = gw.auth("alice", PASSWORD)
    assert r.status == 200
    assert r.header("Remote-User") == "alice"
    assert r.header("Remote-Groups") == "staff,wonderland"
    assert r.header("Remote-Email") == "alice@example.test"
    assert r.header("Remote-Name") == "Alice Liddell"
    assert r.header("Remote-Auth-Source") == "live"
    assert len(r.header("X-Request-Id")) == 32


def test_auth_answers_alike_straight_or_through_the_router(gw):
    """/auth goes to its handler without aiohttp's router; with a query string or an Expect
    header it goes through the router: the same answers either way."""
    from support.http import request

    drop = {"X-Request-Id", "Date"}
    answers = []
    for path, extra in [("/auth", {}), ("/auth?rd=/x", {}), ("/auth", {"Expect": "100-continue"})]:
        for credentials in (basic("alice", PASSWORD), basic("alice", "wrong")):
            r = request(gw.url, "GET", path, {"Authorization": credentials, **extra})
            answers.append((r.status, r.body, {k: v for k, v in r.headers.items() if k not in drop}))
    assert [a[0] for a in answers] == [200, 401] * 3
    assert answers[0::2] == [answers[0]] * 3 and answers[1::2] == [answers[1]] * 3
    assert answers[1][2]["WWW-Authenticate"] == 'Basic realm="authgw", charset="UTF-8"'


def test_failures_are_uniform_for_unknown_user_and_wrong_password(gw):
    wrong = gw.auth("alice", "not-the-password")
    unknown = gw.auth("nobody-here", "not-the-password")
    for r in (wrong, unknown):
        assert r.status == 401
        assert r.all("WWW-Authenticate") == ['Basic realm="authgw", charset="UTF-8"']
        assert "Remote-User" not in r.headers
    assert wrong.body == unknown.body == b"401 Unauthorized\n"
    drop = {"X-Request-Id", "Date"}
    assert {k: v for k, v in wrong.headers.items() if k not in drop} == \
           {k: v for k, v in unknown.headers.items() if k not in drop}
    reasons = [(a["username"], a["outcome"], a["reason"]) for a in gw.audit()]
    assert ("alice", "invalid_credentials", "static.invalid_password") in reasons
    assert ("nobody-here", "user_not_found", "static.user_not_found") in reasons


@pytest.mark.parametrize("authorization, reason", [
    (basic("alice", ""), "empty_password"),
    (basic("alice", "x" * 1025), "password_too_long"),
    ("Basic " + base64.b64encode(b"alice:\xff\xfe-not-utf8").decode(), "malformed_encoding"),
    ("Basic " + base64.b64encode(b"no-colon-at-all").decode(), "malformed_authorization"),
    ("Basic !!!not-base64!!!", "malformed_authorization"),
    ("Negotiate %%%", "malformed_authorization"),
    (basic("", "something"), "malformed_username"),
    (basic("al\nice", "something"), "malformed_username"),
])
def test_malformed_credentials_get_the_same_401_never_a_500(gw, authorization, reason):
    r = gw.get("/auth", {"Authorization": authorization})
    assert r.status == 401 and r.body == b"401 Unauthorized\n"
    assert gw.audit()[-1]["reason"] == reason


def test_a_negotiate_token_of_a_user_in_many_groups_reaches_the_chain(gw):
    """AD puts a user's groups in the ticket's PAC, up to MaxTokenSize (48,000 bytes): aiohttp's
    own limit of 8,190 bytes per header line answered such a token 400 before any plugin saw
    it, where Apache is told to raise LimitRequestFieldSize (review of the Kerberos plugin). A
    line may take the whole header budget (limits.max_header_bytes): the token reaches the
    chain (here no step takes Negotiate: 401, audited)."""
    token = base64.b64encode(bytes(range(256)) * 180).decode()  # 46,080 bytes, 61,440 characters
    r = gw.get("/auth", {"Authorization": "Negotiate " + token})
    assert r.status == 401, (r.status, r.body[:200])
    assert gw.audit()[-1]["outcome"] in ("not_applicable", "invalid_credentials"), gw.audit()[-1]
    over = gw.get("/auth", {"Authorization": "Negotiate " + token * 2})  # past the budget: refused
    assert over.status == 431


def test_no_credentials_gets_a_challenge(gw):
    r = gw.get("/auth")
    assert r.status == 401 and r.header("WWW-Authenticate").startswith("Basic realm=")
    assert gw.audit()[-1]["outcome"] == "not_applicable"


def test_disabled_account_is_an_account_state_401(gw):
    r = gw.auth("disabled-dan", PASSWORD)
    assert r.status == 401
    assert gw.audit()[-1]["reason"] == "static.disabled"


def test_passwords_never_reach_the_logs(gw):
    gw.auth("alice", PASSWORD)
    gw.auth("alice", PASSWORD + "-wrong")
    gw.auth("nobody", PASSWORD)
    gw.get("/auth", {"Authorization": basic("alice", PASSWORD + "\xff")})
    gw.stop()
    output = gw.output()
    assert output.count('"authgw.attempt"') == 4
    assert PASSWORD not in output
    assert base64.b64encode(f"alice:{PASSWORD}".encode()).decode() not in output


def test_health_readiness_and_metrics(gw):
    assert gw.get("/healthz").status == 200
    ready = gw.get("/readyz")
    assert ready.status == 200 and ready.json()["ready"] is True
    gw.auth("alice", PASSWORD)
    gw.auth("alice", "wrong")
    text = gw.get("/metrics").body.decode()
    assert 'authgw_attempts_total{from_cache="false",front_door="forward_auth",outcome="success",step="static"} 1.0' in text
    assert 'outcome="invalid_credentials",step="static"} 1.0' in text
    assert "authgw_attempt_duration_seconds_bucket" in text
    assert "authgw_attempts_in_flight 0.0" in text


def test_sigterm_stops_cleanly(gw):
    assert gw.stop(signal.SIGTERM) == 0
    assert "stopping" in gw.output()


# -- client address ---------------------------------------------------------------------------


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(gw):
    gw.auth("alice", PASSWORD, {"X-Forwarded-For": "203.0.113.77"})
    assert gw.audit()[-1]["client"] == "127.0.0.1"


def test_a_proxy_written_as_an_ipv4_mapped_address_is_trusted(conf_dir, alice_hash, start_gateway):
    # Dual-stack logs write 127.0.0.1 as ::ffff:127.0.0.1; the core matches peers as IPv4.
    gw = start_gateway(static_conf(conf_dir, alice_hash, "trusted_proxies: ['::ffff:127.0.0.1/128']\n"))
    gw.auth("alice", PASSWORD, {"X-Forwarded-For": "203.0.113.5"})
    assert gw.audit()[-1]["client"] == "203.0.113.5"


def test_forwarded_for_from_a_trusted_proxy_is_walked_right_to_left(conf_dir, alice_hash, start_gateway):
    gw = start_gateway(static_conf(conf_dir, alice_hash, "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n"))
    gw.auth("alice", PASSWORD, {"X-Forwarded-For": "203.0.113.5"})
    assert gw.audit()[-1]["client"] == "203.0.113.5"
    # The client wrote the left part itself; the hops our proxies appended are on the right.
    gw.auth("alice", PASSWORD, {"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 10.1.2.3"})
    assert gw.audit()[-1]["client"] == "203.0.113.9"
    # A hop that is no address where the client should be names no client: not the trusted hop
    # before it, which sits in the operator's lists (Kerberos ranges) and would lend every client
    # behind it its throttle budget (review of what the gateway writes). No header: the peer.
    for forwarded in ("garbage, 10.1.2.3", "unknown", "9.9.9.9, unknown", "9.9.9.9,", "", "0x09090909"):
        gw.auth("alice", PASSWORD, {"X-Forwarded-For": forwarded})
        assert gw.audit()[-1]["client"] == "100::", forwarded
    gw.auth("alice", PASSWORD)
    assert gw.audit()[-1]["client"] == "127.0.0.1"


# -- throttling ---------------------------------------------------------------------------------


def test_repeated_failures_are_throttled_with_429(conf_dir, alice_hash, start_gateway):
    conf = static_conf(conf_dir, alice_hash)
    (conf / "gateway.yaml").write_text("chain: [static]\nthrottle:\n  user_failures: 3\n  window: 600\n")
    gw = start_gateway(conf)
    statuses = [gw.auth("alice", f"wrong-{i}").status for i in range(4)]
    assert statuses == [401, 401, 401, 429]
    r = gw.auth("alice", PASSWORD)
    assert r.status == 429 and r.header("Retry-After") == "600"
    assert gw.audit()[-1]["outcome"] == "throttled"
    assert gw.auth("bob", "whatever").status == 401, "other users are not throttled"


# -- JSON API -----------------------------------------------------------------------------------


@pytest.fixture
def api(conf_dir, alice_hash, start_gateway):
    token = "agw_test-token-value-0123456789"
    digest = hashlib.sha256(token.encode()).hexdigest()
    gw = start_gateway(static_conf(conf_dir, alice_hash, f"api_tokens:\n  - name: portal\n    sha256: {digest}\n"))
    return gw, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_api_requires_a_token(api):
    gw, _ = api
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    assert gw.post("/v1/authenticate", body).status == 401
    assert gw.post("/v1/authenticate", body, {"Authorization": "Bearer wrong"}).status == 401
    assert not gw.audit(), "no attempt runs without a valid API token"


@pytest.mark.parametrize("username, password, reason", [
    ("alice", "\ud800", "malformed_encoding"), ("\udfff", "pw", "malformed_encoding"),
    ("alice", "", "empty_password"), ("a" * 300, "pw", "malformed_username"),
    ("\ufdfa" * 80, "pw", "malformed_username"),  # 240 bytes sent, 2,640 after NFKC
    ("ali\x85ce", "pw", "malformed_username"),  # a C1 control (NEL)
])
def test_api_refuses_malformed_credentials_with_a_typed_answer(api, username, password, reason):
    gw, headers = api
    r = gw.post("/v1/authenticate", json.dumps({"username": username, "password": password}).encode(), headers)
    assert r.status == 200 and (r.json()["outcome"], r.json()["reason"]) == ("invalid_credentials", reason)
    assert gw.audit()[-1]["reason"] == reason


def test_api_answers_with_the_typed_decision(api):
    gw, headers = api
    ok = gw.post("/v1/authenticate", json.dumps({"username": "alice", "password": PASSWORD}).encode(), headers)
    assert ok.status == 200
    data = ok.json()
    assert data["outcome"] == "success" and data["step"] == "static" and data["from_cache"] is False
    assert data["identity"]["username"] == "alice" and data["identity"]["groups"] == ["staff", "wonderland"]
    bad = gw.post("/v1/authenticate", json.dumps({"username": "alice", "password": "nope"}).encode(), headers).json()
    assert (bad["outcome"], bad["reason"], bad["identity"]) == ("invalid_credentials", "static.invalid_password", None)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"username": 1, "password": "x"}', b'{"username": "a"}',
                                  b'{"username": "a", "password": "b", "extra": 1}', b"\xff\xfe", b"x" * 9000,
                                  # a key twice: something in front may have read the other one
                                  b'{"username": "bob", "username": "alice", "password": "' + PASSWORD.encode() + b'"}'])
def test_api_garbage_is_a_400_never_a_500(api, body):
    gw, headers = api
    r = gw.post("/v1/authenticate", body, headers)
    assert r.status == 400 and r.json()["error"] == "bad_request"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32-le", "utf-8-sig", "latin-1"])
def test_api_reads_utf8_json_only_and_echoes_no_byte_of_the_body(api, encoding):
    """``json.loads`` given bytes guessed UTF-16 and UTF-32 and skipped a BOM: each logged alice
    in, while a proxy or WAF in front reading UTF-8 saw other bytes. A Latin-1 body's error quoted
    the byte it stopped at, here one of the password's."""
    gw, headers = api
    password = PASSWORD + "é"  # é: 0xe9 in Latin-1, not UTF-8
    body = json.dumps({"username": "alice", "password": password}, ensure_ascii=False).encode(encoding)
    r = gw.post("/v1/authenticate", body, headers)
    assert r.status == 400 and r.json()["error"] == "bad_request", (r.status, r.body)
    detail = r.json()["detail"]
    assert detail in ("the body is not UTF-8 text", "the body starts with a byte order mark"), detail
    assert "0x" not in detail and "position" not in detail
    assert not gw.audit(), "no attempt ran"


# -- plugins in a real server -------------------------------------------------------------------

TEST_PLUGINS = {"acme_plugins.py": '''
    from gateway import Decision, Identity, Outcome, hookimpl

    class Unreachable:
        def __init__(self, settings, context):
            self.name = context.name

        @hookimpl
        def gateway_authenticate(self, attempt):
            attempt.note(Outcome.UNAVAILABLE, step=self.name, reason="acme.unreachable")

    class Explodes:
        def __init__(self, settings, context):
            pass

        @hookimpl
        def gateway_authenticate(self, attempt):
            raise ZeroDivisionError("the plugin is broken")

    class Typo:
        def __init__(self, settings, context):
            pass

        @hookimpl
        def gateway_autenticate(self, attempt):
            return None

    class OddIdentity:
        """Signs anyone in with an identity of the wrong shape, as the plugin's class says."""
        fields = {}

        def __init__(self, settings, context):
            self.name = context.name

        @hookimpl
        def gateway_authenticate(self, attempt):
            identity = Identity(subject="s-1", username=attempt.username, method=self.name,
                                **self.fields)
            return Decision.allow(identity, step=self.name)

    class NumberGroup(OddIdentity):
        fields = {"groups": ("staff", 7)}

    class TextGroups(OddIdentity):
        fields = {"groups": "admins"}

    class ObjectClaim(OddIdentity):
        fields = {"claims": {"badge": object()}}

    class NumberEmail(OddIdentity):
        fields = {"email": 12}
''', "needs_extra.py": "import acme_fancy_dependency_xyz\n"}


@pytest.fixture
def acme_env(tmp_path):
    site = make_dist(tmp_path / "site", "acme-plugins", {
        "acme_unreachable": "acme_plugins:Unreachable",
        "acme_explodes": "acme_plugins:Explodes",
        "acme_typo": "acme_plugins:Typo",
        "acme_number_group": "acme_plugins:NumberGroup",
        "acme_text_groups": "acme_plugins:TextGroups",
        "acme_object_claim": "acme_plugins:ObjectClaim",
        "acme_number_email": "acme_plugins:NumberEmail",
        "acme_fancy": "needs_extra:Plugin",
    }, TEST_PLUGINS, requires=['acme-fancy-dependency-xyz>=1; extra == "fancy"'])
    return {"PYTHONPATH": str(site)}


def test_every_backend_unavailable_is_503_with_retry_after(conf_dir, alice_hash, start_gateway, acme_env):
    gw = start_gateway(static_conf(conf_dir, alice_hash, chain="[acme_unreachable]"), env=acme_env)
    r = gw.auth("alice", PASSWORD)
    assert r.status == 503 and r.header("Retry-After") == "5"
    assert gw.audit()[-1]["reason"] == "acme.unreachable"
    assert gw.get("/readyz").status == 200  # the plugin reports no components


@pytest.mark.parametrize("step", ["acme_number_group", "acme_text_groups", "acme_object_claim", "acme_number_email"])
def test_an_identity_of_the_wrong_shape_is_refused_not_a_500(conf_dir, alice_hash, start_gateway, acme_env, step):
    """A third party's identity whose groups are not strings (or are one string), whose claims
    are not JSON, or whose email is not text: no header or token can carry it faithfully. Before,
    the success was audited and the answer was a 500; it is an error (fail closed), named."""
    gw = start_gateway(static_conf(conf_dir, alice_hash, chain=f"[{step}]"), env=acme_env)
    r = gw.auth("alice", "anything")
    assert r.status == 401 and r.header("Remote-User") is None
    entry = gw.audit()[-1]
    assert (entry["outcome"], entry["reason"], entry["step"]) == ("error", "malformed_identity", step)
    assert f"step '{step}' signed in an identity" in gw.output()
    assert gw.get("/healthz").status == 200


def test_a_raising_plugin_gives_401_and_the_next_request_still_works(conf_dir, alice_hash, start_gateway, acme_env):
    gw = start_gateway(static_conf(conf_dir, alice_hash, chain="[acme_explodes, static]"), env=acme_env)
    for _ in range(2):
        r = gw.auth("alice", PASSWORD)
        assert r.status == 401
    entry = gw.audit()[-1]
    assert (entry["outcome"], entry["reason"], entry["step"]) == ("error", "internal_error", "acme_explodes")
    assert "plugin 'acme_explodes' raised ZeroDivisionError" in gw.output()
    assert gw.get("/healthz").status == 200


def test_a_misspelled_hook_stops_start_up(conf_dir, alice_hash, tmp_path, acme_env):
    gw = GatewayProcess(static_conf(conf_dir, alice_hash, chain="[acme_typo]"), tmp_path / "state", env=acme_env)
    with pytest.raises(RuntimeError):
        gw.start(timeout=20)
    assert gw.proc.wait(timeout=20) == 2
    assert "'gateway_autenticate', which is not an authgw hook; did you mean 'gateway_authenticate'?" in gw.output()


def test_a_plugin_missing_its_extra_names_the_extra(conf_dir, alice_hash, tmp_path, acme_env):
    from support.gateway import authgw

    static_conf(conf_dir, alice_hash, chain="[acme_fancy]")
    result = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"), env=acme_env)
    assert result.returncode == 2
    assert "install the extra: pip install 'acme-plugins[fancy]'" in result.stderr


def test_two_workers_share_the_socket_and_metrics(conf_dir, alice_hash, start_gateway):
    gw = start_gateway(static_conf(conf_dir, alice_hash), workers=2)
    assert [gw.auth("alice", PASSWORD).status for _ in range(6)] == [200] * 6
    # another worker publishes its counts every PUBLISH_INTERVAL
    wait_for(lambda: 'outcome="success",step="static"} 6.0' in gw.get("/metrics").body.decode(), 10,
             what="metrics that aggregate every worker")
    workers = children(gw.proc.pid)
    assert len(workers) == 2
    if len(os.sched_getaffinity(0)) > 1:  # pin_workers: one CPU each, different ones
        pinned = [os.sched_getaffinity(pid) for pid in workers]
        assert all(len(cpus) == 1 for cpus in pinned) and pinned[0] != pinned[1]
    assert gw.stop() == 0


@pytest.mark.parametrize("choice", ["asyncio", "auto"])
def test_event_loop_choice(conf_dir, alice_hash, start_gateway, choice):
    gw = start_gateway(static_conf(conf_dir, alice_hash, f"event_loop: {choice}\n"))
    assert gw.auth("alice", PASSWORD).status == 200
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    expected = "uvloop" if choice == "auto" and has_uvloop else "asyncio"
    assert f"event loop: {expected}" in gw.output()


def _with_headers(gateway: GatewayProcess, method: str, path: str, headers: list[tuple[str, str]],
                  body: bytes = b"") -> tuple[int, bytes]:
    """A request carrying *headers* exactly, repeated names included (a dict cannot)."""
    import http.client

    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=15)
    try:
        conn.putrequest(method, path)
        for name, value in [*headers, ("Content-Length", str(len(body)))]:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_two_authorization_headers_are_refused_not_the_first_believed(gw):
    """Authorization is not a list header: with a valid one first and another after it, the
    first was checked and 200 answered, while what reads the request behind authgw may take the
    other. Now it is a malformed request: the uniform 401, audited."""
    for pair in ([basic("alice", PASSWORD), basic("mallory", "x")], [basic("alice", PASSWORD)] * 2):
        status, body = _with_headers(gw, "GET", "/auth", [("Authorization", value) for value in pair])
        assert (status, body) == (401, b"401 Unauthorized\n")
        assert gw.audit()[-1]["reason"] == "duplicate_authorization"
    assert gw.auth("alice", PASSWORD).status == 200


def test_two_api_tokens_are_no_token(api):
    gw, headers = api
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    assert gw.post("/v1/authenticate", body, headers).status == 200
    twice = [*headers.items(), ("Authorization", headers["Authorization"])]
    status, _ = _with_headers(gw, "POST", "/v1/authenticate", twice, body)
    assert status == 401
