"""The site (building) home of a registrar: ``registrar init`` and ``registrar commission``.

Modules: :mod:`.home` (the directory, ``site.json``, secrets, the revocation lock, init),
:mod:`.commission` (verify a bundle, write and switch the state), :mod:`.crl` (the site CA
CRL), :mod:`.running` (what ``registrar run`` loads; broker TLS; service certificate
re-issue). Every public name is importable from here.

Layout (see ``docs/site.md``)::

    SITE/                            0700
      site.json                      site id, organisation, broker names (strict JSON)
      certs/root-ca.pem              the manufacturer root, pinned at init (--root)
      keys/site-ca.key.pem           site CA key          (PKCS#8, encrypted, 0600)
      keys/site-ca-g2.key.pem        a later site CA key (rollover, ``registrar rollover-ca``);
                                     commission.json names the issuing and retiring keys
      keys/transport.key.pem         site transport key   (ECDH: opens bundles, payload keys)
      keys/broker.key.pem            broker TLS key       (made at the first commission)
      keys/registrar-client.key.pem  the registrar's own MQTT client key
      enrolment.cbor                 the site enrolment request to carry to HQ
      rollover.json                  a rollover in progress: the next key, not yet activated
      rollover-request.cbor          its request to carry to HQ (``hq site rollover``)
      current -> state-000003        symlink to the commissioned state, swapped atomically
      state-000003/
        commission.json              bundle sequence, digest, times, revocation list sequence
        site-ca.pem                  site CA certificate from HQ
        broker.pem                   broker certificate + site CA (server chain)
        registrar-client.pem         registrar client certificate + site CA
        registration-cas.pem         root + station CAs (registration listener)
        operational-cas.pem          site CA (operational listener)
        crls.pem                     root CRL + station CRLs + site CA CRL (PEM)
        site-crl.pem                 the site CA CRL alone (re-issued by the registrar)
        retiring-ca.pem              during a site CA rollover: the previous site CA
        retiring-crl.pem             ... and its CRL (same entries, kept fresh too)
        manifest.cbor                manifest and admission rules
        revocation-list.sealed       the HQ revocation list as received (signed)
        revocation-list.cbor         its verified content
        payload-keys.cbor            payload keys, sealed to the transport key
                                     (registrar.payload_keys format)

Commissioning verifies the whole bundle first (``trustcore.site_bundle.verify_site_bundle``),
then builds the new state in a private temporary directory and switches ``current`` to it
with one ``rename`` of a symlink: a refused bundle, a crash or a full disk leaves the
previous state exactly as it was. Secrets: the keystore passphrase comes from
``DEVTRUST_SITE_PASSPHRASE`` or a passphrase file, never the command line.
"""

from __future__ import annotations

from registrar.site.commission import (
    CommissionResult,
    commission_site,
    switch_current,
)
from registrar.site.crl import (
    crl_pem,
    load_pem_crls,
    read_crls,
    reissue_site_crl,
    write_crls,
)
from registrar.site.home import (
    BACKDATE,
    CONFIG_VERSION,
    PASSPHRASE_ENV,
    SERVICE_CERT_VALIDITY,
    SITE_CA_KEY,
    SITE_CRL_VALIDITY,
    SiteConfig,
    SiteHome,
    SiteInitResult,
    SiteSecrets,
    configure_site,
    exclusive_lock,
    init_site,
    issuing_ca_key,
    revocation_lock,
)
from registrar.site.running import (
    CommissionedSite,
    broker_settings,
    broker_tls,
    load_commissioned_site,
    reissue_service_certificates,
)

__all__ = [
    "BACKDATE",
    "CONFIG_VERSION",
    "PASSPHRASE_ENV",
    "SERVICE_CERT_VALIDITY",
    "SITE_CA_KEY",
    "SITE_CRL_VALIDITY",
    "CommissionResult",
    "CommissionedSite",
    "SiteConfig",
    "SiteHome",
    "SiteInitResult",
    "SiteSecrets",
    "broker_settings",
    "broker_tls",
    "commission_site",
    "configure_site",
    "crl_pem",
    "exclusive_lock",
    "init_site",
    "issuing_ca_key",
    "load_commissioned_site",
    "load_pem_crls",
    "read_crls",
    "reissue_service_certificates",
    "reissue_site_crl",
    "revocation_lock",
    "switch_current",
    "write_crls",
]
