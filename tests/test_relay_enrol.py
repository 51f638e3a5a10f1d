"""Issue 13, step 1: connections, one-time tickets and enrolment, through real processes
(``authgw relay ...`` and ``authgw link enroll`` against a serving relay)."""

from __future__ import annotations

import json
import ssl
import sqlite3
import time
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support.linkenv import Connector, NoDirectory, Relay
from support.pki import unknown_algorithm_csrs


@pytest.fixture
def relay(tmp_path):
    server = Relay(tmp_path / "relay").setup().start()
    yield server
    server.stop()


def _post(url: str, ca, body: bytes) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=context, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _csr(cn: str, key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return json.dumps({"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()


def test_a_ticket_enrols_one_connector_with_its_own_key(relay, tmp_path):
    url = relay.ticket()
    assert url.startswith(f"{relay.url}/p/")
    token = url.rsplit("/", 1)[1]
    # stored hashed only; the CA key is private
    db = sqlite3.connect(relay.state / "relay" / "relay.sqlite3")
    assert token not in json.dumps(db.execute("SELECT * FROM tickets").fetchall())
    assert (relay.state / "relay" / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600

    connector = Connector(tmp_path / "c1", slapd=NoDirectory()).enroll(url, relay.ca_file)
    link = connector.state / "link"
    assert (link / "key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((link / "cert.pem").read_bytes())
    key = serialization.load_pem_private_key((link / "key.pem").read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == connector.connector_id
    assert connector.connector_id.startswith("acme-")
    assert (link / "relay-ca.pem").read_bytes() == relay.ca_file.read_bytes()

    # the same ticket a second time: refused, clearly, exit 1
    again = Connector(tmp_path / "c2", slapd=NoDirectory()).cli("link", "enroll", url, "--ca", str(relay.ca_file))
    assert again.returncode == 1
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ticket_used" in errors[0]
    listing = relay.cli("relay", "connectors")
    assert connector.connector_id in listing.stdout and "offline" in listing.stdout


def test_expired_and_unknown_tickets_are_refused(relay, tmp_path):
    url = relay.ticket("--lifetime", "1")
    time.sleep(1.5)
    result = Connector(tmp_path / "c1", slapd=NoDirectory()).cli("link", "enroll", url, "--ca", str(relay.ca_file))
    assert result.returncode == 1 and "ticket_expired" in result.stderr
    unknown = url.rsplit("/", 1)[0] + "/" + "x" * 43
    result = Connector(tmp_path / "c2", slapd=NoDirectory()).cli("link", "enroll", unknown, "--ca", str(relay.ca_file))
    assert result.returncode == 1 and "ticket_unknown" in result.stderr
    assert not (tmp_path / "c2" / "state" / "link" / "cert.pem").exists()


def test_enrolment_needs_a_verified_relay(relay, tmp_path):
    url = relay.ticket()
    result = Connector(tmp_path / "c1", slapd=NoDirectory()).cli("link", "enroll", url)  # system CAs only
    assert result.returncode == 1 and "--ca" in result.stderr
    http = Connector(tmp_path / "c2", slapd=NoDirectory()).cli("link", "enroll", url.replace("https", "http"))
    assert http.returncode == 1 and "HTTPS only" in http.stderr


def test_a_csr_for_another_name_is_refused_and_keeps_the_ticket(relay):
    url = relay.ticket()
    status, body = _post(url, relay.ca_file, _csr("someone-else"))
    assert (status, body["error"]) == (400, "csr_wrong_name")
    status, body = _post(url, relay.ca_file, b'{"csr": "not a pem"}')
    assert (status, body["error"]) == (400, "csr_malformed")
    status, body = _post(url, relay.ca_file, b"[1, 2")
    assert (status, body["error"]) == (400, "bad_request")
    status, body = _post(url, relay.ca_file, b"x" * 20000)
    assert status == 413
    connector_id = json.loads(urllib.request.urlopen(url, context=ssl.create_default_context(
        cafile=str(relay.ca_file)), timeout=10).read())["connector"]
    for pem in unknown_algorithm_csrs(connector_id):  # an unknown curve or key type: refused, not a 500
        status, body = _post(url, relay.ca_file, json.dumps({"csr": pem}).encode())
        assert (status, body["error"]) == (400, "csr_wrong_key")
    assert "Traceback" not in relay.process.output()
    # none of that used the ticket up: the right CSR still enrols
    status, body = _post(url, relay.ca_file, _csr(connector_id))
    assert status == 200 and "BEGIN CERTIFICATE" in body["certificate"]
    status, body = _post(url, relay.ca_file, _csr(connector_id))
    assert (status, body["error"]) == (410, "ticket_used")


def test_tickets_only_for_existing_connections(relay):
    result = relay.cli("relay", "ticket", "nope")
    assert result.returncode == 1 and "connection add" in result.stderr


def test_a_reusable_connection_ticket_enrols_several_connectors_each_with_its_own_key(relay, tmp_path):
    url = relay.ticket("--uses", "3")
    first = Connector(tmp_path / "c1", slapd=NoDirectory()).enroll(url, relay.ca_file)
    second = Connector(tmp_path / "c2", slapd=NoDirectory()).enroll(url, relay.ca_file)
    assert first.connector_id != second.connector_id
    assert first.connector_id.startswith("acme-") and second.connector_id.startswith("acme-")
    keys = {(c.state / "link" / "key.pem").read_bytes() for c in (first, second)}
    assert len(keys) == 2
    # an existing connector's name, or one not of the connection's form, is refused (no use spent):
    # a final newline (`relay revoke acme-0123abcd` could not name it), or another name before the
    # digits (revocation took acme-x-... for another connection's connector; review of the relay)
    for name in (first.connector_id, "acme-zzzzzzzz", "other-0123abcd", "acme-0123abcd\n", "acme-x-0123abcd",
                 "acme-eu-0123abcd"):
        status, body = _post(url, relay.ca_file, _csr(name))
        assert (status, body["error"]) == (400, "csr_wrong_name")
    status, body = _post(url, relay.ca_file, _csr("acme-0123abcd"))
    assert status == 200
    fourth = Connector(tmp_path / "c4", slapd=NoDirectory()).cli("link", "enroll", url, "--ca", str(relay.ca_file))
    assert fourth.returncode == 1 and "ticket_used" in fourth.stderr


def test_enrolments_racing_for_one_id_spend_one_use_of_a_reusable_ticket(relay):
    """Of enrolments naming one new id at once, one wins; the others' uses of the ticket are given
    back, so the ticket still enrols as many connectors as it says (review of the relay: 8 at once
    on a 3-use ticket used it up, and enrolled one connector)."""
    from concurrent.futures import ThreadPoolExecutor

    url = relay.ticket("--uses", "3")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _post(url, relay.ca_file, _csr("acme-abcdef01")), range(8)))
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(200) == 1 and set(statuses) <= {200, 400, 410}, answers
    assert [_post(url, relay.ca_file, _csr(f"acme-0000000{i}"))[0] for i in (1, 2)] == [200, 200]
    status, body = _post(url, relay.ca_file, _csr("acme-00000003"))
    assert (status, body["error"]) == (410, "ticket_used")


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_use_given_back_counts_again(kind, tmp_path, request):
    from gateway.plugins.relay.settings import RedisSettings
    from gateway.plugins.relay.store import RedisStore, SQLiteStore, TicketRefused

    if kind == "sqlite":
        store = SQLiteStore(tmp_path / "relay.sqlite3")
    else:
        server = request.getfixturevalue("redis_server")
        store = RedisStore(RedisSettings(url=server.url, key_prefix=f"giveback{time.monotonic_ns()}:"))
    now = time.time()
    store.add_connection("acme")
    store.add_ticket("acme", "t" * 43, "", now + 600, uses=1)
    assert store.use_ticket("t" * 43, now)[0] == "acme"
    for _ in range(2):  # refused uses of a used-up ticket leave nothing to give back into
        with pytest.raises(TicketRefused):
            store.use_ticket("t" * 43, now)
    store.give_back("t" * 43)
    assert store.use_ticket("t" * 43, now)[0] == "acme"
    with pytest.raises(TicketRefused):
        store.use_ticket("t" * 43, now)
