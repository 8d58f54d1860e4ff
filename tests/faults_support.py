"""Shared pieces of the fault tests (no tests here): run a component's real command as a
child process and kill it with SIGKILL at a random moment, or run it with a file-size
limit (``RLIMIT_FSIZE``, SIGXFSZ ignored: every write past the limit fails with EFBIG, as
on a full disk, without root or a loop mount), and check what a command left behind.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def command(name: str, *args: str) -> list[str]:
    """A console script of this project (``hq``, ``factory-station``, ``registrar``,
    ``device-sim``)."""
    return [str(BIN / name), *args]


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    fsize_limit: int | None = None,
    timeout: float = 60,
) -> Outcome:
    """Run to the end; with ``fsize_limit`` every file the child writes is capped."""

    def limit() -> None:
        if fsize_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    began = time.monotonic()
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
        preexec_fn=limit if fsize_limit is not None else None,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - began)


def run_killed_at(
    argv: Sequence[str], delay: float, *, env: Mapping[str, str] | None = None
) -> Outcome:
    """Start the command and SIGKILL it after ``delay`` seconds unless it ended before."""
    began = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return Outcome(proc.returncode, out, err, time.monotonic() - began)


def kill_loop(
    argv_for: Callable[[int], Sequence[str]],
    *,
    attempts: int,
    window: tuple[float, float],
    seed: int,
    after_each: Callable[[Outcome], None],
    env: Mapping[str, str] | None = None,
) -> list[Outcome]:
    """``attempts`` runs, each SIGKILLed at a random time in ``window`` (seconds after the
    start; a run that ends first is not killed), checking the state after each."""
    rng = random.Random(seed)
    outcomes = []
    for i in range(attempts):
        outcome = run_killed_at(argv_for(i), rng.uniform(*window), env=env)
        after_each(outcome)
        outcomes.append(outcome)
    return outcomes


def assert_one_line_error(outcome: Outcome, code: int, *words: str) -> str:
    """A refusal: the documented exit code, no traceback, one line on stderr naming it."""
    text = outcome.stderr.strip()
    assert outcome.code == code, (outcome.code, outcome.stdout, outcome.stderr)
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr
    assert len(text.splitlines()) == 1, text
    for word in words:
        assert word in text, (word, text)
    return text


def sqlite_intact(path: Path) -> None:
    """The file is a sound SQLite database (after a crash: the WAL replays or is dropped)."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def leftovers(directory: Path) -> list[str]:
    """Temporary files an interrupted atomic write left (``.tmp`` suffix)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# A directory on a filesystem that is full: a small tmpfs mounted in a private mount
# namespace (``unshare --user --map-root-user --mount``: no root needed, the mount vanishes
# with the process) and filled up. The command runs once on the full filesystem, the
# directory is listed, the filler is deleted (space freed) and the command runs again.
_UNSHARE = ("unshare", "--user", "--map-root-user", "--mount")
_FULL_DIR_SCRIPT = """
set -u
dir="$1"; logs="$2"; shift 2
mount -t tmpfs -o size=64k,mode=0700 devtrust-full "$dir" || exit 90
head -c 1M /dev/zero >"$dir/.filler" 2>/dev/null
"$@" >"$logs/out1" 2>"$logs/err1"; echo "$?" >"$logs/rc1"
ls -A "$dir" | grep -vx .filler >"$logs/ls1"
rm -f "$dir/.filler"
"$@" >"$logs/out2" 2>"$logs/err2"; echo "$?" >"$logs/rc2"
ls -A "$dir" >"$logs/ls2"
"""


@dataclass(frozen=True)
class FullDirRuns:
    full: Outcome  # the run on the full filesystem
    files_when_full: list[str]
    freed: Outcome  # the same command once space is free
    files_when_freed: list[str]


def run_on_full_directory(directory: Path, logs: Path, argv: Sequence[str]) -> FullDirRuns:
    """Run ``argv`` with ``directory`` on a full filesystem, then again with space (what
    each run printed, and what the directory held after it, are kept in ``logs``)."""
    directory.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [*_UNSHARE, "sh", "-c", _FULL_DIR_SCRIPT, "sh", str(directory), str(logs), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)

    def outcome(n: int) -> Outcome:
        code = int((logs / f"rc{n}").read_text())
        return Outcome(code, (logs / f"out{n}").read_text(), (logs / f"err{n}").read_text(), 0.0)

    def files(n: int) -> list[str]:
        return (logs / f"ls{n}").read_text().split()

    return FullDirRuns(outcome(1), files(1), outcome(2), files(2))


def run_with_little_space(
    home: Path, work: Path, steps: Sequence[tuple[int | None, Sequence[str]]], *, size_kib: int
) -> list[Outcome]:
    """Run commands against ``home`` on a filesystem with little space left: a private
    tmpfs of ``size_kib`` mounted over ``home`` (its files copied in), filled before each
    step until only ``free`` bytes are left (``None``: the filler is removed: space
    freed). Afterwards ``home`` holds what the commands left (copied back out)."""
    import shlex

    work.mkdir(parents=True, exist_ok=True)
    stage, back = work / "stage", work / "back"
    lines = [
        "set -eu",
        f"cp -a {shlex.quote(str(home))} {shlex.quote(str(stage))}",
        f"mount -t tmpfs -o size={size_kib}k devtrust-full {shlex.quote(str(home))}",
        f"cp -a {shlex.quote(str(stage))}/. {shlex.quote(str(home))}/",
        "set +e",
    ]
    filler = shlex.quote(str(home / ".filler"))
    for n, (free, argv) in enumerate(steps):
        lines.append(f"rm -f {filler}")
        if free is not None:
            lines.append(
                f"avail=$(df --output=avail -B1 {shlex.quote(str(home))} | tail -1); "
                f"head -c $((avail - {free})) /dev/zero > {filler} 2>/dev/null"
            )
        log = shlex.quote(str(work / f"step{n}"))
        lines.append(f"{shlex.join(argv)} >{log}.out 2>{log}.err; echo $? >{log}.rc")
    lines += [
        f"rm -f {filler}",
        f"cp -a {shlex.quote(str(home))}/. {shlex.quote(str(back))}/ || exit 92",
    ]
    back.mkdir()
    proc = subprocess.run(
        [*_UNSHARE, "sh", "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    shutil.rmtree(home)
    shutil.copytree(back, home, symlinks=True)
    outcomes = []
    for n in range(len(steps)):
        log = work / f"step{n}"
        outcomes.append(
            Outcome(
                int(Path(f"{log}.rc").read_text()),
                Path(f"{log}.out").read_text(),
                Path(f"{log}.err").read_text(),
                0.0,
            )
        )
    return outcomes
