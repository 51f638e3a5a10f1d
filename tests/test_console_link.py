"""The status page shows the link as the connector sees it, through a real relay (``authgw
serve`` with ``chain: [relay]``) and a real connector (``authgw serve`` with the console and the
link): the relay it is linked to, the WebSocket ping round trip, both certificates' ends, and
a warning when the connector's certificate ends within ``certificate_warning_days``."""

from __future__ import annotations

import html
import re

import pytest
from cryptography import x509

from support.console import SessionClient, console_conf, console_link
from support.net import free_port, wait_for

linkenv = pytest.importorskip("support.linkenv")

DAY = 86400.0


def _row(page: str, name: str) -> tuple[str, str, str]:
    """(class, state, detail text) of the components table's row for *name*."""
    found = re.search(r'<tr class="(\w+)"><td>\w+</td><td>' + re.escape(name) + r"</td>\s*<td>(\w+)</td>\s*"
                      r"<td>(.*?)</td></tr>", page, re.S)
    assert found, f"no row for {name}"
    return found.group(1), found.group(2), html.unescape(re.sub(r"<[^>]+>", " ", found.group(3)))


def _linked_status(client: SessionClient, timeout: float = 30.0) -> str:
    def linked() -> str | None:
        page = client.get("/status").text
        return page if "round trip" in page and "link.relay_certificate" in page else None

    return wait_for(linked, timeout, interval=0.2, what="the status page to show a linked relay",
                    log=lambda: client.get("/status").text)


@pytest.mark.parametrize("lifetime_days, warned", [(5.0, True), (90.0, False)])
def test_the_status_page_shows_round_trip_and_certificate_ends(lifetime_days, warned, conf_dir, demo_hash,
                                                               start_gateway, tmp_path):
    relay = linkenv.Relay(tmp_path / "relay", certificate_lifetime=lifetime_days * DAY, cache=False).setup().start()
    try:
        port = free_port()
        console_conf(conf_dir, port, demo_hash, plugins="[console, link]")
        (conf_dir / "link.yaml").write_text("link: {ping_interval: 0.5, backoff_initial: 0.2, backoff_max: 1.0}\n")
        gw = start_gateway(conf_dir)
        client = SessionClient(f"http://127.0.0.1:{port}")
        client.sign_in(console_link(gw))
        enrolled = client.post_form("/setup/ticket", {"ticket_url": relay.ticket(), "ticket_ca": str(relay.ca_file)})
        assert enrolled.status == 200, enrolled.text

        page = _linked_status(client)
        connector = x509.load_pem_x509_certificate((gw.state_dir / "link" / "cert.pem").read_bytes())
        link_json = (gw.state_dir / "link" / "link.json").read_text()
        connector_id = re.search(r'"connector": "([^"]+)"', link_json).group(1)

        css, state, detail = _row(page, "link.relay")
        assert (css, state) == ("pass", "up")
        assert f"linked to wss://127.0.0.1:{relay.port}/link as {connector_id}" in detail
        round_trip = float(re.search(r"round trip (\d+\.\d) ms", detail).group(1))
        assert round_trip >= 0.0

        until = connector.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        css, state, detail = _row(page, "link.certificate")
        assert f"connector certificate valid until {until}" in detail
        days_left = float(re.search(r"\((\d+\.\d) days left\)", detail).group(1))
        assert lifetime_days - 0.1 <= days_left <= lifetime_days

        css_relay, state_relay, detail_relay = _row(page, "link.relay_certificate")
        assert (css_relay, state_relay) == ("pass", "up")  # the relay's listener certificate lives a year
        assert "relay certificate CN=127.0.0.1" in detail_relay and "valid until" in detail_relay
        assert 'id="expiry-link.relay_certificate"' not in page

        if warned:
            assert (css, state) == ("warn", "expiring")
            warning = re.search(r'<p class="warning" id="expiry-link.certificate">(.*?)</p>', page, re.S)
            assert warning, page
            assert f"expires in {lifetime_days - 0.05:.1f} days" in warning.group(1) or \
                f"expires in {lifetime_days:.1f} days" in warning.group(1)
            assert until in warning.group(1) and "authgw link enroll" in warning.group(1)
        else:
            assert (css, state) == ("pass", "up")
            assert 'class="warning"' not in page
    finally:
        relay.stop()
