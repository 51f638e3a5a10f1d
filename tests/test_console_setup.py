"""The console's directory step and configuration log against a real slapd, through a real
``authgw serve``: validation with config check's file:line messages, what is saved (and how),
self-tests turning red then green, no stored secret in any page, the status page."""

from __future__ import annotations

import re
import stat

import pytest
import yaml

from support.console import LongLivedCA, SessionClient, console_conf, console_link, console_session
from support.gateway import authgw
from support.net import free_port, wait_for
from support.slapd import Slapd

SERVICE_PASSWORD = "Svc-Pa55-7c1e9f3a"
ALICE = "Al1ce-ldap-password"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory) -> Slapd:
    directory = Slapd(tmp_path_factory.mktemp("ldap") / "slapd", tls=LongLivedCA(),
                      service_password=SERVICE_PASSWORD).start()
    directory.add_user("carol", ALICE, cn="Carol C", mail="carol@example.com", groups=["staff"])
    yield directory
    directory.stop()


@pytest.fixture
def console(conf_dir, demo_hash, start_gateway):
    return console_session(conf_dir, demo_hash, start_gateway)


def directory_form(slapd: Slapd, password: str, **overrides) -> dict[str, str]:
    return {"preset": "openldap", "servers": slapd.ldaps_url, "base_dn": slapd.base_dn,
            "bind_dn": slapd.service_dn, "password": password, "ca_path": str(slapd.ca_file), **overrides}


def statuses(run: dict) -> dict[str, str]:
    return {row["name"].split("[", 1)[0]: row["status"] for row in run["rows"]}


def test_a_wrong_password_turns_test_2_red_and_the_right_one_all_green(slapd, console, conf_dir):
    gw, client = console
    saved = client.post_form("/setup/directory", directory_form(slapd, "wrong-password"))
    assert saved.status == 303, saved.text
    run = client.wait_run(saved.header("Location"))
    assert statuses(run) == {"static.users_file": "pass", "ldap.tcp": "pass", "ldap.tls": "pass",
                             "ldap.bind": "fail", "ldap.search": "skip"}
    bind = next(row for row in run["rows"] if row["name"] == "ldap.bind")
    assert bind["label"] == "Test 2: bind" and "bind_password" in bind["hint"]
    assert "username and password" in bind["check"] or "service account" in bind["check"]
    page = client.get(saved.header("Location"))  # the same log without JavaScript
    assert re.search(r'class="test fail" id="test-\d+" data-name="ldap.bind"', page.text)
    assert "If this test fails" in page.text

    client.get("/setup")
    fixed = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD))
    run = client.wait_run(fixed.header("Location"))
    assert set(statuses(run).values()) == {"pass"}, run
    assert run["summary"] == "5 tests, 0 failed"


def test_what_is_saved_passes_config_check_with_the_secret_in_a_0600_file(slapd, console, conf_dir):
    gw, client = console
    response = client.post_multipart("/setup/directory", directory_form(slapd, SERVICE_PASSWORD, ca_path=""),
                                     {"ca_upload": ("ca.pem", slapd.ca_file.read_bytes())})
    assert response.status == 303, response.text
    data = yaml.safe_load((conf_dir / "50-console.yaml").read_text())["ldap"]
    assert data["bind_password"] == {"file": "console/ldap-bind-password"}
    assert data["ca_file"] == "console/ldap-ca.pem" and data["servers"] == [slapd.ldaps_url]
    secret = conf_dir / "console" / "ldap-bind-password"
    assert secret.read_text() == SERVICE_PASSWORD
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert SERVICE_PASSWORD not in (conf_dir / "50-console.yaml").read_text()
    assert "chain: [ldap, static]" in (conf_dir / "gateway.yaml").read_text()
    check = authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(gw.state_dir))
    assert check.returncode == 0, check.stderr
    assert "chain: ldap -> static" in check.stdout
    assert set(statuses(client.wait_run(response.header("Location"))).values()) == {"pass"}

    # Saving again without typing the password keeps the stored one.
    again = client.post_form("/setup/directory", directory_form(slapd, "", ca_path="console/ldap-ca.pem"))
    assert again.status == 303
    assert secret.read_text() == SERVICE_PASSWORD
    assert set(statuses(client.wait_run(again.header("Location"))).values()) == {"pass"}


def test_no_page_shows_the_stored_password(slapd, console, conf_dir):
    gw, client = console
    saved = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD))
    run_path = saved.header("Location")
    client.wait_run(run_path)
    pages = {path: client.get(path) for path in ("/setup", run_path, "/status", "/status?outcome=success")}
    pages["json"] = client.get("/api/log/" + run_path.split("?")[0].rsplit("/", 1)[1])
    for path, page in pages.items():
        # with the gateway's log: a 500 once in ~50 runs before (issue 14) left no trace to read
        assert page.status == 200, (path, gw.output()[-4000:])
        assert SERVICE_PASSWORD not in page.text, path
    assert "Password: set" in pages["/setup"].text
    assert 'name="password" autocomplete="new-password"' in pages["/setup"].text
    assert 'value="' + SERVICE_PASSWORD not in pages["/setup"].text


