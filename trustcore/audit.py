"""The hash-chained audit log of a factory station, its signed checkpoints and its exports.

Owns chain verification, checkpoints, exports and the station-side builder
(:class:`AuditLog`). One record's format and decoding are :mod:`trustcore.audit_record`'s
(re-exported here)::

    {"seq": uint, "prev": bstr(32), "time": uint, "event": tstr,
     "fields": {tstr => int / tstr / bstr / bool / null}}

``seq`` counts from 0 with no holes; ``prev`` is the entry hash of record ``seq - 1``
(32 zero bytes for record 0). ``fields`` is flat on purpose: the verifier checks every value
with one type test, and the reconciler reads them without a second decode.

Checkpoint, signed by the station key (ECDSA-P256-SHA256 over CBOR
``["devtrust/audit-checkpoint/v1", body]``)::

    {"body": {"station": tstr, "seq": uint, "head": bstr(32), "time": uint, "count": uint},
     "sig": bstr}

``seq`` is the last record covered, ``head`` its entry hash, ``count`` the number of
records in the log up to it (``seq + 1``). Because every record names its predecessor's
hash, one signature over the head attests every record before it.

Export (what a station sends to HQ inside a sealed package)::

    {"v": 1, "records": [bstr, ...], "checkpoint": signed checkpoint}

A CBOR array of byte strings (not length-prefixed frames) so that one C-level decode
splits the export and each record keeps the exact bytes that were hashed.

How a verifier tells the attacks apart (``AuditChainError.reason``)
--------------------------------------------------------------------
Checks run roughly in this order; the first defect found names the error:

``malformed``        a record, checkpoint or export that is not the format above
                     (``oversized``: an export over the caller's size limit).
``wrong_station``    the checkpoint names another station than the one expected.
``forged_checkpoint`` the checkpoint signature does not verify under the station key, or the
                     signed head is not the recomputed hash of the record at its ``seq``.
``fork``             two different records claim one ``seq`` (in one export, or a record for a
                     ``seq`` HQ already accepted that is not provably the accepted one), or
                     the first record of an export does not link to the head HQ accepted
                     from the previous export.
``duplicate``        the very same record appears twice (or re-sends the accepted head).
``gap``              a ``seq`` between the expected start and the highest ``seq`` present is
                     missing from the export: records were removed from the middle.
``reorder``          every ``seq`` is present exactly once, but not in ascending order.
``rewritten_entry``  ``seq`` order is perfect but a record's ``prev`` is not the hash of its
                     predecessor: the predecessor (or this record) was altered.
``truncation``       the chain is intact but ends before the checkpoint's ``seq`` (or holds
                     fewer records than its ``count``): records were cut from the end.
``unattested``       the chain goes past the checkpoint: those records carry no signature.

Gap vs truncation vs reorder: a missing ``seq`` *below* the highest ``seq`` present is a
gap; missing records *above* it are visible only against the signed checkpoint and are a
truncation; a reorder loses nothing (the set of ``seq`` values is complete), only the order
is wrong. Classification runs only after the fast path has found something wrong, so it
costs nothing on a valid log.

Speed: the fast path does one cbor2 (C) decode, one SHA-256 and a few type tests per record
(about 4 µs; a million-record export verifies in about 4 s when streamed with
``on_record``, see docs/formats.md). It does not re-encode records to check
they are canonical: the entry hash covers the exact bytes and the station's checkpoint
signature covers the hash, so nobody but the station's key holder can choose those bytes,
and :meth:`AuditLog.append` always writes the deterministic encoding.

Not checked here (policy, in the reconciler): event semantics, time monotonicity (clock
rollback), quotas and duplicate devices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.audit_record import (
    ZERO_HASH,
    AuditRecord,
    ChainEnd,
    ChainHead,
    FieldValue,
    IssuedRow,
    IssuedRun,
    check_name,
    check_uint,
    decode_chain,
    decode_record,
    encode_record,
    issued_row,
    parse_record,
    record_hash,
)
from trustcore.errors import AuditChainError, EncodingError, InvalidValueError
from trustcore.keys import Signer

__all__ = [
    "EXPORT_VERSION",
    "ZERO_HASH",
    "AuditExport",
    "AuditLog",
    "AuditRecord",
    "ChainEnd",
    "ChainHead",
    "Checkpoint",
    "FieldValue",
    "IssuedRow",
    "IssuedRun",
    "decode_chain",
    "decode_export",
    "decode_record",
    "encode_export",
    "encode_record",
    "issued_row",
    "parse_record",
    "record_hash",
    "sign_checkpoint",
    "stream_chain",
    "verify_chain",
    "verify_checkpoint",
    "verify_export",
]

EXPORT_VERSION = 1
_CHECKPOINT_DOMAIN = "devtrust/audit-checkpoint/v1"
_MAX_CHECKPOINT_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The station's signed statement "my log has ``count`` records ending in ``head``"."""

    station_id: str
    seq: int
    head_hash: bytes
    time: int
    count: int

    def to_cbor_map(self) -> dict[str, Any]:
        return {
            "station": self.station_id,
            "seq": self.seq,
            "head": self.head_hash,
            "time": self.time,
            "count": self.count,
        }


