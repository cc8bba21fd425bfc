"""Stopping a training run cleanly: SIGINT / SIGTERM or a time limit become a stop after the current
iteration, agreed by all ranks, with the state saved first."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from anofpdm.distributed import Distributed

__all__ = ["STOP_REQUESTED", "STOP_TIME_LIMIT", "StopRequest", "TrainingInterrupted"]

logger = logging.getLogger(__name__)

STOP_TIME_LIMIT, STOP_REQUESTED = 1, 2


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`anofpdm.training.trainer.train` after a stop request (Ctrl-C, SIGTERM) once the run state is
    saved.

    Args:
        iteration: the iteration the run stopped at (``state.pt`` holds it).
        run_dir: the run folder; resume with ``resume=True``.
    """

    def __init__(self, iteration: int, run_dir: Path) -> None:
        super().__init__(f"training stopped at iteration {iteration}; state saved in {run_dir}")
        self.iteration = iteration
        self.run_dir = run_dir


class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current iteration.

    A second SIGINT aborts at once. Handlers are only installed from the main thread and are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: stopping after this iteration (Ctrl-C again aborts)", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, ctx: Distributed, out_of_time: bool = False) -> int:
        """Why to stop, the same on all ranks: ``STOP_REQUESTED`` if any rank was asked to, else
        ``STOP_TIME_LIMIT`` if any rank ran out of time, else 0 (go on)."""
        reason = STOP_REQUESTED if self.requested else STOP_TIME_LIMIT if out_of_time else 0
        if not ctx.enabled:
            return reason
        flag = torch.tensor([float(reason)], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
