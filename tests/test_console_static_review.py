"""Review of the console and the static users file, against a real ``authgw serve``.

* A users file edited while a broken version of it was being parsed: the edit was taken for the
  broken version (the file's signature was read *after* the failed parse) and never applied, so
  the password it replaced kept working.
* ``authgw console`` printed its one-time link while another local user's server held the
  console's address (the console not running yet): that server got the token and opened a
  session with it once the console was up. Now the link is printed only while a socket of this
  gateway's user listens there.
* A users-file name not in the core's one spelling of names (``José`` decomposed, ``bob ``)
  never logged in, however typed.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import unicodedata

import pytest

from gateway.passwords import hash_password
from support.console import ConsoleClient, SessionClient, console_conf, console_link, link_path
from support.gateway import GatewayProcess, authgw, write_conf
from support.http import request
from support.net import free_port, wait_for

_IN_CLOSE_NOWRITE = 0x10


def _watch_reads(path) -> int:
    """An inotify descriptor that becomes readable when a reader closes *path* (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    assert libc.inotify_add_watch(fd, os.fsencode(path), _IN_CLOSE_NOWRITE) >= 0, os.strerror(ctypes.get_errno())
    return fd


def _replace(path, text: str) -> None:
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    new.chmod(0o600)
    os.replace(new, path)


def test_an_edit_saved_while_a_broken_version_is_parsed_is_applied(conf_dir, start_gateway, demo_hash):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nthrottle: {enabled: false}\n",
                          "static.yaml": "static:\n  users_file: users/u.yaml\n  reload_interval: 0.05\n",
                          "users/u.yaml": f'users:\n  demo:\n    password_hash: "{demo_hash}"\n'})
    users = conf_dir / "users" / "u.yaml"
    users.chmod(0o600)
    gateway = start_gateway(conf_dir)
    assert gateway.auth("demo", "demo-password").status == 200
    # A broken version that takes a while to parse (about 1 MiB: a second or so), then, as soon
    # as the gateway has read it (inotify: the file closed after reading), the fixed version
    # with demo's new password: the gateway is still parsing the broken one.
    _replace(users, "users:\n" + "".join(f'  u{i}:\n    password_hash: "{demo_hash}"\n' for i in range(10000))
             + "  broken: [\n")
    watch = _watch_reads(users)
    time.sleep(0.2)  # past reload_interval since the last login: the next one checks the file
    try:
        first = []
        login = threading.Thread(target=lambda: first.append(gateway.auth("demo", "demo-password").status))
        login.start()  # its check of the file reads the broken version
        assert select.select([watch], [], [], 30)[0], "the gateway did not read the broken version"
        _replace(users, f'users:\n  demo:\n    password_hash: "{hash_password("rotated")}"\n')
        login.join(30)
    finally:
        os.close(watch)
    assert first == [200], "the broken version keeps the previous users"
    assert "not reloaded" in gateway.output()
    # The fixed version is a version of its own: the next check applies it.
    wait_for(lambda: gateway.auth("demo", "rotated").status == 200, 15,
             what="the edit saved during the parse to be applied", log=gateway.output)
    assert gateway.auth("demo", "demo-password").status == 401, "the replaced password still works"


# -- the one-time link goes only to this gateway's console ----------------------------------------

_SQUATTER = r"""
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(self.path, flush=True)
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _other_users_server(port: int) -> subprocess.Popen:
    """A web server of another local user (nobody) on the console's address and port."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root (to run a server as another user) and /usr/bin/python3")
    server = subprocess.Popen([python, "-c", _SQUATTER, str(port)], user=65534, group=65534,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for(lambda: _listening(port), 15, what="the other user's server to listen")
    return server


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_no_link_is_printed_for_an_address_another_user_listens_on(conf_dir, demo_hash, tmp_path, start_gateway):
    """The console not running (not started yet, restarting, or `plugins: [console]` added but
    not yet loaded), another local user's server on its address received the one-time token
    when the operator opened the link, and opened a session with it once the console was up."""
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    state = tmp_path / "state0"  # the state directory start_gateway gives the first gateway
    squatter = _other_users_server(port)
    try:
        result = authgw("console", "--config", str(conf_dir), "--state-dir", str(state))
        link = result.stdout.strip()
        if link:  # the operator opens what was printed
            request(f"http://127.0.0.1:{port}", "GET", link_path(link))
    finally:
        squatter.terminate()
        stolen = squatter.communicate(timeout=15)[0].split()
    gateway = start_gateway(conf_dir)
    assert gateway.state_dir == state
    taken = [ConsoleClient(f"http://127.0.0.1:{port}").get(path).status for path in stolen]
    assert 303 not in taken, "another user's server took the link and opened a session with it"
    assert result.returncode != 0 and not link, result.stdout
    assert "uid 65534" in result.stderr and f"127.0.0.1:{port}" in result.stderr, result.stderr
    assert not stolen
    # With the console up, the link is printed, and works.
    SessionClient(f"http://127.0.0.1:{port}").sign_in(console_link(gateway))


def test_no_link_is_printed_while_the_console_is_not_listening(conf_dir, demo_hash, tmp_path):
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    result = authgw("console", "--config", str(conf_dir), "--state-dir", str(tmp_path / "state"))
    assert result.returncode != 0 and not result.stdout.strip(), result.stdout
    assert f"nothing listens on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert not (tmp_path / "state" / "console-login-link").exists()


# -- users-file names in another spelling than the core gives attempts ----------------------------


def test_a_users_file_name_in_another_spelling_logs_in_as_typed(conf_dir, start_gateway, demo_hash):
    """The core canonicalises the name typed (NFKC, white space trimmed) before any plugin sees
    it; the file was indexed by its names as written, so `José` saved decomposed (as some
    editors save it) or `bob ` could never log in, however typed."""
    decomposed = unicodedata.normalize("NFD", "José")
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nthrottle: {enabled: false}\n",
                          "static.yaml": "static:\n  users_file: users/u.yaml\n",
                          "users/u.yaml": f'users:\n  "{decomposed}":\n    password_hash: "{demo_hash}"\n'
                                          f'  "bob ":\n    password_hash: "{demo_hash}"\n'})
    (conf_dir / "users" / "u.yaml").chmod(0o600)
    gateway = start_gateway(conf_dir)
    for typed, user in [("José", "José"), (decomposed, "José"), ("bob", "bob"), ("ｂｏｂ", "bob")]:
        response = gateway.auth(typed.encode(), b"demo-password")
        remote_user = (response.header("Remote-User") or "").encode("latin-1").decode("utf-8")  # sent as UTF-8
        assert (response.status, remote_user) == (200, user), typed
        assert gateway.auth(typed.encode(), b"wrong").status == 401, typed


