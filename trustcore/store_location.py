"""Where a component's database lives (pure): a SQLite file or a PostgreSQL URL, parsed into
a typed value. The registrar (``registrar run --store``) and HQ (``hq init --store``) parse
with this one function and wrap its ``InvalidValueError`` in their own error type."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trustcore.errors import InvalidValueError

__all__ = ["PG_CONNECT", "StoreLocation", "parse_store_location", "pg_placeholders", "safe_url"]


@dataclass(frozen=True)
class StoreLocation:
    """``kind`` ``sqlite`` (``path``) or ``postgres`` (``url``, a libpq connection URL)."""

    kind: str
    path: Path = Path()
    url: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("sqlite", "postgres"):
            raise InvalidValueError(f"unknown store kind {self.kind!r}")

    def __str__(self) -> str:
        return f"sqlite://{self.path}" if self.kind == "sqlite" else safe_url(self.url)


def parse_store_location(
    value: object, *, bare_path: bool = True, password: bool = True
) -> StoreLocation:
    """``postgresql://user@host:port/db`` (or ``postgres://``) → PostgreSQL;
    ``sqlite:///abs/path`` (and, with ``bare_path``, a plain path) → SQLite. ``password``
    False refuses a password in the URL (for a URL that is written to a file). Anything
    else is a one-line ``InvalidValueError`` that never shows a password."""
    if bare_path and isinstance(value, Path):
        return StoreLocation("sqlite", path=value)
    if not isinstance(value, str) or not value:
        raise InvalidValueError(f"not a store location: {value!r}")
    if bare_path and "://" not in value:
        return StoreLocation("sqlite", path=Path(value))
    parts = urlsplit(value)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/"):
            raise InvalidValueError(f"a SQLite store URL is sqlite:///absolute/path, not {value!r}")
        return StoreLocation("sqlite", path=Path(parts.path))
    if parts.scheme in ("postgresql", "postgres"):
        try:
            given = parts.password
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise InvalidValueError(f"not a PostgreSQL URL: {safe_url(value)} ({exc})") from exc
        if not password and (given is not None or "password=" in parts.query):
            raise InvalidValueError(
                "the store URL must not carry a password (it is written to a file): "
                "use ~/.pgpass or PGPASSFILE"
            )
        if not parts.path.strip("/"):
            raise InvalidValueError("a PostgreSQL store URL names its database: postgresql://…/DB")
        return StoreLocation("postgres", url=value)
    raise InvalidValueError(
        f"unknown store URL {safe_url(value)!r} (postgresql://host/db or sqlite:///path)"
    )


def safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"


#: psycopg connection settings every PostgreSQL store uses (the registrar's and HQ's).
PG_CONNECT: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": 5,
    # a dead server behind a silent network is noticed in about 20 s, not hours
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
}


@functools.lru_cache(maxsize=1024)
def pg_placeholders(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (the stores' SQL has no ``?``/``%`` literals)."""
    return sql.replace("?", "%s")
