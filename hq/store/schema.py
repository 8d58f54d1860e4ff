"""The HQ database schema, one list of versioned migrations per engine (pure: text only).

SQLite (``meta.schema_version``):

1. stations, entitlements, audit heads, reconciliation state, devices, ingests;
2. sites, bundles, sealed payload keys, station and root CRLs, revocation lists (and
   ``recon_allowances``);
3. the tables earlier code created on first use (re-issue grants, station CA renewals and
   retired CRLs, export keys, HQ indirect CRLs, the quorum tables, site reports and their
   sightings, all ``IF NOT EXISTS`` because an older file may hold them already) and the
   indexes the counterfeit cross-check needs at fleet scale;
4. ``entitlement_overrides``: the safety checks an operator overrode when HQ issued an
   entitlement (``hq entitle --allow-overlap``), kept as evidence beside the entitlement.

PostgreSQL (same ``meta`` row): 1. everything SQLite has at 3, with PostgreSQL types
(``BYTEA``, ``BIGINT``, identity columns); 2. SQLite's 4. Two tables get an explicit
``rowid`` identity column so that ``ORDER BY rowid`` (insertion order, SQLite's implicit
column) means the same on both engines.

Each migration runs in one transaction: a crash leaves the previous version.
"""

from __future__ import annotations

__all__ = ["POSTGRES_MIGRATIONS", "POSTGRES_VERSION", "SCHEMA_VERSION", "SQLITE_MIGRATIONS"]

#: The newest SQLite schema version (the PostgreSQL one is :data:`POSTGRES_VERSION`).
SCHEMA_VERSION = 4
POSTGRES_VERSION = 2

_SQLITE_1 = """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE stations (
    station_id TEXT PRIMARY KEY,
    ca_public_der BLOB NOT NULL,
    transport_public_der BLOB NOT NULL,
    csr_der BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
CREATE TABLE enrolment_history (
    id INTEGER PRIMARY KEY,
    station_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    ca_public_der BLOB NOT NULL,
    transport_public_der BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    replaced_at INTEGER
);
CREATE TABLE entitlements (
    station_id TEXT NOT NULL REFERENCES stations(station_id),
    sequence INTEGER NOT NULL CHECK (sequence >= 1),
    entitlement_id TEXT NOT NULL UNIQUE,
    policy_cbor BLOB NOT NULL,
    station_ca_der BLOB NOT NULL,
    station_ca_serial TEXT NOT NULL,
    package_sha256 BLOB NOT NULL,
    issued_at INTEGER NOT NULL,
    PRIMARY KEY (station_id, sequence)
);
CREATE TABLE audit_heads (
    station_id TEXT PRIMARY KEY REFERENCES stations(station_id),
    next_seq INTEGER NOT NULL,
    head_hash BLOB NOT NULL,
    last_export INTEGER NOT NULL,
    max_time INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE recon_state (
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    burned INTEGER NOT NULL,
    last_counter INTEGER NOT NULL,
    imported_at_seq INTEGER,
    PRIMARY KEY (station_id, entitlement_seq)
);
CREATE TABLE recon_days (
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    day TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (station_id, entitlement_seq, day)
);
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    key_id BLOB NOT NULL,
    audit_seq INTEGER NOT NULL,
    issued_time INTEGER NOT NULL,
    certificate BLOB
);
CREATE INDEX devices_device_id ON devices(device_id);
CREATE INDEX devices_key_id ON devices(key_id);
CREATE INDEX devices_entitlement ON devices(station_id, entitlement_seq);
CREATE TABLE ingests (
    id INTEGER PRIMARY KEY,
    station_id TEXT NOT NULL,
    export_number INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    next_seq INTEGER NOT NULL,
    records INTEGER NOT NULL,
    violations INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
"""

