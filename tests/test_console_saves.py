"""Review findings on the console, through a real ``authgw serve``: ``listen`` takes only an IP
address (a name lets another local user take the one-time link), a save changes all its files or
none, a URL's password is never shown, a CA upload holds only certificates, and a form over the
size limit gets the console's own page."""

from __future__ import annotations

import os
import re
import socket
import stat

import pytest
import yaml

from support.console import console_conf, console_session, signed_in
from support.gateway import authgw
from support.net import free_port
from support.pki import CA


@pytest.fixture
def console(conf_dir, demo_hash, start_gateway):
    return console_session(conf_dir, demo_hash, start_gateway)


def directory_fields(**overrides) -> dict[str, str]:
    """A form that validates without a directory running (no test connects at save time)."""
    return {"preset": "openldap", "servers": "ldaps://127.0.0.1:1", "base_dn": "dc=example,dc=com",
            "bind_dn": "cn=svc,dc=example,dc=com", "password": "Svc-Pa55-new", **overrides}


def config_check(conf_dir, state_dir):
    return authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(state_dir))


def hidden_files(directory) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*"))


# -- 1. listen: an IP address, and the link names it -------------------------------------------


def test_a_host_name_in_listen_is_refused_with_the_file_and_line(conf_dir, demo_hash, tmp_path):
    """``localhost`` resolves to 127.0.0.1 and ::1; the console binds one, the link named the
    other's name too, and a browser trying ::1 first gave the token to whoever bound [::1]:PORT."""
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    for name in ("console.example", "ip6-localhost"):
        (conf_dir / "console.yaml").write_text(f"console:\n  hosts: [console.example]\n  listen: {name}:{port}\n")
        result = config_check(conf_dir, tmp_path / "state")
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert re.search(rf"console\.yaml:3: console\.listen: {name}:{port}: give an IP address, not a host name "
                         rf"\(127\.0\.0\.1:{port} or \[::1\]:{port}\)", result.stderr), result.stderr
    # A name is refused with TLS too: the link would still name the address the name resolves to.
    cert, key = CA.create().issue("console.example", dns=["console.example"]).write(tmp_path, "console")
    (conf_dir / "console.yaml").write_text(f"console:\n  listen: console.example:{port}\n  tls_cert: {cert}\n"
                                           f"  tls_key: {key}\n")
    assert "give an IP address" in config_check(conf_dir, tmp_path / "state").stderr


def test_localhost_in_listen_is_127_0_0_1_and_the_link_says_so(conf_dir, demo_hash, start_gateway):
    """The one name older configurations hold keeps working: bound, and named in the link, as
    127.0.0.1, never as the name a browser may resolve to ::1 first."""
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    (conf_dir / "console.yaml").write_text(f"console:\n  listen: localhost:{port}\n")
    gw = start_gateway(conf_dir)
    result = authgw("console", "--config", str(gw.conf_dir), "--state-dir", str(gw.state_dir))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/login/[A-Za-z0-9_-]+", result.stdout.strip()), result.stdout
    assert signed_in(gw, f"http://127.0.0.1:{port}").get("/status").status == 200


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1"])
def test_the_link_names_the_address_the_console_binds(address, conf_dir, demo_hash, start_gateway):
    if address == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    port = free_port("::1" if address == "::1" else "127.0.0.1")
    host = f"[{address}]" if ":" in address else address
    console_conf(conf_dir, port, demo_hash)
    # Written as it may be typed (IPv6 without brackets too): the link uses the canonical form.
    written = {"::1": f"'0:0:0:0:0:0:0:1:{port}'"}.get(address, f"{address}:{port}")
    (conf_dir / "console.yaml").write_text(f"console:\n  listen: {written}\n")
    gw = start_gateway(conf_dir)
    result = authgw("console", "--config", str(gw.conf_dir), "--state-dir", str(gw.state_dir))
    assert result.returncode == 0, result.stderr
    link = result.stdout.strip()
    assert re.fullmatch(rf"http://{re.escape(host)}:{port}/login/[A-Za-z0-9_-]+", link), link
    assert f"ssh -L {port}:{host}:{port} THIS-HOST" in result.stderr
    client = signed_in(gw, f"http://{host}:{port}")  # the link works where it points
    assert client.get("/status").status == 200


# -- 2. a save changes all its files or none ------------------------------------------------------


