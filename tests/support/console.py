"""Helpers for the console tests: a gateway with ``plugins: [console]`` and a small browser-like
client (cookie jar, CSRF token from the last page) over :mod:`support.http`.

    files = console_conf(conf_dir, port, demo_hash)       # chain [static], console on PORT
    gw = start_gateway(conf_dir)
    link = console_link(gw)                                # `authgw console` for that gateway
    client = SessionClient(f"http://127.0.0.1:{port}")
    client.sign_in(link)                                   # one-time login, the session's path
    page = client.get("/setup"); client.post_form("/setup/directory", {...})
"""

from __future__ import annotations

import re
import uuid
from urllib.parse import urlencode, urlsplit

from support.gateway import authgw, write_conf
from support.http import Response, request
from support.net import free_port, wait_for

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def console_conf(conf_dir, port: int, demo_hash: str, *, chain: str = "[static]", extra: str = "",
                 audit: str | None = None, plugins: str = "[console]") -> None:
    """conf.d with the demo user alice, the console on *port*, and the audit log in a file
    beside conf.d (or *audit*, e.g. ``-`` for standard error)."""
    write_conf(conf_dir, {
        "gateway.yaml": f"chain: {chain}\nplugins: {plugins}\nthrottle:\n  enabled: false\n"
                        f"audit:\n  file: \"{audit or conf_dir.parent / 'audit.log'}\"\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "console.yaml": f"console:\n  listen: 127.0.0.1:{port}\n{extra}",
        "users/users.yaml": f'users:\n  alice:\n    password_hash: "{demo_hash}"\n',
    })


def console_link(gw) -> str:
    result = authgw("console", "--config", str(gw.conf_dir), "--state-dir", str(gw.state_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def link_path(link: str) -> str:
    return urlsplit(link).path


class ConsoleClient:
    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def _send(self, method: str, path: str, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> Response:
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = request(self.base, method, path, headers, body=body)
        for cookie in response.all("Set-Cookie"):
            name, _, rest = cookie.partition("=")
            value = rest.split(";", 1)[0]
            if value and "Max-Age=0" not in cookie:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        found = CSRF.search(response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return self._send("GET", path, headers)

    def post_form(self, path: str, fields: dict[str, str], *, csrf: bool = True,
                  headers: dict[str, str] | None = None) -> Response:
        data = {**({"csrf": self.csrf} if csrf else {}), **fields}
        return self._send("POST", path, {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
                          urlencode(data).encode())

    def post_multipart(self, path: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]] = {}) -> Response:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in {"csrf": self.csrf, **fields}.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, data) in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self._send("POST", path, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body)

    def wait_run(self, location: str, timeout: float = 60.0) -> dict:
        """Poll the configuration log's JSON until the run at *location* (``/log/RUN...``) ends."""
        run = urlsplit(location).path.rsplit("/", 1)[1]
        return wait_for(lambda: (data := self.get(f"/api/log/{run}").json())["finished"] and data, timeout,
                        interval=0.2, what=f"run {run} to finish", error=TimeoutError)


class LongLivedCA:
    """A test CA whose server certificates live a year, so the directory's TLS self-test passes
    instead of warning about an expiry within 30 days (the suite's default is 7 days)."""

    def __init__(self) -> None:
        from support.pki import CA

        self.ca = CA.create(days=400)
        self.pem = self.ca.pem

    def issue(self, *args, **kwargs):
        import datetime as dt

        kwargs.setdefault("not_after", dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365))
        return self.ca.issue(*args, **kwargs)


class SessionClient(ConsoleClient):
    """A :class:`ConsoleClient` that, once signed in, sends a page's plain path (``/setup``)
    below its session's secret prefix (``/s/<token>/setup``), as the console's own links do.
    Paths that already name a prefix, the login links and the static files go as they are."""

    prefix = ""

    def sign_in(self, link: str) -> str:
        response = self.get(link_path(link))
        location = response.header("Location") or ""
        assert response.status == 303 and re.fullmatch(r"/s/[A-Za-z0-9_-]{43}/setup", location), location
        self.prefix = location.removesuffix("setup")
        assert self.get("/setup").status == 200
        return self.prefix

    def _send(self, method, path, headers=None, body=None):
        if self.prefix and path.startswith("/") and not path.startswith(("/s/", "/login/", "/static/")):
            path = self.prefix + path[1:]
        return super()._send(method, path, headers, body)


def signed_in(gw, base: str) -> SessionClient:
    client = SessionClient(base)
    client.sign_in(console_link(gw))
    return client


def console_session(conf_dir, demo_hash: str, start_gateway):
    """A gateway with the console on a free port (:func:`console_conf`), started, and a client
    signed in to it: ``(gateway, client)``."""
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    gw = start_gateway(conf_dir)
    return gw, signed_in(gw, f"http://127.0.0.1:{port}")