def _check_users(conf_dir, tmp_path, users: dict[str, str], static: str = ""):
    """``authgw config check`` of a chain of ``static`` with these users (name: hash), in order."""
    listed = "".join(f'  "{name}":\n    password_hash: "{digest}"\n' for name, digest in users.items())
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n",
                          "static.yaml": "static:\n  users_file: users/u.yaml\n" + static,
                          "users/u.yaml": "users:\n" + listed})
    (conf_dir / "users" / "u.yaml").chmod(0o600)
    return authgw("config", "check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "state"))


@pytest.mark.parametrize("first, second, said", [
    ("ａｌｉｃｅ", "alice\u200b", "are one name as the gateway reads usernames"),
    ("Alice", "alice", "differ only in case, but case_insensitive is on"),
])
def test_two_users_file_names_the_gateway_reads_as_one_are_refused(conf_dir, tmp_path, demo_hash, first, second,
                                                                    said):
    result = _check_users(conf_dir, tmp_path, {first: demo_hash, second: demo_hash}, "  case_insensitive: true\n")
    assert result.returncode != 0
    assert f"users {first!r} and {second!r} {said}" in result.stderr, result.stderr


def test_a_name_the_gateway_reads_as_another_the_file_holds_is_ignored_not_refused(conf_dir, tmp_path, demo_hash,
                                                                                   start_gateway):
    """`bob` and `"bob "` in one file: before names were read in the core's spelling, `bob`
    logged in and `"bob "` could not; refusing the file would keep a working break-glass file
    from starting after an upgrade. `bob` stays the user, the other is ignored with a warning."""
    other = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$" + "A" * 43
    result = _check_users(conf_dir, tmp_path, {"bob ": other, "bob": demo_hash})
    assert result.returncode == 0, result.stderr
    gateway = start_gateway(conf_dir)
    assert gateway.auth("bob", "demo-password").status == 200
    assert "user 'bob ' is 'bob' as the gateway reads usernames" in gateway.output()


def test_the_listener_check_reads_an_address_with_a_zone(tmp_path):
    """`console.listen: "[fe80::1%lo]:8357"`: /proc/net/tcp6 prints no zone, and an address
    with one equals none without it, so the command always said nothing listened."""
    import ipaddress
    import sys

    from gateway.plugins.console.listening import listening_uids

    def word_hex(address) -> str:
        raw = ipaddress.ip_address(address).packed
        return "".join(f"{int.from_bytes(raw[i:i + 4], sys.byteorder):08X}" for i in range(0, len(raw), 4))

    (tmp_path / "tcp6").write_text(
        "  sl  local_address                         remote_address                        st tx_queue rx_queue tr "
        "tm->when retrnsmt   uid  timeout inode\n"
        f"   0: {word_hex('fe80::1')}:20A5 {word_hex('::')}:0000 0A 00000000:00000000 00:00000000 00000000  "
        "1234        0 4242 1 0000000000000000 100 0 0 10 0\n")
    assert listening_uids(ipaddress.ip_address("fe80::1%lo"), 0x20A5, proc=tmp_path) == {1234}
    assert listening_uids(ipaddress.ip_address("fe80::1"), 0x20A5, proc=tmp_path) == {1234}
    assert listening_uids(ipaddress.ip_address("fe80::2%lo"), 0x20A5, proc=tmp_path) == set()


def test_a_link_printed_before_the_console_restarted_opens_nothing(conf_dir, demo_hash, tmp_path, start_gateway):
    """`authgw console` checked who listened when it printed the link, but the link stayed good
    for 15 minutes across a restart: while the console was down, another local user could bind
    its address, receive the token from the operator's browser, and open a session with it once
    the console was up again (review of the console, left then). The link is tied to the
    listening sockets the command saw; a restarted console listens on new ones and refuses it."""
    port = free_port()
    console_conf(conf_dir, port, demo_hash)
    first = start_gateway(conf_dir)
    link = console_link(first)
    spare = console_link(first)
    first.stop()
    second = GatewayProcess(conf_dir, first.state_dir).start()
    try:
        page = ConsoleClient(f"http://127.0.0.1:{port}").get(link_path(link))
        assert page.status == 403 and "before it restarted" in page.text, (page.status, page.text[:300])
        assert "printed before the console last started was refused" in second.output()
        assert ConsoleClient(f"http://127.0.0.1:{port}").get(link_path(link)).status == 403  # spent
        assert ConsoleClient(f"http://127.0.0.1:{port}").get(link_path(spare)).status == 403
        # A link printed for the console as it runs now works.
        SessionClient(f"http://127.0.0.1:{port}").sign_in(console_link(second))
    finally:
        second.stop()
