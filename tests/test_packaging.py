"""Packaging: plugins/ is installed as gateway.plugins, never as a top-level `plugins`."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

from gateway.registry import ENTRY_POINT_GROUP, discover

BUILT_INS = {"static", "ldap", "kerberos", "client_cert", "cache", "login", "link", "relay", "console"}


def test_no_top_level_plugins_package_is_installed(tmp_path):
    # Run from an empty directory so the source tree is not on sys.path.
    # (In the source tree, authgw.egg-info/SOURCES.txt would list source paths instead.)
    code = ("import importlib.util, importlib.metadata as md, gateway.plugins.static as s;"
            "print(importlib.util.find_spec('plugins') is None, s.__name__,"
            " [str(f) for f in md.files('authgw') or [] if str(f).split('/')[0] == 'plugins'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "gateway.plugins.static", "[]"]


def test_built_ins_are_declared_in_the_public_entry_point_group():
    points = {ep.name: ep.value for ep in md.entry_points(group=ENTRY_POINT_GROUP) if ep.dist.name == "authgw"}
    assert set(points) == BUILT_INS
    assert all(value.startswith("gateway.plugins.") for value in points.values())
    assert BUILT_INS <= set(discover())


def test_discovery_imports_nothing(tmp_path):
    code = ("import sys; from gateway.registry import discover; found = discover();"
            "print(sorted(m for m in sys.modules if m.startswith('gateway.plugins.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
