"""How a registrar connects, built from the commissioned site: the TLS identities and
settings of its transports.

Owns the brokers' TLS files (:func:`operational_tls`), the registrar's client identity
(:func:`client_context`; a joining instance's in-memory one, :func:`instance_context`),
the MQTT session settings of an instance (:func:`channel_settings`), the RabbitMQ request
source (:func:`amqp_source`), the EST listener's TLS (:func:`est_context`) and the
issuing site CA (plus a retiring one during a rollover) as a
:class:`~registrar.service.SiteAuthority`. Pure wiring: nothing here runs or keeps state.
"""

from __future__ import annotations

import ssl
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker_config.render import instance_identity
from registrar.broker import REGISTRAR_IDENTITY, BrokerTls, Endpoint
from registrar.channel import MqttChannelSettings, RequestSource, SiteTraffic
from registrar.errors import ConfigError
from registrar.est import est_server_context
from registrar.service import SiteAuthority
from registrar.settings import AppSettings
from registrar.site import CommissionedSite, SiteHome, SiteSecrets
from signers.software import load_ssl_identity
from trustcore.keys import Signer
from trustcore.profiles import issue_service_client_certificate

if TYPE_CHECKING:
    from registrar.broker.rabbitmq_site import RabbitMQSite

__all__ = [
    "INSTANCE_CERT_VALIDITY",
    "SHARED_GROUP",
    "amqp_source",
    "channel_settings",
    "client_context",
    "est_context",
    "instance_context",
    "operational_tls",
    "site_authority",
]

#: The shared-subscription group of a site's registrar instances (Mosquitto).
SHARED_GROUP = "registrars"
#: Validity of a joining instance's in-memory client certificate.
INSTANCE_CERT_VALIDITY = timedelta(days=7)


def operational_tls(home: SiteHome, site: CommissionedSite, passphrase: bytes) -> BrokerTls:
    """Broker files through the ``current`` symlink, NOT resolved: every reload re-reads
    the state that is current then (a re-commission, a re-issued CRL)."""
    current = home.current
    return BrokerTls(
        server_cert=current / "broker.pem",
        server_key=home.key_path("broker"),
        server_key_passphrase=passphrase,
        registration_cas=current / "registration-cas.pem",
        operational_cas=current / "operational-cas.pem",
        crl_file=current / "crls.pem",
    )


def client_context(site: CommissionedSite, passphrase: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        cadata=site.root.public_bytes(serialization.Encoding.PEM).decode("ascii")
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(site.client_cert, site.client_key, password=passphrase)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the registrar client certificate: {exc}") from exc
    return ctx


def instance_context(site: CommissionedSite, instance: int, now: datetime) -> ssl.SSLContext:
    """The client identity of registrar instance ``instance`` (2..16): a fresh key made in
    memory and a certificate for ``registrar.<n>@site`` from the site CA, valid for a week
    from ``now`` (an instance restarts with a new one). The key never leaves this process."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + INSTANCE_CERT_VALIDITY, site.site_ca_cert.not_valid_after_utc)
    cert = issue_service_client_certificate(
        site.site_ca_cert,
        site.site_ca_key.private_key(),
        key.public_key(),
        service_name=instance_identity(REGISTRAR_IDENTITY, instance),
        organization=site.organization,
        not_before=now - timedelta(minutes=5),
        not_after=not_after,
    )
    pem = serialization.Encoding.PEM
    ctx = ssl.create_default_context(cadata=site.root.public_bytes(pem).decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_ssl_identity(ctx, cert.public_bytes(pem) + site.site_ca_cert.public_bytes(pem), key)
    return ctx


def amqp_source(rabbit: RabbitMQSite, traffic: SiteTraffic, *, site_duties: bool) -> RequestSource:
    """RabbitMQ: requests from the quorum queue (competing consumers: every instance is
    equal); the site-duty holder also reads telemetry and key acknowledgements."""
    from registrar.channel_amqp import AmqpRequestSource, SiteEvents

    events = None
    if site_duties and traffic.telemetry is not None and traffic.key_ack is not None:
        events = SiteEvents(traffic.telemetry, traffic.key_ack)
    return AmqpRequestSource(
        rabbit.amqp,
        traffic.register,
        renew=traffic.renew,
        site_events=events,
        on_connected=traffic.connected,
        retain_as_plain=True,
    )


def site_authority(
    site: CommissionedSite, ldevid_validity: timedelta = timedelta(days=365)
) -> SiteAuthority:
    """The issuing site CA (and, during a rollover overlap, the retiring one)."""
    retiring: tuple[tuple[x509.Certificate, Signer], ...] = ()
    if site.retiring_ca_cert is not None and site.retiring_ca_key is not None:
        retiring = ((site.retiring_ca_cert, site.retiring_ca_key),)
    return SiteAuthority(
        site.site_ca_cert, site.site_ca_key, site.organization, ldevid_validity, retiring=retiring
    )


#: How long Mosquitto keeps the site-duties instance's session (and queues telemetry and
#: key acknowledgements for it, up to ``max_queued_messages``) while it is away: long
#: enough for a reconnection or a revived Mosquitto (about 1 s), short because Mosquitto
#: 2.0.11 also hands an away session its share of ``$share`` requests (measured: 5 of 10
#: with two members, one away), which wait for it instead of another instance.
DUTIES_SESSION_EXPIRY = 60


def channel_settings(
    settings: AppSettings, endpoint: Endpoint, *, site_duties: bool
) -> MqttChannelSettings:
    """Mosquitto: MQTT v5, requests through ``$share/registrars/…`` (one instance or
    several, the same path); amqtt: MQTT 3.1.1, one instance."""
    mosquitto = settings.broker == "mosquitto"
    return MqttChannelSettings(
        endpoint=endpoint,
        client_id=instance_identity(REGISTRAR_IDENTITY, settings.instance),
        protocol="5" if mosquitto else "3.1.1",
        shared_group=SHARED_GROUP if mosquitto else None,
        site_duties=site_duties,
        workers=settings.concurrency,
        session_expiry=DUTIES_SESSION_EXPIRY if mosquitto and site_duties else 0,
    )


def est_context(home: SiteHome, secrets: SiteSecrets) -> ssl.SSLContext:
    """The EST listener's TLS from the current files: the broker's server certificate,
    the client CAs of both listeners (re-read after a re-commission or re-issue)."""
    current = home.current
    return est_server_context(
        current / "broker.pem",
        home.key_path("broker"),
        secrets.passphrase(),
        (current / "registration-cas.pem", current / "operational-cas.pem"),
    )
