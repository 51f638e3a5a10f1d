"""Real ``authgw serve`` masters with a static directory of one user, ``alice``, and the test
plugins a supervisor test installs for its workers: what the supervisor's review tests share.

A test module takes the ``alice_hash`` fixture by name::

    from support.supervisorenv import PASSWORD, alice_hash, gateway_yaml  # noqa: F401 - fixtures
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from support.fakedist import make_dist
from support.gateway import static_users, write_conf

__all__ = ["PASSWORD", "TESTS_DIR", "alice_hash", "alive", "conf", "gateway_yaml", "master_pid", "plugins_env", "realm",
           "realms", "serving"]

PASSWORD = "Corr3ct-Horse-Battery"
#: The tests folder: on a worker's PYTHONPATH, the ``support`` package and the test modules.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def alice_hash():
    """:data:`PASSWORD`, hashed once for the module."""
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


def gateway_yaml(realm: str, extra: str = "") -> str:
    """gateway.yaml for ``chain: [static]``, no throttle, a 60 s deadline and the Basic *realm*
    (which tells a test which configuration a worker serves); *extra* lines appended."""
    return f"chain: [static]\nthrottle:\n  enabled: false\ndeadline: 60\nrealm: {realm}\n{extra}"


def conf(conf_dir: Path, alice_hash: str, realm: str, extra: str = "") -> Path:
    """*conf_dir* holding :func:`gateway_yaml` and the static users file with ``alice``."""
    return write_conf(conf_dir, {"gateway.yaml": gateway_yaml(realm, extra), **static_users({"alice": alice_hash})})


def plugins_env(site: Path, name: str, plugins: dict[str, str], files: dict[str, str]) -> dict[str, str]:
    """The environment (PYTHONPATH) under which a gateway finds the plugins *plugins* (entry
    point name to ``module:Class``) of a distribution *name* installed at *site* with *files*,
    and the tests' own modules."""
    site = make_dist(site, name, plugins, files)
    return {"PYTHONPATH": os.pathsep.join([str(site), TESTS_DIR, os.environ.get("PYTHONPATH", "")])}


# -- what the workers do ------------------------------------------------------------------------------


def realm(name: str) -> str:
    """The ``WWW-Authenticate`` header of a configuration whose Basic realm is *name*."""
    return f'Basic realm="{name}", charset="UTF-8"'


def realms(gw, count: int = 30, **request) -> set[str]:
    """The realms answered on *count* new connections (two workers on reuse_port sockets: all on
    one has odds of 2**-29); *request*: the requests' options (``timeout``)."""
    return {gw.auth("alice", "wrong", **request).header("WWW-Authenticate") for _ in range(count)}


def serving(gw) -> list[int]:
    """The workers that said they serve, in order."""
    return [int(pid) for pid in re.findall(r"authgw worker (\d+) serving", gw.output())]


def master_pid(gw) -> int:
    return int((gw.state_dir / "authgw.pid").read_text())


def alive(pid: int) -> bool:
    """*pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
