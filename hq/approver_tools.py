"""The approver's own tools (``hq approval approver init`` and ``sign``), run on the
approver's machine with the approver's key — an encrypted keystore or a PKCS#11 token; HQ
never sees it. Owns :class:`ApproverKeySource`, key creation, opening the key and signing
a request after the approver has read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from hq.approvals import QuorumRefused
from hq.errors import HqError, SecretError
from hq.home import read_secret
from signers.errors import SignerError
from signers.software import SoftwareKey
from trustcore.keys import Signer, key_id
from trustcore.quorum import (
    Approval,
    ApprovalRequest,
    sign_approval,
)
from trustcore.utctime import now_unix

__all__ = [
    "APPROVER_PASSPHRASE_ENV",
    "APPROVER_PIN_ENV",
    "ApproverKeySource",
    "approver_signer",
    "init_approver_key",
    "sign_request",
]

APPROVER_PASSPHRASE_ENV: Final = "DEVTRUST_APPROVER_PASSPHRASE"  # noqa: S105 (a name)
APPROVER_PIN_ENV: Final = "DEVTRUST_APPROVER_PIN"


@dataclass(frozen=True)
class ApproverKeySource:
    """Where an approver's key is: an encrypted keystore file, or a PKCS#11 token."""

    keystore: Path | None = None
    passphrase_file: Path | None = None
    pkcs11_module: str | None = None
    pkcs11_token: str | None = None
    pkcs11_key: str | None = None
    pin_file: Path | None = None

    def __post_init__(self) -> None:
        token = [self.pkcs11_module, self.pkcs11_token, self.pkcs11_key]
        if (self.keystore is None) == (not any(token)) or (any(token) and not all(token)):
            raise HqError(
                "give either a keystore or all of the PKCS#11 module, token and key label",
                reason="bad_request",
            )

    def _passphrase(self) -> bytes:
        return read_secret(
            self.passphrase_file, APPROVER_PASSPHRASE_ENV, "approver keystore passphrase"
        )

    def _pin(self) -> bytes:
        return read_secret(self.pin_file, APPROVER_PIN_ENV, "approver token PIN")


def init_approver_key(source: ApproverKeySource) -> ec.EllipticCurvePublicKey:
    """Create an approver key (never overwriting one) and return its public key."""
    try:
        if source.keystore is not None:
            key = SoftwareKey.generate()
            key.save(source.keystore, source._passphrase())
            return key.public_key()
        from signers.pkcs11 import Pkcs11Key

        assert source.pkcs11_module and source.pkcs11_token and source.pkcs11_key
        with Pkcs11Key.generate(
            source.pkcs11_module, source.pkcs11_token, source.pkcs11_key, source._pin()
        ) as token_key:
            return token_key.public_key()
    except SignerError as exc:
        raise SecretError(f"cannot create the approver key: {exc}") from exc


@contextlib.contextmanager
def approver_signer(source: ApproverKeySource) -> Iterator[Signer]:
    """The approver's key for the duration of the block (a token session is closed after)."""
    try:
        if source.keystore is not None:
            yield SoftwareKey.load(source.keystore, source._passphrase())
            return
        from signers.pkcs11 import Pkcs11Key

        assert source.pkcs11_module and source.pkcs11_token and source.pkcs11_key
        token_key = Pkcs11Key.open(
            source.pkcs11_module, source.pkcs11_token, source.pkcs11_key, source._pin()
        )
    except SignerError as exc:
        raise SecretError(f"cannot open the approver key: {exc}") from exc
    with token_key:
        yield token_key


def sign_request(request: ApprovalRequest, signer: Signer, *, now: int | None = None) -> Approval:
    """Approve ``request`` (the caller has shown it to the approver). Refuses to sign a
    request that does not name this key or has expired: such an approval is useless and
    signing it would only teach people to sign without reading."""
    moment = now_unix(now)
    if key_id(signer.public_key()) not in request.approvers:
        raise QuorumRefused(
            "this key is not one of the request's approvers", reason="unknown_approver"
        )
    if moment >= request.expires:
        raise QuorumRefused("the request has expired", reason="expired")
    return sign_approval(request, signer, now=moment)