@dataclass(frozen=True, slots=True)
class AuditExport:
    """A decoded export: raw record bytes (exactly as hashed) and the signed checkpoint."""

    records: tuple[bytes, ...]
    checkpoint: bytes  # deterministic CBOR of the signed checkpoint map


def _fail(reason: str, message: str) -> NoReturn:
    raise AuditChainError(message, reason=reason)


# ---------------------------------------------------------------------------------------------
# Chain verification


def verify_chain(
    records: Iterable[bytes],
    *,
    start_seq: int = 0,
    start_prev_hash: bytes = ZERO_HASH,
    on_record: Callable[[AuditRecord], object] | None = None,
) -> ChainHead:
    """Verify that ``records`` continue the chain whose next ``seq`` is ``start_seq`` and whose
    head hash is ``start_prev_hash`` (defaults: a new log). Returns the new head, or raises
    :class:`AuditChainError` naming the defect (module docstring).

    Without ``on_record`` the decoded records are returned in ``ChainHead.records``. With
    it, each record is handed to ``on_record`` as soon as it has passed the chain check and
    is not kept: at a million records, keeping them all costs gigabytes and about half the
    time (allocator pressure), so a reconciler should stream and keep only its own tallies.
    Whatever ``on_record`` collected is provisional until the call returns (and, for an
    export, until :func:`verify_export` has matched the signed checkpoint): discard it if
    an error is raised.

    This checks continuity only; which head the chain must reach is the signed checkpoint's
    business (:func:`verify_export`).
    """
    if isinstance(records, bytes | bytearray | memoryview | str):
        raise TypeError("records must be an iterable of record byte strings, not one string")
    if type(start_seq) is not int or start_seq < 0:
        raise InvalidValueError("start_seq must be an integer >= 0")
    if not isinstance(start_prev_hash, bytes) or len(start_prev_hash) != 32:
        raise InvalidValueError("start_prev_hash must be 32 bytes")
    # Keep the records: if something is wrong, the diagnosis re-reads them all.
    items: Sequence[bytes] = records if isinstance(records, Sequence) else list(records)
    out: list[AuditRecord] = []
    append: Callable[[AuditRecord], object] = out.append if on_record is None else on_record
    end = ChainEnd()
    for record in stream_chain(items, start_seq, start_prev_hash, end):
        append(record)
    if not end.ok:
        _diagnose(items, start_seq, start_prev_hash)
    return ChainHead(next_seq=start_seq + len(items), head_hash=end.last_hash, records=tuple(out))


#: Records decoded per call of :func:`decode_chain` when streaming: few, so that each
#: record is consumed while still in cache (4,096 made ``verify_chain`` about 10 % slower
#: than yielding each record as decoded; 256 is as fast).
_STREAM_CHUNK = 256


def stream_chain(
    records: Sequence[bytes], start_seq: int, start_prev_hash: bytes, end: ChainEnd
) -> Iterator[AuditRecord]:
    """The records decoded and chain-checked by :func:`decode_chain`, yielded a few
    hundred at a time (keeping a million decoded records costs more than verifying them).
    Stops at the first defect with ``end.ok`` False: naming it is :func:`_diagnose`'s job,
    on all the records."""
    end.ok = False
    seq, prev = start_seq, start_prev_hash
    for first in range(0, len(records), _STREAM_CHUNK):
        part = records[first : first + _STREAM_CHUNK]
        yield from decode_chain(part, seq, prev, end)
        if not end.ok:
            return
        seq, prev = seq + len(part), end.last_hash
    end.last_hash = prev
    end.ok = True


