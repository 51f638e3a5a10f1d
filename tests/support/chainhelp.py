"""Building a core in-process from test plugins, and running attempts through it."""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import ipaddress
import time
import uuid
from pathlib import Path

import yaml

from gateway.model import Attempt, PasswordCredential
from gateway.registry import ENTRY_POINT_GROUP, PluginInfo
from gateway.runtime import Runtime, build_runtime


def plugin_info(name: str, target: str) -> PluginInfo:
    return PluginInfo(name, target, "authgw-tests", "0", md.EntryPoint(name, target, ENTRY_POINT_GROUP))


def build(tmp_path: Path, gateway: dict, sections: dict | None = None,
          targets: dict[str, str] | None = None) -> Runtime:
    """A runtime over a conf.d written from *gateway* (core keys) and *sections* (plugin keys).

    Every plugin name maps to ``support.testplugins:Step`` unless *targets* says otherwise.
    """
    conf = tmp_path / f"conf-{uuid.uuid4().hex[:6]}"
    conf.mkdir()
    (conf / "gateway.yaml").write_text(yaml.safe_dump({"throttle": {"enabled": False}, **gateway}))
    for name, section in (sections or {}).items():
        (conf / f"{name}.yaml").write_text(yaml.safe_dump({name: section}))
    names = [*gateway.get("chain", []), *gateway.get("plugins", [])]
    discovered = {n: plugin_info(n, (targets or {}).get(n, "support.testplugins:Step")) for n in names}
    return build_runtime(conf, state_dir=tmp_path / "state", discovered=discovered)


def static_runtime(tmp_path: Path, users_yaml: str, **settings) -> tuple[Runtime, Path]:
    """A runtime whose chain is the ``static`` plugin over a users file holding *users_yaml*
    (0600), with *settings*; and that file."""
    users = tmp_path / "users.yaml"
    users.write_text(users_yaml)
    users.chmod(0o600)
    return build(tmp_path, {"chain": ["static"]}, {"static": {"users_file": str(users), **settings}},
                 targets={"static": "gateway.plugins.static:StaticPlugin"}), users


def attempt(username: str = "alice", password: str = "pw", deadline: float = 5.0) -> Attempt:
    return Attempt(request_id=uuid.uuid4().hex, client=ipaddress.ip_address("192.0.2.10"), front_door="test",
                   deadline=time.monotonic() + deadline, password=PasswordCredential(username, password))


def decide(runtime: Runtime, att: Attempt | None = None):
    return asyncio.run(runtime.gateway.authenticate(att or attempt()))
