"""``scripts/fuzz.py``, the long coverage-guided run, works: a few seconds on two targets
(one per engine) try inputs, find no crash, and end with the JSON summary line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz.py"


def _fuzz(tmp_path: Path, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--corpus-out", str(tmp_path / "corpus"), *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    return summary


def test_mutator_engine(tmp_path: Path) -> None:
    summary = _fuzz(tmp_path, "--engine", "mutator", "--seconds", "2", "--target", "csr")
    assert summary["engine"] == "mutator"
    assert summary["inputs"] > 100 and summary["crashes"] == 0 and summary["errors"] == []
    assert not (tmp_path / "corpus").exists()  # no crash, nothing written


def test_atheris_engine(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris has no wheel for this platform")
    summary = _fuzz(tmp_path, "--engine", "atheris", "--seconds", "2", "--target", "topics")
    assert summary["engine"] == "atheris"
    assert summary["inputs"] > 100 and summary["crashes"] == 0 and summary["errors"] == []