def _diagnose(items: Sequence[bytes], start_seq: int, start_prev_hash: bytes) -> NoReturn:
    """Name the defect of a chain the fast path refused (slow, runs only on failure)."""
    decoded = [parse_record(raw, i) for i, raw in enumerate(items)]

    # 1. Records for sequence numbers HQ already accepted from an earlier export. Only the
    #    head's hash is known here, so an older record cannot be proven identical: fail
    #    closed and call any such record a fork.
    for rec in decoded:
        if rec.seq < start_seq:
            if rec.seq == start_seq - 1 and rec.hash == start_prev_hash:
                _fail("duplicate", f"record {rec.seq} was already accepted (re-sent head)")
            _fail("fork", f"record {rec.seq} competes with the already accepted history")

    # 2. One seq, two records.
    seen: dict[int, bytes] = {}
    duplicate: int | None = None
    for rec in decoded:
        if rec.seq not in seen:
            seen[rec.seq] = rec.hash
        elif seen[rec.seq] != rec.hash:
            _fail("fork", f"two different records claim seq {rec.seq}")
        elif duplicate is None:
            duplicate = rec.seq
    if duplicate is not None:
        _fail("duplicate", f"record {duplicate} appears more than once")

    # 3. Holes below the highest seq present.
    highest = max(seen)
    for seq in range(start_seq, highest + 1):
        if seq not in seen:
            _fail("gap", f"record {seq} is missing (records up to {highest} are present)")

    # 4. Complete but out of order.
    for position, rec in enumerate(decoded):
        if rec.seq != start_seq + position:
            _fail("reorder", f"record {rec.seq} is at position {position}")

    # 5. In order, but a link is broken.
    prev = start_prev_hash
    for rec in decoded:
        if rec.prev_hash != prev:
            if rec.seq == start_seq:
                _fail(
                    "fork",
                    f"record {rec.seq} does not link to the accepted head "
                    f"{start_prev_hash.hex()[:16]}...",
                )
            _fail(
                "rewritten_entry",
                f"record {rec.seq} does not link to record {rec.seq - 1}: one of them was altered",
            )
        prev = rec.hash
    # The fast path refused something the diagnosis cannot name: still a refusal.
    _fail("malformed", "the chain failed a check that no diagnosis names")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_sig_input(body: Mapping[str, Any]) -> bytes:
    return cbor.encode([_CHECKPOINT_DOMAIN, dict(body)])


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> bytes:
    """The signed checkpoint bytes (deterministic CBOR map ``{"body", "sig"}``)."""
    check_name(checkpoint.station_id, "station_id")
    check_uint(checkpoint.seq, "seq")
    check_uint(checkpoint.time, "time")
    check_uint(checkpoint.count, "count")
    if not isinstance(checkpoint.head_hash, bytes) or len(checkpoint.head_hash) != 32:
        raise InvalidValueError("head_hash must be 32 bytes")
    body = checkpoint.to_cbor_map()
    return cbor.encode({"body": body, "sig": signer.sign(_checkpoint_sig_input(body))})


