"""A real, throwaway Debian ``tinyproxy`` (HTTP CONNECT proxy with Basic authentication).

API::

    proxy = TinyProxy(tmp_path / "proxy", user="corp", password="s3cret").start()
    proxy.url            # "http://corp:s3cret@127.0.0.1:PORT" (for HTTPS_PROXY)
    proxy.address        # "http://127.0.0.1:PORT"
    proxy.connects()     # CONNECT requests it logged (host:port strings)
    proxy.stop()

Runs in the foreground (``-d``), logs to its directory, stopped by its own PID.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from support.net import free_port, wait_for_port
from support.proc import stop as stop_process

__all__ = ["TinyProxy"]

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"


class TinyProxy:
    def __init__(self, directory: Path, *, user: str | None = None, password: str | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.user, self.password = user, password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = directory / "tinyproxy.log"

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        credentials = f"{self.user}:{self.password}@" if self.user else ""
        return f"http://{credentials}127.0.0.1:{self.port}"

    def start(self) -> TinyProxy:
        conf = self.directory / "tinyproxy.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 120", "MaxClients 50",
                 f"LogFile \"{self.log}\"", "LogLevel Connect", "Allow 127.0.0.1",
                 f"PidFile \"{self.directory / 'tinyproxy.pid'}\""]
        if self.user:
            lines.append(f"BasicAuth {self.user} {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def connects(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+)", text)

    def stop(self) -> None:
        stop_process(self.proc)
