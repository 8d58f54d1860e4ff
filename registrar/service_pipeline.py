"""What the registrar's registration and renewal paths share (:class:`ServicePipeline`,
the base of :class:`registrar.service.RegistrationService`), and the site CA as the
service uses it (:class:`SiteAuthority`).

The shared part of every request's way through the service: its state and the
configuration that changes at run time (site CA after a rollover, verifier after new CRLs,
manifest, payload key), one answer per identical request (:meth:`ServicePipeline.
_deduplicated`: a retry in flight waits for the first copy's answer), the nonce and key
reservations held until the durable record is committed, the answer another instance
committed for the same bytes, the signed refusal (the device gets only the public reason),
and the hook run after a certificate was superseded. Logs go to ``registrar.service``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from registrar.errors import RegistrarError, RegistrationRefused, StoreError
from registrar.store import Registration, Store
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId
from trustcore.keys import Signer
from trustcore.payload import PayloadKey
from trustcore.policy_chain import NamedPlugin
from trustcore.registration import (
    Admission,
    AdmissionContext,
    RegistrationError,
    RegistrationRequest,
    build_error_response,
)
from trustcore.renewal import (
    LdevidPolicy,
    RenewalRequest,
)
from trustcore.utctime import Clock, system_clock
from trustcore.verify import ChainVerifier

__all__ = ["ANSWERED", "ServicePipeline", "SiteAuthority", "SupersededHook"]

#: One logger for the whole service (operators and tests filter on its name).
log = logging.getLogger("registrar.service")


class SupersededHook(Protocol):
    """Called with (device, superseded LDevID serials in hex, whether a renewal replaced
    them) after a replacing certificate is committed and before its answer is returned."""

    def __call__(
        self, device: DeviceId, serials: tuple[str, ...], *, renewal: bool
    ) -> Awaitable[None]: ...


#: The ``stats`` keys that are not refusals: LDevID issued on registration, a stored answer
#: given again (retry), LDevID renewed. Every other key is a public refusal reason code.
ANSWERED = ("ok", "idempotent", "renewed")


@dataclass(frozen=True)
class SiteAuthority:
    """The site CA as the registrar uses it: certificate, its key (any Signer: software,
    TPM or token), the organization written into LDevIDs, and LDevID validity."""

    certificate: x509.Certificate
    signer: Signer
    organization: str
    ldevid_validity: timedelta = timedelta(days=365)

    #: a site CA rollover overlap: the retiring CA(s) and their keys. They issue nothing
    #: new; they still sign what a device on one of their LDevIDs must verify with the site
    #: CA it knows (payload-key updates, "renew now").
    retiring: tuple[tuple[x509.Certificate, Signer], ...] = ()

    @functools.cached_property
    def der(self) -> bytes:
        """The site CA certificate's DER (in every response: encoded once)."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def signer_for(self, ldevid_der: bytes) -> Signer:
        """The key of the site CA that issued ``ldevid_der`` (the issuing CA's otherwise)."""
        try:
            issuer = x509.load_der_x509_certificate(ldevid_der).issuer
        except ValueError:
            return self.signer
        for cert, signer in self.retiring:
            if cert.subject == issuer:
                return signer
        return self.signer


