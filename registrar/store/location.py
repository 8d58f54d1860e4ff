"""Where the registrar store lives: ``--store URL`` parsed into a typed value (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from registrar.errors import ConfigError

__all__ = ["StoreLocation", "parse_store_location"]


@dataclass(frozen=True)
class StoreLocation:
    """``kind`` ``sqlite`` (``path``) or ``postgres`` (``url``, a libpq connection URL)."""

    kind: str
    path: Path = Path()
    url: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("sqlite", "postgres"):
            raise ConfigError(f"unknown store kind {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite://{self.path}"
        from registrar.store.postgres import _safe

        return _safe(self.url)


def parse_store_location(value: object) -> StoreLocation:
    """A path or ``sqlite:///abs/path`` → SQLite; ``postgresql://user@host:port/db`` (or
    ``postgres://``) → PostgreSQL. Anything else is a one-line ``ConfigError``."""
    if isinstance(value, Path):
        return StoreLocation("sqlite", path=value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"not a store location: {value!r}")
    if "://" not in value:
        return StoreLocation("sqlite", path=Path(value))
    parts = urlsplit(value)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(f"a SQLite store URL is sqlite:///absolute/path, not {value!r}")
        return StoreLocation("sqlite", path=Path(parts.path))
    if parts.scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            raise ConfigError("a PostgreSQL store URL names its database: postgresql://…/DB")
        return StoreLocation("postgres", url=value)
    raise ConfigError(
        f"unknown store URL scheme {parts.scheme!r} (sqlite:///path or postgresql://…)"
    )
