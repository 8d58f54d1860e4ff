"""TLS and client identity of the embedded broker (:mod:`registrar.broker.embedded`).

Owns the two listeners' server contexts — ``CERT_REQUIRED``, TLS 1.2+, AEAD suites, no
session resumption (OpenSSL's session cache turned off through ``ctypes``, checked before
use), CRL checking by OpenSSL (chain on the registration listener, leaf on the operational
one, whose CRLs are the site CA's alone), refused handshakes sent to the client as an
alert — and the mapping of a verified client certificate to its :class:`Principal`
(:func:`identify`: the direct issuer decides the listener's identity). No amqtt here.
"""

from __future__ import annotations

import _ssl
import ctypes
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from broker_config.tls_policy import TLS12_CIPHERS
from registrar.broker import REGISTRAR_IDENTITY, BrokerSettings
from registrar.broker.amqtt_plugins import (
    Principal,
    device_principal,
    service_principal,
)
from registrar.errors import BrokerError
from signers.errors import KeystoreError
from signers.private_files import write_private_file
from trustcore.errors import TrustCoreError
from trustcore.profiles import device_id_from_certificate
from trustcore.topics import Listener

__all__ = [
    "ListenerTls",
    "build_context",
    "identify",
    "issuing_cas",
    "load_pem_certificates",
    "warn_issuers_without_crl",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- identity


def load_pem_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot read CA bundle {path}: {exc}") from exc
    return certs


def issuing_cas(bundle: list[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The CAs that may directly issue client certificates on a listener: the bundle minus
    self-signed roots (the root signs CAs only; a leaf directly under it is refused)."""
    return tuple(c for c in bundle if c.issuer != c.subject)


def _directly_issued(leaf: x509.Certificate, issuers: tuple[x509.Certificate, ...]) -> bool:
    for issuer in issuers:
        if leaf.issuer != issuer.subject:
            continue
        try:
            leaf.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


def identify(
    listener: Listener, leaf_der: bytes, issuers: tuple[x509.Certificate, ...]
) -> Principal:
    """The principal of a client whose chain OpenSSL has already verified.

    The direct-issuer check matters because both listeners' trust stores end at the same
    manufacturer root: a secondary certificate sent with its site CA as intermediate would
    otherwise chain to the root on the registration listener. Raises ``BrokerError``.
    """
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError as exc:
        raise BrokerError("client certificate is not DER") from exc
    if not _directly_issued(leaf, issuers):
        raise BrokerError(f"client certificate is not issued by a {listener.value} CA")
    if listener is Listener.OPERATIONAL and _common_name(leaf) == REGISTRAR_IDENTITY:
        return service_principal()
    try:
        device_id = device_id_from_certificate(leaf)
    except TrustCoreError as exc:
        raise BrokerError(f"client certificate has no device identity: {exc.message}") from exc
    return device_principal(device_id, listener)


# ------------------------------------------------------------------------------ TLS


@dataclass
class ListenerTls:
    """The context given to the listening socket, and the newest one (same files, freshly
    read CRLs) that ``sni_callback`` switches every new handshake onto."""

    listener: Listener
    base: ssl.SSLContext
    current: ssl.SSLContext
    issuers: tuple[x509.Certificate, ...]


def _verify_flags(listener: Listener) -> ssl.VerifyFlags:
    # Registration: the chain goes up to the root, and every link is checked against its
    # issuer's CRL (a revoked station CA cuts all its devices). Operational: the site CA
    # alone is the trust anchor (PARTIAL_CHAIN; the root must not be trusted there, or
    # factory certificates would pass), and only the leaf is checked against the site CRL.
    if listener is Listener.REGISTRATION:
        return ssl.VERIFY_CRL_CHECK_CHAIN | ssl.VERIFY_X509_STRICT
    return ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT


_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.*?-----END X509 CRL-----\r?\n?", re.DOTALL)


def _operational_crl_file(settings: BrokerSettings) -> Path:
    """The CRLs of the operational CAs only (the site CA CRLs the registrar keeps fresh),
    in a private file of the work directory: the operational listener must not depend on
    anything HQ signs (the root CRL goes stale when a site hears nothing from HQ for a
    year; with a leaf-only check it is not consulted anyway, this makes it explicit)."""
    tls = settings.tls
    subjects = {c.subject for c in load_pem_certificates(tls.operational_cas)}
    try:
        blocks = _CRL_BLOCK.findall(tls.crl_file.read_bytes())
        own = [b for b in blocks if x509.load_pem_x509_crl(b).issuer in subjects]
    except (OSError, ValueError) as exc:
        raise BrokerError(f"cannot read the CRL file {tls.crl_file}: {exc}") from exc
    if not own:
        raise BrokerError("no CRL of an operational CA: every LDevID would be refused")
    settings.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = settings.workdir / "operational-crls.pem"
    try:
        write_private_file(target, b"".join(own), overwrite=True)
    except KeystoreError as exc:
        raise BrokerError(str(exc)) from exc
    return target


# OpenSSL constants (ssl.h) for the one setting Python's ssl module does not expose.
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_OFF = 0


def _libssl() -> ctypes.CDLL:
    """The libssl that Python's ``_ssl`` is linked against (symbols resolve through it)."""
    lib = ctypes.CDLL(_ssl.__file__)
    lib.OpenSSL_version_num.restype = ctypes.c_ulong
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    return lib


def _disable_session_cache(ctx: ssl.SSLContext) -> None:
    """``SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF)``, which ``ssl`` lacks.

    Why: a resumed TLS 1.2 session (session id, server-side cache) skips certificate
    verification, so a device revoked after its first handshake would resume its old
    session without meeting the new CRL. Tickets are off by ``OP_NO_TICKET`` and
    ``num_tickets = 0``; the cache needs this call. The ``SSL_CTX *`` follows the object
    header in CPython's ``PySSLContext``; it is checked (same OpenSSL build, same options
    word) before use, and anything unexpected raises: the broker does not start rather
    than run with resumption on.
    """
    lib = _libssl()
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise BrokerError("ssl and the loaded libssl differ: cannot turn off session reuse")
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        raise BrokerError("cannot reach the SSL_CTX of a context: session reuse stays off?")
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) != _SSL_SESS_CACHE_OFF:
        raise BrokerError("OpenSSL kept its session cache on")


def _apply_tls_policy(ctx: ssl.SSLContext) -> None:
    """``broker_config.tls_policy`` on a server context: TLS 1.2 minimum (1.3 preferred, as
    the highest both sides offer), AEAD suites only, no session resumption of any kind,
    and an alert to the client when its handshake is refused (:class:`_AlertingSSLObject`)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3: OpenSSL's default suites = TLS13_CIPHERSUITES
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0
    _disable_session_cache(ctx)
    ctx.sslobject_class = _AlertingSSLObject


class _AlertingSSLObject(ssl.SSLObject):
    """A server-side ``SSLObject`` whose refused handshakes reach the client as a TLS alert.

    asyncio's SSL transport aborts the socket as soon as ``do_handshake`` raises, and the
    alert OpenSSL wrote into the outgoing buffer (``certificate revoked``, ``unknown CA``,
    ``handshake failure``...) was never sent: a refused device saw a bare connection reset
    and could not tell a revocation from a network fault. Here a refusal is logged (with
    OpenSSL's reason: the registrar's trace of why a device was turned away) and held back
    for one round: ``do_handshake`` reports "want read", on which asyncio flushes the
    outgoing buffer (the alert); the next call — more data from the client, or its close —
    raises the refusal and the connection ends as before. A client that neither sends nor
    closes is cut by the handshake timeout.
    """

    _refusal: ssl.SSLError | None = None

    def do_handshake(self) -> None:
        if self._refusal is not None:
            raise self._refusal
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._refusal = exc
            log.warning("refused a TLS handshake: %s", _refusal_reason(exc))
            raise ssl.SSLWantReadError("refusal alert pending") from exc


def _refusal_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"client certificate: {exc.verify_message} (X509 error {exc.verify_code})"
        if exc.verify_code == _X509_V_ERR_UNABLE_TO_GET_CRL:
            reason += (
                "; the site holds no CRL of its issuer (a station CA without a CRL from HQ:"
                " its devices are refused until HQ sends one)"
            )
        return reason
    return str(exc.reason or exc)


_X509_V_ERR_UNABLE_TO_GET_CRL = 3


def warn_issuers_without_crl(
    settings: BrokerSettings, issuers: tuple[x509.Certificate, ...]
) -> None:
    """Log each registration issuer (station CA) the CRL file has no CRL of: OpenSSL refuses
    every device of it ("unable to get certificate CRL", alert ``unknown_ca`` to the device),
    and the operator should know why before the first device calls."""
    try:
        blocks = _CRL_BLOCK.findall(settings.tls.crl_file.read_bytes())
        have = {x509.load_pem_x509_crl(b).issuer for b in blocks}
    except (OSError, ValueError):
        return  # build_context reports an unreadable file
    for ca in issuers:
        if ca.subject not in have:
            log.warning(
                "no CRL of %s (HQ sent none): the registration listener refuses its devices "
                "until a site bundle or revocation list brings one",
                ca.subject.rfc4514_string(),
            )


def build_context(settings: BrokerSettings, listener: Listener) -> ssl.SSLContext:
    tls = settings.tls
    cafile = tls.registration_cas if listener is Listener.REGISTRATION else tls.operational_cas
    crl_file = (
        tls.crl_file if listener is Listener.REGISTRATION else _operational_crl_file(settings)
    )
    try:
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in tls.server_key.read_bytes()
    except OSError as exc:
        raise BrokerError(f"cannot read the broker key {tls.server_key}: {exc}") from exc
    if not encrypted:
        raise BrokerError(f"the broker key {tls.server_key} must be encrypted PKCS#8")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_tls_policy(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        # Encrypted PKCS#8 only: the passphrase decrypts it in memory, never on disk.
        ctx.load_cert_chain(tls.server_cert, tls.server_key, password=tls.server_key_passphrase)
        ctx.load_verify_locations(cafile=cafile)
        ctx.load_verify_locations(cafile=crl_file)  # PEM CRLs land in the same store
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"cannot build the {listener.value} TLS context: {exc}") from exc
    ctx.verify_flags = _verify_flags(listener)
    return ctx
