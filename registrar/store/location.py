"""Where the registrar store lives: ``--store URL`` parsed into a typed value (pure; the
parser is :mod:`trustcore.store_location`, shared with HQ)."""

from __future__ import annotations

from registrar.errors import ConfigError
from trustcore.errors import InvalidValueError
from trustcore.store_location import StoreLocation, safe_url
from trustcore.store_location import parse_store_location as _parse

__all__ = ["StoreLocation", "parse_store_location", "safe_url"]


def parse_store_location(value: object) -> StoreLocation:
    """A path or ``sqlite:///abs/path`` → SQLite; ``postgresql://user@host:port/db`` (or
    ``postgres://``) → PostgreSQL. Anything else is a one-line ``ConfigError``."""
    try:
        return _parse(value)
    except InvalidValueError as exc:
        raise ConfigError(exc.args[0]) from exc
