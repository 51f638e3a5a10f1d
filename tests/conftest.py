"""Shared fixtures. Servers are real processes on 127.0.0.1, started in temp dirs, stopped by PID."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.gateway import GatewayProcess, write_conf
from support.redis import RedisServer

# The tests write conf.d and users files with plain writes (support.gateway.write_conf) and
# expect the modes a umask of 022 gives (0644 files, 0755 directories): conf.d's permission
# checks and strict mode judge them. Under `umask 002` (Debian and Ubuntu user accounts, some CI
# images) every such file is group-writable, so strict runs failed and warnings appeared where
# none were expected. Set for the whole run, and inherited by the `authgw` processes started.
os.umask(0o022)


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "conf.d"
    directory.mkdir()
    return directory


@pytest.fixture
def start_gateway(tmp_path: Path):
    """``start_gateway(conf_dir, env=..., workers=...)`` starts ``authgw serve``; all are stopped at teardown."""
    started: list[GatewayProcess] = []

    def start(conf: Path, **kwargs) -> GatewayProcess:
        state = tmp_path / f"state{len(started)}"
        gateway = GatewayProcess(conf, state, **kwargs)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def demo_hash() -> str:
    from gateway.passwords import hash_password

    return hash_password("demo-password")


__all__ = ["write_conf"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A redis-server of the test module's own (a module may define its own to override it)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def stack():
    """Things to stop at the end of the test (relays, connectors: anything with ``stop()``), last
    started first."""
    started = []
    yield started
    for thing in reversed(started):
        thing.stop()
