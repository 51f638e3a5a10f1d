#!/usr/bin/env python3
"""Regenerate the console screenshots in docs/img/console/ for docs/console.md.

Runs the same browser walk as ``tests/test_console_browser.py`` (tests/support/console_browser.py)
against a throw-away slapd and ``authgw serve`` on free loopback ports, in a temporary directory,
with Debian's ``/usr/bin/chromium``; everything it starts is stopped by PID at the end.

    /work/venvs/NAME/bin/python tools/screenshots.py [--out docs/img/console]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.console import LongLivedCA, console_conf, console_link  # noqa: E402
from support.console_browser import browser, status_shot, walk  # noqa: E402
from support.gateway import GatewayProcess  # noqa: E402
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
        try:
            slapd.add_user("dave", "dave-password", cn="Dave D", mail="dave@corp.example.com")
            conf_dir = root / "conf.d"
            console_conf(conf_dir, free_port(), hash_password("demo-password"))
            gw = GatewayProcess(conf_dir, root / "state").start()
            with browser() as chromium:
                result = walk(chromium, console_link(gw), slapd, "screenshot-service-password",
                              unreachable_ticket=f"https://127.0.0.1:{free_port()}/enroll/T-1234",
                              shots=args.out)
                # The status page of a gateway running the saved settings, after a few logins.
                gw.stop()
                gw = GatewayProcess(conf_dir, root / "state").start()
                for password in ("dave-password", "wrong-password", "dave-password"):
                    gw.auth("dave", password)
                status_shot(chromium, console_link(gw), args.out)
        finally:
            if gw is not None:
                gw.stop()
            slapd.stop()
    print(f"wrote {len(list(args.out.glob('console-*.png')))} screenshots to {args.out}; "
          f"final log: {result.green_summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
