"""A relay address that takes the TCP connection and then says nothing (a half-dead load
balancer, a firewall that drops after the handshake): each dial is given up after
``link.dial_timeout`` and the connector dials again, instead of waiting out aiohttp's 300 s
default once per dial. Real processes; 127.0.0.1 only."""

from __future__ import annotations

import socket
import threading

from support.linkenv import Connector, NoDirectory, Relay
from support.net import wait_for


class _Silent:
    """Accepts connections on *port* and holds them without a byte; counts them."""

    def __init__(self, port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(0.2)
        self.held: list[socket.socket] = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.server.close()


def test_a_silent_relay_address_is_dialled_again_after_the_dial_timeout(tmp_path):
    relay = Relay(tmp_path / "relay", cache=False).setup()
    connector = Connector(tmp_path / "c1", NoDirectory(), link={"dial_timeout": 1.0, "backoff_max": 0.5})
    try:
        relay.start()
        connector.enroll(relay.ticket(), relay.ca_file)
    finally:
        relay.stop()
    silent = _Silent(relay.port)
    try:
        connector.start()
        # Without the bound, the first dial would still be waiting here (aiohttp: 300 s).
        wait_for(lambda: len(silent.held) >= 3, 30, what="three dials", log=connector.process.output)
        assert "link to" in connector.process.output() and "failed" in connector.process.output()
    finally:
        connector.stop()
        silent.close()
