"""Run a software TPM (``swtpm``) as a child process: one per simulated device.

A simulated device keeps its TPM state in a directory across power cycles, exactly as a
real device keeps its TPM: :meth:`Swtpm.restart` stops the process and starts a new one on
the same state directory, so keys wrapped by the storage key and NV counters survive.

Ports are chosen at random from a range below the kernel's ephemeral range (so they do not
race with ``bind(port=0)`` users) and then *verified*: two free ports are probed, swtpm is
started, and if it dies because another process grabbed a port in the meantime we pick a new
pair and try again. The data port is ``P`` and the control port ``P + 1`` (swtpm's
convention, which the ``swtpm`` TCTI relies on).

A raw swtpm socket has no resource manager and serves one client connection at a time, so
treat each instance as owned by exactly one :class:`signers.tpm.Tpm` connection.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from device_sim.errors import DeviceSimError
from signers.child_env import child_env
from signers.errors import SignerError
from signers.private_files import write_private_file

__all__ = ["Swtpm", "SwtpmError", "provision_ek_certificate"]

_PORT_RANGE = (20000, 32000)  # below Linux's default ephemeral range 32768-60999
_START_ATTEMPTS = 20
_READY_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_CMD_GET_CAPABILITY = 1  # swtpm control channel command (big-endian uint32)


class SwtpmError(DeviceSimError):
    """swtpm could not be started, did not answer, or provisioning failed."""

    reason = "swtpm_failed"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair(rng: random.Random) -> int:
    for _ in range(200):
        port = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - 1)
        if _port_free(port) and _port_free(port + 1):
            return port
    raise SwtpmError("no free port pair found for swtpm")


def _ctrl_answers(port: int) -> bool:
    """True once the control channel answers CMD_GET_CAPABILITY with TPM_SUCCESS."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(struct.pack(">I", _CMD_GET_CAPABILITY))
            reply = b""
            while len(reply) < 8:
                chunk = s.recv(8 - len(reply))
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    result: int = struct.unpack(">I", reply[:4])[0]
    return result == 0


def _listening_inodes(ports: tuple[int, ...]) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1:``ports`` (from /proc/net/tcp)."""
    wanted = {f"0100007F:{p:04X}" for p in ports}
    inodes = set()
    with Path("/proc/net/tcp").open() as table:
        next(table)
        for line in table:
            cols = line.split()
            if cols[1] in wanted and cols[3] == "0A":  # 0A = LISTEN
                inodes.add(cols[9])
    return inodes


def _listens_on(pid: int, ports: tuple[int, ...]) -> bool:
    """True when process ``pid`` owns the listening sockets on ``ports``.

    Answering on the control port is not enough: when two swtpm processes race for one
    random port pair, the loser dies but the winner answers on its behalf, and its device
    would silently talk to another device's TPM.
    """
    try:
        inodes = _listening_inodes(ports)
        owned = {str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return False
    return len(inodes) == len(ports) and all(f"socket:[{i}]" in owned for i in inodes)


class Swtpm:
    """One swtpm process bound to 127.0.0.1 on a verified free port pair.

    ``state_dir=None`` creates a private temporary directory that :meth:`cleanup` removes;
    a caller-supplied directory is never deleted (it is the device's persistent TPM).
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        swtpm_bin: str = "swtpm",
        stop_timeout: float = _STOP_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._owns_state = state_dir is None
        self.state_dir = (
            Path(tempfile.mkdtemp(prefix="swtpm-")) if state_dir is None else Path(state_dir)
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._bin = swtpm_bin
        self._stop_timeout = stop_timeout
        #: Extra environment for the swtpm process (e.g. libfaketime, so that a test can move
        #: the TPM's clock together with the host clock it controls).
        self._env = dict(env) if env else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        #: Seconds from spawn until the control channel answered (last start).
        self.startup_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def tcti(self) -> str:
        """TCTI configuration string for tpm2-pytss / tpm2-tools."""
        if self._proc is None:
            raise SwtpmError("swtpm is not running")
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise SwtpmError("swtpm is not running")
        return self._proc.pid

    def start(self) -> Self:
        """Start swtpm, retrying on a new port pair if a port was taken meanwhile."""
        if self.running:
            raise SwtpmError("swtpm already running")
        rng = random.SystemRandom()
        last_err = ""
        for _ in range(_START_ATTEMPTS):
            port = _free_port_pair(rng)
            proc = self._spawn(port)
            began = time.monotonic()
            deadline = began + _READY_TIMEOUT
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    _, err = proc.communicate()
                    last_err = err.decode(errors="replace").strip()
                    break
                if _ctrl_answers(port + 1) and _listens_on(proc.pid, (port, port + 1)):
                    self._proc = proc
                    self.port = port
                    self.startup_seconds = time.monotonic() - began
                    return self
                time.sleep(0.002)
            else:
                self._terminate(proc)
                raise SwtpmError(f"swtpm did not answer within {_READY_TIMEOUT} s")
            # The process died: most likely a port collision. Anything else fails fast.
            if "in use" not in last_err.lower() and "bind" not in last_err.lower():
                raise SwtpmError(f"swtpm exited at start-up: {last_err}")
        raise SwtpmError(f"swtpm could not bind a port pair: {last_err}")

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        cmd = [
            self._bin,
            "socket",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--tpm2",
            "--server",
            f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
        ]
        try:
            return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=child_env(self._env),
            )
        except OSError as exc:
            raise SwtpmError(f"cannot run {self._bin}: {exc}") from exc

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a timeout). State stays on disk."""
        if self._proc is not None:
            self._terminate(self._proc)
            self._proc = None

    def restart(self) -> Self:
        """Power-cycle: stop and start again on the same state directory (new ports)."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop, and remove the state directory if this object created it."""
        self.stop()
        if self._owns_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"Swtpm(state_dir={str(self.state_dir)!r}, port={self.port}, running={self.running})"


