"""The forward process of AnoFPDM on a batch of slices, with streaming statistics (docs/method.md section 3).

At each visited step t the noised input z_t is evaluated twice, in one batched network call: with
the healthy label and with the null label. From these come the healthy-guided clean-image prediction
xh_t (guidance weight w) and the unguided reference xr_t. Per slice the process keeps only running
sums and maxima, so memory does not grow with the number of steps:

- the MSE curves MSEh_t and MSEr_t (one float per step and slice),
- the divergence curve D_t[m] per map modality,
- the end step t_e[m] = argmax_t D_t[m] and the anomaly map H_m = mean of e_t[m] over visited t < t_e[m].
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from anofpdm.method.decisions import cosine_scores
from anofpdm.method.diffusion import NoiseSchedule, SliceNoise
from anofpdm.method.model import HEALTHY, MAP_SEQUENCES, NULL_LABEL, LoadedModel
from anofpdm.progress import ProgressCallback
from anofpdm.runtime import release_free_memory

__all__ = ["chunk_workers", "ForwardProcessConfig", "ForwardProcessResult", "SliceStatistics", "guided_and_null_noise",
           "run_forward_process", "run_on_slices"]

Encoding = Literal["ddim", "ddpm"]
RELEASE_MEMORY_EVERY_STEPS = 50  # visited steps between returns of the C heap's free pages (runtime module)


@dataclass(frozen=True)
class ForwardProcessConfig:
    """Settings of one forward-process run.

    Args:
        guidance: guidance weight w of the healthy-guided prediction.
        forward_steps: T_f; steps t = 0 .. T_f - 1 are candidates.
        stride: visit every ``stride``-th step (1 = all: the full mode).
        encoding: "ddim" (deterministic inversion, one noise draw) or "ddpm" (fresh noise per step).
        early_stop: a slice stops once the divergence peak of each of its map modalities lies this many
            visited steps behind; its statistics cover its own steps only (None = never: the full mode).
        seed: seed of the noise draws (>= 0; see ``anofpdm.method.diffusion.SliceNoise``).
    """

    guidance: float = 2.0
    forward_steps: int = 600
    stride: int = 1
    encoding: Encoding = "ddim"
    early_stop: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.guidance < 0:
            raise ValueError(f"guidance weight must be >= 0, got {self.guidance}")
        if self.forward_steps < 1:
            raise ValueError(f"forward_steps must be >= 1, got {self.forward_steps}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.encoding not in ("ddim", "ddpm"):
            raise ValueError(f"encoding must be 'ddim' or 'ddpm', got {self.encoding!r}")
        if self.early_stop is not None and self.early_stop < 1:
            raise ValueError(f"early_stop must be None or >= 1, got {self.early_stop}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def visited_steps(self) -> list[int]:
        return list(range(0, self.forward_steps, self.stride))


@dataclass
class ForwardProcessResult:
    """Per-slice outcome of the forward process (B slices, M map modalities, K visited steps).

    Attributes:
        anomaly_maps: B x M x H x W, H_m (mean squared error of the guided prediction before t_e).
        end_step_maps: B x M x H x W, the squared error at t_e alone (the paper's S_te variant).
        end_steps: B x M, t_e as timesteps.
        max_divergence: B x M, max_t D_t[m].
        mse_guided: B x K, MSEh_t (0 after the slice's own early stop, which leaves cosine scores unchanged).
        mse_reference: B x K, MSEr_t (likewise).
        divergence: B x M x K, D_t[m] (likewise).
        visited_steps: the K timesteps the batch visited (fewer than planned once every slice stopped early).
        network_evaluations: single-slice network evaluations spent (2 per slice and step it ran).
    """

    anomaly_maps: torch.Tensor
    end_step_maps: torch.Tensor
    end_steps: torch.Tensor
    max_divergence: torch.Tensor
    mse_guided: torch.Tensor
    mse_reference: torch.Tensor
    divergence: torch.Tensor
    visited_steps: list[int]
    network_evaluations: int


class _StreamingStatistics:
    """Running sums and maxima over steps; O(B x M x H x W) memory whatever the step count."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        batch, n_maps = shape[0], shape[1]
        self.active = torch.ones(batch, dtype=torch.bool, device=device)  # not yet stopped early
        self.error_sum = torch.zeros(shape, device=device)
        self.anomaly_maps = torch.zeros(shape, device=device)
        self.end_step_maps = torch.zeros(shape, device=device)
        self.best = torch.full((batch, n_maps), -1.0, device=device)
        self.best_index = torch.zeros((batch, n_maps), dtype=torch.long, device=device)
        self.mse_guided: list[torch.Tensor] = []
        self.mse_reference: list[torch.Tensor] = []
        self.divergence: list[torch.Tensor] = []

    def update(self, index: int, x0: torch.Tensor, guided: torch.Tensor, reference: torch.Tensor) -> None:
        """Add visited step ``index`` to the statistics of the slices that have not stopped."""
        active = self.active
        error = (guided - x0) ** 2
        self.mse_guided.append(torch.where(active, error.mean(dim=(1, 2, 3)), 0.0))
        self.mse_reference.append(torch.where(active, ((reference - x0) ** 2).mean(dim=(1, 2, 3)), 0.0))
        divergence = torch.where(active[:, None], ((guided - reference) ** 2).mean(dim=(2, 3)), 0.0)
        self.divergence.append(divergence)
        improved = (divergence > self.best) & active[:, None]
        # H_m is the mean error over the steps before t_e; at the first step it is that step's error
        before = self.error_sum / index if index else error
        self.anomaly_maps = torch.where(improved[..., None, None], before, self.anomaly_maps)
        self.end_step_maps = torch.where(improved[..., None, None], error, self.end_step_maps)
        self.best = torch.where(improved, divergence, self.best)
        self.best_index = torch.where(improved, torch.full_like(self.best_index, index), self.best_index)
        self.error_sum += error

    def stop_passed_peaks(self, index: int, patience: int) -> bool:
        """Stop the slices whose every divergence peak lies ``patience`` visited steps behind step ``index``;
        True once all have stopped."""
        self.active &= ~((index - self.best_index) >= patience).all(dim=1)
        return not bool(self.active.any())


def guided_and_null_noise(
    network: torch.nn.Module, z: torch.Tensor, t: int, guidance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps_g = (1 + w) eps(z, t, healthy) - w eps(z, t, null), and eps(z, t, null).

    Both labels go through the network in one batched call: two evaluations per slice.
    """
    batch = z.shape[0]
    labels = torch.tensor([HEALTHY] * batch + [NULL_LABEL] * batch, device=z.device)
    timesteps = torch.full((2 * batch,), t, device=z.device, dtype=torch.long)
    eps_healthy, eps_null = network(torch.cat([z, z]), timesteps, class_labels=labels).float().chunk(2)
    return (1 + guidance) * eps_healthy - guidance * eps_null, eps_null


def run_forward_process(
    network: torch.nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    config: ForwardProcessConfig,
    map_channels: Sequence[int],
    progress: ProgressCallback | None = None,
    slice_indices: Sequence[int] | None = None,
) -> ForwardProcessResult:
    """Run the forward process on a batch of clean slices.

    A slice's result depends on the slice, the network and ``config`` only (its noise is drawn by
    ``SliceNoise`` and its early stop is its own), not on the other slices of the batch.

    Args:
        network: eps-prediction network ``network(x, timesteps, class_labels=...)``.
        x0: B x C x H x W slices in [-1, 1], on the network's device.
        schedule: the diffusion schedule the network was trained with.
        config: guidance weight, steps, stride, encoding, early stop and seed.
        map_channels: indices of the channels that get anomaly maps (FLAIR and T2).
        progress: called with (visited steps done, visited steps planned) after each step.
        slice_indices: each slice's run-wide index, which seeds its noise (None: 0 .. B - 1).

    Returns:
        The streaming statistics of every slice.
    """
    if x0.dim() != 4:
        raise ValueError(f"x0 must be B x C x H x W, got shape {tuple(x0.shape)}")
    if not map_channels or any(not 0 <= c < x0.shape[1] for c in map_channels):
        raise ValueError(f"map_channels {list(map_channels)} must index the {x0.shape[1]} input channels")
    steps = config.visited_steps
    if steps[-1] >= schedule.num_timesteps:
        raise ValueError(f"forward_steps {config.forward_steps} exceeds the schedule's {schedule.num_timesteps}")
    channels = list(map_channels)
    noise = SliceNoise(config.seed, range(len(x0)) if slice_indices is None else slice_indices, x0)
    stats = _StreamingStatistics(x0[:, channels].shape, x0.device)
    x0_maps = x0[:, channels]
    z = schedule.add_noise(x0, noise.draw(), steps[0])
    visited: list[int] = []
    evaluations = 0
    with torch.no_grad():
        for index, t in enumerate(steps):
            if config.encoding == "ddpm" and index:
                z = schedule.add_noise(x0, noise.draw(), t)
            # only the slices that have not stopped go through the network
            rows = None if config.early_stop is None or bool(stats.active.all()) else stats.active.nonzero().squeeze(1)
            z_rows = z if rows is None else z[rows]
            eps_guided, eps_null = guided_and_null_noise(network, z_rows, t, config.guidance)
            evaluations += 2 * z_rows.shape[0]
            guided = _all_rows(schedule.predict_x0(z_rows, eps_guided, t).clamp(-1, 1), rows, x0)
            reference = _all_rows(schedule.predict_x0(z_rows, eps_null, t).clamp(-1, 1), rows, x0)
            stats.update(index, x0_maps, guided[:, channels], reference[:, channels])
            visited.append(t)
            if progress is not None:
                progress(index + 1, len(steps))
            if (index + 1) % RELEASE_MEMORY_EVERY_STEPS == 0:
                release_free_memory()
            if config.early_stop is not None and stats.stop_passed_peaks(index, config.early_stop):
                break
            if config.encoding == "ddim" and index + 1 < len(steps):
                z = _all_rows(schedule.ddim_step(z_rows, eps_null, t, steps[index + 1]), rows, z)
    release_free_memory()
    step_tensor = torch.tensor(visited, device=x0.device)
    return ForwardProcessResult(
        anomaly_maps=stats.anomaly_maps,
        end_step_maps=stats.end_step_maps,
        end_steps=step_tensor[stats.best_index],
        max_divergence=stats.best,
        mse_guided=torch.stack(stats.mse_guided, dim=1),
        mse_reference=torch.stack(stats.mse_reference, dim=1),
        divergence=torch.stack(stats.divergence, dim=2),
        visited_steps=visited,
        network_evaluations=evaluations,
    )


def _all_rows(values: torch.Tensor, rows: torch.Tensor | None, fill: torch.Tensor) -> torch.Tensor:
    """``values`` of the slices ``rows`` (None: all) put into a copy of ``fill`` (B x ...)."""
    return values if rows is None else fill.index_copy(0, rows, values)


@dataclass
class SliceStatistics:
    """What the decisions need of each of N slices, gathered on the CPU (M map modalities).

    Attributes:
        scores: N cosine similarities of each slice's MSEh and MSEr curves.
        anomaly_maps: N x M x H x W, H_m.
        end_step_maps: N x M x H x W, the squared error at t_e alone.
        end_steps: N x M, t_e as timesteps.
        max_divergence: N x M, max_t D_t[m].
        network_evaluations: network evaluations of all slices.
        visited_steps: the most steps any chunk visited.
    """

    scores: torch.Tensor
    anomaly_maps: torch.Tensor
    end_step_maps: torch.Tensor
    end_steps: torch.Tensor
    max_divergence: torch.Tensor
    network_evaluations: int
    visited_steps: int

    def scattered(self, visited: np.ndarray) -> SliceStatistics:
        """These statistics of the ``visited`` slices spread over all N = len(visited) slices; a slice not visited
        gets what identical error curves give: cosine score 1 (healthy), zero maps, divergence and end step."""
        index = torch.from_numpy(np.flatnonzero(visited))

        def spread(values: torch.Tensor, fill: float) -> torch.Tensor:
            return torch.full((len(visited), *values.shape[1:]), fill, dtype=values.dtype).index_copy(0, index, values)

        return SliceStatistics(
            scores=spread(self.scores, 1.0),
            anomaly_maps=spread(self.anomaly_maps, 0.0),
            end_step_maps=spread(self.end_step_maps, 0.0),
            end_steps=spread(self.end_steps, 0),
            max_divergence=spread(self.max_divergence, 0.0),
            network_evaluations=self.network_evaluations,
            visited_steps=self.visited_steps,
        )


def chunk_workers(device: torch.device, chunks: int) -> int:
    """Chunks of slices run at once: on a CPU one per torch thread, each chunk on one thread (torch's threads sharing
    one small network call wait on each other: 1.6 times slower than two single-threaded chunks on the idle 2-core
    CPU, 3 times on busy cores; docs/performance.md); one on a GPU."""
    return max(1, min(torch.get_num_threads(), chunks)) if device.type == "cpu" else 1


def run_on_slices(
    model: LoadedModel,
    slices: np.ndarray | torch.Tensor,
    config: ForwardProcessConfig,
    batch_size: int,
    progress: ProgressCallback | None = None,
    bf16: bool = False,
    slice_indices: Sequence[int] | None = None,
) -> SliceStatistics:
    """Run the forward process over any number of slices in chunks of ``batch_size``.

    Slice i is the run-wide slice i of ``run_forward_process`` (or ``slice_indices[i]``): its result does not depend
    on the batch size, on the other slices, or on the device's random generator. On a CPU the chunks run in
    ``chunk_workers`` threads of one torch thread each.

    Args:
        model: the trained model (its device is used).
        slices: N x C x S x S clean slices in the model's sequence order.
        config: the forward-process settings.
        batch_size: slices per network batch.
        progress: called with (visited steps done, planned) summed over chunks.
        bf16: run the network under bfloat16 autocast (the statistics stay float32).
        slice_indices: each slice's run-wide index, which seeds its noise (None: 0 .. N - 1), so that a subset of a
            volume's slices gets the statistics those slices get in a run over all of them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    schedule = NoiseSchedule.from_dict(model.schedule, device=model.device)
    map_channels = [model.config.sequences.index(s) for s in MAP_SEQUENCES]
    starts = list(range(0, len(slices), batch_size))
    steps_done = itertools.count(1)  # visited steps of all chunks
    reporting = threading.Lock()  # one call at a time, in order, whichever worker finished a step

    def report_step(done: int, total: int) -> None:
        if progress is not None:
            with reporting:
                progress(next(steps_done), len(starts) * len(config.visited_steps))

    def run_chunk(begin: int) -> ForwardProcessResult:
        chunk_slices = slices[begin : begin + batch_size]
        x0 = (torch.from_numpy(chunk_slices) if isinstance(chunk_slices, np.ndarray) else chunk_slices).to(model.device)
        indices = range(begin, begin + len(x0)) if slice_indices is None else slice_indices[begin : begin + len(x0)]
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):  # autocast is per thread
            return run_forward_process(model.network, x0, schedule, config, map_channels, report_step, indices)

    workers = chunk_workers(model.device, len(starts))
    if workers == 1:
        parts = [run_chunk(begin) for begin in starts]
    else:
        threads = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                parts = list(pool.map(run_chunk, starts))
        finally:
            torch.set_num_threads(threads)  # the workers' setting is the process's too
    if not parts:
        raise ValueError("no slices to run the forward process on")
    return SliceStatistics(
        scores=torch.cat([cosine_scores(p.mse_guided, p.mse_reference).cpu() for p in parts]),
        anomaly_maps=torch.cat([p.anomaly_maps.cpu() for p in parts]),
        end_step_maps=torch.cat([p.end_step_maps.cpu() for p in parts]),
        end_steps=torch.cat([p.end_steps.cpu() for p in parts]),
        max_divergence=torch.cat([p.max_divergence.cpu() for p in parts]),
        network_evaluations=sum(p.network_evaluations for p in parts),
        visited_steps=max(len(p.visited_steps) for p in parts),
    )
