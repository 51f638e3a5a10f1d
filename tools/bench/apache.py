"""Apache httpd 2.4 (Debian ``apache2``, event MPM) from a private configuration: the same-run
reference the benchmarks compare authgw with (issue 15).

Everything lives in one directory: ``httpd.conf``, the pid file, the error and access logs, the
run-time directory (locks, shared memory). Nothing under ``/etc/apache2`` or ``/var`` is read
or written. The server runs in the foreground (``-DFOREGROUND``), so :attr:`Apache.pid` is the
parent's PID; :meth:`Apache.stop` sends it SIGTERM and waits (the parent stops its children).

    from apache import Apache, GssapiAuth, LdapAuth, TlsClientAuth

    apache = Apache(tmp / "apache",
                    ldap=LdapAuth(slapd.url, slapd.base_dn, slapd.service_dn, slapd.service_password,
                                  cache=False),
                    gssapi=GssapiAuth(keytab, kdc.krb5_conf),
                    tls=TlsClientAuth(server_crt, server_key, trust_bundle)).start()
    apache.url + "/static"        # a small static file: the bare-HTTP floor
    apache.url + "/ldap/ok"       # Basic, mod_authnz_ldap: search as the service account, bind as the user
    apache.url + "/negotiate/ok"  # Negotiate, mod_auth_gssapi with the keytab (replay cache on)
    apache.tls_port               # HTTPS with a client certificate required (mod_ssl): "/cert/ok"
    apache.pids()                 # the parent and its children (CPU from /proc)
    apache.stop()

``LdapAuth(cache=True)`` keeps mod_ldap's caches on (search/bind and compare caches, TTL 1 hour,
shared memory); ``cache=False`` turns every one of them off, so each request searches and binds.
These are server-wide directives, so cache off and cache on are two Apache instances.

The process layout mirrors ``authgw serve --workers 2``: 2 child processes (``--servers``) of
32 threads each, kept for the whole run (no spare-process churn, no connection limit per child),
keep-alive without a request limit. Each request but the static file's is logged to
``access.log`` (common format), as authgw writes an audit line for each attempt and none for
``/healthz``. ``LdapAuth(cache=True)`` gives mod_ldap 8 MB of shared memory (its default 500 kB
would purge entries before 1,000 users are cached).

Run as root (a CI container), Apache refuses to serve as root: the children run as ``www-data``
(or ``nobody``), and what they read at request time (the documents, a copy of the keytab and of
``krb5.conf``, the replay cache directory) lives in a separate directory they own, removed by
:meth:`Apache.stop`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support.net import free_port, wait_for_port  # noqa: E402
from support.proc import Daemon, die_with_parent  # noqa: E402

__all__ = ["Apache", "GssapiAuth", "LdapAuth", "TlsClientAuth", "apache_binary"]

MODULES = Path("/usr/lib/apache2/modules")
STATIC_BODY = b'{"status": "ok"}\n'  # about the size of authgw's /healthz answer


def apache_binary() -> str | None:
    """The httpd binary (Debian calls it apache2), or None when it is not installed."""
    return shutil.which("apache2") or next((p for p in ("/usr/sbin/apache2", "/usr/sbin/httpd")
                                            if os.path.exists(p)), None)


@dataclass(frozen=True)
class LdapAuth:
    """mod_authnz_ldap against one directory: search ``(uid=USER)`` under *base_dn* as *bind_dn*,
    then bind as the user's DN (Basic credentials)."""

    url: str
    base_dn: str
    bind_dn: str
    bind_password: str
    cache: bool = False
    #: fetched in the same search (as authgw's identity attributes and memberOf groups)
    attributes: tuple[str, ...] = ("uid", "displayName", "mail", "memberOf")
    filter: str = "(objectClass=inetOrgPerson)"


@dataclass(frozen=True)
class GssapiAuth:
    """mod_auth_gssapi: accept SPNEGO/Kerberos with the service keys in *keytab*."""

    keytab: Path
    krb5_conf: Path


@dataclass(frozen=True)
class TlsClientAuth:
    """An HTTPS listener (mod_ssl) that requires, in the handshake, a client certificate that
    chains to *trust* (a PEM bundle: root and intermediates); it serves ``/cert/ok``."""

    certificate: Path
    key: Path
    trust: Path
    #: TLS 1.3 session tickets per handshake (``SSLOpenSSLConfCmd NumTickets``); None: OpenSSL's 2.
    session_tickets: int | None = None


