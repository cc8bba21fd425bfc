"""The validation loss of a training run, and the network it selects.

The noise-prediction loss of the EMA network on fixed validation slices (each conditioned on its own image-level
label) at small noise levels, where the fast mode reads its verdict and end step. On the demo run it rose from
about 10600 iterations on while the training loss kept falling, and the test figures fell with it
(``docs/training.md``), so training keeps the network with the lowest validation loss as well as its last.
It needs image-level labels only, like the calibration.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from anofpdm.data.slices import SliceDataset
from anofpdm.method.diffusion import NoiseSchedule

VALIDATION_SPLIT = "val"
VALIDATION_CSV = "validation.csv"
CSV_FIELDS = ("iteration", "validation_loss")
BATCH_SIZE = 64  # slices per network call: bounds the memory of a validation pass, not its result


class ValidationLoss:
    """The validation loss of a network on a fixed draw of validation slices, timesteps and noise.

    Args:
        data: prepared slice folder with a ``val`` split.
        sequences: the network's channels, in order.
        timesteps: the noise levels t the loss is averaged over.
        max_slices: seeded random subset of the validation slices (all when there are fewer).
        seed: seeds the subset and the noise.
        schedule: the run's noise schedule.
        device: where the slices and noise live (the network's device).
    """

    def __init__(
        self,
        data: Path,
        sequences: Sequence[str],
        timesteps: Sequence[int],
        max_slices: int,
        seed: int,
        schedule: NoiseSchedule,
        device: torch.device,
    ) -> None:
        if not (Path(data) / f"{VALIDATION_SPLIT}_labels.npy").is_file():
            raise ValueError(f"a validation loss needs the '{VALIDATION_SPLIT}' split of {data}; prepare one")
        dataset = SliceDataset(data, VALIDATION_SPLIT, sequences=sequences)
        if len(dataset) == 0:
            raise ValueError(f"the '{VALIDATION_SPLIT}' split of {data} is empty")
        bad = [t for t in timesteps if not 0 <= t < schedule.num_timesteps]
        if not timesteps or bad:
            raise ValueError(f"validation timesteps must be in [0, {schedule.num_timesteps}), got {list(timesteps)}")
        images, labels = dataset.sample(max_slices, seed)
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((len(timesteps), *images.shape), generator=generator).to(device)
        self.images, self.labels = images.to(device), torch.tensor(labels, device=device)
        self.timesteps, self.schedule = tuple(timesteps), schedule

    @torch.no_grad()
    def __call__(self, network: torch.nn.Module) -> float:
        """Mean squared noise-prediction error over the slices, timesteps and pixels."""
        total = 0.0
        for t, noise in zip(self.timesteps, self.noise):
            for start in range(0, len(self.images), BATCH_SIZE):
                part = slice(start, start + BATCH_SIZE)
                x0, eps = self.images[part], noise[part]
                steps = torch.full((len(x0),), t, device=x0.device)
                noised = self.schedule.add_noise(x0, eps, t)
                predicted = network(noised, timesteps=steps, class_labels=self.labels[part])
                total += F.mse_loss(predicted.float(), eps, reduction="sum").item()
        return total / self.noise.numel()


class ValidationLog:
    """``validation.csv`` rows and the lowest loss so far.

    Args:
        run_dir: the run folder.
        resume_from: the iteration the run resumes at (rows after it, from a crashed session, are dropped);
            0 starts a new file.
    """

    def __init__(self, run_dir: Path, resume_from: int) -> None:
        self.path = Path(run_dir) / VALIDATION_CSV
        rows: list[tuple[int, float]] = []
        if resume_from and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [(int(row["iteration"]), float(row["validation_loss"])) for row in csv.DictReader(f)]
        self.rows = [(iteration, loss) for iteration, loss in rows if iteration <= resume_from]
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_FIELDS)
            writer.writerows(self.rows)

    @property
    def best(self) -> float | None:
        return min((loss for _, loss in self.rows), default=None)

    def add(self, iteration: int, loss: float) -> bool:
        """Log a row; True when ``loss`` is the lowest so far (ties keep the earlier network)."""
        improved = self.best is None or loss < self.best
        self.rows.append((iteration, loss))
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow((iteration, repr(loss)))
        return improved
