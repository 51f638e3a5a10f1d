"""What the link trusts for the relay's certificate (plugins/link/state.py, enroll.py).

A connector enrolled without ``--ca`` verified the relay with the system's CAs. Its link used to
trust those as well as the relay CA, so any CA of the host's store (a TLS-inspecting proxy's, on
many company machines) could stand in for the relay: the connector linked to an impostor and
answered its look-ups and password checks (review of issue 13). When the relay's certificate at
enrolment is its CA's (the relay's default) the link now trusts that CA alone.

The host's store is played by ``SSL_CERT_FILE`` (OpenSSL's default file); real processes, real
TLS, 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

from aiohttp import web

from gateway.passwords import hash_password
from support.gateway import GatewayProcess, authgw, static_users, write_conf
from support.linkenv import Relay
from support.net import wait_for
from support.pki import CA, write_bundle


def _connector(directory: Path) -> tuple[Path, Path]:
    conf, state = directory / "conf.d", directory / "state"
    state.mkdir(mode=0o700, parents=True)
    write_conf(conf, {"gateway.yaml": "chain: [static]\nplugins: [link]\nthrottle: {enabled: false}\n",
                      "link.yaml": "link: {backoff_initial: 0.2, backoff_max: 0.5, ping_interval: 1.0}\n",
                      **static_users({"alice": hash_password("Alice-Passw0rd")})})
    return conf, state


def _enroll(conf: Path, state: Path, url: str, env: dict[str, str]) -> dict:
    result = authgw("link", "enroll", url, "--config", str(conf), "--state-dir", str(state), env=env)  # no --ca
    assert result.returncode == 0, result.stderr
    return {"stdout": result.stdout, **json.loads((state / "link" / "link.json").read_text())}


class _Impostor:
    """A WebSocket server at the relay's address with a certificate of another CA the host
    trusts; counts the links that reach it (past TLS)."""

    def __init__(self, port: int, cert: str, key: str) -> None:
        self.port, self.cert, self.key = port, cert, key
        self.hellos = 0

    async def serve(self, until) -> None:
        async def link(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self.hellos += 1  # an answer is not needed: reaching here is the failure
            await ws.close()
            return ws

        app = web.Application()
        app.router.add_get("/link", link)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=context).start()
        try:
            for _ in range(200):  # at most 20 s
                if until():
                    return
                await asyncio.sleep(0.1)
        finally:
            await runner.cleanup()


def _linked(conf: Path, state: Path, env: dict[str, str], relay: Relay, connector_id: str) -> GatewayProcess:
    """``authgw serve`` of the connector, once the relay lists its link (stopped if it never does)."""
    connector = GatewayProcess(conf, state, env=env).start()
    try:
        wait_for(lambda: connector_id in relay.ready_links(), 20, what="the link", log=connector.output)
    except BaseException:
        connector.stop()
        raise
    return connector


def test_a_relay_ca_certificate_pins_the_link_to_the_relay_ca(tmp_path):
    inspection = CA.create("Corporate TLS inspection CA")
    relay = Relay(tmp_path / "relay", cache=False).setup()
    connector = None
    try:
        relay.start()
        system_store = tmp_path / "system.pem"
        system_store.write_bytes(relay.ca_file.read_bytes() + inspection.pem)
        env = {"SSL_CERT_FILE": str(system_store)}
        conf, state = _connector(tmp_path / "c1")
        enrolment = _enroll(conf, state, relay.ticket(), env)
        assert enrolment["pinned"] is True and "pinned" in enrolment["stdout"]
        connector = _linked(conf, state, env, relay, enrolment["connector"])
        relay.stop()  # someone else answers at the relay's address now (DNS, a route, a proxy)
        cert, key = inspection.issue("relay", ips=["127.0.0.1"], server=True).write(tmp_path, "impostor")
        impostor = _Impostor(relay.port, str(cert), str(key))
        asyncio.run(impostor.serve(until=lambda: connector.output().count("CERTIFICATE_VERIFY_FAILED") >= 2))
        assert impostor.hellos == 0
        assert connector.output().count("CERTIFICATE_VERIFY_FAILED") >= 2, connector.output()[-2000:]

        # The same enrolment as written before pinning (no "pinned"): the impostor got the link.
        # What this test stops is real.
        connector.stop()
        link_json = state / "link" / "link.json"
        link_json.write_text(json.dumps({k: v for k, v in json.loads(link_json.read_text()).items() if k != "pinned"}))
        connector = GatewayProcess(conf, state, env=env).start()
        asyncio.run(impostor.serve(until=lambda: impostor.hellos > 0))
        assert impostor.hellos > 0
    finally:
        if connector is not None:
            connector.stop()
        relay.stop()


def test_an_operator_certificate_leaves_the_link_on_what_verified_enrolment(tmp_path):
    public = CA.create("Public CA")
    relay = Relay(tmp_path / "relay", cache=False)
    cert, key = public.issue("relay", ips=["127.0.0.1"], server=True).write(tmp_path, "relay")
    settings = json.loads((relay.conf / "relay.yaml").read_text().split("relay: ", 1)[1])
    write_conf(relay.conf, {"relay.yaml": "relay: " + json.dumps({**settings, "certificate": str(cert),
                                                                   "key": str(key)}) + "\n"})
    relay.setup()
    try:
        relay.start()
        env = {"SSL_CERT_FILE": str(write_bundle(tmp_path / "system.pem", public))}  # not the relay CA
        conf, state = _connector(tmp_path / "c1")
        enrolment = _enroll(conf, state, relay.ticket(), env)
        assert enrolment["pinned"] is False and "not pinned" in enrolment["stdout"]
        _linked(conf, state, env, relay, enrolment["connector"]).stop()
    finally:
        relay.stop()


def test_a_ticket_url_with_a_user_name_or_password_is_refused_without_echoing_it(tmp_path):
    import pytest

    from gateway.plugins.link.enroll import EnrolError, enroll

    with pytest.raises(EnrolError) as refused:
        enroll("https://u:S3cret-In-Url@127.0.0.1:1/p/TOKEN", tmp_path)
    assert "no user name or password" in str(refused.value) and "S3cret" not in str(refused.value)
