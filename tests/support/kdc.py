"""A throwaway MIT Kerberos realm: ``kdb5_util create -s``, ``kadmin.local``, ``krb5kdc -n``.

Everything lives in one temp directory: ``kdc.conf`` (``KRB5_KDC_PROFILE``), ``krb5.conf``
(``KRB5_CONFIG``), the database, the stash, keytabs and credential caches. The KDC listens on a
free 127.0.0.1 port (UDP and TCP) and is stopped by its PID. Nothing reads ``/etc/krb5.conf``:
every subprocess gets :attr:`KDC.env`.

Client tokens are minted with python-gssapi in a subprocess (:meth:`KDC.mint`), because libkrb5
reads ``KRB5_CONFIG`` when a context is created and the test process must not depend on it.

    kdc = KDC(tmp_path / "kdc", realm="EXAMPLE.TEST").start()      # or: with KDC(...) as kdc:
    kdc.add_principal("alice", "secret")                             # -> "alice@EXAMPLE.TEST"
    keytab = kdc.add_service("HTTP/localhost", tmp_path / "http.keytab")   # 0600, kvno 1
    kdc.export("HTTP/other", keytab)        # append a principal's current keys (no new kvno)
    kdc.rotate_key("HTTP/localhost", tmp_path / "new.keytab")   # new random key, kvno + 1
    kdc.kvno("HTTP/localhost")              # the KDC's current key version
    ccache = kdc.kinit("alice", "secret", tmp_path / "alice.cc")
    tokens = kdc.mint(ccache, [("HTTP/localhost", 10)])[0]   # 10 distinct SPNEGO tokens (bytes)
    kdc.env                                 # KRB5_CONFIG, KRB5_KDC_PROFILE, KRB5CCNAME, ... for subprocesses
    kdc.kadmin("getprinc alice")            # any kadmin.local query; raises when it fails
    kdc.stop()                              # SIGTERM by PID

Several realms: ``write_krb5_conf(path, [kdc1, kdc2])`` makes a client configuration that knows
both (no cross-realm trust is set up).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from support.proc import stop as stop_process
from support.net import free_port, wait_for_port

__all__ = ["KDC", "MINT_SCRIPT", "write_krb5_conf"]

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_KADMIN_CHATTER = ("Authenticating as principal", "No policy specified for", "WARNING: no policy specified")


def _tool(name: str) -> str:
    found = shutil.which(name) or next((f"{d}/{name}" for d in _SBIN if os.path.exists(f"{d}/{name}")), None)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install krb5-kdc, krb5-admin-server and krb5-user")
    return found


def write_krb5_conf(path: Path, kdcs: list[KDC], *, default_realm: str | None = None,
                    libdefaults: dict[str, str] | None = None) -> Path:
    """A client/acceptor ``krb5.conf`` that knows every realm in *kdcs* (and nothing else)."""
    defaults = {
        "default_realm": default_realm or kdcs[0].realm,
        "dns_lookup_kdc": "false",
        "dns_lookup_realm": "false",
        "dns_canonicalize_hostname": "false",
        "rdns": "false",
        **(libdefaults or {}),
    }
    realms = "\n".join(f"  {k.realm} = {{\n    kdc = 127.0.0.1:{k.port}\n  }}" for k in kdcs)
    text = "[libdefaults]\n" + "".join(f"  {k} = {v}\n" for k, v in defaults.items())
    text += f"[realms]\n{realms}\n[domain_realm]\n  localhost = {kdcs[0].realm}\n"
    path.write_text(text)
    return path


# Runs in a subprocess with the client's environment: read {"ccache", "targets": [[principal, n]],
# "mech"} on stdin, print {"tokens": [[base64...]...]} (one list per target). Each token is the
# first (and, for Kerberos, only) token of a fresh initiator context, so every one is distinct.
MINT_SCRIPT = textwrap.dedent("""
    import base64, json, sys
    import gssapi
    req = json.load(sys.stdin)
    creds = gssapi.Credentials(usage="initiate", store={"ccache": req["ccache"]})
    mech = gssapi.OID.from_int_seq(req["mech"])
    out = []
    for principal, count in req["targets"]:
        name = gssapi.Name(principal, gssapi.NameType.kerberos_principal)
        tokens = []
        for _ in range(count):
            ctx = gssapi.SecurityContext(name=name, creds=creds, usage="initiate", mech=mech,
                                         flags=gssapi.RequirementFlag.mutual_authentication
                                         | gssapi.RequirementFlag.out_of_sequence_detection)
            tokens.append(base64.b64encode(ctx.step()).decode())
        out.append(tokens)
    json.dump({"tokens": out}, sys.stdout)
