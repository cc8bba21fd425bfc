"""Value types for the commands' comma-separated options (``--sequences flair,t2``, ``--tune-quantiles 0.9,0.99``)."""

from __future__ import annotations

__all__ = ["comma_list", "comma_ints", "comma_floats"]


def comma_list(text: str) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated list."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def comma_ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers."""
    return tuple(int(item) for item in comma_list(text))


def comma_floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers."""
    return tuple(float(item) for item in comma_list(text))
