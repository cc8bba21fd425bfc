"""A tqdm progress bar behind the library's progress callbacks (CLI and evaluation)."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["ProgressCallback", "StageProgressCallback", "progress_bar"]

ProgressCallback = Callable[[int, int], None]  # (done, total), the library's progress callbacks
StageProgressCallback = Callable[[str, int, int], None]  # (stage, done, total), a segmentation's stages


def progress_bar(description: str, unit: str = "step") -> Callable[..., None]:
    """A callback ``(done, total)`` or ``(stage, done, total)`` that drives one tqdm bar on stderr.

    The bar appears at the first call, so a command that stops before any work shows none.
    """
    from tqdm import tqdm

    bar: tqdm | None = None

    def update(*args: object) -> None:
        nonlocal bar
        done, total = int(args[-2]), int(args[-1])
        if bar is None:
            bar = tqdm(desc=description, unit=unit, total=total, dynamic_ncols=True, file=sys.stderr)
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update
