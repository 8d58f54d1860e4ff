"""M-of-N approvals that travel with the artifact and are verified offline.

A sensitive operation (an HQ entitlement above a threshold, a station CA revocation, a
payload-key export, a new approver; at a station, exceeding the daily limit or re-issuing a
device certificate) runs only with ``m`` valid, distinct, unexpired approvals from a named
set of approver keys. The pieces, all deterministic CBOR (``docs/formats.md``):

* :class:`ApprovalRequest` names exactly what will happen: the operation, its parameters
  (in full, so an approver reviews what they sign) and their digest, the approver key ids,
  ``m``, a creation time and an expiry, a random request id and who asked. Its *digest* is
  SHA-256 of its canonical encoding: one request, one digest.
* :class:`Approval` is one approver's ECDSA P-256 signature over
  ``["devtrust/quorum-approval/v1", request_digest, request_id, approver, signed_at,
  expires]``, carrying the approver's public key so anyone can check it offline.
* :func:`verify_quorum` is the one decision every enforcer (HQ, a factory station, a site)
  runs. It raises :class:`QuorumError` with a stable ``reason``; it never returns "no".

Why the enforcer passes the approver set and ``m`` itself instead of trusting the request's:
the request is written by whoever wants the operation; the set that may approve is the
enforcer's policy (the HQ database, the entitlement's :class:`QuorumRule`). The request's own
``m`` can only raise the bar, never lower it.

Why the enforcer passes the operation and its parameters: an approval is bound to one
request digest, and the request to one parameter digest; an approval for anything else is
``wrong_operation``. Replay across time is stopped by the request id, which the enforcer
records durably when it consumes a quorum (``used_request_ids``).

This module is pure: no clock (``now`` is passed in), no files, no database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.entitlement import QuorumRule
from trustcore.errors import EncodingError, InvalidValueError, TrustCoreError
from trustcore.keys import Signer, key_id, spki_der

__all__ = [
    "APPROVAL_DOMAIN",
    "MAX_APPROVAL_SIZE",
    "MAX_EVIDENCE_SIZE",
    "MAX_REQUEST_LIFETIME_S",
    "MAX_REQUEST_SIZE",
    "PARAMS_DOMAIN",
    "QUORUM_REASONS",
    "Approval",
    "ApprovalBundle",
    "ApprovalRequest",
    "QuorumDecision",
    "QuorumError",
    "approval_signing_input",
    "check_approval",
    "encode_bundle",
    "params_digest",
    "parse_evidence",
    "sign_approval",
    "verify_quorum",
    "verify_quorum_rule",
]

PARAMS_DOMAIN: Final = "devtrust/quorum-params/v1"
APPROVAL_DOMAIN: Final = "devtrust/quorum-approval/v1"
TYPE_REQUEST: Final = "quorum-request"
TYPE_APPROVAL: Final = "quorum-approval"
TYPE_BUNDLE: Final = "quorum-bundle"
VERSION: Final = 1

MAX_REQUEST_SIZE: Final = 64 * 1024
MAX_APPROVAL_SIZE: Final = 4 * 1024
MAX_APPROVERS: Final = 64
MAX_EVIDENCE_SIZE: Final = MAX_REQUEST_SIZE + MAX_APPROVERS * MAX_APPROVAL_SIZE + 1024
#: A request lives at most this long: an approval is a decision about the present, and a
#: stale one should be asked again rather than found in a drawer months later.
MAX_REQUEST_LIFETIME_S: Final = 30 * 86400
DEFAULT_CLOCK_SKEW_S: Final = 300
_REQUEST_ID_LEN: Final = 16

#: Stable reasons of :class:`QuorumError`.
QUORUM_REASONS: Final = frozenset(
    {
        "no_quorum",  # the enforcer's rule is empty or unreachable (fail closed)
        "insufficient",  # fewer than m valid approvals
        "duplicate_approver",  # fewer than m once duplicated approvers count once
        "unknown_approver",  # an approval by a key outside the approver set
        "expired",  # the request or an approval has expired
        "not_yet_valid",  # created or signed in the future (beyond the clock skew)
        "wrong_operation",  # for a different operation, parameters or request
        "replayed",  # the request id was already consumed
        "bad_signature",  # an approval's signature or key does not verify
        "malformed",  # undecodable or inconsistent evidence
        "foreign_request",  # HQ gates: a request this HQ did not write (hq.approvals)
    }
)


class QuorumError(TrustCoreError):
    """A quorum was refused; ``reason`` is one of :data:`QUORUM_REASONS`."""

    reason = "insufficient"


ParamValue = str | int | bytes | bool


def _check_params(params: Mapping[str, Any]) -> dict[str, ParamValue]:
    """Parameters are a flat map of text keys to scalars: flat so that a reviewer's table
    shows everything, scalars so that the digest covers exactly what is shown."""
    if not isinstance(params, Mapping) or not params:
        raise InvalidValueError("operation parameters must be a non-empty map")
    out: dict[str, ParamValue] = {}
    for k, v in params.items():
        if not isinstance(k, str) or not k or len(k) > 64 or not k.isprintable():
            raise InvalidValueError(f"bad parameter name {k!r}")
        if not isinstance(v, str | int | bytes | bool):
            raise InvalidValueError(f"parameter {k!r} must be text, integer, bytes or bool")
        if isinstance(v, str | bytes) and len(v) > 4096:
            raise InvalidValueError(f"parameter {k!r} is too long")
        out[k] = v
    return out


def params_digest(operation: str, params: Mapping[str, Any]) -> bytes:
    """SHA-256 of CBOR ``[PARAMS_DOMAIN, operation, params]``: what an operation is."""
    return hashlib.sha256(cbor.encode([PARAMS_DOMAIN, operation, _check_params(params)])).digest()


@dataclass(frozen=True)
class ApprovalRequest:
    """What approvers are asked to authorise. Self-validating; see the module docstring."""

    request_id: bytes
    operation: str
    params: Mapping[str, ParamValue]
    approvers: tuple[bytes, ...]
    m: int
    created: int
    expires: int
    requested_by: str

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, bytes) or len(self.request_id) != _REQUEST_ID_LEN:
            raise InvalidValueError(f"request id must be {_REQUEST_ID_LEN} bytes")
        op = self.operation
        if not isinstance(op, str) or not op or len(op) > 64 or not op.isascii():
            raise InvalidValueError(f"bad operation name {op!r}")
        if not (op[0].isalpha() and op.replace("_", "").isalnum() and op.islower()):
            raise InvalidValueError(f"bad operation name {op!r}")
        object.__setattr__(self, "params", _check_params(self.params))
        if not self.approvers or len(self.approvers) > MAX_APPROVERS:
            raise InvalidValueError(f"a request names 1..{MAX_APPROVERS} approvers")
        if any(not isinstance(a, bytes) or len(a) != 32 for a in self.approvers):
            raise InvalidValueError("approver key ids are 32 bytes")
        if len(set(self.approvers)) != len(self.approvers):
            raise InvalidValueError("an approver is named twice")
        # Sorted: one set, one encoding, one digest.
        object.__setattr__(self, "approvers", tuple(sorted(self.approvers)))
        if isinstance(self.m, bool) or not 1 <= self.m <= len(self.approvers):
            raise InvalidValueError("m must be 1..number of approvers")
        if not 0 <= self.created < self.expires:
            raise InvalidValueError("a request must expire after it is created")
        if self.expires - self.created > MAX_REQUEST_LIFETIME_S:
            raise InvalidValueError(
                f"a request may live at most {MAX_REQUEST_LIFETIME_S // 86400} days"
            )
        rb = self.requested_by
        if not isinstance(rb, str) or not rb or len(rb) > 128 or not rb.isprintable():
            raise InvalidValueError("requested_by must be 1..128 printable characters")

    @property
    def params_digest(self) -> bytes:
        return params_digest(self.operation, self.params)

    def to_map(self) -> dict[str, Any]:
        return {
            "type": TYPE_REQUEST,
            "v": VERSION,
            "request_id": self.request_id,
            "operation": self.operation,
            "params": dict(self.params),
            "params_digest": self.params_digest,
            "approvers": list(self.approvers),
            "m": self.m,
            "created": self.created,
            "expires": self.expires,
            "requested_by": self.requested_by,
        }

    def encode(self) -> bytes:
        return cbor.encode(self.to_map())

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding: what each approval signs."""
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def from_map(cls, m: Any) -> ApprovalRequest:
        m = cbor.map_of(m, "approval request")
        cbor.expect_keys(m, set(cls._KEYS), what="approval request")
        if m["type"] != TYPE_REQUEST or m["v"] != VERSION:
            raise EncodingError("not a version-1 approval request")
        params = cbor.field(m, "params", dict)
        approvers = cbor.field(m, "approvers", list)
        try:
            request = cls(
                request_id=cbor.field(m, "request_id", bytes),
                operation=cbor.field(m, "operation", str),
                params=params,
                approvers=tuple(approvers),
                m=cbor.field(m, "m", int),
                created=cbor.field(m, "created", int),
                expires=cbor.field(m, "expires", int),
                requested_by=cbor.field(m, "requested_by", str),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"invalid approval request: {exc.args[0]}") from exc
        if list(request.approvers) != approvers:
            raise EncodingError("approval request: approvers are not in sorted order")
        if cbor.field(m, "params_digest", bytes, size=32) != request.params_digest:
            raise EncodingError("approval request: params_digest does not match the params")
        return request

    @classmethod
    def decode(cls, data: bytes) -> ApprovalRequest:
        return cls.from_map(cbor.decode(data, max_size=MAX_REQUEST_SIZE))

    _KEYS = (
        "type", "v", "request_id", "operation", "params", "params_digest", "approvers",
        "m", "created", "expires", "requested_by",
    )  # fmt: skip


