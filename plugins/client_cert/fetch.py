"""Small blocking HTTP fetches for CRLs and OCSP (run on the chain's worker threads).

http.client rather than urllib: no environment proxies picked up behind the operator's back, no
redirects (RFC 5280 section 4.2.1.13 CRLs and RFC 6960 responders are named by exact URL), and
a total deadline on top of the per-read socket timeout so a slow-dripping server cannot hold an
attempt past its deadline: every byte that arrives restarts a socket timeout, and http.client
reads the status line and headers in as many reads as the server likes, so at the deadline a
timer shuts the connection down, whatever is being read then (a server sending its headers a
line a second held a chain thread for good, and took every certificate login down; review).
The host name is looked up under the same deadline (:func:`_resolve`): the C resolver takes no
timeout, and a slow DNS server held a chain thread for its own timeouts, several seconds per
server, past the attempt's deadline.

The answers are signed objects, so plain ``http://`` is normal; an ``https://`` URL is verified
against the system trust store (by the name in the URL, whichever address it was reached at).
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import queue
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from gateway.settings import shown_url

__all__ = ["Backoff", "FetchError", "fetch"]

_CHUNK = 64 * 1024
#: Name lookups that may be running at once, each on a thread of its own. A lookup that outlives
#: its fetch's deadline keeps its slot until the resolver gives up; with every slot taken by a
#: stalled DNS server, a fetch fails at once rather than start more threads.
_LOOKUPS = threading.BoundedSemaphore(8)


class FetchError(Exception):
    """A URL could not be fetched; the message is for logs and self-tests."""


def fetch(url: str, *, timeout: float, max_bytes: int, body: bytes | None = None,
          content_type: str | None = None, accept: str | None = None) -> bytes:
    shown = shown_url(url)  # in errors, which are logged: no credential, no query
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{shown}: not an http(s) URL")
    deadline = time.monotonic() + timeout
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a bad port in the URL
        raise FetchError(f"{shown}: {exc}") from None
    if parts.scheme == "https":
        conn: _HTTPConnection = _HTTPSConnection(parts.hostname, port, timeout=timeout,
                                                 context=ssl.create_default_context())
    else:
        conn = _HTTPConnection(parts.hostname, port, timeout=timeout)
    conn.addresses = _resolve(parts.hostname, port, deadline, shown)
    conn.deadline = deadline
    conn.timeout = max(0.01, deadline - time.monotonic())  # what the lookup left, for the connect
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def cut() -> None:  # the deadline: the read in progress ends, whatever the server sends
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(conn.timeout, cut)
    timer.daemon = True
    headers = {"User-Agent": "authgw", "Connection": "close"}
    if content_type:
        headers["Content-Type"] = content_type
    if accept:
        headers["Accept"] = accept
    timer.start()
    try:
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise FetchError(f"{shown}: HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"{shown}: {length} bytes is more than the limit of {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        while True:
            # One read of what has arrived (read1), waited for no longer than what is left: read()
            # would wait for 64 KiB across as many receives as a slow server makes.
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchError(f"{shown}: no complete answer within {timeout:.1f}s")
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{shown}: answer larger than the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if time.monotonic() >= deadline:  # the timer cut the answer short: its end is not the server's
            raise FetchError(f"{shown}: no complete answer within {timeout:.1f}s")
        return b"".join(chunks)
    except http.client.InvalidURL:  # its message quotes the path and query
        raise FetchError(f"{shown}: not a valid URL (a space or control character in it)") from None
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            raise FetchError(f"{shown}: no complete answer within {timeout:.1f}s") from None
        raise FetchError(f"{shown}: {exc.__class__.__name__}: {exc}") from None
    finally:
        timer.cancel()
        conn.close()


def _resolve(host: str, port: int, deadline: float, shown: str) -> list[tuple]:
    """The addresses of *host*, looked up by the system resolver on a daemon thread and waited
    for no longer than *deadline* (a literal address is not looked up)."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    if not _LOOKUPS.acquire(blocking=False):
        raise FetchError(f"{shown}: name lookups are backed up (the DNS server does not answer)")
    answer: queue.SimpleQueue = queue.SimpleQueue()

    def look_up() -> None:
        try:
            answer.put(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting fetch
            answer.put(exc)
        finally:
            _LOOKUPS.release()

    threading.Thread(target=look_up, name="authgw-lookup", daemon=True).start()
    try:
        result = answer.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise FetchError(f"{shown}: the name {host} was not looked up in time") from None
    if isinstance(result, Exception):
        raise FetchError(f"{shown}: the name {host} was not found ({result})") from None
    if not result:
        raise FetchError(f"{shown}: the name {host} has no address")
    return result


class _HTTPConnection(http.client.HTTPConnection):
    """Connects to :attr:`addresses`, looked up already: the name is not looked up again."""

    addresses: list[tuple] = []
    deadline: float = math.inf  # the fetch's: every address tried shares what is left of it

    def connect(self) -> None:
        error: OSError = OSError("no address to connect to")
        for family, type_, proto, _, sockaddr in self.addresses:
            left = min(self.timeout, self.deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError("no time left to connect")
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(left)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            return
        raise error


class _HTTPSConnection(http.client.HTTPSConnection, _HTTPConnection):
    """TLS over :class:`_HTTPConnection`'s socket (``HTTPSConnection.connect`` wraps what
    ``super().connect()`` opened), the certificate checked for the URL's host name."""


class Backoff:
    """Remembers URLs that failed recently, so that an unreachable responder costs one timeout
    per ``seconds``, not one per attempt (thread-safe)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._until: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def blocked(self, url: str) -> str | None:
        """The last error when *url* failed less than ``seconds`` ago, else ``None``."""
        with self._lock:
            entry = self._until.get(url)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                del self._until[url]
                return None
            return entry[1]

    def failed(self, url: str, error: str) -> None:
        if self.seconds:
            with self._lock:
                self._until[url] = (time.monotonic() + self.seconds, error)

    def succeeded(self, url: str) -> None:
        with self._lock:
            self._until.pop(url, None)
