"""The example third-party plugin in docs/examples/, installed for real and run in `authgw serve`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.gateway import authgw, static_users, write_conf

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "authgw-denylist"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> dict[str, str]:
    """pip-install the example (without dependencies: authgw is already here) into a target dir."""
    site = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(EXAMPLE)], check=True, cwd=build,
                   env={"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PATH": "/usr/bin:/bin",
                        "HOME": str(build)})
    assert list(site.glob("authgw_denylist-*.dist-info"))
    return {"PYTHONPATH": str(site)}


def conf(conf_dir, demo_hash, chain):
    return write_conf(conf_dir, {
        "gateway.yaml": f"chain: {chain}\nthrottle:\n  enabled: false\n",
        **static_users({"alice": demo_hash, "mallory": demo_hash}),
        "denylist.yaml": "denylist:\n  users: [mallory, 'svc-*']\n",
    })


def test_discovered_but_not_loaded_until_enabled(conf_dir, demo_hash, example_site, tmp_path):
    conf(conf_dir, demo_hash, "[static]")
    listing = authgw("plugins", "--config", str(conf_dir), env=example_site)
    line = next(l for l in listing.stdout.splitlines() if l.startswith("denylist"))
    assert "installed" in line and "authgw-denylist 1.0.0" in line and "authgw_denylist:DenylistPlugin" in line

    code = ("import sys; from pathlib import Path; from gateway.runtime import build_runtime;"
            f"build_runtime(Path({str(conf_dir)!r}), state_dir=Path({str(tmp_path / 's')!r}));"
            "print('authgw_denylist' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__('os').environ, **example_site}, check=True)
    assert result.stdout.strip() == "False", "an installed plugin that is not enabled is never imported"


def test_enabled_example_plugin_runs_in_a_real_server(conf_dir, demo_hash, example_site, start_gateway):
    gw = start_gateway(conf(conf_dir, demo_hash, "[denylist, static]"), env=example_site)
    assert gw.auth("alice", "demo-password").status == 200
    assert gw.auth("mallory", "demo-password").status == 401
    assert gw.auth("SVC-backup", "whatever").status == 401
    reasons = [(a["username"], a["reason"], a["step"]) for a in gw.audit()]
    assert ("mallory", "denylist.user", "denylist") in reasons
    assert ("SVC-backup", "denylist.user", "denylist") in reasons
    check = authgw("check", "--config", str(conf_dir), "--state-dir", str(gw.state_dir), env=example_site)
    assert "PASS  denylist.entries: 2 user patterns, 0 networks" in check.stdout


def test_a_hot_cache_hit_still_asks_the_deny_list(conf_dir, demo_hash, example_site, start_gateway):
    """Issue 9 item 3: a hot-cache hit saves the directory's work, never a policy step's. alice is
    held by the hot cache; adding her to the deny list refuses her on the very next request."""
    files = {
        "gateway.yaml": "chain: [denylist, static]\nplugins: [cache]\nthrottle:\n  enabled: false\n",
        **static_users({"alice": demo_hash}),
        "denylist.yaml": "denylist:\n  users: [mallory]\n  users_file: denied.txt\n",
        "cache.yaml": "cache:\n  methods: [static]\n  hot: {enabled: true, ttl: 600}\n",
    }
    gw = start_gateway(write_conf(conf_dir, files), env=example_site)
    first, second = gw.auth("alice", "demo-password"), gw.auth("alice", "demo-password")
    assert (first.status, first.header("Remote-Auth-Source")) == (200, "live")
    assert (second.status, second.header("Remote-Auth-Source")) == (200, "cache"), "the hot cache holds alice"
    assert gw.audit()[-1]["reason"] == "cache.hot"

    (conf_dir / "denied.txt").write_text("# added by the operator\nalice\n")
    refused = gw.auth("alice", "demo-password")
    assert refused.status == 401
    assert (gw.audit()[-1]["reason"], gw.audit()[-1]["step"]) == ("denylist.user", "denylist")

    (conf_dir / "denied.txt").write_text("")
    assert gw.auth("alice", "demo-password").header("Remote-Auth-Source") == "live", \
        "the refusal also dropped alice's hot entry"
    assert gw.auth("alice", "demo-password").header("Remote-Auth-Source") == "cache"
