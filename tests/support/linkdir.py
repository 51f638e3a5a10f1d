"""The directory behind the link and relay tests' connectors: a real slapd for the test module
holding ``alice`` (``Alice-Passw0rd``, group ``staff``).

A test module takes the fixture by name::

    from support.linkdir import slapd  # noqa: F401 - fixture
"""

from __future__ import annotations

import pytest

from support.slapd import Slapd

__all__ = ["slapd"]


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    """A slapd for the module with ``alice`` in it, stopped at the module's end."""
    server = Slapd(tmp_path_factory.mktemp("ldap")).start()
    server.add_user("alice", "Alice-Passw0rd", cn="Alice A", mail="alice@example.com", groups=["staff"])
    yield server
    server.stop()
