"""File modes of every component's state: 0600 for files, 0700 for directories.

A component's home (HQ's store and keystores, the station's ``station.db``, the site's
store, bundles and CRLs) is nobody else's business: even public parts (certificates, CRLs)
sit beside databases whose rows tell who was provisioned where. So the rule is simple and
total rather than per file, and it is applied in two places:

* :func:`private_umask` at each command's entry (composition root): every file and
  directory the process creates — SQLite's database, its ``-wal``/``-shm``/journal files,
  keystores, exports — is born without group/other bits, whichever code path creates it.
* :func:`private_home` when a component opens its home: the directory is created 0700 and
  anything already there (an older version's files, an operator's copy) is tightened.

:func:`loose_paths` lists what breaks the rule (for tests and status checks).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from signers.errors import KeystoreError

__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "loose_paths", "private_home", "private_umask"]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_GROUP_OTHER = 0o077


def private_umask() -> None:
    """Make every file this process creates from now on private (umask 077)."""
    os.umask(_GROUP_OTHER)


def private_home(path: Path | str) -> Path:
    """Create ``path`` (and parents) as a 0700 directory if needed, and remove group/other
    bits from everything below it (symbolic links are not followed). Returns the path.

    Raises :class:`KeystoreError` if the directory cannot be made private.
    """
    home = Path(path)
    try:
        home.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        _tighten(home)
        for root, dirs, files in os.walk(home):
            for name in (*dirs, *files):
                _tighten(Path(root) / name)
    except OSError as exc:
        raise KeystoreError(f"cannot make {home} private: {exc}") from exc
    return home


def _tighten(path: Path) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & _GROUP_OTHER:
        return
    path.chmod(stat.S_IMODE(st.st_mode) & ~_GROUP_OTHER)


def loose_paths(path: Path | str) -> list[tuple[Path, int]]:
    """Every file or directory below ``path`` (itself included) with a group/other bit,
    with its mode. Symbolic links and FIFOs' targets are reported as they are."""
    found: list[tuple[Path, int]] = []
    top = Path(path)
    for candidate in (top, *top.rglob("*")):
        st = candidate.lstat()
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & _GROUP_OTHER:
            found.append((candidate, stat.S_IMODE(st.st_mode)))
    return found
