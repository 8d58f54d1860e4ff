"""Mutual TLS with a client key that never leaves the TPM, for Python's ``ssl``.

Python's ``ssl`` can only load a client key from a file. A TPM key has no such file, so this
module gives the ``SSL_CTX`` behind an :class:`ssl.SSLContext` a key through OpenSSL itself
(ctypes): a public-only P-256 ``EC_KEY`` whose ``EC_KEY_METHOD`` *sign* callback runs
TPM2_Sign on the device's key (:meth:`signers.tpm.TpmKey.sign_digest`). OpenSSL computes the
handshake digest, key exchange and record encryption in software as always and calls the
callback once per handshake, in the CertificateVerify step, with the 32-byte SHA-256 digest;
the TPM returns the ECDSA signature. No private key material exists outside the TPM, no
key file is written, and no TPM object slot is used beyond the key itself (what was tried
and measured: ``docs/registration.md``, "Device TLS"; ``bench/tpm_tls.py``).

Why not the tpm2-openssl provider: it moves the handshake's hashing into the TPM (one object
slot per hash: a raw swtpm has three), hides P-256 from TLS 1.2's groups, and then runs
every ``hashlib.sha256`` of the process in the TPM.

How the pieces are bound, and the checks that fail closed (:class:`TlsBindingError`):

* **The same OpenSSL as ``ssl``.** Symbols are resolved through the handle of ``_ssl``'s
  extension module (``dlsym`` on it searches the libraries it links), and the library named
  ``libcrypto.so.3`` must be that very instance (same address of ``OpenSSL_version_num``)
  and report the version ``ssl.OPENSSL_VERSION_NUMBER`` reports. An ``EC_KEY`` from another
  copy of OpenSSL in an ``SSL_CTX`` of this one would be memory corruption, not an error.
* **The ``SSL_CTX *`` of the context.** CPython's ``PySSLContext`` stores it right after the
  object header; the address read there is accepted only if ``SSL_CTX_get_options`` and
  ``SSL_CTX_get_verify_mode`` on it give what the ``SSLContext`` reports.
* **The key matches the certificate.** The public point comes from the TPM key's public
  area; the leaf certificate must carry the same key (checked here and again by
  ``SSL_CTX_check_private_key``).
* **One signature algorithm.** The TPM key's scheme is pinned to ECDSA-SHA256, so the
  client offers only ``ECDSA+SHA256``; any other digest length makes the callback refuse
  (the handshake fails with a clean ``ssl.SSLError``).

Lifetimes: the ``EC_KEY_METHOD`` and the ctypes callbacks are created once per process and
kept referenced by this module forever (OpenSSL holds raw pointers to them). Each
``EC_KEY`` maps to its :class:`~signers.tpm.TpmKey` in a registry keyed by the ``EC_KEY``
address; the method's *copy* callback registers a copy, its *finish* callback (run by
``EC_KEY_free`` when the last ``SSL_CTX``/``SSL`` using the key goes) removes the entry. An
``EC_KEY`` missing from the registry signs nothing.

``EC_KEY_METHOD`` is deprecated in OpenSSL 3.0 but present; the replacement (a provider) is
the road the paragraph above explains we do not take.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import ssl
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signers.errors import SignerError, TlsBindingError
from signers.tpm import TpmKey, TpmKeyUsage

__all__ = [
    "OpenSslBinding",
    "bind_openssl",
    "bound_keys",
    "check_same_openssl",
    "load_tpm_ssl_identity",
    "tpm_client_context",
]

log = logging.getLogger(__name__)

#: The name the system's libcrypto is loaded by (the one ``_ssl`` links on Debian 12).
LIBCRYPTO = "libcrypto.so.3"

_NID_P256 = 415  # NID_X9_62_prime256v1
_SSL_CTRL_CHAIN_CERT = 89  # SSL_CTX_add1_chain_cert(ctx, x) == SSL_CTX_ctrl(ctx, 89, 1, x)
_SSL_CTRL_SET_CLIENT_SIGALGS_LIST = 102
_SHA256_LEN = 32
#: What the client offers in signature_algorithms: the TPM key's one scheme.
CLIENT_SIGALGS = b"ECDSA+SHA256"

_vp = ctypes.c_void_p
_SIGN = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,  # type (unused by ECDSA)
    ctypes.POINTER(ctypes.c_ubyte),  # dgst
    ctypes.c_int,  # dlen
    ctypes.POINTER(ctypes.c_ubyte),  # sig (ECDSA_size bytes)
    ctypes.POINTER(ctypes.c_uint),  # siglen
    _vp,  # kinv
    _vp,  # r
    _vp,  # eckey
)
_FINISH = ctypes.CFUNCTYPE(None, _vp)
_COPY = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp)

# (name, restype, argtypes) of every OpenSSL function used here.
_FUNCTIONS: tuple[tuple[str, object, list[object]], ...] = (
    ("OpenSSL_version_num", ctypes.c_ulong, []),
    ("ERR_clear_error", None, []),
    ("ERR_get_error", ctypes.c_ulong, []),
    ("ERR_error_string_n", None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
    ("EC_KEY_OpenSSL", _vp, []),
    ("EC_KEY_METHOD_new", _vp, [_vp]),
    ("EC_KEY_METHOD_get_sign", None, [_vp, _vp, _vp, _vp]),
    ("EC_KEY_METHOD_set_sign", None, [_vp, _SIGN, _vp, _vp]),
    ("EC_KEY_METHOD_get_init", None, [_vp, _vp, _vp, _vp, _vp, _vp, _vp]),
    ("EC_KEY_METHOD_set_init", None, [_vp, _vp, _FINISH, _COPY, _vp, _vp, _vp]),
    ("EC_KEY_new_by_curve_name", _vp, [ctypes.c_int]),
    ("EC_KEY_set_method", ctypes.c_int, [_vp, _vp]),
    ("EC_KEY_free", None, [_vp]),
    ("o2i_ECPublicKey", _vp, [ctypes.POINTER(_vp), ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
    ("EVP_PKEY_new", _vp, []),
    ("EVP_PKEY_set1_EC_KEY", ctypes.c_int, [_vp, _vp]),
    ("EVP_PKEY_free", None, [_vp]),
    ("d2i_X509", _vp, [_vp, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
    ("X509_free", None, [_vp]),
    ("SSL_CTX_get_options", ctypes.c_uint64, [_vp]),
    ("SSL_CTX_get_verify_mode", ctypes.c_int, [_vp]),
    ("SSL_CTX_use_certificate", ctypes.c_int, [_vp, _vp]),
    ("SSL_CTX_use_PrivateKey", ctypes.c_int, [_vp, _vp]),
    ("SSL_CTX_check_private_key", ctypes.c_int, [_vp]),
    ("SSL_CTX_ctrl", ctypes.c_long, [_vp, ctypes.c_int, ctypes.c_long, _vp]),
)


@dataclass(frozen=True)
class OpenSslBinding:
    """The OpenSSL functions this module calls, resolved in the library ``ssl`` uses."""

    library: str
    version: int
    functions: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.functions[name]
        except KeyError:
            raise AttributeError(name) from None

    def last_error(self) -> str:
        """OpenSSL's queued errors as one line (and the queue emptied)."""
        messages = []
        while code := self.functions["ERR_get_error"]():
            buf = ctypes.create_string_buffer(256)
            self.functions["ERR_error_string_n"](code, buf, len(buf))
            messages.append(buf.value.decode("ascii", "replace"))
        return "; ".join(messages) or "no OpenSSL error queued"


