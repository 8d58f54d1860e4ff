"""The registration fast path keeps every check: the CSR parsed once is the one checked, a
CSR whose key was never looked up is refused, and after a station CA's path was remembered
the registrar still refuses that station's devices once the CA has expired at the
service's clock or new trust data revokes it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from registrar.service import RegistrationService, SiteAuthority
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki, make_crl
from tests.fixtures.registration import ADMIT_STATION, decide, make_dev, make_request
from trustcore import cbor, registration, registration_issuance, signed_envelope
from trustcore.csr import build_device_csr
from trustcore.errors import EncodingError
from trustcore.keys import key_id, spki_der
from trustcore.payload import PayloadKey
from trustcore.registration import (
    RegistrationDenied,
    RegistrationError,
    RegistrationGranted,
    parse_request,
)
from trustcore.registration import parse_response as parse_registration_response
from trustcore.verify import ChainVerifier


def test_the_csr_is_parsed_once_with_its_key_id(pki: Pki) -> None:
    dev = make_dev("dev-310001")
    request = parse_request(make_request(pki, dev))
    assert request.csr is not None
    assert request.csr_spki == spki_der(dev.ldevid_key.public_key())
    assert request.csr_key_id == key_id(dev.ldevid_key.public_key())
    assert decide(make_request(pki, dev)) == "ok"


def test_a_csr_that_only_parses_late_is_refused(pki: Pki) -> None:
    """A PEM CSR has no key id at parse time, so its key's owner was never looked up:
    refused rather than certified unchecked."""
    dev = make_dev("dev-310002")
    pem = x509.load_der_x509_csr(build_device_csr(dev.ldevid_key, dev.device_id)).public_bytes(
        serialization.Encoding.PEM
    )
    request = parse_request(make_request(pki, dev, csr=pem))
    assert request.csr is None and request.csr_key_id is None
    assert decide(make_request(pki, dev, csr=pem)) == "csr_malformed"


async def test_new_trust_data_after_a_remembered_path_refuses_the_station(
    pki: Pki, tmp_path: Path
) -> None:
    store = await Store.open(str(tmp_path / "registrar.db"))
    clock = [pki.now]
    try:
        first = ChainVerifier([pki.root], crls=pki.crls)
        service = RegistrationService(
            store=store,
            verifier=first,
            admission=ADMIT_STATION,
            site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
            payload_key=PayloadKey.generate(),
            clock=lambda: clock[0],
        )

        async def register(name: str) -> RegistrationGranted | RegistrationDenied:
            dev = make_dev(name)
            data = make_request(pki, dev, time=int(clock[0].timestamp()))
            parsed = parse_request(data)
            response = await service.handle(dev.device_id, data)
            return parse_registration_response(
                response,
                device_id=dev.device_id,
                nonce=parsed.nonce,
                request_digest=parsed.digest,
                ldevid_public_key=dev.ldevid_key.public_key(),
                roots=[pki.root],
                now=pki.now,  # the device's clock, at which the site CA is valid
            )

        assert isinstance(await register("dev-310003"), RegistrationGranted)
        # the service's clock passes the station CA's notAfter: refused, path remembered or not
        clock[0] = pki.station_ca.not_valid_after_utc + timedelta(seconds=1)
        expired = await register("dev-310006")
        assert isinstance(expired, RegistrationDenied) and expired.reason == "expired"
        clock[0] = pki.now
        assert first.remembered_paths == 1
        assert isinstance(await register("dev-310004"), RegistrationGranted)
        # HQ revokes the station CA: the registrar gets a verifier with the new root CRL
        root_crl = make_crl(pki.now, pki.root, pki.root_key, revoked=(pki.station_ca,), number=2)
        service.update_trust(verifier=ChainVerifier([pki.root], crls=(*pki.crls, root_crl)))
        refused = await register("dev-310005")
        assert isinstance(refused, RegistrationDenied) and refused.reason == "revoked"
    finally:
        await store.close()


@pytest.mark.parametrize("size", [0, 23, 24, 255, 256, 1500, 65535, 65536])
def test_assembled_envelopes_are_the_encoders_bytes(size: int) -> None:
    body, sig = bytes(range(256)) * (size // 256) + bytes(size % 256), b"\x30" * 71
    for domain in ("devtrust/registration-request/v1", "devtrust/registration-response/v1"):
        assert signed_envelope._signed_input(domain, body) == cbor.encode([domain, body])
    assert signed_envelope._envelope_bytes(body, sig) == cbor.encode({"body": body, "sig": sig})
    assert cbor.bytes_head(size) + body == cbor.encode(body)


def _envelope_by_decoding(data: bytes) -> tuple[bytes, bytes] | None:
    """What the general decoder makes of an envelope: (body, sig), or None if refused."""
    try:
        outer = cbor.decode(data, max_size=registration.MAX_REQUEST_SIZE)
    except EncodingError:
        return None
    if not isinstance(outer, dict) or set(outer) != {"body", "sig"}:
        return None
    body, sig = outer["body"], outer["sig"]
    if type(body) is not bytes or type(sig) is not bytes or not 8 <= len(sig) <= 80:
        return None
    return body, sig


def _is_map(data: bytes) -> bool:
    try:
        return isinstance(cbor.decode(data, max_size=registration.MAX_REQUEST_SIZE), dict)
    except EncodingError:
        return False


def _envelope_variants(data: bytes) -> list[bytes]:
    body, sig = _envelope_by_decoding(data) or (b"", b"")
    assert body and sig
    sig_key, body_key = cbor.encode("sig"), cbor.encode("body")
    long_head = b"\x59" + len(sig).to_bytes(2, "big")  # a valid but not the shortest head
    return [
        data,
        data + b"\x00",  # trailing byte
        data[:-1],  # truncated
        b"\xa2" + body_key + cbor.encode(body) + sig_key + cbor.encode(sig),  # key order
        b"\xa2" + sig_key + long_head + sig + body_key + cbor.encode(body),
        b"\xa2" + sig_key + b"\x58" + bytes((len(sig),)) + sig + body_key + cbor.encode(body),
        b"\xa2" + sig_key + cbor.encode(b"\x30" * 7) + body_key + cbor.encode(body),
        b"\xa2" + sig_key + cbor.encode(b"\x30" * 81) + body_key + cbor.encode(body),
        b"\xa2" + sig_key + cbor.encode(b"\x30" * 80) + body_key + cbor.encode(body),
        b"\xa2" + sig_key + cbor.encode(b"\x30" * 8) + body_key + cbor.encode(b""),
        b"\xa2" + sig_key + cbor.encode(sig) + cbor.encode("bodx") + cbor.encode(body),
        b"\xa3" + sig_key + cbor.encode(sig) + body_key + cbor.encode(body),
        b"\xa2" + sig_key + cbor.encode(sig.decode("latin-1")) + body_key + cbor.encode(body),
        b"\xa2"
        + sig_key
        + cbor.encode(sig)
        + body_key
        + b"\x5a"
        + len(body).to_bytes(4, "big")
        + body,
        b"\xa2" + sig_key + cbor.encode(sig) + body_key + cbor.encode(body)[:-1] + b"\x00\x00",
        b"",
        b"\xa2",
        b"\xa2" + sig_key,
        b"\xa2" + sig_key + b"\x58",
    ]


def test_the_envelope_is_read_as_the_decoder_reads_it(pki: Pki) -> None:
    """The fixed-shape reading of ``{"body", "sig"}`` accepts exactly what decoding and
    re-encoding accepts, with the same body and signature; anything else goes to the
    general decoder, which refuses it as before."""
    data = make_request(pki, make_dev("dev-310007"))
    for variant in _envelope_variants(data):
        split = signed_envelope._split_envelope(variant, registration.MAX_REQUEST_SIZE)
        decoded = _envelope_by_decoding(variant)
        if split is not None:
            assert split == decoded, variant.hex()
        try:
            body, sig, _ = registration.open_envelope(
                variant, registration.MAX_REQUEST_SIZE, "registration request"
            )
        except RegistrationError as exc:
            assert decoded is None or not _is_map(decoded[0]), (variant.hex(), exc)
        else:
            assert (body, sig) == decoded
    assert signed_envelope._split_envelope(data, len(data)) is not None
    assert signed_envelope._split_envelope(data, len(data) - 1) is None
    assert signed_envelope._split_envelope(bytearray(data), len(data)) is None
    assert parse_request(data).body == _envelope_by_decoding(data)[0]  # type: ignore[index]


@pytest.mark.parametrize("wrapped", [True, False])
def test_the_ok_body_holds_every_field_and_the_sealed_payload_key(wrapped: bool) -> None:
    key = SoftwareKey.generate()
    payload_key = PayloadKey(b"k" * 8, b"p" * 32)
    device = make_dev("dev-310008").device_id
    parts = {
        "device_id": device,
        "nonce": b"n" * 32,
        "request_digest": b"d" * 32,
        "ldevid_der": b"L" * 600,
        "site_ca_der": b"S" * 300,
    }
    body = registration.ok_response_body(
        **parts,  # type: ignore[arg-type]
        payload_key=payload_key,
        wrap_public_key=key.public_key() if wrapped else None,
    )
    decoded = cbor.decode(body, max_size=1 << 16)
    expected = {
        "v": 1,
        "status": "ok",
        "device_id": device.value,
        "nonce": b"n" * 32,
        "request": b"d" * 32,
        "ldevid": b"L" * 600,
        "site_ca": b"S" * 300,
    }
    if wrapped:
        expected["payload_key"] = decoded["payload_key"]
        assert set(decoded["payload_key"]) == {"key_id", "enc", "ct"}
        assert decoded["payload_key"]["key_id"] == payload_key.key_id
        opened = registration.open_payload_key(
            key, device, registration.WrappedKey(**decoded["payload_key"])
        )
        assert opened == payload_key
    assert decoded == expected
    assert body == cbor.encode(expected)
    info = registration_issuance._payload_key_info(device.value, payload_key.key_id)
    assert info == cbor.encode([registration.PAYLOAD_KEY_INFO, device.value, payload_key.key_id])
