"""Where HQ's database lives (pure): a SQLite file or a PostgreSQL URL, parsed into a typed
value. ``hq init --store URL`` records it in ``hq.json``; every later command opens it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hq.errors import StoreError

__all__ = ["StoreLocation", "parse_store_location", "safe_url"]


@dataclass(frozen=True)
class StoreLocation:
    """``kind`` ``sqlite`` (``path``) or ``postgres`` (``url``, a libpq connection URL)."""

    kind: str
    path: Path = Path()
    url: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("sqlite", "postgres"):
            raise StoreError(f"unknown store kind {self.kind!r}")

    def __str__(self) -> str:
        return f"sqlite://{self.path}" if self.kind == "sqlite" else safe_url(self.url)


def parse_store_location(value: str) -> StoreLocation:
    """``postgresql://user@host:port/db`` (or ``postgres://``) → PostgreSQL;
    ``sqlite:///abs/path`` → SQLite. A password in the URL is refused: the URL is written to
    ``hq.json``, so the password belongs in ``~/.pgpass`` / ``PGPASSFILE`` (or trust or
    certificate authentication), never in a file next to the keystore."""
    parts = urlsplit(value)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/"):
            raise StoreError(f"a SQLite store URL is sqlite:///absolute/path, not {value!r}")
        return StoreLocation("sqlite", path=Path(parts.path))
    if parts.scheme in ("postgresql", "postgres"):
        try:
            password = parts.password
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise StoreError(f"not a PostgreSQL URL: {safe_url(value)} ({exc})") from exc
        if password is not None or "password=" in parts.query:
            raise StoreError(
                "the store URL must not carry a password (it is written to hq.json): "
                "use ~/.pgpass or PGPASSFILE"
            )
        if not parts.path.strip("/"):
            raise StoreError("a PostgreSQL store URL names its database: postgresql://…/DB")
        return StoreLocation("postgres", url=value)
    raise StoreError(
        f"unknown store URL {safe_url(value)!r} (postgresql://host/db or sqlite:///path)"
    )


def safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"
