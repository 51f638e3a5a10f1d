"""A real, throwaway nginx (Debian's binary) for tests.

API::

    from support.nginx import Nginx

    server = Nginx(tmp_path / "nginx", http_block).start()   # http_block: text inside `http { }`
    server.port            # a free loopback port; write `listen 127.0.0.1:{port};` with it
    server.stop()          # SIGQUIT (graceful) by PID, then SIGKILL

Runs in the foreground (``daemon off``, so the PID the fixture holds is the master's) with its
own prefix, configuration, pid file, logs and temp directories under *directory*; workers stay
this user when run as root. Nothing is written outside *directory*.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
from pathlib import Path

from support.net import free_port, wait_for_port
from support.proc import stop as stop_process

__all__ = ["Nginx"]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

_MAIN = """\
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
{http}
}}
"""


class Nginx:
    def __init__(self, directory: Path | str, http_block: str = "", *, port: int | None = None) -> None:
        self.directory = Path(directory)
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.http_block = http_block
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def conf_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> Nginx:
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        self.conf_path.write_text(_MAIN.format(dir=self.directory, user=user, http=self.http_block))
        check = subprocess.run([NGINX, "-t", "-p", str(self.directory), "-c", str(self.conf_path)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected the configuration:\n{check.stderr}\n{self.conf_path.read_text()}")
        self._log = open(self.directory / "stderr.log", "ab")
        self.proc = subprocess.Popen([NGINX, "-p", str(self.directory), "-c", str(self.conf_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT, timeout=10.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
