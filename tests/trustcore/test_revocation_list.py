"""The HQ revocation list: format vector, strict decoding, signer checks, rollback."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signers.software import SoftwareKey
from tests.fixtures.docs import doc_vector
from tests.fixtures.pki import Pki, p256
from trustcore import cbor
from trustcore.errors import EncodingError, InvalidValueError
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.profiles import HqRole, issue_role_certificate, issue_root_ca
from trustcore.revocation import (
    RevocationList,
    RevocationListError,
    RevokedDevice,
    open_revocation_list,
    seal_revocation_list,
)
from trustcore.sealed import seal_package

DAY = timedelta(days=1)


def vector_list() -> RevocationList:
    return RevocationList(
        sequence=3,
        issued=1_700_000_000,
        entries=(
            RevokedDevice(
                StationId("station-a"),
                CertSerial(0x1A2B),
                DeviceId("TH-000001"),
                "counterfeit",
                1_699_990_000,
            ),
        ),
    )


def _sealed(pki: Pki, rl: RevocationList, role: HqRole = HqRole.REVOCATION_SIGNER) -> bytes:
    cert, key = pki.roles[role]
    return seal_revocation_list(rl, signer=SoftwareKey(key), signer_cert=cert)


def _open(pki: Pki, package: bytes, **kw: object) -> RevocationList:
    args: dict[str, object] = {"root_crl": pki.root_crl, "not_older_than": None}
    args.update(kw)
    return open_revocation_list(package, root=pki.root, now=pki.now, **args)  # type: ignore[arg-type]


def test_payload_vector() -> None:
    assert vector_list().encode() == doc_vector("revocation-list-payload")
    assert RevocationList.decode(doc_vector("revocation-list-payload")) == vector_list()


def test_sealed_round_trip_and_lookup(pki: Pki) -> None:
    opened = _open(pki, _sealed(pki, vector_list()))
    assert opened == vector_list()
    entry = opened.entries[0]
    assert opened.lookup(device_id=DeviceId("TH-000001")) == entry
    assert opened.lookup(station_id=StationId("station-a"), serial=0x1A2B) == entry
    assert opened.lookup(station_id=StationId("station-b"), serial=0x1A2B) is None
    assert opened.lookup(device_id=DeviceId("TH-000002")) is None
    assert opened.device_ids == frozenset({DeviceId("TH-000001")})


def test_wrong_role_is_untrusted(pki: Pki) -> None:
    package = _sealed(pki, vector_list(), HqRole.ENTITLEMENT_SIGNER)
    with pytest.raises(RevocationListError) as e:
        _open(pki, package)
    assert e.value.reason == "untrusted_sender"


def test_foreign_root_is_untrusted(pki: Pki) -> None:
    rogue_key = p256("rogue-root")
    rogue = issue_root_ca(
        rogue_key,
        common_name="Rogue",
        organization="Rogue",
        not_before=pki.now - DAY,
        not_after=pki.now + 365 * DAY,
    )
    signer = p256("rogue-revoker")
    cert = issue_role_certificate(
        rogue,
        rogue_key,
        signer.public_key(),
        role=HqRole.REVOCATION_SIGNER,
        common_name="Rogue revoker",
        organization="Rogue",
        not_before=pki.now - DAY,
        not_after=pki.now + 30 * DAY,
    )
    package = seal_revocation_list(
        RevocationList(9, 1), signer=SoftwareKey(signer), signer_cert=cert
    )
    with pytest.raises(RevocationListError) as e:
        _open(pki, package)
    assert e.value.reason == "untrusted_sender"


def test_revoked_signer_is_refused(pki: Pki) -> None:
    signer_cert = pki.roles[HqRole.REVOCATION_SIGNER][0]
    crl = pki.crl(pki.root, pki.root_key, revoked=(signer_cert,), number=2)
    with pytest.raises(RevocationListError) as e:
        _open(pki, _sealed(pki, vector_list()), root_crl=crl)
    assert e.value.reason == "revoked_sender"


def test_rollback_is_refused_same_sequence_accepted(pki: Pki) -> None:
    package = _sealed(pki, vector_list())
    assert _open(pki, package, not_older_than=3).sequence == 3
    with pytest.raises(RevocationListError) as e:
        _open(pki, package, not_older_than=4)
    assert e.value.reason == "rollback"


def test_tampered_package_is_refused(pki: Pki) -> None:
    package = bytearray(_sealed(pki, vector_list()))
    index = bytes(package).index(b"counterfeit")
    package[index] ^= 0x01
    with pytest.raises(RevocationListError) as e:
        _open(pki, bytes(package))
    assert e.value.reason == "bad_signature"


def test_encrypted_package_is_not_a_revocation_list(pki: Pki) -> None:
    cert, key = pki.roles[HqRole.REVOCATION_SIGNER]
    package = seal_package(
        content_type="devtrust/revocation-list/v1",
        payload=vector_list().encode(),
        sender=SoftwareKey(key),
        sender_cert=cert,
        receiver_public=p256("someone").public_key(),
        sequence=3,
        created=1,
    )
    with pytest.raises(RevocationListError) as e:
        _open(pki, package)
    assert e.value.reason == "not_signed_only"


def test_payload_sequence_must_match_package(pki: Pki) -> None:
    cert, key = pki.roles[HqRole.REVOCATION_SIGNER]
    package = seal_package(
        content_type="devtrust/revocation-list/v1",
        payload=vector_list().encode(),
        sender=SoftwareKey(key),
        sender_cert=cert,
        receiver_public=None,
        sequence=7,
        created=1,
    )
    with pytest.raises(RevocationListError) as e:
        _open(pki, package)
    assert e.value.reason == "sequence_mismatch"


def test_other_content_type_is_refused(pki: Pki) -> None:
    cert, key = pki.roles[HqRole.REVOCATION_SIGNER]
    package = seal_package(
        content_type="devtrust/site-report/v1",
        payload=vector_list().encode(),
        sender=SoftwareKey(key),
        sender_cert=cert,
        receiver_public=None,
        sequence=3,
        created=1,
    )
    with pytest.raises(RevocationListError) as e:
        _open(pki, package)
    assert e.value.reason == "wrong_content_type"


def _mutated(**changes: object) -> bytes:
    m = cbor.decode(vector_list().encode(), max_size=1 << 20)
    entry = m["entries"][0]
    for k, v in changes.items():
        if k in entry:
            entry[k] = v
        else:
            m[k] = v
    return cbor.encode(m)


@pytest.mark.parametrize(
    "changes",
    [
        {"extra": 1},
        {"reason": "because"},
        {"serial": "01a2b"},  # non-canonical hex
        {"serial": "1A2B"},
        {"device_id": "dev/+"},
        {"time": -1},
        {"v": 2},
    ],
)
def test_strict_decoding(changes: dict[str, object]) -> None:
    with pytest.raises(EncodingError):
        RevocationList.decode(_mutated(**changes))


def test_duplicate_entries_are_refused() -> None:
    entry = vector_list().entries[0]
    with pytest.raises(InvalidValueError):
        RevocationList(1, 1, (entry, entry))
    m = cbor.decode(vector_list().encode(), max_size=1 << 20)
    m["entries"] = m["entries"] * 2
    with pytest.raises(EncodingError):
        RevocationList.decode(cbor.encode(m))


def test_with_entries_advances_the_sequence() -> None:
    nxt = RevocationList(1, 5).with_entries(vector_list().entries, issued=6)
    assert (nxt.sequence, nxt.issued, nxt.entries) == (2, 6, vector_list().entries)


@given(st.binary(max_size=200))
def test_random_bytes_never_decode_silently(data: bytes) -> None:
    try:
        decoded = RevocationList.decode(data)
    except EncodingError:
        return
    assert decoded.encode() == data  # only a genuine canonical list can decode
