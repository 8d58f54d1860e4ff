"""EST (RFC 7030) on ``registrar run --est-port``, with clients this project did not write:
``curl`` + ``openssl`` (PKCS#10 in, PKCS#7 out) and strongSwan's ``pki --est`` /
``pki --estca``; the certificates they get then work on the operational MQTT listener with
``mosquitto_pub``, and a superseded one stops working there.

The devices come from a real factory station (``device-sim build-fleet --keys software``:
entitlement, TPM NV counter, factory certificate signed in the station's TPM, audit record,
ingested by HQ), and the site is commissioned from HQ's bundle. Their factory keys are
software keys, handed to the clients as key files in the test's private tmp directory (the
clients are third-party programs reading files: that is the point). Refusals are checked to
answer with the RFC's status codes and a readable reason, and to store nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.cli import main as device_main
from device_sim.swtpm import Swtpm
from factory_station.cli import main as station_main
from hq.cli import main as hq_main
from registrar.broker import Endpoint
from registrar.cli import main as registrar_main
from registrar.est import EstServer, EstTraffic, est_server_context
from signers.software import SoftwareKey
from tests.fixtures.fleet import invoke, secret_file, station_with_entitlement
from tests.fixtures.pki import Pki
from tests.fixtures.registrar_run import DAY, REGISTRAR
from trustcore.est import CSR_ATTRS_DER
from trustcore.identity import DeviceId
from trustcore.profiles import (
    device_id_from_certificate,
    issue_broker_certificate,
)
from trustcore.registration import open_payload_key, parse_key_update
from trustcore.wrap_key import build_wrap_key_registration

pytestmark = [pytest.mark.slow]

PEM = serialization.Encoding.PEM
EST = "/.well-known/est"


#: Devices the station provisions for this module; the site's bundle lists all but the
#: last two (``TH-000006``, ``TH-000007``: made by the same station, not admitted here).
FLEET = 8
ADMITTED = FLEET - 2
OUTSIDER = f"TH-{FLEET - 2:06d}"


@dataclass
class Site:
    home: Path
    process: subprocess.Popen[bytes]
    est: Endpoint
    operational: Endpoint
    root: Path  # manufacturer root (PEM): the clients' trust anchor
    fleet: Path  # device-sim build-fleet output: <id>/idevid.pem, chain.pem, factory.key.pem
    fleet_passphrase: bytes
    log: Path

    def url(self, operation: str = "") -> str:
        return f"https://{self.est.host}:{self.est.port}{EST}/{operation}"

    def status(self) -> dict[str, Any]:
        data = json.loads((self.home / "run" / "status.json").read_text())
        assert isinstance(data, dict)
        return data

    def status_after(self, previous: float) -> dict[str, Any]:
        """The first status.json written after ``previous`` (its ``updated``)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            doc = self.status()
            if doc["updated"] > previous:
                return doc
            time.sleep(0.05)
        raise AssertionError("status.json was not rewritten")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The real flow, by the commands a user types: HQ; a load-test factory station (its CA
    key in a swtpm, ``--unsafe-csr-only``) entitled for ``TH-`` ids; ``device-sim
    build-fleet --keys software`` provisions FLEET devices through it (entitlement, TPM NV
    counter, certificate signed in the station's TPM, audit record); HQ ingests the audit;
    the site is enrolled and commissioned from HQ's bundle listing the first ADMITTED
    devices; ``registrar run --broker mosquitto --est-port 0`` (renewals not rate-limited)."""
    tmp = tmp_path_factory.mktemp("est")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DEVTRUST_HQ_PASSPHRASE", "hq passphrase for the EST test")
        env.setenv("DEVTRUST_SITE_PASSPHRASE", "site passphrase for the EST test")
        station_tpm = Swtpm(tmp / "station-tpm").start()
        try:
            hq, station = station_with_entitlement(tmp, station_tpm, unsafe=True)
            fleet_pass = secret_file(tmp / "devices.pass", "EST test fleet passphrase")
            fleet = tmp / "fleet"
            line = invoke(
                device_main, "build-fleet", "--station", station, "--count", FLEET,
                "--keys", "software", "--out", fleet, "--passphrase-file", fleet_pass, "--json",
            )  # fmt: skip
            built = json.loads(line)
            assert built["built"] == FLEET
            export = tmp / "audit-1.sealed"
            invoke(station_main, "export-audit", "--home", station, "--out", export)
            invoke(hq_main, "ingest-audit", "--home", hq, export, "--json")
        finally:
            station_tpm.stop()
        home = tmp / "site"
        site_pass = secret_file(tmp / "site.pass", "site passphrase for the EST test")
        root = hq / "certs" / "root-ca.pem"
        invoke(registrar_main, "init", "--home", home, "--site-id", "site-01", "--root", root)
        invoke(hq_main, "site", "enrol", "--home", hq, next(home.glob("*enrol*")))
        bundle = tmp / "bundle.sealed"
        listed = [a for i in range(ADMITTED) for a in ("--device", f"TH-{i:06d}")]
        invoke(hq_main, "site", "bundle", "--home", hq, "--site", "site-01", *listed,
               "--out", bundle)  # fmt: skip
        invoke(registrar_main, "commission", "--home", home, bundle)
        # A fresh LDevID may renew at once (the default rate limit is an hour); window 0:
        # every re-enrolment's old LDevID is on the CRL before its answer (no batching).
        invoke(registrar_main, "ldevid-policy", "--home", home,
               "--min-interval-seconds", "0", "--handover-seconds", "1",
               "--supersede-window-seconds", "0")  # fmt: skip
    log = tmp / "registrar.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(REGISTRAR), "run", "--home", str(home), "--passphrase-file", str(site_pass),
                "--broker", "mosquitto", "--registration-port", "0", "--operational-port", "0",
                "--est-port", "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        status = home / "run" / "status.json"
        deadline = time.monotonic() + 60
        while not status.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        listeners = json.loads(status.read_text())["listeners"]
        yield Site(
            home,
            process,
            Endpoint(**listeners["est"]),
            Endpoint(**listeners["operational"]),
            root,
            fleet,
            fleet_pass.read_text().strip().encode(),
            log,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text


# ------------------------------------------------------------------------ device files


def _private_file(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A software P-256 key file (PKCS#8 PEM, 0600, in the test's private tmp dir)."""
    key = ec.generate_private_key(ec.SECP256R1())
    _private_file(
        path,
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return key


def factory_device(site: Site, directory: Path, device_id: str) -> tuple[Path, Path]:
    """(IDevID + station CA chain PEM, factory key file) of a device the station made: its
    encrypted keystore from the fleet, decrypted into a 0600 file in the test's private tmp
    directory for the third-party clients (they read key files)."""
    directory.mkdir(parents=True, exist_ok=True)
    made = site.fleet / device_id
    chain = directory / "idevid.pem"
    chain.write_bytes((made / "idevid.pem").read_bytes() + (made / "chain.pem").read_bytes())
    key = SoftwareKey.load(made / "factory.key.pem", site.fleet_passphrase).private_key()
    keyfile = _private_file(
        directory / "factory.key",
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return chain, keyfile


def run(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, check=False, timeout=30)


def openssl_csr(directory: Path, device_id: str, name: str) -> tuple[Path, Path]:
    """A new key and a DER PKCS#10 for it, made by ``openssl`` (CN = serialNumber = id)."""
    key = directory / f"{name}.key"
    write_key(key)
    csr = directory / f"{name}.csr.der"
    made = run(
        "openssl", "req", "-new", "-key", str(key), "-sha256", "-outform", "DER",
        "-subj", f"/CN={device_id}/serialNumber={device_id}", "-out", str(csr),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return key, csr


def curl(
    site: Site,
    operation: str,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    body: bytes | None = None,
    content_type: str = "application/pkcs10",
) -> tuple[int, bytes]:
    """(HTTP status, body) from a real ``curl`` against the EST listener."""
    argv = ["curl", "-sS", "--cacert", str(site.root), "-w", "\n%{http_code}"]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    if body is not None:
        argv += ["-H", f"Content-Type: {content_type}", "--data-binary", "@-"]
    done = run(*argv, site.url(operation), stdin=body)
    assert done.returncode == 0, done.stderr
    payload, _, code = done.stdout.rpartition(b"\n")
    return int(code), payload


def pkcs7_certificates(body: bytes, directory: Path, name: str) -> Path:
    """``base64 -d | openssl pkcs7 -inform DER -print_certs`` into ``name``.pem."""
    der = directory / f"{name}.p7.der"
    der.write_bytes(base64.b64decode(body))
    out = directory / f"{name}.pem"
    printed = run("openssl", "pkcs7", "-inform", "DER", "-in", str(der), "-print_certs",
                  "-out", str(out))  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    return out


def mosquitto_pub(site: Site, cert: Path, key: Path, device_id: str) -> int:
    op = site.operational
    done = run(
        "mosquitto_pub", "-h", op.host, "-p", str(op.port), "-q", "1",
        "--cafile", str(site.root), "--cert", str(cert), "--key", str(key),
        "-t", f"devices/{device_id}/telemetry", "-m", "probe",
    )  # fmt: skip
    return done.returncode


def openssl_verify(site: Site, directory: Path, cert: Path) -> str:
    chain = directory / "trust.pem"
    chain.write_bytes(site.root.read_bytes() + (site.home / "current" / "site-ca.pem").read_bytes())
    done = run(
        "openssl", "verify", "-CAfile", str(chain), "-crl_check",
        "-CRLfile", str(site.home / "current" / "site-crl.pem"), str(cert),
    )  # fmt: skip
    return (done.stdout + done.stderr).decode()


def b64(path: Path) -> bytes:
    """One line, as strongSwan needs it (and curl sends it as is)."""
    return base64.b64encode(path.read_bytes())


def device_count(site: Site) -> int:
    doc = site.status_after(time.time())
    return int(doc["counts"]["devices"])


# ------------------------------------------------------------------------------- tests


def test_curl_openssl_enrol_reenrol_and_mqtt(site: Site, tmp_path: Path) -> None:
    """cacerts, csrattrs, simpleenroll with the factory certificate, the LDevID on the
    operational listener, idempotent retry, simplereenroll with the LDevID: the old one is
    refused at connect from then on, the new one works."""
    device = "TH-000000"
    idevid, factory_key = factory_device(site, tmp_path, device)

    code, body = curl(site, "cacerts")
    assert code == 200
    cas = pkcs7_certificates(body, tmp_path, "cacerts").read_text()
    site_ca = (site.home / "current" / "site-ca.pem").read_text()
    assert site_ca.strip() in cas and site.root.read_text().strip() in cas

    code, body = curl(site, "csrattrs")
    assert code == 200 and base64.b64decode(body) == CSR_ATTRS_DER
    parsed = run("openssl", "asn1parse", "-inform", "DER", stdin=base64.b64decode(body))
    assert b"ecdsa-with-SHA256" in parsed.stdout and b"prime256v1" in parsed.stdout

    key1, csr1 = openssl_csr(tmp_path, device, "ldevid1")
    code, body = curl(site, "simpleenroll", cert=idevid, key=factory_key, body=b64(csr1))
    assert code == 200, body
    ldevid1 = pkcs7_certificates(body, tmp_path, "ldevid1")
    assert ": OK" in openssl_verify(site, tmp_path, ldevid1)
    cert1 = x509.load_pem_x509_certificate(ldevid1.read_bytes())
    assert device_id_from_certificate(cert1) == DeviceId(device)
    assert mosquitto_pub(site, ldevid1, key1, device) == 0

    # The same CSR again (a lost answer): the same certificate, not a second one.
    code, again = curl(site, "simpleenroll", cert=idevid, key=factory_key, body=b64(csr1))
    assert code == 200
    assert (
        x509.load_pem_x509_certificate(
            pkcs7_certificates(again, tmp_path, "again").read_bytes()
        ).serial_number
        == cert1.serial_number
    )

    key2, csr2 = openssl_csr(tmp_path, device, "ldevid2")
    code, body = curl(site, "simplereenroll", cert=ldevid1, key=key1, body=b64(csr2))
    assert code == 200, body
    ldevid2 = pkcs7_certificates(body, tmp_path, "ldevid2")
    cert2 = x509.load_pem_x509_certificate(ldevid2.read_bytes())
    assert cert2.serial_number != cert1.serial_number
    assert "certificate revoked" in openssl_verify(site, tmp_path, ldevid1)
    assert mosquitto_pub(site, ldevid1, key1, device) != 0
    assert mosquitto_pub(site, ldevid2, key2, device) == 0

    # The superseded LDevID cannot re-enrol any more (readable reason, 403), and an LDevID
    # is no factory certificate for a first enrolment.
    _, csr3 = openssl_csr(tmp_path, device, "ldevid3")
    code, body = curl(site, "simplereenroll", cert=ldevid1, key=key1, body=b64(csr3))
    assert code == 403 and body.startswith(b"ldevid_superseded: "), body
    code, body = curl(site, "simpleenroll", cert=ldevid2, key=key2, body=b64(csr3))
    assert code == 403 and body.startswith(b"untrusted: "), body


def test_strongswan_pki_estca_est_and_reenrol(site: Site, tmp_path: Path) -> None:
    """strongSwan ``pki --estca`` and ``pki --est`` (client certificate), then the LDevID on
    the operational listener; ``pki --est`` again with that LDevID renews it."""
    device = "TH-000001"
    idevid, factory_key = factory_device(site, tmp_path, device)
    url = f"https://{site.est.host}:{site.est.port}"  # pki adds /.well-known/est/<op>
    ca = run("pki", "--estca", "--url", url, "--cacert", str(site.root),
             "--caout", str(tmp_path / "estca.pem"), "--outform", "pem")  # fmt: skip
    assert ca.returncode == 0, ca.stdout + ca.stderr
    fetched = b"".join(p.read_bytes() for p in tmp_path.glob("estca*.pem"))
    site_ca = x509.load_pem_x509_certificate((site.home / "current" / "site-ca.pem").read_bytes())
    assert site_ca in x509.load_pem_x509_certificates(fetched)

    key1, csr1 = openssl_csr(tmp_path, device, "pki1")
    cert1 = tmp_path / "pki1.pem"
    enrol = run("pki", "--est", "--url", url, "--cacert", str(site.root), "--in", str(csr1),
                "--cert", str(idevid), "--key", str(factory_key), "--outform", "pem")  # fmt: skip
    assert enrol.returncode == 0, enrol.stderr
    cert1.write_bytes(enrol.stdout)
    ldevid1 = x509.load_pem_x509_certificate(enrol.stdout)
    assert ldevid1.issuer == site_ca.subject
    assert mosquitto_pub(site, cert1, key1, device) == 0

    key2, csr2 = openssl_csr(tmp_path, device, "pki2")
    renew = run("pki", "--est", "--url", url, "--cacert", str(site.root), "--in", str(csr2),
                "--cert", str(cert1), "--key", str(key1), "--outform", "pem")  # fmt: skip
    assert renew.returncode == 0, renew.stderr
    cert2 = tmp_path / "pki2.pem"
    cert2.write_bytes(renew.stdout)
    assert x509.load_pem_x509_certificate(renew.stdout).serial_number != ldevid1.serial_number
    assert mosquitto_pub(site, cert2, key2, device) == 0
    assert mosquitto_pub(site, cert1, key1, device) != 0


def test_refusals_have_rfc_status_a_reason_and_store_nothing(site: Site, tmp_path: Path) -> None:
    before = device_count(site)
    idevid, factory_key = factory_device(site, tmp_path / "a", "TH-000002")
    _, csr = openssl_csr(tmp_path / "a", "TH-000002", "good")

    # No client certificate: 401. serverkeygen: 501 with the reason.
    assert curl(site, "simpleenroll", body=b64(csr))[0] == 401
    code, body = curl(site, "serverkeygen", cert=idevid, key=factory_key, body=b64(csr))
    assert code == 501 and body.startswith(b"serverkeygen_refused: ")

    # A CSR naming another device; a CSR that is not base64; a wrong media type.
    _, other = openssl_csr(tmp_path / "a", "TH-000202", "other")
    code, body = curl(site, "simpleenroll", cert=idevid, key=factory_key, body=b64(other))
    assert code == 400 and body.startswith(b"csr_wrong_name: "), body
    code, body = curl(site, "simpleenroll", cert=idevid, key=factory_key, body=b"%%%")
    assert code == 400 and body.startswith(b"csr_malformed: "), body
    code, _ = curl(
        site, "simpleenroll", cert=idevid, key=factory_key, body=b64(csr), content_type="text/x"
    )
    assert code == 415

    # A device of the same station that the site's manifest does not list, on both
    # operations (simplereenroll with a factory certificate is a first enrolment).
    outsider, outsider_key = factory_device(site, tmp_path / "b", OUTSIDER)
    _, outsider_csr = openssl_csr(tmp_path / "b", OUTSIDER, "x")
    for operation in ("simpleenroll", "simplereenroll"):
        code, body = curl(site, operation, cert=outsider, key=outsider_key, body=b64(outsider_csr))
        assert code == 403 and body.startswith(b"not_in_manifest: "), body

    # The factory key as the "new" key: refused like over MQTT.
    idevid_csr = tmp_path / "a" / "idevid.csr.der"
    made = run(
        "openssl", "req", "-new", "-key", str(factory_key), "-sha256", "-outform", "DER",
        "-subj", "/CN=TH-000002/serialNumber=TH-000002", "-out", str(idevid_csr),
    )  # fmt: skip
    assert made.returncode == 0
    code, body = curl(site, "simpleenroll", cert=idevid, key=factory_key, body=b64(idevid_csr))
    assert code == 400 and body.startswith(b"csr_idevid_key: "), body

    assert device_count(site) == before  # nothing stored for any refusal
    answered = site.status()["est_answers"]
    assert answered["403"] >= 2 and answered["400"] >= 3


def test_an_est_device_gets_its_payload_key_over_mqtt(site: Site, tmp_path: Path) -> None:
    """EST carries no payload key: the device publishes its wrap key (signed by its LDevID)
    on ``devices/<id>/keys/wrap`` and receives the payload key as a payload-key update on
    ``devices/<id>/keys``, with ``mosquitto_pub`` / ``mosquitto_sub``."""
    device = "TH-000003"
    idevid, factory_key = factory_device(site, tmp_path, device)
    ldevid_key, csr = openssl_csr(tmp_path, device, "ldevid")
    code, body = curl(site, "simpleenroll", cert=idevid, key=factory_key, body=b64(csr))
    assert code == 200, body
    ldevid = pkcs7_certificates(body, tmp_path, "ldevid")
    cert = x509.load_pem_x509_certificate(ldevid.read_bytes())
    key = serialization.load_pem_private_key(ldevid_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    wrap = SoftwareKey.ephemeral()
    message = tmp_path / "wrap.cbor"
    message.write_bytes(
        build_wrap_key_registration(
            device_id=DeviceId(device),
            time=int(time.time()),
            wrap_key=wrap.public_key(),
            ldevid_der=cert.public_bytes(serialization.Encoding.DER),
            ldevid_key=SoftwareKey(key),
        )
    )
    op = site.operational
    tls = ["--cafile", str(site.root), "--cert", str(ldevid), "--key", str(ldevid_key)]
    sent = run("mosquitto_pub", "-h", op.host, "-p", str(op.port), "-q", "1", *tls,
               "-t", f"devices/{device}/keys/wrap", "-f", str(message))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    got = run("mosquitto_sub", "-h", op.host, "-p", str(op.port), "-q", "1", *tls,
              "-t", f"devices/{device}/keys", "-C", "1", "-W", "15", "-F", "%x")  # fmt: skip
    assert got.returncode == 0, got.stderr
    site_ca = x509.load_pem_x509_certificate((site.home / "current" / "site-ca.pem").read_bytes())
    update = parse_key_update(
        bytes.fromhex(got.stdout.decode().strip()),
        device_id=DeviceId(device),
        site_ca=site_ca,
        newer_than=0,
    )
    payload_key = open_payload_key(wrap, DeviceId(device), update.payload_key)
    assert payload_key.key_id.hex() == site.status()["payload_key"]

    # Set once: another wrap key (a thief holding the LDevID key) is refused, and the
    # retained update still opens only with the first one.
    other = SoftwareKey.ephemeral()
    message.write_bytes(
        build_wrap_key_registration(
            device_id=DeviceId(device),
            time=int(time.time()),
            wrap_key=other.public_key(),
            ldevid_der=cert.public_bytes(serialization.Encoding.DER),
            ldevid_key=SoftwareKey(key),
        )
    )
    sent = run("mosquitto_pub", "-h", op.host, "-p", str(op.port), "-q", "1", *tls,
               "-t", f"devices/{device}/keys/wrap", "-f", str(message))  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 10
    refused = f"refused the wrap key of {device}"
    while refused not in site.log.read_text():
        assert time.monotonic() < deadline, "the second wrap key was not refused"
        time.sleep(0.05)
    again = run("mosquitto_sub", "-h", op.host, "-p", str(op.port), "-q", "1", *tls,
                "-t", f"devices/{device}/keys", "-C", "1", "-W", "15", "-F", "%x")  # fmt: skip
    retained = parse_key_update(
        bytes.fromhex(again.stdout.decode().strip()),
        device_id=DeviceId(device),
        site_ca=site_ca,
        newer_than=0,
    )
    assert open_payload_key(wrap, DeviceId(device), retained.payload_key) == payload_key


async def test_the_est_listener_takes_new_tls_material_without_a_restart(
    pki: Pki, tmp_path: Path
) -> None:
    """``EstServer.use_tls`` (re-issued broker certificate, re-commission, CA rollover):
    the next handshake presents the new server certificate; the listener stays up."""

    def server_files(name: str) -> tuple[Path, Path, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_broker_certificate(
            pki.site_ca,
            pki.site_key,
            key.public_key(),
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            organization="Site",
            not_before=pki.now - DAY,
            not_after=pki.now + DAY,
        )
        chain = tmp_path / f"{name}.pem"
        chain.write_bytes(cert.public_bytes(PEM) + pki.site_ca.public_bytes(PEM))
        encrypted = serialization.BestAvailableEncryption(b"pass phrase")
        keyfile = _private_file(
            tmp_path / f"{name}.key",
            key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, encrypted),
        )
        return chain, keyfile, cert

    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(PEM))

    def never(*_: object) -> Any:
        raise AssertionError("no enrolment in this test")

    first, second = server_files("one"), server_files("two")
    server = EstServer(
        EstTraffic(
            register=never,
            renew=never,
            ca_certificates=lambda: [pki.site_ca, pki.root],
            clock=lambda: pki.now,
            ldevid_issuers=lambda: (pki.site_ca,),
        ),
        est_server_context(first[0], first[1], b"pass phrase", (root,)),
    )
    await server.start("127.0.0.1", 0)
    client = ssl.create_default_context(cafile=root)

    async def presented() -> bytes:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", server.endpoint.port, ssl=client, server_hostname="127.0.0.1"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return bytes(der)

    try:
        assert await presented() == first[2].public_bytes(serialization.Encoding.DER)
        server.use_tls(est_server_context(second[0], second[1], b"pass phrase", (root,)))
        assert await presented() == second[2].public_bytes(serialization.Encoding.DER)
    finally:
        await server.stop()
