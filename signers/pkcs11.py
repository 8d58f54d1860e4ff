"""P-256 signing keys held in a PKCS#11 token (an HSM, a smart card, SoftHSM2 in tests).

The manufacturer root CA key and the approvers' keys can live in a token so that the private
scalar never exists in host memory: the key is generated inside the token as sensitive and
non-extractable, found again by its label, and every signature is computed by the token.
:class:`Pkcs11Key` satisfies :class:`trustcore.keys.Signer`; its :meth:`Pkcs11Key.private_key`
is an ``EllipticCurvePrivateKey`` that forwards ``sign`` to the token, so ``cryptography``'s
certificate, CRL and CSR builders sign with it directly (the same approach as
``tpm2_pytss.cryptography.tpm_ecc_private_key``).

Digests are computed in software and the token is asked for raw ``CKM_ECDSA``: SoftHSM 2.6
and many HSMs have no ``CKM_ECDSA_SHA256``, and hashing public data outside the token costs
no secrecy. The token returns ``r || s``; it is re-encoded as the DER ``Ecdsa-Sig-Value``
that X.509 and :class:`trustcore.keys.Signer` use.

PINs are taken from the caller (read them with :func:`signers.software.passphrase_from_env`
or :func:`signers.software.passphrase_from_file`), never from the command line.

PKCS#11 login state belongs to the whole process, not to one session: a second login to the
same token fails and a logout ends every session. Open one :class:`Pkcs11Token` per token and
take several keys from it (:meth:`Pkcs11Token.key`); :meth:`Pkcs11Key.open` is the shortcut
for a process that uses one key of a token.

Errors (all derive from :class:`signers.errors.SignerError`)::

    SignerError
    └── Pkcs11Error                    module cannot be loaded, token call failed, closed
        ├── Pkcs11PinError             PIN empty, wrong, locked or expired
        ├── Pkcs11TokenNotFoundError   no token (or several) with that label
        ├── Pkcs11KeyNotFoundError     no private key (or no public key) with that label
        └── Pkcs11KeyError             key is ambiguous, not P-256 ECDSA, exportable, or
            │                          asked for an algorithm it does not do
            └── KeyNotExportableError  private_bytes / private_numbers on a token key
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11exc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from signers.closing import Closing
from signers.errors import SignerError

__all__ = [
    "SOFTHSM2_MODULE",
    "KeyNotExportableError",
    "Pkcs11Error",
    "Pkcs11Key",
    "Pkcs11KeyError",
    "Pkcs11KeyNotFoundError",
    "Pkcs11PinError",
    "Pkcs11PrivateKey",
    "Pkcs11Token",
    "Pkcs11TokenNotFoundError",
]

#: Where Debian's ``softhsm2`` package installs its PKCS#11 module.
SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

# DER of the named-curve OID 1.2.840.10045.3.1.7 (secp256r1), as CKA_EC_PARAMS holds it.
_P256_PARAMS = encode_named_curve_parameters("secp256r1")
_P256_RAW_SIG_LEN = 64
_P256_POINT_LEN = 65  # 0x04 || X || Y


class Pkcs11Error(SignerError):
    """The PKCS#11 module could not be loaded or the token refused or failed a call."""

    reason = "pkcs11_failed"


class Pkcs11PinError(Pkcs11Error):
    """The PIN is empty, wrong, locked or expired."""

    reason = "bad_pin"


class Pkcs11TokenNotFoundError(Pkcs11Error):
    """No token, or more than one, carries the requested label."""

    reason = "token_not_found"


class Pkcs11KeyNotFoundError(Pkcs11Error):
    """No key with the requested label is in the token."""

    reason = "key_not_found"


class Pkcs11KeyError(Pkcs11Error):
    """The key exists but is unfit: ambiguous label, wrong type or curve, exportable, or
    asked for an operation or algorithm it does not support."""

    reason = "unfit_key"


