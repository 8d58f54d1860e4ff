"""Deterministic CBOR (RFC 8949 §4.2.1, "core deterministic encoding") for every signed format.

Why a hand-written encoder: ``cbor2.dumps(canonical=True)`` sorts map keys length-first
(the old RFC 7049 rule, RFC 8949 §4.2.3), not by the bytewise order of their encodings that
§4.2.1 requires; the two differ as soon as a map mixes key types (``-1`` sorts after ``24``
under §4.2.1). The data model here is tiny, so the encoder is a few lines and byte-exact:

* ``int`` in [-2**64, 2**64 - 1] (shortest head), ``bytes``, ``str``, ``bool``, ``None``,
  ``list``/``tuple`` (definite length), ``dict`` with ``int`` or ``str`` keys;
* no floats, no tags, no indefinite lengths, no other simple values.

Decoding uses cbor2's C decoder for speed, then refuses anything that is not exactly the
deterministic encoding of an allowed value: the decoded value is re-encoded and compared
byte for byte. That one comparison rejects trailing bytes, non-shortest heads, unsorted or
duplicate map keys, floats, tags and simple values, so a signature can only ever cover one
byte string per meaning.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NoReturn, TypeVar, cast

import cbor2

from trustcore.errors import EncodingError, InvalidValueError

__all__ = [
    "MAX_DEPTH",
    "REFUSE_TAGS",
    "array_head",
    "bytes_head",
    "decode",
    "encode",
    "encode_reference",
    "expect_keys",
    "field",
    "map_of",
    "optional_field",
    "uint63",
]

#: Deepest nesting accepted on either side. Our formats nest at most four levels; a bound
#: keeps hostile input from exhausting the stack.
MAX_DEPTH = 16

_UINT64_MAX = (1 << 64) - 1
_NINT64_MIN = -(1 << 64)

T = TypeVar("T")


def _head(major: int, value: int) -> bytes:
    """The shortest head for ``major`` and argument ``value`` (RFC 8949 §4.2.1 rule 1)."""
    mt = major << 5
    if value < 24:
        return bytes((mt | value,))
    if value <= 0xFF:
        return bytes((mt | 24, value))
    if value <= 0xFFFF:
        return bytes((mt | 25,)) + value.to_bytes(2, "big")
    if value <= 0xFFFFFFFF:
        return bytes((mt | 26,)) + value.to_bytes(4, "big")
    return bytes((mt | 27,)) + value.to_bytes(8, "big")


def _encode_into(obj: object, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise EncodingError(f"nesting deeper than {MAX_DEPTH} levels")
    # bool first: it is a subclass of int but has its own encoding.
    if obj is True:
        out.append(b"\xf5")
    elif obj is False:
        out.append(b"\xf4")
    elif obj is None:
        out.append(b"\xf6")
    elif isinstance(obj, int):
        if obj >= 0:
            if obj > _UINT64_MAX:
                raise EncodingError("integer does not fit in 64 bits (bignums are not allowed)")
            out.append(_head(0, obj))
        else:
            if obj < _NINT64_MIN:
                raise EncodingError("integer does not fit in 64 bits (bignums are not allowed)")
            out.append(_head(1, -1 - obj))
    elif isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        out.append(_head(2, len(data)))
        out.append(data)
    elif isinstance(obj, str):
        try:
            data = obj.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodingError("text is not valid UTF-8 (lone surrogate)") from exc
        out.append(_head(3, len(data)))
        out.append(data)
    elif isinstance(obj, list | tuple):
        out.append(_head(4, len(obj)))
        for item in obj:
            _encode_into(item, out, depth + 1)
    elif isinstance(obj, dict):
        items: list[tuple[bytes, bytes]] = []
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, int | str):
                raise EncodingError(f"map keys must be int or str, not {type(key).__name__}")
            key_parts: list[bytes] = []
            _encode_into(key, key_parts, depth + 1)
            value_parts: list[bytes] = []
            _encode_into(value, value_parts, depth + 1)
            items.append((b"".join(key_parts), b"".join(value_parts)))
        # §4.2.1: keys sorted by the bytewise lexicographic order of their encodings.
        items.sort(key=lambda kv: kv[0])
        out.append(_head(5, len(items)))
        for encoded_key, encoded_value in items:
            out.append(encoded_key)
            out.append(encoded_value)
    else:
        raise EncodingError(f"type {type(obj).__name__} is not allowed in deterministic CBOR")


def encode(obj: object) -> bytes:
    """Encode ``obj`` as deterministic CBOR; :class:`EncodingError` for anything outside the
    allowed data model (floats, tags, sets, bignums, non-int/str map keys, ...).

    Every message of the protocols uses text map keys only; for such values cbor2's C
    encoder in canonical mode writes exactly the §4.2.1 bytes (length-first key order is the
    bytewise order when every key is a text string: see :func:`decode`), at a fraction of the
    cost. Anything else (int keys, tuples, subclasses, out-of-range ints) takes the
    reference encoder :func:`encode_reference`; tests/trustcore/test_cbor.py checks both agree."""
    if _c_encodable(obj, 0):
        try:
            return cbor2.dumps(obj, canonical=True)
        except Exception:  # e.g. a lone surrogate: let the reference encoder say why
            return encode_reference(obj)
    return encode_reference(obj)


def bytes_head(length: int) -> bytes:
    """The head of a byte string of ``length`` bytes (``head + data`` = ``encode(data)``):
    for callers that assemble a fixed message shape around large byte strings without
    copying them through the encoder (tests/trustcore/test_cbor.py checks the equality)."""
    if not 0 <= length <= _UINT64_MAX:
        raise EncodingError("byte string length out of range")
    return _head(2, length)


def array_head(length: int) -> bytes:
    """The head of an array of ``length`` items (head + the items' encodings = the array's
    encoding), for the same callers as :func:`bytes_head`."""
    if not 0 <= length <= _UINT64_MAX:
        raise EncodingError("array length out of range")
    return _head(4, length)


def encode_reference(obj: object) -> bytes:
    """The reference encoder, written from RFC 8949 §4.2.1 (any allowed value)."""
    out: list[bytes] = []
    _encode_into(obj, out, 0)
    return b"".join(out)


def _c_encodable(obj: object, depth: int) -> bool:
    """True when ``obj`` is built only of exact ``str``/``bytes``/``bool``/``None``,
    64-bit ``int``, ``list`` and ``dict`` with ``str`` keys, nested at most
    :data:`MAX_DEPTH` levels: the values for which cbor2's canonical output is §4.2.1."""
    if depth > MAX_DEPTH:
        return False
    kind = type(obj)
    if kind is str or kind is bytes or kind is bool or obj is None:
        return True
    if kind is int:
        return _NINT64_MIN <= cast(int, obj) <= _UINT64_MAX
    if kind is list:
        return all(_c_encodable(v, depth + 1) for v in cast(list[Any], obj))
    if kind is dict:
        return all(
            type(k) is str and _c_encodable(v, depth + 1)
            for k, v in cast(dict[Any, Any], obj).items()
        )
    return False


