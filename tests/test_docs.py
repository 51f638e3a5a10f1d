"""Documentation that is derived from code must match it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from gateway import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def test_every_hook_spec_has_a_contract_docstring():
    specs = [(name, f) for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("gateway_")]
    assert len(specs) >= 10
    for name, func in specs:
        doc = inspect.getdoc(func) or ""
        assert len(doc) > 80, f"{name} needs a docstring that states its contract"
        assert "versionadded" in doc, f"{name} must say when it was added"


def test_every_hook_is_in_the_reference_and_the_reference_is_current():
    text = (ROOT / "docs" / "plugins.md").read_text()
    for name, _ in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("gateway_"):
            assert f"### `{name}(" in text, f"{name} is missing from docs/plugins.md"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_core_setting_is_in_the_configuration_reference():
    from gateway.settings import GatewaySettings

    text = (ROOT / "docs" / "config-reference.md").read_text()
    for name in GatewaySettings.model_fields:
        assert f"| `{name}` |" in text


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/test" in readme and "tools/test" in ci


def test_the_model_reference_documents_every_field_and_the_decision_constructors():
    import dataclasses

    from gateway import model

    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[text.index("<!-- model-reference:begin"):text.index("<!-- model-reference:end")]
    for cls in (model.Attempt, model.Decision, model.Identity):
        for f in dataclasses.fields(cls):
            (row,) = [line for line in section.splitlines() if line.startswith(f"| `{f.name}` |")
                      and line in section.split(f"### `{cls.__name__}`")[1].split("### ")[0]]
            assert not row.rstrip().endswith("|  |"), f"{cls.__name__}.{f.name} needs an :ivar: in its docstring"
    assert "`Decision.allow(identity: Identity, *, step: str, reason: str = '', from_cache: bool = False, " \
           "answered_by: str = '') -> Decision`" in section
    assert "`Decision.deny(outcome: Outcome, *, step: str, reason: str, answered_by: str = '') -> Decision`" in section
    assert "DESIGN.md section 3" not in text and "[design.md](design.md)" in text


def test_the_api_reference_and_the_config_schema_docs_are_current():
    for name in ("api.md", "openapi.json"):
        assert (ROOT / "docs" / name).exists(), f"run python tools/gen_docs.py ({name})"
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    assert "# yaml-language-server: $schema=" in configuration and "authgw config schema" in configuration


def test_the_config_schema_accepts_the_shipped_conf_d_and_flags_a_mistake(tmp_path):
    import json
    import shutil

    import jsonschema

    from support.gateway import authgw

    conf = tmp_path / "conf.d"
    shutil.copytree(ROOT / "conf.d", conf)
    result = authgw("config", "schema", "--config", str(conf))
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    jsonschema.validators.Draft202012Validator.check_schema(schema)
    validator = jsonschema.validators.Draft202012Validator(schema)
    from gateway.yamlfiles import load_file

    for path in sorted(conf.glob("*.yaml")):
        assert not list(validator.iter_errors(load_file(path, {}))), path
    assert list(validator.iter_errors({"static": {"users_file": "x", "case_insensitive": "yes"}}))
    assert list(validator.iter_errors({"deadlin": 3}))
    assert not list(validator.iter_errors({"listen": "127.0.0.1:9000"}))


def test_the_wrapper_example_in_plugins_md_runs_as_documented(tmp_path, start_gateway):
    """The worked wrapper (policy) example is real code: installed as a distribution and run."""
    import os

    from gateway.passwords import hash_password
    from support.fakedist import make_dist
    from support.gateway import write_conf

    text = (ROOT / "docs" / "plugins.md").read_text()
    block = text.split("<!-- wrapper-example:begin -->")[1].split("<!-- wrapper-example:end -->")[0]
    source = block.split("```python\n")[1].split("```")[0]
    site = tmp_path / "site"
    make_dist(site, "authgw-requiregroup", {"requiregroup": "authgw_requiregroup:RequireGroupPlugin"},
              {"authgw_requiregroup.py": source})
    digest = hash_password("Pw-for-both-1")
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": "chain: [static]\nplugins: [requiregroup]\nthrottle: {enabled: false}\n",
        "requiregroup.yaml": "requiregroup:\n  group: vpn-users\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "users/users.yaml": f'users:\n  alice:\n    password_hash: "{digest}"\n    groups: [vpn-users]\n'
                            f'  bob:\n    password_hash: "{digest}"\n    groups: [staff]\n',
    })
    gw = start_gateway(conf, env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])})
    member, other, wrong = gw.auth("alice", "Pw-for-both-1"), gw.auth("bob", "Pw-for-both-1"), gw.auth("alice", "x")
    assert (member.status, other.status, wrong.status) == (200, 401, 401)
    assert (gw.audit_for(other.header("X-Request-Id"))["reason"],
            gw.audit_for(wrong.header("X-Request-Id"))["reason"]) == ("requiregroup.not_member", "static.invalid_password")
