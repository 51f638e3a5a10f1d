"""A relay and its connectors as real ``authgw serve`` processes (issue 13 tests, bench_link).

API::

    relay = Relay(tmp_path / "relay", connection="acme").setup()   # CLI: connection add (makes the CA)
    relay.start()                       # authgw serve with chain [relay], plugins [cache]
    url = relay.ticket()                # authgw relay ticket acme -> https://127.0.0.1:PORT/p/TOKEN
    relay.ca_file                       # the relay CA (what `--ca` is given on enrolment)
    relay.cli("connectors")             # any `authgw relay ...` against its conf and state
    relay.login(user, pw)               # POST /v1/authenticate with the API token -> Response

    conn = Connector(tmp_path / "c1", slapd).enroll(url, relay.ca_file)   # `authgw link enroll`
    conn.start(); conn.wait_linked(relay)   # until the relay's /readyz lists it
    conn.listening_ports()              # TCP ports the process listens on (only its --listen one)

Everything is stopped by PID by :meth:`stop` (fixtures call it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import ssl
from pathlib import Path

from support.gateway import GatewayProcess, authgw, write_conf
from support.http import Response, request
from support.net import free_port, wait_for
from support.redis import RedisServer

__all__ = ["Connector", "NoDirectory", "Relay", "listening_ports", "relays_sharing_redis"]


class NoDirectory:
    """Stands in for a slapd in :class:`Connector`: a conf.d whose directory is nowhere (enrolment
    and the link need none; no login is made)."""

    def plugin_settings(self, mode, **overrides):
        return {"preset": "openldap", "base_dn": "dc=example,dc=com", "servers": ["ldap://127.0.0.1:9"],
                "insecure": True, "direct_bind": "uid={username},ou=people,dc=example,dc=com", **overrides}


def link_tls(relay: "Relay", identity: "Connector | None" = None) -> ssl.SSLContext:
    """A client TLS context for *relay*'s listener: its CA, and *identity*'s enrolled link
    certificate when given (a connector played by a test)."""
    context = ssl.create_default_context(cafile=str(relay.ca_file))
    if identity is not None:
        link = identity.state / "link"
        context.load_cert_chain(str(link / "cert.pem"), str(link / "key.pem"))
    return context


class Relay:
    def __init__(self, directory: Path, *, connection: str = "acme", cache: bool = True,
                 certificate_lifetime: float | None = None, extra: str = "", env: dict | None = None,
                 plugins: tuple[str, ...] = (), redis_url: str | None = None,
                 settings: dict | None = None, cache_settings: dict | None = None) -> None:
        self.directory = directory
        self.connection = connection
        self.conf = directory / "conf.d"
        self.state = directory / "state"
        self.port = free_port()
        self.token = "agw_" + secrets.token_urlsafe(24)
        self.env = env or {}
        digest = hashlib.sha256(self.token.encode()).hexdigest()
        relay = {"connection": connection, "listen": f"127.0.0.1:{self.port}",
                 "public_url": f"https://127.0.0.1:{self.port}", "ping_interval": 1.0, **(settings or {})}
        if certificate_lifetime is not None:
            relay["certificate_lifetime"] = certificate_lifetime
        if redis_url is not None:
            relay["redis"] = {"url": redis_url}
        files = {
            "gateway.yaml": f"chain: [relay]\nplugins: [{', '.join((['cache'] if cache else []) + list(plugins))}]\n"
                            "throttle: {enabled: false}\n"
                            f"api_tokens:\n  - name: tests\n    sha256: {digest}\n{extra}",
            "relay.yaml": "relay: " + json.dumps(relay) + "\n",
        }
        if cache:
            files["cache.yaml"] = "cache: " + json.dumps({"methods": ["relay"], **(cache_settings or {})}) + "\n"
        write_conf(self.conf, files)
        self.process: GatewayProcess | None = None

    @property
    def ca_file(self) -> Path:
        return self.state / "relay" / "ca" / "ca.crt"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def cli(self, *args: str):
        return authgw(*args, "--config", str(self.conf), "--state-dir", str(self.state), env=self.env)

    def setup(self) -> Relay:
        result = self.cli("relay", "connection", "add", self.connection)
        assert result.returncode == 0, result.stderr
        return self

    def start(self) -> Relay:
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.process = GatewayProcess(self.conf, self.state, env=self.env).start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def ticket(self, *extra: str) -> str:
        result = self.cli("relay", "ticket", self.connection, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def login(self, username: str, password: str) -> Response:
        body = json.dumps({"username": username, "password": password}).encode()
        return self.process.post("/v1/authenticate", body, {"Authorization": f"Bearer {self.token}",
                                                            "Content-Type": "application/json"})

    def ready_links(self) -> str:
        component = [c for c in self.process.get("/readyz").json()["components"] if c["name"].startswith("relay.")]
        return component[0]["detail"] if component and component[0]["ready"] else ""


@contextlib.contextmanager
def relays_sharing_redis(base: Path, names: tuple[str, ...] = ("a", "b")):
    """Relay instances of one connection (no cache) sharing a new Redis, started in *base*:
    ``(relays, redis)``, all stopped at the end."""
    redis = RedisServer(base / "redis").start()
    started = []
    try:
        for name in names:
            started.append(Relay(base / f"relay-{name}", cache=False, redis_url=redis.url).setup().start())
        yield started, redis
    finally:
        for relay in started:
            relay.stop()
        redis.stop()


class Connector:
    def __init__(self, directory: Path, slapd, *, env: dict | None = None, link: dict | None = None,
                 cache: dict | None = None, throttle: bool = False) -> None:
        self.directory = directory
        self.conf = directory / "conf.d"
        self.state = directory / "state"
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env = env or {}
        settings = {"backoff_initial": 0.2, "backoff_max": 2.0, "ping_interval": 1.0, **(link or {})}
        files = {
            "gateway.yaml": f"chain: [ldap]\nplugins: [link{', cache' if cache is not None else ''}]\n"
                            f"throttle: {{enabled: {str(throttle).lower()}}}\n",
            "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain", backoff=0)) + "\n",
            "link.yaml": "link: " + json.dumps(settings) + "\n",
        }
        if cache is not None:  # the connector's own credential cache (cache.yaml)
            files["cache.yaml"] = "cache: " + json.dumps(cache) + "\n"
        write_conf(self.conf, files)
        self.process: GatewayProcess | None = None
        self.connector_id: str | None = None

    def cli(self, *args: str):
        return authgw(*args, "--config", str(self.conf), "--state-dir", str(self.state), env=self.env)

    def enroll(self, url: str, ca_file: Path | None) -> Connector:
        result = self.cli("link", "enroll", url, *(["--ca", str(ca_file)] if ca_file else []))
        assert result.returncode == 0, result.stderr
        self.connector_id = json.loads((self.state / "link" / "link.json").read_text())["connector"]
        return self

    def start(self) -> Connector:
        self.process = GatewayProcess(self.conf, self.state, env=self.env).start()
        return self

    def stop(self, **kw) -> None:
        if self.process is not None:
            self.process.stop(**kw)

    def wait_linked(self, relay: Relay, timeout: float = 20.0) -> Connector:
        wait_for(lambda: self.connector_id in relay.ready_links(), timeout, what=f"{self.connector_id} to link",
                 log=self.process.output)
        return self

    def listening_ports(self) -> set[int]:
        return listening_ports(self.process.proc.pid)


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state on sockets the process holds (from /proc, no tools needed)."""
    inodes = set()
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in (Path("/proc/net") / table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def linked_site(tmp_path: Path, slapd, probe: tuple[str, dict[str, str], dict[str, str]],
                names: tuple[str, ...] = ("c1", "c2")):
    """For a module fixture (``yield from``): a relay with a probe plugin (``make_dist``'s
    distribution name, entry points, files) and connectors to *slapd*, enrolled and linked;
    yields ``(relay, connectors)`` and stops them all at the end."""
    from support.fakedist import make_dist

    dist, entry_points, files = probe
    site_packages = make_dist(tmp_path / "site-packages", dist, entry_points, files)
    relay = Relay(tmp_path / "relay", plugins=tuple(entry_points),
                  env={"PYTHONPATH": str(site_packages)}).setup().start()
    connectors = []
    try:
        for name in names:
            connectors.append(Connector(tmp_path / name, slapd).enroll(relay.ticket(), relay.ca_file).start())
        for connector in connectors:
            connector.wait_linked(relay)
        yield relay, connectors
    finally:
        for connector in connectors:
            connector.stop()
        relay.stop()
