"""Case-level parallelism for data generation and preparation (processes, results in input order)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch

from anofpdm.progress import ProgressCallback

__all__ = ["ordered_map"]

Item = TypeVar("Item")
Result = TypeVar("Result")


def _single_threaded_worker() -> None:
    """Workers split the cores between them, so each keeps to one torch thread."""
    torch.set_num_threads(1)


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int = 1,
    progress: ProgressCallback | None = None,
) -> Iterator[Result]:
    """Apply ``function`` to every item, in ``workers`` processes, yielding the results in input order.

    Args:
        function: a picklable (module-level) callable.
        items: its arguments.
        workers: processes to use; 1 runs everything in this process.
        progress: called with (done, total) as each result arrives.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return _ordered_results(function, list(items), workers, progress)  # checked now, not at the first result


def _ordered_results(
    function: Callable[[Item], Result], items: list[Item], workers: int, progress: ProgressCallback | None
) -> Iterator[Result]:
    if workers == 1:
        yield from _counted(map(function, items), len(items), progress)
        return
    # spawn: a forked child of a process that has started torch's thread pools can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(items)) or 1, mp_context=context,
                             initializer=_single_threaded_worker) as pool:
        yield from _counted(pool.map(function, items), len(items), progress)


def _counted(results: Iterable[Result], total: int, progress: ProgressCallback | None) -> Iterator[Result]:
    for done, result in enumerate(results, start=1):
        if progress is not None:
            progress(done, total)
        yield result
