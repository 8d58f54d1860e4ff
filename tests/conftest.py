"""Shared fixtures: a test PKI built in code and real swtpm instances on ephemeral ports."""

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

pytest_plugins = [
    "tests.fixtures.pki",
    "tests.fixtures.swtpm",
    "tests.fixtures.postgres",
    "tests.fixtures.station",
    "tests.fixtures.softhsm",
]

# No per-example deadline: on a shared 2-core machine one example can take 10x its usual
# time, and hypothesis would then report a correct property as failed (DeadlineExceeded).
# Example counts stay as each test sets them.
settings.register_profile("devtrust", deadline=None)
settings.load_profile("devtrust")


#: The umask the test session started with, taken at import (before any fixture ran a
#: command in process).
_SESSION_UMASK = os.umask(0o022)
os.umask(_SESSION_UMASK)


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    """Every command sets umask 077 (signers.private_files) and tests run commands in
    process, also from module-scoped fixtures: every test starts and ends with the
    session's umask (a fake-clock file, for one, must stay readable by Mosquitto's user)."""
    os.umask(_SESSION_UMASK)
    yield
    os.umask(_SESSION_UMASK)
