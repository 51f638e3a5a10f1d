"""``/v1/openapi.json`` describes ``POST /v1/authenticate`` as it really answers: every status the
document lists is produced by a real ``authgw serve`` and its body validated against the schema
the document gives for that status."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import pytest

from support.gateway import write_conf
from support.net import free_port

PASSWORD = "Corr3ct-Horse-Battery"
TOKEN = "agw_openapi-test-token-0123456789"


@pytest.fixture
def api(conf_dir, start_gateway):
    from gateway.passwords import hash_password

    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    dead = free_port()  # nothing listens there: the ldap step is unavailable
    gw = start_gateway(write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static, ldap]\nthrottle:\n  user_failures: 3\n"
                        f"api_tokens:\n  - name: portal\n    sha256: {digest}\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "users/users.yaml": f'users:\n  alice:\n    password_hash: "{hash_password(PASSWORD)}"\n'
                            f'    groups: [staff]\n  dan:\n    password_hash: "{hash_password(PASSWORD)}"\n'
                            f"    disabled: true\n",
        "ldap.yaml": f"ldap:\n  servers: [ldap://127.0.0.1:{dead}]\n  insecure: true\n  base_dn: dc=example\n"
                     "  direct_bind: 'uid={username},dc=example'\n  connect_timeout: 0.5\n  receive_timeout: 0.5\n",
    }))
    return gw


def post(gw, body, token=TOKEN):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    return gw.post("/v1/authenticate", body if isinstance(body, bytes) else json.dumps(body).encode(), headers)


def test_every_documented_status_is_a_real_answer_that_matches_its_schema(api):
    document = api.get("/v1/openapi.json").json()
    jsonschema.validators.Draft202012Validator.check_schema(document["components"]["schemas"]["Decision"])
    operation = document["paths"]["/v1/authenticate"]["post"]
    assert document["openapi"].startswith("3.1") and operation["security"] == [{"apiToken": []}]

    answers = {
        "success": post(api, {"username": "alice", "password": PASSWORD}),
        "wrong password": post(api, {"username": "alice", "password": "nope"}),
        "account state": post(api, {"username": "dan", "password": PASSWORD}),
        "malformed": post(api, {"username": "alice", "password": ""}),
        "bad request": post(api, b"{not json"),
        "no token": post(api, {"username": "alice", "password": PASSWORD}, token=None),
        "wrong token": post(api, {"username": "alice", "password": PASSWORD}, token="agw_wrong"),
        "unavailable": post(api, {"username": "nobody-in-static", "password": "x"}),
    }
    for _ in range(4):
        answers["throttled"] = post(api, {"username": "alice", "password": "nope"})

    seen = set()
    for case, response in answers.items():
        status = str(response.status)
        assert status in operation["responses"], (case, status)
        seen.add(status)
        content = operation["responses"][status]["content"]["application/json"]
        schema = {**content["schema"], "components": document["components"]}
        jsonschema.validate(response.json(), schema, cls=jsonschema.validators.Draft202012Validator)
        for header, spec in operation["responses"][status].get("headers", {}).items():
            assert response.header(header) == spec["schema"]["const"], (case, header)
    assert seen == set(operation["responses"]), "every documented status is produced and checked"

    outcomes = {case: answers[case].json().get("outcome") for case in
                ("success", "wrong password", "account state", "unavailable", "throttled")}
    assert outcomes == {"success": "success", "wrong password": "invalid_credentials", "account state": "account_state",
                        "unavailable": "unavailable", "throttled": "throttled"}
    assert answers["malformed"].json()["reason"] in operation["responses"]["200"]["content"]["application/json"][
        "schema"].get("examples", []) + document["components"]["schemas"]["Decision"]["properties"]["reason"]["examples"]


def test_the_openapi_document_in_the_docs_is_the_served_one():
    from pathlib import Path

    from gateway.http.openapi import openapi_document

    text = (Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text()
    served = openapi_document("VERSION")
    assert json.loads(text) == served, "run python tools/gen_docs.py"
