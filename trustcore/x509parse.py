"""Parse hostile X.509 DER completely, once, at the boundary.

``cryptography`` parses a certificate, CSR or CRL lazily: ``load_der_x509_*`` checks the
outer structure, and a bad subject, an unknown signature or curve OID, an invalid EC point
or an undecodable extension only raise when the field is first read — deep inside code
that expected a parsed object (an ``UnsupportedAlgorithm`` from ``csr.signature_hash_algorithm``,
a ``ValueError`` from ``cert.subject``). Every loader of outside input calls one of these
functions right after loading, inside its own ``except X509_PARSE_ERRORS``, so any such
defect is refused there, with the loader's reason, and everything downstream reads fields
that are known to parse.

Each function raises ``ValueError`` (chained to the library's error) on the first field
that does not parse, and returns its argument otherwise. A field the library only warns
about (e.g. a CSR attribute of the wrong length) is refused too: half-valid is not valid.

:func:`x509_warnings_ignored` is the other side: a decision over already-loaded input
(registration, renewal, wrap key) runs with such warnings silenced, because its own checks
decide and a warning per hostile request would only be noise.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from cryptography import x509

from trustcore.errors import X509_PARSE_ERRORS

__all__ = ["parsed_certificate", "parsed_crl", "parsed_csr", "x509_warnings_ignored"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def x509_warnings_ignored(f: Callable[_P, _R]) -> Callable[_P, _R]:
    """``f`` run with warnings silenced. ``cryptography`` emits warnings (not errors) for
    some odd encodings (e.g. a 10-letter country name); for hostile input they are noise,
    the checks decide, so they are silenced rather than printed per request."""

    @functools.wraps(f)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return f(*args, **kwargs)

    return quiet


_ERRORS: tuple[type[Exception], ...] = (*X509_PARSE_ERRORS, Warning)


@contextmanager
def _strict(what: str) -> Iterator[None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    except _ERRORS as exc:
        # the caller names the object ("CSR does not parse: ..."); say only what failed
        raise ValueError(str(exc) or f"a {what} field {type(exc).__name__}") from exc


def _touch_extensions(extensions: x509.Extensions) -> None:
    for ext in extensions:
        _ = ext.value


def parsed_certificate(cert: x509.Certificate) -> x509.Certificate:
    """Read every lazily parsed field of ``cert``: names, validity, extensions, public key
    and signature algorithm."""
    with _strict("certificate"):
        _ = (cert.version, cert.serial_number, cert.subject, cert.issuer)
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
        _ = (cert.signature_hash_algorithm, cert.signature_algorithm_parameters)
        _touch_extensions(cert.extensions)
        cert.public_key()
    return cert


def parsed_csr(csr: x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    """Read the subject, extensions, attributes and signature algorithm of ``csr`` (not its
    public key: an unusable key is the caller's ``wrong_key_type``, not ``malformed``)."""
    with _strict("CSR"):
        _ = (csr.subject, csr.signature_hash_algorithm, csr.signature_algorithm_parameters)
        _touch_extensions(csr.extensions)
        for attribute in csr.attributes:
            _ = attribute.value
    return csr


def parsed_crl(crl: x509.CertificateRevocationList) -> x509.CertificateRevocationList:
    """Read the issuer, dates, extensions, signature algorithm and every entry of ``crl``."""
    with _strict("CRL"):
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc)
        _ = (crl.signature_hash_algorithm, crl.signature_algorithm_parameters)
        _touch_extensions(crl.extensions)
        for revoked in crl:
            _ = (revoked.serial_number, revoked.revocation_date_utc)
            _touch_extensions(revoked.extensions)
    return crl
