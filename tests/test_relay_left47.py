"""Relay side, follow-ups of the last review. Real relays (``authgw serve``), real connectors,
slapd and an MIT KDC; connectors that say what the test wants are played by the test with a
certificate the relay issued.

1. A connector whose directory cannot look anyone up (the ldap plugin with ``direct_bind`` and no
   service account) answers every ``lookup_user`` ``found: false``. The relay answered that
   ``None``, and its credential cache took it for "no directory knows the user": a Kerberos
   login at the relay (or a login session's recheck) forgot the password the ``relay`` step had
   proved, so in the next outage of the link that password got 503. A connector may now say so
   (``looked_up: false``), and the relay's ``looks_up_users`` follows what the connector said of
   the lookup just made. The authgw connector does not say it yet: its test (a real connector)
   is marked to fail until it does.
2. The relay's budgets before the registry is read (new links per connector id, requests
   before identification per client address) were per worker process: with ``workers: 2`` a
   client had twice each. Each worker now keeps its share of the relay's budget.

Waits are bounded and wait for events, never for a time to pass.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from gateway.plugins import linkproto as proto
from support.cacheenv import source
from support.gateway import GatewayProcess
from support.linkenv import Connector, NoDirectory, Relay
from support.threedoors import SPN, by_kerberos, by_password, three_door_world
from test_relay_answers import ScriptedConnector, success
from test_relay_left46 import _FLOOD, _get

#: The documented bounds (docs/link-protocol.md), for the relay as a whole.
DIAL_BURST, DIAL_RATE = 20, 1.0
ANONYMOUS_BURST, ANONYMOUS_RATE = 60, 2.0


def rows(relay: Relay) -> int:
    """Rows of the relay's credential cache (its SQLite store)."""
    with sqlite3.connect(relay.state / "cache.sqlite3") as db:
        return db.execute("SELECT count(*) FROM entries").fetchone()[0]


# -- 1. a connector that cannot look users up ------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with three_door_world(tmp_path_factory.mktemp("relaylookup"), ["krbuser"], "relay lookup CA") as world:
        yield world


def kerberos_relay(world, directory) -> Relay:
    """A relay whose chain is ``[kerberos, relay]`` (Kerberos without a directory user required:
    the relay's lookup is asked for the profile) with the credential cache for ``relay``."""
    relay = Relay(directory, env=world["env"], extra="trusted_proxies: [127.0.0.1/32]\n")
    gateway_yaml = (relay.conf / "gateway.yaml").read_text().replace("chain: [relay]", "chain: [kerberos, relay]")
    kerberos = {"allowed_networks": ["127.0.0.3/32"], "keytab": str(world["keytab"]), "service_principal": SPN,
                "realms": ["EXAMPLE.TEST"], "require_directory_user": False}
    (relay.conf / "gateway.yaml").write_text(gateway_yaml)
    (relay.conf / "kerberos.yaml").write_text(json.dumps({"kerberos": kerberos}) + "\n")
    return relay.setup().start()


