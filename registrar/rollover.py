"""Site CA rollover at the site: ``registrar rollover-ca`` (see ``docs/site.md``).

The life of a rollover, every step a file or a command, no device offline at any step::

    begin      registrar rollover-ca            next CA key (keystore) + rollover-request.cbor
    HQ         hq site rollover REQUEST         HQ checks continuity, issues the next site CA
               hq site bundle --site S          the bundle carries the new site CA
    activate   registrar commission BUNDLE      new CA issues (LDevIDs, broker, registrar
                                                client, CRL); the previous CA RETIRES: still
                                                trusted on the operational listener, its CRL
                                                kept fresh (``registrar.site``)
    migrate    registrar rollover-ca --migrate-all   signed "renew now" to each device
               (or: each device at its renewal)      still on the retiring CA
    retire     registrar rollover-ca --retire   refused while a live LDevID (registered,
                                                unexpired) comes from the retiring CA; then the
                                                CA leaves the trust files and its key is destroyed

Pure decisions (which devices still depend on a CA) are functions of the store's records;
the file work happens under the site's ``revocation_lock`` like every other writer of the
commissioned state.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from registrar.errors import ConfigError, RolloverError
from registrar.site import (
    SITE_CA_KEY,
    SiteHome,
    SiteSecrets,
    crl_pem,
    load_pem_crls,
    revocation_lock,
    switch_current,
)
from registrar.store import DeviceRecord
from signers.errors import SignerError
from signers.private_files import write_private_file
from signers.software import SoftwareKey
from trustcore.csr import build_csr
from trustcore.keys import key_id
from trustcore.messages import SiteEnrolment
from trustcore.site_rollover import SiteCaRollover
from trustcore.utctime import system_clock

__all__ = [
    "REQUEST_FILE",
    "RetireResult",
    "RolloverBegun",
    "RolloverError",
    "begin_rollover",
    "dependents",
    "migration_requested",
    "note_migration",
    "retire_site_ca",
    "rollover_status",
]

REQUEST_FILE = "rollover-request.cbor"
#: How many dependent device ids a refusal names.
_NAMED = 10


@dataclass(frozen=True)
class RolloverBegun:
    request_path: Path
    key_name: str
    key_id: str
    status: str  # "begun" or "pending" (the same request again)


def _next_key_name(home: SiteHome) -> str:
    n = 2
    while home.key_path(f"{SITE_CA_KEY}-g{n}").exists():
        n += 1
    return f"{SITE_CA_KEY}-g{n}"


def begin_rollover(
    home: SiteHome, secrets: SiteSecrets, *, now: datetime | None = None
) -> RolloverBegun:
    """Make the next site CA key and the request HQ signs (``hq site rollover``). A rollover
    already begun returns its request again (same key: idempotent). Refused before the first
    commission and while a previous rollover's CA has not been retired."""
    if not home.commissioned:
        raise RolloverError("the site is not commissioned yet", reason="not_commissioned")
    request_path = home.path / REQUEST_FILE
    with revocation_lock(home):
        issuing, retiring = home.ca_key_names()
        if retiring is not None:
            raise RolloverError(
                f"the previous site CA ({retiring}) is still retiring: "
                "`registrar rollover-ca --retire` first",
                reason="rollover_in_progress",
            )
        pending = home.pending_rollover_key()
        if pending is not None and request_path.is_file():
            key = home.key(pending, secrets)
            return RolloverBegun(request_path, pending, key_id(key.public_key()).hex(), "pending")
        passphrase = secrets.passphrase()
        current = home.key(issuing, secrets)
        transport = home.key("transport", secrets)
        name = pending or _next_key_name(home)
        try:
            if home.key_path(name).exists():
                new = SoftwareKey.load(home.key_path(name), passphrase)
            else:
                new = SoftwareKey.generate()
                new.save(home.key_path(name), passphrase)
        except SignerError as exc:
            raise ConfigError(f"cannot make the next site CA key: {exc}") from exc
        sid = home.site_id
        csr = build_csr(new, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sid.value)]))
        enrolment = SiteEnrolment.create(sid, csr, new, transport.public_key())
        request = SiteCaRollover.create(enrolment, current)
        moment = int((now or system_clock()).timestamp())
        write_private_file(request_path, request.encode(), overwrite=True)
        doc = {"v": 1, "key": name, "previous": issuing, "begun": moment}
        write_private_file(
            home.rollover_path, (json.dumps(doc, sort_keys=True) + "\n").encode(), overwrite=True
        )
    return RolloverBegun(request_path, name, key_id(new.public_key()).hex(), "begun")


# ------------------------------------------------------------------------------- status


def dependents(
    records: list[DeviceRecord], ca: x509.Certificate, now: datetime
) -> list[DeviceRecord]:
    """Registered devices whose CURRENT LDevID was issued by ``ca`` and has not expired: the
    live certificates that keep ``ca`` from being retired. (Superseded LDevIDs do not count:
    retiring their CA is what finally makes them useless.)"""
    out = []
    for record in records:
        if record.status != "registered":
            continue
        try:
            cert = x509.load_der_x509_certificate(record.ldevid_der)
        except ValueError:
            continue
        if cert.issuer == ca.subject and cert.not_valid_after_utc > now:
            out.append(record)
    return out