def test_a_save_that_cannot_write_a_file_changes_nothing_and_says_why(console, conf_dir):
    """conf.d/console a dangling symlink: the validation copy skips it, so the check passed and
    the chain edit was written before the password failed (a 500, and a conf.d that no longer
    loaded: ``chain: [ldap, static]`` without ``ldap:``)."""
    gw, client = console
    (conf_dir / "console").symlink_to("/nonexistent/authgw-secrets")
    before = {p.name: p.read_bytes() for p in conf_dir.iterdir() if p.is_file()}
    response = client.post_form("/setup/directory", directory_fields())
    assert response.status == 400, (response.status, gw.output()[-3000:])
    errors = re.search(r'<div class="error" id="errors".*?</div>', response.text, re.S).group(0)
    assert "conf.d/console" in errors and "/nonexistent/authgw-secrets, which does not exist" in errors, errors
    assert "nothing saved" in errors
    assert "Svc-Pa55-new" not in response.text
    assert {p.name: p.read_bytes() for p in conf_dir.iterdir() if p.is_file()} == before
    assert (conf_dir / "gateway.yaml").read_text().startswith("chain: [static]\n")
    assert not (conf_dir / "50-console.yaml").exists() and hidden_files(conf_dir) == []
    assert config_check(conf_dir, gw.state_dir).returncode == 0
    output = gw.output()
    assert "Traceback" not in output and " 500 " not in output
    assert client.get("/setup").status == 200


def test_a_symlinked_chain_file_is_written_through(console, conf_dir, tmp_path):
    """conf.d/gateway.yaml -> a file kept elsewhere: the edit changes that file; the link stays."""
    gw, client = console
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "gateway.yaml").write_bytes((conf_dir / "gateway.yaml").read_bytes())
    (shared / "gateway.yaml").chmod(0o640)
    (conf_dir / "gateway.yaml").unlink()
    (conf_dir / "gateway.yaml").symlink_to(shared / "gateway.yaml")
    response = client.post_form("/setup/directory", directory_fields())
    assert response.status == 303, response.text
    assert (conf_dir / "gateway.yaml").is_symlink()
    assert os.readlink(conf_dir / "gateway.yaml") == str(shared / "gateway.yaml")
    assert (shared / "gateway.yaml").read_text().startswith("chain: [ldap, static]\n")
    assert stat.S_IMODE((shared / "gateway.yaml").stat().st_mode) == 0o640
    assert hidden_files(conf_dir) == [] and hidden_files(shared) == []
    assert config_check(conf_dir, gw.state_dir).returncode == 0


def test_a_rename_that_fails_puts_back_the_files_already_renamed(tmp_path, demo_hash, monkeypatch):
    """The last step (the chain edit) fails after the password and 50-console.yaml are in place:
    both are put back as they were, and the form names the file and the error."""
    from gateway.plugins.console import setup

    conf = tmp_path / "conf.d"
    console_conf(conf, free_port(), demo_hash)
    form = setup.DirectoryForm(**{k: v for k, v in directory_fields().items()})
    assert setup.save_directory(form, conf, tmp_path / "state") == []
    (conf / "gateway.yaml").write_text("chain: [static]\nplugins: [console]\n"
                                       f"audit:\n  file: \"{tmp_path / 'audit.log'}\"\n")
    before = {str(p.relative_to(conf)): p.read_bytes() for p in conf.rglob("*") if p.is_file()}
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst) == str(conf / "gateway.yaml"):  # the real file, not the validation copy's
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    changed = setup.DirectoryForm(**directory_fields(password="Another-Pa55", bind_dn="cn=other,dc=example,dc=com"))
    problems = setup.save_directory(changed, conf, tmp_path / "state")
    monkeypatch.undo()
    assert len(problems) == 1 and "gateway.yaml: could not be written (No space left on device)" in problems[0]
    assert problems[0].endswith("nothing saved")
    assert {str(p.relative_to(conf)): p.read_bytes() for p in conf.rglob("*") if p.is_file()} == before
    assert stat.S_IMODE((conf / "console" / "ldap-bind-password").stat().st_mode) == 0o600


def test_a_first_save_that_fails_leaves_no_directory_behind(tmp_path, demo_hash, monkeypatch):
    """The first save makes conf.d/console for the password and the CA; when the CA's rename
    fails, the files and the directory made for them go (the directory was removed before the
    CA's temporary file, so it stayed, empty) (review of this stop's diff)."""
    from gateway.plugins.console import setup
    from support.pki import CA

    conf = tmp_path / "conf.d"
    console_conf(conf, free_port(), demo_hash)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst) == str(conf / setup.CA_FILE):
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    form = setup.DirectoryForm(**directory_fields(), ca_upload=CA.create().pem)
    problems = setup.save_directory(form, conf, tmp_path / "state")
    monkeypatch.undo()
    assert len(problems) == 1 and problems[0].endswith("nothing saved"), problems
    assert not (conf / "console").exists() and hidden_files(conf) == []


# -- 3. a password in a URL is never shown --------------------------------------------------------


