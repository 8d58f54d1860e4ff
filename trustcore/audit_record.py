"""One audit record: its format, its encoding and its strict, fast decoding.

Owns the record (deterministic CBOR map; entry hash = SHA-256 of the record's exact
bytes)::

    {"seq": uint, "prev": bstr(32), "time": uint, "event": tstr,
     "fields": {tstr => int / tstr / bstr / bool / null}}

the values a chain is made of (:class:`AuditRecord`, :class:`ChainHead`) and the hot loop
that decodes a chain's records and checks their links (:func:`decode_chain`). Verifying a
chain, checkpoints and exports are :mod:`trustcore.audit`'s, which re-exports every name
here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, NoReturn, overload

import cbor2

from trustcore import cbor
from trustcore.errors import AuditChainError, EncodingError, InvalidValueError

__all__ = [
    "SCALAR_TYPE_SET",
    "ZERO_HASH",
    "AuditRecord",
    "ChainEnd",
    "ChainHead",
    "FieldValue",
    "IssuedRow",
    "IssuedRun",
    "check_name",
    "check_uint",
    "decode_chain",
    "decode_record",
    "encode_record",
    "issued_row",
    "parse_record",
    "record_hash",
]

ZERO_HASH = bytes(32)
_MAX_NAME = 128
_MAX_RECORD_SIZE = 64 * 1024
_RECORD_KEYS = frozenset({"seq", "prev", "time", "event", "fields"})
_SCALAR_TYPES = (int, str, bytes, bool, type(None))
#: The types an event field value may have (one set lookup per value in the hot loop).
SCALAR_TYPE_SET = frozenset(_SCALAR_TYPES)

FieldValue = int | str | bytes | bool | None


class AuditRecord(NamedTuple):
    """One verified record. A NamedTuple, not a dataclass: a million are built per export
    and tuple construction is the cheapest immutable object Python has."""

    seq: int
    prev_hash: bytes
    time: int
    event: str
    fields: dict[str, FieldValue]
    hash: bytes  # SHA-256 of the record's bytes


#: One ``issued`` record as the reconciler reads it: (seq, time, tpm reading or None,
#: device id, serial, key id, product, counter, entitlement seq).
IssuedRow = tuple[int, int, Any, str, str, bytes, str, int, Any]
_SERIAL_HEX = re.compile(r"[0-9a-f]{1,40}")


class IssuedRun(NamedTuple):
    """Consecutive ``issued`` records with exactly the fields a station writes, each of
    exactly its type (``serial`` lowercase hex, ``key_id`` 32 bytes; the ``tpm`` reading
    bytes, or absent: ``None``), one flat tuple each (:data:`IssuedRow`)."""

    rows: list[IssuedRow]


def issued_row(seq: int, time: int, fields: dict[str, Any]) -> IssuedRow | None:
    """The row of an ``issued`` record's ``fields`` if they are exactly the fields a station
    writes, each of exactly its type; ``None`` otherwise (the record is then handled field
    by field). Such fields are all scalars under string keys: a row needs no other check
    of them."""
    size = len(fields)
    if size != 7 and size != 6:
        return None
    try:  # subscripts, not .get: the common record has every field
        device_id, serial, kid = fields["device_id"], fields["serial"], fields["key_id"]
        product, counter, eseq = fields["product"], fields["counter"], fields["entitlement_seq"]
        tpm = fields["tpm"] if size == 7 else None  # 6: all but the tpm reading
    except KeyError:
        return None
    if (
        type(device_id) is str
        and type(serial) is str
        and type(kid) is bytes
        and len(kid) == 32
        and type(product) is str
        and type(counter) is int
        and type(eseq) is int
        and (size == 6 or type(tpm) is bytes)
        and _SERIAL_HEX.fullmatch(serial) is not None
    ):
        return (seq, time, tpm, device_id, serial, kid, product, counter, eseq)
    return None


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where a chain stands: the next ``seq`` to expect and the hash of the last record.

    After :func:`verify_chain`, ``records`` holds the verified records in order so that the
    reconciler never decodes them twice.
    """

    next_seq: int = 0
    head_hash: bytes = ZERO_HASH
    records: tuple[AuditRecord, ...] = field(default=(), repr=False, compare=False)

    @property
    def last_seq(self) -> int:
        """``seq`` of the last record (-1 for an empty log)."""
        return self.next_seq - 1

    @property
    def count(self) -> int:
        """Number of records in the log up to the head."""
        return self.next_seq


def _fail(reason: str, message: str) -> NoReturn:
    raise AuditChainError(message, reason=reason)


def check_uint(value: object, what: str) -> int:
    """``value`` if it is an int >= 0 (not a bool), else ``InvalidValueError``."""
    if type(value) is not int or value < 0:
        raise InvalidValueError(f"{what} must be an integer >= 0")
    return value


def check_name(value: object, what: str) -> str:
    """``value`` if it is a string of 1..128 characters, else ``InvalidValueError``."""
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
        raise InvalidValueError(f"{what} must be a string of 1..{_MAX_NAME} characters")
    return value


def _check_fields(fields: Mapping[str, FieldValue]) -> dict[str, FieldValue]:
    out: dict[str, FieldValue] = {}
    for key, value in fields.items():
        check_name(key, "field name")
        if not isinstance(value, _SCALAR_TYPES):
            raise InvalidValueError(
                f"field {key!r}: values must be int, str, bytes, bool or None "
                f"(not {type(value).__name__})"
            )
        out[key] = value
    return out