def test_the_relay_keeps_a_password_when_the_connector_says_it_could_not_look_the_user_up(
        world, tmp_path, monkeypatch):
    """A connector answers a lookup ``found: false, looked_up: false``: its directory could not
    look anyone up. The relay's Kerberos login (its lookup asks the connector) keeps the
    password the ``relay`` step proved; before, the cache forgot it. A connector that does not
    say (an older version) is taken at its word, as before: its ``found: false`` forgets."""
    relay = kerberos_relay(world, tmp_path / "relay")
    enrolled = Connector(tmp_path / "scripted", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    scripted = ScriptedConnector(relay, enrolled).start()
    says: dict = {}  # what the scripted connector adds to a lookup that finds no one
    plain = proto.answer

    def answer(request_id: str, body: dict) -> str:
        return plain(request_id, {**body, **says} if body == {"found": False, "identity": None} else body)

    monkeypatch.setattr(proto, "answer", answer)
    try:
        scripted.wait_linked()
        scripted.answers["krbuser"] = success("krbuser")
        live = by_password(relay.process, "krbuser")
        assert (live.status, source(live)) == (200, "live"), live.body
        assert rows(relay) == 1
        says["looked_up"] = False
        ticket = by_kerberos(world, relay.process, "krbuser")
        assert (ticket.status, ticket.header("Remote-User")) == (200, "krbuser")
        assert rows(relay) == 1, "a lookup the connector said it could not make forgot the cached password"
        says.clear()
        ticket = by_kerberos(world, relay.process, "krbuser")
        assert (ticket.status, ticket.header("Remote-User")) == (200, "krbuser")
        assert rows(relay) == 0, "a connector's plain found: false no longer forgets a deleted account"
    finally:
        scripted.stop()
        relay.stop()


def test_a_kerberos_login_at_the_relay_keeps_the_password_a_direct_bind_connector_proved(world, tmp_path):
    """The connector binds as the user (``direct_bind``, no service account) and so cannot look
    anyone up. A password login through the relay is cached there; a Kerberos login at the relay
    asks the connector for the profile and gets ``found: false``. Before, the relay's cache took
    that for a deleted account and forgot the password, and with the connector gone the
    password got 503. Now the row stays and the password is answered offline."""
    slapd = world["slapd"]
    ldap = slapd.plugin_settings("plain", backoff=0, direct_bind=f"uid={{username}},{slapd.users_dn}")
    for key in ("bind_dn", "bind_password"):
        ldap.pop(key)
    relay = kerberos_relay(world, tmp_path / "relay")
    connector = Connector(tmp_path / "c1", slapd)
    (connector.conf / "ldap.yaml").write_text("ldap: " + json.dumps(ldap) + "\n")
    connector.enroll(relay.ticket(), relay.ca_file).start()
    try:
        connector.wait_linked(relay)
        live = by_password(relay.process, "krbuser")
        assert (live.status, source(live)) == (200, "live"), live.body
        assert rows(relay) == 1
        ticket = by_kerberos(world, relay.process, "krbuser")
        assert (ticket.status, ticket.header("Remote-User")) == (200, "krbuser"), relay.process.output()[-2000:]
        assert rows(relay) == 1, "a lookup the connector's directory cannot make forgot the cached password"
        connector.stop()
        offline = by_password(relay.process, "krbuser")
        assert (offline.status, source(offline)) == (200, "cache"), (offline.status, relay.process.output()[-2000:])
    finally:
        connector.stop()
        relay.stop()


# -- 2. the budgets before the registry is read, with two workers ---------------------------------


def two_worker_relay(directory) -> Relay:
    """A relay (no cache) served by two worker processes (``workers: 2``, which the relay
    plugin reads, and ``--workers 2``), which accept from the relay listener's one socket."""
    relay = Relay(directory, cache=False, extra="workers: 2\n").setup()
    relay.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    relay.process = GatewayProcess(relay.conf, relay.state, env=relay.env, workers=2).start()
    return relay


def test_requests_before_identification_are_bounded_per_address_across_workers(tmp_path):
    """A client address makes a burst of requests before identification, then two a second,
    at the relay, not at each worker: with ``workers: 2`` one address had 60 at each (100
    ``GET /p/TOKEN`` in a row were all looked up, none refused). Now the two workers together
    look up at most the burst and the rate, and the rest are refused (429)."""
    relay = two_worker_relay(tmp_path / "relay")
    try:
        url = f"{relay.url}/p/{'A' * 43}"
        started = time.monotonic()
        statuses = [_get(url, relay.ca_file) for _ in range(ANONYMOUS_BURST + 40)]
        looked_up = ANONYMOUS_BURST + ANONYMOUS_RATE * (time.monotonic() - started) + 1
        assert set(statuses) <= {404, 429}, statuses
        assert statuses.count(404) <= looked_up and 429 in statuses, (statuses.count(404), looked_up)
        # Which worker accepts a connection is the kernel's race on the one listening socket (one
        # worker may take them all: then it looked up at most its share): the bound holds either
        # way, and the shares are pinned below.
    finally:
        relay.stop()


def test_each_worker_holds_its_share_of_a_budget():
    """The shares the two-worker test above relies on, on a clock the test moves: a worker of two
    holds half of each burst and rate, at least one token; the workers together the budget."""
    from gateway.plugins.relay.hub import DialBudgets

    now = [0.0]
    halves = [DialBudgets(ANONYMOUS_BURST, ANONYMOUS_RATE, lambda: now[0], workers=2) for _ in range(2)]
    assert [sum(budgets.take("198.51.100.7") for _ in range(ANONYMOUS_BURST)) for budgets in halves] == [30, 30]
    now[0] += 1.0  # a second: the rate's half each
    assert [sum(budgets.take("198.51.100.7") for _ in range(10)) for budgets in halves] == [1, 1]
    lone = DialBudgets(1, 0.5, lambda: now[0], workers=4)  # a share is never below one token
    assert lone.take("198.51.100.8") and not lone.take("198.51.100.8")


def test_a_connector_dialling_in_a_loop_is_bounded_across_workers(tmp_path):
    """New links per connector id: a burst, then one a second, at the relay. With ``workers: 2``
    a connector dialling in a loop had the burst and the rate at each worker (about twice the
    links). Now the two workers together admit at most the burst and the rate."""
    relay = two_worker_relay(tmp_path / "relay")
    hostile = Connector(tmp_path / "evil", NoDirectory()).enroll(relay.ticket(), relay.ca_file)
    flood = None
    try:
        link = hostile.state / "link"
        started = time.monotonic()
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, str(relay.port), str(relay.ca_file),
                                  str(link / "cert.pem"), str(link / "key.pem"), "4", "8"],
                                 stdout=subprocess.PIPE, text=True)
        counts = json.loads(flood.communicate(timeout=60)[0])
        elapsed = time.monotonic() - started
        assert sum(counts.values()) > 3 * DIAL_BURST, counts  # a flood it was
        allowed = DIAL_BURST + DIAL_RATE * elapsed + 2
        assert counts.get("101", 0) <= allowed, (counts, elapsed)
        assert counts.get("429", 0) >= sum(counts.values()) - allowed, counts
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        relay.stop()
