"""HQ: the manufacturer root CA, station enrolment, entitlements and audit ingest."""
