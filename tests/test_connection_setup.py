"""What an accepted connection gets before its first request, on either event loop, plain and
TLS: ``TCP_NODELAY`` and TCP keepalive, both inherited from the listening socket
(``gateway.server.bind``) rather than set by aiohttp on each connection; and the protocol state
the class that keeps aiohttp from setting ``TCP_NODELAY`` again leaves is what aiohttp's own
would."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol

from gateway.http.protocol import ConnectionGuard, GuardedSite, _NoDelayAlreadySet
from gateway.server import bind
from gateway.settings import LimitsSettings
from support.net import free_port
from support.pki import CA


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run
    return asyncio.run


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A server context (certificate for 127.0.0.1) and a client context trusting its CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca = CA.create("connection setup CA")
    crt, key = ca.issue("127.0.0.1", ips=["127.0.0.1"], server=True).write(directory, "server")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(crt), str(key))
    client = ssl.create_default_context(cadata=ca.pem.decode())
    return server, client


async def _socket_options(request: web.Request) -> web.Response:
    sock = request.transport.get_extra_info("socket")  # the connection's, through TLS too
    nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    return web.Response(text=f"nodelay={int(bool(nodelay))} keepalive={int(bool(keepalive))}")


@pytest.mark.parametrize("with_tls", [False, True], ids=["plain", "tls"])
def test_connections_have_nodelay_and_keepalive(run, tls, with_tls):
    server_context, client_context = tls

    async def main() -> bytes:
        app = web.Application()
        app.router.add_get("/options", _socket_options)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        site = GuardedSite(runner, bind(f"127.0.0.1:{port}"), ConnectionGuard(LimitsSettings()),
                           ssl_context=server_context if with_tls else None)
        await site.start()
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context if with_tls else None)
            writer.write(b"GET /options HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return answer
        finally:
            await runner.cleanup()

    answer = run(main())
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert answer.endswith(b"nodelay=1 keepalive=1")


def test_skipping_the_second_nodelay_leaves_aiohttp_state_as_is():
    """``_NoDelayAlreadySet.connection_made`` leaves every attribute of the protocol as
    ``BaseProtocol.connection_made`` does (given a transport without a socket, so aiohttp's
    own sets nothing on one): should aiohttp's start to keep more, this fails."""

    class Transport(asyncio.Transport):
        def get_extra_info(self, name, default=None):
            return default

    slots = [name for cls in BaseProtocol.__mro__ for name in getattr(cls, "__slots__", ())]
    assert "transport" in slots
    loop = asyncio.new_event_loop()
    try:
        theirs, ours = BaseProtocol(loop), _NoDelayAlreadySet(loop)
        transport = Transport()
        BaseProtocol.connection_made(theirs, transport)
        ours.connection_made(transport)
        missing = object()
        assert ({name: getattr(theirs, name, missing) for name in slots}
                == {name: getattr(ours, name, missing) for name in slots})
        assert ours.transport is transport
    finally:
        loop.close()
