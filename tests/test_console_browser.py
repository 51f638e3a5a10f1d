"""Headless Chromium walks the console set-up against a real slapd, a real relay (``authgw
serve`` with ``chain: [relay]``) and a real ``authgw serve`` with the console and the link: the
one-time link works once only; an unreachable ticket URL says so, a ticket minted by the relay
enrols the connector; a wrong service password turns test 2 red with its hint; the right one
turns every test green, test 4 (the cloud link) included; the saved conf.d passes ``authgw
config check``; and after the reload a login works through ``/auth`` and through the relay."""

from __future__ import annotations

import json
import os

import pytest

from support.console import LongLivedCA, console_conf, console_link
from support.console_browser import CHROMIUM, browser, walk
from support.gateway import authgw
from support.net import free_port, wait_for
from support.slapd import Slapd

pytest.importorskip("playwright")
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is not installed")

SERVICE_PASSWORD = "Svc-Br0wser-4e2d"
DAVE = "Dave-ldap-pa55"


@pytest.fixture(scope="module")
def walked(tmp_path_factory, demo_hash):
    from support.gateway import GatewayProcess

    from support.linkenv import Relay

    root = tmp_path_factory.mktemp("browser")
    slapd = Slapd(root / "slapd", tls=LongLivedCA(), service_password=SERVICE_PASSWORD).start()
    slapd.add_user("dave", DAVE, cn="Dave D", mail="dave@example.com")
    relay = Relay(root / "relay", cache=False).setup().start()
    conf_dir = root / "conf.d"
    console_conf(conf_dir, free_port(), demo_hash, plugins="[console, link]")
    (conf_dir / "link.yaml").write_text("link: {ping_interval: 1.0, backoff_initial: 0.2, backoff_max: 1.0}\n")
    gw = GatewayProcess(conf_dir, root / "state").start()
    try:
        link = console_link(gw)
        with browser() as chromium:
            result = walk(chromium, link, slapd, SERVICE_PASSWORD,
                          unreachable_ticket=f"https://127.0.0.1:{free_port()}/p/unreachable-ticket-token-1",
                          ticket=relay.ticket(), ticket_ca=str(relay.ca_file))
        yield gw, relay, result
    finally:
        gw.stop()
        relay.stop()
        slapd.stop()


def test_the_browser_walks_the_set_up_to_all_green(walked):
    gw, relay, result = walked
    assert "cannot reach the relay" in result.ticket_error, result.ticket_error
    assert "enrolled" in result.ticket_enrolled, result.ticket_enrolled
    assert result.ticket_enrolled_class == "ok", result.ticket_enrolled
    connector = json.loads((gw.state_dir / "link" / "link.json").read_text())["connector"]
    assert connector in relay.cli("relay", "connectors").stdout
    assert result.failed_statuses["ldap.bind"] == "fail"
    assert result.failed_statuses["ldap.search"] == "skip"
    assert result.failed_statuses["ldap.tcp"] == "pass"
    assert "Test 2: bind" in result.failed_bind_hint and "bind_password" in result.failed_bind_hint
    assert "If this test fails" in result.failed_bind_hint
    assert set(result.green_statuses.values()) == {"pass"}, result.green_statuses
    assert {"ldap.tcp", "ldap.tls", "ldap.bind", "ldap.search"} <= set(result.green_statuses)
    assert {"link.enrolment", "link.tcp", "link.tls", "link.link"} <= set(result.green_statuses)
    assert "Test 4: cloud link" in result.green_link_label
    assert result.green_summary.endswith("0 failed")
    assert "used or expired" in result.second_use
    for html in result.pages_html:
        assert SERVICE_PASSWORD not in html
    assert not [e for e in result.console_errors if "Content Security Policy" in e], result.console_errors


def test_the_saved_configuration_passes_config_check(walked):
    gw, _, _ = walked
    check = authgw("config", "check", "--config", str(gw.conf_dir), "--state-dir", str(gw.state_dir))
    assert check.returncode == 0, check.stderr
    assert "chain: ldap -> static" in check.stdout


def test_a_login_then_works_through_auth_and_through_the_relay(walked):
    gw, relay, _ = walked
    assert (gw.state_dir / "authgw.pid").exists()  # the console's SIGHUP reload needs it
    wait_for(lambda: gw.auth("dave", DAVE).status == 200, 30, interval=0.2, what="dave's login", log=gw.output)
    assert gw.auth("dave", "not-daves-password").status == 401
    # the cloud side: the relay asks this connector over the link, which runs the saved chain
    def outcome(password: str) -> tuple[str, str, str]:
        answer = relay.login("dave", password)
        body = answer.json() if answer.status == 200 else {}
        return body.get("outcome", f"HTTP {answer.status}"), body.get("reason", ""), body.get("step", "")

    wait_for(lambda: outcome(DAVE)[0] == "success", 30, interval=0.2, what="dave's login through the relay")
    assert outcome(DAVE) == ("success", "", "relay")
    assert outcome("not-daves-password") == ("invalid_credentials", "ldap.invalid_password", "relay")
