"""A small HTTP client over http.client: exact headers in, every header out."""

from __future__ import annotations

import base64
import http.client
import json
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def all(self, name: str) -> list[str]:
        return self.headers.get_all(name) or []

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def basic(username: str | bytes, password: str | bytes) -> str:
    raw = (username if isinstance(username, bytes) else username.encode()) + b":" + \
          (password if isinstance(password, bytes) else password.encode())
    return "Basic " + base64.b64encode(raw).decode()


def request(url_base: str, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None, timeout: float = 15.0, source_address: tuple[str, int] | None = None) -> Response:
    host_port = url_base.split("://", 1)[1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout, source_address=source_address)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()