def verify_checkpoint(
    data: bytes, *, station_id: str, station_public: ec.EllipticCurvePublicKey
) -> Checkpoint:
    """Decode a signed checkpoint; refuse another station's (``wrong_station``) and a bad
    signature (``forged_checkpoint``). The station key's certificate chain is the caller's
    job (``trustcore.verify``)."""
    try:
        top = cbor.map_of(cbor.decode(data, max_size=_MAX_CHECKPOINT_SIZE), "checkpoint")
        cbor.expect_keys(top, {"body", "sig"}, what="checkpoint")
        sig = cbor.field(top, "sig", bytes)
        body = cbor.map_of(top["body"], "checkpoint body")
        cbor.expect_keys(body, {"station", "seq", "head", "time", "count"}, what="checkpoint body")
        checkpoint = Checkpoint(
            station_id=cbor.field(body, "station", str),
            seq=cbor.field(body, "seq", int),
            head_hash=cbor.field(body, "head", bytes, size=32),
            time=cbor.field(body, "time", int),
            count=cbor.field(body, "count", int),
        )
        if checkpoint.seq < 0 or checkpoint.time < 0 or checkpoint.count < 0:
            raise EncodingError("checkpoint integers must be >= 0")
    except EncodingError as exc:
        raise AuditChainError(f"checkpoint: {exc.message}", reason="malformed") from exc
    if checkpoint.station_id != station_id:
        _fail(
            "wrong_station",
            f"checkpoint is from station {checkpoint.station_id!r}, expected {station_id!r}",
        )
    try:
        station_public.verify(sig, _checkpoint_sig_input(body), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AuditChainError(
            "checkpoint signature does not verify under the station key",
            reason="forged_checkpoint",
        ) from exc
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Exports


def encode_export(records: Sequence[bytes], checkpoint: bytes) -> bytes:
    """An export: the records since the last export plus the signed checkpoint at its end."""
    try:
        cp = cbor.decode(checkpoint, max_size=_MAX_CHECKPOINT_SIZE)
    except EncodingError as exc:
        raise InvalidValueError("checkpoint is not a signed checkpoint") from exc
    return cbor.encode({"v": EXPORT_VERSION, "records": list(records), "checkpoint": cp})


def decode_export(data: bytes, *, max_size: int) -> AuditExport:
    """Split an export into raw records and the signed checkpoint (structure only: call
    :func:`verify_export` to verify it).

    The deterministic form is checked without re-encoding the records
    (:func:`_export_is_canonical`: about 0.1 s instead of 0.4 s for a million).
    """
    if not isinstance(data, bytes):
        raise TypeError("export must be bytes")
    if len(data) > max_size:
        raise AuditChainError(f"export of {len(data)} bytes exceeds {max_size}", reason="oversized")
    try:
        top = cbor2.loads(
            data,
            max_depth=4,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            semantic_decoders=cbor.REFUSE_TAGS,
        )
        top = cbor.map_of(top, "export")
        cbor.expect_keys(top, {"v", "records", "checkpoint"}, what="export")
        if cbor.field(top, "v", int) != EXPORT_VERSION:
            raise EncodingError(f"unsupported export version {top['v']!r}")
        records = cbor.field(top, "records", list)
        if not set(map(type, records)) <= {bytes}:  # a C loop over a million items
            raise EncodingError("export records must be byte strings")
        checkpoint = cbor.encode(cbor.map_of(top["checkpoint"], "checkpoint"))
    except AuditChainError:
        raise
    except Exception as exc:  # decoder errors of any type, and EncodingError
        raise AuditChainError(f"export is malformed: {exc}", reason="malformed") from exc
    if not _export_is_canonical(data, records, checkpoint):
        _fail("malformed", "export is not in deterministic encoding (or has trailing bytes)")
    return AuditExport(records=tuple(records), checkpoint=checkpoint)


def _export_is_canonical(data: bytes, records: list[bytes], checkpoint: bytes) -> bool:
    """Whether ``data`` (decoded into ``records`` and the checkpoint map whose deterministic
    encoding is ``checkpoint``) is the deterministic encoding of the export, without
    re-encoding a million records: the bytes before the first record and after the last
    are compared, and the length must be the deterministic one. Every item's encoding is
    at least as long as its shortest (deterministic) form, so equal lengths mean each
    record's head is the shortest and nothing trails."""
    # The deterministic encoding with no records and a null checkpoint, cut before the
    # (empty) array: the map head, "v" and its value, the "records" key.
    empty = cbor.encode({"v": EXPORT_VERSION, "records": [], "checkpoint": None})
    prefix = empty[: -len(_EMPTY_TAIL)] + cbor.array_head(len(records))
    suffix = cbor.encode("checkpoint") + checkpoint
    lengths = list(map(len, records))
    size = len(prefix) + sum(lengths) + len(suffix)
    # The shortest heads: their length grows with the string's, so when the shortest and
    # the longest record have heads of one length, every record has (the usual case).
    shortest, longest = min(lengths, default=0), max(lengths, default=0)
    if _head_length(shortest) == _head_length(longest):
        size += len(lengths) * _head_length(shortest)
    else:
        size += sum(map(_head_length, lengths))
    return len(data) == size and data.startswith(prefix) and data.endswith(suffix)


def _head_length(length: int) -> int:
    return len(cbor.bytes_head(length))


# What ``{..., "records": [], "checkpoint": None}`` ends with (keys in deterministic order:
# "v", "records", "checkpoint").
_EMPTY_TAIL = b"\x80" + cbor.encode("checkpoint") + b"\xf6"


def verify_export(
    export: bytes | AuditExport,
    *,
    station_id: str,
    station_public: ec.EllipticCurvePublicKey,
    start_seq: int = 0,
    start_prev_hash: bytes = ZERO_HASH,
    max_size: int = 256 * 1024 * 1024,
    on_record: Callable[[AuditRecord], object] | None = None,
) -> ChainHead:
    """Verify an export end to end: checkpoint (station, signature), chain continuity from
    the previously accepted head, and that the chain ends exactly at the signed head.

    Returns the new head (store ``next_seq`` and ``head_hash`` for the next export). Records
    are returned in ``ChainHead.records`` or streamed to ``on_record`` (see
    :func:`verify_chain`; use streaming for large exports and treat what it saw as
    provisional until this function returns).
    """
    if not isinstance(export, AuditExport):
        export = decode_export(export, max_size=max_size)
    checkpoint = verify_checkpoint(
        export.checkpoint, station_id=station_id, station_public=station_public
    )
    head = verify_chain(
        export.records, start_seq=start_seq, start_prev_hash=start_prev_hash, on_record=on_record
    )
    if head.last_seq < checkpoint.seq:
        _fail(
            "truncation",
            f"export ends at seq {head.last_seq} but the checkpoint covers up to {checkpoint.seq}",
        )
    if head.last_seq > checkpoint.seq:
        _fail(
            "unattested",
            f"chain reaches seq {head.last_seq} but the signed checkpoint ends at {checkpoint.seq}",
        )
    if head.head_hash != checkpoint.head_hash:
        _fail("forged_checkpoint", f"signed head does not match record {checkpoint.seq}")
    if head.count != checkpoint.count:
        _fail(
            "truncation",
            f"checkpoint counts {checkpoint.count} records, the chain holds {head.count}",
        )
    return head


# ---------------------------------------------------------------------------------------------
# The station-side builder


class AuditLog:
    """Append-only builder for one station's log (pure: the caller persists each returned
    record before acting on it, and resumes after a restart with the stored head)."""

    def __init__(self, station_id: str, *, head: ChainHead | None = None) -> None:
        self._station_id = check_name(station_id, "station_id")
        start = head if head is not None else ChainHead()
        self._next_seq = check_uint(start.next_seq, "next_seq")
        if not isinstance(start.head_hash, bytes) or len(start.head_hash) != 32:
            raise InvalidValueError("head_hash must be 32 bytes")
        if (self._next_seq == 0) != (start.head_hash == ZERO_HASH):
            raise InvalidValueError("an empty log has the zero head hash, and only it does")
        self._head_hash = start.head_hash

    @property
    def station_id(self) -> str:
        return self._station_id

    @property
    def head(self) -> ChainHead:
        return ChainHead(next_seq=self._next_seq, head_hash=self._head_hash)

    def append(self, event: str, fields: Mapping[str, FieldValue], time: int) -> bytes:
        """Encode the next record, advance the head, return the record bytes."""
        record = encode_record(self._next_seq, self._head_hash, time, event, fields)
        self._head_hash = record_hash(record)
        self._next_seq += 1
        return record

    def make_checkpoint(self, signer: Signer, time: int) -> bytes:
        """Sign the current head with the station key (at least one record is required:
        an empty log has nothing to attest)."""
        if self._next_seq == 0:
            raise InvalidValueError("cannot checkpoint an empty log")
        checkpoint = Checkpoint(
            station_id=self._station_id,
            seq=self._next_seq - 1,
            head_hash=self._head_hash,
            time=check_uint(time, "time"),
            count=self._next_seq,
        )
        return sign_checkpoint(checkpoint, signer)
