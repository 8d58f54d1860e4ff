"""A simulated device's network life: register over MQTT, reconnect with its secondary
certificate, publish encrypted telemetry, receive encrypted commands and rotated keys.

What is real (see ``docs/registration.md``, "Device TLS"):

* Everything the registrar *verifies* is done by the device's keys: the registration request
  is signed by the factory (IDevID) key, the CSR by the new LDevID key, and the payload key
  is unwrapped by a separate ECDH key. With :class:`TpmKeys` those keys live in the device's
  swtpm (TPM keys are single-purpose: the LDevID key signs, the wrap key does ECDH).
* The mutual-TLS layer uses the same keys: a :class:`TlsIdentity` is the device's own
  certificate with the key it certifies, the IDevID with the factory key on the
  registration listener, the LDevID with its key on the operational one. A TPM key is
  given to ``ssl`` by :mod:`signers.tpm_tls` (OpenSSL calls TPM2_Sign for the handshake's
  CertificateVerify; the key never leaves the TPM); a software key (load tests) by
  :func:`signers.software.load_ssl_identity`, whose key file is encrypted under a one-time
  random password and deleted at once, so no plaintext key ever touches the disk. So a
  revoked certificate is refused by the broker's CRL check at the handshake.

Owns :class:`DeviceClient` (registration, renewal, re-registration) and
:class:`OperationalSession`; what the device holds (key factories, TLS identities,
credentials, registered state) is :mod:`device_sim.credentials`'s, re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Literal

import aiomqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.credentials import (
    DeviceCredentials,
    KeyFactory,
    Registered,
    SoftwareKeys,
    TlsIdentity,
    TpmKeys,
)
from device_sim.errors import DeviceSimError
from trustcore.csr import build_device_csr
from trustcore.endpoint import Endpoint
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId
from trustcore.key_rotation import build_key_ack
from trustcore.keys import KeyAgreement, Signer, key_id
from trustcore.payload import PayloadError, PayloadKey, open_payload, seal_payload
from trustcore.registration import (
    RegistrationDenied,
    RegistrationError,
    RegistrationGranted,
    build_request,
    open_payload_key,
    parse_request,
    parse_response,
)
from trustcore.renewal import build_renewal_request, parse_renewal_request, renewal_due
from trustcore.site_rollover import RenewNow, parse_renew_now
from trustcore.topics import (
    COMMAND_LEVEL,
    KEYS_LEVEL,
    ROLLOVER_LEVEL,
    TELEMETRY_LEVEL,
    device_topic,
    key_ack_topic,
    registration_request_topic,
    registration_response_topic,
    renewal_request_topic,
    renewal_response_topic,
)
from trustcore.utctime import from_unix

__all__ = [
    "DeviceClient",
    "DeviceCredentials",
    "DeviceRegistrationError",
    "KeyFactory",
    "OperationalSession",
    "Registered",
    "SoftwareKeys",
    "TlsIdentity",
    "TpmKeys",
    "device_mqtt_client",
]

log = logging.getLogger(__name__)

#: Devices renew from this fraction of their LDevID's life on (the site default too).
RENEW_FROM = 2 / 3


class DeviceRegistrationError(DeviceSimError):
    """Registration did not succeed; ``reason`` is the registrar's public reason code (or
    ``timeout`` / ``no_valid_response``), ``retry`` its advice."""

    def __init__(self, message: str, *, reason: str, retry: bool = False) -> None:
        super().__init__(message, reason=reason)
        self.retry = retry


Protocol_ = Literal["3.1.1", "5"]


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails. paho-mqtt 2.2 wraps the
    TCP socket and handshakes (``Client._ssl_wrap_socket``) without closing the wrapped
    socket on failure, so every connection refused during the handshake (a broker being
    restarted, a certificate on the CRL) left an open socket to the garbage collector."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def device_mqtt_client(
    endpoint: Endpoint,
    identifier: str,
    tls: ssl.SSLContext,
    protocol: Protocol_,
    timeout: float | None = None,
) -> aiomqtt.Client:
    """A device's MQTT client (not yet connected: ``async with``) on ``tls``."""
    tls.sslsocket_class = _ClosingSSLSocket  # what the context's wrap_socket returns
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=identifier,
        tls_context=tls,
        protocol=aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311,
        keepalive=30,
        timeout=timeout,
    )