def check_same_openssl(
    python_version: int, library_version: int, same_instance: bool, library: str
) -> None:
    """The binding rule, apart from the loading: raise unless ``library`` is the very
    OpenSSL ``ssl`` runs on (same loaded instance, same version)."""
    if not same_instance:
        raise TlsBindingError(
            f"{library} is not the OpenSSL instance Python's ssl module uses: "
            "a TPM key cannot be installed across two copies of OpenSSL"
        )
    if python_version != library_version:
        raise TlsBindingError(
            f"OpenSSL version mismatch: ssl reports 0x{python_version:x}, "
            f"{library} reports 0x{library_version:x}"
        )
    if library_version >> 28 != 3:
        raise TlsBindingError(
            f"OpenSSL 3.x needed for the EC_KEY_METHOD binding, found 0x{library_version:x}"
        )


def _symbol_address(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), _vp).value or 0


def bind_openssl(library: str = LIBCRYPTO) -> OpenSslBinding:
    """Resolve the functions through ``_ssl``'s own handle and check that ``library`` (the
    libcrypto this project means to bind) is that same loaded instance and version.

    Raises :class:`TlsBindingError` with a one-line reason: not CPython, ``_ssl`` statically
    linked or missing symbols, a different OpenSSL instance or version.
    """
    if sys.implementation.name != "cpython":
        raise TlsBindingError("the TPM TLS binding reads CPython's SSLContext layout")
    import _ssl

    try:
        via_ssl = ctypes.CDLL(_ssl.__file__)
        named = ctypes.CDLL(library)
    except OSError as exc:
        raise TlsBindingError(f"cannot load {library} or the _ssl module: {exc}") from exc
    functions: dict[str, Any] = {}
    try:
        for name, restype, argtypes in _FUNCTIONS:
            fn = getattr(via_ssl, name)
            fn.restype = restype
            fn.argtypes = argtypes
            functions[name] = fn
        same = _symbol_address(via_ssl, "OpenSSL_version_num") == _symbol_address(
            named, "OpenSSL_version_num"
        )
        library_version = int(named.OpenSSL_version_num())
    except AttributeError as exc:
        raise TlsBindingError(f"OpenSSL symbol not reachable through ssl: {exc}") from exc
    check_same_openssl(ssl.OPENSSL_VERSION_NUMBER, library_version, same, library)
    return OpenSslBinding(library, library_version, functions)


