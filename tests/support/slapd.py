"""A real, throwaway OpenLDAP ``slapd`` for tests and benchmarks.

Stable API (other test modules and tools import it; grow it, do not break it)::

    from support.pki import CA
    from support.slapd import Slapd

    slapd = Slapd(tmp_path / "ldap", base_dn="dc=example,dc=com", tls=CA.create()).start()
    slapd.url             # "ldap://127.0.0.1:PORT"   (plain listener; StartTLS works on it when tls=)
    slapd.starttls_url    # "ldap://localhost:PORT"   (same listener, by a name the certificate holds)
    slapd.ldaps_url       # "ldaps://localhost:PORT2" (only when tls= was given, else None)
    slapd.ca_file         # PEM of the CA that issued the server certificate (None without tls=)
    slapd.admin_dn, slapd.admin_password        # the rootdn: may do anything
    slapd.service_dn, slapd.service_password    # may search and read, but never userPassword
    slapd.users_dn, slapd.groups_dn             # "ou=people,BASE", "ou=groups,BASE"
    slapd.add_user("alice", "secret", cn="Alice A", mail="alice@example.com", groups=["staff"])
        # -> "uid=alice,ou=people,BASE"; groups are created as needed (groupOfNames, cn=NAME)
    slapd.add_group("all", members=[slapd.group_dn("staff")])   # nested groups: a group as member
    slapd.add_entry(dn, {"objectClass": [...], ...})            # anything else, as admin
    slapd.set_password("alice", "new")
    slapd.delete("uid=alice,ou=people,dc=example,dc=com")
    slapd.bind_count()    # BIND operations completed since start (monitor backend, see below)
    slapd.connection_count()  # TCP connections opened since start (to show connection reuse)
    slapd.stop()          # SIGTERM by PID, waits; data is kept
    slapd.kill()          # SIGKILL by PID (a crashed directory); data is kept
    slapd.restart()       # stop (if running) and start again: same ports, same data
    slapd.pid, slapd.running

    # or as a context manager: ``with Slapd(path) as slapd: ...`` (start/stop)

    # conf.d for the ldap plugin against this directory (a dict; json.dumps it into YAML):
    slapd.service_password_file      # the service password in a 0600 file, for {file: ...}
    slapd.plugin_settings(mode="ldaps")   # or "starttls" / "plain"; **overrides win
    # e.g. write_conf(dir, {"ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings())})

Details that matter to tests:

* Users are ``inetOrgPerson`` entries ``uid=NAME,ou=people,BASE`` with ``cn``, ``sn``,
  ``displayName`` (= cn), ``mail`` and an ``{SSHA}`` ``userPassword``. ``uid`` may be any string;
  the DN is built with RFC 4514 escaping (``Slapd.user_dn``).
* Groups are ``groupOfNames`` ``cn=NAME,ou=groups,BASE``; the ``memberof`` overlay maintains
  ``memberOf`` on members (direct membership only, as OpenLDAP does).
* ``bind_count()`` reads ``monitorOpInitiated`` of ``cn=Bind,cn=Operations,cn=Monitor`` as the
  rootdn. That read is itself a bind, which the method subtracts (as it does the binds of the
  content helpers), so the counter counts the binds other clients made. Use it to assert "no
  bind happened". ``connection_count()`` does the same with ``cn=Total,cn=Connections``.
* ``Slapd(retcode=True)`` loads the retcode overlay: ``add_user(..., bind_error=(49, "80090308:
  LdapErr: ... data 775, v4563"))`` answers every bind as that user exactly so (to play Active
  Directory), ``bind_delay=N`` makes those binds wait N seconds (to play a hung server).
* Access rules: ``userPassword`` can be used to authenticate by anyone, written by its owner
  and the rootdn, and read by nobody; everything else is readable by the service account and by
  any authenticated user (so a rebound connection can read its own groups).
* Account state (issue 9 item 2): every instance knows the auxiliary class
  ``authgwAccountState`` carrying the Active Directory attributes ``userAccountControl``,
  ``msDS-User-Account-Control-Computed`` (constructed in AD, stored here), ``accountExpires``,
  ``pwdLastSet`` and 389-DS/FreeIPA's ``nsAccountLock``, under their real OIDs: ``add_user(..., extra={
  "objectClass": "authgwAccountState", "userAccountControl": "514"})``. ``Slapd(ppolicy=True)``
  loads the ppolicy overlay with a default policy (``cn=default,ou=policies,BASE``: pwdLockout, no failure limit): binds of an entry with ``pwdAccountLockedTime``
  fail with 49, as OpenLDAP answers a locked account; set it with :meth:`modify` as the rootdn.
  ``ppolicy_use_lockout=True`` adds slapd's ``ppolicy_use_lockout``: the password policy response
  control then names accountLocked (slapd's default hides it).
* ``loglevel`` (default ``"none"``) goes to ``slapd.log`` in the directory; pass ``"stats"`` to
  see operations there (slower; keep it off in benchmarks).
* Ports come from :func:`support.net.free_port`; :meth:`start` waits until the plain port
  answers an LDAP bind (not just a TCP accept).
* slapd gets SIGTERM when the thread that started it exits (prctl PR_SET_PDEATHSIG), so an
  interrupted run leaves no directory behind; start it from a thread that outlives its use
  (the main thread, as fixtures do).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable

from support.proc import Daemon, die_with_parent
from support.net import free_port, wait_for_port

__all__ = ["Slapd", "escape_dn_value", "ssha"]

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SCHEMA_DIR = Path("/etc/ldap/schema")
#: What Active Directory and 389-DS/FreeIPA say about an account, as an auxiliary class that any
#: test entry may carry (the real OIDs, so clients see what those servers would send).
ACCOUNT_STATE_SCHEMA = """\
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl'
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.1460 NAME 'msDS-User-Account-Control-Computed'
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.159 NAME 'accountExpires'
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.96 NAME 'pwdLastSet'
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 2.16.840.1.113730.3.1.610 NAME 'nsAccountLock'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.55555.9.1 NAME 'authgwAccountState' AUXILIARY
    MAY ( userAccountControl $ msDS-User-Account-Control-Computed $ accountExpires $ pwdLastSet $
          nsAccountLock ) )
