"""Remembered CA paths (trustcore.verify): a chain through an issuing CA that already
verified skips that CA's own path building, and nothing else. Every defect, expiry,
revocation and forgery is refused with the same reason whether or not the path is
remembered."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from tests.fixtures.pki import DEFECTS, Defect, Pki, _leaf_builder, make_crl, p256
from trustcore.errors import VerificationError
from trustcore.verify import ChainVerifier

SECOND = timedelta(seconds=1)


def _reason(verifier: ChainVerifier, case: Defect, pki: Pki, **kw: object) -> str:
    with pytest.raises(VerificationError) as info:
        verifier.verify(case.leaf, intermediates=case.intermediates, **kw)  # type: ignore[arg-type]
    return info.value.reason


def _warmed(pki: Pki) -> ChainVerifier:
    """A verifier that has remembered the station CA's path (the device brought it)."""
    verifier = ChainVerifier([pki.root], (), pki.crls)
    verifier.verify(pki.idevid, now=pki.now, intermediates=(pki.station_ca,))
    assert verifier.remembered_paths == 1
    return verifier


def test_a_second_device_of_the_station_takes_the_remembered_path(pki: Pki) -> None:
    verifier = _warmed(pki)
    again = verifier.verify(
        pki.idevid, now=pki.now, intermediates=(pki.station_ca,), require_device_id=True
    )
    assert again.chain == (pki.idevid, pki.station_ca, pki.root)
    assert again.issuer == pki.station_ca and again.device_id == pki.device_id
    # the parsed intermediates of a remembered path are the same objects
    der = pki.station_ca.public_bytes(serialization.Encoding.DER)
    assert verifier.load_intermediates([der]) == (pki.station_ca,)
    assert verifier.remembered_paths == 1


@pytest.mark.parametrize("make", DEFECTS, ids=lambda f: f.__name__)
def test_every_defect_gets_the_same_reason_after_the_path_is_remembered(
    pki: Pki, make: Callable[[Pki], Defect]
) -> None:
    case = make(pki)
    fresh = ChainVerifier([pki.root], (), pki.crls)
    expected = _reason(fresh, case, pki, now=pki.now)
    assert expected == case.reason
    assert _reason(_warmed(pki), case, pki, now=pki.now) == expected


def test_leaf_signed_by_another_key_under_the_remembered_ca_name_is_untrusted(pki: Pki) -> None:
    verifier = _warmed(pki)
    forged = _leaf_builder(pki, p256("forged-after-cache"), issuer_key=p256("forger-2"))
    with pytest.raises(VerificationError) as info:
        verifier.verify(forged, now=pki.now, intermediates=(pki.station_ca,))
    assert info.value.reason == "untrusted"


def test_station_ca_expired_at_now_is_refused_after_the_path_is_remembered(pki: Pki) -> None:
    verifier = _warmed(pki)
    after = pki.station_ca.not_valid_after_utc + SECOND
    with pytest.raises(VerificationError) as info:
        verifier.verify(pki.idevid, now=after, intermediates=(pki.station_ca,))
    assert info.value.reason == "expired"
    fresh = ChainVerifier([pki.root], (), pki.crls)
    with pytest.raises(VerificationError) as info:
        fresh.verify(pki.idevid, now=after, intermediates=(pki.station_ca,))
    assert info.value.reason == "expired"


def test_revocations_are_checked_for_every_request_on_a_remembered_path(pki: Pki) -> None:
    verifier = _warmed(pki)
    with pytest.raises(VerificationError) as info:
        verifier.verify(pki.revoked_idevid, now=pki.now, intermediates=(pki.station_ca,))
    assert info.value.reason == "revoked"
    # the CRLs the path was verified with go stale: the same device is refused
    next_update = pki.station_crl.next_update_utc
    assert next_update is not None
    stale_at = next_update + SECOND
    assert stale_at < pki.station_ca.not_valid_after_utc
    with pytest.raises(VerificationError) as info:
        verifier.verify(pki.idevid, now=stale_at, intermediates=(pki.station_ca,))
    assert info.value.reason == "crl_stale"


def test_a_revoked_station_ca_is_refused_by_the_next_verifier(pki: Pki) -> None:
    """New revocation data means a new verifier (service.update_trust): nothing of the old
    one's remembered paths carries over."""
    _warmed(pki)
    root_crl = make_crl(pki.now, pki.root, pki.root_key, revoked=(pki.station_ca,), number=2)
    revoking = ChainVerifier([pki.root], (), (*pki.crls, root_crl))
    with pytest.raises(VerificationError) as info:
        revoking.verify(pki.idevid, now=pki.now, intermediates=(pki.station_ca,))
    assert info.value.reason == "revoked"
    assert revoking.remembered_paths == 0


def test_failed_chains_are_never_remembered(pki: Pki) -> None:
    verifier = ChainVerifier([pki.root], (), pki.crls)
    for make in DEFECTS:
        case = make(pki)
        with pytest.raises(VerificationError):
            verifier.verify(case.leaf, now=pki.now, intermediates=case.intermediates)
    assert verifier.remembered_paths == 0


def test_validity_is_judged_at_each_instant_by_the_reused_anchored_verifier(pki: Pki) -> None:
    """The anchored library verifier built at ``pki.now`` is reused for nearby instants:
    a leaf is still refused one microsecond outside its validity and accepted at both of
    its (inclusive) bounds, although it was not yet valid when that verifier was built."""
    verifier = _warmed(pki)
    later = _leaf_builder(
        pki,
        p256("valid-from-later"),
        device_id="dev-later",
        not_before=pki.now + 20 * SECOND,
        not_after=pki.now + 40 * SECOND,
    )
    start, end = later.not_valid_before_utc, later.not_valid_after_utc
    tick = timedelta(microseconds=1)
    for moment, reason in ((start - tick, "not_yet_valid"), (end + tick, "expired")):
        with pytest.raises(VerificationError) as info:
            verifier.verify(later, now=moment, intermediates=(pki.station_ca,))
        assert info.value.reason == reason
    for moment in (start, end, start - tick + tick):
        identity = verifier.verify(later, now=moment, intermediates=(pki.station_ca,))
        assert identity.chain == (later, pki.station_ca, pki.root)
    # and the device verified first is still accepted at the earlier instant
    assert verifier.verify(pki.idevid, now=pki.now, intermediates=(pki.station_ca,)).leaf == (
        pki.idevid
    )
    assert verifier.remembered_paths == 1