# ------------------------------------------------------------------ the EC_KEY_METHOD

_registry: dict[int, TpmKey] = {}
_registry_lock = threading.Lock()


def bound_keys() -> int:
    """How many OpenSSL EC_KEYs are bound to TPM keys now (each goes with the last
    ``SSL_CTX`` or connection using it): a leak shows here."""
    with _registry_lock:
        return len(_registry)


def _sign(
    _type: int,
    dgst: ctypes._Pointer[ctypes.c_ubyte],
    dlen: int,
    sig: ctypes._Pointer[ctypes.c_ubyte],
    siglen: ctypes._Pointer[ctypes.c_uint],
    _kinv: int | None,
    _r: int | None,
    eckey: int | None,
) -> int:
    """OpenSSL's ECDSA_sign for our EC_KEYs: TPM2_Sign over the digest, DER into ``sig``.
    Returns 0 (OpenSSL fails the handshake) on anything unexpected, never raises."""
    try:
        with _registry_lock:
            key = _registry.get(eckey or 0)
        if key is None:
            log.error("TPM TLS: sign requested for an EC_KEY this process did not bind")
            return 0
        if dlen != _SHA256_LEN:
            log.error("TPM TLS: refused a %d-byte digest (the key signs SHA-256 only)", dlen)
            return 0
        der = key.sign_digest(ctypes.string_at(dgst, dlen))
        if len(der) > 72:  # ECDSA_size of a P-256 key: the caller's buffer
            log.error("TPM TLS: signature longer than ECDSA_size")
            return 0
        ctypes.memmove(sig, der, len(der))
        siglen[0] = len(der)
        return 1
    except BaseException as exc:  # an exception must not unwind through OpenSSL
        log.error("TPM TLS: TPM2_Sign for the handshake failed: %s", exc)
        return 0


def _finish(
    eckey: int | None,
    registry: dict[int, TpmKey] = _registry,
    lock: threading.Lock = _registry_lock,
) -> None:
    """EC_KEY_free of one of our keys. It may run while the interpreter shuts down (an
    SSLContext collected last), after this module's globals are gone: hence the bound
    defaults, and nothing that can raise."""
    try:
        with lock:
            registry.pop(eckey or 0, None)
    except BaseException:  # noqa: S110 - nothing to report to during shutdown
        pass