class KeyNotExportableError(Pkcs11KeyError):
    """A token key's private scalar cannot be read: that is the point of the token."""

    reason = "not_exportable"


_PIN_ERRORS: tuple[type[Exception], ...] = (
    p11exc.PinIncorrect,
    p11exc.PinInvalid,
    p11exc.PinLenRange,
    p11exc.PinLocked,
    p11exc.PinExpired,
    p11exc.UserPinNotInitialized,
)
# A session that lost its login (another logout in this process) fails signing like a bad PIN.
_SIGN_AUTH_ERRORS: tuple[type[Exception], ...] = (*_PIN_ERRORS, p11exc.UserNotLoggedIn)


def _pin_text(pin: str | bytes) -> str:
    """PKCS#11 PINs are UTF-8 strings; an empty PIN is refused rather than sent (fail closed)."""
    if isinstance(pin, bytes):
        try:
            pin = pin.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Pkcs11PinError("PIN is not valid UTF-8") from exc
    if not pin:
        raise Pkcs11PinError("PIN is empty")
    return pin


def _public_key_from_point(ec_point: bytes) -> ec.EllipticCurvePublicKey:
    """Decode CKA_EC_POINT: a DER OCTET STRING per PKCS#11 v2.40, raw from some older tokens."""
    point = ec_point
    if len(point) == _P256_POINT_LEN + 2 and point[:2] == bytes((0x04, _P256_POINT_LEN)):
        point = point[2:]
    if len(point) != _P256_POINT_LEN:
        raise Pkcs11KeyError(f"token returned an EC point of {len(ec_point)} bytes, not P-256")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise Pkcs11KeyError("token returned an invalid P-256 point") from exc


