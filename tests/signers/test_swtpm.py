"""The swtpm process manager: start, answer, stop, restart on the same state, port collisions."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

import device_sim.swtpm as swtpm_mod
from device_sim.swtpm import Swtpm, SwtpmError
from signers.tpm import Tpm
from tests.fixtures.swtpm import SwtpmFactory

pytestmark = pytest.mark.tpm


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); check its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_start_answers_and_stop(tmp_path: Path) -> None:
    tpm_proc = Swtpm(tmp_path / "state").start()
    try:
        assert tpm_proc.running
        assert tpm_proc.tcti == f"swtpm:host=127.0.0.1,port={tpm_proc.port}"
        assert 0 < tpm_proc.startup_seconds < 5
        with Tpm(tpm_proc.tcti) as tpm:
            assert len(tpm.esapi.get_random(16)) == 16
        pid = tpm_proc.pid
    finally:
        tpm_proc.stop()
    assert not tpm_proc.running
    assert not _alive(pid)
    assert (tmp_path / "state").is_dir()  # caller-owned state is kept
    with pytest.raises(SwtpmError, match="not running"):
        _ = tpm_proc.tcti


def test_context_manager_removes_private_state() -> None:
    with Swtpm() as tpm_proc:
        state = tpm_proc.state_dir
        pid = tpm_proc.pid
        assert state.is_dir()
    assert not _alive(pid)
    assert not state.exists()


def test_restart_keeps_state_dir(swtpm: Swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm:
        tpm.esapi.get_random(1)
    old_pid = swtpm.pid
    swtpm.restart()
    assert swtpm.running
    assert swtpm.pid != old_pid
    assert not _alive(old_pid)
    with Tpm(swtpm.tcti) as tpm:
        assert len(tpm.esapi.get_random(4)) == 4


def test_several_instances_distinct_ports(swtpm_factory: SwtpmFactory) -> None:
    procs = [swtpm_factory() for _ in range(4)]
    ports = {p.port for p in procs}
    assert len(ports) == 4
    assert not ports & {p + 1 for p in ports}
    for p in procs:
        with Tpm(p.tcti) as tpm:
            tpm.esapi.get_random(1)


def test_port_collision_is_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process takes the chosen port between probe and start: retry on a new pair."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    busy = squatter.getsockname()[1]
    real = swtpm_mod._free_port_pair
    calls: list[int] = []

    def racy_pick(rng: object) -> int:
        port = busy if not calls else real(rng)  # type: ignore[arg-type]
        calls.append(port)
        return port

    monkeypatch.setattr(swtpm_mod, "_free_port_pair", racy_pick)
    try:
        with Swtpm(tmp_path / "s") as tpm_proc:
            assert calls[0] == busy
            assert len(calls) >= 2
            assert tpm_proc.port != busy
            with Tpm(tpm_proc.tcti) as tpm:
                tpm.esapi.get_random(1)
    finally:
        squatter.close()


def test_stop_kills_unresponsive_process(tmp_path: Path) -> None:
    tpm_proc = Swtpm(tmp_path / "s", stop_timeout=0.2).start()
    pid = tpm_proc.pid
    os.kill(pid, signal.SIGSTOP)  # SIGTERM stays pending; only SIGKILL ends it
    began = time.monotonic()
    tpm_proc.stop()
    assert time.monotonic() - began < 3
    assert not _alive(pid)


def test_bad_binary_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(SwtpmError, match="cannot run"):
        Swtpm(tmp_path / "s", swtpm_bin=str(tmp_path / "no-such-swtpm")).start()


def test_double_start_refused(swtpm: Swtpm) -> None:
    with pytest.raises(SwtpmError, match="already running"):
        swtpm.start()