"""
MODULE_DIR = Path("/usr/lib/ldap")


def ssha(password: str) -> str:
    """An ``{SSHA}`` userPassword value (salted SHA-1, what slappasswd makes by default)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def escape_dn_value(value: str) -> str:
    """RFC 4514 section 2.4 escaping of an attribute value in a DN (test-side copy)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (i == 0 and ch in " #") or (i == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


class Slapd(Daemon):
    """One slapd process with an mdb database under *directory*."""

    def __init__(self, directory: Path | str, *, base_dn: str = "dc=example,dc=com", tls=None,
                 hostname: str = "localhost", loglevel: str = "none", admin_password: str = "admin-secret",
                 service_password: str = "service-secret", threads: int = 8, retcode: bool = False,
                 ppolicy: bool = False, ppolicy_use_lockout: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.base_dn = base_dn
        self.hostname = hostname
        self.loglevel = loglevel
        self.threads = threads
        self.retcode = retcode
        self.ppolicy = ppolicy
        #: slapd tells accountLocked in the password policy control only with this option.
        self.ppolicy_use_lockout = ppolicy_use_lockout
        self.port = free_port()
        self.ldaps_port = free_port() if tls is not None else None
        self.admin_dn = f"cn=admin,{base_dn}"
        self.admin_password = admin_password
        self.service_dn = f"cn=service,ou=system,{base_dn}"
        self.service_password = service_password
        self.users_dn = f"ou=people,{base_dn}"
        self.groups_dn = f"ou=groups,{base_dn}"
        self.ca_file: Path | None = None
        self._cert_files: tuple[Path, Path] | None = None
        if tls is not None:
            self.ca_file = self.directory / "ca.crt"
            self.ca_file.write_bytes(tls.pem)
            self._cert_files = tls.issue(hostname, dns=[hostname], server=True).write(self.directory, "server")
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._populated = False
        self._own_binds = 0
        self._bind_offset = 0
        self._conn_offset = 0
        self._write_conf()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def starttls_url(self) -> str:
        return f"ldap://{self.hostname}:{self.port}"

    @property
    def ldaps_url(self) -> str | None:
        return f"ldaps://{self.hostname}:{self.ldaps_port}" if self.ldaps_port else None

    @property
    def log_path(self) -> Path:
        return self.directory / "slapd.log"

    @property
    def service_password_file(self) -> Path:
        path = self.directory / "service-password"
        if not path.exists():
            path.write_text(self.service_password)
            path.chmod(0o600)
        return path

    def plugin_settings(self, mode: str = "ldaps", **overrides) -> dict:
        """Settings of the ``ldap`` plugin (openldap preset) pointing at this directory.

        *mode*: ``ldaps`` (ldaps_url, ca_file), ``starttls`` (starttls_url, start_tls, ca_file)
        or ``plain`` (url, insecure: true).
        """
        settings: dict = {"preset": "openldap", "base_dn": self.base_dn, "bind_dn": self.service_dn,
                          "bind_password": {"file": str(self.service_password_file)}}
        if mode == "ldaps":
            settings.update(servers=[self.ldaps_url], ca_file=str(self.ca_file))
        elif mode == "starttls":
            settings.update(servers=[self.starttls_url], start_tls=True, ca_file=str(self.ca_file))
        elif mode == "plain":
            settings.update(servers=[self.url], insecure=True)
        else:
            raise ValueError(f"mode {mode!r}: ldaps, starttls or plain")
        settings.update(overrides)
        return settings

    def user_dn(self, uid: str) -> str:
        return f"uid={escape_dn_value(uid)},{self.users_dn}"

    def group_dn(self, cn: str) -> str:
        return f"cn={escape_dn_value(cn)},{self.groups_dn}"

    # -- configuration -----------------------------------------------------------------------------

    def _write_conf(self) -> None:
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        tls = ""
        if self._cert_files:
            cert, key = self._cert_files
            tls = f"TLSCACertificateFile {self.ca_file}\nTLSCertificateFile {cert}\nTLSCertificateKeyFile {key}\n"
        schemas = "".join(f"include {SCHEMA_DIR / n}.schema\n" for n in ("core", "cosine", "inetorgperson", "nis"))
        (self.directory / "account-state.schema").write_text(ACCOUNT_STATE_SCHEMA)
        schemas += f"include {self.directory / 'account-state.schema'}\n"
        # retcode-parent keeps its generated-entry mode out of the way (it would answer binds as
        # the rootdn with noSuchObject); retcode-indir reads errAuxObject data of real entries.
        retcode = (f'overlay retcode\nretcode-parent "ou=retcode,{self.base_dn}"\nretcode-indir\n'
                   if self.retcode else "")
        # retcode looks the bind target up as the (still anonymous) client: let it read the
        # retcode attributes (retcode instances only).
        retcode_acl = ("access to attrs=entry,objectClass,errCode,errOp,errText,errSleepTime\n    by * read\n"
                       if self.retcode else "")
        admin = f'"{self.admin_dn}"'
        service = f'"{self.service_dn}"'
        conf = f"""\
{schemas}
modulepath {MODULE_DIR}
moduleload back_mdb
moduleload memberof
{"moduleload retcode" if self.retcode else ""}
{"moduleload ppolicy" if self.ppolicy else ""}
pidfile {self.directory / 'slapd.pid'}
argsfile {self.directory / 'slapd.args'}
loglevel {self.loglevel}
threads {self.threads}
sizelimit unlimited
{tls}
database monitor
access to * by dn.exact={admin} read by * none

