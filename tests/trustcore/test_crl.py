"""CRLs: build, parse, verify against the issuer, freshness, and the frozen view."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.pki import Pki, p256
from trustcore.crl import RevokedEntry, build_crl, load_crl, verify_crl
from trustcore.errors import CrlError
from trustcore.identity import CertSerial

DAY = timedelta(days=1)


def test_station_crl_lists_the_revoked_device(pki: Pki) -> None:
    revocations = verify_crl(pki.station_crl, pki.station_ca, now=pki.now)
    serial = pki.revoked_idevid.serial_number
    assert serial in revocations
    assert CertSerial(serial) in revocations
    assert revocations.reason_for(serial) is x509.ReasonFlags.key_compromise
    assert pki.idevid.serial_number not in revocations
    assert revocations.reason_for(pki.idevid.serial_number) is None
    assert len(revocations) == 1 and list(revocations) == [serial]
    assert revocations.issuer == pki.station_ca.subject
    assert revocations.crl_number == 1


def test_reasons_and_unspecified(pki: Pki) -> None:
    crl = build_crl(
        pki.site_ca,
        pki.site_key,
        revoked=[
            RevokedEntry(CertSerial(10), pki.now - DAY),
            RevokedEntry(CertSerial(11), pki.now - DAY, x509.ReasonFlags.superseded),
        ],
        crl_number=7,
        this_update=pki.now - DAY,
        next_update=pki.now + DAY,
    )
    entry = crl.get_revoked_certificate_by_serial_number(10)
    assert entry is not None
    with pytest.raises(x509.ExtensionNotFound):  # RFC 5280: omit "unspecified"
        entry.extensions.get_extension_for_class(x509.CRLReason)
    revocations = verify_crl(crl, pki.site_ca, now=pki.now)
    assert dict(revocations.entries) == {
        10: x509.ReasonFlags.unspecified,
        11: x509.ReasonFlags.superseded,
    }
    assert revocations.crl_number == 7


def test_revocation_set_is_immutable(pki: Pki) -> None:
    revocations = verify_crl(pki.station_crl, pki.station_ca, now=pki.now)
    with pytest.raises(TypeError):
        revocations.entries[1] = x509.ReasonFlags.unspecified  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        revocations.crl_number = 2  # type: ignore[misc]


def test_stale_and_future_crls_are_refused(pki: Pki) -> None:
    stale = pki.crl(
        pki.station_ca,
        pki.station_key,
        this_update=pki.now - 10 * DAY,
        next_update=pki.now - DAY,
    )
    with pytest.raises(CrlError) as info:
        verify_crl(stale, pki.station_ca, now=pki.now)
    assert info.value.reason == "crl_stale"
    # Without ``now`` only the signature is checked; freshness is checked later, per use.
    revocations = verify_crl(stale, pki.station_ca, now=None)
    with pytest.raises(CrlError) as info:
        revocations.check_fresh(pki.now)
    assert info.value.reason == "crl_stale"
    future = pki.crl(
        pki.station_ca, pki.station_key, this_update=pki.now + DAY, next_update=pki.now + 2 * DAY
    )
    with pytest.raises(CrlError) as info:
        verify_crl(future, pki.station_ca, now=pki.now)
    assert info.value.reason == "crl_not_yet_valid"


def test_crl_of_another_ca_is_refused(pki: Pki) -> None:
    with pytest.raises(CrlError) as info:
        verify_crl(pki.station_crl, pki.site_ca, now=pki.now)
    assert info.value.reason == "crl_wrong_issuer"


def test_forged_crl_is_refused(pki: Pki) -> None:
    """Right issuer name, no AKI, signed by a stranger: the signature check must catch it."""
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.station_ca.subject)
        .last_update(pki.now - DAY)
        .next_update(pki.now + DAY)
        .add_extension(x509.CRLNumber(99), critical=False)
        .sign(p256("crl-forger"), hashes.SHA256())
    )
    with pytest.raises(CrlError) as info:
        verify_crl(forged, pki.station_ca, now=pki.now)
    assert info.value.reason == "crl_bad_signature"


def test_build_refusals(pki: Pki) -> None:
    entitlement_cert, entitlement_key = next(iter(pki.roles.values()))
    common = {"crl_number": 1, "this_update": pki.now, "next_update": pki.now + DAY}
    with pytest.raises(CrlError, match="cRLSign"):
        build_crl(entitlement_cert, entitlement_key, revoked=[], **common)  # type: ignore[arg-type]
    with pytest.raises(CrlError, match="does not match"):
        build_crl(pki.station_ca, pki.site_key, revoked=[], **common)  # type: ignore[arg-type]
    with pytest.raises(CrlError, match="twice"):
        build_crl(
            pki.station_ca,
            pki.station_key,
            revoked=[RevokedEntry(CertSerial(5), pki.now)] * 2,
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(CrlError, match="later"):
        build_crl(
            pki.station_ca,
            pki.station_key,
            revoked=[],
            crl_number=1,
            this_update=pki.now,
            next_update=pki.now,
        )


def test_pem_and_der_load(pki: Pki) -> None:
    for encoding in (serialization.Encoding.PEM, serialization.Encoding.DER):
        data = pki.station_crl.public_bytes(encoding)
        assert verify_crl(data, pki.station_ca, now=pki.now).crl_number == 1
        assert load_crl(data) == pki.station_crl


@given(data=st.binary(max_size=512))
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(CrlError) as info:
        load_crl(data)
    assert info.value.reason == "malformed"


def test_oversized_crl_is_refused_before_parsing() -> None:
    with pytest.raises(CrlError) as info:
        load_crl(b"0" * (16 * 1024 * 1024 + 1))
    assert info.value.reason == "malformed"