class ServicePipeline:
    """The state and the steps shared by registration and renewal (see the module
    docstring); :class:`registrar.service.RegistrationService` adds the two paths."""

    def __init__(
        self,
        *,
        store: Store,
        verifier: ChainVerifier,
        admission: Admission,
        site: SiteAuthority,
        payload_key: PayloadKey,
        clock: Clock = system_clock,
        admission_plugins: Sequence[NamedPlugin[AdmissionContext]] | None = None,
        policy: LdevidPolicy | None = None,
        on_superseded: SupersededHook | None = None,
    ) -> None:
        """``admission_plugins`` None: the built-in admission only (an unlisted device is
        ``not_in_manifest``). A sequence: the site's plugin chain runs after every built-in
        check (fail closed: an empty sequence refuses everything, ``empty_policy``)."""
        self._store = store
        self.admission_plugins = None if admission_plugins is None else tuple(admission_plugins)
        self.verifier = verifier
        self.admission = admission
        self._site = site
        self._site_der = site.der
        self.payload_key = payload_key
        self._clock = clock
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._reserved_nonces: set[bytes] = set()
        self._reserved_keys: dict[bytes, DeviceId] = {}
        self._renewing: set[DeviceId] = set()
        self.policy = policy or LdevidPolicy(validity=site.ldevid_validity)
        self.on_superseded = on_superseded
        #: Earlier site CAs whose LDevIDs may still renew (site CA rollover adds them).
        self.previous_site_cas: tuple[x509.Certificate, ...] = ()
        #: Answers given: :data:`ANSWERED` outcomes, and every refusal under its public reason
        #: code (``registrar status``, the Prometheus counters of :mod:`registrar.metrics`).
        self.stats: dict[str, int] = dict.fromkeys(ANSWERED, 0)

    def issuing_authority(self) -> SiteAuthority:
        """The CA that issues every new LDevID (registration and renewal): the ONE place a
        site CA rollover switches."""
        return self._site

    def accepted_ldevid_issuers(self) -> tuple[x509.Certificate, ...]:
        """CAs whose LDevIDs may authenticate a renewal: the current one and earlier ones."""
        return (self.issuing_authority().certificate, *self.previous_site_cas)

    # -- configuration that changes at run time ------------------------------------------

    @property
    def site_authority(self) -> SiteAuthority:
        return self._site

    def use_site_authority(self, site: SiteAuthority) -> None:
        """A site CA rollover was activated (or its old CA retired): new LDevIDs and signed
        responses come from ``site`` from the next request on."""
        self._site = site
        self._site_der = site.der
        self.previous_site_cas = tuple(cert for cert, _ in site.retiring)

    def update_trust(
        self, *, verifier: ChainVerifier | None = None, admission: Admission | None = None
    ) -> None:
        """Swap in a new verifier (new CRLs) or manifest; takes effect for the next request."""
        if verifier is not None:
            self.verifier = verifier
        if admission is not None:
            self.admission = admission

    async def _deduplicated(
        self,
        topic_device_id: DeviceId,
        request: RegistrationRequest | RenewalRequest,
        process: Callable[[], Awaitable[bytes]],
    ) -> bytes:
        """An identical request in progress gets that one's answer (no second issuance)."""
        digest = request.digest
        pending = self._inflight.get(digest)
        if pending is not None:
            self.stats["idempotent"] += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            response = await process()
        except BaseException as exc:
            # Whoever waits on this identical request gets an internal_error refusal (never
            # the exception: it may carry internal detail).
            future.set_result(
                self._refusal(
                    topic_device_id,
                    request.nonce,
                    digest,
                    RegistrationError(f"unexpected: {exc!r}", reason="internal_error"),
                    request=request,
                )
            )
            raise
        else:
            future.set_result(response)
            return response
        finally:
            del self._inflight[digest]

    async def _superseded(
        self, device: DeviceId, serials: tuple[str, ...], *, renewal: bool
    ) -> None:
        """Tell the registrar (site CRL + broker) before the new certificate is handed out
        (a ``renewal`` may be batched: :mod:`registrar.supersede`); a failure there is
        logged, not sent to the device: its new certificate is committed, and the registrar
        re-applies every superseded serial at its next CRL check."""
        hook = self.on_superseded
        if hook is None:
            return
        try:
            await hook(device, serials, renewal=renewal)
        except (RegistrarError, TrustCoreError) as exc:
            log.error(
                "could not put superseded LDevID(s) %s of %s on the CRL: %s", serials, device, exc
            )
        except Exception:
            log.exception("could not put superseded LDevID(s) %s of %s on the CRL", serials, device)

    async def _record_reserved(
        self, record: Registration, nonce: bytes, key_id: bytes
    ) -> RegistrationError | None:
        """Commit ``record`` (registration or renewal) with its nonce and new key reserved
        until the commit: a second request with this nonce or key, arriving while the first
        sits in the group-commit queue, is refused too. A store failure is returned as the
        ``internal_error`` the device is told."""
        self._reserved_nonces.add(nonce)
        self._reserved_keys[key_id] = record.device_id
        try:
            await self._store.record_registration(record)
        except StoreError as exc:
            return RegistrationError(exc.message, reason="internal_error")
        finally:
            self._reserved_nonces.discard(nonce)
            self._reserved_keys.pop(key_id, None)
        return None

    async def _answered_elsewhere(self, digest: bytes) -> bytes | None:
        """After a failed commit: the answer another registrar instance committed for the
        same request bytes meanwhile (a device re-sent its request while the first copy was
        being served elsewhere; the unique request digest let one commit win). Answering
        with it, not with a refusal, keeps the device from starting a second registration
        (a second certificate)."""
        try:
            found = await self._store.lookup(digest, b"", None)
        except StoreError:
            return None
        if found.response is not None:
            self.stats["idempotent"] += 1
        return found.response

    def _refusal(
        self,
        device_id: DeviceId,
        nonce: bytes,
        digest: bytes,
        exc: RegistrationError,
        *,
        request: RegistrationRequest | RenewalRequest | None = None,
    ) -> bytes:
        refused = RegistrationRefused(str(exc), reason=exc.reason)
        self.stats[refused.reason] = self.stats.get(refused.reason, 0) + 1
        # Internal detail goes to the log and (for parsed requests) to the event table; the
        # device gets only the public reason code and message.
        what = "renewal" if isinstance(request, RenewalRequest) else "registration"
        log.info("refused %s on %s: %s", what, device_id, refused)
        if request is not None:
            try:
                self._store.note_event(device_id, "refused", str(refused)[:500])
            except StoreError:
                log.warning("could not queue refusal event for %s", device_id)
        return build_error_response(
            device_id=device_id,
            nonce=nonce,
            request_digest=digest,
            reason=refused.reason,
            site_ca_der=self._site_der,
            site_signer=self._site.signer,
        )

    # -- payload-key rotation ----------------------------------------------------------------
    # Updates to registered devices are built and tracked by registrar.key_distribution.

    def use_payload_key(self, key: PayloadKey) -> None:
        self.payload_key = key
