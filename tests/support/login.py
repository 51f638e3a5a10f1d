"""A gateway with the ``login`` plugin in front of a real slapd, for the login front-door tests.

::

    site = LoginSite(tmp_path, slapd, ca, saml={...}, gateway={...}, login={...})
    gw = site.start()             # a GatewayProcess; its HTTPS login listener is site.url
    browser = site.client()       # a requests.Session that trusts the test CA and keeps cookies
    page = site.sign_in(browser, "alice", "pw")       # GET /login, then POST the form with its CSRF token
    site.hidden(page.text, "SAMLResponse")             # a hidden form field's value

The login listener's certificate (from *ca*) names ``localhost`` and ``127.0.0.1``.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import requests

from support.gateway import GatewayProcess, write_conf
from support.net import free_port

__all__ = ["LoginSite", "hidden"]


def hidden(page: str, name: str) -> str | None:
    match = re.search(rf'<input type="hidden" name="{re.escape(name)}" value="([^"]*)"', page)
    return html.unescape(match.group(1)) if match else None


class LoginSite:
    def __init__(self, tmp_path: Path, slapd, ca, *, login: dict | None = None, gateway: dict | None = None,
                 host: str = "localhost", env: dict | None = None, extra: dict[str, str] | None = None) -> None:
        self.dir = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = host
        self.url = f"https://{host}:{self.port}"
        self.ca_file = tmp_path / "ca.pem"
        self.ca_file.write_bytes(ca.pem)
        self.server_cert = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True)
        cert, key = self.server_cert.write(tmp_path, "login")
        settings = {"base_url": self.url, "listener": {"address": f"127.0.0.1:{self.port}", "certificate": str(cert),
                                                       "key": str(key)}}
        settings.update(login or {})
        core = {"chain": ["ldap"], "plugins": ["login"], "throttle": {"enabled": False}}
        core.update(gateway or {})
        self.conf = write_conf(tmp_path / "conf.d", {
            "gateway.yaml": json.dumps(core),
            "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain")),
            "login.yaml": "login: " + json.dumps(settings), **(extra or {})})
        self.env = env
        self.processes: list[GatewayProcess] = []

    def start(self, state: Path | None = None, workers: int = 1) -> GatewayProcess:
        gw = GatewayProcess(self.conf, state or self.dir / f"state{len(self.processes)}", env=self.env, workers=workers)
        self.processes.append(gw)
        return gw.start()

    def stop(self) -> None:
        for gw in self.processes:
            gw.stop()

    def client(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # else REQUESTS_CA_BUNDLE would win over verify, and proxies apply
        session.verify = str(self.ca_file)
        return session

    def sign_in(self, browser: requests.Session, username: str, password: str, url: str | None = None,
                **kw) -> requests.Response:
        page = browser.get(url or f"{self.url}/login", timeout=15)
        form = {"csrf": hidden(page.text, "csrf"), "username": username, "password": password}
        if hidden(page.text, "req"):
            form["req"] = hidden(page.text, "req")
        return browser.post(f"{self.url}/login", data=form, timeout=15, **kw)
