"""The environment every child process of the product gets: an allow-list, nothing more.

The components hold secrets in their environment (``DEVTRUST_SITE_PASSPHRASE``,
``DEVTRUST_HQ_PASSPHRASE``, PKCS#11 PINs...). A child inherits the whole environment by
default, and the network-facing ones (Mosquitto, swtpm) or a tool's crash dump would then
carry them. So no call site passes ``os.environ`` on: every ``subprocess``/``asyncio``
spawn of the product takes ``env=child_env(...)``, which copies only the variables a tool
needs to run (search path, locale, time zone, temporary directory) and the libfaketime
variables the time-travel tests use to move a child's clock. Everything else — unknown
variables included — stays behind: an allow-list fails closed where a deny-list of secret
names would miss the next secret someone adds.

``extra`` adds variables the caller sets on purpose (e.g. ``XDG_CONFIG_HOME`` for
``swtpm_setup``); a name that looks like a secret is refused there too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from signers.errors import SignerError

__all__ = ["SECRET_NAME", "child_env"]

#: Variables copied from the parent when present.
_ALLOWED = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        # libfaketime (the time-travel tests move a child's clock with it; DESIGN: clocks come
        # from the composition root, and a child's clock is its environment).
        "LD_PRELOAD",
        "FAKETIME",
        "FAKETIME_TIMESTAMP_FILE",
        "FAKETIME_NO_CACHE",
        "FAKETIME_DONT_FAKE_MONOTONIC",
        "FAKETIME_DONT_RESET",
        # names of the faked clock's semaphore and shared memory, set by libfaketime in the
        # parent: a child that runs as another user (Mosquitto dropping to its user) cannot
        # make its own under the same pid once setpriv, as root, has (measured)
        "FAKETIME_SHARED",
        # the TSS C library's log switch (silences its stderr noise)
        "TSS2_LOG",
    }
)
_ALLOWED_PREFIXES = ("LC_",)

#: Names that hold (or point at) secrets: refused even when a caller passes them in ``extra``.
SECRET_NAME = re.compile(r"PASS|PIN\b|PIN_|SECRET|TOKEN|KEY|COOKIE|CREDENTIAL|PASSWORD", re.I)


def child_env(
    extra: Mapping[str, str] | None = None, *, parent: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for a child process: the allow-listed variables of ``parent``
    (default: this process's environment) plus ``extra``.

    Raises :class:`SignerError` if ``extra`` names a variable that looks like a secret.
    """
    source = os.environ if parent is None else parent
    env = {
        name: value
        for name, value in source.items()
        if (name in _ALLOWED or name.startswith(_ALLOWED_PREFIXES))
        and SECRET_NAME.search(name) is None
    }
    for name, value in (extra or {}).items():
        if SECRET_NAME.search(name) is not None:
            raise SignerError(f"refusing to pass {name} to a child process")
        env[name] = value
    return env
