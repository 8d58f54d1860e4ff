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

:func:`loose_paths` lists what breaks the rule (for tests and status checks), and
:func:`write_private_file` is the project's one atomic write: every component writes a file
that others may read at any moment (keys, certificates, bundles, broker configuration,
status) through it. :func:`new_home` builds a component's home all-or-nothing (``hq init``,
``registrar init``) and :func:`require_empty_home` refuses to build over anything.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from signers.errors import KeystoreError

__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "loose_paths",
    "new_home",
    "private_home",
    "private_umask",
    "require_empty_home",
    "write_private_file",
]

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
                # A file that vanished since the listing (a running registrar's temporary
                # status file, renamed into place) needs nothing.
                with contextlib.suppress(FileNotFoundError):
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
        try:
            st = candidate.lstat()
        except FileNotFoundError:  # vanished since the listing
            if candidate == top:
                raise
            continue
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & _GROUP_OTHER:
            found.append((candidate, stat.S_IMODE(st.st_mode)))
    return found


def write_private_file(
    path: Path | str,
    data: bytes,
    *,
    overwrite: bool = False,
    mode: int = PRIVATE_FILE,
    sync: bool = True,
    prepare: Callable[[Path], None] | None = None,
) -> None:
    """Write ``data`` atomically to ``path``, with mode 0600 unless ``mode`` says otherwise
    (the process umask applies on top).

    A temporary file in the same directory (``.NAME.PID.RANDOM.tmp``) is created with
    ``O_EXCL`` and ``mode`` (so the bytes are never visible to others, not even briefly),
    written in full, fsynced, handed to ``prepare`` (e.g. a chown to the broker's user),
    then moved into place; the directory is fsynced too so the rename survives a power
    cut. A reader sees the old file or the new one, never half of one, and on any failure
    (a full disk, ``prepare`` raising) the temporary file is removed and ``path`` is as it
    was. Without ``overwrite`` an existing file is never replaced: losing a key to a typo is
    worse than an error. ``sync=False`` skips both fsyncs, for files regenerated from
    durable state at every start (broker configuration, status snapshots) or that a later
    synced write in the same directory commits.

    Raises :class:`KeystoreError` (the cause chained) if the file cannot be written.
    """
    dest = Path(path)
    directory = dest.parent
    tmp = directory / f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if prepare is not None:
            prepare(tmp)
        if overwrite:
            tmp.replace(dest)
        else:
            # link() fails if dest exists: no check-then-act race with another writer.
            os.link(tmp, dest)
            tmp.unlink()
        if sync:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except FileExistsError as exc:
        raise KeystoreError(f"{dest} already exists (pass overwrite=True to replace it)") from exc
    except OSError as exc:
        raise KeystoreError(f"cannot write {dest}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def require_empty_home(target: Path, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` if ``target`` exists and is not an empty directory."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise error(f"{target} already exists and is not empty; refusing to overwrite it")


@contextlib.contextmanager
def new_home(target: Path, error: Callable[[str], Exception]) -> Iterator[Path]:
    """Yield a private (0700) sibling directory of ``target`` to build a new home in, and
    rename it into place when the block ends; on any failure remove it, so a failure half-way
    leaves no half-made home and ``target`` untouched. rename() onto an empty directory
    replaces it; onto a non-empty one it fails (``error("cannot create …")``), so a home
    created concurrently is never overwritten."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build = target.parent / f".{target.name}.init-{os.getpid()}-{secrets.token_hex(4)}"
    build.mkdir(mode=0o700)
    try:
        yield build
        try:
            build.rename(target)
        except OSError as exc:
            raise error(f"cannot create {target}: {exc}") from exc
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
