"""The registrar's EST (RFC 7030) listener: HTTPS with mutual TLS beside the MQTT listeners.

One service, two transports: an EST enrolment is the same registration as an MQTT one. This
module owns only the HTTP side: it takes the TLS peer certificate (the factory certificate
for ``simpleenroll``, the current LDevID for ``simplereenroll``) and the base64 PKCS#10,
builds the service's request (:func:`trustcore.registration.tls_bound_request`,
:func:`trustcore.renewal.tls_bound_renewal`), hands it to the same entry points the MQTT
channel ends in (:meth:`RegistrationService.handle_request`,
:meth:`RegistrationService.handle_renewal_request`: chain and CRLs, manifest, admission
plugins, CSR checks, store, idempotency, events, the superseded certificate on the site CRL)
and turns the signed answer into HTTP (:func:`trustcore.est.answer_from_response`).

Operations under ``/.well-known/est/``: ``cacerts`` (site CA + manufacturer root, no client
certificate needed, RFC 7030 §4.1.1), ``csrattrs``, ``simpleenroll``, ``simplereenroll``
(with an LDevID: renewal; with a factory certificate: the first enrolment, as strongSwan's
``pki --est`` asks for it); ``serverkeygen`` and ``fullcmc`` are refused with 501 (keys are
made in the device's TPM; no CMC). No CA labels, no HTTP authentication, no
proof-of-possession linking (``tls-unique``): ``docs/est.md``.

TLS: the broker's server certificate (site CA), TLS 1.2+, client certificates verified
against the manufacturer root, the station CAs and the site CA(s), WITHOUT the time check
(``X509_V_FLAG_NO_CHECK_TIME``): validity is decided by the service on the registrar's clock
(tests move it through years), so an expired certificate gets a readable ``expired`` /
``ldevid_expired`` answer rather than a handshake alert. Revocation is the service's too
(CRLs, superseded and revoked LDevIDs in the store: fail closed).
"""

from __future__ import annotations

import base64
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509

from registrar.errors import ConfigError
from registrar.http_listener import start_http
from trustcore.endpoint import Endpoint
from trustcore.errors import ProfileError
from trustcore.est import (
    CSR_ATTRS_DER,
    CSR_ATTRS_TYPE,
    EST_PREFIX,
    MAX_BODY_SIZE,
    EstAnswer,
    answer_from_response,
    certs_only,
    decode_csr_body,
    refusal,
)
from trustcore.identity import DeviceId
from trustcore.profiles import device_id_from_certificate
from trustcore.registration import RegistrationError, RegistrationRequest, tls_bound_request
from trustcore.renewal import RenewalRequest, tls_bound_renewal
from trustcore.utctime import Clock, to_unix

__all__ = ["EstServer", "EstTraffic", "est_server_context"]

log = logging.getLogger(__name__)

#: OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME`` (1.1.0+; Python's ``ssl.VerifyFlags`` lacks it).
_NO_CHECK_TIME = 0x200000
_NONCE_BYTES = 16


