"""Checks that a run kept its secrets: no secret in any log line, no state file or directory
readable by group or others. Used at the end of the end-to-end stories."""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from signers.private_files import loose_paths

#: Text that only a private key (in any PEM form) produces.
PEM_MARKERS = ("PRIVATE KEY-----", "BEGIN TSS2 PRIVATE KEY")


def _forms(secret: bytes) -> set[str]:
    """How a secret could appear in a log line: raw text, hex, base64 (both alphabets)."""
    forms = {secret.hex(), secret.hex().upper()}
    forms.add(base64.b64encode(secret).decode().rstrip("="))
    forms.add(base64.urlsafe_b64encode(secret).decode().rstrip("="))
    with contextlib.suppress(UnicodeDecodeError):
        forms.add(secret.decode())
    return {f for f in forms if len(f) >= 8}


def log_leaks(records: Iterable[logging.LogRecord], secrets: Mapping[str, bytes]) -> list[str]:
    """Every (record, secret) pair where the formatted line (with any traceback) shows the
    secret or a private-key PEM marker."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    forms = {name: _forms(value) for name, value in secrets.items()}
    leaks = []
    for record in records:
        line = formatter.format(record)
        for name, variants in forms.items():
            if any(v in line for v in variants):
                leaks.append(f"{name} in {record.name}: {line[:200]}")
        if any(marker in line for marker in PEM_MARKERS):
            leaks.append(f"private key PEM in {record.name}: {line[:200]}")
    return leaks


def loose_state(*homes: Path) -> list[str]:
    """Files/directories below the given homes with group/other permission bits."""
    return [f"{path} {mode:o}" for home in homes for path, mode in loose_paths(home)]
