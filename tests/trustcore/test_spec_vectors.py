"""The registration vectors of ``docs/formats.md`` ("Registration messages"): read from the
document, decoded and verified with the project's own code (the registrar's checks and the
device's), and re-derived byte for byte from the documented inputs (fixed keys, time, nonce,
HPKE ephemeral keys; signatures are RFC 6979, so they are reproducible too, although any
valid ECDSA signature verifies the same way).

Only the certificates are taken from the document as they are (their serials are random):
the test verifies them instead. ``python -m tests.trustcore.test_spec_vectors`` makes a fresh set
(new certificates) and prints the blocks to paste into the document.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signers.software import SoftwareKey
from trustcore import cbor, hpke
from trustcore.csr import build_csr, validate_csr
from trustcore.identity import DeviceId, SiteId, StationId
from trustcore.keys import spki_der
from trustcore.payload import PayloadKey
from trustcore.profiles import (
    issue_factory_certificate,
    issue_root_ca,
    issue_secondary_certificate,
    issue_site_ca,
    issue_station_ca,
)
from trustcore.registration import (
    KEY_UPDATE_DOMAIN,
    RESPONSE_DOMAIN,
    Admission,
    RegistrationDenied,
    RegistrationError,
    RegistrationGranted,
    build_error_response,
    build_request,
    envelope_signature_valid,
    open_envelope,
    open_payload_key,
    parse_key_update,
    parse_request,
    parse_response,
    public_message,
    sign_envelope,
    verify_request,
)
from trustcore.verify import ChainVerifier

FORMATS_MD = Path(__file__).resolve().parents[2] / "docs" / "formats.md"

DEVICE = DeviceId("TH-000001")
TIME = 1_767_225_600  # 2026-01-01T00:00:00Z: the request's time and the registrar's clock
NOW = datetime.fromtimestamp(TIME, UTC)
NONCE = bytes(range(32))
PAYLOAD_KEY = PayloadKey(bytes.fromhex("0001020304050607"), bytes(range(32)))
NEXT_KEY = PayloadKey(bytes.fromhex("08090a0b0c0d0e0f"), bytes(range(32, 64)))
UPDATE_ISSUED = TIME + 86_400
REFUSAL_REASON = "not_in_manifest"


class DeterministicKey(SoftwareKey):
    """A software key that signs with RFC 6979 nonces, so the documented bytes are stable."""

    def sign(self, data: bytes) -> bytes:
        return self.private_key().sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


# ------------------------------------------------------------------------ the document


def _block(name: str) -> str:
    text = FORMATS_MD.read_text(encoding="utf-8")
    match = re.search(rf"<!-- vector: {re.escape(name)} -->\s*```(?:hex)?\n(.*?)```", text, re.S)
    assert match, f"vector {name} missing from docs/formats.md"
    return match.group(1)


def doc_vector(name: str) -> bytes:
    return bytes.fromhex("".join(_block(name).split()))


def doc_keys() -> dict[str, ec.EllipticCurvePrivateKey]:
    """The ``registration-keys`` block: ``name: 64 hex digits`` per line (P-256 scalars)."""
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    for line in _block("registration-keys").splitlines():
        if line.strip():
            name, value = (part.strip() for part in line.split(":"))
            keys[name] = ec.derive_private_key(int(value, 16), ec.SECP256R1())
    return keys


# ----------------------------------------------------------------- deterministic messages


@dataclass(frozen=True)
class Inputs:
    """Everything a vector depends on: the fixed keys and the (random-serial) certificates."""

    keys: dict[str, ec.EllipticCurvePrivateKey]
    root: bytes
    station_ca: bytes
    idevid: bytes
    csr: bytes
    site_ca: bytes
    ldevid: bytes

    def key(self, name: str) -> DeterministicKey:
        return DeterministicKey(self.keys[name])


def wrapped_key(inputs: Inputs, payload_key: PayloadKey, ephemeral: str) -> dict[str, bytes]:
    """The payload-key wrap written from the specification, not with the project's wrap:
    HPKE base mode to the wrap key, ``info`` = CBOR ["devtrust/payload-key/v1", device id,
    key id], empty ``aad``, with the documented ephemeral key."""
    info = cbor.encode(["devtrust/payload-key/v1", DEVICE.value, payload_key.key_id])
    enc, ct = hpke._seal_with_ephemeral(
        inputs.keys[ephemeral],
        inputs.keys["wrap"].public_key(),
        payload_key.key,
        info=info,
        aad=b"",
        aead=hpke.AES_256_GCM,
    )
    return {"key_id": payload_key.key_id, "enc": enc, "ct": ct}


def messages(inputs: Inputs) -> dict[str, bytes]:
    request = build_request(
        device_id=DEVICE,
        nonce=NONCE,
        time=TIME,
        csr_der=inputs.csr,
        wrap_key=inputs.keys["wrap"].public_key(),
        idevid_der=inputs.idevid,
        chain_der=[inputs.station_ca],
        factory_key=inputs.key("factory"),
    )
    digest = hashlib.sha256(request).digest()
    response_body = {
        "v": 1,
        "status": "ok",
        "device_id": DEVICE.value,
        "nonce": NONCE,
        "request": digest,
        "ldevid": inputs.ldevid,
        "site_ca": inputs.site_ca,
        "payload_key": wrapped_key(inputs, PAYLOAD_KEY, "hpke-ephemeral-1"),
    }
    update_body = {
        "v": 1,
        "device_id": DEVICE.value,
        "issued": UPDATE_ISSUED,
        "payload_key": wrapped_key(inputs, NEXT_KEY, "hpke-ephemeral-2"),
    }
    return {
        "registration-request": request,
        "registration-request-digest": digest,
        "registration-response": sign_envelope(
            RESPONSE_DOMAIN, response_body, inputs.key("site-ca")
        ),
        "registration-refusal": build_error_response(
            device_id=DEVICE,
            nonce=NONCE,
            request_digest=digest,
            reason=REFUSAL_REASON,
            site_ca_der=inputs.site_ca,
            site_signer=inputs.key("site-ca"),
        ),
        "payload-key-update": sign_envelope(KEY_UPDATE_DOMAIN, update_body, inputs.key("site-ca")),
    }


def doc_inputs() -> Inputs:
    """The documented inputs: keys from the key block, certificates from inside the vectors."""
    request = parse_request(doc_vector("registration-request"))
    _, _, response = open_envelope(doc_vector("registration-response"), 16384, "response")
    return Inputs(
        keys=doc_keys(),
        root=doc_vector("registration-root"),
        station_ca=request.chain_der[0],
        idevid=request.idevid_der,
        csr=request.csr_der,
        site_ca=response["site_ca"],
        ldevid=response["ldevid"],
    )


# ------------------------------------------------------------------------------- tests


def test_keys_block_names_every_key() -> None:
    assert set(doc_keys()) == {
        "root",
        "station-ca",
        "site-ca",
        "factory",
        "ldevid",
        "wrap",
        "hpke-ephemeral-1",
        "hpke-ephemeral-2",
    }


def test_every_vector_re_derives_byte_for_byte() -> None:
    derived = messages(doc_inputs())
    for name, value in derived.items():
        assert doc_vector(name) == value, f"{name} differs from docs/formats.md"


def test_request_passes_the_registrars_checks() -> None:
    inputs = doc_inputs()
    data = doc_vector("registration-request")
    request = parse_request(data)
    assert request.device_id == DEVICE and request.nonce == NONCE and request.time == TIME
    # the idempotency key and the response's `request` field: SHA-256 of the whole envelope
    assert (
        request.digest == hashlib.sha256(data).digest() == doc_vector("registration-request-digest")
    )
    # the signature covers CBOR [domain, body bytes]: the exact body bytes, not a re-encoding
    factory = inputs.keys["factory"].public_key()
    assert envelope_signature_valid(
        factory, request.signature, "devtrust/registration-request/v1", request.body
    )
    assert not envelope_signature_valid(
        factory, request.signature, "devtrust/registration-request/v1", request.body + b"\x00"
    )
    assert request.wrap_key_der == spki_der(inputs.keys["wrap"].public_key())
    root = x509.load_der_x509_certificate(inputs.root)
    verifier = ChainVerifier([root], require_crl=False)
    verified = verify_request(
        request,
        topic_device_id=DEVICE,
        verifier=verifier,
        admission=Admission(devices=frozenset({DEVICE})),
        now=NOW,
        nonce_seen=False,
        key_owner=None,
    )
    assert verified.identity.leaf.public_key() == factory
    assert verified.ldevid_public_key == inputs.keys["ldevid"].public_key()
    assert verified.station_id == StationId("station-a")
    csr = validate_csr(request.csr_der, expected_device_id=DEVICE)
    assert not list(csr.csr.extensions)  # the CSR needs no SAN: the profile adds it
    with pytest.raises(RegistrationError) as refused:
        verify_request(
            request,
            topic_device_id=DEVICE,
            verifier=verifier,
            admission=Admission(),
            now=NOW,
            nonce_seen=False,
            key_owner=None,
        )
    assert refused.value.reason == REFUSAL_REASON  # what the refusal vector answers


def test_response_verifies_on_the_device_and_unwraps_the_payload_key() -> None:
    inputs = doc_inputs()
    request = parse_request(doc_vector("registration-request"))
    result = parse_response(
        doc_vector("registration-response"),
        device_id=DEVICE,
        nonce=NONCE,
        request_digest=request.digest,
        ldevid_public_key=inputs.keys["ldevid"].public_key(),
        roots=[x509.load_der_x509_certificate(inputs.root)],
        now=NOW,
    )
    assert isinstance(result, RegistrationGranted)
    assert result.ldevid.public_key() == inputs.keys["ldevid"].public_key()
    assert result.site_ca.public_key() == inputs.keys["site-ca"].public_key()
    assert result.ldevid.not_valid_before_utc == NOW - timedelta(minutes=5)
    key = open_payload_key(SoftwareKey(inputs.keys["wrap"]), DEVICE, result.payload_key)
    assert key == PAYLOAD_KEY
    # another device id in `info` does not open it
    with pytest.raises(RegistrationError):
        open_payload_key(
            SoftwareKey(inputs.keys["wrap"]), DeviceId("TH-000002"), result.payload_key
        )
    # a response for another request (another digest) is not accepted
    with pytest.raises(RegistrationError):
        parse_response(
            doc_vector("registration-response"),
            device_id=DEVICE,
            nonce=NONCE,
            request_digest=hashlib.sha256(request.body).digest(),
            ldevid_public_key=inputs.keys["ldevid"].public_key(),
            roots=[x509.load_der_x509_certificate(inputs.root)],
            now=NOW,
        )


def test_refusal_verifies_on_the_device() -> None:
    inputs = doc_inputs()
    result = parse_response(
        doc_vector("registration-refusal"),
        device_id=DEVICE,
        nonce=NONCE,
        request_digest=doc_vector("registration-request-digest"),
        ldevid_public_key=inputs.keys["ldevid"].public_key(),
        roots=[x509.load_der_x509_certificate(inputs.root)],
        now=NOW,
    )
    assert result == RegistrationDenied(REFUSAL_REASON, public_message(REFUSAL_REASON), False)


def test_key_update_verifies_and_opens() -> None:
    inputs = doc_inputs()
    site_ca = x509.load_der_x509_certificate(inputs.site_ca)
    data = doc_vector("payload-key-update")
    update = parse_key_update(data, device_id=DEVICE, site_ca=site_ca, newer_than=0)
    assert update.issued == UPDATE_ISSUED
    assert open_payload_key(SoftwareKey(inputs.keys["wrap"]), DEVICE, update.payload_key) == (
        NEXT_KEY
    )
    with pytest.raises(RegistrationError):  # not newer than the last one applied
        parse_key_update(data, device_id=DEVICE, site_ca=site_ca, newer_than=UPDATE_ISSUED)


# ------------------------------------------------------------------------- regeneration


def fresh_inputs() -> Inputs:
    """New certificates (random serials) for the keys of the document."""
    keys = doc_keys()
    start = datetime(2025, 1, 1, tzinfo=UTC)
    root_end = datetime(2045, 1, 1, tzinfo=UTC)
    org = "Example Manufacturer"
    root = issue_root_ca(
        keys["root"], common_name="Example Root CA", organization=org,
        not_before=start, not_after=root_end,
    )  # fmt: skip
    station = issue_station_ca(
        root, keys["root"], keys["station-ca"].public_key(), station_id=StationId("station-a"),
        organization=org, not_before=start, not_after=root_end, max_not_after=root_end,
    )  # fmt: skip
    idevid = issue_factory_certificate(
        station, keys["station-ca"], keys["factory"].public_key(), device_id=DEVICE,
        manufacturer=org, not_before=datetime(2025, 6, 1, tzinfo=UTC),
    )  # fmt: skip
    site_ca = issue_site_ca(
        root, keys["root"], keys["site-ca"].public_key(), site_id=SiteId("site-a"),
        organization=org, not_before=start, not_after=datetime(2035, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    csr = build_csr(
        keys["ldevid"], x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, DEVICE.value)])
    )
    ldevid = issue_secondary_certificate(
        site_ca, keys["site-ca"], keys["ldevid"].public_key(), device_id=DEVICE,
        organization="Example Site Operator", not_before=NOW - timedelta(minutes=5),
        not_after=NOW + timedelta(days=365),
    )  # fmt: skip

    def der(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.DER)

    return Inputs(keys, der(root), der(station), der(idevid), csr, der(site_ca), der(ldevid))


def main() -> None:
    inputs = fresh_inputs()
    out = {"registration-root": inputs.root, **messages(inputs)}
    for name, value in out.items():
        text = value.hex()
        lines = "\n".join(text[i : i + 96] for i in range(0, len(text), 96))
        sys.stdout.write(f"<!-- vector: {name} -->\n```hex\n{lines}\n```\n\n")


if __name__ == "__main__":
    main()