def est_server_context(
    server_chain: Path, server_key: Path, passphrase: bytes, client_cas: tuple[Path, ...]
) -> ssl.SSLContext:
    """The EST listener's TLS: server chain + (encrypted) key, client certificates verified
    to ``client_cas`` when presented (times left to the service, see the module docstring)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(server_chain, server_key, password=passphrase)
        for path in client_cas:
            ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot set up the EST listener's TLS: {exc}") from exc
    # Optional at the TLS layer so that /cacerts answers a client without a certificate
    # (RFC 7030 §4.1.1); every enrolment operation refuses a request without one (401).
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags = ssl.VerifyFlags(int(ctx.verify_flags) | _NO_CHECK_TIME)
    return ctx


@dataclass(frozen=True)
class EstTraffic:
    """What the EST listener calls: the service's two entry points, the CA certificates
    for ``/cacerts`` (read at each call: a site CA rollover changes them), the clock."""

    register: Callable[[DeviceId, RegistrationRequest], Awaitable[bytes]]
    renew: Callable[[DeviceId, RenewalRequest], Awaitable[bytes]]
    ca_certificates: Callable[[], list[x509.Certificate]]
    clock: Clock
    #: The site CAs whose LDevIDs may renew (current and retiring): the routing of
    #: ``/simplereenroll`` (see :meth:`EstServer._enrol`).
    ldevid_issuers: Callable[[], tuple[x509.Certificate, ...]]


class EstServer:
    """The aiohttp application on its own socket, in the registrar's event loop."""

    def __init__(self, traffic: EstTraffic, tls: ssl.SSLContext) -> None:
        self._traffic = traffic
        self._tls = tls
        #: What new handshakes use (:meth:`use_tls`); ``_tls`` is the listening context.
        self._current = tls
        tls.sni_callback = self._select_context
        self._runner: web.AppRunner | None = None
        self._endpoint: Endpoint | None = None
        #: Answers by HTTP status (for status.json and tests).
        self.answered: dict[int, int] = {}

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise ConfigError("the EST listener is not running")
        return self._endpoint

    async def start(self, host: str, port: int) -> None:
        app = web.Application(client_max_size=MAX_BODY_SIZE)
        app.router.add_get(f"{EST_PREFIX}/cacerts", self._cacerts)
        app.router.add_get(f"{EST_PREFIX}/csrattrs", self._csrattrs)
        app.router.add_post(f"{EST_PREFIX}/simpleenroll", self._simpleenroll)
        app.router.add_post(f"{EST_PREFIX}/simplereenroll", self._simplereenroll)
        for refused in ("serverkeygen", "fullcmc"):
            app.router.add_route("*", f"{EST_PREFIX}/{refused}", self._not_supported)
        try:
            runner, bound = await start_http(app, host, port, ssl_context=self._tls, backlog=512)
        except OSError as exc:
            raise ConfigError(f"the EST listener cannot listen on {host}:{port}: {exc}") from exc
        self._endpoint = Endpoint(host, bound)
        self._runner = runner

    def use_tls(self, tls: ssl.SSLContext) -> None:
        """New server certificate or client CAs (re-issued service certificates, a
        re-commission, a site CA rollover): used from the next handshake, no restart."""
        self._current = tls

    def _select_context(
        self, ssl_object: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext
    ) -> None:
        # OpenSSL calls this for every ClientHello (server_name None without SNI), before
        # the certificate is chosen: the place to swap in the current context.
        if self._current is not context:
            ssl_object.context = self._current

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- operations ---------------------------------------------------------------------------

    async def _cacerts(self, _: web.Request) -> web.Response:
        return self._send(EstAnswer(200, certs_only(self._traffic.ca_certificates()), _P7))

    async def _csrattrs(self, _: web.Request) -> web.Response:
        return self._send(EstAnswer(200, base64.b64encode(CSR_ATTRS_DER), CSR_ATTRS_TYPE))

    async def _not_supported(self, request: web.Request) -> web.Response:
        operation = request.path.rsplit("/", 1)[-1]
        text = (
            f"{operation}_refused: not supported here: device keys are made in the device's "
            "TPM and never leave it; send a CSR to /simpleenroll\n"
        )
        return self._send(EstAnswer(501, text.encode(), _TEXT))

    async def _simpleenroll(self, request: web.Request) -> web.Response:
        return await self._enrol(request, renewal=False)

    async def _simplereenroll(self, request: web.Request) -> web.Response:
        return await self._enrol(request, renewal=True)

    async def _enrol(self, request: web.Request, *, renewal: bool) -> web.Response:
        peer = _peer_certificate(request)
        if peer is None:
            missing = b"certificate_required: authenticate with your device certificate (mTLS)\n"
            return self._send(EstAnswer(401, missing, _TEXT))
        media = request.content_type.lower()
        if media != "application/pkcs10":
            text = f"unsupported_media_type: send application/pkcs10, not {media[:60]!r}\n"
            return self._send(EstAnswer(415, text.encode(), _TEXT))
        try:
            presented = x509.load_der_x509_certificate(peer)
            device = device_id_from_certificate(presented)
        except (ProfileError, ValueError) as exc:
            log.info("EST: refused a client certificate that names no device: %s", exc)
            return self._send(refusal("bad_certificate"))
        if renewal and not any(
            presented.issuer == ca.subject for ca in self._traffic.ldevid_issuers()
        ):
            # /simplereenroll authenticated with a FACTORY certificate is the first enrolment
            # (strongSwan's ``pki --est`` sends every certificate-authenticated request to
            # /simplereenroll): the registration path, which verifies the IDevID in full.
            # The issuer name only routes; each path verifies the certificate itself.
            renewal = False
        try:
            csr_der = decode_csr_body(await request.read())
            nonce = secrets.token_bytes(_NONCE_BYTES)
            now = to_unix(self._traffic.clock())
            if renewal:
                renewal_request = tls_bound_renewal(
                    device_id=device, ldevid_der=peer, csr_der=csr_der, nonce=nonce, time=now
                )
                response = await self._traffic.renew(device, renewal_request)
            else:
                registration = tls_bound_request(
                    device_id=device,
                    idevid_der=peer,
                    csr_der=csr_der,
                    chain_der=(),
                    nonce=nonce,
                    time=now,
                )
                response = await self._traffic.register(device, registration)
            answer = answer_from_response(response)
        except RegistrationError as exc:
            log.info("EST: refused %s of %s: %s", _what(renewal), device, exc)
            answer = refusal(exc.reason)
        except web.HTTPRequestEntityTooLarge:
            answer = refusal("oversized")
        except Exception:
            # As the MQTT channel's worker does: logged with detail, the device gets the
            # public internal_error (never a traceback, never a 500 with aiohttp's text).
            log.exception("EST %s of %s failed unexpectedly", _what(renewal), device)
            answer = refusal("internal_error")
        if answer.reason is not None:
            log.info("EST: %s of %s refused: %s", _what(renewal), device, answer.reason)
        return self._send(answer)

    def _send(self, answer: EstAnswer) -> web.Response:
        self.answered[answer.status] = self.answered.get(answer.status, 0) + 1
        headers = {}
        if answer.content_type != _TEXT:
            headers["Content-Transfer-Encoding"] = "base64"
        if answer.retry_after is not None:
            headers["Retry-After"] = str(answer.retry_after)
        return web.Response(
            status=answer.status,
            body=answer.body,
            headers={"Content-Type": answer.content_type, **headers},
        )


_TEXT = "text/plain; charset=utf-8"
_P7 = "application/pkcs7-mime; smime-type=certs-only"


def _what(renewal: bool) -> str:
    return "re-enrolment" if renewal else "enrolment"


def _peer_certificate(request: web.Request) -> bytes | None:
    """DER of the certificate the TLS peer proved it holds the key of (None: none sent)."""
    transport = request.transport
    ssl_object = None if transport is None else transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    return ssl_object.getpeercert(binary_form=True)