_SQLITE_2 = """CREATE TABLE IF NOT EXISTS recon_allowances (
    request_id BLOB PRIMARY KEY,
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    day TEXT NOT NULL,
    extra INTEGER NOT NULL
);
CREATE TABLE sites (
    site_id TEXT PRIMARY KEY,
    ca_public_der BLOB NOT NULL,
    transport_public_der BLOB NOT NULL,
    csr_der BLOB NOT NULL,
    site_ca_der BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL
);
CREATE TABLE site_bundles (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    sequence INTEGER NOT NULL CHECK (sequence >= 1),
    package_sha256 BLOB NOT NULL,
    issued_at INTEGER NOT NULL,
    devices INTEGER NOT NULL,
    PRIMARY KEY (site_id, sequence)
);
CREATE TABLE payload_keys (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    key_id BLOB NOT NULL,
    created INTEGER NOT NULL,
    enc BLOB NOT NULL,
    ct BLOB NOT NULL,
    is_current INTEGER NOT NULL,
    PRIMARY KEY (site_id, key_id)
);
CREATE TABLE station_crls (
    station_id TEXT PRIMARY KEY REFERENCES stations(station_id),
    crl_number INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    crl_der BLOB NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE root_revocations (
    serial TEXT PRIMARY KEY,
    revoked_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    subject TEXT NOT NULL
);
CREATE TABLE root_crls (
    crl_number INTEGER PRIMARY KEY,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    crl_der BLOB NOT NULL
);
CREATE TABLE revocation_lists (
    sequence INTEGER PRIMARY KEY,
    issued INTEGER NOT NULL,
    package BLOB NOT NULL
);
"""

_SQLITE_3 = """
-- recon_reissues: verified reissue_device_certificate grants, used_seq is the audit seq of
-- the re-issue that consumed the grant (NULL while unused).
CREATE TABLE IF NOT EXISTS recon_reissues (
    request_id BLOB PRIMARY KEY,
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    used_seq INTEGER
);
-- Station CA certificates issued outside an entitlement (renewal, re-key).
CREATE TABLE IF NOT EXISTS station_ca_certs (
    serial TEXT PRIMARY KEY,
    station_id TEXT NOT NULL,
    cert_der BLOB NOT NULL,
    ca_public_der BLOB NOT NULL,
    previous_public_der BLOB NOT NULL,
    kind TEXT NOT NULL,
    request_id BLOB NOT NULL UNIQUE,
    issued_at INTEGER NOT NULL
);
-- The latest CRL of each retired station CA key.
CREATE TABLE IF NOT EXISTS station_retired_crls (
    station_id TEXT NOT NULL,
    issuer_key_id BLOB NOT NULL,
    crl_number INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    crl_der BLOB NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (station_id, issuer_key_id)
);
-- The CA key of the last export HQ accepted from each station.
CREATE TABLE IF NOT EXISTS station_export_keys (
    station_id TEXT PRIMARY KEY,
    ca_public_der BLOB NOT NULL
);
-- HQ indirect CRLs (delegated CRL signer).
CREATE TABLE IF NOT EXISTS hq_crls (
    crl_number INTEGER PRIMARY KEY,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    crl_der BLOB NOT NULL
);
-- HQ quorum (hq.approvals).
CREATE TABLE IF NOT EXISTS quorum_approvers (
    key_id BLOB PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_der BLOB NOT NULL,
    added_at INTEGER NOT NULL,
    request_id BLOB
);
CREATE TABLE IF NOT EXISTS quorum_requests (
    request_id BLOB PRIMARY KEY,
    operation TEXT NOT NULL,
    request_cbor BLOB NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quorum_received (
    request_id BLOB NOT NULL REFERENCES quorum_requests(request_id),
    approver BLOB NOT NULL,
    approval_cbor BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (request_id, approver)
);
CREATE TABLE IF NOT EXISTS quorum_consumed (
    request_id BLOB PRIMARY KEY,
    operation TEXT NOT NULL,
    approvers TEXT NOT NULL,
    consumed_at INTEGER NOT NULL
);
-- Site reports and the factory certificates they saw (hq.counterfeit).
CREATE TABLE IF NOT EXISTS site_reports (
    site_id TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS site_sightings (
    site_id TEXT NOT NULL,
    station_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    device_id TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    registered INTEGER NOT NULL,
    der BLOB NOT NULL,
    report_seq INTEGER NOT NULL,
    PRIMARY KEY (site_id, station_id, serial)
);
-- The indexes the counterfeit cross-check and revocation need at fleet scale.
CREATE INDEX IF NOT EXISTS devices_certificate ON devices(station_id, serial);
CREATE INDEX IF NOT EXISTS site_sightings_certificate ON site_sightings(station_id, serial);
CREATE INDEX IF NOT EXISTS site_sightings_device ON site_sightings(device_id)
"""

