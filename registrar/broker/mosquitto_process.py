"""How the registrar runs Mosquitto: as which user, with which command, and how the
server key reaches it without ever being a file in clear.

* :class:`ProcessOwner`: started as root Mosquitto drops to ``run_user``; the files it reads
  after that must belong to that user.
* :func:`launch_argv`: ``mosquitto -c CONF`` under ``setpriv --pdeathsig TERM``.
* :class:`KeyPipe`: ``keyfile`` names a FIFO (mode 0600) that a thread of the registrar
  feeds with the decrypted PEM from memory, once per open, and only while a load is
  expected (start and SIGHUP: :data:`KEY_LOADS_START`, :data:`KEY_LOADS_RELOAD`).
* :func:`free_ports`: Mosquitto cannot report a port it picked, so the registrar picks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import shutil
import socket
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from registrar.errors import BrokerError

# The broker's log lines keep the name operators filter on (one logger per backend).
log = logging.getLogger("registrar.broker.mosquitto")

#: How often Mosquitto 2.0.11 opens the keyfile (measured, see docs/broker.md): once per
#: mTLS listener at start, twice per mTLS listener on SIGHUP. Serving fewer would leave
#: Mosquitto blocked on the FIFO (a reload that never ends: detected, BrokerError).
KEY_LOADS_START = 2
KEY_LOADS_RELOAD = 4


def free_ports(hosts: Sequence[str], avoid: Collection[int] = ()) -> list[int]:
    """One free port on each of ``hosts``, all different and none in ``avoid``.

    Every probe socket stays bound until all ports are chosen: a port released at once can
    be handed out again by the next ``bind(0)`` (seen: the admin listener got the
    operational listener's port, and a restart after a crash may be offered the dead
    broker's own ports), and Mosquitto refuses a configuration with two equal ports."""
    ports: list[int] = []
    with contextlib.ExitStack() as probes:
        for host in hosts:
            while True:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = probes.enter_context(socket.socket(family))
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
                if port not in avoid and port not in ports:
                    ports.append(port)
                    break
    return ports


@dataclass(frozen=True)
class ProcessOwner:
    """Who the Mosquitto process runs as: started as root it drops to ``run_user``, and
    the files it reads after that (keys, CRL, dynsec JSON) must belong to that user."""

    name: str
    uid: int
    gid: int

    @classmethod
    def for_process(cls, run_user: str) -> ProcessOwner:
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(run_user)
            except KeyError as exc:
                raise BrokerError(f"user {run_user!r} for mosquitto does not exist") from exc
            return cls(run_user, entry.pw_uid, entry.pw_gid)
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, os.geteuid(), os.getegid())

    def own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def launch_argv(executable: str, conf: Path, owner: ProcessOwner) -> list[str]:
    """``mosquitto -c CONF``, under ``setpriv --pdeathsig TERM`` when it exists: Mosquitto
    then ends with the registrar that owns it, even a registrar killed with SIGKILL (an
    orphan would keep the site's ports, and its kick password died with the registrar).
    As root, setpriv also switches to ``run_user`` first: Mosquitto's own switch would
    clear the parent-death signal (Linux clears it on a credential change)."""
    setpriv = shutil.which("setpriv")
    argv = [executable, "-c", str(conf)]
    if setpriv is None:
        return argv
    if os.geteuid() == 0:
        ids = ["--reuid", str(owner.uid), "--regid", str(owner.gid), "--init-groups"]
        return [setpriv, *ids, "--pdeathsig", "TERM", *argv]
    return [setpriv, "--pdeathsig", "TERM", *argv]


class KeyPipe:
    """Serves the decrypted server key through a FIFO, once per open, while armed.

    Why a FIFO: the key exists in clear only in this process's memory and in Mosquitto's;
    nothing readable remains on any file system. Why "armed" windows: outside start and
    reload nobody should read the key, so nobody is served (another process of the same
    user opening the FIFO meanwhile just blocks). Why a fresh FIFO after each open: while
    one reader still holds the pipe, a second writer open would succeed too and append a
    second copy; renaming a new FIFO over the path gives every open its own pipe.
    """

    def __init__(self, path: Path, pem: bytes, owner: ProcessOwner) -> None:
        self.path = path
        self._pem = bytearray(pem)
        self._owner = owner
        self._lock = threading.Lock()
        self._expected = 0
        self._served = 0
        self._done = threading.Event()
        self._closed = False
        self._wake = threading.Event()
        self._replace()
        self._thread = threading.Thread(target=self._run, name="mosquitto-keypipe", daemon=True)
        self._thread.start()

    @property
    def served(self) -> int:
        return self._served

    def _replace(self) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.mkfifo(tmp, 0o600)
        self._owner.own(tmp)
        tmp.replace(self.path)

    def arm(self, loads: int) -> threading.Event:
        """Serve the next ``loads`` opens; the returned event is set after the last one."""
        with self._lock:
            self._expected, self._served = loads, 0
            self._done = threading.Event()
            self._wake.set()
            return self._done

    def disarm(self) -> None:
        with self._lock:
            self._expected = 0
            self._wake.clear()

    def _run(self) -> None:
        while not self._closed:
            if not self._wake.wait(0.2):
                continue
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader yet
                    time.sleep(0.0005)
                    continue
                log.error("key pipe failed: %s", exc)
                return
            try:
                self._replace()
                os.set_blocking(fd, True)
                os.write(fd, self._pem)
            except OSError as exc:
                log.warning("key pipe reader went away: %s", exc)
            finally:
                os.close(fd)
            with self._lock:
                self._served += 1
                if self._served >= self._expected:
                    self._expected = 0
                    self._wake.clear()
                    self._done.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=2)
        for i in range(len(self._pem)):  # best effort: Python may hold other copies
            self._pem[i] = 0
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
