"""The login door behind a trusted proxy, in front of a real slapd, with one SAML service
provider checking its answers (pysaml2, support.saml_sp): the site the login door's review tests
share.

A test module makes its own from it::

    @pytest.fixture(scope="module")
    def door(tmp_path_factory):
        with saml_door(tmp_path_factory.mktemp("left45"), {...the login settings...},
                       sp_id=SP_ID, acs=ACS) as site:
            yield site
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from support.login import LoginSite
from support.pki import CA
from support.saml_sp import SamlSP
from support.slapd import Slapd

__all__ = ["no_5xx", "saml_door"]


@contextmanager
def saml_door(base: Path, login: dict, *, sp_id: str, acs: str, env: dict | None = None) -> Iterator[LoginSite]:
    """A started :class:`LoginSite` under *base* with *login* as its login settings, trusting
    127.0.0.1 as a proxy (``X-Forwarded-For``), in front of a slapd holding ``alice``
    (``Alice-pw-1``, ``alice@example.com``); *env* for its secrets. The site's gateway is
    ``site.gw``, and ``site.sp`` the SAML SP *sp_id* (its ACS *acs*) that trusts the door's
    metadata. Both servers are stopped at the end."""
    slapd = Slapd(base / "slapd").start()
    try:
        slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
        site = LoginSite(base / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]},
                         login=login, env=env)
        site.gw = site.start()
        try:
            site.sp = SamlSP(base / "sp", site.client().get(f"{site.url}/saml/metadata", timeout=15).text, acs=acs,
                             entity_id=sp_id)
            yield site
        finally:
            site.stop()
    finally:
        slapd.stop()


def no_5xx(site: LoginSite) -> None:
    """Nothing the site's gateway logged says a request failed inside it."""
    output = site.gw.output()
    assert "Traceback" not in output and "a request handler raised" not in output, output[-3000:]
