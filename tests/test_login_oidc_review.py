"""Review of the OpenID Connect provider (RP-initiated logout, budgets, codes, client assertions),
through a real ``authgw serve`` and slapd, with Authlib as the relying party and the SQLite and
Redis session stores:

- an ``id_token_hint`` ends only the browser's own session, the one it was issued in: from
  another browser (another user's, or none) the session it names stays, and the user is asked
  (the "Sign out" page, whose confirmation still goes to a registered
  ``post_logout_redirect_uri``) or, with no session here, sent back to the relying party;
- answers from an existing session spend its user's budget (``sessions.requests_per_client``):
  past it 429 ``login.too_many_requests`` and nothing is stored or signed; a code's record keeps
  only what the token endpoint reads;
- another client's code is refused before it is used up, and does not revoke the token of the
  client it was issued to;
- a client assertion whose ``exp`` (``nbf``, ``iat``) is not a finite number is
  ``invalid_client``, never a 500; the stores refuse a non-finite expiry.

No assertion depends on how fast anything runs."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt as authlib_jwt
from joserfc import jws
from joserfc.jwk import RSAKey

from gateway.plugins.login.sessions import RedisStore, SqliteStore

from support.login import LoginSite, hidden, site_on_store
from support.pki import CA
from support.redis import RedisServer
from support.saml_sp import rsa_pair
from support.slapd import Slapd

CB = "https://rp.example.test/callback"
CB2 = "https://rp2.example.test/callback"
BYE = "https://rp.example.test/signed-out"
BYE2 = "https://rp2.example.test/bye"
SECRETS = {"rp": "rp-secret-value-0123456789", "rp2": "rp2-secret-value-0123456789"}
SP = "https://sp.example.test/"
REALM = "urn:review:realm"
#: More answers than the tight budget (3) and what it can refill while they are asked for, on any
#: machine that answers a request in under a second (3 a minute).
FLOOD = 40


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("slapd") / "slapd").start()
    server.add_user("alice", "Alice-pw-1", cn="Alice Liddell", mail="alice@example.com", groups=["staff"])
    server.add_user("bob", "Bob-pw-1", mail="bob@example.com", groups=["staff"])
    yield server
    server.stop()


def make_site(base, slapd, **login) -> LoginSite:
    clients = []
    for n, (client_id, redirect, bye) in enumerate([("rp", CB, BYE), ("rp2", CB2, BYE2)]):
        path = base / f"secret{n}"
        path.write_text(SECRETS[client_id])
        path.chmod(0o600)
        clients.append({"client_id": client_id, "redirect_uris": [redirect], "client_secret": {"file": str(path)},
                        "post_logout_redirect_uris": [bye]})
    cert, key = rsa_pair(base / "rp", "rp", "rp.example.test")
    clients.append({"client_id": "rp-jwt", "redirect_uris": [CB], "public_key": str(cert)})
    site = LoginSite(base / "op", slapd, CA.create(), login={"oidc": {"clients": clients}, **login})
    site.gw = site.start()
    site.rp_key = key.read_text()
    site.config = site.client().get(f"{site.url}/.well-known/openid-configuration").json()
    return site


@pytest.fixture(scope="module")
def op(tmp_path_factory, slapd):
    site = make_site(tmp_path_factory.mktemp("oidc-review"), slapd)
    yield site
    site.stop()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def any_store(request, tmp_path_factory, slapd, op):
    base = tmp_path_factory.mktemp("oidc-review-redis")
    with site_on_store(request.param, base, lambda base, **login: make_site(base, slapd, **login), op) as site:
        yield site


@pytest.fixture(scope="module")
def tight(tmp_path_factory, slapd):
    """A door whose budget is 3 (at once, then 3 a minute), with a SAML SP that takes
    IdP-initiated answers and a WS-Federation realm."""
    site = make_site(tmp_path_factory.mktemp("oidc-tight"), slapd, sessions={"requests_per_client": 3},
                     saml={"service_providers": [{"entity_id": SP, "acs_urls": ["https://sp.example.test/acs"],
                                                  "idp_initiated": True}]},
                     wsfed={"relying_parties": [{"realm": REALM, "reply_urls": ["https://app.example.test/wsfed"]}]})
    yield site
    site.stop()


def rp(op, client_id="rp") -> OAuth2Session:
    session = OAuth2Session(client_id, SECRETS.get(client_id), scope="openid profile email",
                            redirect_uri=CB2 if client_id == "rp2" else CB, code_challenge_method="S256",
                            token_endpoint_auth_method="client_secret_post")
    session.trust_env = False
    session.verify = str(op.ca_file)
    return session


def signed_in_browser(op, user: str = "alice", password: str = "Alice-pw-1"):
    browser = op.client()
    page = op.sign_in(browser, user, password)
    assert "signed in as" in page.text, page.text[:300]
    return browser


def code_of(op, browser, client_id: str = "rp", **params) -> tuple[str, str]:
    """A code for *client_id* answered from *browser*'s session (the state is long on purpose);
    (code, verifier)."""
    verifier = secrets.token_urlsafe(48)
    uri, _ = rp(op, client_id).create_authorization_url(op.config["authorization_endpoint"], code_verifier=verifier,
                                                        state="s" * 1500, nonce="n-1", **params)
    answer = browser.get(uri, allow_redirects=False)
    assert answer.status_code == 303, (answer.status_code, answer.headers.get("X-Refused-Reason"))
    return parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0], verifier


def redeem(op, code: str, verifier: str, client_id: str = "rp"):
    return op.client().post(op.config["token_endpoint"], data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": CB2 if client_id == "rp2" else CB,
        "code_verifier": verifier, "client_id": client_id, "client_secret": SECRETS[client_id]})


def id_token(op, browser, client_id: str = "rp") -> str:
    code, verifier = code_of(op, browser, client_id)
    token = redeem(op, code, verifier, client_id)
    assert token.status_code == 200, token.text
    return token.json()["id_token"]


def signed_in(op, browser) -> bool:
    return "signed in as" in browser.get(f"{op.url}/login").text


def logout(op, browser, **params):
    return browser.get(op.config["end_session_endpoint"], params=params, allow_redirects=False)


# -- F1: a hint ends only the browser's own session ---------------------------------------------------

def test_another_users_hint_ends_nothing_and_its_holder_is_asked(op):
    alice = signed_in_browser(op)
    hint = id_token(op, alice, "rp2")
    bob = signed_in_browser(op, "bob", "Bob-pw-1")
    # bob's browser (or a page bob visits) with alice's leaked id_token, cross-site
    asked = bob.get(op.config["end_session_endpoint"], params={"id_token_hint": hint},
                    headers={"Sec-Fetch-Site": "cross-site"}, allow_redirects=False)
    assert asked.status_code == 200 and "You are signed in as bob." in asked.text
    assert 'action="/logout' in asked.text and hidden(asked.text, "csrf")
    assert signed_in(op, alice) and signed_in(op, bob)
    # no cookie at all (curl, an <img> on any page): the "signed out" page, nothing ended
    nobody = logout(op, op.client(), id_token_hint=hint)
    assert nobody.status_code == 200 and "You are signed out." in nobody.text
    assert signed_in(op, alice)
    # alice's own browser: her session, ended without asking
    done = logout(op, alice, id_token_hint=hint)
    assert done.status_code == 200 and "You are signed out." in done.text
    assert not signed_in(op, alice) and signed_in(op, bob)


def test_a_hint_of_an_earlier_session_of_the_same_user_asks_before_ending_the_new_one(op):
    browser = signed_in_browser(op)
    hint = id_token(op, browser)
    assert logout(op, browser, id_token_hint=hint).status_code == 200  # ends that session
    assert not signed_in(op, browser)
    op.sign_in(browser, "alice", "Alice-pw-1")  # a new session: a new SessionIndex (sid)
    asked = logout(op, browser, id_token_hint=hint)
    assert asked.status_code == 200 and "You are signed in as Alice Liddell." in asked.text
    assert signed_in(op, browser)


def test_a_valid_post_logout_redirect_uri_is_honoured_when_nothing_is_ended_or_the_user_confirms(op):
    alice = signed_in_browser(op)
    hint = id_token(op, alice)
    # no session in this browser: straight back to the relying party, alice's session untouched
    back = logout(op, op.client(), id_token_hint=hint, post_logout_redirect_uri=BYE, state="st 1")
    assert back.status_code == 303 and back.headers["Location"] == BYE + "?state=st+1"
    assert signed_in(op, alice)
    # bob's browser: asked; confirming ends bob's session (only) and goes to the registered address
    bob = signed_in_browser(op, "bob", "Bob-pw-1")
    asked = logout(op, bob, id_token_hint=hint, post_logout_redirect_uri=BYE, state="st 2")
    assert asked.status_code == 200 and "You are signed in as bob." in asked.text
    assert "https://rp.example.test" in asked.headers["Content-Security-Policy"]  # form-action: the redirect after
    action = asked.text.split('<form method="post" action="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    assert action.startswith("/logout?then=")
    assert signed_in(op, alice) and signed_in(op, bob)
    confirmed = bob.post(op.url + action, data={"csrf": hidden(asked.text, "csrf")}, allow_redirects=False)
    assert confirmed.status_code == 303 and confirmed.headers["Location"] == BYE + "?state=st+2"
    assert not signed_in(op, bob) and signed_in(op, alice)
    # the confirmation is single use: again, the plain "signed out" page
    bob2 = signed_in_browser(op, "bob", "Bob-pw-1")
    page = bob2.get(f"{op.url}/login")
    again = bob2.post(op.url + action, data={"csrf": hidden(page.text, "csrf")}, allow_redirects=False)
    assert again.status_code == 200 and "You are signed out." in again.text


def test_a_cross_site_post_without_the_cookie_is_continued_at_a_get_that_has_it(op):
    alice = signed_in_browser(op)
    hint = id_token(op, alice)
    # the relying party's page posts the form: SameSite=Lax keeps the session cookie back
    posted = op.client().post(op.config["end_session_endpoint"], allow_redirects=False,
                              data={"id_token_hint": hint, "post_logout_redirect_uri": BYE, "state": "x"})
    assert posted.status_code == 303 and posted.headers["Location"].startswith("/oidc/logout?held=")
    assert signed_in(op, alice)
    # the browser follows it with its cookie: its own session, ended, then the registered address
    done = alice.get(op.url + posted.headers["Location"], allow_redirects=False)
    assert done.status_code == 303 and done.headers["Location"] == BYE + "?state=x"
    assert not signed_in(op, alice)


# -- F2: a budget for answers from a session; small code records ------------------------------------

def flood(site, browser, url: str, params: dict) -> tuple[int, object]:
    """GET *url* from *browser* until the first answer that is not one; (answers before, it)."""
    for served in range(FLOOD):
        answer = browser.get(url, params=params, allow_redirects=False, timeout=15)
        if "X-Refused-Reason" in answer.headers:
            return served, answer
        assert answer.status_code in (200, 303), (answer.status_code, answer.headers.get("X-Refused-Reason"))
    pytest.fail(f"{FLOOD} answers from one session were all given")


def assert_too_many(answer) -> None:
    """429 (a SAML or WS-Federation request, a page); an OIDC authorization request, whose
    redirect_uri is validated, is told at it (303, error=temporarily_unavailable)."""
    if answer.status_code == 303:
        assert "error=temporarily_unavailable" in answer.headers["Location"], answer.headers["Location"]
    else:
        assert answer.status_code == 429, answer.status_code
    assert answer.headers["X-Refused-Reason"] == "login.too_many_requests"
    assert int(answer.headers["Retry-After"]) >= 1
    assert "code=" not in answer.headers.get("Location", "") and "SAMLResponse" not in answer.text


def stored_codes(site) -> int:
    db = sqlite3.connect(f"file:{site.dir / 'state0' / 'login' / 'sessions.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM pending WHERE key LIKE 'code:%'").fetchone()[0]
    finally:
        db.close()


def test_answers_from_one_session_spend_its_users_budget_in_every_protocol(tight):
    alice = signed_in_browser(tight)
    verifier = secrets.token_urlsafe(48)
    uri, _ = rp(tight).create_authorization_url(tight.config["authorization_endpoint"], code_verifier=verifier)
    params = {k: v[0] for k, v in parse_qs(urlsplit(uri).query).items()}
    _, refused = flood(tight, alice, tight.config["authorization_endpoint"], params)
    assert_too_many(refused)
    codes = stored_codes(tight)
    again = alice.get(tight.config["authorization_endpoint"], params=params, allow_redirects=False)
    assert_too_many(again)
    assert stored_codes(tight) == codes  # nothing stored past the budget
    # the same user's budget whatever the protocol: no SAML answer signed, no WS-Fed token
    assert_too_many(alice.get(f"{tight.url}/saml/idp", params={"sp": SP}, allow_redirects=False))
    assert_too_many(alice.get(f"{tight.url}/wsfed", params={"wa": "wsignin1.0", "wtrealm": REALM},
                              allow_redirects=False))
    # another user's session, from the same address, is still answered
    bob = signed_in_browser(tight, "bob", "Bob-pw-1")
    page = bob.get(f"{tight.url}/saml/idp", params={"sp": SP}, allow_redirects=False)
    assert page.status_code == 200 and hidden(page.text, "SAMLResponse")
    assert "reason=login.too_many_requests user=alice" in tight.gw.output()


def test_a_posted_prompt_none_past_the_budget_is_answered_at_the_redirect_uri(tight):
    """A POSTed authorization request waits at /login for the session (its cookie does not come
    with a cross-site POST); there, past the user's budget, it got the 429 page, which a
    prompt=none request (an iframe, a silent renewal) must never get (third review of the OIDC
    provider): it is answered at its redirect_uri as a GET past the budget is."""
    bob = signed_in_browser(tight, "bob", "Bob-pw-1")
    uri, state = rp(tight).create_authorization_url(tight.config["authorization_endpoint"],
                                                    code_verifier=secrets.token_urlsafe(48), prompt="none")
    params = {k: v[0] for k, v in parse_qs(urlsplit(uri).query).items()}
    _, refused = flood(tight, bob, tight.config["authorization_endpoint"], params)
    assert_too_many(refused)
    posted = bob.post(tight.config["authorization_endpoint"], data=params, allow_redirects=False)
    assert posted.status_code == 303 and posted.headers["Location"].startswith("/login?req="), posted.headers
    answer = bob.get(tight.url + posted.headers["Location"], allow_redirects=False)
    assert_too_many(answer)
    assert answer.status_code == 303 and answer.headers["Location"].startswith(CB + "?"), answer.status_code
    assert parse_qs(urlsplit(answer.headers["Location"]).query)["state"] == [state]
    # the request was answered: it is not answered again from the session later
    assert bob.get(tight.url + posted.headers["Location"], allow_redirects=False).status_code != 303

def test_a_code_record_keeps_only_what_the_token_endpoint_reads(op):
    browser = signed_in_browser(op)
    code, verifier = code_of(op, browser)
    db = sqlite3.connect(f"file:{op.dir / 'state0' / 'login' / 'sessions.sqlite3'}?mode=ro", uri=True)
    try:
        key = "code:" + hashlib.sha256(code.encode()).hexdigest()
        record = json.loads(db.execute("SELECT data FROM pending WHERE key = ?", (key,)).fetchone()[0])
    finally:
        db.close()
    assert set(record) == {"client_id", "redirect_uri", "challenge", "nonce", "scope", "identity", "sid"}
    assert "s" * 1500 not in json.dumps(record)  # the state goes back to the client, not into the store
    token = redeem(op, code, verifier)
    assert token.status_code == 200 and token.json()["scope"] == "openid profile email"
    claims = authlib_jwt.decode(token.json()["id_token"], JsonWebKey.import_key_set(
        op.client().get(op.config["jwks_uri"]).json()))
    assert claims["nonce"] == "n-1" and claims["email"] == "alice@example.com"


# -- F3: another client's code ----------------------------------------------------------------------

def test_another_clients_code_is_refused_before_it_is_used_up(any_store):
    op = any_store
    browser = signed_in_browser(op)
    code, verifier = code_of(op, browser)
    stolen = redeem(op, code, verifier, "rp2")
    assert (stolen.status_code, stolen.json()["error"]) == (400, "invalid_grant")
    own = redeem(op, code, verifier)  # still the rp's to redeem
    assert own.status_code == 200, own.text


def test_another_client_presenting_a_used_code_revokes_nothing(any_store):
    op = any_store
    browser = signed_in_browser(op)
    code, verifier = code_of(op, browser)
    token = redeem(op, code, verifier).json()
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert op.client().get(op.config["userinfo_endpoint"], headers=bearer).status_code == 200
    replayed = redeem(op, code, verifier, "rp2")
    assert (replayed.status_code, replayed.json()["error"]) == (400, "invalid_grant")
    assert op.client().get(op.config["userinfo_endpoint"], headers=bearer).status_code == 200
    # its own client presenting it again still revokes it (RFC 6749 4.1.2)
    assert redeem(op, code, verifier).status_code == 400
    assert op.client().get(op.config["userinfo_endpoint"], headers=bearer).status_code == 401


# -- F4: exp, nbf and iat are finite numbers ---------------------------------------------------------

def assertion(op, **claims) -> str:
    """A client assertion of rp-jwt signed with its own key, its claims as given (NaN and
    Infinity written as Python's JSON writer writes them)."""
    now = int(time.time())
    body = {"iss": "rp-jwt", "sub": "rp-jwt", "aud": op.config["token_endpoint"], "exp": now + 60,
            "jti": str(uuid.uuid4()), **claims}
    return jws.serialize_compact({"alg": "RS256"}, json.dumps(body).encode(), RSAKey.import_key(op.rp_key))


#: Times that are not finite numbers (Python's JSON reader takes NaN and Infinity), each refused.
NOT_FINITE = [{"exp": float("nan")}, {"exp": float("inf")}, {"exp": float("-inf")}, {"nbf": float("nan")},
              {"iat": float("nan")}, {"iat": float("inf")}, {"iat": True}, {"iat": "now"},
              {"nbf": 10**400}, {"iat": -10**400}]  # integers no float holds: math.isfinite raised (a 500)


def test_a_client_assertion_whose_times_are_not_finite_numbers_is_invalid_client(any_store):
    op = any_store
    browser = signed_in_browser(op)
    code, verifier = code_of(op, browser, "rp-jwt")
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": CB, "code_verifier": verifier,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}
    for claims in NOT_FINITE:
        answer = op.client().post(op.config["token_endpoint"],
                                  data={**body, "client_assertion": assertion(op, **claims)})
        assert (answer.status_code, answer.json()["error"]) == (401, "invalid_client"), (claims, answer.text)
    # the same code with a good assertion (iat a number): the code was not used up by them
    good = op.client().post(op.config["token_endpoint"],
                            data={**body, "client_assertion": assertion(op, iat=int(time.time()))})
    assert good.status_code == 200, good.text


@pytest.mark.parametrize("expires", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_the_stores_refuse_a_non_finite_expiry(tmp_path, expires):
    sqlite_store = SqliteStore(tmp_path / "sessions.sqlite3")
    redis = RedisServer(tmp_path / "redis").start()
    redis_store = RedisStore(redis.url, 3600)
    try:
        for store in (sqlite_store, redis_store):
            with pytest.raises(ValueError, match="finite"):
                store.put_pending("seen:x", {}, expires)
            assert store.get_pending("seen:x", time.time()) is None
            assert store.put_pending("seen:x", {}, time.time() + 60)
    finally:
        sqlite_store.close()
        redis_store.close()
        redis.stop()
