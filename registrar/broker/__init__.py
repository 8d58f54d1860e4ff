"""The broker behind the registrar, whichever it is: embedded amqtt or Mosquitto.

Both backends present the same behaviour (the same integration tests run against both):

* two mutual-TLS listeners on loopback or the site LAN: a **registration** listener that
  accepts device factory certificates (IDevID, chain to the manufacturer root through a
  station CA) and an **operational** listener that accepts secondary certificates (LDevID)
  issued by the site CA. A client without a certificate is refused at the TLS handshake.
* the MQTT identity (username) is the certificate's CN, which is the device id; client ids
  cannot be taken over by another identity;
* topic access by identity (:mod:`trustcore.topics`); the registrar's own service identity
  (a site-CA certificate with CN ``REGISTRAR_IDENTITY``) may use the registration topics of
  every device and ``devices/#``;
* revocation: new handshakes of a revoked certificate fail (CRL), and live sessions of a
  revoked identity are cut within seconds, without restarting the broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trustcore.endpoint import Endpoint

__all__ = [
    "REGISTRAR_IDENTITY",
    "Broker",
    "BrokerSettings",
    "BrokerTls",
    "Endpoint",
    "is_device_identity",
]

#: CN of the registrar's own MQTT client certificate (issued by the site CA). It contains
#: ``@``, which no DeviceId can, so no device identity collides with it. The registrar client
#: connects to the OPERATIONAL listener (site CA); listeners share one topic space, so it
#: reaches the registration topics from there. Backends grant this identity its rights only
#: on the operational listener: a (rogue) station CA could mint this CN, but its
#: certificates are only trusted on the registration listener.
REGISTRAR_IDENTITY = "registrar@site"


def is_device_identity(identity: str) -> bool:
    """Device ids cannot contain ``@``; every service identity (registrar, its instances,
    broker administrators) does."""
    return "@" not in identity


@dataclass(frozen=True)
class BrokerTls:
    """Files the broker needs. The server key is never a plaintext file: the embedded
    broker reads it from the encrypted keystore with its passphrase; for Mosquitto see
    ``broker_config``'s notes on how its key is supplied."""

    server_cert: Path  # PEM: broker certificate (site CA) followed by the site CA cert
    server_key: Path  # PEM, encrypted PKCS#8
    server_key_passphrase: bytes
    registration_cas: Path  # PEM bundle: manufacturer root + station CAs
    operational_cas: Path  # PEM bundle: site CA
    crl_file: Path  # PEM CRLs (one per issuing CA), re-read on reload_crls()


@dataclass(frozen=True)
class BrokerSettings:
    tls: BrokerTls
    workdir: Path  # private directory for rendered configuration, sockets, logs
    host: str = "127.0.0.1"
    registration_port: int = 0  # 0: pick a free ephemeral port
    operational_port: int = 0


class Broker(Protocol):
    """What the registrar needs from a broker. All methods are coroutines that raise
    ``registrar.errors.BrokerError`` on failure."""

    @property
    def registration_endpoint(self) -> Endpoint: ...

    @property
    def operational_endpoint(self) -> Endpoint: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def reload_crls(self) -> None:
        """Re-read ``tls.crl_file`` for new handshakes; live sessions are untouched."""

    async def disconnect(self, identity: str) -> int:
        """Cut every live session of ``identity`` (a device id); return how many were cut.
        After a revocation, call ``reload_crls`` first so the client cannot reconnect."""
        ...

    async def block(self, identity: str) -> None:
        """Deny ``identity`` everything from now on (connect, publish, subscribe), on both
        listeners, even if its certificate still verifies (belt and braces for revocation,
        and the only mechanism for an identity whose CRL cannot be updated yet)."""

    def connected_devices(self) -> int:
        """Live device sessions right now (service identities, which contain ``@``, are not
        counted): the ``devtrust_registrar_connected_devices`` gauge. Read at scrape time,
        from what the broker keeps anyway (no per-connection cost)."""
        ...

    def connection_mark(self, identity: str) -> int:
        """A mark for :meth:`cut_superseded` (take it after the superseded serials' CRL is
        in force): later connections of ``identity`` compare greater. Brokers keep this
        without a table of every identity ever seen (memory must not grow with the
        registry)."""
        ...

    async def cut_superseded(self, identity: str, serials: frozenset[int], mark: int) -> int:
        """Cut live sessions of ``identity`` that still use a certificate whose serial is in
        ``serials`` (superseded LDevIDs, already on the CRL); sessions with its current
        certificate stay. Returns how many were cut.

        A broker that can see each session's certificate (embedded) checks the serial. One
        that cannot (Mosquitto 2.0.11) relies on one session per identity (the client id is
        the identity): if ``identity`` connected after ``mark``, that connection used a
        certificate not on the CRL and took over every older session, so nothing is left
        to cut; otherwise its live session predates the CRL and is cut."""
        ...