def _refuse_tag(value: object, immutable: bool) -> NoReturn:
    raise cbor2.CBORDecodeError("CBOR tags are not allowed")


class _RefuseEveryTag(dict[int, Any]):
    """A semantic-decoder table that claims every tag and refuses it.

    cbor2 decodes many tags by itself (bigfloats, regexes, shared references, ...), some at
    real CPU or memory cost; claiming them all keeps hostile input from reaching that code.
    An empty ``dict`` whose lookups all answer "refuse", not a ``Mapping`` class: cbor2
    checks the table on every ``loads``, and for a ``Mapping`` that costs about 0.6 µs a
    call (a third of decoding an audit record). tests/trustcore/test_cbor.py checks tags
    are refused.
    """

    def __missing__(self, tag: int) -> Any:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True


REFUSE_TAGS: Mapping[int, Any] = _RefuseEveryTag()


_SCALARS = (int, str, bytes, bool, type(None))


def _plain_with_text_keys(obj: object, depth: int) -> bool:
    """True when ``obj`` uses only the allowed data model and every map key is a str."""
    if isinstance(obj, _SCALARS):
        return True
    if depth > MAX_DEPTH:
        return False
    if isinstance(obj, list):
        return all(_plain_with_text_keys(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return all(
            isinstance(k, str) and _plain_with_text_keys(v, depth + 1) for k, v in obj.items()
        )
    return False


#: Byte strings at least this long (values of a top-level map) are not re-encoded by
#: :func:`decode`: see :func:`_matches_around_blobs`.
_BLOB_SIZE = 1 << 16


def _matches_around_blobs(m: dict[Any, Any], data: bytes) -> bool:
    """True when ``data`` (which cbor2 decoded into the map ``m``) is exactly the
    deterministic encoding of ``m``, comparing every byte except the contents of the large
    byte strings among its values; False when ``m`` has none, or on any difference (the
    caller's full check then names it).

    Sound without reading those contents: the compared bytes fix every head, key and small
    value, so ``data`` parses into the same tree as the deterministic encoding with each
    large byte string at the same offset and length, and what sits there is what the
    decoder returned for it. Saves a re-encoding and a comparison of hundreds of MB for an
    audit export (each layer of it is checked once)."""
    if not any(type(v) is bytes and len(v) >= _BLOB_SIZE for v in m.values()):
        return False
    try:
        items: list[tuple[bytes, object]] = []
        for key, value in m.items():
            if type(key) is not str and type(key) is not int:
                return False
            items.append((encode(key), value))
        items.sort(key=lambda kv: kv[0])  # RFC 8949 §4.2.1: bytewise order of encoded keys
        view = memoryview(data)
        pos = 0
        for part, skip in _map_parts(len(m), items):
            end = pos + len(part)
            if view[pos:end] != part:
                return False
            pos = end + skip
    except EncodingError:
        return False
    return pos == len(data)


def _map_parts(count: int, items: list[tuple[bytes, object]]) -> Iterator[tuple[bytes, int]]:
    """The deterministic encoding of a map, as (bytes, length of a large byte string that
    follows them and is not included)."""
    yield _head(5, count), 0
    for key, value in items:
        yield key, 0
        if type(value) is bytes and len(value) >= _BLOB_SIZE:
            yield _head(2, len(value)), len(value)
        else:
            yield encode(value), 0


def decode(data: bytes, *, max_size: int) -> Any:
    """Decode exactly one deterministic CBOR item from ``data``.

    Refuses (with :class:`EncodingError`): input longer than ``max_size`` (reason
    ``oversized``, checked before any parsing), empty input, trailing bytes, indefinite
    lengths, duplicate keys, tags, floats, simple values, invalid UTF-8, nesting deeper than
    :data:`MAX_DEPTH`, and any encoding that is not the deterministic one.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodingError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise EncodingError(
            f"{len(data)} bytes exceeds the limit of {max_size}", reason="oversized"
        )
    if not data:
        raise EncodingError("empty input")
    try:
        obj = cbor2.loads(
            data,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            semantic_decoders=REFUSE_TAGS,
            str_errors="strict",
        )
    except Exception as exc:  # cbor2's C decoder raises several types; all mean "malformed"
        raise EncodingError(f"not well-formed CBOR: {exc}") from exc
    # Large byte strings in a top-level map (a sealed package's ciphertext, an export inside
    # its payload): compare everything but their contents, without copying them again.
    if type(obj) is dict and _matches_around_blobs(obj, data):
        return obj
    # Fast path: cbor2's C encoder in canonical mode sorts keys length-first (RFC 7049),
    # which is the RFC 8949 bytewise order exactly when every map key is a text string. So
    # when the data model is plain and all keys are text, its output is authoritative.
    if _plain_with_text_keys(obj, 0) and cbor2.dumps(obj, canonical=True) == data:
        return obj
    canonical = encode(obj)
    if canonical != data:
        if data.startswith(canonical):
            raise EncodingError(f"{len(data) - len(canonical)} trailing bytes after the item")
        raise EncodingError("not the deterministic (RFC 8949 §4.2.1) encoding")
    return obj


# ---------------------------------------------------------------------------------------------
# Typed access to decoded maps: one clear error per missing or mistyped field.


def map_of(obj: object, what: str) -> dict[Any, Any]:
    """``obj`` as a map, or :class:`EncodingError` naming ``what`` was expected."""
    if not isinstance(obj, dict):
        raise EncodingError(f"{what}: expected a map, got {type(obj).__name__}")
    return obj


def expect_keys(
    m: Mapping[Any, Any], required: set[str], optional: set[str] | None = None, *, what: str
) -> None:
    """Refuse a map that lacks a required key or has an unknown one (strict formats: an
    unexpected field is an attacker's lever or a version mismatch, never something to skip)."""
    keys = set(m)
    missing = required - keys
    if missing:
        raise EncodingError(f"{what}: missing field(s) {sorted(missing)}")
    unknown = keys - required - (optional or set())
    if unknown:
        raise EncodingError(f"{what}: unknown field(s) {sorted(map(str, unknown))}")


def _check_type(value: object, typ: type[Any], name: str | int) -> None:
    # bool is an int subclass: never accept True where an integer is required, nor vice versa.
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise EncodingError(f"field {name!r}: expected {typ.__name__}, got {type(value).__name__}")


def field(m: Mapping[Any, Any], name: str | int, typ: type[T], *, size: int | None = None) -> T:
    """The required field ``name`` of ``m``, checked to be of type ``typ``.

    ``size`` additionally pins the length of a ``bytes``/``str`` value (e.g. 32 for a hash).
    Range checks (e.g. "not negative") stay with the caller, who knows the meaning.
    """
    if name not in m:
        raise EncodingError(f"missing field {name!r}")
    value = m[name]
    _check_type(value, typ, name)
    if size is not None and len(value) != size:
        raise EncodingError(f"field {name!r}: expected length {size}, got {len(value)}")
    return cast(T, value)


def optional_field(m: Mapping[Any, Any], name: str | int, typ: type[T]) -> T | None:
    """Field ``name`` of type ``typ``, or ``None`` when absent or CBOR null."""
    value = m.get(name)
    if value is None:
        return None
    _check_type(value, typ, name)
    return cast(T, value)


def uint63(value: object, name: str) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) in [0, 2**63): a sequence, count or
    Unix time a signed format carries (and a store keeps as a signed 64-bit integer);
    ``InvalidValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise InvalidValueError(f"{name} must be an integer in [0, 2**63)")
    return value