def _cert_json(cert: x509.Certificate | None) -> dict[str, Any] | None:
    if cert is None:
        return None
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key_id": key_id(cert.public_key()).hex(),  # type: ignore[arg-type]
    }


def rollover_status(
    home: SiteHome, records: list[DeviceRecord], *, now: datetime | None = None
) -> dict[str, Any]:
    """Issuing and retiring CA, a pending rollover, and how many devices are on which CA."""
    moment = now or system_clock()
    issuing_name, retiring_name = home.ca_key_names()
    issuing = _load(home.current / "site-ca.pem")
    retiring = _load(home.current / "retiring-ca.pem") if retiring_name else None
    on_retiring = dependents(records, retiring, moment) if retiring is not None else []
    on_issuing = dependents(records, issuing, moment) if issuing is not None else []
    return {
        "issuing": {"key": issuing_name, "certificate": _cert_json(issuing)},
        "retiring": None
        if retiring is None
        else {"key": retiring_name, "certificate": _cert_json(retiring)},
        "pending_key": home.pending_rollover_key(),
        "devices_on_issuing": len(on_issuing),
        "devices_on_retiring": len(on_retiring),
        "retiring_dependents": [r.device_id.value for r in on_retiring[:_NAMED]],
    }


def _load(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ migrate

_MIGRATE_FILE = "rollover-migrate.json"


def note_migration(home: SiteHome, *, now: datetime | None = None) -> None:
    """Record that ``--migrate-all`` was asked for (until the retiring CA is retired)."""
    moment = int((now or system_clock()).timestamp())
    doc = (json.dumps({"v": 1, "requested": moment}) + "\n").encode()
    write_private_file(home.path / _MIGRATE_FILE, doc, overwrite=True)


def migration_requested(home: SiteHome) -> bool:
    return (home.path / _MIGRATE_FILE).is_file()


# ------------------------------------------------------------------------------- retire


@dataclass(frozen=True)
class RetireResult:
    retired: str  # subject of the retired CA
    key_name: str
    state_dir: Path


def _destroy_key_file(path: Path) -> None:
    """Overwrite the (encrypted) key file with random bytes, fsync, unlink."""
    try:
        size = path.stat().st_size
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, os.urandom(max(size, 1)))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
    except FileNotFoundError:
        return


def retire_site_ca(
    home: SiteHome, records: list[DeviceRecord], *, now: datetime | None = None
) -> RetireResult:
    """Stop trusting the retiring site CA and destroy its key, if no live LDevID depends on
    it (else :class:`RolloverError` ``ca_in_use``, naming devices). Writes a new state
    directory (a copy of the current one without the retiring CA and its CRL) and switches
    ``current`` to it atomically; a running registrar reloads its brokers from it."""
    moment = now or system_clock()
    with revocation_lock(home):
        retiring = home.ca_key_names()[1]
        if retiring is None:
            raise RolloverError("no site CA is retiring", reason="nothing_to_retire")
        cert = _load(home.current / "retiring-ca.pem")
        if cert is None:
            raise ConfigError("the commissioned state has no readable retiring-ca.pem")
        waiting = dependents(records, cert, moment)
        if waiting:
            names = ", ".join(r.device_id.value for r in waiting[:_NAMED])
            more = f" and {len(waiting) - _NAMED} more" if len(waiting) > _NAMED else ""
            raise RolloverError(
                f"{len(waiting)} device(s) still hold a live LDevID of the retiring CA "
                f"({names}{more}): `registrar rollover-ca --migrate-all`, or wait for their "
                "renewal",
                reason="ca_in_use",
            )
        state_dir = _retired_state(home, cert, moment)
        switch_current(home, state_dir)
        _destroy_key_file(home.key_path(retiring))
        (home.path / _MIGRATE_FILE).unlink(missing_ok=True)
    return RetireResult(cert.subject.rfc4514_string(), retiring, state_dir)


def _retired_state(home: SiteHome, retiring: x509.Certificate, moment: datetime) -> Path:
    source = home.current.resolve()
    base = source.name.split(".")[0]
    n = 1
    while (home.path / f"{base}.r{n}").exists():
        n += 1
    final = home.path / f"{base}.r{n}"
    staging = home.path / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, symlinks=True)
    try:
        staging.chmod(0o700)
        pem = serialization.Encoding.PEM
        ops = [
            c
            for c in x509.load_pem_x509_certificates((staging / "operational-cas.pem").read_bytes())
            if c.subject != retiring.subject
        ]
        write_private_file(
            staging / "operational-cas.pem",
            b"".join(c.public_bytes(pem) for c in ops),
            overwrite=True,
        )
        crls = [
            c
            for c in load_pem_crls((staging / "crls.pem").read_bytes())
            if c.issuer != retiring.subject
        ]
        write_private_file(staging / "crls.pem", b"".join(crl_pem(c) for c in crls), overwrite=True)
        (staging / "retiring-ca.pem").unlink(missing_ok=True)
        (staging / "retiring-crl.pem").unlink(missing_ok=True)
        state = json.loads((staging / "commission.json").read_text(encoding="utf-8"))
        state.pop("retiring_ca_key", None)
        state["retired_at"] = int(moment.timestamp())
        write_private_file(
            staging / "commission.json",
            (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(),
            overwrite=True,
        )
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
