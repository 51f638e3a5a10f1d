"""Headless Chromium walks the console set-up against a real slapd and a real ``authgw serve``:
the one-time link works once only; a wrong service password turns test 2 red with its hint;
the right one turns every test green; the saved conf.d passes ``authgw config check``; and,
where the gateway reloads on SIGHUP, a login then works through ``/auth``."""

from __future__ import annotations

import os
import time

import pytest

from support.console import LongLivedCA, console_conf, console_link
from support.console_browser import CHROMIUM, browser, walk
from support.gateway import authgw
from support.net import free_port
from support.slapd import Slapd

pytest.importorskip("playwright")
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is not installed")

SERVICE_PASSWORD = "Svc-Br0wser-4e2d"
DAVE = "Dave-ldap-pa55"


@pytest.fixture(scope="module")
def walked(tmp_path_factory, demo_hash):
    from support.gateway import GatewayProcess

    root = tmp_path_factory.mktemp("browser")
    slapd = Slapd(root / "slapd", tls=LongLivedCA(), service_password=SERVICE_PASSWORD).start()
    slapd.add_user("dave", DAVE, cn="Dave D", mail="dave@example.com")
    conf_dir = root / "conf.d"
    console_conf(conf_dir, free_port(), demo_hash)
    gw = GatewayProcess(conf_dir, root / "state").start()
    try:
        link = console_link(gw)
        with browser() as chromium:
            result = walk(chromium, link, slapd, SERVICE_PASSWORD,
                          unreachable_ticket=f"https://127.0.0.1:{free_port()}/enroll/t1")
        yield gw, result
    finally:
        gw.stop()
        slapd.stop()


def test_the_browser_walks_the_set_up_to_all_green(walked):
    gw, result = walked
    assert result.ticket_error.strip()
    assert not (gw.conf_dir / "link.yaml").exists()
    assert result.failed_statuses["ldap.bind"] == "fail"
    assert result.failed_statuses["ldap.search"] == "skip"
    assert result.failed_statuses["ldap.tcp"] == "pass"
    assert "Test 2: bind" in result.failed_bind_hint and "bind_password" in result.failed_bind_hint
    assert "If this test fails" in result.failed_bind_hint
    assert set(result.green_statuses.values()) == {"pass"}, result.green_statuses
    assert {"ldap.tcp", "ldap.tls", "ldap.bind", "ldap.search"} <= set(result.green_statuses)
    assert result.green_summary.endswith("0 failed")
    assert "used or expired" in result.second_use
    for html in result.pages_html:
        assert SERVICE_PASSWORD not in html
    assert not [e for e in result.console_errors if "Content Security Policy" in e], result.console_errors


def test_the_saved_configuration_passes_config_check(walked):
    gw, _ = walked
    check = authgw("config", "check", "--config", str(gw.conf_dir), "--state-dir", str(gw.state_dir))
    assert check.returncode == 0, check.stderr
    assert "chain: ldap -> static" in check.stdout


def test_a_login_then_works_through_auth(walked):
    gw, _ = walked
    if not (gw.state_dir / "authgw.pid").exists():
        pytest.skip("this gateway does not reload on SIGHUP yet (no <state_dir>/authgw.pid)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and gw.auth("dave", DAVE).status != 200:
        time.sleep(0.2)
    assert gw.auth("dave", DAVE).status == 200
