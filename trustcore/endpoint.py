"""Where a listener is reached: a host and a TCP port.

Shared by the side that binds a listener (the registrar's brokers, EST and ops servers)
and the side that connects to it (devices), so neither has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Endpoint"]


@dataclass(frozen=True)
class Endpoint:
    """A listener's address: ``host`` (name or IP literal) and TCP ``port``."""

    host: str
    port: int
