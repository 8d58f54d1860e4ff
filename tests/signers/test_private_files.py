"""The hygiene helpers every component uses: private file modes, the one atomic write and child
environments."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from signers.child_env import child_env
from signers.errors import KeystoreError, SignerError
from signers.private_files import loose_paths, private_home, private_umask, write_private_file


def test_private_home_tightens_an_existing_tree_without_following_links(tmp_path: Path) -> None:
    home = tmp_path / "station"
    (home / "exports").mkdir(parents=True, mode=0o755)
    db = home / "station.db"
    db.write_bytes(b"x")
    db.chmod(0o644)
    cookie = home / "cookie"
    cookie.write_bytes(b"c")
    cookie.chmod(0o400)  # stricter than 0600 stays as it is
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"o")
    outside.chmod(0o644)
    (home / "link").symlink_to(outside)
    assert {p.name for p, _ in loose_paths(home)} == {"station", "exports", "station.db"}
    private_home(home)
    assert loose_paths(home) == []
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "exports").stat().st_mode) == 0o700
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o400
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # not ours: the link is not followed


def test_private_umask_covers_files_made_by_any_code_path(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        private_umask()
        (tmp_path / "a.txt").write_text("a")
        (tmp_path / "d").mkdir()
        subprocess.run(["touch", str(tmp_path / "by-a-child")], check=True)
        assert loose_paths(tmp_path / "a.txt") == loose_paths(tmp_path / "d") == []
        assert loose_paths(tmp_path / "by-a-child") == []
    finally:
        os.umask(old)


def test_child_env_is_an_allow_list() -> None:
    parent = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "LD_PRELOAD": "/usr/lib/faketime.so",
        "FAKETIME_TIMESTAMP_FILE": "/tmp/t",
        "DEVTRUST_SITE_PASSPHRASE": "secret",
        "DEVTRUST_HQ_PIN": "1234",
        "PYTHONPATH": "/somewhere",
        "LC_SECRET_TOKEN": "looks like locale, is not",
    }
    env = child_env(parent=parent)
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "LD_PRELOAD": "/usr/lib/faketime.so",
        "FAKETIME_TIMESTAMP_FILE": "/tmp/t",
    }
    assert child_env({"XDG_CONFIG_HOME": "/x"}, parent={})["XDG_CONFIG_HOME"] == "/x"
    with pytest.raises(SignerError, match="DEVTRUST_SITE_PASSPHRASE"):
        child_env({"DEVTRUST_SITE_PASSPHRASE": "x"}, parent={})


def test_write_private_file_atomic_mode(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    write_private_file(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(KeystoreError, match="already exists"):
        write_private_file(path, b"other")  # never replaced without overwrite
    write_private_file(path, b"new", overwrite=True, sync=False)
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]


def test_write_private_file_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    """A failure after the temporary file exists (here the ``prepare`` step, as a chown to
    the broker's user could fail) leaves the old file as it was and no temporary file."""
    path = tmp_path / "acl"
    write_private_file(path, b"old")
    seen: list[Path] = []

    def refuse(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.read_bytes() == b"new"  # complete before it is handed over
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
        raise PermissionError("chown refused")

    with pytest.raises(KeystoreError, match="chown refused"):
        write_private_file(path, b"new", overwrite=True, prepare=refuse)
    assert len(seen) == 1 and not seen[0].exists()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["acl"]
    with pytest.raises(KeystoreError, match="cannot write"):
        write_private_file(tmp_path / "missing-dir" / "x", b"x")


def test_write_private_file_mode_for_a_stricter_file(tmp_path: Path) -> None:
    cookie = tmp_path / ".erlang.cookie"
    write_private_file(cookie, b"c" * 20, mode=0o400)
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o400
    write_private_file(cookie, b"d" * 20, mode=0o400, overwrite=True)  # a rename, not a write
    assert cookie.read_bytes() == b"d" * 20
