"""Self-test 4 of the seeds, "connection to the cloud", for ``authgw check`` and the console:
enrolment and certificate expiry, DNS, the proxy (when one applies), TCP, TLS with the pinned
CA, the link authenticated (a ``hello`` answered), round-trip latency and clock skew.

Each test names what it checked and, when it fails, what to do about it. They run in the
``authgw check`` process (its own event loop per test), not in the serving connector.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import aiohttp

from gateway import CheckResult, SelfTest
from gateway.logs import printable
from gateway.plugins import linkproto as proto

from . import state
from .client import Proxy, no_redirects, proxy_for, require_tls

__all__ = ["selftests"]

_TIMEOUT = 5.0
_REENROL = "re-enrol with a new ticket: authgw link enroll TICKET_URL"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def selftests(plugin) -> list[SelfTest]:
    try:
        enrolment, damaged = state.load(plugin.state_dir), None
    except state.EnrolmentDamaged as exc:
        enrolment, damaged = None, str(exc)
    if enrolment is not None:
        try:
            parts = urlsplit(enrolment.link_url)
            host, port = parts.hostname or "", parts.port or 443
        except ValueError:  # a port that is not a number (link.json edited by hand): every test was lost
            enrolment, damaged = None, (f"the link URL in {plugin.state_dir / 'link' / 'link.json'} "
                                        f"({printable(enrolment.link_url)[:200]}) is not wss://HOST[:PORT]/PATH")

    def enrolled() -> CheckResult:
        if damaged is not None:
            return CheckResult.fail(damaged, "restore the files from a backup, or enrol again with a new ticket")
        if enrolment is None:
            return CheckResult.fail("this connector is not enrolled", "authgw link enroll TICKET_URL (from the relay "
                                    "operator: authgw relay ticket CONNECTION)")
        now = time.time()
        detail = (f"connector {enrolment.connector} of {enrolment.connection}; certificate valid until "
                  f"{_when(enrolment.not_after)}")
        if enrolment.not_after <= now:
            return CheckResult.fail(f"the link certificate expired at {_when(enrolment.not_after)}: {_REENROL}",
                                    "an expired certificate cannot be renewed over the link")
        if enrolment.key_warning:
            return CheckResult.warn(f"{detail}; {enrolment.key_warning}", "key.pem must be readable by authgw's user "
                                    "alone (chmod 600, chown to that user)")
        if enrolment.renew_at <= now:
            return CheckResult.warn(detail + "; renewal is due", "the connector renews over the live link: "
                                    "is `authgw serve` running and linked?")
        return CheckResult.ok(detail)

    tests = [SelfTest(f"{plugin.name}.enrolment", enrolled, prerequisite=True)]
    if enrolment is None:
        return tests
    proxy = proxy_for(plugin.settings, enrolment.link_url)  # the link's own choice (client.py)

    def dns() -> CheckResult:
        try:
            addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
        except socket.gaierror as exc:
            if proxy:
                return CheckResult.warn(f"{host} does not resolve here ({exc.strerror}); the proxy resolves it")
            return CheckResult.fail(f"{host} does not resolve: {exc.strerror}", "check DNS, or the relay's name")
        return CheckResult.ok(f"{host} -> {', '.join(addresses)}")

    def tcp() -> CheckResult:
        target = (urlsplit(proxy.url).hostname, urlsplit(proxy.url).port or 80) if proxy else (host, port)
        started = time.monotonic()
        try:
            with socket.create_connection(target, timeout=_TIMEOUT):
                pass
        except OSError as exc:
            what = "the proxy" if proxy else "the relay"
            return CheckResult.fail(f"cannot connect to {what} {target[0]}:{target[1]}: {exc}",
                                    "outbound TCP must be allowed (443 to the relay, or to the proxy)")
        return CheckResult.ok(f"{target[0]}:{target[1]} accepts ({(time.monotonic() - started) * 1000:.0f} ms)"
                              + (" (proxy)" if proxy else ""))

    def through_proxy() -> CheckResult:
        proxy_parts = urlsplit(proxy.url)
        request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if proxy.authorization:
            request += f"Proxy-Authorization: {proxy.authorization}\r\n"
        try:
            with socket.create_connection((proxy_parts.hostname, proxy_parts.port or 80), timeout=_TIMEOUT) as sock:
                sock.sendall((request + "\r\n").encode())
                status = sock.recv(1024).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError as exc:
            return CheckResult.fail(f"the proxy did not answer CONNECT: {exc}")
        if " 200" not in status:
            hint = "proxy credentials: proxy_username/proxy_password" if status.split(" ")[1:2] in (["407"], ["401"]) else \
                "the proxy must allow CONNECT to the relay's port"
            return CheckResult.fail(f"CONNECT {host}:{port} through {proxy_parts.hostname}: {status}", hint)
        return CheckResult.ok(f"CONNECT {host}:{port} through {proxy_parts.hostname}:{proxy_parts.port}: {status}")

    def tls() -> CheckResult:
        context = enrolment.ssl_context()
        try:
            with socket.create_connection((host, port), timeout=_TIMEOUT) as sock:
                with context.wrap_socket(sock, server_hostname=host) as tls_sock:
                    version = tls_sock.version()
        except ssl.SSLCertVerificationError as exc:
            return CheckResult.fail(f"the relay's certificate does not verify with {enrolment.trust}: {exc.verify_message}",
                                    "a TLS-inspecting proxy or the wrong relay? re-enrol if the relay changed its CA")
        except (OSError, ssl.SSLError) as exc:
            return CheckResult.fail(f"TLS with {host}:{port} failed: {exc}")
        return CheckResult.ok(f"{version} with {host}:{port}, relay certificate verified with {enrolment.trust}")

    def linked() -> CheckResult:
        try:
            round_trip, skew = asyncio.run(_hello(plugin, enrolment, proxy))
        except aiohttp.WSServerHandshakeError as exc:
            return CheckResult.fail(f"the relay refused the link (HTTP {exc.status})",
                                    "revoked or unknown connector? ask the relay operator (authgw relay connectors)")
        except Exception as exc:
            # printable: the relay's words (an error's detail) reach the operator's terminal
            return CheckResult.fail(printable(f"the link did not come up: {exc.__class__.__name__}: {exc}")[:300])
        detail = f"hello answered in {round_trip * 1000:.0f} ms; clock skew {skew:+.3f}s"
        if abs(skew) > plugin.settings.max_clock_skew:
            return CheckResult.warn(detail, f"clocks differ by more than max_clock_skew "
                                    f"({plugin.settings.max_clock_skew:.0f}s): requests will expire; fix NTP")
        return CheckResult.ok(detail)

    tests.append(SelfTest(f"{plugin.name}.dns[{host}]", dns, prerequisite=not proxy))
    tests.append(SelfTest(f"{plugin.name}.tcp", tcp, prerequisite=True))
    if proxy:
        tests.append(SelfTest(f"{plugin.name}.proxy", through_proxy, prerequisite=True))
    else:
        tests.append(SelfTest(f"{plugin.name}.tls[{host}:{port}]", tls, prerequisite=True))
    tests.append(SelfTest(f"{plugin.name}.link", linked))
    return tests


async def _hello(plugin, enrolment: state.Enrolment, proxy: Proxy | None) -> tuple[float, float]:
    """Dial the link (through the proxy, with the pinned CA and our certificate), send hello;
    returns (round trip, clock skew) in seconds. As the link does: no redirect followed, TLS or
    nothing. The answer is awaited ``_TIMEOUT`` seconds in all, not per frame: a relay sending
    frames of other ids each second held ``authgw check`` forever (review of the link)."""
    # no trust_env: the proxy is the link's (proxy_for)
    async with aiohttp.ClientSession(trace_configs=[no_redirects()]) as http:
        async with http.ws_connect(enrolment.link_url, ssl=enrolment.ssl_context(),
                                   proxy=proxy.url if proxy else None, proxy_headers=proxy.headers if proxy else None,
                                   max_msg_size=proto.MAX_FRAME,
                                   timeout=aiohttp.ClientWSTimeout(ws_receive=_TIMEOUT, ws_close=2.0)) as ws:
            require_tls(ws)
            sent = time.time()
            # probe: the relay answers, but neither routes to this link nor lets it replace the
            # connector's own (one link per connector id)
            request_id, frame = proto.request("hello", {"version": "check", "time": sent, "probe": True,
                                                        "not_after": enrolment.not_after}, now=sent, timeout=_TIMEOUT)
            await ws.send_str(frame)
            loop = asyncio.get_running_loop()
            end = loop.time() + _TIMEOUT
            while True:
                if (left := end - loop.time()) <= 0:
                    raise ConnectionError(f"no answer to hello within {_TIMEOUT:.0f}s")
                try:
                    msg = await ws.receive(timeout=left)
                except asyncio.TimeoutError:
                    raise ConnectionError(f"no answer to hello within {_TIMEOUT:.0f}s") from None
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"the relay closed the link ({ws.close_code})")
                message = proto.decode(msg.data, now=time.time())
                if message.id == request_id:
                    break
            received = time.time()
            if message.type == proto.ERROR:
                raise ConnectionError(f"{message.body['code']}: {message.body['detail']}")
            relay_time = message.body.get("time")
            if not isinstance(relay_time, (int, float)):
                raise ConnectionError("the relay's hello answer carries no time")
            return received - sent, relay_time - (sent + received) / 2
