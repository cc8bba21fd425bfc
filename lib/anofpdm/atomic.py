"""Writing a file so that a process stopped mid-write leaves the old file or the new one, never part of one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` once the block ends without error."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    tmp.replace(path)
