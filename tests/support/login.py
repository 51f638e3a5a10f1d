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

import base64
import contextlib
import datetime as dt
import html
import json
import re
import secrets
import zlib
from pathlib import Path
from urllib.parse import urlencode

import requests

from support.gateway import GatewayProcess, write_conf
from support.net import free_port

__all__ = ["LoginSite", "certificate_listener", "hidden", "site_on_store", "unsigned_authn_request"]


def certificate_listener(directory: Path, ca) -> tuple[dict[str, str], str]:
    """The ``client_cert`` plugin on a TLS listener of its own (a server certificate from *ca*,
    clients of *ca* trusted, a lowercase CN looked up as the user name, no revocation): the
    conf.d file for ``LoginSite(extra=...)``, and the listener's URL."""
    roots = directory / "roots.pem"
    roots.write_bytes(ca.pem)
    cert, key = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True).write(directory, "tls")
    port = free_port()
    settings = {"ca_bundle": str(roots),
                "listener": {"address": f"127.0.0.1:{port}", "certificate": str(cert), "key": str(key)},
                "revocation": {"policy": "off"},
                "mapping": {"lookup": True, "rules": [{"type": "cn", "pattern": "^[a-z]+$"}]}}
    return {"client_cert.yaml": "client_cert: " + json.dumps(settings)}, f"https://localhost:{port}"


def unsigned_authn_request(idp_url: str, issuer: str, body: str) -> str:
    """The URL of an unsigned HTTP-Redirect AuthnRequest from *issuer* to the IdP at *idp_url*,
    with *body* (raw XML, as a hostile or unusual SP would write it) after its Issuer."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    xml = (f'<samlp:AuthnRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
           f'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_{secrets.token_hex(8)}" Version="2.0" '
           f'IssueInstant="{now}" Destination="{idp_url}/saml/sso"><saml:Issuer>{issuer}</saml:Issuer>{body}'
           f'</samlp:AuthnRequest>')
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = base64.b64encode(packer.compress(xml.encode()) + packer.flush()).decode()
    return f"{idp_url}/saml/sso?" + urlencode({"SAMLRequest": data})


@contextlib.contextmanager
def site_on_store(kind: str, base: Path, make_site, sqlite_site):
    """The site of a test parametrised by session store: *sqlite_site* as it is for ``sqlite``;
    for ``redis``, ``make_site(base, sessions=...)`` over a new redis-server in *base*, both
    stopped at the end."""
    if kind == "sqlite":
        yield sqlite_site
        return
    from support.redis import RedisServer

    redis = RedisServer(base / "redis").start()
    try:
        site = make_site(base, sessions={"store": "redis", "redis_url": redis.url})
        try:
            yield site
        finally:
            site.stop()
    finally:
        redis.stop()


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
