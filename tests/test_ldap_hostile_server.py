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

from support.gateway import GatewayProcess, write_conf
from support.loopserver import LoopServer

STREAM_CAP = 4 * 1024 * 1024  # bytes a streaming mode sends before it falls silent
DRIBBLE_CAP = 90  # bytes (a second each) the StartTLS answer dribbles before the server closes


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(raw))) + raw + content


def _message(message_id: bytes, op: bytes) -> bytes:
    return _tlv(0x30, _tlv(0x02, message_id) + op)


def _result(tag: int, code: int = 0) -> bytes:
    return _tlv(tag, _tlv(0x0A, bytes((code,))) + _tlv(0x04, b"") + _tlv(0x04, b""))


def _header(buf: bytes, pos: int) -> tuple[int, int]:
    first = buf[pos + 1]
    if first < 0x80:
        return pos + 2, pos + 2 + first
    count = first & 0x7F
    start = pos + 2 + count
    return start, start + int.from_bytes(buf[pos + 2:start], "big")


class HostileDirectory(LoopServer):
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

    async def handle(self, reader, writer) -> None:
        buf = b""
        try:
            while data := await reader.read(65536):
                buf += data
                while len(buf) >= 2:
                    try:
                        start, end = _header(buf, 0)
                    except IndexError:
                        break
                    if len(buf) < end:
                        break
                    message, buf = buf[start:end], buf[end:]
                    id_start, id_end = _header(message, 0)
                    if not await self._answer(writer, message[id_start:id_end], message[id_end]):
                        return
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer, message_id: bytes, op: int) -> bool:
        """Answer one request (its message id's octets, its protocolOp tag); False: hang up."""
        if op == 0x60:  # bind
            writer.write(_message(message_id, _result(0x61)))
        elif op == 0x63 and self.mode == "flood":
            entry = _message(message_id, _tlv(0x64, _tlv(0x04, b"uid=x,dc=example,dc=com") + _tlv(0x30, b"")))
            await self._stream(writer, entry * 2000)
        elif op == 0x63 and self.mode == "wrongid":
            other = ((int.from_bytes(message_id, "big") + 7) % 0x7F).to_bytes(1, "big")
            await self._stream(writer, _message(other, _result(0x65)) * 2000)
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
