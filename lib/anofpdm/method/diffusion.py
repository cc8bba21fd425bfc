"""Noise schedule, forward noising, clean-image prediction and DDIM inversion (docs/method.md sections 2-3).

Timesteps are 0-based: step ``t`` has cumulative signal fraction ``alpha_bar[t]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from anofpdm.seeds import derive_seed

__all__ = ["ScheduleConfig", "NoiseSchedule", "SliceNoise", "slice_noise_seed"]


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear beta schedule (the paper's: 1e-4 to 0.02 over 1000 steps)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError("need 0 < beta_start < beta_end < 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoiseSchedule:
    """The closed forms of a variance-preserving diffusion with a linear beta schedule.

    Args:
        config: the schedule; its cumulative alphas are MONAI ``DDPMScheduler``'s "linear_beta" ones (float32 betas
            and products, as MONAI computes them; tested equal), computed here so that serving need not import MONAI.
        device: where the schedule tensors live.
    """

    def __init__(self, config: ScheduleConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or ScheduleConfig()
        betas = torch.linspace(self.config.beta_start, self.config.beta_end, self.config.num_train_timesteps,
                               dtype=torch.float32)
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0).to(device=device, dtype=torch.float64)

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: str | torch.device = "cpu") -> NoiseSchedule:
        return cls(ScheduleConfig(**data), device=device)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _coefficients(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against ``like``."""
        t = torch.as_tensor(t, device=self.alpha_bar.device).long()
        if ((t < 0) | (t >= self.num_timesteps)).any():
            raise ValueError(f"timestep out of range [0, {self.num_timesteps})")
        ab = self.alpha_bar[t].to(device=like.device, dtype=like.dtype)
        ab = ab.reshape(-1, *([1] * (like.dim() - 1))) if ab.dim() else ab
        return ab.sqrt(), (1 - ab).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """z_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise

    def predict_x0(self, z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Clean-image estimate (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), unclipped."""
        signal, sigma = self._coefficients(t, z)
        return (z - sigma * eps) / signal

    def ddim_step(self, z: torch.Tensor, eps: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
        """Deterministic DDIM move of ``z`` from noise level ``t`` to ``t_next`` (up = inversion).

        ``eps`` is the network's noise prediction at (z, t); the predicted clean image is re-noised
        with that same noise at level ``t_next``. Decoding is the same call with ``t_next < t``.
        """
        x0 = self.predict_x0(z, eps, t)
        return self.add_noise(x0, eps, t_next)


def slice_noise_seed(seed: int, index: int) -> int:
    """The generator seed of slice ``index`` under run seed ``seed`` (both >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and slice index must be >= 0, got {seed} and {index}")
    return derive_seed(seed, index)


class SliceNoise:
    """Standard normal noise for a batch of slices, each slice from its own CPU generator.

    Slice ``i`` of a run draws from a generator seeded by ``slice_noise_seed(seed, i)``, so its k-th draw is the same
    whatever batch it shares, however the run is chunked or which other slices run, and on any device.

    Args:
        seed: the run's noise seed (>= 0).
        slice_indices: the run-wide index of each slice of the batch (e.g. ``range(first, first + B)``).
        like: the B x C x H x W batch; the noise takes its shape, device and dtype.
    """

    def __init__(self, seed: int, slice_indices: Sequence[int], like: torch.Tensor) -> None:
        if len(slice_indices) != like.shape[0]:
            raise ValueError(f"{len(slice_indices)} slice indices for a batch of {like.shape[0]}")
        self.generators = [torch.Generator().manual_seed(slice_noise_seed(seed, int(i))) for i in slice_indices]
        self.shape, self.device, self.dtype = like.shape[1:], like.device, like.dtype

    def draw(self) -> torch.Tensor:
        """The next draw of every slice, B x C x H x W."""
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(self.device, self.dtype)
