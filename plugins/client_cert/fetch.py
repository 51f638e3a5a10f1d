"""Small blocking HTTP fetches for CRLs and OCSP (run on the chain's worker threads).

http.client rather than urllib: no environment proxies picked up behind the operator's back, no
redirects (RFC 5280 section 4.2.1.13 CRLs and RFC 6960 responders are named by exact URL), and
a total deadline on top of the per-read socket timeout so a slow-dripping server cannot hold an
attempt past its deadline: every byte that arrives restarts a socket timeout, and http.client
reads the status line and headers in as many reads as the server likes, so at the deadline a
timer shuts the connection down, whatever is being read then (a server sending its headers a
line a second held a chain thread for good, and took every certificate login down; review). The answers are signed objects, so plain ``http://`` is normal; an
``https://`` URL is verified against the system trust store.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

__all__ = ["Backoff", "FetchError", "fetch"]

_CHUNK = 64 * 1024


class FetchError(Exception):
    """A URL could not be fetched; the message is for logs and self-tests."""


def fetch(url: str, *, timeout: float, max_bytes: int, body: bytes | None = None,
          content_type: str | None = None, accept: str | None = None) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{url}: not an http(s) URL")
    deadline = time.monotonic() + timeout
    try:
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    except ValueError as exc:  # a bad port in the URL
        raise FetchError(f"{url}: {exc}") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def cut() -> None:  # the deadline: the read in progress ends, whatever the server sends
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, cut)
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
            raise FetchError(f"{url}: HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"{url}: {length} bytes is more than the limit of {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        while True:
            # One read of what has arrived (read1), waited for no longer than what is left: read()
            # would wait for 64 KiB across as many receives as a slow server makes.
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchError(f"{url}: no complete answer within {timeout:.1f}s")
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{url}: answer larger than the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if time.monotonic() >= deadline:  # the timer cut the answer short: its end is not the server's
            raise FetchError(f"{url}: no complete answer within {timeout:.1f}s")
        return b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            raise FetchError(f"{url}: no complete answer within {timeout:.1f}s") from None
        raise FetchError(f"{url}: {exc.__class__.__name__}: {exc}") from None
    finally:
        timer.cancel()
        conn.close()


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
