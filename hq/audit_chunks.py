"""Decoding an audit export's records for HQ: ``trustcore.audit.decode_chain`` (the one
record decoder and chain check), which with ``issued_runs`` turns the well-formed
``issued`` records -- a million per export -- into runs of flat tuples (:class:`IssuedRun`)
in the same loop; each run is handed on by column (:class:`IssuedColumns`), which the
reconciler reads with whole-column operations; any other record stays an ``AuditRecord``.

A large export is decoded in chunks by worker processes (both cores of a small HQ host,
the reconciler consuming chunk k while the workers decode the next ones). Each chunk is
verified from the hash of the record just before it, so the chunks verified one by one
are the chain verified whole: record ``a`` of a chunk must name SHA-256 of the export's
record ``a - 1``, which its own chunk checked in turn. Workers receive no input (they are
forked with the export in memory) and send back tuples of strings, bytes and small
integers, pickled without a memo (:func:`_pickled`: a fifth of the default pickler's cost,
the rows hold no shared or cyclic objects), which cost the parent about a tenth of
decoding the records itself. By column, a run pickles without a tuple per record, with its
TPM readings as one byte string and a product or entitlement shared by every record once.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import pickle
from collections.abc import Generator, Iterable, Sequence
from itertools import repeat
from typing import NamedTuple

from trustcore.audit import (
    AuditRecord,
    ChainEnd,
    IssuedRow,
    IssuedRun,
    decode_chain,
)

__all__ = [
    "POOL_THRESHOLD",
    "DecodedChunk",
    "IssuedColumns",
    "IssuedRow",
    "IssuedRun",
    "decode_chunks",
]

#: Exports with fewer records are decoded in the calling process (a fork costs ~20 ms).
POOL_THRESHOLD = 50_000
#: Records per chunk handed to a worker.
CHUNK_SIZE = 25_000
WORKERS = 2


#: The length of the ``tpm`` reading of an issued record (trustcore.stationtime).
_TPM_SIZE = 16


class IssuedColumns(NamedTuple):
    """An :class:`IssuedRun` by column: record ``i`` has ``seq`` ``first_seq + i`` (a run
    is consecutive records) and ``times[i]``, ``device_ids[i]``, ... . ``tpm`` is the
    readings concatenated when every one is 16 bytes (else one per record, ``None`` for
    none); ``product`` and ``entitlement_seq`` are one value when every record has it (else
    one per record). :meth:`rows` gives the run back, row for row."""

    first_seq: int
    times: tuple[int, ...]
    tpm: bytes | tuple[bytes | None, ...]
    device_ids: tuple[str, ...]
    serials: tuple[str, ...]
    key_ids: tuple[bytes, ...]
    product: str | tuple[str, ...]
    counters: tuple[int, ...]
    entitlement_seq: int | tuple[int, ...]

    @classmethod
    def of(cls, run: IssuedRun) -> IssuedColumns:
        """The run transposed (one C-level ``zip``), shared values folded."""
        n = len(run.rows)
        _, times, tpms, ids, serials, keys, products, counters, eseqs = zip(*run.rows, strict=True)
        tpm: bytes | tuple[bytes | None, ...] = tpms
        if None not in tpms and set(map(len, tpms)) == {_TPM_SIZE}:
            tpm = b"".join(tpms)
        # Equal values of exactly one type (issued_row checked each): folding loses nothing.
        product = products[0] if products.count(products[0]) == n else products
        eseq = eseqs[0] if eseqs.count(eseqs[0]) == n else eseqs
        return cls(run.rows[0][0], times, tpm, ids, serials, keys, product, counters, eseq)

    def rows(self) -> list[IssuedRow]:
        """The run's rows (:data:`IssuedRow`), as ``decode_chain`` built them."""
        n = len(self.times)
        tpm = self.tpm
        readings = (
            [tpm[i : i + _TPM_SIZE] for i in range(0, len(tpm), _TPM_SIZE)]
            if type(tpm) is bytes
            else tpm
        )
        product, eseq = self.product, self.entitlement_seq
        eseqs: Iterable[int] = repeat(eseq, n) if type(eseq) is int else eseq  # type: ignore[assignment]
        return list(
            zip(
                range(self.first_seq, self.first_seq + n),
                self.times,
                readings,
                self.device_ids,
                self.serials,
                self.key_ids,
                repeat(product, n) if type(product) is str else product,
                self.counters,
                eseqs,
                strict=True,
            )
        )


class DecodedChunk(NamedTuple):
    """One chunk: ``ok`` only if every record passed ``decode_chain``; ``last_hash`` is
    then the entry hash of its last record."""

    ok: bool
    last_hash: bytes
    items: list[IssuedColumns | AuditRecord]


def _decode(records: Sequence[bytes], start_seq: int, prev_hash: bytes) -> DecodedChunk:
    """One loop from record bytes to rows (``decode_chain``, the one record decoder), each
    run then by column."""
    end = ChainEnd()
    items = decode_chain(records, start_seq, prev_hash, end, issued_runs=True)
    return DecodedChunk(
        end.ok,
        end.last_hash,
        [IssuedColumns.of(i) if type(i) is IssuedRun else i for i in items],  # type: ignore[misc]
    )


# The export a forked worker decodes (set in the parent just before the fork).
_records: Sequence[bytes] = ()
_start_seq = 0
_start_hash = b""


def _decode_in_worker(bounds: tuple[int, int]) -> bytes:
    first, end = bounds
    prev = _start_hash if first == 0 else hashlib.sha256(_records[first - 1]).digest()
    return _pickled(_decode(_records[first:end], _start_seq + first, prev))


def _pickled(chunk: DecodedChunk) -> bytes:
    """``chunk`` pickled without the memo (``Pickler.fast``): the pool's default pickler
    memoizes every string, bytes and tuple of 25,000 rows, which cost a worker more than
    building the rows. A chunk is a tree (no object is referenced twice, none cyclic), so
    the memo would save nothing; unpickled, it is equal to ``chunk``."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(chunk)
    return buf.getvalue()


def decode_chunks(
    records: Sequence[bytes], start_seq: int, start_hash: bytes
) -> Generator[DecodedChunk, None, None]:
    """The records' chunks, decoded and chain-checked, in order. Stop at the first chunk
    that is not ``ok`` (the caller names the defect on the whole export)."""
    if len(records) < POOL_THRESHOLD:
        yield _decode(records, start_seq, start_hash)
        return
    global _records, _start_seq, _start_hash
    _records, _start_seq, _start_hash = records, start_seq, start_hash
    bounds = [(a, min(a + CHUNK_SIZE, len(records))) for a in range(0, len(records), CHUNK_SIZE)]
    try:
        # fork: the workers see the export without a copy through a pipe.
        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            for pickled in pool.imap(_decode_in_worker, bounds):
                chunk: DecodedChunk = pickle.loads(pickled)  # noqa: S301 - our worker's
                yield chunk
                if not chunk.ok:
                    return
    finally:
        _records, _start_hash = (), b""
