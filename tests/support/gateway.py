"""A real ``authgw serve`` process on a free loopback port, with its own conf.d and state dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from support.http import Response, basic, request
from support.proc import stop as stop_process
from support.net import free_port, wait_for, wait_for_port


def static_users(users: dict[str, str]) -> dict[str, str]:
    """The conf.d files of the ``static`` plugin with *users* (name -> password hash), for
    :func:`write_conf`."""
    return {"static.yaml": "static:\n  users_file: users/users.yaml\n", "users/users.yaml": users_yaml(users)}


def users_yaml(users: dict[str, str]) -> str:
    """A ``static`` users file's text with *users* (name -> password hash)."""
    return "users:\n" + "".join(f'  {name}:\n    password_hash: "{digest}"\n' for name, digest in users.items())


def replace_file(path: Path, text: str) -> None:
    """Replace *path* with *text* at once (mode 0600, renamed over it), as an editor saving does."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.chmod(0o600)
    os.replace(new, path)


def write_conf(directory: Path, files: dict[str, str]) -> Path:
    """Write *files* (name -> YAML text, dedented) into *directory*; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        if name.endswith((".yaml", ".yml")) and "users" in name:
            path.chmod(0o600)
    return directory


def authgw(*args: str, env: dict[str, str] | None = None, input: str | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``authgw`` command (as ``python -m gateway``) and capture its output."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=timeout)


class GatewayProcess:
    def __init__(self, conf_dir: Path, state_dir: Path, *, env: dict[str, str] | None = None,
                 workers: int = 1, host: str = "127.0.0.1", state_flag: bool = True) -> None:
        self.conf_dir = conf_dir
        self.state_dir = state_dir
        self.state_flag = state_flag  # False: no --state-dir (conf.d's `state_dir:` decides)
        self.host = host
        self.port = free_port(host)
        self.env = {**os.environ, **(env or {})}
        self.workers = workers
        self.log_path = state_dir.parent / f"authgw-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.conf_dir),
             *(["--state-dir", str(self.state_dir)] if self.state_flag else []), "--workers", str(self.workers),
             "--listen", f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        wait_for_port(self.host, self.port, timeout=timeout, proc=self.proc)

        def healthy() -> bool:  # the socket is bound before the workers serve
            try:
                return self.get("/healthz").status == 200
            except OSError:
                return False

        wait_for(healthy, timeout, interval=0.05, what="authgw to become healthy", log=self.output,
                 error=TimeoutError)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        running = self.proc is not None and self.proc.poll() is None
        code = stop_process(self.proc, sig, timeout)
        if running:
            self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def audit(self) -> list[dict]:
        import json

        lines = []
        for line in self.output().splitlines():
            if line.startswith("{") and '"authgw.attempt"' in line:
                lines.append(json.loads(line))
        return lines

    def audit_for(self, request_id: str, timeout: float = 10.0) -> dict:
        """The audit line of one request (waiting briefly: a deadline-exceeded attempt is
        audited after its answer)."""
        return wait_for(lambda: next((line for line in self.audit() if line["request_id"] == request_id), None),
                        timeout, interval=0.05, what=f"the audit line of {request_id}", log=self.output)

    # -- requests ------------------------------------------------------------------------------

    def get(self, path: str, headers: dict[str, str] | None = None, **kw) -> Response:
        return request(self.url, "GET", path, headers, **kw)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None, **kw) -> Response:
        return request(self.url, "POST", path, headers, body=body, **kw)

    def auth(self, username: str | bytes, password: str | bytes, headers: dict[str, str] | None = None, **kw) -> Response:
        return self.get("/auth", {"Authorization": basic(username, password), **(headers or {})}, **kw)