""")

SPNEGO = "1.3.6.1.5.5.2"
KRB5 = "1.2.840.113554.1.2.2"


class KDC:
    """``KDC(tmpdir, realm="EXAMPLE.TEST").start()``; :meth:`stop` kills it by PID."""

    def __init__(self, directory: Path, realm: str = "EXAMPLE.TEST") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.realm = realm
        self.port = free_port()
        self.kdc_conf = self.dir / "kdc.conf"
        self.krb5_conf = self.dir / "krb5.conf"
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- environment -----------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Variables for subprocesses (gateway, kinit, curl, token minting) of this realm."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5CCNAME": f"FILE:{self.dir / 'ccache'}",
            "KRB5RCACHEDIR": str(self.dir),
            "KRB5_KTNAME": f"FILE:{self.dir / 'no-default.keytab'}",
        }

    def _run(self, *argv: str, input: str | None = None, env: dict[str, str] | None = None,
             timeout: float = 30) -> str:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def kadmin(self, query: str) -> str:
        """Run one ``kadmin.local`` query. It exits 0 even when the query fails, so its error
        output is checked too (the informational lines it always prints are expected)."""
        proc = subprocess.run([_tool("kadmin.local"), "-r", self.realm, "-q", query], capture_output=True,
                              text=True, timeout=30, env={**os.environ, **self.env})
        problems = [line for line in proc.stderr.splitlines()
                    if line.strip() and not line.startswith(_KADMIN_CHATTER)]
        if proc.returncode != 0 or problems:
            raise RuntimeError(f"kadmin.local -q {query!r}: {' / '.join(problems) or proc.returncode}")
        return proc.stdout

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> KDC:
        d = self.dir
        self.kdc_conf.write_text(textwrap.dedent(f"""\
            [kdcdefaults]
              kdc_tcp_listen = 127.0.0.1:{self.port}
              kdc_listen = 127.0.0.1:{self.port}
            [realms]
              {self.realm} = {{
                database_name = {d}/principal
                key_stash_file = {d}/stash
                acl_file = {d}/kadm5.acl
                kdc_listen = 127.0.0.1:{self.port}
                kdc_tcp_listen = 127.0.0.1:{self.port}
                max_life = 10h
                supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
              }}
            [logging]
              kdc = FILE:{d}/kdc.log
              default = FILE:{d}/krb5lib.log
            """))
        (d / "kadm5.acl").write_text("")
        write_krb5_conf(self.krb5_conf, [self])
        self._run(_tool("kdb5_util"), "create", "-s", "-r", self.realm, "-P", "master-password-for-tests")
        self._log = open(d / "krb5kdc.out", "ab")
        self.proc = subprocess.Popen([_tool("krb5kdc"), "-n", "-r", self.realm], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> KDC:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- principals and keytabs ------------------------------------------------------------------------

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.realm}"

    def add_principal(self, name: str, password: str) -> str:
        self.kadmin(f"addprinc -pw {password} {self.principal(name)}")
        return self.principal(name)

    def add_service(self, name: str, keytab: Path | None = None, *, enctypes: str | None = None) -> Path:
        """Create service principal *name* (``HTTP/localhost``) and export it to *keytab*."""
        keytab = Path(keytab or self.dir / f"{name.replace('/', '_')}.keytab")
        self.kadmin(f"addprinc -randkey {self.principal(name)}")
        self.export(name, keytab, enctypes=enctypes)
        return keytab

    def export(self, name: str, keytab: Path, *, enctypes: str | None = None) -> Path:
        """Write *name*'s current keys to *keytab* without changing them (``ktadd -norandkey``)."""
        e = f"-e {enctypes} " if enctypes else ""
        self.kadmin(f"ktadd -norandkey {e}-k {keytab} {self.principal(name)}")
        os.chmod(keytab, 0o600)
        return keytab

    def rotate_key(self, name: str, keytab: Path) -> int:
        """Give *name* a new random key (kvno + 1) and write it to *keytab* (appending if it exists).

        :return: the new key version number.
        """
        self.kadmin(f"ktadd -k {keytab} {self.principal(name)}")
        os.chmod(keytab, 0o600)
        return self.kvno(name)

    def kvno(self, name: str) -> int:
        out = self.kadmin(f"getprinc {self.principal(name)}")
        for line in out.splitlines():
            if "vno" in line and line.strip().startswith("Key: vno"):
                return int(line.split("vno", 1)[1].split(",")[0])
        raise RuntimeError(f"no key version in: {out}")

    # -- clients ---------------------------------------------------------------------------------------

    def kinit(self, name: str, password: str, ccache: Path, env: dict[str, str] | None = None) -> Path:
        self._run(shutil.which("kinit") or "kinit", "-c", f"FILE:{ccache}", self.principal(name),
                  input=password + "\n", env=env)
        return ccache

    def mint(self, ccache: Path, targets: list[tuple[str, int]], *, mech: str = SPNEGO,
             env: dict[str, str] | None = None) -> list[list[bytes]]:
        """Make initiator tokens from *ccache* for each ``(service principal, count)``."""
        request = {"ccache": f"FILE:{ccache}", "mech": [int(x) for x in mech.split(".")],
                   "targets": [[self.principal(p), n] for p, n in targets]}
        proc = subprocess.run([sys.executable, "-c", MINT_SCRIPT], input=json.dumps(request),
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, **self.env, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"minting tokens failed: {proc.stderr.strip()}")
        return [[base64.b64decode(t) for t in tokens] for tokens in json.loads(proc.stdout)["tokens"]]
