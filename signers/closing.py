"""One ``with`` protocol for the resources this package opens (tokens, keys, TPM contexts).

Owns :class:`Closing`: a base whose ``__enter__`` returns the resource and whose
``__exit__`` calls its ``close()``, so each resource states only how it closes.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing(abc.ABC):
    """Base of a resource used as ``with resource:``; subclasses define :meth:`close`
    (abstract: a subclass without it cannot be instantiated)."""

    __slots__ = ()

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
