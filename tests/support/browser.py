"""Headless Debian Chromium driven by Playwright, and a small HTTPS service provider for the
browser to come back to.

::

    with chromium(trust=[issued_cert, ...]) as browser:      # a Playwright Browser
        page = browser.new_page(); page.goto(url)

    sp = SamlSPServer(saml_sp, issued_cert).start()          # https://127.0.0.1:PORT
    sp.url + "/start"      # sends the browser to the IdP (HTTP-Redirect AuthnRequest)
    # POST /acs: pysaml2 validates the SAMLResponse; the page says "Hello NAMEID" + attributes
    sp.stop()

Chromium is ``/usr/bin/chromium`` (Playwright's own browser download is not used). Test
certificates are trusted by their public-key hashes (``--ignore-certificate-errors-spki-list``),
so nothing else about TLS is relaxed.
"""

from __future__ import annotations

import base64
import contextlib
import html
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import hashes, serialization

from support.net import free_port

__all__ = ["SamlSPServer", "chromium", "spki_hash"]

CHROMIUM = "/usr/bin/chromium"


def spki_hash(issued) -> str:
    spki = issued.cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return base64.b64encode(digest.finalize()).decode()


@contextlib.contextmanager
def chromium(trust=(), args=(), env=None, user_data_dir=None):
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server", *args]
    if trust:
        flags.append("--ignore-certificate-errors-spki-list=" + ",".join(spki_hash(c) for c in trust))
    with sync_playwright() as pw:
        if user_data_dir is not None:
            context = pw.chromium.launch_persistent_context(str(user_data_dir), executable_path=CHROMIUM,
                                                            headless=True, args=flags, env=env)
            try:
                yield context
            finally:
                context.close()
        else:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags, env=env)
            try:
                yield browser
            finally:
                browser.close()


class SamlSPServer:
    """pysaml2 behind a tiny HTTPS server on 127.0.0.1 (another site than the IdP's localhost).

    ``GET /start`` sends the browser to the IdP with *relay_state*; a POST (the ACS) shows the
    validated name and attributes. A test needing more pages subclasses it and extends
    :meth:`answer_get` / :meth:`answer_post`; an exception there becomes a 403 page saying why."""

    def __init__(self, sp, certificate, key_dir, relay_state: str = "/app") -> None:
        self.sp = sp
        self.port = int(sp.acs.rsplit(":", 1)[1].split("/")[0])
        self.url = f"https://127.0.0.1:{self.port}"
        self.relay_state = relay_state
        self.outstanding: dict[str, str] = {}
        cert_file, key_file = certificate.write(key_dir, f"sp-server-{self.port}")
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        self.server: ThreadingHTTPServer | None = None

    @staticmethod
    def free_acs() -> str:
        return f"https://127.0.0.1:{free_port()}/acs"

    def answer_get(self, path: str) -> tuple[int, str, dict]:
        """``(status, HTML body, extra headers)`` for a GET of *path*."""
        if path.startswith("/start"):
            request_id, location = self.sp.redirect_request(relay_state=self.relay_state)
            self.outstanding[request_id] = self.relay_state
            return 302, "", {"Location": location}
        return 404, "not found", {}

    def answer_post(self, path: str, form: dict[str, str]) -> tuple[int, str, dict]:
        """``(status, HTML body, extra headers)`` for a POST of *form* to *path*."""
        result = self.sp.client.parse_authn_request_response(
            form["SAMLResponse"], "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST", outstanding=dict(self.outstanding))
        name = result.name_id.text
        attributes = ", ".join(f"{k}={'|'.join(v)}" for k, v in sorted(result.ava.items()))
        return 200, (f"<h1 id='hello'>Hello {html.escape(name)}</h1><p id='attrs'>{html.escape(attributes)}</p>"
                     f"<p id='relay'>{html.escape(form.get('RelayState', ''))}</p>"), {}

    def start(self) -> SamlSPServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: str, headers: dict) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _answer(self, answer, *args) -> None:
                try:
                    return self._send(*answer(*args))
                except Exception as exc:  # the page must say why the SP refused
                    return self._send(403, f"<h1 id='refused'>SP refused: {html.escape(repr(exc))}</h1>", {})

            def do_GET(self):
                self._answer(owner.answer_get, self.path)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                self._answer(owner.answer_post, self.path, form)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.socket = self.context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
