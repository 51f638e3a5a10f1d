"""Issue 13, step 4: certificates with lifetimes of seconds. A linked connector renews over the
live link at two thirds of the lifetime with no failed login; an expired one says "re-enrol
with a new ticket" (log and ``authgw check``) and the relay refuses its certificate."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from cryptography import x509

from support.linkenv import Connector, Relay
from support.net import wait_for
from support.slapd import Slapd


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A")
    yield server
    server.stop()


def _serial(connector: Connector) -> int:
    return x509.load_pem_x509_certificate((connector.state / "link" / "cert.pem").read_bytes()).serial_number


def test_renewal_over_the_live_link_loses_no_login(tmp_path, slapd):
    lifetime = 24.0  # room for a slow start (a loaded machine took over 15 s): it must link before the end
    relay = Relay(tmp_path / "relay", certificate_lifetime=lifetime, cache=False).setup().start()
    connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file)
    first = _serial(connector)
    enrolled = time.monotonic()
    try:
        connector.start().wait_linked(relay)
        statuses = []
        # logins across the renewal (at 2/3) and past the first certificate's end
        while time.monotonic() - enrolled < 1.3 * lifetime and len(statuses) < 300:
            statuses.append(relay.login("alice", "Alice-Passw0rd").status)
            time.sleep(0.1)
        assert statuses and set(statuses) == {200}
        assert _serial(connector) != first
        assert "certificate renewed over the link" in connector.process.output()
        assert "renewed its certificate" in relay.process.output()
        assert connector.connector_id in relay.ready_links()
    finally:
        connector.stop()
        relay.stop()


def test_an_expired_certificate_asks_for_a_new_ticket(tmp_path, slapd):
    relay = Relay(tmp_path / "relay", certificate_lifetime=2.0, cache=False).setup().start()
    try:
        connector = Connector(tmp_path / "c1", slapd).enroll(relay.ticket(), relay.ca_file)
        time.sleep(2.5)
        check = connector.cli("check")
        assert check.returncode == 1
        assert "FAIL  link.enrolment" in check.stdout and "re-enrol with a new ticket" in check.stdout
        connector.start()
        wait_for(lambda: "re-enrol with a new ticket" in connector.process.output(), 10,
                 what="the connector to ask for a new ticket", log=connector.process.output)
        assert relay.ready_links() == ""
        assert relay.login("alice", "Alice-Passw0rd").status == 503

        # presented anyway, the relay's TLS refuses it (and stays healthy)
        async def dial():
            context = connector_context(connector, relay)
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"wss://127.0.0.1:{relay.port}/link", ssl=context):
                    pass

        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            asyncio.run(dial())
        assert relay.process.get("/healthz").status == 200
        connector.stop()
        # a new ticket brings it back
        connector.enroll(relay.ticket(), relay.ca_file)
        relay.stop()
    finally:
        relay.stop()


def connector_context(connector, relay):
    import ssl

    context = ssl.create_default_context(cafile=str(relay.ca_file))
    link = connector.state / "link"
    context.load_cert_chain(str(link / "cert.pem"), str(link / "key.pem"))
    return context