@dataclass(frozen=True)
class Approval:
    """One approver's signed consent to one request (by digest)."""

    request_digest: bytes
    request_id: bytes
    approver: bytes
    public_key_der: bytes
    signed_at: int
    expires: int
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.request_digest) != 32 or len(self.approver) != 32:
            raise InvalidValueError("request digest and approver key id are 32 bytes")
        if len(self.request_id) != _REQUEST_ID_LEN:
            raise InvalidValueError(f"request id must be {_REQUEST_ID_LEN} bytes")
        if not 0 <= self.signed_at < self.expires:
            raise InvalidValueError("an approval must expire after it is signed")
        if not 0 < len(self.public_key_der) <= 256 or not 0 < len(self.signature) <= 80:
            raise InvalidValueError("bad public key or signature length")

    def signed_bytes(self) -> bytes:
        return approval_signing_input(
            self.request_digest, self.request_id, self.approver, self.signed_at, self.expires
        )

    def to_map(self) -> dict[str, Any]:
        return {
            "type": TYPE_APPROVAL,
            "v": VERSION,
            "request_digest": self.request_digest,
            "request_id": self.request_id,
            "approver": self.approver,
            "public_key": self.public_key_der,
            "signed_at": self.signed_at,
            "expires": self.expires,
            "signature": self.signature,
        }

    def encode(self) -> bytes:
        return cbor.encode(self.to_map())

    @classmethod
    def from_map(cls, m: Any) -> Approval:
        m = cbor.map_of(m, "approval")
        cbor.expect_keys(m, set(cls._KEYS), what="approval")
        if m["type"] != TYPE_APPROVAL or m["v"] != VERSION:
            raise EncodingError("not a version-1 approval")
        try:
            return cls(
                request_digest=cbor.field(m, "request_digest", bytes, size=32),
                request_id=cbor.field(m, "request_id", bytes, size=_REQUEST_ID_LEN),
                approver=cbor.field(m, "approver", bytes, size=32),
                public_key_der=cbor.field(m, "public_key", bytes),
                signed_at=cbor.field(m, "signed_at", int),
                expires=cbor.field(m, "expires", int),
                signature=cbor.field(m, "signature", bytes),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"invalid approval: {exc.args[0]}") from exc

    @classmethod
    def decode(cls, data: bytes) -> Approval:
        return cls.from_map(cbor.decode(data, max_size=MAX_APPROVAL_SIZE))

    _KEYS = (
        "type", "v", "request_digest", "request_id", "approver", "public_key", "signed_at",
        "expires", "signature",
    )  # fmt: skip

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The approver's P-256 key; ``bad_signature`` if it is not one or not ``approver``."""
        try:
            public = serialization.load_der_public_key(self.public_key_der)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise QuorumError("approval public key does not parse", reason="bad_signature") from exc
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
            public.curve, ec.SECP256R1
        ):
            raise QuorumError("approval key is not a P-256 key", reason="bad_signature")
        if key_id(public) != self.approver:
            raise QuorumError(
                "approval public key does not match its approver key id", reason="bad_signature"
            )
        return public

    def verify_signature(self) -> None:
        try:
            self.public_key().verify(self.signature, self.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise QuorumError(
                f"approval by {self.approver.hex()[:16]} has a bad signature",
                reason="bad_signature",
            ) from exc


def approval_signing_input(
    request_digest: bytes, request_id: bytes, approver: bytes, signed_at: int, expires: int
) -> bytes:
    """The exact bytes an approver signs (domain-separated CBOR array)."""
    return cbor.encode([APPROVAL_DOMAIN, request_digest, request_id, approver, signed_at, expires])


def sign_approval(
    request: ApprovalRequest, signer: Signer, *, now: int, expires: int | None = None
) -> Approval:
    """Approve ``request`` with ``signer`` (an approver's keystore or token key). The
    approval expires with the request unless the approver chooses earlier."""
    until = request.expires if expires is None else min(expires, request.expires)
    public = signer.public_key()
    approver = key_id(public)
    payload = approval_signing_input(request.digest, request.request_id, approver, now, until)
    return Approval(
        request_digest=request.digest,
        request_id=request.request_id,
        approver=approver,
        public_key_der=spki_der(public),
        signed_at=now,
        expires=until,
        signature=signer.sign(payload),
    )


@dataclass(frozen=True)
class ApprovalBundle:
    """A request with the approvals collected for it: the file that travels."""

    request: ApprovalRequest
    approvals: tuple[Approval, ...]


def encode_bundle(request: ApprovalRequest, approvals: Iterable[Approval]) -> bytes:
    return cbor.encode(
        {
            "type": TYPE_BUNDLE,
            "v": VERSION,
            "request": request.to_map(),
            "approvals": [a.to_map() for a in approvals],
        }
    )


def parse_evidence(blobs: Sequence[bytes]) -> ApprovalBundle:
    """Combine files (requests, approvals, bundles, in any mix) into one bundle.

    Exactly one request may be named across the files (a second, different request is
    ``malformed``: one operation, one quorum). Approvals for other requests are kept: they
    are refused by :func:`verify_quorum` as ``wrong_operation``, with that reason shown.
    """
    requests: dict[bytes, ApprovalRequest] = {}
    approvals: list[Approval] = []
    for blob in blobs:
        try:
            m = cbor.map_of(cbor.decode(blob, max_size=MAX_EVIDENCE_SIZE), "quorum evidence")
            kind = m.get("type")
            if kind == TYPE_REQUEST:
                r = ApprovalRequest.from_map(m)
                requests[r.digest] = r
            elif kind == TYPE_APPROVAL:
                approvals.append(Approval.from_map(m))
            elif kind == TYPE_BUNDLE:
                cbor.expect_keys(m, {"type", "v", "request", "approvals"}, what="approval bundle")
                if m["v"] != VERSION:
                    raise EncodingError("not a version-1 approval bundle")
                r = ApprovalRequest.from_map(m["request"])
                requests[r.digest] = r
                items = cbor.field(m, "approvals", list)
                if len(items) > MAX_APPROVERS:
                    raise EncodingError("too many approvals in one bundle")
                approvals.extend(Approval.from_map(a) for a in items)
            else:
                raise EncodingError(f"unknown quorum evidence type {kind!r}")
        except EncodingError as exc:
            raise QuorumError(
                f"quorum evidence refused: {exc.message}", reason="malformed"
            ) from exc
    if len(requests) != 1:
        raise QuorumError(
            f"quorum evidence must name exactly one request, found {len(requests)}",
            reason="malformed",
        )
    if len(approvals) > MAX_APPROVERS:
        raise QuorumError("too many approvals", reason="malformed")
    return ApprovalBundle(next(iter(requests.values())), tuple(approvals))


@dataclass(frozen=True)
class QuorumDecision:
    """A quorum that held: record ``request_id`` as consumed, audit ``approvers``."""

    request_id: bytes
    operation: str
    params: Mapping[str, ParamValue]
    approvers: tuple[bytes, ...]
    m: int
    expires: int


def verify_quorum(
    request: ApprovalRequest,
    approvals: Sequence[Approval],
    *,
    operation: str,
    params: Mapping[str, Any],
    approvers: Collection[bytes],
    m: int,
    now: int,
    used_request_ids: Collection[bytes],
    clock_skew_s: int = DEFAULT_CLOCK_SKEW_S,
) -> QuorumDecision:
    """Decide whether ``approvals`` authorise ``operation`` with ``params`` under the
    enforcer's rule (``m`` of ``approvers``); raise :class:`QuorumError` otherwise.

    Fail closed: an empty set or ``m`` outside ``1..len(approvers)`` refuses everything.
    Every approval presented must be sound: one for another request (``wrong_operation``),
    by a key outside the set (``unknown_approver``), with a bad signature, expired or from
    the future refuses the whole quorum, so an operator never runs an operation on
    evidence that contains a forgery. A duplicated approver counts once (one person, one
    vote); if that leaves fewer than ``m`` the reason is ``duplicate_approver``.
    """
    allowed = frozenset(approvers)
    if isinstance(m, bool) or m < 1 or not allowed or m > len(allowed):
        raise QuorumError(
            f"no usable quorum rule ({m} of {len(allowed)} approvers)", reason="no_quorum"
        )
    try:
        wanted_digest = params_digest(operation, params)
    except InvalidValueError as exc:
        raise QuorumError(f"bad operation parameters: {exc.message}", reason="malformed") from exc
    if request.operation != operation or request.params_digest != wanted_digest:
        raise QuorumError(
            f"the approvals are for {request.operation!r} with other parameters, not for "
            f"this {operation!r}",
            reason="wrong_operation",
        )
    if request.request_id in used_request_ids:
        raise QuorumError(f"request {request.request_id.hex()} was already used", reason="replayed")
    if now >= request.expires:
        raise QuorumError(f"request {request.request_id.hex()} has expired", reason="expired")
    if request.created > now + clock_skew_s:
        raise QuorumError("the request was created in the future", reason="not_yet_valid")
    threshold = max(m, request.m)
    counted: list[bytes] = []
    duplicates = 0
    for approval in approvals:
        check_approval(request, approval, approvers=allowed, now=now, clock_skew_s=clock_skew_s)
        if approval.approver in counted:
            duplicates += 1
            continue
        counted.append(approval.approver)
    if len(counted) < threshold:
        if duplicates:
            raise QuorumError(
                f"{len(counted)} distinct approver(s) of {threshold} needed: "
                f"{duplicates} duplicate approval(s) count once",
                reason="duplicate_approver",
            )
        raise QuorumError(
            f"{len(counted)} valid approval(s), {threshold} needed", reason="insufficient"
        )
    return QuorumDecision(
        request_id=request.request_id,
        operation=operation,
        params=dict(request.params),
        approvers=tuple(sorted(counted)),
        m=threshold,
        expires=request.expires,
    )


def check_approval(
    request: ApprovalRequest,
    approval: Approval,
    *,
    approvers: Collection[bytes] | None = None,
    now: int,
    clock_skew_s: int = DEFAULT_CLOCK_SKEW_S,
) -> None:
    """Check one approval against its request (and, if given, the enforcer's approver set):
    bound to this request, by a named approver, signed by that key, unexpired. Used for each
    approval of a quorum and on receipt by the HQ endpoint."""
    who = approval.approver.hex()[:16]
    if approval.request_digest != request.digest or approval.request_id != request.request_id:
        raise QuorumError(
            f"approval by {who} is for another request or operation", reason="wrong_operation"
        )
    if approval.approver not in request.approvers or (
        approvers is not None and approval.approver not in approvers
    ):
        raise QuorumError(f"approval by unknown approver {who}", reason="unknown_approver")
    approval.verify_signature()
    if now >= min(approval.expires, request.expires):
        raise QuorumError(f"approval by {who} has expired", reason="expired")
    if approval.signed_at > now + clock_skew_s:
        raise QuorumError(f"approval by {who} is signed in the future", reason="not_yet_valid")


def verify_quorum_rule(
    bundle: ApprovalBundle,
    rule: QuorumRule | None,
    *,
    params: Mapping[str, Any],
    now: int,
    used_request_ids: Collection[bytes],
    clock_skew_s: int = DEFAULT_CLOCK_SKEW_S,
) -> QuorumDecision:
    """:func:`verify_quorum` under an entitlement's :class:`QuorumRule` (a station's case).
    No rule for the operation means the entitlement does not allow it: ``no_quorum``."""
    if rule is None:
        raise QuorumError(
            f"the entitlement names no quorum for {bundle.request.operation!r}",
            reason="no_quorum",
        )
    return verify_quorum(
        bundle.request,
        bundle.approvals,
        operation=rule.operation,
        params=params,
        approvers=rule.approvers,
        m=rule.m,
        now=now,
        used_request_ids=used_request_ids,
        clock_skew_s=clock_skew_s,
    )
