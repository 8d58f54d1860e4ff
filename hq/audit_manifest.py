"""The manifest of an audit export (:mod:`hq.audit_ingest`, step 6): every device
certificate the station says it issued, paired by serial with the ``issued`` records of its
log, each verified against one of the station's CA certificates. Owns
:func:`check_manifest`; pure (no store, no files).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from hq.audit_reconcile import IssuedEntry
from trustcore.errors import ProfileError
from trustcore.keys import key_id
from trustcore.profiles import device_id_from_certificate
from trustcore.reconcile import Violation

__all__ = ["check_manifest"]


def check_manifest(
    manifest: Sequence[bytes],
    issued: Sequence[IssuedEntry],
    station_ca: x509.Certificate | Sequence[x509.Certificate],
) -> tuple[list[Violation], dict[int, bytes]]:
    """Pair each manifest certificate with its ``issued`` record by serial number. A record
    without a certificate, a certificate without a record (an issuance the log does not
    show), or a pair that disagrees on device id or key is a violation. Returns the
    violations and the verified certificates by serial."""
    violations: list[Violation] = []
    by_serial: dict[int, tuple[str, bytes, bytes]] = {}
    cas = [station_ca] if isinstance(station_ca, x509.Certificate) else list(station_ca)
    for index, der in enumerate(manifest):
        try:
            cert = x509.load_der_x509_certificate(der)
            _verify_by_any(cert, cas)
            device_id = device_id_from_certificate(cert).value
            public = cert.public_key()
            kid = key_id(public)  # type: ignore[arg-type]
        except (ValueError, TypeError, InvalidSignature, ProfileError) as exc:
            violations.append(
                Violation(
                    "manifest_bad_certificate",
                    -1,
                    "",
                    f"manifest entry {index} is not a device certificate of this station "
                    f"({type(exc).__name__})",
                )
            )
            continue
        if cert.serial_number in by_serial:
            violations.append(
                Violation(
                    "manifest_bad_certificate",
                    -1,
                    device_id,
                    f"serial {cert.serial_number:x} twice in the manifest",
                )
            )
            continue
        by_serial[cert.serial_number] = (device_id, kid, der)
    verified = {serial: entry[2] for serial, entry in by_serial.items()}
    for item in issued:
        found = by_serial.pop(int(item.serial, 16), None)
        if found is None:
            violations.append(
                Violation(
                    "manifest_missing",
                    item.seq,
                    item.device_id,
                    f"no certificate with serial {item.serial} in the manifest",
                )
            )
        elif found[0] != item.device_id or found[1] != item.key_id:
            violations.append(
                Violation(
                    "manifest_mismatch",
                    item.seq,
                    item.device_id,
                    f"certificate {item.serial} names {found[0]} / another key",
                )
            )
    for serial, (device_id, _, _) in by_serial.items():
        violations.append(
            Violation(
                "manifest_unlisted",
                -1,
                device_id,
                f"certificate {serial:x} has no issued record in the audit log",
            )
        )
    return violations, verified


def _verify_by_any(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> None:
    """``cert`` is signed by one of ``cas`` (same station name, one key per re-key): the
    one whose key id matches the certificate's AKI first, then the others."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        wanted = aki.key_identifier
    except x509.ExtensionNotFound:
        wanted = None
    ordered = sorted(
        cas,
        key=lambda ca: x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest != wanted,
    )
    error: Exception = ValueError("no station CA certificate")
    for ca in ordered:
        try:
            cert.verify_directly_issued_by(ca)
            return
        except (ValueError, TypeError, InvalidSignature) as exc:
            error = exc
    raise error
