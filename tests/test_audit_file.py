"""The audit log file (issue 9 item 7): created 0600, and never a password in it."""

from __future__ import annotations

import json
import stat

from support.gateway import static_users, write_conf
from support.net import wait_for


def test_audit_file_is_created_private_and_holds_no_password(conf_dir, demo_hash, start_gateway, tmp_path):
    audit = tmp_path / "audit" / "authgw-audit.jsonl"
    audit.parent.mkdir()
    conf = write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\naudit:\n  file: {audit}\n",
        **static_users({"alice": demo_hash}),
    })
    gw = start_gateway(conf)
    assert gw.auth("alice", "demo-password").status == 200
    assert gw.auth("alice", "Wrong-Secret-42").status == 401
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    wait_for(lambda: audit.read_text().count("\n") >= 2, 10, interval=0.05,  # written just after the answer
             what="two audit lines")
    text = audit.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # one JSON object a line
    assert [(r["username"], r["outcome"]) for r in records] == [("alice", "success"), ("alice", "invalid_credentials")]
    assert "demo-password" not in text and "Wrong-Secret-42" not in text
