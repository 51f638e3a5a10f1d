"""A hostile directory (or anyone on the path to a plaintext one) against a real ``authgw serve``.

Review of the LDAP plugin: a server that answers a search with entries without end, or with
answers to other requests without end, held the worker's event loop for as long as it sent
(``/healthz`` unanswered for 64 s, 3 GB read into memory), since the answer's time was checked only
when a read had to wait and nothing bounded what one search reads; a server answering StartTLS a
byte at a time held the worker's start (its first health round) for as long as it liked, as
ldap3's socket timeout bounds each read, not the whole.

The server here is a few dozen lines of asyncio on 127.0.0.1. What it sends is capped (a few MB,
then it holds the connection silent), so that code without the bounds under test fails on what
the gateway says, not by eating the machine.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from support.der import der
from support.gateway import GatewayProcess, write_conf
from support.hostile_ldap import LdapMessageServer, message, result

STREAM_CAP = 4 * 1024 * 1024  # bytes a streaming mode sends before it falls silent
DRIBBLE_CAP = 90  # bytes (a second each) the StartTLS answer dribbles before the server closes


class HostileDirectory(LdapMessageServer):
    """Answers binds with success; a search (``flood``: entries, ``wrongid``: answers to another
    message id) or a StartTLS (``starttls``: a 2 GB message, a byte a second) without end."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.streaming = threading.Event()

    async def _stream(self, writer, chunk: bytes) -> None:
        self.streaming.set()
        for _ in range(STREAM_CAP // len(chunk) + 1):
            writer.write(chunk)
            await writer.drain()
        await asyncio.sleep(120)  # silent, the connection open

    async def answer(self, writer, message_id: bytes, op: int) -> bool:
        if op == 0x60:  # bind
            writer.write(message(message_id, result(0x61)))
        elif op == 0x63 and self.mode == "flood":
            entry = message(message_id, der(0x64, der(0x04, b"uid=x,dc=example,dc=com") + der(0x30, b"")))
            await self._stream(writer, entry * 2000)
        elif op == 0x63 and self.mode == "wrongid":
            other = ((int.from_bytes(message_id, "big") + 7) % 0x7F).to_bytes(1, "big")
            await self._stream(writer, message(other, result(0x65)) * 2000)
        elif op == 0x77 and self.mode == "starttls":
            writer.write(b"\x30\x84\x7f\xff\xff\xff\x02\x01" + message_id[-1:])
            self.streaming.set()
            for _ in range(DRIBBLE_CAP):
                await writer.drain()
                await asyncio.sleep(1.0)
                writer.write(b"\x04")
            return False
        elif op == 0x42:  # unbind
            return False
        return True


def _gateway(tmp_path, port: int, **ldap) -> GatewayProcess:
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": 'chain: [ldap]\nthrottle: {enabled: false}\nhealth: {probe_interval: 3600}\n',
        "ldap.yaml": "ldap: " + repr({"servers": [f"ldap://127.0.0.1:{port}"], "base_dn": "dc=example,dc=com",
                                      "bind_dn": "cn=svc,dc=example,dc=com", "bind_password": {"env": "SVCPW"},
                                      "insecure": True, "receive_timeout": 2.0, **ldap}).replace("True", "true"),
    })
    return GatewayProcess(conf, tmp_path / "state", env={"SVCPW": "service-password"})


@pytest.mark.parametrize("mode, said", [("flood", "more than the 2 entries asked for"),
                                        ("wrongid", "more than 100 answers to other requests")])
def test_a_directory_answering_without_end_is_read_no_further_than_asked(tmp_path, mode, said):
    directory = HostileDirectory(mode).start()
    gw = _gateway(tmp_path, directory.port)
    try:
        gw.start()
        answer = gw.auth("victim", "a-password", timeout=60)
        assert directory.streaming.is_set()
        assert answer.status == 503, answer.body  # the directory is unusable: an outage, not a login
        assert said in gw.output(), gw.output()[-3000:]
        assert gw.get("/healthz", timeout=30).status == 200
        assert "Traceback" not in gw.output()
    finally:
        gw.stop()
        directory.stop()


def test_a_starttls_answer_a_byte_a_second_ends_at_the_deadline(tmp_path):
    """The first health round runs before the worker serves: it waited for the dribble."""
    directory = HostileDirectory("starttls").start()
    gw = _gateway(tmp_path, directory.port, start_tls=True, insecure=False, connect_timeout=1.0)
    try:
        gw.start(timeout=60)  # served, the dribble still going (it lasts DRIBBLE_CAP seconds)
        assert directory.streaming.is_set()
        assert "not set up before the deadline" in gw.output(), gw.output()[-3000:]
        answer = gw.auth("victim", "a-password", timeout=60)
        assert answer.status == 503, answer.body
    finally:
        gw.stop()
        directory.stop()
