"""The station CA renewal / re-key request (``trustcore.station_ca_request``): pure checks,
software keys, no TPM."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from signers.software import SoftwareKey
from trustcore import cbor
from trustcore.csr import build_csr
from trustcore.identity import StationId
from trustcore.profiles import issue_root_ca, issue_station_ca
from trustcore.station_ca_request import (
    KIND_REKEY,
    KIND_RENEW,
    StationCaRequest,
    StationCaRequestError,
)

STATION = StationId("station-01")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _subject(name: str = "station-01") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, name),
        ]
    )


@pytest.fixture(scope="module")
def current() -> tuple[SoftwareKey, bytes]:
    root_key = SoftwareKey.ephemeral()
    root = issue_root_ca(
        root_key.private_key(),
        common_name="Root",
        organization="Acme",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=3650),
    )
    key = SoftwareKey.ephemeral()
    cert = issue_station_ca(
        root,
        root_key.private_key(),
        key.public_key(),
        station_id=STATION,
        organization="Acme",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=3000),
        max_not_after=NOW + timedelta(days=3000),
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


def _request(current: tuple[SoftwareKey, bytes], new: SoftwareKey | None) -> StationCaRequest:
    key, cert = current
    return StationCaRequest.create(
        station_id=STATION,
        csr_der=build_csr(new or key, _subject()),
        current_cert_der=cert,
        current_key=key,
        new_key=new,
        created=int(NOW.timestamp()),
    )


def test_renewal_round_trips_and_verifies(current: tuple[SoftwareKey, bytes]) -> None:
    request = _request(current, None)
    decoded = StationCaRequest.decode(request.encode())
    assert decoded == request and decoded.kind == KIND_RENEW and decoded.sig_new is None
    verified = decoded.verify()
    assert not verified.rekey
    assert verified.new_public.public_numbers() == current[0].public_key().public_numbers()


def test_rekey_is_signed_by_both_keys(current: tuple[SoftwareKey, bytes]) -> None:
    new = SoftwareKey.ephemeral()
    request = _request(current, new)
    verified = StationCaRequest.decode(request.encode()).verify()
    assert verified.rekey and request.kind == KIND_REKEY
    assert verified.new_public.public_numbers() == new.public_key().public_numbers()
    # Without the current key's signature (signed by a stranger instead): refused.
    stranger = SoftwareKey.ephemeral()
    forged = StationCaRequest(
        request.station_id, request.kind, request.request_id, request.created,
        request.csr_der, request.current_cert_der, stranger.sign(request.body()), request.sig_new,
    )  # fmt: skip
    with pytest.raises(StationCaRequestError) as err:
        forged.verify()
    assert err.value.reason == "bad_signature" and "current CA key" in str(err.value)
    # Without the new key's signature: refused (a thief's CSR cannot ride on it).
    forged = StationCaRequest(
        request.station_id, request.kind, request.request_id, request.created,
        request.csr_der, request.current_cert_der, request.sig_current,
        stranger.sign(request.body()),
    )  # fmt: skip
    with pytest.raises(StationCaRequestError) as err:
        forged.verify()
    assert err.value.reason == "bad_signature" and "new CA key" in str(err.value)


def test_kind_must_match_the_key(current: tuple[SoftwareKey, bytes]) -> None:
    key, cert = current
    other = SoftwareKey.ephemeral()
    # a "renewal" whose CSR names another key
    body = StationCaRequest.create(
        station_id=STATION, csr_der=build_csr(other, _subject()), current_cert_der=cert,
        current_key=key, new_key=None, created=0,
    )  # fmt: skip
    with pytest.raises(StationCaRequestError) as err:
        body.verify()
    assert err.value.reason == "key_mismatch"
    # a "re-key" to the same key
    same = StationCaRequest.create(
        station_id=STATION, csr_der=build_csr(key, _subject()), current_cert_der=cert,
        current_key=key, new_key=key, created=0,
    )  # fmt: skip
    with pytest.raises(StationCaRequestError) as err:
        same.verify()
    assert err.value.reason == "key_mismatch"


def test_csr_must_name_the_station(current: tuple[SoftwareKey, bytes]) -> None:
    key, cert = current
    request = StationCaRequest.create(
        station_id=STATION, csr_der=build_csr(key, _subject("station-02")), current_cert_der=cert,
        current_key=key, new_key=None, created=0,
    )  # fmt: skip
    with pytest.raises(StationCaRequestError) as err:
        request.verify()
    assert err.value.reason == "wrong_name"


@pytest.mark.parametrize("position", [0, 7, 40, 200, -80, -5])
def test_flipped_bytes_are_refused(current: tuple[SoftwareKey, bytes], position: int) -> None:
    data = bytearray(_request(current, SoftwareKey.ephemeral()).encode())
    data[position] ^= 0x41
    with pytest.raises(StationCaRequestError) as err:
        StationCaRequest.decode(bytes(data)).verify()
    assert err.value.reason in {"malformed", "bad_signature", "wrong_name"}


def test_garbage_and_unknown_fields_are_malformed(current: tuple[SoftwareKey, bytes]) -> None:
    for junk in (b"", b"\xff" * 10, cbor.encode([1, 2]), b"x" * 70_000):
        with pytest.raises(StationCaRequestError) as err:
            StationCaRequest.decode(junk)
        assert err.value.reason == "malformed"
    m = cbor.decode(_request(current, None).encode(), max_size=1 << 16)
    m["extra"] = 1
    with pytest.raises(StationCaRequestError, match="unknown field"):
        StationCaRequest.decode(cbor.encode(m))
    m = cbor.decode(_request(current, None).encode(), max_size=1 << 16)
    m["sig_new"] = b"sig"  # a renewal that claims a second signature
    with pytest.raises(StationCaRequestError) as err:
        StationCaRequest.decode(cbor.encode(m))
    assert err.value.reason == "malformed"