class Pkcs11Token(Closing):
    """One logged-in session to one token; the source of :class:`Pkcs11Key` handles.

    A single session is shared by every key taken from this token and is guarded by a lock:
    a PKCS#11 session runs one operation at a time, and python-pkcs11 releases the GIL during
    token calls, so unguarded threads would interleave ``C_SignInit``/``C_Sign``.
    """

    def __init__(self, session: pkcs11.Session, token_label: str, *, writable: bool) -> None:
        self._session: pkcs11.Session | None = session
        self._label = token_label
        self._writable = writable
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        module: str | os.PathLike[str],
        token_label: str,
        pin: str | bytes,
        *,
        writable: bool = False,
    ) -> Pkcs11Token:
        """Load ``module``, find the token labelled ``token_label`` and log in as user.

        ``writable`` opens a read-write session, needed only to generate keys; signing
        works in a read-only session, which cannot create or destroy token objects.
        """
        pin_text = _pin_text(pin)
        module_path = Path(module)
        if not module_path.is_file():
            raise Pkcs11Error(f"PKCS#11 module {module_path} does not exist")
        try:
            lib = pkcs11.lib(str(module_path))
        except p11exc.PKCS11Error as exc:
            raise Pkcs11Error(f"cannot load PKCS#11 module {module_path}: {exc}") from exc
        try:
            token = lib.get_token(token_label=token_label)
        except p11exc.NoSuchToken as exc:
            raise Pkcs11TokenNotFoundError(
                f"no token labelled {token_label!r} in {module_path}"
            ) from exc
        except p11exc.MultipleTokensReturned as exc:
            raise Pkcs11TokenNotFoundError(
                f"several tokens are labelled {token_label!r} in {module_path}"
            ) from exc
        except p11exc.PKCS11Error as exc:
            raise Pkcs11Error(f"cannot list tokens of {module_path}: {exc!r}") from exc
        try:
            session = token.open(rw=writable, user_pin=pin_text)
        except _PIN_ERRORS as exc:
            raise Pkcs11PinError(
                f"login to token {token_label!r} refused: {type(exc).__name__}"
            ) from exc
        except p11exc.UserAlreadyLoggedIn as exc:
            raise Pkcs11Error(
                f"token {token_label!r} is already logged in by this process: "
                "share one Pkcs11Token for all its keys"
            ) from exc
        except p11exc.PKCS11Error as exc:
            raise Pkcs11Error(f"cannot open a session on token {token_label!r}: {exc!r}") from exc
        return cls(session, token_label, writable=writable)

    @property
    def label(self) -> str:
        """The token's label."""
        return self._label

    def _live_session(self) -> pkcs11.Session:
        if self._session is None:
            raise Pkcs11Error(f"session to token {self._label!r} is closed")
        return self._session

    def key(self, key_label: str, *, allow_extractable: bool = False) -> Pkcs11Key:
        """Find the P-256 key pair labelled ``key_label``.

        The private key must be unique, EC on P-256, allowed to sign and (unless
        ``allow_extractable``) sensitive and never extractable: a root key that could be
        exported is refused rather than trusted as if it were held by the token. The public
        and private objects are proven to be one pair by a test signature.
        """
        with self._lock:
            session = self._live_session()
            try:
                privs = list(
                    session.get_objects(
                        {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: key_label}
                    )
                )
                pubs = list(
                    session.get_objects(
                        {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: key_label}
                    )
                )
            except p11exc.PKCS11Error as exc:
                raise Pkcs11Error(f"cannot search token {self._label!r}: {exc!r}") from exc
            if not privs:
                raise Pkcs11KeyNotFoundError(
                    f"no private key labelled {key_label!r} in token {self._label!r}"
                )
            if len(privs) > 1 or len(pubs) > 1:
                raise Pkcs11KeyError(
                    f"label {key_label!r} names several keys in token {self._label!r}"
                )
            if not pubs:
                raise Pkcs11KeyNotFoundError(
                    f"no public key labelled {key_label!r} in token {self._label!r}"
                )
            priv, pub = privs[0], pubs[0]
            try:
                attrs = priv.get_attributes(
                    [
                        Attribute.KEY_TYPE,
                        Attribute.EC_PARAMS,
                        Attribute.SIGN,
                        Attribute.SENSITIVE,
                        Attribute.EXTRACTABLE,
                    ]
                )
                ec_point = pub[Attribute.EC_POINT]
            except p11exc.PKCS11Error as exc:
                raise Pkcs11Error(f"cannot read key {key_label!r}: {exc!r}") from exc
        if not isinstance(priv, SignMixin):
            raise Pkcs11KeyError(f"object {key_label!r} is not a signing key")
        if attrs[Attribute.KEY_TYPE] != KeyType.EC or attrs[Attribute.EC_PARAMS] != _P256_PARAMS:
            raise Pkcs11KeyError(f"key {key_label!r} is not an EC P-256 key")
        if not attrs[Attribute.SIGN]:
            raise Pkcs11KeyError(f"key {key_label!r} is not allowed to sign (CKA_SIGN false)")
        if not allow_extractable and (
            not attrs[Attribute.SENSITIVE] or attrs[Attribute.EXTRACTABLE]
        ):
            raise Pkcs11KeyError(
                f"key {key_label!r} is extractable or not sensitive; refusing to use it"
            )
        key = Pkcs11Key(self, key_label, priv, _public_key_from_point(bytes(ec_point)))
        key._check_pair()
        return key

    def generate_key(self, key_label: str) -> Pkcs11Key:
        """Generate a P-256 key pair inside the token and store it under ``key_label``.

        The private key is sensitive, non-extractable, private (login needed) and may only
        sign: no derive, decrypt or unwrap, so a stolen PIN still cannot copy it out or use it
        for anything but signatures. Both objects get CKA_ID = :func:`trustcore.keys.key_id`
        of the public key, so other PKCS#11 tools pair them the usual way. A label already in
        use is refused: a second key under one label would make lookups ambiguous.
        """
        if not key_label:
            raise Pkcs11KeyError("key label is empty")
        with self._lock:
            session = self._live_session()
            if not self._writable:
                raise Pkcs11Error(
                    f"session to token {self._label!r} is read-only; open it with writable=True"
                )
            try:
                existing = list(session.get_objects({Attribute.LABEL: key_label}))
            except p11exc.PKCS11Error as exc:
                raise Pkcs11Error(f"cannot search token {self._label!r}: {exc!r}") from exc
            if existing:
                raise Pkcs11KeyError(
                    f"label {key_label!r} is already used in token {self._label!r}"
                )
            try:
                params = session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: _P256_PARAMS}, local=True
                )
                pub, priv = params.generate_keypair(
                    store=True,
                    label=key_label,
                    public_template={
                        Attribute.VERIFY: True,
                        Attribute.ENCRYPT: False,
                        Attribute.WRAP: False,
                        Attribute.DERIVE: False,
                    },
                    private_template={
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.PRIVATE: True,
                        Attribute.SIGN: True,
                        Attribute.DECRYPT: False,
                        Attribute.UNWRAP: False,
                        Attribute.DERIVE: False,
                    },
                )
                if not isinstance(priv, SignMixin):
                    raise Pkcs11KeyError(f"token made {key_label!r} without a sign interface")
                public_key = _public_key_from_point(bytes(pub[Attribute.EC_POINT]))
                ident = _key_id(public_key)
                pub[Attribute.ID] = ident
                priv[Attribute.ID] = ident
            except p11exc.PKCS11Error as exc:
                raise Pkcs11Error(
                    f"cannot generate key {key_label!r} in token {self._label!r}: {exc!r}"
                ) from exc
        return Pkcs11Key(self, key_label, priv, public_key)

    def _sign_digest(self, key_label: str, priv: SignMixin, digest: bytes) -> bytes:
        """Raw CKM_ECDSA over a SHA-256 digest, returned as DER."""
        with self._lock:
            self._live_session()
            try:
                raw = priv.sign(digest, mechanism=Mechanism.ECDSA)
            except _SIGN_AUTH_ERRORS as exc:
                raise Pkcs11PinError(
                    f"token {self._label!r} refused to sign with {key_label!r}: "
                    f"{type(exc).__name__}"
                ) from exc
            except p11exc.PKCS11Error as exc:
                raise Pkcs11Error(
                    f"token {self._label!r} failed to sign with {key_label!r}: {exc!r}"
                ) from exc
        if len(raw) != _P256_RAW_SIG_LEN:
            raise Pkcs11Error(f"token returned a {len(raw)}-byte signature, expected 64")
        half = _P256_RAW_SIG_LEN // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def close(self) -> None:
        """Log out and close the session; keys taken from this token stop working."""
        with self._lock:
            session, self._session = self._session, None
            if session is None:
                return
            try:
                session.close()
            except p11exc.PKCS11Error as exc:
                raise Pkcs11Error(f"cannot close session to token {self._label!r}") from exc


