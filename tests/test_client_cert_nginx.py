"""Certificate headers through a real nginx (Debian ``nginx``): the recipe of
docs/plugins/client_cert.md, ``$ssl_client_escaped_cert`` in ``X-SSL-Client-Cert``, in front of a
real ``authgw serve``. Issue 9 item 1: a client without a certificate who sends its own
``X-Forwarded-Client-Cert`` (nginx passes it through) or ``X-SSL-Client-Cert`` (nginx replaces
it) must not log in.

The nginx configuration lives in this file (not in tests/support) so it does not clash with
other nginx fixtures. nginx runs in the foreground with ``master_process off`` (one process, no
user switch), in a temp dir, on a free port, and is stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from support.gateway import GatewayProcess, write_conf
from support.net import free_port, wait_for_port
from support.pki import CA, write_bundle
from support.proc import stop

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                                reason="Debian nginx is not installed (.ci/install-system-packages)")

NGINX_CONF = """
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate     {d}/server.crt;
        ssl_certificate_key {d}/server.key;
        ssl_client_certificate {d}/root.pem;
        ssl_verify_client optional_no_ca;
        location = /_auth {{
            internal;
            proxy_pass http://127.0.0.1:{gateway}/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
        }}
        location / {{
            auth_request /_auth;
            auth_request_set $user $upstream_http_remote_user;
            # `return` would answer in the rewrite phase, before auth_request: serve a file.
            add_header X-User $user always;
            root {d}/www;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("nginx")
    root = CA.create("nginx test root")
    write_bundle(d / "root.pem", root)
    root.issue("localhost", dns=["localhost"], ips=["127.0.0.1"], server=True).write(d, "server")
    alice = root.issue("alice", client=True)
    alice.write(d, "alice")
    conf = write_conf(d / "conf.d", {
        "gateway.yaml": json.dumps({"chain": ["client_cert"], "trusted_proxies": ["127.0.0.1/32"],
                                    "throttle": {"enabled": False}}),
        # One header for every trusted proxy: the nginx form.
        "client_cert.yaml": json.dumps({"client_cert": {
            "ca_bundle": str(d / "root.pem"), "headers": [{"name": "X-SSL-Client-Cert", "format": "pem"}],
            "revocation": "off", "mapping": {"lookup": False, "rules": ["cn"]}}}),
    })
    gateway = GatewayProcess(conf, d / "state").start()
    port = free_port()
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("app\n")
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port, gateway=gateway.port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-e", str(d / "error.log"), "-p", str(d), "-c", str(d / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, timeout=15, proc=proc)
        yield d, port, gateway, alice
    finally:
        stop(proc)
        gateway.stop()


def curl(d: Path, port: int, *args: str) -> tuple[int, str]:
    """(status, the user nginx passed on to the application)."""
    result = subprocess.run(["curl", "-sS", "--max-time", "15", "-D", "-", "-o", "/dev/null",
                             "--cacert", str(d / "root.pem"), *args, f"https://127.0.0.1:{port}/"],
                            capture_output=True, text=True, timeout=30)
    lines = result.stdout.splitlines()
    user = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-user:")), "")
    return int(lines[0].split()[1]), user


def test_certificate_through_nginx_logs_in(setup):
    d, port, gateway, _ = setup
    before = len(gateway.audit())
    assert curl(d, port, "--cert", str(d / "alice.crt"), "--key", str(d / "alice.key")) == (200, "alice")
    # the audit's method names the certificate nginx forwarded ("none" before: a search for
    # certificate logins missed every proxied one; review of what the gateway writes)
    records = [(r["outcome"], r["method"]) for r in gateway.audit()[before:]]
    assert records and set(records) == {("success", "certificate")}, records


def test_no_certificate_and_injected_headers_through_nginx(setup):
    d, port, gateway, alice = setup
    escaped = quote(alice.pem.decode(), safe="")
    before = len(gateway.audit())
    # nginx passes a client's XFCC through unchanged (the issue's reproduction: 200 as alice).
    code, body = curl(d, port, "-H", f'X-Forwarded-Client-Cert: Hash=00;Cert="{escaped}"')
    assert (code, body) == (401, "")
    # nginx replaces a client's X-SSL-Client-Cert with its (empty) variable.
    code, body = curl(d, port, "-H", f"X-SSL-Client-Cert: {escaped}")
    assert (code, body) == (401, "")
    records = gateway.audit()[before:]
    assert [(r["outcome"], r["method"]) for r in records] == [("not_applicable", "none")] * 2
    assert "ignored the x-forwarded-client-cert header from 127.0.0.1" in gateway.output()
