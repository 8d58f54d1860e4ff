"""Where HQ's database lives (pure): ``hq init --store URL`` records it in ``hq.json``; every
later command opens it. The parser is :mod:`trustcore.store_location`, shared with the
registrar; HQ refuses bare paths and passwords (the URL is written to ``hq.json``, so a
password belongs in ``~/.pgpass`` / ``PGPASSFILE``, never in a file next to the keystore)."""

from __future__ import annotations

from hq.errors import StoreError
from trustcore.errors import InvalidValueError
from trustcore.store_location import StoreLocation, safe_url
from trustcore.store_location import parse_store_location as _parse

__all__ = ["StoreLocation", "parse_store_location", "safe_url"]


def parse_store_location(value: str) -> StoreLocation:
    """``postgresql://user@host:port/db`` (or ``postgres://``) → PostgreSQL;
    ``sqlite:///abs/path`` → SQLite; anything else, or a password in the URL, is a one-line
    ``StoreError``."""
    try:
        return _parse(value, bare_path=False, password=False)
    except InvalidValueError as exc:
        raise StoreError(exc.args[0]) from exc