def _key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    # Same value as trustcore.keys.key_id; kept local so signers does not import the core.
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


class Pkcs11Key(Closing):
    """A P-256 key in a PKCS#11 token: a :class:`trustcore.keys.Signer`.

    Obtain one with :meth:`Pkcs11Token.key` / :meth:`Pkcs11Token.generate_key`, or with the
    :meth:`open` / :meth:`generate` shortcuts, which own their token session and close it in
    :meth:`close`.
    """

    def __init__(
        self,
        token: Pkcs11Token,
        label: str,
        priv: SignMixin,
        public_key: ec.EllipticCurvePublicKey,
    ) -> None:
        self._token = token
        self._label = label
        self._priv = priv
        self._public_key = public_key
        self._owns_token = False

    @classmethod
    def open(
        cls,
        module: str | os.PathLike[str],
        token_label: str,
        key_label: str,
        pin: str | bytes,
        *,
        allow_extractable: bool = False,
    ) -> Pkcs11Key:
        """Log in to the token and find ``key_label``; :meth:`close` logs out again."""
        token = Pkcs11Token.open(module, token_label, pin)
        try:
            key = token.key(key_label, allow_extractable=allow_extractable)
        except BaseException:
            token.close()
            raise
        key._owns_token = True
        return key

    @classmethod
    def generate(
        cls,
        module: str | os.PathLike[str],
        token_label: str,
        key_label: str,
        pin: str | bytes,
    ) -> Pkcs11Key:
        """Log in, generate a new key pair labelled ``key_label`` in the token, return it."""
        token = Pkcs11Token.open(module, token_label, pin, writable=True)
        try:
            key = token.generate_key(key_label)
        except BaseException:
            token.close()
            raise
        key._owns_token = True
        return key

    @property
    def label(self) -> str:
        """The key's CKA_LABEL in the token."""
        return self._label

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def private_key(self) -> Pkcs11PrivateKey:
        """An ``EllipticCurvePrivateKey`` whose ``sign`` runs in the token."""
        return Pkcs11PrivateKey(self)

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA-SHA256 signature of ``data``, computed by the token."""
        return self._token._sign_digest(self._label, self._priv, hashlib.sha256(data).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA signature of an already computed SHA-256 ``digest``."""
        if len(digest) != hashes.SHA256.digest_size:
            raise Pkcs11KeyError(f"SHA-256 digest must be 32 bytes, got {len(digest)}")
        return self._token._sign_digest(self._label, self._priv, digest)

    def _check_pair(self) -> None:
        """Prove the private object matches the public one before anything trusts them."""
        challenge = os.urandom(32)
        try:
            self._public_key.verify(self.sign(challenge), challenge, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise Pkcs11KeyError(
                f"public and private objects labelled {self._label!r} are not one key pair"
            ) from exc

    def close(self) -> None:
        """Close the token session if this key owns it (made by :meth:`open`/:meth:`generate`)."""
        if self._owns_token:
            self._token.close()

    def __repr__(self) -> str:
        return f"Pkcs11Key(token={self._token.label!r}, label={self._label!r})"


class Pkcs11PrivateKey(ec.EllipticCurvePrivateKey):
    """``cryptography``'s private-key interface over a token key.

    Certificate, CRL and CSR builders call ``sign(data, ECDSA(SHA256()))``; the digest is
    taken here and the token signs it. Export (``private_bytes``, ``private_numbers``) and
    ECDH raise: the token holds the scalar and the key was made for signing only.
    """

    def __init__(self, key: Pkcs11Key) -> None:
        self._key = key

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        data = bytes(data)
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise Pkcs11KeyError(f"unsupported signature algorithm {signature_algorithm!r}")
        if signature_algorithm.deterministic_signing:
            raise Pkcs11KeyError("the token does not do deterministic (RFC 6979) ECDSA")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            if not isinstance(algorithm._algorithm, hashes.SHA256):  # no public accessor
                raise Pkcs11KeyError("only SHA-256 prehashed digests are supported")
            return self._key.sign_digest(data)
        if not isinstance(algorithm, hashes.SHA256):
            raise Pkcs11KeyError(f"only ECDSA with SHA-256 is supported, not {algorithm.name}")
        return self._key.sign(data)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise Pkcs11KeyError(f"token key {self._key.label!r} is for signing only (no ECDH)")

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise KeyNotExportableError(f"token key {self._key.label!r} is not exportable")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise KeyNotExportableError(f"token key {self._key.label!r} is not exportable")

    def __copy__(self) -> Pkcs11PrivateKey:
        return Pkcs11PrivateKey(self._key)

    def __deepcopy__(self, memo: dict[Any, Any]) -> Pkcs11PrivateKey:
        # A token handle cannot be duplicated; a deep copy shares the session like a copy.
        return Pkcs11PrivateKey(self._key)

    def __repr__(self) -> str:
        return f"Pkcs11PrivateKey({self._key!r})"