database mdb
suffix "{self.base_dn}"
rootdn {admin}
rootpw {self.admin_password}
directory {data}
maxsize 268435456
index objectClass eq
index uid,cn,mail eq,sub
index member,memberOf eq

overlay memberof
memberof-refint TRUE
{f'overlay ppolicy{chr(10)}ppolicy_default "cn=default,ou=policies,{self.base_dn}"' if self.ppolicy else ""}
{"ppolicy_use_lockout" if self.ppolicy and self.ppolicy_use_lockout else ""}
{retcode}
{retcode_acl}access to attrs=userPassword
    by self =wx
    by * auth
access to *
    by dn.exact={service} read
    by users read
    by * none
"""
        (self.directory / "slapd.conf").write_text(conf)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Slapd:
        if self.running:
            return self
        urls = f"ldap://127.0.0.1:{self.port}/"
        if self.ldaps_port:
            urls += f" ldaps://127.0.0.1:{self.ldaps_port}/"
        self._log = open(self.log_path, "ab")
        # -d keeps slapd in the foreground, so self.proc.pid is slapd's own PID; -d 0 logs nothing
        # extra to stderr (loglevel in slapd.conf still applies when > none, written to stderr).
        debug = "0" if self.loglevel == "none" else self.loglevel
        self.proc = subprocess.Popen([SLAPD, "-f", str(self.directory / "slapd.conf"), "-h", urls, "-d", debug],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
            if self.ldaps_port:
                wait_for_port("127.0.0.1", self.ldaps_port, timeout=timeout, proc=self.proc)
            self._wait_ready(timeout)
            if not self._populated:
                self._populate()
                self._populated = True
            # The monitor's counters restart with the process; whatever binds happened before
            # this point (readiness probes, population) are not the tests'.
            self._bind_offset, self._conn_offset = self._counters()
            self._own_binds = 0
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                conn = self._admin()
                conn.unbind()
                return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
                time.sleep(0.05)
        raise TimeoutError(f"slapd on {self.url} did not answer a bind: {last}; log:\n{self.output()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID and wait (slapd flushes and exits); the data directory is kept. (kill():
        SIGKILL, the directory vanishes mid-conversation; mdb survives it.)"""
        super().stop(timeout)

    def restart(self, timeout: float = 20.0) -> Slapd:
        self.stop()
        return self.start(timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- content -----------------------------------------------------------------------------------

    def _admin(self):
        import ldap3

        server = ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=5)
        conn = ldap3.Connection(server, self.admin_dn, self.admin_password, client_strategy=ldap3.SAFE_SYNC,
                                receive_timeout=10, raise_exceptions=True)
        conn.open()
        self._own_binds += 1  # counted by the monitor once sent, whatever its result
        conn.bind()
        return conn

    def _populate(self) -> None:
        dc = self.base_dn.split(",")[0].split("=", 1)[1]
        conn = self._admin()
        try:
            conn.add(self.base_dn, ["top", "dcObject", "organization"], {"dc": dc, "o": dc})
            for ou in ("people", "groups", "system"):
                conn.add(f"ou={ou},{self.base_dn}", ["top", "organizationalUnit"], {"ou": ou})
            conn.add(self.service_dn, ["top", "person", "simpleSecurityObject"],
                     {"cn": "service", "sn": "service", "userPassword": ssha(self.service_password)})
            if self.ppolicy:  # the overlay judges binds only under a policy
                conn.add(f"ou=policies,{self.base_dn}", ["top", "organizationalUnit"], {"ou": "policies"})
                conn.add(f"cn=default,ou=policies,{self.base_dn}", ["top", "organizationalRole", "pwdPolicy"],
                         {"cn": "default", "pwdAttribute": "userPassword", "pwdLockout": "TRUE"})
        finally:
            conn.unbind()

    def add_entry(self, dn: str, attributes: dict) -> str:
        attributes = dict(attributes)
        classes = attributes.pop("objectClass")
        conn = self._admin()
        try:
            conn.add(dn, classes, attributes)
        finally:
            conn.unbind()
        return dn

    def add_user(self, uid: str, password: str | None, *, cn: str | None = None, sn: str | None = None,
                 mail: str | None = None, groups: Iterable[str] = (), extra: dict | None = None,
                 bind_error: tuple[int, str] | None = None, bind_delay: int | None = None) -> str:
        """Add ``uid=UID,ou=people,BASE``; *groups* (names) are created or extended. Returns the DN.

        With ``Slapd(retcode=True)``: *bind_error* ``(resultCode, diagnosticMessage)`` makes every
        bind as this user fail with exactly that answer (to play Active Directory), and
        *bind_delay* (seconds) makes binds as this user wait that long before answering.
        """
        dn = self.user_dn(uid)
        attrs: dict = {"uid": uid, "cn": cn or uid, "sn": sn or (cn or uid).split()[-1], "displayName": cn or uid}
        if mail:
            attrs["mail"] = mail
        if password is not None:
            attrs["userPassword"] = ssha(password)
        attrs.update(extra or {})
        classes = ["top", "person", "organizationalPerson", "inetOrgPerson"]
        if bind_error is not None or bind_delay is not None:
            if not self.retcode:
                raise ValueError("bind_error/bind_delay need Slapd(retcode=True)")
            classes.append("errAuxObject")
            code, text = bind_error or (49, "delayed by the test directory")
            attrs.update({"errCode": str(code), "errOp": "bind"})
            if text:
                attrs["errText"] = text
            if bind_delay:
                attrs["errSleepTime"] = str(bind_delay)
        conn = self._admin()
        try:
            conn.add(dn, classes, attrs)
            for group in groups:
                self._add_member(conn, self.group_dn(group), group, dn)
        finally:
            conn.unbind()
        return dn

    def add_users(self, users: Iterable[tuple[str, str]], *, mail_domain: str = "example.com") -> None:
        """Add many ``(uid, password)`` users over one admin connection (for benchmarks)."""
        conn = self._admin()
        try:
            for uid, password in users:
                conn.add(self.user_dn(uid), ["top", "person", "organizationalPerson", "inetOrgPerson"],
                         {"uid": uid, "cn": uid, "sn": uid, "displayName": uid, "mail": f"{uid}@{mail_domain}",
                          "userPassword": ssha(password)})
        finally:
            conn.unbind()

    def add_group(self, cn: str, members: Iterable[str] = ()) -> str:
        """Add (or extend) ``cn=CN,ou=groups,BASE`` with member DNs (users or groups)."""
        dn = self.group_dn(cn)
        conn = self._admin()
        try:
            for member in members:
                self._add_member(conn, dn, cn, member)
        finally:
            conn.unbind()
        return dn

    def _add_member(self, conn, group_dn: str, cn: str, member: str) -> None:
        import ldap3
        from ldap3.core.exceptions import LDAPNoSuchObjectResult

        try:
            conn.modify(group_dn, {"member": [(ldap3.MODIFY_ADD, [member])]})
        except LDAPNoSuchObjectResult:
            conn.add(group_dn, ["top", "groupOfNames"], {"cn": cn, "member": member})

    def set_password(self, uid: str, password: str) -> None:
        import ldap3

        conn = self._admin()
        try:
            conn.modify(self.user_dn(uid), {"userPassword": [(ldap3.MODIFY_REPLACE, [ssha(password)])]})
        finally:
            conn.unbind()

    def modify(self, dn: str, changes: dict) -> None:
        """``changes`` as ldap3 takes them: ``{attr: [(ldap3.MODIFY_REPLACE, [values])]}``."""
        conn = self._admin()
        try:
            conn.modify(dn, changes)
        finally:
            conn.unbind()

    def delete(self, dn: str) -> None:
        conn = self._admin()
        try:
            conn.delete(dn)
        finally:
            conn.unbind()

    # -- counters ----------------------------------------------------------------------------------

    def _counters(self) -> tuple[int, int]:
        """(binds, connections) started/opened since the process started, this read included."""
        conn = self._admin()  # counted: its connection and its bind complete before the reads
        try:
            values = []
            # Initiated, not completed: slapd counts an operation completed after it sent the
            # result, so a bind whose answer the gateway already passed on could still be missing.
            for dn, attr in (("cn=Bind,cn=Operations,cn=Monitor", "monitorOpInitiated"),
                             ("cn=Total,cn=Connections,cn=Monitor", "monitorCounter")):
                _, _, entries, _ = conn.search(dn, "(objectClass=*)", search_scope="BASE", attributes=[attr])
                value = entries[0]["attributes"][attr]
                values.append(int(value[0] if isinstance(value, list) else value))
        finally:
            conn.unbind()
        return values[0], values[1]

    def bind_count(self) -> int:
        """BIND operations other clients started since the last :meth:`start`.

        slapd's monitor counts every bind (successful or not, anonymous included); the binds this
        helper makes as the rootdn (content helpers, this method's own read) are subtracted.
        """
        return self._counters()[0] - self._own_binds - self._bind_offset

    def connection_count(self) -> int:
        """TCP connections other clients opened since the last :meth:`start` (pooling tests)."""
        return self._counters()[1] - self._own_binds - self._conn_offset
