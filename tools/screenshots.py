#!/usr/bin/env python3
"""Regenerate the console screenshots in docs/img/console/ for docs/console.md.

Runs the same browser walk as ``tests/test_console_browser.py`` (tests/support/console_browser.py)
against a throw-away slapd, relay (``authgw serve`` with ``chain: [relay]``, which mints the
ticket) and ``authgw serve`` with the console and the link, on free loopback ports, in a
temporary directory, with Debian's ``/usr/bin/chromium``; everything it starts is stopped by
PID at the end.

    /work/venvs/NAME/bin/python tools/screenshots.py [--out docs/img/console]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.console import LongLivedCA, console_conf, console_link  # noqa: E402
from support.console_browser import browser, status_shot, walk  # noqa: E402
from support.gateway import GatewayProcess  # noqa: E402
from support.linkenv import Relay  # noqa: E402
from support.net import free_port  # noqa: E402
from support.slapd import Slapd  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "console")
    args = parser.parse_args()
    from gateway.passwords import hash_password

    with tempfile.TemporaryDirectory(prefix="authgw-screenshots-") as tmp:
        root = Path(tmp)
        slapd = Slapd(root / "slapd", base_dn="dc=corp,dc=example,dc=com", tls=LongLivedCA(),
                      service_password="screenshot-service-password").start()
        gw = None
        relay = Relay(root / "relay", cache=False).setup().start()
        try:
            slapd.add_user("dave", "dave-password", cn="Dave D", mail="dave@corp.example.com")
            conf_dir = root / "conf.d"
            console_conf(conf_dir, free_port(), hash_password("demo-password"), plugins="[console, link]")
            (conf_dir / "link.yaml").write_text("link: {ping_interval: 1.0, backoff_initial: 0.2, backoff_max: 1.0}\n")
            gw = GatewayProcess(conf_dir, root / "state").start()
            with browser() as chromium:
                result = walk(chromium, console_link(gw), slapd, "screenshot-service-password",
                              unreachable_ticket=f"https://127.0.0.1:{free_port()}/p/T-1234",
                              ticket=relay.ticket(), ticket_ca=str(relay.ca_file), shots=args.out)
                # The status page of a gateway running the saved settings, linked, after a few logins.
                gw.stop()
                gw = GatewayProcess(conf_dir, root / "state").start()
                connector = json.loads((gw.state_dir / "link" / "link.json").read_text())["connector"]
                deadline = time.monotonic() + 30
                while connector not in relay.ready_links() and time.monotonic() < deadline:
                    time.sleep(0.2)
                for password in ("dave-password", "wrong-password", "dave-password"):
                    gw.auth("dave", password)
                relay.login("dave", "dave-password")
                time.sleep(3)  # a few pings timed on the live link
                status_shot(chromium, console_link(gw), args.out)
        finally:
            if gw is not None:
                gw.stop()
            relay.stop()
            slapd.stop()
    print(f"wrote {len(list(args.out.glob('console-*.png')))} screenshots to {args.out}; "
          f"final log: {result.green_summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