class Apache(Daemon):
    """One httpd (event MPM) from a private config in *directory*; see the module docstring."""

    def __init__(self, directory: Path | str, *, ldap: LdapAuth | None = None, gssapi: GssapiAuth | None = None,
                 tls: TlsClientAuth | None = None, servers: int = 2, threads: int = 32,
                 access_log: bool = True) -> None:
        binary = apache_binary()
        if binary is None:
            raise FileNotFoundError("apache2 not found: install the Debian packages apache2 and "
                                    "libapache2-mod-auth-gssapi")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ldap, self.gssapi, self.tls = ldap, gssapi, tls
        self.servers, self.threads, self.access_log = servers, threads, access_log
        self.port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._user = self._unprivileged_user()
        # What the children read or write while serving must be theirs (see the module docstring).
        if self._user is not None:
            self.www = Path(tempfile.mkdtemp(prefix="authgw-apache-www-"))
        else:
            self.www = self.directory / "www"
            self.www.mkdir(exist_ok=True)
        self._write_files()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log_path(self) -> Path:
        return self.directory / "access.log"

    @property
    def error_log_path(self) -> Path:
        return self.directory / "error.log"

    def pids(self) -> list[int]:
        """The parent and its current children (for CPU accounting from /proc)."""
        if not self.running:
            return []
        try:
            children = open(f"/proc/{self.pid}/task/{self.pid}/children").read().split()
        except OSError:
            children = []
        return [self.pid, *(int(c) for c in children)]

    # -- configuration -----------------------------------------------------------------------------

    @staticmethod
    def _unprivileged_user() -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("www-data", "nobody"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        raise RuntimeError("running as root, and neither www-data nor nobody exists for Apache's children")

    def _write_files(self) -> None:
        docs = self.www / "htdocs"
        for sub in ("", "ldap", "negotiate", "cert"):
            (docs / sub).mkdir(parents=True, exist_ok=True)
        (docs / "static").write_bytes(STATIC_BODY)
        for sub in ("ldap", "negotiate", "cert"):
            (docs / sub / "ok").write_bytes(STATIC_BODY)
        env = {}
        if self.gssapi is not None:
            keytab = self.www / "http.keytab"
            shutil.copyfile(self.gssapi.keytab, keytab)
            keytab.chmod(0o600)
            krb5_conf = self.www / "krb5.conf"
            shutil.copyfile(self.gssapi.krb5_conf, krb5_conf)
            (self.www / "rcache").mkdir(exist_ok=True)
            env = {"KRB5_CONFIG": str(krb5_conf), "KRB5RCACHEDIR": str(self.www / "rcache"),
                   "KRB5_KTNAME": f"FILE:{keytab}"}
        self.env = env
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            self.www.chmod(0o711)
            for root, dirs, files in os.walk(self.www):
                for name in [root, *(os.path.join(root, f) for f in dirs + files)]:
                    os.chown(name, entry.pw_uid, entry.pw_gid)
        conf = self.directory / "httpd.conf"
        conf.write_text(self._config())
        conf.chmod(0o600)  # it holds the service account's password

    def _config(self) -> str:
        d, docs = self.directory, self.www / "htdocs"
        modules = ["mpm_event", "authn_core", "authz_core", "authz_user", "auth_basic"]
        if self.ldap is not None:
            modules += ["ldap", "authnz_ldap"]
        if self.gssapi is not None:
            modules.append("auth_gssapi")
        if self.tls is not None:
            modules.append("ssl")
        lines = [f"LoadModule {m}_module {MODULES / f'mod_{m}.so'}" for m in modules]
        # mod_log_config is built into Debian's httpd (loading it again is an error).
        lines += [
            f"ServerRoot {d}",
            f"DefaultRuntimeDir {d}",
            f"PidFile {d / 'httpd.pid'}",
            f"ErrorLog {d / 'error.log'}",
            "LogLevel warn",
            "ServerName 127.0.0.1",
            f"Listen 127.0.0.1:{self.port}",
            f"DocumentRoot {docs}",
            f"<Directory {docs}>\n  Require all granted\n</Directory>",
            # The same process layout as authgw's workers: no spare-process churn mid-run.
            f"StartServers {self.servers}",
            f"ServerLimit {self.servers}",
            f"ThreadLimit {self.threads}",
            f"ThreadsPerChild {self.threads}",
            f"MaxRequestWorkers {self.servers * self.threads}",
            "MinSpareThreads 1",
            f"MaxSpareThreads {self.servers * self.threads}",
            "MaxConnectionsPerChild 0",
            "KeepAlive On",
            "MaxKeepAliveRequests 0",
            "KeepAliveTimeout 15",
        ]
        if self._user is not None:
            lines += [f"User {self._user}", f"Group #{pwd.getpwnam(self._user).pw_gid}"]
        if self.access_log:
            # Not the static file: authgw's /healthz writes no audit line either (the bare floor).
            lines.append(f'CustomLog {d / "access.log"} "%h %l %u %t \\"%r\\" %>s %b" '
                         '"expr=%{REQUEST_URI} != \'/static\'"')
        if self.ldap is not None:
            lines += self._ldap_config(self.ldap)
        if self.gssapi is not None:
            lines += [
                "<Location /negotiate>",
                "  AuthType GSSAPI",
                '  AuthName "authgw benchmark"',
                f"  GssapiCredStore keytab:{self.www / 'http.keytab'}",
                "  GssapiBasicAuth Off",
                "  Require valid-user",
                "</Location>",
            ]
        if self.tls is not None:
            lines += [
                f"Listen 127.0.0.1:{self.tls_port} https",
                "SSLSessionCache none",
                f"<VirtualHost 127.0.0.1:{self.tls_port}>",
                "  SSLEngine on",
                f"  SSLCertificateFile {self.tls.certificate}",
                f"  SSLCertificateKeyFile {self.tls.key}",
                f"  SSLCACertificateFile {self.tls.trust}",
                # In the handshake, for the whole host: per-<Location> client authentication would
                # need TLS 1.3 post-handshake authentication, which clients rarely offer.
                "  SSLVerifyClient require",
                "  SSLVerifyDepth 3",
                *([f"  SSLOpenSSLConfCmd NumTickets {self.tls.session_tickets}"]
                  if self.tls.session_tickets is not None else []),
                "</VirtualHost>",
            ]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _ldap_config(ldap: LdapAuth) -> list[str]:
        if ldap.cache:
            # mod_ldap's defaults, except two. The shared memory: its default 500 kB holds a few
            # hundred users with their attributes, and a full cache purges entries, so 1,000 users
            # cycling would mostly miss; 8 MB holds the 1,024 entries. The TTL: an hour (default
            # 600 s), longer than a benchmark run, which measures hits, not expiry.
            cache = ["LDAPSharedCacheSize 8000000", "LDAPCacheEntries 1024", "LDAPCacheTTL 3600",
                     "LDAPOpCacheEntries 1024", "LDAPOpCacheTTL 3600"]
        else:  # 0 entries turns each cache off: every request searches and binds
            cache = ["LDAPCacheEntries 0", "LDAPOpCacheEntries 0"]
        url = f"{ldap.url}/{ldap.base_dn}?{','.join(ldap.attributes)}?sub?{ldap.filter}"
        quoted = ldap.bind_password.replace("\\", "\\\\").replace('"', '\\"')
        return cache + [
            "<Location /ldap>",
            "  AuthType Basic",
            '  AuthName "authgw benchmark"',
            "  AuthBasicProvider ldap",
            f'  AuthLDAPURL "{url}"',
            f'  AuthLDAPBindDN "{ldap.bind_dn}"',
            f'  AuthLDAPBindPassword "{quoted}"',
            "  Require valid-user",
            "</Location>",
        ]

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Apache:
        if self.running:
            return self
        check = subprocess.run([self.binary, "-t", "-f", str(self.directory / "httpd.conf")],
                               capture_output=True, text=True, env={**os.environ, **self.env})
        if check.returncode != 0:
            raise RuntimeError(f"httpd -t: {check.stderr.strip()}")
        self._log = open(self.directory / "httpd.out", "ab")
        # SIGTERM to the parent (by PID, or when this thread dies) stops its children too.
        self.proc = subprocess.Popen([self.binary, "-f", str(self.directory / "httpd.conf"), "-DFOREGROUND"],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env}, preexec_fn=die_with_parent)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
            if self.tls_port:
                wait_for_port("127.0.0.1", self.tls_port, timeout=timeout, proc=self.proc)
            # The parent binds before its children serve: wait until they exist.
            deadline = time.monotonic() + timeout
            while len(self.pids()) < 1 + self.servers and time.monotonic() < deadline:
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the parent by PID (it stops its children), wait; then remove the children's
        directory when it was a separate one."""
        super().stop(timeout)
        if self._user is not None and self.www.exists():
            shutil.rmtree(self.www, ignore_errors=True)

    def output(self) -> str:
        """The error log and anything httpd printed (for failure messages)."""
        parts = [p.read_text(errors="replace") for p in (self.error_log_path, self.directory / "httpd.out")
                 if p.exists()]
        return "\n".join(parts)
