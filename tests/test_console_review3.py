"""Review of the console (third), against a real ``authgw serve``.

* The console's blocking work ran on the event loop's default executor, which the core shares
  (a reload builds the new configuration there; the link and the login door look users up
  there). An enrolment waits up to a minute for a relay that does not answer: a few presses of
  **Enrol** held every default thread, and a ``SIGHUP`` reload waited until they had ended. Now
  the console has threads of its own, and one enrolment runs at a time in a worker.
* The directory settings were written with PyYAML's ``safe_dump``, which leaves plain a string
  that conf.d's loader reads as a number (``1.5e5``): such a base DN or CA path was refused as
  "not a string". Now every such string is quoted, and the file reads back as typed.
"""

from __future__ import annotations

import html
import os
import re
import selectors
import signal
import socket
import threading

import yaml

from gateway.yamlfiles import load_file
from support.console import console_conf, signed_in
from support.net import free_port, wait_for
from support.pki import CA

#: Threads of asyncio's default executor (concurrent.futures' own rule).
_DEFAULT_THREADS = min(32, (os.cpu_count() or 1) + 4)


class SilentRelay:
    """A TCP server that accepts and reads, never answers, and notes which connections their
    client closed; :meth:`release` closes them all."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.closed_by_client = 0
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            self.listener.setblocking(False)
            selector.register(self.listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    if key.fileobj is self.listener:
                        conn, _ = self.listener.accept()
                        conn.setblocking(False)
                        selector.register(conn, selectors.EVENT_READ)
                        with self._lock:
                            self._held.append(conn)
                            self.accepted += 1
                        continue
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(key.fileobj)
                        with self._lock:
                            self.closed_by_client += 1

    def release(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for conn in self._held:
                conn.close()
        self.listener.close()


def _reloads(gateway) -> int:
    return gateway.output().count(" reloaded ")


def test_enrolments_waiting_for_a_relay_do_not_hold_the_gateways_reload(conf_dir, demo_hash, start_gateway):
    port = free_port()
    console_conf(conf_dir, port, demo_hash, plugins="[console, link]")
    gateway = start_gateway(conf_dir)
    client = signed_in(gateway, f"http://127.0.0.1:{port}")
    relay = SilentRelay()
    ticket = f"https://127.0.0.1:{relay.port}/p/{'A' * 32}"
    presses = _DEFAULT_THREADS + 2
    answers: list[tuple[int, str]] = []

    def enrol() -> None:
        try:
            response = client.post_form("/setup/ticket", {"ticket_url": ticket})
        except OSError as exc:  # a reload may close a console connection while it waits
            answers.append((0, repr(exc)))
            return
        found = re.search(r'id="ticket-result">([^<]*)<', response.text)
        answers.append((response.status, html.unescape(found.group(1)) if found else ""))

    presses_made = [threading.Thread(target=enrol, daemon=True) for _ in range(presses)]
    try:
        for press in presses_made:
            press.start()
        # Every enrolment the console runs at once is at the relay: all the default executor's
        # threads before (the other presses queued behind them), one now (the others told so).
        wait_for(lambda: relay.accepted >= 1 and (relay.accepted >= _DEFAULT_THREADS or len(answers) >= presses - 1),
                 90, interval=0.05, what="the enrolments to reach the relay")
        before = _reloads(gateway)
        os.kill(gateway.proc.pid, signal.SIGHUP)
        wait_for(lambda: _reloads(gateway) > before, 90, interval=0.05, what="the reload")
        # Reloaded while the enrolments still wait for the relay (before, only once they had
        # given up and closed their connections).
        assert relay.closed_by_client == 0, (relay.accepted, relay.closed_by_client)
        assert relay.accepted == 1
        refused = [text for status, text in answers if status == 409]
        assert len(refused) == presses - 1 and all("running already" in text for text in refused), answers
    finally:
        relay.release()
        for press in presses_made:
            press.join(90)
    # The enrolment that ran ended (the relay closed on it), and the next one runs.
    again = SilentRelay()
    again.release()  # nothing listens there now: refused at once
    response = client.post_form("/setup/ticket", {"ticket_url": f"https://127.0.0.1:{again.port}/p/{'B' * 32}"})
    assert response.status == 400 and "running already" not in response.text


def test_a_value_conf_d_reads_as_a_number_is_saved_as_typed(conf_dir, demo_hash, start_gateway):
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    (conf_dir / "1.5e5").write_bytes(CA.create().pem)  # a CA file named like a float
    client = signed_in(start_gateway(conf_dir), f"http://127.0.0.1:{port}")
    typed = {"preset": "openldap", "servers": "ldaps://127.0.0.1:1 ldaps://1.5e5.example",
             "base_dn": "1.5e5", "bind_dn": "0.5E3", "password": "1.5e5", "ca_path": "1.5e5"}
    response = client.post_multipart("/setup/directory", typed)
    assert response.status == 303, [html.unescape(p) for p in re.findall(r"<li><code>(.*?)</code>", response.text)]
    written = conf_dir / "50-console.yaml"
    section = load_file(written, {})["ldap"]  # as the gateway reads conf.d
    assert section["base_dn"] == "1.5e5" and section["bind_dn"] == "0.5E3" and section["ca_file"] == "1.5e5"
    assert section["servers"] == ["ldaps://127.0.0.1:1", "ldaps://1.5e5.example"]
    assert (conf_dir / "console" / "ldap-bind-password").read_text() == "1.5e5"
    # And the set-up page shows them back as typed.
    page = client.get("/setup").text
    assert 'name="base_dn" value="1.5e5"' in page and 'name="bind_dn" value="0.5E3"' in page
    assert yaml.safe_load(written.read_text())["ldap"]["base_dn"] == "1.5e5"
