"""Exception groups, flattened: what trio's nurseries raise, as the errors inside."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["leaves"]


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions at the leaves of ``error``'s group tree (``error`` itself if no group)."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error
