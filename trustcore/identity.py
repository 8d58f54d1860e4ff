"""Identity value objects: device, station and site identifiers and certificate serials.

A ``DeviceId`` ends up in a certificate subject (CN and serialNumber), in the
``hardwareModuleName`` SAN, in the MQTT username (Mosquitto takes it from the CN) and inside
topic names ``devices/<id>/...``. One character outside a tiny ASCII set could therefore turn
into an MQTT wildcard (``+``/``#``), a topic level separator (``/``), a ``$SYS``-style system
topic, a confusable Unicode look-alike or a log-injection vector. So identifiers are
restricted at construction: an invalid value cannot exist as a ``DeviceId``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from cryptography import x509

from trustcore.errors import InvalidValueError

__all__ = ["SERIAL_LIMIT", "CertSerial", "DeviceId", "SiteId", "StationId"]

#: ASCII letter or digit first, then letters, digits, ``.`` or ``-``; 1 to 64 chars.
#: No ``/ + # $``, whitespace, control or non-ASCII characters can pass. No ``_`` either:
#: the id is the certificate subject's serialNumber, a PrintableString (RFC 5280, X.520),
#: which cannot hold one (a certificate with it does not parse).
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")


def _check_identifier(kind: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidValueError(f"{kind} must be a str, not {type(value).__name__}")
    # fullmatch: ``$`` in a pattern would also accept a trailing newline.
    if _IDENTIFIER.fullmatch(value) is None:
        raise InvalidValueError(
            f"{kind} {value!r} must match [A-Za-z0-9][A-Za-z0-9.-]{{0,63}} (ASCII only)"
        )
    return value


@dataclass(frozen=True, slots=True, order=True)
class _Identifier:
    value: str
    kind: ClassVar[str] = "identifier"

    def __post_init__(self) -> None:
        _check_identifier(self.kind, self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, order=True)
class DeviceId(_Identifier):
    """A device identifier, safe as a certificate name, MQTT username and topic level."""

    kind: ClassVar[str] = "device id"


@dataclass(frozen=True, slots=True, order=True)
class StationId(_Identifier):
    """A factory station identifier (station CA subject serialNumber)."""

    kind: ClassVar[str] = "station id"


@dataclass(frozen=True, slots=True, order=True)
class SiteId(_Identifier):
    """A customer site (building) identifier (site CA subject serialNumber)."""

    kind: ClassVar[str] = "site id"


#: RFC 5280 allows 20-octet serials; a positive 159-bit value always fits in 20 DER octets.
SERIAL_LIMIT = 1 << 159


@dataclass(frozen=True, slots=True, order=True)
class CertSerial:
    """A certificate serial number: a positive integer below 2**159 (RFC 5280 §4.1.2.2)."""

    value: int

    def __post_init__(self) -> None:
        # bool is an int subclass; True as a serial is a bug, not a serial.
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            raise InvalidValueError(f"serial must be an int, not {type(self.value).__name__}")
        if not 0 < self.value < SERIAL_LIMIT:
            raise InvalidValueError("serial must be positive and below 2**159")

    @classmethod
    def random(cls) -> CertSerial:
        """A fresh random serial (159 bits of CSPRNG output, as CA/B Forum asks >= 64)."""
        while True:
            value = x509.random_serial_number()
            if 0 < value < SERIAL_LIMIT:
                return cls(value)

    @classmethod
    def from_hex(cls, text: str) -> CertSerial:
        """Parse the lowercase/uppercase hex form (no ``0x`` prefix, no separators)."""
        if not isinstance(text, str) or re.fullmatch(r"[0-9A-Fa-f]{1,40}", text) is None:
            raise InvalidValueError(f"serial {text!r} is not 1 to 40 hex digits")
        return cls(int(text, 16))

    @property
    def hex(self) -> str:
        """Lowercase hex without leading zeros: the form used in logs, manifests and CRL lists."""
        return format(self.value, "x")

    def __str__(self) -> str:
        return self.hex
