"""The random draws of training, each a pure function of ``(seed, iteration)``.

The global batch of iteration ``i`` (data order), its timesteps, noise and label dropout depend on the seed and
``i`` only. A run therefore resumes bit-exactly from the iteration counter alone, and the global batch is the
same for any number of DistributedDataParallel ranks (each rank trains on its shard of it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from anofpdm.method.model import NULL_LABEL
from anofpdm.seeds import derive_seed

__all__ = [
    "DATA_STREAM",
    "DIFFUSION_STREAM",
    "INIT_STREAM",
    "DiffusionDraw",
    "GlobalBatchSampler",
    "draw_diffusion_inputs",
]

# independent random streams, each seeded by (seed, stream, counter)
DATA_STREAM, DIFFUSION_STREAM, INIT_STREAM, AUGMENT_STREAM = 0, 1, 2, 3


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's dataset indices for each iteration in ``[start, stop)``.

    The global batch of iteration ``i`` is positions ``[i * batch_size, (i + 1) * batch_size)`` of an
    endless stream of shuffled epochs (epoch ``e`` permuted by a generator seeded with ``(seed, e)``), so
    it depends on ``(seed, i)`` only. Rank ``r`` of ``world_size`` gets the ``r``-th equal part.

    Args:
        num_samples: dataset length.
        batch_size: global batch size, a multiple of ``world_size``.
        seed: data-order seed.
        start: first iteration to yield.
        stop: iteration to stop before.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng(derive_seed(self.seed, DATA_STREAM, epoch))
            self._epoch, self._order = epoch, rng.permutation(self.num_samples)
        return self._order

    def global_batch(self, iteration: int) -> np.ndarray:
        """Dataset indices of the whole batch of ``iteration`` (all ranks)."""
        positions = np.arange(iteration * self.batch_size, (iteration + 1) * self.batch_size)
        epochs = positions // self.num_samples
        return np.array([self._permutation(e)[p % self.num_samples] for e, p in zip(epochs, positions)])

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size // self.world_size
        for iteration in range(self.start, self.stop):
            yield self.global_batch(iteration)[self.rank * share : (self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class DiffusionDraw:
    """The random inputs of one training batch: timesteps, noise and which labels become null."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    drop_label: torch.Tensor

    def shard(self, rank: int, world_size: int) -> DiffusionDraw:
        """The ``rank``-th of ``world_size`` equal parts along the batch."""
        share = len(self.timesteps) // world_size
        part = slice(rank * share, (rank + 1) * share)
        return DiffusionDraw(self.timesteps[part], self.noise[part], self.drop_label[part])

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with the dropped entries replaced by the null label."""
        return torch.where(self.drop_label, torch.full_like(labels, NULL_LABEL), labels)


def draw_diffusion_inputs(
    generator: torch.Generator,
    batch_size: int,
    image_shape: tuple[int, ...],
    num_timesteps: int,
    null_label_probability: float,
) -> DiffusionDraw:
    """Draw t uniform in [0, T), standard normal noise and label dropout for a batch, on the generator's device."""
    device = generator.device
    timesteps = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
    noise = torch.randn((batch_size, *image_shape), generator=generator, device=device)
    drop_label = torch.rand(batch_size, generator=generator, device=device) < null_label_probability
    return DiffusionDraw(timesteps, noise, drop_label)
