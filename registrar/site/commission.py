"""``registrar commission``: verify a site bundle, build the new state directory beside the
current one (service certificates, CRLs, manifest, revocation list, payload keys) and
switch ``current`` to it with one atomic rename; a refused bundle, a crash or a full disk
leaves the previous state as it was. Also the site CA rollover's activation (the bundle
for the pending key)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets as _random
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from registrar.errors import CommissionError, ConfigError
from registrar.payload_keys import PayloadKeyStore
from registrar.site.crl import (
    crl_pem,
    previous_site_crl,
    sign_site_crl,
)
from registrar.site.home import (
    SITE_CA_KEY,
    SiteHome,
    SiteSecrets,
    current_cert,
    issuing_ca_key,
    pem,
    revocation_lock,
)
from registrar.site.running import (
    issue_service_certificates,
    service_validity,
)
from signers.errors import SignerError
from signers.private_files import write_private_file
from signers.software import SoftwareKey
from trustcore import cbor
from trustcore.errors import TrustCoreError
from trustcore.profiles import (
    station_id_from_certificate,
)
from trustcore.site_bundle import (
    MAX_SITE_BUNDLE_SIZE,
    AdmissionEntry,
    SiteBundleError,
    VerifiedSiteBundle,
    verify_site_bundle,
)
from trustcore.utctime import now_utc

__all__ = [
    "CommissionResult",
    "commission_site",
    "switch_current",
]


_STATE_PREFIX = "state-"


@dataclass(frozen=True)
class CommissionResult:
    site_id: str
    sequence: int
    state_dir: Path
    manifest_devices: int
    admission: tuple[AdmissionEntry, ...]
    station_ids: tuple[str, ...]
    revocation_list_sequence: int
    revoked_devices: int
    payload_key_ids: tuple[str, ...]
    current_payload_key: str
    root_crl_next_update: datetime
    broker_names: tuple[str, ...]
    warnings: tuple[str, ...]
    #: HQ's offline limit for the site (days without fresh HQ revocation data).
    max_offline_days: int = 30


def _ensure_key(home: SiteHome, name: str, passphrase: bytes) -> SoftwareKey:
    path = home.key_path(name)
    try:
        if path.exists():
            return SoftwareKey.load(path, passphrase)
        key = SoftwareKey.generate()
        key.save(path, passphrase)
        return key
    except SignerError as exc:
        raise ConfigError(f"{name} key: {exc}", reason="bad_secret") from exc


@dataclass(frozen=True)
class _SiteCas:
    """The site CAs a new state is written with: the issuing one (the bundle's) and, during
    a rollover overlap, the retiring one (still trusted, its CRL still kept fresh)."""

    issuing_name: str
    retiring: tuple[str, SoftwareKey, x509.Certificate] | None = None
    #: the certificate the current ``site-crl.pem`` is verified with (None: bundle's CA)
    previous_crl_issuer: x509.Certificate | None = None


def _write_state(
    home: SiteHome,
    verified: VerifiedSiteBundle,
    package: bytes,
    site_key: SoftwareKey,
    transport: SoftwareKey,
    passphrase: bytes,
    moment: datetime,
    cas: _SiteCas | None = None,
) -> Path:
    """Build the state directory for ``verified`` beside the current one; return it."""
    cas = cas or _SiteCas(SITE_CA_KEY)
    site_ca = verified.site_ca_cert
    broker_key = _ensure_key(home, "broker", passphrase)
    client_key = _ensure_key(home, "registrar-client", passphrase)
    broker_cert, client_cert = issue_service_certificates(
        home,
        site_ca,
        site_key.private_key(),
        broker_key.public_key(),
        client_key.public_key(),
        service_validity(site_ca, moment),
    )
    entries, number = previous_site_crl(home, cas.previous_crl_issuer or site_ca)
    site_crl = sign_site_crl(site_ca, site_key, entries, number + 1, moment)
    # During a rollover overlap every site CA lists every serial the site revoked (one
    # entry list, one CRL number, each CA signs its own copy).
    retiring_files: dict[str, bytes] = {}
    retiring_crls: tuple[x509.CertificateRevocationList, ...] = ()
    retiring_cas: tuple[x509.Certificate, ...] = ()
    if cas.retiring is not None:
        _, old_key, old_cert = cas.retiring
        old_crl = sign_site_crl(old_cert, old_key, entries, number + 1, moment)
        retiring_files = {"retiring-ca.pem": pem(old_cert), "retiring-crl.pem": crl_pem(old_crl)}
        retiring_crls, retiring_cas = (old_crl,), (old_cert,)

    staging = home.path / f".{_STATE_PREFIX}{verified.sequence:06d}.{_random.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        files: dict[str, bytes] = {
            "site-ca.pem": pem(site_ca),
            "broker.pem": pem(broker_cert) + pem(site_ca),
            "registrar-client.pem": pem(client_cert) + pem(site_ca),
            "registration-cas.pem": b"".join(
                pem(c) for c in (home.root_certificate(), *verified.station_cas)
            ),
            "operational-cas.pem": b"".join(pem(c) for c in (site_ca, *retiring_cas)),
            "crls.pem": b"".join(
                crl_pem(c)
                for c in (verified.root_crl, *verified.station_crls, site_crl, *retiring_crls)
            ),
            "site-crl.pem": crl_pem(site_crl),
            **retiring_files,
            "manifest.cbor": cbor.encode(
                {
                    "v": 1,
                    "manifest": [e.to_map() for e in verified.payload.manifest],
                    "admission": [a.to_map() for a in verified.payload.admission],
                }
            ),
            "revocation-list.sealed": verified.payload.revocation_list,
            "revocation-list.cbor": verified.revocations.encode(),
        }
        for name, data in files.items():
            write_private_file(staging / name, data)
        # Payload keys: what the registrar already holds (including keys it rotated itself),
        # plus the bundle's keys exactly as received (still sealed to the transport key).
        previous = PayloadKeyStore(home.payload_keys_path, transport)
        old_entries: list[dict[str, Any]] = []
        if home.commissioned and previous.exists():
            doc = cbor.decode(previous.path.read_bytes(), max_size=1 << 20)
            old_entries = list(doc["keys"])
        have = {e["key_id"] for e in old_entries}
        new_entries = [k.to_map() for k in verified.payload.payload_keys if k.key_id not in have]
        keys_doc = {
            "v": 1,
            "current": verified.payload.current_payload_key,
            "keys": old_entries + new_entries,
        }
        write_private_file(staging / "payload-keys.cbor", cbor.encode(keys_doc))
        PayloadKeyStore(staging / "payload-keys.cbor", transport).load()  # opens, or fails
        state = {
            "bundle_sequence": verified.sequence,
            "bundle_created": verified.created,
            "bundle_sha256": hashlib.sha256(package).hexdigest(),
            "commissioned_at": int(moment.timestamp()),
            "revocation_list_sequence": verified.revocations.sequence,
            "site_crl_number": number + 1,
            "site_ca_key": cas.issuing_name,
            "max_offline_days": verified.payload.max_offline_days,
        }
        if cas.retiring is not None:
            state["retiring_ca_key"] = cas.retiring[0]
        write_private_file(
            staging / "commission.json",
            (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(),
        )
        final = home.path / f"{_STATE_PREFIX}{verified.sequence:06d}"
        if final.exists():  # a leftover of a crash between rename and switch: never current
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def switch_current(home: SiteHome, state_dir: Path) -> None:
    """Point ``current`` at ``state_dir`` with one atomic rename, then drop old states
    (the previous one is kept for inspection)."""
    link = home.path / f".current.{_random.token_hex(4)}"
    link.symlink_to(state_dir.name)
    link.replace(home.current)
    fd = os.open(home.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    states = sorted(p for p in home.path.glob(f"{_STATE_PREFIX}*") if p.is_dir())
    for old in states[:-2]:
        if old.name != state_dir.name:
            shutil.rmtree(old, ignore_errors=True)


def _state_cas(home: SiteHome, secrets: SiteSecrets, *, activation: bool) -> _SiteCas:
    """Which site CAs the next state carries: on activation the pending key issues and the
    current issuing CA retires; otherwise the current ones carry forward."""
    issuing, retiring = home.ca_key_names()
    if not home.commissioned:
        return _SiteCas(issuing)
    if activation:
        pending = home.pending_rollover_key()
        assert pending is not None
        if retiring is not None:
            raise CommissionError(
                "a previous rollover is still in its overlap: retire its CA first "
                "(`registrar rollover-ca --retire`)",
                reason="rollover_in_progress",
            )
        old_cert = current_cert(home, "site-ca.pem")
        return _SiteCas(pending, (issuing, home.key(issuing, secrets), old_cert), old_cert)
    if retiring is None:
        return _SiteCas(issuing)
    return _SiteCas(
        issuing, (retiring, home.key(retiring, secrets), current_cert(home, "retiring-ca.pem"))
    )


def commission_site(
    home: SiteHome, package: bytes, secrets: SiteSecrets, *, now: datetime | None = None
) -> CommissionResult:
    """Verify ``package`` against this site and, only if every check passes, make it the
    commissioned state. Raises :class:`CommissionError` (``reason`` from
    ``verify_site_bundle``) on refusal; nothing is changed then."""
    moment = now_utc(now)
    if len(package) > MAX_SITE_BUNDLE_SIZE:
        raise CommissionError("the bundle is larger than any site bundle", reason="oversized")
    passphrase = secrets.passphrase()
    transport = home.key("transport", secrets)

    def verify_with(state: dict[str, Any] | None, site_key: SoftwareKey) -> VerifiedSiteBundle:
        try:
            return verify_site_bundle(
                package,
                root=home.root_certificate(),
                transport=transport,
                site_id=home.site_id,
                site_ca_public=site_key.public_key(),
                last_sequence=None if state is None else int(state["bundle_sequence"]),
                last_revocation_sequence=(
                    None if state is None else int(state["revocation_list_sequence"])
                ),
                now=moment,
            )
        except SiteBundleError as exc:
            raise CommissionError(str(exc.args[0]), reason=exc.reason) from exc

    # The bundle's site CA is either the issuing one, or (a rollover being activated) the
    # certificate HQ issued for the pending next key (``registrar rollover-ca``).
    activation = False
    site_key = issuing_ca_key(home, secrets)

    def verify(state: dict[str, Any] | None) -> VerifiedSiteBundle:
        nonlocal activation, site_key
        activation, site_key = False, issuing_ca_key(home, secrets)
        try:
            return verify_with(state, site_key)
        except CommissionError as exc:
            pending = home.pending_rollover_key()
            if exc.reason != "wrong_site_key" or pending is None:
                raise
            next_key = home.key(pending, secrets)
            verified = verify_with(state, next_key)
            activation, site_key = True, next_key
            return verified

    state = home.commission_state()
    verified = verify(state)  # a refused bundle changes nothing, not even the lock file
    # Writing and switching happen under the lock every writer of the site CRL and the
    # revocation list holds (a running registrar's revoke / import-revocations): the state
    # carried forward (site CRL entries, list sequence) must still be the state when
    # ``current`` switches, or a live revocation in between would be dropped (un-revoked
    # on the CRL, or the list rolled back).
    with revocation_lock(home):
        fresh = home.commission_state()
        if fresh != state:  # changed since the check: check again against it
            verified = verify(fresh)
        cas = _state_cas(home, secrets, activation=activation)
        try:
            state_dir = _write_state(
                home, verified, package, site_key, transport, passphrase, moment, cas
            )
            switch_current(home, state_dir)
        except (OSError, SignerError, TrustCoreError) as exc:
            raise ConfigError(f"cannot write the site state: {exc}") from exc
        if activation:
            home.rollover_path.unlink(missing_ok=True)
    if activation:
        warnings_prefix: tuple[str, ...] = (
            f"site CA rolled over to {verified.site_ca_cert.subject.rfc4514_string()}: new "
            "LDevIDs come from it; the previous CA stays trusted until `registrar rollover-ca "
            "--retire` (move devices with `--migrate-all` or at their next renewal)",
        )
    else:
        warnings_prefix = ()
    warnings: list[str] = list(warnings_prefix)
    for station in verified.stations_without_crl:
        warnings.append(
            f"no CRL for station {station}: the registration listener refuses its devices "
            "until HQ sends one"
        )
    for station in verified.stale_station_crls:
        warnings.append(
            f"the CRL of station {station} is past its nextUpdate: its devices are refused "
            "(fail closed) until HQ sends a fresh one"
        )
    if not verified.payload.manifest and not verified.payload.admission:
        warnings.append("the bundle admits no device")
    next_update = verified.root_crl.next_update_utc
    assert next_update is not None
    return CommissionResult(
        site_id=home.site_id.value,
        sequence=verified.sequence,
        state_dir=state_dir,
        manifest_devices=len(verified.payload.manifest),
        admission=verified.payload.admission,
        station_ids=tuple(
            sorted({station_id_from_certificate(c).value for c in verified.station_cas})
        ),
        revocation_list_sequence=verified.revocations.sequence,
        revoked_devices=len(verified.revocations.entries),
        payload_key_ids=tuple(k.key_id.hex() for k in verified.payload.payload_keys),
        current_payload_key=verified.payload.current_payload_key.hex(),
        root_crl_next_update=next_update,
        broker_names=home.config.broker_names + home.config.broker_ips,
        warnings=tuple(warnings),
        max_offline_days=verified.payload.max_offline_days,
    )
