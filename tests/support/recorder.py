"""An HTTPS relying party for browser tests: a server on 127.0.0.1 (another site than the login
door's https://localhost) that answers every GET and POST with a page (``#reached``) and keeps
the method and path, with its query, of each request (``"POST /cb?x=1"``)."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from support.net import free_port


class Recorder:
    def __init__(self, certificate, key_dir) -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.hits: list[str] = []
        cert, key = certificate.write(key_dir, f"recorder-{self.port}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                owner.hits.append(f"{self.command} {self.path}")
                body = b"<h1 id='reached'>reached</h1>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._answer()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self._answer()

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        """The paths (with their query) requested, whatever the method."""
        return [hit.partition(" ")[2] for hit in self.hits]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