_POSTGRES_1 = """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE stations (
    station_id TEXT PRIMARY KEY,
    ca_public_der BYTEA NOT NULL,
    transport_public_der BYTEA NOT NULL,
    csr_der BYTEA NOT NULL,
    enrolled_at BIGINT NOT NULL,
    generation BIGINT NOT NULL
);
CREATE TABLE enrolment_history (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    station_id TEXT NOT NULL,
    generation BIGINT NOT NULL,
    ca_public_der BYTEA NOT NULL,
    transport_public_der BYTEA NOT NULL,
    enrolled_at BIGINT NOT NULL,
    replaced_at BIGINT
);
CREATE TABLE entitlements (
    station_id TEXT NOT NULL REFERENCES stations(station_id),
    sequence BIGINT NOT NULL CHECK (sequence >= 1),
    entitlement_id TEXT NOT NULL UNIQUE,
    policy_cbor BYTEA NOT NULL,
    station_ca_der BYTEA NOT NULL,
    station_ca_serial TEXT NOT NULL,
    package_sha256 BYTEA NOT NULL,
    issued_at BIGINT NOT NULL,
    PRIMARY KEY (station_id, sequence)
);
CREATE TABLE audit_heads (
    station_id TEXT PRIMARY KEY REFERENCES stations(station_id),
    next_seq BIGINT NOT NULL,
    head_hash BYTEA NOT NULL,
    last_export BIGINT NOT NULL,
    max_time BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE recon_state (
    station_id TEXT NOT NULL,
    entitlement_seq BIGINT NOT NULL,
    issued BIGINT NOT NULL,
    burned BIGINT NOT NULL,
    last_counter BIGINT NOT NULL,
    imported_at_seq BIGINT,
    PRIMARY KEY (station_id, entitlement_seq)
);
CREATE TABLE recon_days (
    station_id TEXT NOT NULL,
    entitlement_seq BIGINT NOT NULL,
    day TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (station_id, entitlement_seq, day)
);
CREATE TABLE devices (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    device_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    station_id TEXT NOT NULL,
    entitlement_seq BIGINT NOT NULL,
    key_id BYTEA NOT NULL,
    audit_seq BIGINT NOT NULL,
    issued_time BIGINT NOT NULL,
    certificate BYTEA
);
CREATE INDEX devices_device_id ON devices(device_id);
CREATE INDEX devices_key_id ON devices(key_id);
CREATE INDEX devices_entitlement ON devices(station_id, entitlement_seq);
CREATE TABLE ingests (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    station_id TEXT NOT NULL,
    export_number BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    next_seq BIGINT NOT NULL,
    records BIGINT NOT NULL,
    violations BIGINT NOT NULL,
    report_json TEXT NOT NULL
);
CREATE TABLE recon_allowances (
    request_id BYTEA PRIMARY KEY,
    station_id TEXT NOT NULL,
    entitlement_seq BIGINT NOT NULL,
    day TEXT NOT NULL,
    extra BIGINT NOT NULL
);
CREATE TABLE sites (
    site_id TEXT PRIMARY KEY,
    ca_public_der BYTEA NOT NULL,
    transport_public_der BYTEA NOT NULL,
    csr_der BYTEA NOT NULL,
    site_ca_der BYTEA NOT NULL,
    enrolled_at BIGINT NOT NULL
);
CREATE TABLE site_bundles (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    sequence BIGINT NOT NULL CHECK (sequence >= 1),
    package_sha256 BYTEA NOT NULL,
    issued_at BIGINT NOT NULL,
    devices BIGINT NOT NULL,
    PRIMARY KEY (site_id, sequence)
);
CREATE TABLE payload_keys (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    key_id BYTEA NOT NULL,
    created BIGINT NOT NULL,
    enc BYTEA NOT NULL,
    ct BYTEA NOT NULL,
    is_current BIGINT NOT NULL,
    PRIMARY KEY (site_id, key_id)
);
CREATE TABLE station_crls (
    station_id TEXT PRIMARY KEY REFERENCES stations(station_id),
    crl_number BIGINT NOT NULL,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    crl_der BYTEA NOT NULL,
    recorded_at BIGINT NOT NULL
);
CREATE TABLE root_revocations (
    serial TEXT PRIMARY KEY,
    revoked_at BIGINT NOT NULL,
    reason TEXT NOT NULL,
    subject TEXT NOT NULL
);
CREATE TABLE root_crls (
    crl_number BIGINT PRIMARY KEY,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    crl_der BYTEA NOT NULL
);
CREATE TABLE revocation_lists (
    sequence BIGINT PRIMARY KEY,
    issued BIGINT NOT NULL,
    package BYTEA NOT NULL
);

-- recon_reissues: verified reissue_device_certificate grants, used_seq is the audit seq of
-- the re-issue that consumed the grant (NULL while unused).
CREATE TABLE recon_reissues (
    request_id BYTEA PRIMARY KEY,
    station_id TEXT NOT NULL,
    entitlement_seq BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    used_seq BIGINT,
    rowid BIGINT GENERATED ALWAYS AS IDENTITY
);
-- Station CA certificates issued outside an entitlement (renewal, re-key).
CREATE TABLE station_ca_certs (
    serial TEXT PRIMARY KEY,
    station_id TEXT NOT NULL,
    cert_der BYTEA NOT NULL,
    ca_public_der BYTEA NOT NULL,
    previous_public_der BYTEA NOT NULL,
    kind TEXT NOT NULL,
    request_id BYTEA NOT NULL UNIQUE,
    issued_at BIGINT NOT NULL,
    rowid BIGINT GENERATED ALWAYS AS IDENTITY
);
-- The latest CRL of each retired station CA key.
CREATE TABLE station_retired_crls (
    station_id TEXT NOT NULL,
    issuer_key_id BYTEA NOT NULL,
    crl_number BIGINT NOT NULL,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    crl_der BYTEA NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (station_id, issuer_key_id)
);
-- The CA key of the last export HQ accepted from each station.
CREATE TABLE station_export_keys (
    station_id TEXT PRIMARY KEY,
    ca_public_der BYTEA NOT NULL
);
-- HQ indirect CRLs (delegated CRL signer).
CREATE TABLE hq_crls (
    crl_number BIGINT PRIMARY KEY,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    crl_der BYTEA NOT NULL
);
-- HQ quorum (hq.approvals).
CREATE TABLE quorum_approvers (
    key_id BYTEA PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_der BYTEA NOT NULL,
    added_at BIGINT NOT NULL,
    request_id BYTEA
);
CREATE TABLE quorum_requests (
    request_id BYTEA PRIMARY KEY,
    operation TEXT NOT NULL,
    request_cbor BYTEA NOT NULL,
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL
);
CREATE TABLE quorum_received (
    request_id BYTEA NOT NULL REFERENCES quorum_requests(request_id),
    approver BYTEA NOT NULL,
    approval_cbor BYTEA NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (request_id, approver)
);
CREATE TABLE quorum_consumed (
    request_id BYTEA PRIMARY KEY,
    operation TEXT NOT NULL,
    approvers TEXT NOT NULL,
    consumed_at BIGINT NOT NULL
);
-- Site reports and the factory certificates they saw (hq.counterfeit).
CREATE TABLE site_reports (
    site_id TEXT PRIMARY KEY,
    sequence BIGINT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE TABLE site_sightings (
    site_id TEXT NOT NULL,
    station_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    device_id TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    registered BIGINT NOT NULL,
    der BYTEA NOT NULL,
    report_seq BIGINT NOT NULL,
    PRIMARY KEY (site_id, station_id, serial)
);
-- The indexes the counterfeit cross-check and revocation need at fleet scale.
CREATE INDEX devices_certificate ON devices(station_id, serial);
CREATE INDEX site_sightings_certificate ON site_sightings(station_id, serial);
CREATE INDEX site_sightings_device ON site_sightings(device_id)
"""

# Overridden safety checks, one row per check and entitlement (hq entitle --allow-overlap).
_OVERRIDES = """CREATE TABLE IF NOT EXISTS entitlement_overrides (
    station_id TEXT NOT NULL,
    sequence {int} NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    recorded_at {int} NOT NULL,
    PRIMARY KEY (station_id, sequence, kind),
    FOREIGN KEY (station_id, sequence) REFERENCES entitlements(station_id, sequence)
)
"""

SQLITE_MIGRATIONS: dict[int, str] = {
    1: _SQLITE_1,
    2: _SQLITE_2,
    3: _SQLITE_3,
    4: _OVERRIDES.format(int="INTEGER"),
}
POSTGRES_MIGRATIONS: dict[int, str] = {1: _POSTGRES_1, 2: _OVERRIDES.format(int="BIGINT")}