def encode_record(
    seq: int, prev_hash: bytes, time: int, event: str, fields: Mapping[str, FieldValue]
) -> bytes:
    """The deterministic encoding of one record (what the station appends and hashes)."""
    check_uint(seq, "seq")
    check_uint(time, "time")
    check_name(event, "event")
    if not isinstance(prev_hash, bytes) or len(prev_hash) != 32:
        raise InvalidValueError("prev_hash must be 32 bytes")
    if seq == 0 and prev_hash != ZERO_HASH:
        raise InvalidValueError("record 0 must have the zero prev hash")
    return cbor.encode(
        {
            "seq": seq,
            "prev": prev_hash,
            "time": time,
            "event": event,
            "fields": _check_fields(fields),
        }
    )


def record_hash(record: bytes) -> bytes:
    """Entry hash: SHA-256 of the record's exact bytes."""
    return hashlib.sha256(record).digest()


def parse_record(raw: bytes, index: int) -> AuditRecord:
    """Decode one record with cbor2's C decoder and the type tests a record needs; no
    re-encoding (see the module docstring for why that is sound)."""
    try:
        m = cbor2.loads(
            raw,
            max_depth=4,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            semantic_decoders=cbor.REFUSE_TAGS,
        )
        seq = m["seq"]
        prev = m["prev"]
        time = m["time"]
        event = m["event"]
        fields = m["fields"]
    except Exception as exc:  # any decoder error, a non-map, or a missing key
        raise AuditChainError(f"record #{index} is not a valid record", reason="malformed") from exc
    if (
        len(m) != 5
        or type(seq) is not int
        or seq < 0
        or type(prev) is not bytes
        or len(prev) != 32
        or type(time) is not int
        or time < 0
        or type(event) is not str
        or type(fields) is not dict
    ):
        _fail("malformed", f"record #{index} has a missing, extra or mistyped field")
    for key, value in fields.items():
        if type(key) is not str or not isinstance(value, _SCALAR_TYPES):
            _fail("malformed", f"record #{index}: event fields must be flat str -> scalar")
    return AuditRecord(seq, prev, time, event, fields, hashlib.sha256(raw).digest())


def decode_record(record: bytes) -> AuditRecord:
    """Strictly decode one record (deterministic encoding enforced); for tools and tests.
    Bulk verification uses :func:`verify_chain`."""
    try:
        cbor.decode(record, max_size=_MAX_RECORD_SIZE)
    except EncodingError as exc:
        raise AuditChainError(
            f"record is not valid CBOR: {exc.message}", reason="malformed"
        ) from exc
    return parse_record(record, 0)


@dataclass(slots=True)
class ChainEnd:
    """Where :func:`stream_chain` stopped: ``ok`` only if every record passed; then
    ``last_hash`` is the new head hash."""

    ok: bool = False
    last_hash: bytes = b""


@overload
def decode_chain(
    records: Sequence[bytes],
    start_seq: int,
    start_prev_hash: bytes,
    end: ChainEnd,
    *,
    issued_runs: Literal[False] = False,
) -> list[AuditRecord]: ...


@overload
def decode_chain(
    records: Sequence[bytes],
    start_seq: int,
    start_prev_hash: bytes,
    end: ChainEnd,
    *,
    issued_runs: bool,
) -> list[AuditRecord | IssuedRun]: ...


def decode_chain(
    records: Sequence[bytes],
    start_seq: int,
    start_prev_hash: bytes,
    end: ChainEnd,
    *,
    issued_runs: bool = False,
) -> list[AuditRecord] | list[AuditRecord | IssuedRun]:
    """The one record decoder and hot loop of chain verification: decode each record once
    (cbor2's C decoder and the type tests a record needs, no re-encoding: see the module
    docstring), check ``seq`` and ``prev`` continuity, hash it. Returns the records that
    passed, in order; stops at the first defect with ``end.ok`` False.

    With ``issued_runs``, each run of ``issued`` records whose fields are exactly a
    station's (:func:`issued_row`) comes as one :class:`IssuedRun` of flat rows instead of
    one ``AuditRecord`` each (what HQ's reconciler reads): one loop from bytes to rows."""
    loads = cbor2.loads
    sha256 = hashlib.sha256
    refuse_tags = cbor.REFUSE_TAGS
    scalar_types = SCALAR_TYPE_SET
    new = tuple.__new__  # an AuditRecord without a Python-level __new__ call
    row_of = issued_row
    items: list[AuditRecord | IssuedRun] = []
    append = items.append
    rows: list[IssuedRow] | None = None
    end.ok = False
    expected = start_seq
    prev = start_prev_hash
    for raw in records:
        try:
            m = loads(
                raw,
                max_depth=4,
                allow_indefinite=False,
                allow_duplicate_keys=False,
                semantic_decoders=refuse_tags,
            )
            seq = m["seq"]
            prev_field = m["prev"]
            time = m["time"]
            event = m["event"]
            fields = m["fields"]
        except Exception:  # any decoder error, a non-map, a missing key
            return items
        if not (
            len(m) == 5
            and type(seq) is int
            and seq == expected
            and type(prev_field) is bytes
            and prev_field == prev
            and type(time) is int
            and time >= 0
            and type(event) is str
            and type(fields) is dict
        ):
            return items
        expected += 1
        if issued_runs and event == "issued":
            # A row's fields are all checked scalars under string keys: no loop below.
            row = row_of(seq, time, fields)
            if row is not None:
                prev = sha256(raw).digest()
                if rows is None:
                    rows = []
                    append(IssuedRun(rows))
                rows.append(row)
                continue
        for key, value in fields.items():
            if type(key) is not str or type(value) not in scalar_types:
                return items
        prev = sha256(raw).digest()
        rows = None
        append(new(AuditRecord, (seq, prev_field, time, event, fields, prev)))
    end.last_hash = prev
    end.ok = True
    return items
