"""A real, throwaway ``redis-server`` for tests and benchmarks.

API::

    from support.redis import RedisServer

    server = RedisServer(tmp_path / "redis", password="s3cret").start()
    server.url            # "redis://127.0.0.1:PORT/0", or "rediss://localhost:PORT/0" with tls=CA
    server.ca_file        # PEM of the CA that issued the server certificate (tls= only)
    server.client()       # a redis.Redis connected to it (password included)
    server.stop()         # SIGTERM by PID, waits
    server.kill()         # SIGKILL by PID
    server.pid, server.running

Started as ``redis-server --port PORT --bind 127.0.0.1 --save "" --appendonly no --dir TMP``: no
persistence, nothing outside its directory, stopped only by its own PID.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from support.proc import Daemon
from support.net import free_port, wait_for_port

__all__ = ["RedisServer"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer(Daemon):
    def __init__(self, directory: Path | str, *, password: str | None = None, tls=None) -> None:
        """*tls*: a :class:`support.pki.CA`; the server then speaks only TLS, with a certificate
        for ``localhost`` issued by it (clients are not asked for certificates)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.ca_file: Path | None = None
        self._tls_args: list[str] = []
        if tls is not None:
            self.ca_file = self.directory / "ca.crt"
            self.ca_file.write_bytes(tls.pem)
            cert, key = tls.issue("localhost", dns=["localhost"], server=True).write(self.directory, "server")
            self._tls_args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key),
                              "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]

    @property
    def url(self) -> str:
        if self._tls_args:
            return f"rediss://localhost:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        if self.running:
            return self
        ports = ["--port", "0", "--tls-port", str(self.port), *self._tls_args] if self._tls_args else \
            ["--port", str(self.port)]
        args = [REDIS_SERVER, *ports, "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
                "--protected-mode", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self._log = open(self.directory / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
            deadline = time.monotonic() + timeout
            while True:  # the port accepts before the server loaded; wait for PONG
                try:
                    if self.client().ping():
                        break
                except Exception:  # noqa: BLE001 - retried until the deadline
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            self.kill()
            raise
        return self

    def client(self, **kwargs):
        import redis

        if self.ca_file is not None:
            kwargs.setdefault("ssl_ca_certs", str(self.ca_file))
        return redis.Redis.from_url(self.url, password=self.password, socket_timeout=5, **kwargs)
