"""Shared fixtures: a test PKI built in code and real swtpm instances on ephemeral ports."""

import os
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.fixtures.pki", "tests.fixtures.swtpm", "tests.fixtures.postgres"]


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    """Every command sets umask 077 (signers.private_files) and tests run commands in
    process: give the next test the umask it started with (a fake-clock file, for one,
    must stay readable by Mosquitto's user)."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)
