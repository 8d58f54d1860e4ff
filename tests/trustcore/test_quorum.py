"""The pure quorum decision (trustcore.quorum): every refusal with its reason, the success
case, the strict formats and the documented test vector."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from signers.software import SoftwareKey
from trustcore import cbor
from trustcore.entitlement import QuorumRule
from trustcore.errors import TrustCoreError
from trustcore.keys import key_id
from trustcore.quorum import (
    Approval,
    ApprovalBundle,
    ApprovalRequest,
    QuorumError,
    encode_bundle,
    parse_evidence,
    sign_approval,
    verify_quorum,
    verify_quorum_rule,
)

NOW = 1_700_000_000
OP = "exceed_daily_limit"
PARAMS: dict[str, Any] = {
    "station_id": "station-a",
    "entitlement_id": "ent-1",
    "day": "2023-11-14",
    "extra": 5,
}


@pytest.fixture(scope="module")
def keys() -> list[SoftwareKey]:
    return [SoftwareKey.ephemeral() for _ in range(4)]  # three approvers and an outsider


def _request(
    keys: list[SoftwareKey], *, params: dict[str, Any] | None = None, m: int = 2
) -> ApprovalRequest:
    return ApprovalRequest(
        request_id=bytes(range(16)),
        operation=OP,
        params=params or PARAMS,
        approvers=tuple(key_id(k.public_key()) for k in keys[:3]),
        m=m,
        created=NOW - 60,
        expires=NOW + 3600,
        requested_by="ops@hq",
    )


def _verify(
    request: ApprovalRequest,
    approvals: list[Approval],
    keys: list[SoftwareKey],
    *,
    now: int = NOW,
    used: frozenset[bytes] = frozenset(),
    params: dict[str, Any] | None = None,
) -> object:
    return verify_quorum(
        request,
        approvals,
        operation=OP,
        params=params or PARAMS,
        approvers=[key_id(k.public_key()) for k in keys[:3]],
        m=2,
        now=now,
        used_request_ids=used,
    )


def _refused(reason: str, *args: object, **kwargs: object) -> QuorumError:
    with pytest.raises(QuorumError) as info:
        _verify(*args, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, TrustCoreError)
    return info.value


def test_two_of_three_valid_approvals_authorise(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    approvals = [sign_approval(request, k, now=NOW - 10) for k in keys[1:3]]
    decision = _verify(request, approvals, keys)
    assert decision.request_id == request.request_id  # type: ignore[attr-defined]
    assert set(decision.approvers) == {key_id(k.public_key()) for k in keys[1:3]}  # type: ignore[attr-defined]


def test_m_minus_one_approvals_are_insufficient(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    err = _refused("insufficient", request, [sign_approval(request, keys[0], now=NOW)], keys)
    assert "1 valid approval(s), 2 needed" in str(err)


def test_a_duplicated_approver_counts_once(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    a = sign_approval(request, keys[0], now=NOW)
    again = sign_approval(request, keys[0], now=NOW + 1)  # a second signature, same person
    err = _refused("duplicate_approver", request, [a, again], keys)
    assert "count once" in str(err)
    # With a real second approver the duplicate does no harm.
    _verify(request, [a, again, sign_approval(request, keys[1], now=NOW)], keys)


def test_an_unknown_approver_is_refused(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    outsider = sign_approval(request, keys[3], now=NOW)
    good = [sign_approval(request, k, now=NOW) for k in keys[:2]]
    err = _refused("unknown_approver", request, [*good, outsider], keys)
    assert key_id(keys[3].public_key()).hex()[:16] in str(err)
    # A request naming the outsider does not help: the enforcer's set decides.
    widened = ApprovalRequest(
        request_id=request.request_id,
        operation=OP,
        params=PARAMS,
        approvers=tuple(key_id(k.public_key()) for k in keys),
        m=2,
        created=request.created,
        expires=request.expires,
        requested_by="attacker",
    )
    _refused(
        "unknown_approver",
        widened,
        [sign_approval(widened, keys[3], now=NOW), sign_approval(widened, keys[0], now=NOW)],
        keys,
    )


def test_an_expired_approval_is_refused(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    short = sign_approval(request, keys[0], now=NOW - 100, expires=NOW - 1)
    err = _refused("expired", request, [short, sign_approval(request, keys[1], now=NOW)], keys)
    assert "expired" in str(err)
    # The request itself expires too, and with it every approval.
    both = [sign_approval(request, k, now=NOW) for k in keys[:2]]
    _refused("expired", request, both, keys, now=request.expires)


def test_an_approval_for_a_different_operation_is_refused(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    approvals = [sign_approval(request, k, now=NOW) for k in keys[:2]]
    # The enforcer is about to do something else (a bigger grant): the digest differs.
    _refused("wrong_operation", request, approvals, keys, params={**PARAMS, "extra": 500})
    # An approval lifted from another request does not count for this one.
    other = _request(keys, params={**PARAMS, "day": "2023-11-15"})
    mixed = [approvals[0], sign_approval(other, keys[1], now=NOW)]
    _refused("wrong_operation", request, mixed, keys)


def test_a_replayed_request_is_refused(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    approvals = [sign_approval(request, k, now=NOW) for k in keys[:2]]
    decision = _verify(request, approvals, keys)
    used = frozenset({decision.request_id})  # type: ignore[attr-defined]
    err = _refused("replayed", request, approvals, keys, used=used)
    assert request.request_id.hex() in str(err)


def test_a_forged_signature_is_refused(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    good = sign_approval(request, keys[0], now=NOW)
    forged = Approval(
        good.request_digest,
        good.request_id,
        good.approver,
        good.public_key_der,
        good.signed_at,
        good.expires + 0,
        keys[1].sign(good.signed_bytes()),  # signed by somebody else
    )
    _refused("bad_signature", request, [forged, sign_approval(request, keys[1], now=NOW)], keys)
    # Claiming an approver id with another public key is caught too.
    swapped = Approval(
        good.request_digest,
        good.request_id,
        key_id(keys[1].public_key()),
        good.public_key_der,
        good.signed_at,
        good.expires,
        good.signature,
    )
    _refused("bad_signature", request, [swapped, good], keys)


def test_future_approvals_are_refused(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    early = [sign_approval(request, k, now=NOW + 3000) for k in keys[:2]]
    _refused("not_yet_valid", request, early, keys)


def test_fail_closed_on_an_empty_or_unreachable_rule(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    approvals = [sign_approval(request, k, now=NOW) for k in keys[:3]]
    for approvers, m in (
        ([], 1),
        ([key_id(k.public_key()) for k in keys[:3]], 0),
        ([b"x" * 32], 2),
    ):
        with pytest.raises(QuorumError) as info:
            verify_quorum(
                request,
                approvals,
                operation=OP,
                params=PARAMS,
                approvers=approvers,
                m=m,
                now=NOW,
                used_request_ids=(),
            )
        assert info.value.reason == "no_quorum"
    with pytest.raises(QuorumError) as info:
        verify_quorum_rule(
            ApprovalBundle(request, tuple(approvals)),
            None,
            params=PARAMS,
            now=NOW,
            used_request_ids=(),
        )
    assert info.value.reason == "no_quorum"


def test_the_request_m_can_only_raise_the_bar(keys: list[SoftwareKey]) -> None:
    request = _request(keys, m=3)
    two = [sign_approval(request, k, now=NOW) for k in keys[:2]]
    _refused("insufficient", request, two, keys)  # enforcer says 2, request says 3


def test_rule_and_bundle_round_trip(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    approvals = [sign_approval(request, k, now=NOW) for k in keys[:2]]
    bundle = parse_evidence([encode_bundle(request, approvals)])
    assert bundle.request == request
    # The same thing as loose files, in any order.
    loose = parse_evidence([approvals[1].encode(), request.encode(), approvals[0].encode()])
    assert loose.request == request and set(loose.approvals) == set(approvals)
    rule = QuorumRule(OP, 2, tuple(key_id(k.public_key()) for k in keys[:3]))
    decision = verify_quorum_rule(bundle, rule, params=PARAMS, now=NOW, used_request_ids=())
    assert decision.m == 2


def test_malformed_evidence_is_refused(keys: list[SoftwareKey]) -> None:
    request = _request(keys)
    other = _request(keys, params={**PARAMS, "extra": 1})
    cases = [
        [b"\xff"],
        [],
        [request.encode(), other.encode()],  # two requests: which operation?
        [request.encode()[:-1]],
        [cbor.encode({**request.to_map(), "extra_field": 1})],
        [cbor.encode({**request.to_map(), "params_digest": b"\x00" * 32})],
        [cbor.encode({**request.to_map(), "approvers": list(reversed(request.approvers))})],
    ]
    for blobs in cases:
        with pytest.raises(QuorumError) as info:
            parse_evidence(blobs)
        assert info.value.reason == "malformed"


def test_value_objects_refuse_nonsense(keys: list[SoftwareKey]) -> None:
    from trustcore.errors import InvalidValueError

    base = _request(keys)
    bad: list[dict[str, Any]] = [
        {"request_id": b"short"},
        {"operation": "Drop Table"},
        {"params": {}},
        {"params": {"nested": [1]}},
        {"m": 0},
        {"m": 4},
        {"expires": base.created},
        {"expires": base.created + 31 * 86400},
        {"approvers": (b"a" * 32, b"a" * 32)},
        {"requested_by": ""},
    ]
    for change in bad:
        fields: dict[str, Any] = {**base.__dict__, **change}
        with pytest.raises(InvalidValueError):
            ApprovalRequest(**fields)


# ------------------------------------------------------------------------------ test vector


class _DeterministicKey:
    """A fixed key with RFC 6979 signatures, so the documented vector is reproducible."""

    def __init__(self) -> None:
        self._key = ec.derive_private_key(0x1F2E3D4C5B6A79880102030405060708, ec.SECP256R1())

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def vector() -> tuple[bytes, bytes, bytes]:
    key = _DeterministicKey()
    request = ApprovalRequest(
        request_id=bytes.fromhex("00112233445566778899aabbccddeeff"),
        operation="exceed_daily_limit",
        params={
            "station_id": "station-a",
            "entitlement_id": "ent-1",
            "day": "2023-11-14",
            "extra": 5,
        },
        approvers=(key_id(key.public_key()),),
        m=1,
        created=1700000000,
        expires=1700086400,
        requested_by="ops@hq",
    )
    approval = sign_approval(request, key, now=1700000100)
    return request.encode(), request.digest, approval.encode()


def _doc_vector(name: str) -> bytes:
    text = (Path(__file__).parents[2] / "docs" / "formats.md").read_text()
    match = re.search(rf"<!-- vector: {name} -->\s*```hex\n(.*?)```", text, re.S)
    assert match, f"vector {name} missing from docs/formats.md"
    return bytes.fromhex("".join(match.group(1).split()))


def test_documented_vector_matches_the_code() -> None:
    request_bytes, digest, approval_bytes = vector()
    assert _doc_vector("quorum-request") == request_bytes
    assert _doc_vector("quorum-request-digest") == digest
    assert _doc_vector("quorum-approval") == approval_bytes
    request = ApprovalRequest.decode(request_bytes)
    approval = Approval.decode(approval_bytes)
    decision = verify_quorum(
        request,
        [approval],
        operation="exceed_daily_limit",
        params=request.params,
        approvers=request.approvers,
        m=1,
        now=1700000200,
        used_request_ids=(),
    )
    assert decision.approvers == request.approvers