def test_the_setup_page_hides_a_password_in_a_stored_url(console, conf_dir):
    gw, client = console
    stored = ("ldap:\n  preset: openldap\n  servers: ['ldaps://svc:S3cr3t-Pw@127.0.0.1:1636', "
              "'ldaps://127.0.0.1:2636']\n  base_dn: dc=example,dc=com\n")
    (conf_dir / "50-console.yaml").write_text(stored)  # ldap is not in the chain: ignored by the gateway
    page = client.get("/setup")
    assert page.status == 200
    assert "S3cr3t-Pw" not in page.text and "svc:S3" not in page.text
    shown = re.search(r'name="servers" value="([^"]*)"', page.text).group(1)
    assert shown == "ldaps://***@127.0.0.1:1636 ldaps://127.0.0.1:2636"
    # Sent back unchanged: the stored URL is what is checked (and refused: the ldap plugin takes
    # no credential in a URL), never the hidden form written over it.
    response = client.post_form("/setup/directory", directory_fields(servers=shown))
    assert response.status == 400
    assert "no user name or password in the URL" in response.text and "S3cr3t-Pw" not in response.text
    assert (conf_dir / "50-console.yaml").read_text() == stored


def test_a_url_shown_hidden_is_saved_as_the_stored_one():
    from gateway.plugins.console.setup import _stored_servers

    stored = ["ldaps://svc:S3cr3t-Pw@dc1.example.com", "ldaps://dc2.example.com"]
    assert _stored_servers(["ldaps://***@dc1.example.com", "ldaps://dc2.example.com"], stored) == stored
    assert _stored_servers(["ldaps://dc1.example.com"], stored) == ["ldaps://dc1.example.com"]  # changed
    assert _stored_servers(["ldaps://***@dc1.example.com"], None) == ["ldaps://***@dc1.example.com"]


# -- 4. a CA upload holds certificates only -------------------------------------------------------


def test_a_ca_upload_with_a_private_key_is_refused_and_not_echoed(console, conf_dir):
    gw, client = console
    ca = CA.create()
    leaf = ca.issue("dc1.example.com", dns=["dc1.example.com"])
    key_body = leaf.key_pem.decode().splitlines()[1]
    for upload in (ca.pem + leaf.key_pem, leaf.key_pem + ca.pem):
        response = client.post_multipart("/setup/directory", directory_fields(ca_path=""),
                                         {"ca_upload": ("ca.pem", upload)})
        assert response.status == 400, response.text
        assert "not a certificate (PRIVATE KEY)" in response.text and "never a private key" in response.text
        assert key_body not in response.text and "Svc-Pa55-new" not in response.text
        assert not (conf_dir / "console").exists() and not (conf_dir / "50-console.yaml").exists()
    assert key_body not in gw.output()


def test_a_ca_upload_is_stored_as_its_certificates_only(console, conf_dir):
    gw, client = console
    ca, other = CA.create(), CA.create("second CA")
    upload = b"Bag Attributes\n    friendlyName: dc\n" + ca.pem + b"\nsome text\n" + other.pem
    response = client.post_multipart("/setup/directory", directory_fields(ca_path=""),
                                     {"ca_upload": ("ca.pem", upload)})
    assert response.status == 303, response.text
    stored = conf_dir / "console" / "ldap-ca.pem"
    assert stored.read_bytes() == ca.pem + other.pem
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644
    assert yaml.safe_load((conf_dir / "50-console.yaml").read_text())["ldap"]["ca_file"] == "console/ldap-ca.pem"


# -- 5. the size limit ------------------------------------------------------------------------------


def test_a_form_over_the_limit_gets_the_consoles_own_page(console, conf_dir):
    gw, client = console
    bundle = b"".join(CA.create(f"CA {i}").pem for i in range(160))  # about 80 KiB
    assert len(bundle) > 64 * 1024
    response = client.post_multipart("/setup/directory", directory_fields(ca_path=""),
                                     {"ca_upload": ("bundle.pem", bundle)})
    assert response.status == 413
    assert response.header("Content-Type").startswith("text/html")
    assert response.header("Content-Security-Policy") and response.header("Cache-Control") == "no-store"
    assert "larger than 64 KiB, the console&#39;s limit" in response.text
    assert "give the path of a larger CA file" in response.text
    assert not (conf_dir / "50-console.yaml").exists()
    # Without a Content-Length (chunked), found while reading: the same page.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(client.base.rsplit(":", 1)[1]), timeout=15)
    try:
        conn.request("POST", f"{client.prefix}setup/directory", body=iter([f"csrf={client.csrf}&x=".encode(),
                                                                          b"a" * 80 * 1024]),
                     headers={"Content-Type": "application/x-www-form-urlencoded",
                              "Cookie": "; ".join(f"{k}={v}" for k, v in client.cookies.items())},
                     encode_chunked=True)
        chunked = conn.getresponse()
        assert chunked.status == 413 and "larger than 64 KiB" in chunked.read().decode()
    finally:
        conn.close()
    page = client.get("/setup")  # the session goes on, and the form says the limit
    assert page.status == 200 and "up to 64 KiB" in page.text
    assert "Traceback" not in gw.output()
