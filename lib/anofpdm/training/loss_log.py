"""The training loss log of a run folder: ``loss.csv`` rows and the ``loss.png`` curve."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anofpdm.atomic import atomic_path
from anofpdm.distributed import Distributed

__all__ = ["LOSS_CSV", "LOSS_PLOT", "LossLog"]

LOSS_CSV = "loss.csv"
LOSS_PLOT = "loss.png"
CSV_FIELDS = ("iteration", "loss", "smoothed_loss", "iterations_per_s", "elapsed_s")
LOSS_SMOOTHING = 0.01  # per-iteration weight of new losses in the smoothed curve (a ~100-iteration horizon)


class LossLog:
    """``loss.csv`` rows (mean loss over each logging window, across ranks) and the ``loss.png`` curve.

    Args:
        run_dir: the run folder.
        ctx: the distributed context; only the main rank writes.
        resume_from: the iteration the run resumes at (rows after it, from a crashed session, are dropped);
            0 starts a new file.
        smoothed: the smoothed loss saved with the resume state.
    """

    def __init__(self, run_dir: Path, ctx: Distributed, resume_from: int, smoothed: float | None) -> None:
        self.csv_path, self.plot_path, self.ctx = run_dir / LOSS_CSV, run_dir / LOSS_PLOT, ctx
        self.smoothed = smoothed
        self.rows: list[dict[str, float]] = []  # "iteration" an int
        if resume_from and self.csv_path.is_file():
            with self.csv_path.open(newline="") as f:  # floats first: earlier resumes wrote iterations as "5120.0"
                rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
            self.rows = [{**row, "iteration": int(row["iteration"])} for row in rows if row["iteration"] <= resume_from]
        if ctx.is_main:
            with self.csv_path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(self.rows)
        self._sum = torch.zeros((), device=ctx.device)
        self._count = 0
        self._since = time.monotonic()

    def add(self, loss: torch.Tensor) -> None:
        """Accumulate one iteration's loss (on the device, without synchronising)."""
        self._sum += loss.detach().float()
        self._count += 1

    def flush(self, iteration: int, elapsed_s: float) -> dict[str, float]:
        """Close the (non-empty) window: every rank calls this at the same iterations; the main rank writes a row."""
        total = self._sum.clone()
        if self.ctx.enabled:
            dist.all_reduce(total)
        loss = total.item() / (self._count * self.ctx.world_size)
        now = time.monotonic()
        rate = self._count / max(now - self._since, 1e-9)
        weight = 1 - (1 - LOSS_SMOOTHING) ** self._count  # as if the window's mean arrived once per iteration
        self.smoothed = loss if self.smoothed is None else (1 - weight) * self.smoothed + weight * loss
        self._sum.zero_()
        self._count, self._since = 0, now
        row = {
            "iteration": iteration,
            "loss": loss,
            "smoothed_loss": self.smoothed,
            "iterations_per_s": rate,
            "elapsed_s": elapsed_s,
        }
        self.rows.append(row)
        if self.ctx.is_main:
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(row)
        return row

    def plot(self) -> None:
        """Redraw ``loss.png`` (written atomically)."""
        if not self.rows:
            return
        figure = Figure(figsize=(7, 4), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        iterations = [row["iteration"] for row in self.rows]
        axes.plot(iterations, [row["loss"] for row in self.rows], alpha=0.35, label="loss")
        axes.plot(iterations, [row["smoothed_loss"] for row in self.rows], label="smoothed")
        axes.set(xlabel="iteration", ylabel="noise MSE", yscale="log", title="training loss")
        axes.grid(alpha=0.3)
        axes.legend()
        with atomic_path(self.plot_path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
