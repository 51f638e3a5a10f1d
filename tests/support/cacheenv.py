"""The credential cache in front of a real slapd: a real ``authgw serve`` with ``chain: [ldap]``
and ``plugins: [cache]``, the module's directory, and the small readers and directory changes the
cache's tests share.

A test module takes the fixtures by name::

    from support.cacheenv import directory, slapd_fixture  # noqa: F401 - fixtures

    slapd = slapd_fixture(ppolicy=True)  # ppolicy: accounts can be locked
"""

from __future__ import annotations

import json
from pathlib import Path

import ldap3
import pytest

from support.gateway import write_conf
from support.slapd import Slapd

__all__ = ["GATEWAY_YAML", "TWO_NAMES", "cache_conf", "directory", "disable", "lock", "old_fold_pointer", "runtime",
           "slapd_fixture", "source", "user", "write_secrets"]

#: An account logs in with its uid or its mail (the Active Directory preset's shape on slapd).
TWO_NAMES = "(&(objectClass=inetOrgPerson)(|(uid={username})(mail={username})))"


def slapd_fixture(**options):
    """A module-scoped ``slapd`` fixture: one :class:`Slapd` (*options* as its own) for the
    module, stopped at its end if a test left it running."""

    @pytest.fixture(scope="module")
    def slapd(tmp_path_factory):
        server = Slapd(tmp_path_factory.mktemp("ldap"), **options).start()
        yield server
        if server.running:
            server.stop()

    return slapd


@pytest.fixture
def directory(slapd):
    """The module's slapd, running at the start of every test whatever the last one did."""
    if not slapd.running:
        slapd.start()
    return slapd


#: gateway.yaml of :func:`cache_conf`: one worker deciding ``chain: [ldap]`` with ``plugins:
#: [cache]``, no throttle, no health probe (a probe is a bind), a 5 s deadline.
GATEWAY_YAML = """\
    chain: [ldap]
    plugins: [cache]
    throttle: {enabled: false}
    health: {probe_interval: 3600}
    workers: 1
    deadline: 5
"""


def cache_conf(tmp_path: Path, slapd: Slapd, cache: str = "cache: {}\n", *, name: str = "conf.d",
               **ldap) -> Path:
    """conf.d for one worker deciding ``chain: [ldap]`` with ``plugins: [cache]``: no throttle,
    no health probe (a probe is a bind), a 5 s deadline; the LDAP plugin on *slapd* in plain
    LDAP with no backoff (and *ldap*'s settings), the cache as *cache* (its YAML file)."""
    return write_conf(tmp_path / name, {
        "gateway.yaml": GATEWAY_YAML,
        "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain", backoff=0, **ldap)),
        "cache.yaml": cache,
    })


def write_secrets(tmp_path: Path) -> tuple[Path, Path]:
    """The pepper and the encryption key a shared (Redis) store needs, as 0600 files; their paths."""
    paths = []
    for name in ("pepper", "encryption"):
        path = tmp_path / f"{name}.secret"
        path.write_text(f"{name}-" + "s" * 40)
        path.chmod(0o600)
        paths.append(path)
    return paths[0], paths[1]


def source(response) -> str | None:
    """Where the answer came from: ``live`` (the directory) or ``cache``."""
    return response.header("Remote-Auth-Source")


def user(response) -> str | None:
    """The user signed in, as text (the header carries UTF-8 in Latin-1)."""
    name = response.header("Remote-User")
    return name.encode("latin-1").decode() if name is not None else None


def disable(directory: Slapd, uid: str) -> None:
    """The account disabled at the directory (``nsAccountLock``): refused for account state."""
    directory.modify(directory.user_dn(uid), {"objectClass": [(ldap3.MODIFY_ADD, ["authgwAccountState"])],
                                              "nsAccountLock": [(ldap3.MODIFY_REPLACE, ["TRUE"])]})


def lock(directory: Slapd, uid: str) -> None:
    """The account locked by ppolicy (the module's slapd needs ``ppolicy=True``): its right
    password is refused as a wrong one."""
    directory.modify(directory.user_dn(uid), {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]})


# -- in-process: the real cache plugin over a test directory (support.chainhelp) -----------------------


def runtime(tmp_path: Path, ldap: dict, *, cache: dict | None = None, ldap_target: str | None = None):
    """A runtime deciding ``chain: [ldap]`` with ``plugins: [cache]`` over *tmp_path*: the real
    cache plugin (*cache*: its settings), the ``ldap`` step a test plugin (*ldap_target*, else
    chainhelp's) doing as *ldap* says. Runtimes over one *tmp_path* share the key files, the
    store and the refusals kept for it, as the worker processes of one instance do."""
    from support.chainhelp import build

    targets = {"cache": "gateway.plugins.cache:CachePlugin"}
    if ldap_target is not None:
        targets["ldap"] = ldap_target
    return build(tmp_path, {"chain": ["ldap"], "plugins": ["cache"]}, {"ldap": ldap, "cache": cache or {}},
                 targets=targets)


def old_fold_pointer(rt, name: str, account: str, folded: str) -> None:
    """Writes the pointer row an older version wrote for *name* (another name of *account*),
    keyed by the full case fold *folded* of that name rather than by the name."""
    import time

    from gateway.plugins.cache.offline import ALIAS_HASH
    from gateway.plugins.cache.store import Entry

    offline = rt.gateway.plugins["cache"].offline
    keys = offline.keys()
    old_row = keys.row_key(folded)
    now = time.time()
    offline.store.put(Entry(old_row, keys.kid, ALIAS_HASH,
                            keys.seal_alias(old_row, account, "ldap", now, password_hash=ALIAS_HASH, name=name), now))
