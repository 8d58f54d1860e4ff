"""Errors of the trust core. Every error the core raises derives from ``TrustCoreError``,
whose base ``ReasonedError`` is also the base of every other package's root.

The tree names every subclass, wherever it is defined (``tests/project/test_error_trees.py`` checks
it against the code); classes outside this module carry their module in brackets::

    ReasonedError                  shared base: a stable ``reason`` besides the message
    └── TrustCoreError
        ├── EncodingError              malformed, oversized or non-canonical input bytes
        ├── InvalidValueError          a value object (DeviceId, Serial, ...) refused its input
        ├── ProfileError               a certificate would violate its profile
        ├── CsrError                   a CSR is malformed, badly signed or asks for what
        │                              policy forbids
        ├── VerificationError          a certificate chain was refused (``reason`` says why)
        ├── CrlError                   a CRL is malformed, badly signed or stale
        ├── SealedPackageError         a sealed package was refused (``reason`` says why)
        │   └── ReplayError            its sequence number is not newer than the last one
        ├── AuditChainError            an audit log broke continuity (``reason`` names the
        │                              attack)
        ├── PolicyError                a policy check refused an operation
        ├── RegistrationError          a registration message was refused [registration]
        │   └── AdmissionHeld          a plugin held the device for a person [registration]
        ├── RevocationListError        a revocation list was refused [revocation]
        ├── StationCaRequestError      a station CA renewal / re-key request was refused
        │                              [station_ca_request]
        ├── SiteReportError            a site report was refused [site_report]
        ├── SiteBundleError            a site bundle was refused [site_bundle]
        ├── QuorumError                approvals do not make the quorum [quorum]
        ├── SiteRolloverError          a site CA rollover request or renew command does not
        │                              verify [site_rollover]
        ├── KeyRotationError           a key acknowledgement or grace setting was refused
        │                              [key_rotation]
        └── PayloadError               a payload envelope was refused [payload]

Each refusal carries a short machine-readable ``reason`` (a stable string that callers map to
public reason codes) and a human message. Library exceptions are chained with
``raise ... from exc`` so a bad signature never looks like an I/O failure.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

#: What ``cryptography`` raises on hostile or broken DER. It parses many fields lazily, on
#: first access, and not all of its errors are ``ValueError``s.
X509_PARSE_ERRORS = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)


class ReasonedError(Exception):
    """An error with a short, stable, machine-readable ``reason`` besides its message.

    The base of every package's root exception (``TrustCoreError``, ``HqError``,
    ``FactoryStationError``, ``RegistrarError``), so callers and CLIs read reasons the same
    way everywhere.
    """

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        # A wrapper that passed on ``str(inner)`` (reason included) would print the reason
        # twice ("malformed: malformed: ..."): keep it once. Wrappers pass ``inner.message``.
        prefix = f"{self.reason}: "
        while isinstance(message, str) and message.startswith(prefix):
            message = message[len(prefix) :]
        super().__init__(message)

    @property
    def message(self) -> str:
        """The human message without the reason (what a wrapping error embeds)."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}" if self.args else self.reason


class TrustCoreError(ReasonedError):
    """Root of every error raised by :mod:`trustcore`."""


class EncodingError(TrustCoreError):
    reason = "malformed"


class InvalidValueError(TrustCoreError):
    reason = "invalid_value"


class ProfileError(TrustCoreError):
    reason = "profile_violation"


class CsrError(TrustCoreError):
    reason = "bad_csr"


class VerificationError(TrustCoreError):
    """A certificate was refused. ``reason`` is one of :data:`VERIFICATION_REASONS`."""

    reason = "untrusted"


#: Stable reasons for :class:`VerificationError`, one per defect the verifier recognises.
VERIFICATION_REASONS = frozenset(
    {
        "untrusted",  # no path to a trust anchor (unknown or wrong issuer, self-signed leaf)
        "expired",
        "not_yet_valid",
        "wrong_eku",
        "wrong_key_usage",
        "missing_san",
        "ca_leaf",  # a CA certificate presented where an end entity is required
        "wrong_key_type",
        "path_length",
        "revoked",
        "crl_missing",
        "crl_stale",
        "bad_signature",
        "malformed",
    }
)


class CrlError(TrustCoreError):
    reason = "bad_crl"


class SealedPackageError(TrustCoreError):
    reason = "bad_package"


class ReplayError(SealedPackageError):
    reason = "replayed"


class AuditChainError(TrustCoreError):
    """An audit log is not one unbroken chain. ``reason`` is e.g. ``gap``, ``fork``,
    ``reorder``, ``truncation``, ``rewritten_entry``, ``forged_checkpoint``, ``wrong_station``."""

    reason = "audit_chain_broken"


class PolicyError(TrustCoreError):
    reason = "policy_refused"