def test_an_invalid_combination_is_refused_with_config_checks_message(slapd, console, conf_dir):
    gw, client = console
    response = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD,
                                                                    servers=slapd.url, ca_path=""))
    assert response.status == 400
    # The message config check would give, naming the real conf.d, file and line.
    assert re.search(r"conf\.d/50-console\.yaml:\d+: ldap(\.servers\[0\])?: ldap://127\.0\.0\.1:\d+ is plaintext",
                     response.text), response.text
    assert "authgw-console-" not in response.text  # not the temporary copy's name
    assert not (conf_dir / "50-console.yaml").exists()
    assert not (conf_dir / "console").exists()
    assert "chain: [static]" in (conf_dir / "gateway.yaml").read_text()
    missing = client.post_form("/setup/directory", directory_form(slapd, "", servers=""))
    assert missing.status == 400 and "connection string" in missing.text and "password" in missing.text


def test_the_status_page_shows_servers_throttling_events_and_version(slapd, console, conf_dir, start_gateway):
    gw, client = console
    saved = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD))
    client.wait_run(saved.header("Location"))
    gw.stop()
    gw2 = start_gateway(conf_dir)  # the saved conf.d, as a restart (or a reload) would load it
    assert gw2.auth("carol", ALICE).status == 200
    assert gw2.auth("carol", "wrong").status == 401
    assert gw2.auth("alice", "demo-password").status == 200
    port = int(re.search(r"listen: 127\.0\.0\.1:(\d+)", (conf_dir / "console.yaml").read_text()).group(1))
    client = SessionClient(f"http://127.0.0.1:{port}")
    client.sign_in(console_link(gw2))
    # audit lines reach the file in batches (gateway/audit.py)
    wait_for(lambda: "invalid_credentials" in client.get("/status?user=carol").text, 15, interval=0.2,
             what="carol's refused login on the status page")
    page = client.get("/status")
    assert page.status == 200
    components = re.search(r'<table id="components">.*?</table>', page.text, re.S).group(0)
    assert "<td>ldap</td>" in components and "<td>up</td>" in components
    assert '<p id="throttle">off.</p>' in page.text  # the test configuration turns it off
    assert re.search(r"authgw \d+\.\d+\.\d+; chain: ldap → static", page.text)
    assert "carol" in page.text and "invalid_credentials" in page.text
    only = client.get("/status?user=carol&outcome=invalid_credentials").text
    events = re.findall(r"<tr class=\"(?:pass|fail)\"><td>[^<]*</td><td>[^<]*</td><td>forward_auth</td>\s*<td>(\w*)</td><td>(\w+)</td>", only)
    assert events == [("carol", "invalid_credentials")]
    assert ALICE not in page.text and SERVICE_PASSWORD not in page.text


def test_a_login_works_through_auth_after_the_reload(slapd, console, conf_dir):
    gw, client = console
    if not (gw.state_dir / "authgw.pid").exists():
        pytest.skip("this gateway does not reload on SIGHUP yet (no <state_dir>/authgw.pid)")
    saved = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD))
    assert saved.status == 303 and "saved=reload" in saved.header("Location")
    wait_for(lambda: gw.auth("carol", ALICE).status == 200, 30, interval=0.2, what="carol's login", log=gw.output)


HUP_LISTENER = """
import pathlib, signal, sys, time
signal.signal(signal.SIGHUP, lambda *_: pathlib.Path(sys.argv[1]).write_text("hup"))
print("ready", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end and not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.05)
"""


def test_when_the_tests_have_run_the_pid_in_the_state_dir_gets_sighup(slapd, console, conf_dir, tmp_path):
    """The console's half of the reload: a stand-in master (any process with a SIGHUP handler)
    whose PID is in <state_dir>/authgw.pid is signalled once the save's tests have run."""
    import subprocess
    import sys

    from support.proc import stop

    gw, client = console
    marker = tmp_path / "reloaded"
    master = subprocess.Popen([sys.executable, "-c", HUP_LISTENER, str(marker)], stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout.readline().strip() == "ready"
        (gw.state_dir / "authgw.pid").write_text(f"{master.pid}\n")
        saved = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD))
        assert "saved=reload" in saved.header("Location")
        run = client.wait_run(saved.header("Location"))
        assert set(statuses(run).values()) == {"pass"}
        wait_for(marker.exists, 15, interval=0.05, what="the SIGHUP")
        assert marker.read_text() == "hup"
        assert "reloads its configuration when the tests have run" in client.get(saved.header("Location")).text
    finally:
        stop(master)