def _copy(
    dest: int | None,
    src: int | None,
    registry: dict[int, TpmKey] = _registry,
    lock: threading.Lock = _registry_lock,
) -> int:
    """EC_KEY_copy onto a new EC_KEY: it signs with the same TPM key."""
    try:
        with lock:
            key = registry.get(src or 0)
            if key is None:
                return 0
            registry[dest or 0] = key
            return 1
    except BaseException:
        return 0


@dataclass(frozen=True)
class _Method:
    binding: OpenSslBinding
    pointer: int
    # The C callbacks OpenSSL points at: referenced here (and the method cached) forever.
    callbacks: tuple[object, ...]


@cache
def _method() -> _Method:
    lib = bind_openssl()
    meth = lib.EC_KEY_METHOD_new(lib.EC_KEY_OpenSSL())
    if not meth:
        raise TlsBindingError(f"EC_KEY_METHOD_new failed: {lib.last_error()}")
    setup, sign_sig = _vp(), _vp()
    lib.EC_KEY_METHOD_get_sign(meth, None, ctypes.byref(setup), ctypes.byref(sign_sig))
    init, set_group, set_private, set_public = _vp(), _vp(), _vp(), _vp()
    lib.EC_KEY_METHOD_get_init(
        meth,
        ctypes.byref(init),
        None,
        None,
        ctypes.byref(set_group),
        ctypes.byref(set_private),
        ctypes.byref(set_public),
    )
    sign, finish, copy = _SIGN(_sign), _FINISH(_finish), _COPY(_copy)
    # OpenSSL keeps raw pointers to these thunks in a method that lives as long as the
    # process; an SSL_CTX freed during interpreter shutdown calls ``finish``. A reference
    # that no module teardown drops keeps them valid to the very end (freed thunks were a
    # segmentation fault at exit).
    for thunk in (sign, finish, copy):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(thunk))
    # sign_sig stays OpenSSL's: it would need the private scalar, which this key lacks, so
    # a caller going that way fails instead of signing with anything else.
    lib.EC_KEY_METHOD_set_sign(meth, sign, setup, sign_sig)
    lib.EC_KEY_METHOD_set_init(meth, init, finish, copy, set_group, set_private, set_public)
    return _Method(lib, meth, (sign, finish, copy))


# ------------------------------------------------------------------ the SSL_CTX


