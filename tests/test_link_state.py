"""A connector whose enrolment files are damaged (review of the state directory): a truncated
``link.json`` ended the link's task without a word, ``/readyz`` said "not started", ``authgw
link status`` printed a traceback, and the connector never dialled again once the file was put
back. It says which files and what to do, and links again once they are whole. A real relay
and a real connector (``authgw serve``), enrolled by ticket."""

from __future__ import annotations

from support.linkenv import Connector, NoDirectory, Relay
from support.net import wait_for


def link_detail(connector: Connector) -> str:
    components = connector.process.get("/readyz").json().get("components", [])
    return next((c["detail"] for c in components if c["name"] == "link.relay"), "")


def test_a_damaged_enrolment_is_said_and_the_link_comes_back_once_it_is_whole(tmp_path):
    relay = Relay(tmp_path / "relay").setup().start()
    connector = Connector(tmp_path / "c1", NoDirectory())
    try:
        connector.enroll(relay.ticket(), relay.ca_file).start().wait_linked(relay)
        connector.stop()
        link_json = connector.state / "link" / "link.json"
        whole = link_json.read_text()
        link_json.write_text(whole[: len(whole) // 2])

        status = connector.cli("link", "status")
        assert status.returncode == 1 and "Traceback" not in status.stderr
        assert "is damaged" in status.stderr and str(link_json.parent) in status.stderr

        connector.start()
        wait_for(lambda: "is damaged" in link_detail(connector), 15, what="the damage in /readyz",
                 log=connector.process.output)
        assert "enrolment in" in connector.process.output() and "is damaged" in connector.process.output()

        link_json.write_text(whole)  # restored: linked again, no restart
        connector.wait_linked(relay, timeout=30)
    finally:
        connector.stop()
        relay.stop()


def test_a_damaged_relay_ca_is_named_with_what_to_do(tmp_path):
    # only OpenSSL's "Unable to load PEM file ... MalformedFraming" before, naming no file
    import pytest

    from gateway.plugins.relay.ca import RelayCA

    RelayCA.load_or_create(tmp_path, "acme")
    (crt,) = tmp_path.rglob("ca.crt")
    crt.write_text(crt.read_text()[:100])
    with pytest.raises(ValueError, match="the relay CA in .* cannot be read .* restore ca.key and ca.crt"):
        RelayCA.load_or_create(tmp_path, "acme")