class DeviceClient:
    """One simulated device. Its TLS identities are its own certificates with their keys
    (software or TPM): the IDevID with the factory key on the registration listener, the
    LDevID with its key on the operational one. ``registration_tls`` / ``operational_tls``
    replace them only where a test needs a device that presents one certificate in TLS and
    another in its signed request."""

    def __init__(
        self,
        credentials: DeviceCredentials,
        keys: KeyFactory,
        *,
        registration_tls: TlsIdentity | None = None,
        operational_tls: Callable[[Registered], TlsIdentity] | None = None,
        protocol: Protocol_ = "3.1.1",
        clock: Callable[[], float] = time.time,
        renew_from: float = RENEW_FROM,
    ) -> None:
        if not 0.0 < renew_from < 1.0:
            raise ValueError("renew_from must be strictly between 0 and 1")
        self.renew_from = renew_from
        self.credentials = credentials
        self.keys = keys
        self._registration_tls = registration_tls
        self._operational_tls = operational_tls
        self.protocol = protocol
        self._clock = clock
        self.registered: Registered | None = None

    @property
    def device_id(self) -> DeviceId:
        return self.credentials.device_id

    def registration_context(self) -> ssl.SSLContext:
        identity = self._registration_tls or TlsIdentity.from_signer(
            (self.credentials.idevid, *self.credentials.chain), self.credentials.factory_key
        )
        return identity.context(self.credentials.roots_pem)

    def operational_context(self) -> ssl.SSLContext:
        if self.registered is None:
            raise DeviceRegistrationError("not registered", reason="not_registered")
        reg = self.registered
        identity = (
            self._operational_tls(reg)
            if self._operational_tls is not None
            else TlsIdentity.from_signer((reg.ldevid, reg.site_ca), reg.ldevid_key)
        )
        return identity.context(self.credentials.roots_pem)

    def new_request(self) -> tuple[bytes, Signer, KeyAgreement]:
        """A fresh request: new LDevID key and wrap key, new nonce, current time."""
        ldevid_key = self.keys.new_signing_key()
        wrap_key = self.keys.new_ecdh_key()
        request = build_request(
            device_id=self.device_id,
            nonce=os.urandom(32),
            time=int(self._clock()),
            csr_der=build_device_csr(ldevid_key, self.device_id),
            wrap_key=wrap_key.public_key(),
            idevid_der=self.credentials.idevid.public_bytes(serialization.Encoding.DER),
            chain_der=[c.public_bytes(serialization.Encoding.DER) for c in self.credentials.chain],
            factory_key=self.credentials.factory_key,
        )
        return request, ldevid_key, wrap_key

    async def register(
        self,
        endpoint: Endpoint,
        *,
        timeout: float = 10.0,
        resend_after: float = 3.0,
        attempts: int = 3,
        tls: ssl.SSLContext | None = None,
    ) -> Registered:
        """Register through the broker's registration listener.

        The identical request is re-sent after ``resend_after`` s without an answer (the
        registrar answers it idempotently); a refusal with ``retry`` advice leads to a NEW
        request after a back-off, up to ``attempts``; any other refusal raises. Responses
        that do not verify (wrong signature, someone else's nonce) are ignored, so a forged
        "refused" cannot make the device give up.
        """
        context = tls or self.registration_context()
        last: DeviceRegistrationError | None = None
        async with device_mqtt_client(
            endpoint, self.device_id.value, context, self.protocol
        ) as client:
            await client.subscribe(registration_response_topic(self.device_id), qos=1)
            for attempt in range(attempts):
                request, ldevid_key, wrap_key = await asyncio.to_thread(self.new_request)
                try:
                    return await self._one_request(
                        client, request, ldevid_key, wrap_key, timeout, resend_after
                    )
                except DeviceRegistrationError as exc:
                    last = exc
                    if not exc.retry:
                        raise
                    await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        assert last is not None
        raise last

    async def _one_request(
        self,
        client: aiomqtt.Client,
        request: bytes,
        ldevid_key: Signer,
        wrap_key: KeyAgreement,
        timeout: float,
        resend_after: float,
    ) -> Registered:
        parsed = parse_request(request)
        topic = registration_request_topic(self.device_id)
        deadline = asyncio.get_running_loop().time() + timeout
        await client.publish(topic, request, qos=1)
        messages = client.messages.__aiter__()
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise DeviceRegistrationError(
                    "no valid response in time", reason="timeout", retry=True
                )
            try:
                message = await asyncio.wait_for(messages.__anext__(), min(remaining, resend_after))
            except TimeoutError:
                await client.publish(topic, request, qos=1)  # idempotent: same bytes
                continue
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            try:
                result = parse_response(
                    bytes(payload),
                    device_id=self.device_id,
                    nonce=parsed.nonce,
                    request_digest=parsed.digest,
                    ldevid_public_key=ldevid_key.public_key(),
                    roots=self.credentials.roots,
                    now=from_unix(self._clock()),
                )
            except RegistrationError as exc:
                log.warning("%s ignored a response: %s", self.device_id, exc)
                continue
            if isinstance(result, RegistrationDenied):
                raise DeviceRegistrationError(
                    f"refused: {result.reason}: {result.message}",
                    reason=result.reason,
                    retry=result.retry,
                )
            return self._accept(result, ldevid_key, wrap_key)

    def _accept(
        self, granted: RegistrationGranted, ldevid_key: Signer, wrap_key: KeyAgreement
    ) -> Registered:
        key = open_payload_key(wrap_key, self.device_id, granted.payload_key)
        self.registered = Registered(
            ldevid=granted.ldevid,
            site_ca=granted.site_ca,
            ldevid_key=ldevid_key,
            wrap_key=wrap_key,
            payload_keys={key.key_id: key},
            current_key_id=key.key_id,
        )
        return self.registered

    # -- LDevID renewal and re-registration ---------------------------------------------------

    def now(self) -> datetime:
        """The device's clock (injectable: tests walk a device through years)."""
        return from_unix(self._clock())

    def renewal_due(self, now: datetime | None = None) -> bool:
        """True from ``renew_from`` of the current LDevID's life on."""
        if self.registered is None:
            return False
        moment = from_unix(self._clock()) if now is None else now
        return renewal_due(self.registered.ldevid, moment, self.renew_from)

    def ldevid_expired(self, now: datetime | None = None) -> bool:
        if self.registered is None:
            return True
        moment = from_unix(self._clock()) if now is None else now
        return moment > self.registered.ldevid.not_valid_after_utc

    def new_renewal_request(self) -> tuple[bytes, Signer]:
        """A renewal request: CSR for a NEW key from the key factory (TPM), signed by the
        current LDevID key."""
        if self.registered is None:
            raise DeviceRegistrationError("register first", reason="not_registered")
        new_key = self.keys.new_signing_key()
        request = build_renewal_request(
            device_id=self.device_id,
            nonce=os.urandom(32),
            time=int(self._clock()),
            csr_der=build_device_csr(new_key, self.device_id),
            ldevid_der=self.registered.ldevid.public_bytes(serialization.Encoding.DER),
            ldevid_key=self.registered.ldevid_key,
        )
        return request, new_key

    def accept_renewal(self, request: bytes, new_key: Signer, payload: bytes) -> Registered:
        """Take the answer to the renewal ``request`` (from :meth:`new_renewal_request`, for
        ``new_key``): verify it, unwrap the payload key, make the new LDevID current.
        ``RegistrationError``: the answer does not verify (ignore it, keep waiting);
        ``DeviceRegistrationError``: the registrar refused the renewal."""
        reg = self.registered
        if reg is None:
            raise DeviceRegistrationError("register first", reason="not_registered")
        parsed = parse_renewal_request(request)
        result = parse_response(
            payload,
            device_id=self.device_id,
            nonce=parsed.nonce,
            request_digest=parsed.digest,
            ldevid_public_key=new_key.public_key(),
            roots=self.credentials.roots,
            now=self.now(),
        )
        if isinstance(result, RegistrationDenied):
            raise DeviceRegistrationError(
                f"renewal refused: {result.reason}: {result.message}",
                reason=result.reason,
                retry=result.retry,
            )
        key = open_payload_key(reg.wrap_key, self.device_id, result.payload_key)
        reg.replace_ldevid(result.ldevid, result.site_ca, new_key)
        reg.adopt_payload_key(key)  # the registrar's current payload key
        return reg

    async def renew(
        self,
        endpoint: Endpoint,
        *,
        timeout: float = 10.0,
        resend_after: float = 3.0,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float | None = None,
    ) -> Registered:
        """Renew over a fresh operational session (see :meth:`OperationalSession.renew`).
        ``connect_timeout``: a certificate the broker refuses (on the CRL) shows as a
        CONNECT without answer under TLS 1.3, so a short one saves the device's time.
        Returns with the new LDevID in ``registered``; reconnect to use it."""
        async with self.operational(endpoint, tls=tls, connect_timeout=connect_timeout) as session:
            return await session.renew(timeout=timeout, resend_after=resend_after)

    async def keep_certified(
        self, registration: Endpoint, operational: Endpoint, *, timeout: float = 10.0
    ) -> Literal["current", "renewed", "registered"]:
        """What a device does when it wakes up: nothing if its LDevID is young; renew it
        from ``renew_from`` of its life on; register again with the IDevID if it has none,
        it expired (switched off too long), or the registrar refuses the renewal for good
        (superseded, unknown). Retryable refusals (``too_early``, ``busy``) raise."""
        if self.registered is None or self.ldevid_expired():
            await self.register(registration, timeout=timeout)
            return "registered"
        if not self.renewal_due():
            return "current"
        try:
            # 6 s: a refused certificate (TLS 1.3: a CONNECT without answer) costs the
            # device that long; a busy broker host needs more than 3 s for a handshake.
            await self.renew(operational, timeout=timeout, connect_timeout=6.0)
        except DeviceRegistrationError as exc:
            if exc.retry or exc.reason == "ldevid_revoked":
                raise
            log.warning("%s: renewal refused (%s); registering again", self.device_id, exc)
            await self.register(registration, timeout=timeout)
            return "registered"
        except aiomqtt.MqttError as exc:
            # The operational listener refuses the certificate (e.g. already on the CRL):
            # the IDevID still works on the registration listener.
            log.warning("%s: cannot renew (%s); registering again", self.device_id, exc)
            await self.register(registration, timeout=timeout)
            return "registered"
        return "renewed"

    @contextlib.asynccontextmanager
    async def operational(
        self,
        endpoint: Endpoint,
        *,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float | None = None,
    ) -> AsyncIterator[OperationalSession]:
        """Connect to the operational listener with the LDevID; subscribe to commands and
        key updates under the device's own subtree."""
        if self.registered is None:
            raise DeviceRegistrationError("register first", reason="not_registered")
        context = tls or self.operational_context()
        async with device_mqtt_client(
            endpoint, self.device_id.value, context, self.protocol, connect_timeout
        ) as client:
            session = OperationalSession(self, client)
            await client.subscribe(device_topic(self.device_id, COMMAND_LEVEL), qos=1)
            await client.subscribe(device_topic(self.device_id, KEYS_LEVEL), qos=1)
            await client.subscribe(device_topic(self.device_id, ROLLOVER_LEVEL), qos=1)
            await client.subscribe(renewal_response_topic(self.device_id), qos=1)
            reader = asyncio.create_task(session._read())
            try:
                yield session
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader


class OperationalSession:
    """An operational connection: encrypted telemetry out, commands and key updates in."""

    def __init__(self, device: DeviceClient, client: aiomqtt.Client) -> None:
        self._device = device
        self.client = client
        self.commands: asyncio.Queue[bytes] = asyncio.Queue()
        self.key_updates = 0
        #: verified "renew now" commands (site CA rollover) for the device's CURRENT
        #: site CA; see :class:`device_sim.agent.DeviceAgent`, which obeys them
        self.renew_requests: asyncio.Queue[RenewNow] = asyncio.Queue()
        self.key_acks = 0
        self._renewal_answers: asyncio.Queue[bytes] = asyncio.Queue()

    @property
    def _reg(self) -> Registered:
        assert self._device.registered is not None
        return self._device.registered

    async def publish_telemetry(
        self, data: bytes, *, level: str = TELEMETRY_LEVEL, qos: int = 1
    ) -> None:
        topic = device_topic(self._device.device_id, level)
        await self.client.publish(topic, seal_payload(self._reg.current_key, topic, data), qos=qos)

    async def _read(self) -> None:
        device_id = self._device.device_id
        keys_topic = device_topic(device_id, KEYS_LEVEL)
        rollover_topic = device_topic(device_id, ROLLOVER_LEVEL)
        renewed_topic = renewal_response_topic(device_id)
        renew_topic = renewal_request_topic(device_id)
        async for message in self.client.messages:
            topic = str(message.topic)
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            if topic == keys_topic:
                applied = self._key_update(bytes(payload))
                if applied is not None:
                    await self._acknowledge(*applied)
                continue
            if topic == rollover_topic:
                self._renew_request(bytes(payload))
                continue
            if topic == renewed_topic:
                self._renewal_answers.put_nowait(bytes(payload))
                continue
            if topic == renew_topic:
                continue  # our own request, echoed by the devices/<id>/# subscription
            try:
                self.commands.put_nowait(
                    open_payload(self._reg.payload_keys, topic, bytes(payload))
                )
            except PayloadError as exc:
                log.warning("%s dropped a command on %s: %s", device_id, topic, exc)

    def _renew_request(self, payload: bytes) -> None:
        """A "renew now" signed by the site CA of the current LDevID, for another CA: queue
        it. An empty (cleared retained) message, one for the CA the device is already on,
        or one that does not verify is ignored."""
        if not payload:
            return
        reg = self._reg
        try:
            renew = parse_renew_now(
                payload,
                device_id=self._device.device_id,
                site_ca=reg.site_ca,
                newer_than=reg.renew_issued,
            )
        except TrustCoreError as exc:
            log.info("%s ignored a renew command: %s", self._device.device_id, exc)
            return
        reg.renew_issued = renew.issued
        current_ca = reg.site_ca.public_key()
        if isinstance(current_ca, ec.EllipticCurvePublicKey) and key_id(current_ca) == (
            renew.issuing_ca
        ):
            return
        self.renew_requests.put_nowait(renew)

    async def renew(self, *, timeout: float = 10.0, resend_after: float = 3.0) -> Registered:
        """Renew the LDevID over THIS session (the operational listener, authenticated by
        the current LDevID): publish a request signed by the current key with a CSR for a
        new TPM key on ``devices/<id>/renewal/request`` and wait for the signed answer on
        ``devices/<id>/renewal/response``. The identical request is re-sent after ``resend_after``
        s (the registrar answers idempotently: no second certificate). Answers that do not
        verify are ignored. On success the device holds the new LDevID (the old one is on
        the site CRL already: reconnect with the new one; the registrar cuts a session left
        on the old certificate after its hand-over time)."""
        device = self._device
        request, new_key = await asyncio.to_thread(device.new_renewal_request)
        topic = renewal_request_topic(device.device_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.client.publish(topic, request, qos=1)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeviceRegistrationError(
                    "no valid renewal answer", reason="timeout", retry=True
                )
            try:
                payload = await asyncio.wait_for(
                    self._renewal_answers.get(), min(remaining, resend_after)
                )
            except TimeoutError:
                await self.client.publish(topic, request, qos=1)  # same bytes: idempotent
                continue
            try:
                return device.accept_renewal(request, new_key, payload)
            except RegistrationError as exc:
                log.warning("%s ignored a renewal answer: %s", device.device_id, exc)
                continue

    async def _acknowledge(self, key: PayloadKey, issued: int) -> None:
        """Prove to the registrar that this device now holds ``key``: until it does, the
        registrar keeps sending the update (``docs/registrar.md``, key rotation)."""
        device_id = self._device.device_id
        ack = build_key_ack(key, device_id, issued)
        try:
            await self.client.publish(key_ack_topic(device_id), ack, qos=1)
            self.key_acks += 1
        except aiomqtt.MqttError as exc:  # the registrar re-sends; the next one is acked
            log.warning("%s could not acknowledge key %s: %s", device_id, key.key_id.hex(), exc)

    def _key_update(self, payload: bytes) -> tuple[PayloadKey, int] | None:
        """Apply a signed key update; the new key and the update's ``issued``, or None."""
        try:
            applied = self._reg.apply_key_update(self._device.device_id, payload)
        except RegistrationError as exc:
            log.warning("%s refused a key update: %s", self._device.device_id, exc)
            return None
        self.key_updates += 1
        return applied