def _ssl_ctx_pointer(lib: OpenSslBinding, ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of ``ctx``: the first field after CPython's object header,
    accepted only if OpenSSL reads the same options and verify mode from it."""
    if not isinstance(ctx, ssl.SSLContext):
        raise TlsBindingError(f"expected an ssl.SSLContext, got {type(ctx).__name__}")
    pointer = _vp.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        raise TlsBindingError("the SSLContext has no SSL_CTX")
    verify = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[ctx.verify_mode]
    # SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT: the bits the verify mode sets
    if lib.SSL_CTX_get_options(pointer) != int(ctx.options) or (
        lib.SSL_CTX_get_verify_mode(pointer) & 3 != verify
    ):
        raise TlsBindingError("unexpected SSLContext layout: cannot locate its SSL_CTX")
    return pointer


def _d2i_x509(lib: OpenSslBinding, der: bytes) -> int:
    buf = ctypes.c_char_p(der)
    cert = lib.d2i_X509(None, ctypes.byref(buf), len(der))
    if not cert:
        raise TlsBindingError(f"OpenSSL cannot parse a certificate: {lib.last_error()}")
    return int(cert)


def _tpm_evp_pkey(method: _Method, key: TpmKey) -> int:
    """A new EVP_PKEY (caller frees) holding a public-only EC_KEY signed for by ``key``."""
    lib = method.binding
    eckey = lib.EC_KEY_new_by_curve_name(_NID_P256)
    if not eckey:
        raise TlsBindingError(f"EC_KEY_new_by_curve_name failed: {lib.last_error()}")
    pkey = None
    try:
        # The method goes on BEFORE the key enters an EVP_PKEY: OpenSSL then keeps it a
        # legacy key (never exported to the default provider, which would want the scalar)
        # and calls our sign with the digest.
        if lib.EC_KEY_set_method(eckey, method.pointer) != 1:
            raise TlsBindingError(f"EC_KEY_set_method failed: {lib.last_error()}")
        with _registry_lock:
            _registry[int(eckey)] = key
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        buf, out = ctypes.c_char_p(point), _vp(eckey)
        if not lib.o2i_ECPublicKey(ctypes.byref(out), ctypes.byref(buf), len(point)):
            raise TlsBindingError(f"cannot set the public point: {lib.last_error()}")
        pkey = lib.EVP_PKEY_new()
        if not pkey or lib.EVP_PKEY_set1_EC_KEY(pkey, eckey) != 1:
            raise TlsBindingError(f"cannot wrap the EC_KEY in an EVP_PKEY: {lib.last_error()}")
        result, pkey = int(pkey), None
        return result
    finally:
        if pkey:
            lib.EVP_PKEY_free(pkey)
        lib.EC_KEY_free(eckey)  # the EVP_PKEY holds its own reference (or none is left)


def load_tpm_ssl_identity(
    ctx: ssl.SSLContext, certificates: Sequence[x509.Certificate], key: TpmKey
) -> None:
    """Make ``ctx`` present ``certificates`` (leaf first, then issuers) with the TPM ``key``:
    the handshake's CertificateVerify is signed by TPM2_Sign. The counterpart of
    :func:`signers.software.load_ssl_identity` for keys that cannot be written anywhere.

    Raises :class:`TlsBindingError` (wrong key usage, certificate for another key, a
    different OpenSSL, OpenSSL refusing the pair).
    """
    if not isinstance(key, TpmKey) or key.usage is not TpmKeyUsage.SIGN:
        raise TlsBindingError("a TLS client key must be a TPM signing key")
    if not certificates:
        raise TlsBindingError("no client certificate to present")
    public = certificates[0].public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public != key.public_key():
        raise TlsBindingError("the leaf certificate does not carry this TPM key")
    method = _method()
    lib = method.binding
    pointer = _ssl_ctx_pointer(lib, ctx)
    lib.ERR_clear_error()
    certs = [_d2i_x509(lib, c.public_bytes(serialization.Encoding.DER)) for c in certificates]
    pkey = None
    try:
        if lib.SSL_CTX_use_certificate(pointer, certs[0]) != 1:
            raise TlsBindingError(f"OpenSSL refused the certificate: {lib.last_error()}")
        for issuer in certs[1:]:
            if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_CHAIN_CERT, 1, issuer) != 1:
                raise TlsBindingError(f"OpenSSL refused a chain certificate: {lib.last_error()}")
        pkey = _tpm_evp_pkey(method, key)
        if lib.SSL_CTX_use_PrivateKey(pointer, pkey) != 1:
            raise TlsBindingError(f"OpenSSL refused the TPM key: {lib.last_error()}")
        if lib.SSL_CTX_check_private_key(pointer) != 1:
            raise TlsBindingError(f"certificate and TPM key differ: {lib.last_error()}")
        if (
            lib.SSL_CTX_ctrl(
                pointer, _SSL_CTRL_SET_CLIENT_SIGALGS_LIST, 0, ctypes.c_char_p(CLIENT_SIGALGS)
            )
            != 1
        ):
            raise TlsBindingError(f"cannot restrict client sigalgs: {lib.last_error()}")
    finally:
        if pkey:
            lib.EVP_PKEY_free(pkey)  # the SSL_CTX holds its own reference
        for cert in certs:
            lib.X509_free(cert)  # likewise (use_certificate and add1 take references)


def tpm_client_context(
    certificates: Sequence[x509.Certificate], key: TpmKey, *, trust_pem: bytes
) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting ``trust_pem`` and presenting ``certificates``
    with the TPM ``key`` (hostname checking as :func:`ssl.create_default_context`)."""
    try:
        ctx = ssl.create_default_context(cadata=trust_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise SignerError(f"unusable trust anchors: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_tpm_ssl_identity(ctx, certificates, key)
    return ctx