def _write_if_changed(path: Path, text: str) -> None:
    """Several devices are manufactured in parallel against one vendor CA directory: a
    plain rewrite would let one swtpm_setup read another's half-written config."""
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    try:
        write_private_file(path, text.encode(), overwrite=True, sync=False)
    except SignerError as exc:
        raise SwtpmError(exc.message) from exc


def provision_ek_certificate(
    state_dir: Path | str,
    *,
    ca_dir: Path | str,
    swtpm_setup_bin: str = "swtpm_setup",
    localca_bin: str = "swtpm_localca",
) -> None:
    """Manufacture a TPM: create its EKs and EK certificates with ``swtpm_setup``.

    The certificates are issued by ``swtpm_localca`` from a CA kept in ``ca_dir`` (created on
    first use and reused, like a TPM vendor's CA shared by many chips). Everything lives in
    caller-chosen directories: no ``/etc`` or ``/var/lib`` file is read or written. Run it
    before :meth:`Swtpm.start` on the same state directory (swtpm_setup drives its own swtpm).
    The RSA-2048 EK certificate ends up at NV index 0x01c00002, the ECC (P-384) one at
    0x01c00016.
    """
    state = Path(state_dir)
    ca = Path(ca_dir)
    state.mkdir(parents=True, exist_ok=True)
    ca.mkdir(parents=True, exist_ok=True)
    localca_conf = ca / "swtpm-localca.conf"
    _write_if_changed(
        localca_conf,
        f"statedir = {ca}\n"
        f"signingkey = {ca / 'signkey.pem'}\n"
        f"issuercert = {ca / 'issuercert.pem'}\n"
        f"certserial = {ca / 'certserial'}\n",
    )
    options = ca / "swtpm-localca.options"
    _write_if_changed(options, "--platform-manufacturer devtrust\n--platform-version 2.1\n")
    setup_conf = ca / "swtpm_setup.conf"
    localca_path = shutil.which(localca_bin) or localca_bin
    _write_if_changed(
        setup_conf,
        f"create_certs_tool = {localca_path}\n"
        f"create_certs_tool_config = {localca_conf}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n",
    )
    cmd = [
        swtpm_setup_bin,
        "--tpm2",
        "--tpmstate",
        str(state),
        "--create-ek-cert",
        "--config",
        str(setup_conf),
        "--overwrite",
    ]
    # swtpm_setup looks for per-user config under XDG_CONFIG_HOME; point it at the CA dir
    # so a stray ~/.config/swtpm_setup.conf cannot change the outcome.
    env = child_env({"XDG_CONFIG_HOME": str(ca)})
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd, capture_output=True, env=env, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SwtpmError(f"swtpm_setup failed to run: {exc}") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise SwtpmError(f"swtpm_setup failed ({result.returncode}): {detail}")
