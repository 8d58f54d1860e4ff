"""Byte-level mutations of genuine inputs (shared by the hypothesis strategy and the
coverage-guided fallback of ``scripts/fuzz.py``).

DER and CBOR crashes hide in single bytes: an OID off by one, a length one too long, a
string tag changed to another string type. So besides flips, truncation and splices, a
mutation can add or subtract one from a byte, and set "interesting" values.
"""

from __future__ import annotations

import random

INTERESTING = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x0C, 0x13, 0x16, 0x1E, 0x7F, 0x80, 0x81,
               0x82, 0xFF)  # fmt: skip
MAX_LEN = 64 * 1024


def mutate(data: bytes, rng: random.Random, others: list[bytes] | None = None) -> bytes:
    """One to four random edits of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        kind = rng.randrange(9)
        if not buf:
            buf.extend(rng.randbytes(rng.randint(1, 16)))
            continue
        i = rng.randrange(len(buf))
        if kind == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[i] = (buf[i] + rng.choice((1, -1))) & 0xFF
        elif kind == 2:
            buf[i] = rng.choice(INTERESTING)
        elif kind == 3:
            buf[i] = rng.randrange(256)
        elif kind == 4:
            del buf[i : i + rng.randint(1, 8)]
        elif kind == 5:
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif kind == 6:
            del buf[rng.randint(0, len(buf)) :]
        elif kind == 7:
            j = rng.randrange(len(buf))
            n = rng.randint(1, 16)
            buf[i:i] = buf[j : j + n]
        elif others:
            other = rng.choice(others)
            if other:
                j = rng.randrange(len(other))
                buf[i : i + rng.randint(0, 32)] = other[j : j + rng.randint(1, 64)]
    return bytes(buf[:MAX_LEN])
