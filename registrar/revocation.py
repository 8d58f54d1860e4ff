"""Revocation in the building: one device (``registrar revoke``) and HQ revocation lists
(``registrar import-revocations``).

Three layers act on a revocation, in this order (see ``docs/registrar.md``):

1. **Certificates** — the device's LDevID serials (current and every superseded one) go on
   the site CA CRL, re-signed at once; the brokers refuse new handshakes of those
   certificates after ``reload_crls``.
2. **Broker** — the identity is blocked (no publish, subscribe or delivery, on both
   listeners) and its live sessions are cut; this also covers a TLS identity whose
   certificate is not on any CRL we sign (e.g. a factory certificate revoked by HQ).
3. **Registrar** — :class:`RevocationAwareVerifier` refuses registration requests of a
   device revoked here or listed by HQ (public reason ``revoked``), so a revoked device
   cannot come back through re-registration with its still-valid factory certificate.

Every step is idempotent: revoking twice, or importing the same list twice, changes
nothing the second time, and an interrupted revocation is completed by running it again
(the running registrar also re-applies every block from the store at start).

Writers of the site CRL and of the revocation-list files (``registrar run``'s refresh
timer, ``registrar revoke`` and ``import-revocations`` run offline) serialise on
:func:`registrar.site.revocation_lock`, so no re-issue can lose another's entry.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from registrar.broker import Broker
from registrar.errors import ConfigError, RegistrarError
from registrar.site import (
    SiteHome,
    SiteSecrets,
    load_commissioned_site,
    read_crls,
    reissue_site_crl,
    revocation_lock,
    write_crls,
)
from registrar.store import DeviceRecord, Store
from signers.private_files import write_private_file
from trustcore.crl import RevokedEntry, load_crl, verify_crl
from trustcore.errors import ProfileError, VerificationError
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.profiles import station_id_from_certificate
from trustcore.revocation import (
    CRL_REASONS,
    REVOCATION_REASONS,
    RevocationList,
    RevocationListError,
    indirect_crls_of,
    open_revocation_list,
)
from trustcore.utctime import system_clock
from trustcore.verify import ChainVerifier, VerifiedIdentity

__all__ = [
    "LOCAL_REVOCATION_REASONS",
    "HqDataFreshness",
    "ImportResult",
    "RevocationAwareVerifier",
    "RevocationError",
    "RevokeResult",
    "crl_numbers",
    "enforce_revocation_list",
    "hq_data_freshness",
    "import_revocation_list",
    "read_revocation_list",
    "revoke_device",
]

log = logging.getLogger(__name__)

#: ``registrar revoke --reason``: the same closed set as HQ's list (no free text: it ends
#: up in CRLs, logs and reports).
LOCAL_REVOCATION_REASONS = REVOCATION_REASONS


class RevocationError(RegistrarError):
    """A revocation or a revocation-list import could not be done. ``reason``:
    ``unknown_device``, ``bad_reason``, ``not_commissioned`` or, for lists, the reason of
    :class:`trustcore.revocation.RevocationListError` (``rollback``, ``bad_signature``,
    ``untrusted_sender``, ``revoked_sender``, ``malformed``, ...)."""

    reason = "revocation_failed"


# ------------------------------------------------------------------ offline tolerance

#: The site warns from this fraction of its offline limit on (status alert, log, metric).
OFFLINE_WARN_FRACTION = 2 / 3


@dataclass(frozen=True)
class HqDataFreshness:
    """How old the newest HQ revocation data held by the site is, against its limit."""

    issued: datetime
    age: timedelta
    max_offline_days: int
    state: str  # "ok", "warning" (from 2/3 of the limit) or "refusing" (past it)

    @property
    def refuse_after(self) -> datetime:
        return self.issued + timedelta(days=self.max_offline_days)

    def to_json(self) -> dict[str, object]:
        return {
            "issued": self.issued.isoformat(),
            "age_days": round(self.age.total_seconds() / 86400, 2),
            "max_offline_days": self.max_offline_days,
            "refuse_after": self.refuse_after.isoformat(),
            "state": self.state,
        }

    def message(self) -> str:
        days = self.age.total_seconds() / 86400
        if self.state == "refusing":
            return (
                f"HQ revocation data is {days:.1f} days old, past this site's limit of "
                f"{self.max_offline_days} days: new registrations are refused until a new "
                "bundle or `registrar import-revocations` brings fresh data"
            )
        return (
            f"HQ revocation data is {days:.1f} days old; new registrations stop at "
            f"{self.refuse_after.isoformat()} (limit {self.max_offline_days} days) unless "
            "fresh data arrives (bundle or `registrar import-revocations`)"
        )


def hq_data_freshness(
    revocations: RevocationList, max_offline_days: int, now: datetime
) -> HqDataFreshness:
    """Age of the newest HQ revocation data (the list's ``issued``: HQ re-publishes it,
    with a fresh indirect CRL, at every bundle and ``hq publish-revocations``)."""
    issued = datetime.fromtimestamp(revocations.issued, UTC)
    age = now - issued
    limit = timedelta(days=max_offline_days)
    state = "ok"
    if age > limit:
        state = "refusing"
    elif age >= limit * OFFLINE_WARN_FRACTION:
        state = "warning"
    return HqDataFreshness(issued, age, max_offline_days, state)


@functools.lru_cache(maxsize=16)
def _refusing_after(issued: float, max_offline_days: int) -> datetime:
    """The last instant HQ data issued at ``issued`` (POSIX seconds) is not yet past the
    offline limit: :func:`hq_data_freshness` says "refusing" from just after it."""
    return datetime.fromtimestamp(issued, UTC) + timedelta(days=max_offline_days)


# ----------------------------------------------------------------------------- verifier


class RevocationAwareVerifier(ChainVerifier):
    """A :class:`ChainVerifier` that also refuses factory certificates HQ has listed and
    devices revoked at this site (``VerificationError`` reason ``revoked``, which the
    registration protocol reports as the public reason ``revoked``).

    Why here and not in the protocol code: the registration decision already maps a
    verifier's ``revoked`` to the right answer, and the HQ list is revocation data like a
    CRL, only signed by HQ instead of the station (which alone holds the station key).
    ``locally_revoked`` is shared, not copied: the running registrar adds to it and the
    next request sees the change.

    The HQ list also brings the indirect CRL (signed by HQ's CRL signer), the revocation
    source for factory certificates that name it (``ChainVerifier``), and possibly a newer
    root CRL than the bundle's. With ``max_offline_days``, a list older than that many days
    refuses every verification (``crl_stale``, public ``revocation_unavailable``): the
    site no longer knows what HQ revoked (docs/site.md, offline limit).
    """

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        crls: Iterable[x509.CertificateRevocationList] = (),
        *,
        hq_revocations: RevocationList,
        locally_revoked: set[DeviceId] | None = None,
        max_offline_days: int | None = None,
    ) -> None:
        held = list(crls)
        if hq_revocations.root_crl is not None:
            held.append(load_crl(hq_revocations.root_crl))  # the newest number wins
        super().__init__(roots, intermediates, held, indirect_crls=indirect_crls_of(hq_revocations))
        self.hq_revocations = hq_revocations
        self.max_offline_days = max_offline_days
        self.locally_revoked: set[DeviceId] = set() if locally_revoked is None else locally_revoked

    def verify(
        self,
        leaf: x509.Certificate | bytes,
        *,
        now: datetime,
        intermediates: Sequence[x509.Certificate] = (),
        require_device_id: bool = False,
    ) -> VerifiedIdentity:
        days = self.max_offline_days
        # ``now > issued + limit`` is ``hq_data_freshness``'s "refusing" (age > limit),
        # exactly; the full reading is made only for the refusal's message.
        if days is not None and now > _refusing_after(self.hq_revocations.issued, days):
            fresh = hq_data_freshness(self.hq_revocations, days, now)
            raise VerificationError(fresh.message(), reason="crl_stale")
        identity = super().verify(
            leaf, now=now, intermediates=intermediates, require_device_id=require_device_id
        )
        station: StationId | None
        try:
            station = station_id_from_certificate(identity.issuer)
        except ProfileError:
            station = None
        entry = self.hq_revocations.lookup(
            device_id=identity.device_id, station_id=station, serial=identity.leaf.serial_number
        )
        if entry is not None:
            raise VerificationError(
                f"listed by HQ revocation list {self.hq_revocations.sequence} "
                f"({entry.reason}, {entry.device_id}, serial {entry.serial.hex})",
                reason="revoked",
            )
        if identity.device_id is not None and identity.device_id in self.locally_revoked:
            raise VerificationError(
                f"{identity.device_id} is revoked at this site", reason="revoked"
            )
        return identity


# ------------------------------------------------------------------------ one device


@dataclass(frozen=True)
class RevokeResult:
    device_id: str
    reason: str
    serials: tuple[str, ...]  # LDevID serials (hex) now on the site CRL
    crl_number: int
    already_revoked: bool
    sessions_cut: int | None  # None: no broker running (offline revocation)


async def revoke_device(
    *,
    home: SiteHome,
    secrets: SiteSecrets,
    store: Store,
    device_id: DeviceId,
    reason: str = "unspecified",
    broker: Broker | None = None,
    now: datetime | None = None,
) -> RevokeResult:
    """Revoke a registered device: site CRL (all its LDevID serials) → store status and
    event → (if ``broker``) ``reload_crls`` → ``block`` → ``disconnect``.

    The order matters: the CRL must be in force before the kick, or a client that
    reconnects at once would get back in (Mosquitto 2.0.11 has no refusal by name).
    """
    if reason not in LOCAL_REVOCATION_REASONS:
        raise RevocationError(
            f"unknown reason {reason!r} (one of {', '.join(sorted(LOCAL_REVOCATION_REASONS))})",
            reason="bad_reason",
        )
    record = await store.device(device_id)
    if record is None:
        raise RevocationError(
            f"{device_id} is not registered at this site; a factory certificate that must "
            "never register is revoked by HQ (revocation list)",
            reason="unknown_device",
        )
    moment = system_clock() if now is None else now
    superseded = [s for s, _, _ in await store.superseded_serials(device_id)]
    serials = tuple(dict.fromkeys([record.ldevid_serial.hex, *superseded]))
    entries = tuple(
        RevokedEntry(CertSerial.from_hex(s), moment, CRL_REASONS[reason]) for s in serials
    )
    numbers = crl_numbers(store)

    def reissue() -> x509.CertificateRevocationList:
        with revocation_lock(home):
            return reissue_site_crl(home, secrets, revoke=entries, now=moment, crl_number=numbers)

    crl = await asyncio.to_thread(reissue)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    already = record.status == "revoked"
    if not already:
        await store.record_revocation(
            device_id,
            at=int(moment.timestamp()),
            detail=f"reason {reason}; ldevid {', '.join(serials)}; site CRL {number}",
        )
    cut: int | None = None
    if broker is not None:
        # CRL in force first (new handshakes of its LDevIDs fail), then cut (and count)
        # the live sessions, then block the identity, then cut again: a session opened in
        # between with a certificate no CRL of ours lists (its factory certificate) gets
        # cut as well, and the block leaves it nothing to do if it comes back.
        await broker.reload_crls()
        cut = await broker.disconnect(device_id.value)
        await broker.block(device_id.value)
        cut += await broker.disconnect(device_id.value)
    log.warning(
        "revoked %s (%s): serials %s on site CRL %d%s",
        device_id,
        reason,
        ", ".join(serials),
        number,
        "" if cut is None else f", {cut} live session(s) cut",
    )
    return RevokeResult(device_id.value, reason, serials, number, already, cut)


# -------------------------------------------------------------------- HQ revocation list


@dataclass(frozen=True)
class ImportResult:
    sequence: int
    previous: int
    status: str  # "imported" | "unchanged"
    entries: int
    revoked: tuple[RevokeResult, ...]  # registered devices revoked by this import


def read_revocation_list(home: SiteHome) -> RevocationList:
    """The HQ revocation list of the commissioned state (verified when it was stored)."""
    try:
        return RevocationList.decode((home.current / "revocation-list.cbor").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the site's revocation list: {exc}") from exc


def _root_crl(
    root: x509.Certificate, crls: Iterable[x509.CertificateRevocationList]
) -> x509.CertificateRevocationList | None:
    return next((c for c in crls if c.issuer == root.subject), None)


def _adopt_root_crl(home: SiteHome, root: x509.Certificate, revocations: RevocationList) -> bool:
    """A root CRL carried by an HQ list with a higher number than the one in ``crls.pem``
    replaces it there (call under :func:`revocation_lock`): a site that only receives
    revocation updates still gets the root CRL of each new root ceremony."""
    if revocations.root_crl is None:
        return False
    new = load_crl(revocations.root_crl)
    number = verify_crl(new, root, now=None).crl_number
    crls = read_crls(home)
    held = [c for c in crls if c.issuer == root.subject]
    if held and max(verify_crl(c, root, now=None).crl_number for c in held) >= number:
        return False
    write_crls(home, [new, *(c for c in crls if c.issuer != root.subject)])
    log.info("root CRL %d from HQ revocation list %d adopted", number, revocations.sequence)
    return True


async def import_revocation_list(
    *,
    home: SiteHome,
    secrets: SiteSecrets,
    store: Store,
    package: bytes,
    broker: Broker | None = None,
    now: datetime | None = None,
) -> tuple[ImportResult, RevocationList]:
    """Verify an HQ revocation list and make it the site's list; revoke every registered
    device it names. Returns the result and the list now in force.

    Only a newer sequence replaces the stored list (an older one is ``rollback``: it would
    un-revoke devices); the same sequence again changes no file but re-applies the list
    (which completes an earlier, interrupted import).
    """
    moment = system_clock() if now is None else now
    site = load_commissioned_site(home, secrets)
    with revocation_lock(home):
        state = home.commission_state()
        if state is None:
            raise RevocationError("the site is not commissioned", reason="not_commissioned")
        held = int(state["revocation_list_sequence"])
        try:
            revocations = open_revocation_list(
                package,
                root=site.root,
                now=moment,
                root_crl=_root_crl(site.root, site.crls),
                not_older_than=held,
            )
        except RevocationListError as exc:
            raise RevocationError(exc.message, reason=exc.reason) from exc
        status = "unchanged" if revocations.sequence == held else "imported"
        adopted = False
        if status == "unchanged":
            stored = home.current / "revocation-list.cbor"
            if stored.exists() and stored.read_bytes() != revocations.encode():
                # Two different lists under one sequence number: HQ must never sign that;
                # refuse rather than guess which one is right.
                raise RevocationError(
                    f"revocation list {held} differs from the list {held} already held",
                    reason="conflicting_list",
                )
        if status == "imported":
            current = home.current
            write_private_file(current / "revocation-list.sealed", package, overwrite=True)
            write_private_file(
                current / "revocation-list.cbor", revocations.encode(), overwrite=True
            )
            adopted = _adopt_root_crl(home, site.root, revocations)
            state["revocation_list_sequence"] = revocations.sequence
            write_private_file(
                current / "commission.json",
                (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(),
                overwrite=True,
            )
    if status == "imported" and adopted and broker is not None:
        await broker.reload_crls()  # the embedded registration listener checks the root CRL
    if status == "imported":
        await store.record_event(
            None,
            "revocation-list",
            f"HQ revocation list {revocations.sequence} imported "
            f"({len(revocations.entries)} entries; previous {held})",
        )
    revoked = await enforce_revocation_list(
        home=home, secrets=secrets, store=store, revocations=revocations, broker=broker, now=moment
    )
    result = ImportResult(revocations.sequence, held, status, len(revocations.entries), revoked)
    return result, revocations


async def enforce_revocation_list(
    *,
    home: SiteHome,
    secrets: SiteSecrets,
    store: Store,
    revocations: RevocationList,
    broker: Broker | None = None,
    now: datetime | None = None,
) -> tuple[RevokeResult, ...]:
    """Revoke every registered device the list names and that is not revoked yet (also used
    at start-up: a re-commission may have brought a newer list while the registrar was
    down). Devices listed but not registered are refused when they try (the verifier)."""
    # One bounded look-up per list entry (by device id first, then by factory certificate),
    # never a walk over the whole registry.
    out = []
    matched: list[tuple[DeviceRecord, str]] = []
    for entry in revocations.entries:
        record = await store.device(entry.device_id)
        if record is not None:
            matched.append((record, entry.reason))
    for entry in revocations.entries:
        record = await store.device_by_idevid(entry.station_id, entry.serial)
        if record is not None:
            matched.append((record, entry.reason))
    done: set[DeviceId] = set()
    for record, reason in matched:
        if record.status == "revoked" or record.device_id in done:
            continue
        done.add(record.device_id)
        out.append(
            await revoke_device(
                home=home,
                secrets=secrets,
                store=store,
                device_id=record.device_id,
                reason=reason,
                broker=broker,
                now=now,
            )
        )
    return tuple(out)


def crl_numbers(store: Store) -> Callable[[int], int]:
    """``crl_number`` for :func:`registrar.site.reissue_site_crl` run in a worker thread
    (under the blocking :func:`revocation_lock`): the store's site-wide CRL sequence, asked
    on this event loop. Call from the event loop's thread."""
    loop = asyncio.get_running_loop()

    def next_number(at_least: int) -> int:
        return asyncio.run_coroutine_threadsafe(store.next_crl_number(at_least), loop).result(60)

    return next_number
