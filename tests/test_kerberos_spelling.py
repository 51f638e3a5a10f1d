"""A Kerberos principal is the whole credential, and MIT principals are exact, byte for byte:
``ALICE``, ``ａｌｉｃｅ`` (full-width) and ``alice`` with a no-break space are principals of
their own. The directory finds users as loosely as it matches strings, so each of them used to log
in as alice, with her groups (review of the Kerberos plugin). A principal spelt otherwise than
plainly maps to no one; one that differs from the directory's name only in case logs in only
when the operator says the realm ignores case (``lowercase_username``, as AD's does).

A real MIT KDC, a real slapd holding alice alone, and real ``authgw serve`` processes with the
chain ``[kerberos, client_cert, ldap]`` (tests/support/threedoors.py).
"""

from __future__ import annotations

import base64

import pytest

from support.threedoors import INSIDE, SPN, start_three_door_gateway, three_door_world

#: The principals that are not alice's, by what makes them so.
OTHERS = {"upper case": "ALICE", "full-width": "\uff41\uff4c\uff49\uff43\uff45", "no-break space": "alice\u00a0",
          "zero-width space": "ali\u200bce"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("spelling")
    with three_door_world(base, ["alice"], "spelling CA") as world:
        kdc = world["kdc"]
        for i, name in enumerate(OTHERS.values()):
            kdc.add_principal(name, f"other-{i}-krb")
            world["caches"][name] = kdc.kinit(name, f"other-{i}-krb", base / f"other-{i}.cc", env=world["env"])
        yield world


@pytest.fixture(scope="module")
def exact(world):
    gateway = start_three_door_gateway(world, world["base"] / "exact")
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def ignoring_case(world):
    gateway = start_three_door_gateway(world, world["base"] / "ignoring-case", files={
        "kerberos.yaml": '{"kerberos": {"allowed_networks": ["127.0.0.3/32"], "keytab": "%s", "service_principal": "%s",'
                         ' "realms": ["EXAMPLE.TEST"], "lowercase_username": true}}' % (world["keytab"], SPN)})
    yield gateway
    gateway.stop()


def login(world, gateway, principal: str):
    token = world["kdc"].mint(world["caches"][principal], [(SPN, 1)], env=world["env"])[0][0]
    return gateway.get("/auth", {"Authorization": "Negotiate " + base64.b64encode(token).decode()},
                       source_address=INSIDE)


def refused(gateway, response) -> None:
    assert (response.status, response.header("Remote-User")) == (401, None), response.body
    record = gateway.audit_for(response.header("X-Request-Id"))
    assert (record["outcome"], record["reason"], record["step"]) == (
        "invalid_credentials", "kerberos.principal_not_mapped", "kerberos"), record


def test_alice_herself_logs_in(world, exact):
    response = login(world, exact, "alice")
    assert (response.status, response.header("Remote-User")) == (200, "alice"), response.body


@pytest.mark.parametrize("what", OTHERS)
def test_a_principal_spelt_otherwise_is_not_alice(world, exact, what):
    refused(exact, login(world, exact, OTHERS[what]))


@pytest.mark.parametrize("what", [w for w in OTHERS if w != "upper case"])
def test_ignoring_case_still_maps_no_other_spelling(world, ignoring_case, what):
    refused(ignoring_case, login(world, ignoring_case, OTHERS[what]))


def test_ignoring_case_the_upper_case_principal_is_alice(world, ignoring_case):
    """``lowercase_username``: the operator says the realm ignores case (AD's does), so ALICE is
    alice there, as the directory says."""
    response = login(world, ignoring_case, "ALICE")
    assert (response.status, response.header("Remote-User")) == (200, "alice"), response.body