def test_a_refused_save_changes_nothing_through_a_symlinked_secrets_directory(console, conf_dir, tmp_path):
    """conf.d/console may be a symlink (secrets kept elsewhere): the validation copy must not
    write through it, or a form that says "not saved" has replaced the live password."""
    from support.pki import CA

    gw, client = console
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "ldap-bind-password").write_text("the-live-password")
    (conf_dir / "console").symlink_to(secrets)
    before = {p.name: p.read_bytes() for p in secrets.iterdir()}
    refused = client.post_multipart("/setup/directory", {
        "preset": "openldap", "servers": "ldap://127.0.0.1:1", "base_dn": "dc=example,dc=com",
        "bind_dn": "cn=svc,dc=example,dc=com", "password": "NEW-UNSAVED-PASSWORD"},
        {"ca_upload": ("ca.pem", CA.create().pem)})
    assert refused.status == 400 and "is plaintext" in refused.text
    assert {p.name: p.read_bytes() for p in secrets.iterdir()} == before
    assert not (conf_dir / "50-console.yaml").exists()


def test_saves_at_once_are_one_after_the_other(conf_dir, demo_hash, start_gateway):
    """Two workers, eight saves at a time: each is whole (no 500, no stray temporary file), and
    the password on disk is the one of the request whose YAML is on disk."""
    import threading

    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    gw = start_gateway(conf_dir, workers=2)
    signed = SessionClient(f"http://127.0.0.1:{port}")
    signed.sign_in(console_link(gw))

    def password(i: int) -> str:
        return f"pw-of-acct{i}:" + str(i) * (5000 * (i % 4))

    def save(i: int, statuses: dict) -> None:
        client = SessionClient(signed.base)
        client.cookies, client.csrf, client.prefix = dict(signed.cookies), signed.csrf, signed.prefix
        statuses[i] = client.post_form("/setup/directory", {
            "preset": "openldap", "servers": f"ldaps://127.0.0.{i + 1}:1", "base_dn": "dc=x",
            "bind_dn": f"cn=acct{i},dc=x", "password": password(i)}).status

    for _ in range(3):
        statuses: dict[int, int] = {}
        threads = [threading.Thread(target=save, args=(i, statuses)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses.values()) == [303] * 8, (statuses, gw.output()[-3000:])
        account = yaml.safe_load((conf_dir / "50-console.yaml").read_text())["ldap"]["bind_dn"]
        i = int(account.split(",")[0].removeprefix("cn=acct"))
        assert (conf_dir / "console" / "ldap-bind-password").read_text() == password(i)
        assert sorted(p.name for p in (conf_dir / "console").iterdir()) == ["ldap-bind-password"]
        assert not list(conf_dir.glob(".*"))
    assert "Traceback" not in gw.output()


def test_a_path_leading_out_of_conf_d_is_the_one_the_gateway_reads(slapd, console, conf_dir):
    """The save is checked on a copy of conf.d in a temporary directory: `../ca.pem` was read
    beside the copy, so a save of what `authgw config check` passes was refused, and an existing
    `users_file: ../users.yaml` refused every save (review of the console)."""
    gw, client = console
    (conf_dir.parent / "ldap-ca.pem").write_bytes(slapd.ca_file.read_bytes())
    response = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD, ca_path="../ldap-ca.pem"))
    assert response.status == 303, response.text
    assert yaml.safe_load((conf_dir / "50-console.yaml").read_text())["ldap"]["ca_file"] == "../ldap-ca.pem"
    assert set(statuses(client.wait_run(response.header("Location"))).values()) == {"pass"}
    refused = client.post_form("/setup/directory", directory_form(slapd, "", ca_path="../no-such-ca.pem"))
    assert refused.status == 400 and "no-such-ca.pem" in refused.text
    assert "authgw-console-" not in refused.text


@pytest.mark.parametrize("field, value, said", [
    ("password", "pw-typed\r\n", "line break"),  # read back without it: another password bound
    ("password", "pw\x00typed", "NUL"),
    ("servers", "ldaps://" + "a" * 64 + ".example.com", "not a valid DNS name"),  # every login a traceback
    ("servers", "ldaps://" + ".".join(["a" * 63] * 4), "not a valid DNS name"),  # 255 characters in all
])
def test_a_value_the_gateway_would_read_otherwise_is_refused(slapd, console, conf_dir, field, value, said):
    gw, client = console
    form = directory_form(slapd, SERVICE_PASSWORD)
    form[field] = value
    refused = client.post_form("/setup/directory", form)
    assert refused.status == 400 and said in refused.text, refused.text[-2000:]
    assert slapd.base_dn in refused.text  # the form comes back as typed
    assert not (conf_dir / "50-console.yaml").exists() and not (conf_dir / "console").exists()


@pytest.mark.parametrize("shape", ["console a file", "password file a directory"])
def test_a_secrets_path_that_cannot_be_written_is_named_not_a_500(slapd, console, conf_dir, shape):
    gw, client = console
    if shape == "console a file":
        (conf_dir / "console").write_text("not a directory")
    else:
        (conf_dir / "console" / "ldap-bind-password").mkdir(parents=True)
    refused = client.post_form("/setup/directory", directory_form(slapd, SERVICE_PASSWORD))
    assert refused.status == 400, refused.text[-2000:]
    assert "console/ldap-bind-password: could not be written" in refused.text and "nothing saved" in refused.text
    assert slapd.base_dn in refused.text
    assert not (conf_dir / "50-console.yaml").exists()
    assert "Traceback" not in gw.output()
