"""Classifier-free-guidance training of the noise-prediction UNet (docs/method.md section 2).

Epsilon-prediction MSE with t uniform in [0, T), the slice label (healthy 0 / unhealthy 1) replaced by
the null label with probability 0.1, AdamW and an exponential moving average (EMA) of the weights; the
EMA weights are what is exported.

Every random draw is a pure function of ``(seed, iteration)``: the global batch of iteration ``i`` (data
order), its timesteps, noise and label dropout. A run therefore resumes bit-exactly from the iteration
counter alone, and the global batch is the same for any number of DistributedDataParallel ranks (each
rank trains on its shard of it).

A run folder holds:

- ``state.pt``: resume state (weights, EMA, optimizer, iteration, config, elapsed time), plain tensors
  and simple types, written atomically;
- ``model.pt``: the inference checkpoint (:func:`anofpdm.model.save_checkpoint`) with the EMA weights and
  a training record;
- ``loss.csv`` and ``loss.png``: the loss curve.

Launch on several GPUs with ``torchrun --nproc_per_node N -m anofpdm.cli train ...``; without torchrun it
runs as one process.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import hashlib
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from anofpdm.data.slices import MANIFEST_NAME, SliceDataset
from anofpdm.diffusion import NoiseSchedule, ScheduleConfig
from anofpdm.model import NULL_LABEL, PRESETS, NetworkConfig, build_network, save_checkpoint
from anofpdm.runtime import describe_device
from anofpdm.validation import ValidationLog, ValidationLoss

__all__ = [
    "TrainConfig",
    "TrainingInterrupted",
    "GlobalBatchSampler",
    "DiffusionDraw",
    "draw_diffusion_inputs",
    "resolve_network",
    "train",
    "add_train_arguments",
    "run_from_args",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "best.pt"  # the network with the lowest validation loss
LOSS_CSV = "loss.csv"
LOSS_PLOT = "loss.png"
TRAIN_SPLIT = "train"
STATE_FORMAT = "anofpdm-train-state-v1"
UNRECORDED_DEVICE = "not recorded"  # iterations of a state saved before devices were recorded
CSV_FIELDS = ("iteration", "loss", "smoothed_loss", "iterations_per_s", "elapsed_s")
LOSS_SMOOTHING = 0.01  # per-iteration weight of new losses in the smoothed curve (a ~100-iteration horizon)
EMA_HORIZONS = 5.0  # warn when a run is shorter than this many EMA time constants 1 / (1 - decay)
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C
# independent random streams, each seeded by (seed, stream, counter)
DATA_STREAM, DIFFUSION_STREAM, INIT_STREAM = 0, 1, 2
# TrainConfig fields that define the optimisation problem: a resumed run must not change them
RESUME_INVARIANTS = (
    "network",
    "data",
    "train_slices",
    "batch_size",
    "lr",
    "weight_decay",
    "ema_decay",
    "null_label_probability",
    "seed",
    "schedule",
)


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how.

    Args:
        data: prepared slice folder (``manifest.json``, ``train_images.npy``, ``train_labels.npy``).
        iterations: total optimiser steps of the run (a resumed run may raise it).
        network: a preset name from :data:`anofpdm.model.PRESETS`, whose ``image_size`` is taken from the
            data, or a :class:`NetworkConfig`, whose ``image_size`` must match the data.
        sequences: the prepared sequences to train on, in channel order; default: the network's.
        batch_size: global batch (all ranks together); the paper's is 64.
        lr: AdamW learning rate.
        lr_decay_from: from this iteration on the learning rate falls linearly from ``lr`` towards 0 at
            ``iterations`` (a cool-down at the end of a run); None keeps it constant. A resumed run may add
            or move it, to an iteration it has not trained yet.
        weight_decay: AdamW weight decay (the authors' code uses none).
        ema_decay: EMA decay per step; 0.9999 needs tens of thousands of steps, short runs need less.
        null_label_probability: chance that a slice's label is replaced by the null label.
        checkpoint_every: write ``state.pt``, ``model.pt`` and ``loss.png`` every this many iterations.
        validate_every: every this many iterations, add the validation loss (:mod:`anofpdm.validation`) to
            ``validation.csv`` and, when it is the lowest yet, export the network as ``best.pt``; None: never.
        validation_timesteps: the noise levels the validation loss averages over (small ones: the fast mode's).
        validation_slices: how many validation slices (a seeded subset) it uses.
        log_every: add a ``loss.csv`` row every this many iterations.
        seed: seeds the initial weights, the data order and every diffusion draw.
        num_workers: data-loading worker processes.
        bf16: bfloat16 autocast of the network (CUDA only); weights, optimiser and loss stay fp32.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default ``cuda:LOCAL_RANK`` if available, else CPU.
        schedule: the diffusion noise schedule.
    """

    data: Path
    iterations: int
    network: str | NetworkConfig = "cpu"
    sequences: tuple[str, ...] | None = None
    batch_size: int = 64
    lr: float = 1e-4
    lr_decay_from: int | None = None
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    null_label_probability: float = 0.1
    checkpoint_every: int = 1000
    validate_every: int | None = None
    validation_timesteps: tuple[int, ...] = (25, 50, 100, 200)
    validation_slices: int = 256
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    bf16: bool = False
    device: str | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "validation_timesteps", tuple(self.validation_timesteps))
        if self.sequences is not None:
            object.__setattr__(self, "sequences", tuple(self.sequences))
            if not self.sequences or len(set(self.sequences)) != len(self.sequences):
                raise ValueError(f"sequences must be distinct and non-empty, got {self.sequences}")
        if isinstance(self.network, str) and self.network not in PRESETS:
            raise ValueError(f"unknown network preset {self.network!r}; choose one of {sorted(PRESETS)}")
        if not isinstance(self.network, (str, NetworkConfig)):
            raise TypeError(f"network must be a preset name or a NetworkConfig, got {type(self.network)}")
        for name in ("iterations", "batch_size", "checkpoint_every", "log_every", "validation_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0 or self.num_workers < 0:
            raise ValueError(f"seed and num_workers must be non-negative, got {self.seed}, {self.num_workers}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.validate_every is not None and self.validate_every < 1:
            raise ValueError(f"validate_every must be at least 1 (or None), got {self.validate_every}")
        if self.lr_decay_from is not None and not 0 <= self.lr_decay_from < self.iterations:
            raise ValueError(f"lr_decay_from must be in [0, iterations={self.iterations}), got {self.lr_decay_from}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.null_label_probability < 1:
            raise ValueError(f"null_label_probability must be in [0, 1), got {self.null_label_probability}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"device {self.device!r} is not a torch device: {exc}") from exc
        if self.iterations * (1 - self.ema_decay) < EMA_HORIZONS:
            warnings.warn(
                f"{self.iterations} iterations at ema_decay {self.ema_decay}: the exported EMA weights still "
                "carry much of the random initialisation; lower ema_decay for short runs",
                stacklevel=2,
            )

    def learning_rate(self, iteration: int) -> float:
        """The learning rate of the optimiser step taken at ``iteration`` (0-based, before the step)."""
        if self.lr_decay_from is None or iteration < self.lr_decay_from:
            return self.lr
        return self.lr * (self.iterations - iteration) / (self.iterations - self.lr_decay_from)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type view (for ``state.pt`` and the training record)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["data"] = str(self.data)
        out["network"] = self.network if isinstance(self.network, str) else self.network.to_dict()
        out["sequences"] = None if self.sequences is None else list(self.sequences)
        out["validation_timesteps"] = list(self.validation_timesteps)
        out["schedule"] = self.schedule.to_dict()
        return out


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after a stop request (Ctrl-C, SIGTERM) once the run state is saved.

    Args:
        iteration: the iteration the run stopped at (``state.pt`` holds it).
        run_dir: the run folder; resume with ``resume=True``.
    """

    def __init__(self, iteration: int, run_dir: Path) -> None:
        super().__init__(f"training stopped at iteration {iteration}; state saved in {run_dir}")
        self.iteration = iteration
        self.run_dir = run_dir


def _stream_seed(seed: int, stream: int, counter: int) -> int:
    """A 64-bit seed for one random stream at one counter value (iteration or epoch)."""
    return int(np.random.SeedSequence([seed, stream, counter]).generate_state(1, dtype=np.uint64)[0])


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
            rng = np.random.default_rng(_stream_seed(self.seed, DATA_STREAM, epoch))
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


def read_manifest(data: Path) -> dict[str, Any]:
    """The prepared data's manifest, checked for the keys training needs."""
    path = data / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data at {data}: {MANIFEST_NAME} is missing (run `anofpdm prepare`)")
    manifest = json.loads(path.read_text())
    missing = [k for k in ("sequences", "size") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return manifest


def resolve_network(config: TrainConfig, manifest: dict[str, Any]) -> NetworkConfig:
    """The network to train: the preset (at the data's slice size) or the given config, on the chosen sequences.

    Raises:
        ValueError: a sequence is not in the prepared data, or the given network's image size differs
            from the data's.
    """
    prepared, size = tuple(manifest["sequences"]), int(manifest["size"])
    if isinstance(config.network, str):
        try:
            base = replace(PRESETS[config.network], image_size=size)
        except ValueError as exc:
            raise ValueError(f"preset {config.network!r} cannot run at the data's slice size {size}: {exc}") from exc
    elif config.network.image_size != size:
        raise ValueError(
            f"network image_size {config.network.image_size} differs from the prepared data's slice size "
            f"{size} ({config.data})"
        )
    else:
        base = config.network
    sequences = config.sequences or base.sequences
    absent = [s for s in sequences if s not in prepared]
    if absent:
        raise ValueError(f"sequences {absent} are not in the prepared data {config.data} (it has {list(prepared)})")
    return replace(base, sequences=sequences)


def _train_split_fingerprint(data: Path, manifest: dict[str, Any]) -> str:
    """Identifies the training split wherever the folder lies: its case list, sequences, size and labels."""
    digest = hashlib.sha256()
    described = {k: manifest.get(k) for k in ("sequences", "size", "seed", "field_of_view_mm")}
    described["train"] = manifest.get("splits", {}).get(TRAIN_SPLIT)
    digest.update(json.dumps(described, sort_keys=True).encode())
    digest.update((data / f"{TRAIN_SPLIT}_labels.npy").read_bytes())
    return digest.hexdigest()[:16]


def _data_summary(data: Path, manifest: dict[str, Any], dataset: SliceDataset) -> dict[str, Any]:
    """Where the training slices came from: the folder, its manifest's counts per split, the label counts."""
    counts = np.bincount(np.asarray(dataset.labels, dtype=np.int64), minlength=2)
    splits = {
        name: {key: len(value) if isinstance(value, list) else value for key, value in info.items()}
        for name, info in manifest.get("splits", {}).items()
    }
    return {
        "path": str(data.resolve()),
        "fingerprint": _train_split_fingerprint(data, manifest),
        "format": manifest.get("format"),
        "sequences": list(manifest["sequences"]),
        "size": int(manifest["size"]),
        "split_seed": manifest.get("seed"),
        "splits": splits,
        "train_slices": len(dataset),
        "train_healthy": int(counts[0]),
        "train_unhealthy": int(counts[1]),
    }


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly one-process) DistributedDataParallel job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _choose_device(requested: str | None, local_rank: int) -> torch.device:
    if requested is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def distributed_context(device: str | None) -> Iterator[Distributed]:
    """Join the torchrun job described by WORLD_SIZE / RANK / LOCAL_RANK, if any (NCCL on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _choose_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    started_here = world_size > 1 and not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    try:
        yield Distributed(rank=rank, world_size=world_size, device=chosen)
    finally:
        if started_here:
            dist.destroy_process_group()


STOP_TIME_LIMIT, STOP_REQUESTED = 1, 2


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


class EMA:
    """Exponential moving average of a module's weights: ``ema <- decay * ema + (1 - decay) * weights``.

    Args:
        source: the module being trained (its parameters are updated in place by the optimiser).
        decay: weight of the old average per update.
    """

    def __init__(self, source: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(source).requires_grad_(False).eval()
        pairs = list(zip(self.module.state_dict().values(), source.state_dict().values()))
        self._averages = [average for average, _ in pairs if average.is_floating_point()]
        self._currents = [current for average, current in pairs if average.is_floating_point()]
        self._copied = [(average, current) for average, current in pairs if not average.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self._averages:  # one multi-tensor kernel instead of one launch per tensor (matters on GPUs)
            torch._foreach_lerp_(self._averages, self._currents, 1 - self.decay)
        for average, current in self._copied:
            average.copy_(current)


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
        tmp = self.plot_path.with_name(self.plot_path.name + ".tmp")
        figure.savefig(tmp, format="png", dpi=100)
        tmp.replace(self.plot_path)


class Trainer:
    """The network, its EMA and optimiser, and one training step.

    Args:
        config: the training config.
        network_config: the resolved network.
        ctx: the distributed context.
    """

    def __init__(self, config: TrainConfig, network_config: NetworkConfig, ctx: Distributed) -> None:
        self.config, self.network_config, self.ctx = config, network_config, ctx
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stream_seed(config.seed, INIT_STREAM, 0))
            self.network = build_network(network_config).to(ctx.device)
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes every iteration: cuDNN may pick faster kernels
        self.model: torch.nn.Module = (
            DistributedDataParallel(self.network, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
            if ctx.enabled
            else self.network
        )
        self.ema = EMA(self.network, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = NoiseSchedule(config.schedule, device=ctx.device)
        self.generator = torch.Generator(device=ctx.device)
        self.image_shape = (len(network_config.sequences), network_config.image_size, network_config.image_size)

    def _autocast(self) -> Any:
        if self.config.bf16:
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def step(self, images: torch.Tensor, labels: torch.Tensor, iteration: int) -> torch.Tensor:
        """One optimiser and EMA update on this rank's shard of the batch of ``iteration``; returns the loss."""
        self.generator.manual_seed(_stream_seed(self.config.seed, DIFFUSION_STREAM, iteration))
        draw = draw_diffusion_inputs(
            self.generator,
            self.config.batch_size,
            self.image_shape,
            self.schedule.num_timesteps,
            self.config.null_label_probability,
        ).shard(self.ctx.rank, self.ctx.world_size)
        images = images.to(self.ctx.device, non_blocking=True)
        labels = labels.to(self.ctx.device, non_blocking=True)
        noised = self.schedule.add_noise(images, draw.noise, draw.timesteps)
        with self._autocast():
            predicted = self.model(noised, timesteps=draw.timesteps, class_labels=draw.conditioning(labels))
        loss = F.mse_loss(predicted.float(), draw.noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate(iteration)
        self.optimizer.step()
        self.ema.update()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.network.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])


def _invariants(config: TrainConfig, network_config: NetworkConfig, data: dict[str, Any]) -> dict[str, Any]:
    values = config.to_dict()
    values.update(network=network_config.to_dict(), data=data["fingerprint"], train_slices=data["train_slices"])
    return {key: values[key] for key in RESUME_INVARIANTS}


def _load_state(run_dir: Path, resume: bool, invariants: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
    """The saved state to resume from (None for a new run), checked against this run's invariants."""
    path = run_dir / STATE_FILE
    if not resume:
        if path.exists():
            raise FileExistsError(f"{run_dir} already holds a training run; resume it or choose another folder")
        return None
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no {STATE_FILE} in {run_dir}")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an anofpdm training state ({STATE_FORMAT})")
    changed = [
        f"{key}: run has {state['invariants'].get(key)!r}, now {value!r}"
        for key, value in invariants.items()
        if state["invariants"].get(key) != value
    ]
    if changed:
        raise ValueError(f"cannot resume {run_dir} with a different setup:\n  " + "\n  ".join(changed))
    return state


def _check_lr_history(state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a learning-rate decay that would change the rate of iterations the run has already trained."""
    start, saved = state["iteration"], state["config"]
    saved_from = saved.get("lr_decay_from")  # None in states saved before the decay existed
    if saved_from is not None and saved_from < start:
        if (config.lr_decay_from, config.iterations) != (saved_from, saved["iterations"]):
            raise ValueError(
                f"cannot resume {start} iterations into a learning-rate decay from {saved_from} to "
                f"{saved['iterations']} with another one: resume with lr_decay_from {saved_from} and iterations "
                f"{saved['iterations']}"
            )
    elif config.lr_decay_from is not None and config.lr_decay_from < start:
        raise ValueError(
            f"lr_decay_from {config.lr_decay_from} is before iteration {start}, which the run has reached at a "
            f"constant learning rate; start the decay at {start} or later"
        )


def _check_validation_history(state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse validation settings other than those the run's ``validation.csv`` was measured with."""
    saved = state["config"]
    if saved.get("validate_every") is None or config.validate_every is None:
        return
    before = (list(saved["validation_timesteps"]), saved["validation_slices"])
    now = (list(config.validation_timesteps), config.validation_slices)
    if before != now:
        raise ValueError(
            f"cannot resume with validation timesteps {now[0]} on {now[1]} slices: the run's validation losses "
            f"were measured at {before[0]} on {before[1]}; resume with those"
        )


def _atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _training_record(
    config: TrainConfig,
    data: dict[str, Any],
    ctx: Distributed,
    iteration: int,
    elapsed_s: float,
    devices: list[list[Any]],
) -> dict[str, Any]:
    return {
        "data": data,
        "preset": config.network if isinstance(config.network, str) else None,
        "iterations": iteration,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "lr_decay_from": config.lr_decay_from,
        "weight_decay": config.weight_decay,
        "ema_decay": config.ema_decay,
        "null_label_probability": config.null_label_probability,
        "seed": config.seed,
        "bf16": config.bf16,
        "wall_time_s": round(elapsed_s, 3),
        "devices": devices,  # [device, iterations it ran], in order: a run may resume on other hardware
        "world_size": ctx.world_size,
        "torch_version": str(torch.__version__),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_sample(dataset: SliceDataset, image_shape: tuple[int, ...]) -> None:
    """Fail early, with the shapes, when the slices do not fit the network."""
    if len(dataset) == 0:
        raise ValueError("the training split is empty")
    shape = tuple(dataset[0][0].shape)
    if shape != image_shape:
        raise ValueError(f"training slices are {shape}, the network expects {image_shape}")


class _Run:
    """One training session of a run folder: the trainer, its loss log, saving and the loop.

    Args:
        config: what to train and how.
        network_config: the resolved network.
        data: the data summary for the training record.
        invariants: what a resumed run must not change (saved with the state).
        ctx: the distributed context.
        run_dir: the run folder.
        state: the state to resume from, or None.
    """

    def __init__(
        self,
        config: TrainConfig,
        network_config: NetworkConfig,
        data: dict[str, Any],
        invariants: dict[str, Any],
        ctx: Distributed,
        run_dir: Path,
        state: dict[str, Any] | None,
    ) -> None:
        self.config, self.network_config, self.data, self.invariants = config, network_config, data, invariants
        self.ctx, self.run_dir = ctx, run_dir
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = Trainer(config, network_config, ctx)
        self.start, self.elapsed_before, smoothed = 0, 0.0, None
        self.earlier_devices: list[list[Any]] = []
        if state is not None:
            self.trainer.load_state_dict(state)
            self.start, self.elapsed_before, smoothed = state["iteration"], state["elapsed_s"], state["smoothed_loss"]
            unrecorded = [[UNRECORDED_DEVICE, self.start]] if self.start else []
            self.earlier_devices = [list(entry) for entry in state.get("devices", unrecorded)]
        self.log = LossLog(run_dir, ctx, self.start, smoothed)
        # every rank reads the validation slices, so bad validation input stops all of them at once; the main
        # rank alone measures and logs
        validating = config.validate_every is not None
        self.validation_loss = ValidationLoss(
            config.data, network_config.sequences, config.validation_timesteps, config.validation_slices,
            config.seed, self.trainer.schedule, ctx.device,
        ) if validating else None
        self.validation_log = ValidationLog(run_dir, self.start) if validating and ctx.is_main else None
        self.clock = time.monotonic()

    def elapsed(self) -> float:
        """Wall time of the whole run, earlier sessions included."""
        return self.elapsed_before + time.monotonic() - self.clock

    def devices(self, iteration: int) -> list[list[Any]]:
        """[device, iterations] of the whole run up to ``iteration``; a session that trained nothing adds nothing."""
        devices = [list(entry) for entry in self.earlier_devices]
        done, device = iteration - self.start, describe_device(self.ctx.device)
        device = device if self.ctx.world_size == 1 else f"{self.ctx.world_size} x {device}"
        if done and devices and devices[-1][0] == device:
            devices[-1][1] += done
        elif done:
            devices.append([device, done])
        return devices

    def _export(self, path: Path, iteration: int, seconds: float, devices: list[list[Any]], **record: Any) -> None:
        """Write the EMA weights as an inference checkpoint, its training record extended by ``record``."""
        training = _training_record(self.config, self.data, self.ctx, iteration, seconds, devices)
        save_checkpoint(path, self.network_config, self.trainer.ema.module.state_dict(),
                        self.config.schedule.to_dict(), training={**training, **record})

    def validate(self, iteration: int) -> None:
        """Log the EMA network's validation loss; export it as ``best.pt`` when the loss is the lowest yet."""
        if self.validation_loss is None or self.validation_log is None:  # not asked for, or not the main rank
            return
        loss = self.validation_loss(self.trainer.ema.module)
        if self.validation_log.add(iteration, loss):
            selected = {"validation_loss": loss, "validation_timesteps": list(self.config.validation_timesteps),
                        "validation_slices": len(self.validation_loss.images)}
            self._export(self.run_dir / BEST_MODEL_FILE, iteration, self.elapsed(), self.devices(iteration),
                         selected_by=selected)
            logger.info("iteration %d: validation loss %.6f, the lowest yet: %s", iteration, loss, BEST_MODEL_FILE)

    def save(self, iteration: int) -> None:
        """Write ``state.pt``, ``model.pt`` (EMA weights) and ``loss.png`` (main rank only)."""
        if not self.ctx.is_main:
            return
        seconds, devices = self.elapsed(), self.devices(iteration)
        _atomic_torch_save(
            {
                "format": STATE_FORMAT,
                "iteration": iteration,
                "elapsed_s": seconds,
                "smoothed_loss": self.log.smoothed,
                "devices": devices,
                "invariants": self.invariants,
                "config": self.config.to_dict(),
                **self.trainer.state_dict(),
            },
            self.run_dir / STATE_FILE,
        )
        self._export(self.run_dir / MODEL_FILE, iteration, seconds, devices)
        self.log.plot()

    def _announce(self, num_slices: int) -> None:
        if self.ctx.is_main:
            logger.info(
                "training %s: %d parameters, %d slices, %d ranks x batch %d on %s, iterations %d -> %d",
                self.network_config.sequences,
                sum(p.numel() for p in self.trainer.network.parameters()),
                num_slices,
                self.ctx.world_size,
                self.config.batch_size // self.ctx.world_size,
                describe_device(self.ctx.device),
                self.start,
                self.config.iterations,
            )

    def fit(
        self,
        dataset: SliceDataset,
        progress: bool,
        on_iteration: Callable[[int], None] | None,
        time_limit_s: float | None = None,
    ) -> None:
        """Train from the current iteration to ``config.iterations``, logging and saving on schedule;
        stop early, saved, once this session has run ``time_limit_s`` seconds."""
        config, ctx = self.config, self.ctx
        _check_sample(dataset, self.trainer.image_shape)
        stop_at = max(self.start, config.iterations)  # a run already past `iterations` only refreshes its export
        sampler = GlobalBatchSampler(
            len(dataset), config.batch_size, config.seed, self.start, stop_at, ctx.rank, ctx.world_size
        )
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=ctx.device.type == "cuda"
        )
        show = progress and ctx.is_main
        bar = tqdm(total=stop_at, initial=self.start, desc="train", unit="it", disable=None if show else True)
        iteration = self.start
        with StopRequest() as stop, bar:
            self._announce(len(dataset))  # from here a stop request is saved, not fatal
            for images, labels in loader:
                self.log.add(self.trainer.step(images, labels, iteration))
                iteration += 1
                bar.update()
                out_of_time = time_limit_s is not None and time.monotonic() - self.clock >= time_limit_s
                reason = stop.agreed(ctx, out_of_time)
                checkpoint = reason != 0 or iteration % config.checkpoint_every == 0 or iteration == stop_at
                if checkpoint or iteration % config.log_every == 0:
                    row = self.log.flush(iteration, self.elapsed())
                    bar.set_postfix(loss=f"{row['loss']:.4f}", smoothed=f"{row['smoothed_loss']:.4f}")
                if config.validate_every is not None and iteration % config.validate_every == 0:
                    self.validate(iteration)
                if checkpoint:
                    self.save(iteration)
                if reason == STOP_REQUESTED:
                    raise TrainingInterrupted(iteration, self.run_dir)
                if on_iteration is not None:
                    on_iteration(iteration)
                if reason == STOP_TIME_LIMIT:
                    logger.info("time limit reached at iteration %d; state saved, continue with --resume", iteration)
                    break
            if iteration == self.start:
                self.save(iteration)
        if ctx.is_main:
            model = self.run_dir / MODEL_FILE
            logger.info("trained %d iterations in %.0f s; model: %s", iteration, self.elapsed(), model)


def train(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_iteration: Callable[[int], None] | None = None,
    time_limit_s: float | None = None,
) -> Path:
    """Train (or resume training) a classifier-free-guidance noise-prediction UNet.

    Args:
        config: what to train and how.
        run_dir: the run folder (created); only the main rank writes to it.
        resume: continue from ``run_dir/state.pt``; a changed network, data, batch size, optimiser setting
            or seed is an error, as is a learning-rate decay that would change iterations already trained;
            a larger ``iterations`` extends the run.
        progress: show a progress bar (main rank, terminal only).
        on_iteration: called on every rank with the iteration count once each iteration is complete
            (logged and, when due, saved).
        time_limit_s: stop, saved and without error, after the first iteration that ends this many
            seconds after this call started training (a job's wall-time budget); resume to go on.

    Returns:
        The path of the exported inference checkpoint ``run_dir/model.pt``.

    Raises:
        TrainingInterrupted: after SIGINT / SIGTERM, once the state is saved.
    """
    if time_limit_s is not None and time_limit_s < 0:
        raise ValueError(f"time limit must be >= 0 seconds, got {time_limit_s}")
    run_dir = Path(run_dir)
    manifest = read_manifest(config.data)
    network_config = resolve_network(config, manifest)
    dataset = SliceDataset(config.data, TRAIN_SPLIT, sequences=network_config.sequences)
    data = _data_summary(config.data, manifest, dataset)
    invariants = _invariants(config, network_config, data)
    with distributed_context(config.device) as ctx:
        if config.batch_size % ctx.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {ctx.world_size} ranks")
        if config.bf16 and ctx.device.type != "cuda":
            raise ValueError(f"bf16 autocast is for CUDA only; the device is {ctx.device}")
        state = _load_state(run_dir, resume, invariants, ctx.device)
        if state is not None:
            _check_lr_history(state, config)
            _check_validation_history(state, config)
        run = _Run(config, network_config, data, invariants, ctx, run_dir, state)
        run.fit(dataset, progress, on_iteration, time_limit_s)
    return run_dir / MODEL_FILE


def _sequence_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in _sequence_list(text))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` command's options to ``parser``."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    parser.add_argument("--data", type=Path, required=True, help="prepared slice folder (from `anofpdm prepare`)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: state.pt, model.pt, loss.csv, loss.png")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=defaults["network"], help="network size")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    parser.add_argument(
        "--sequences", type=_sequence_list, default=None, help="comma-separated, e.g. flair,t2 (default: the preset's)"
    )
    parser.add_argument("--iterations", type=int, required=True, help="total optimiser steps")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="global batch (all GPUs)")
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument(
        "--lr-decay-from",
        type=int,
        default=None,
        help="from this iteration the learning rate falls linearly to 0 at --iterations (may be added on --resume)",
    )
    parser.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    parser.add_argument("--ema-decay", type=float, default=defaults["ema_decay"], help="lower it for short runs")
    parser.add_argument("--checkpoint-every", type=int, default=defaults["checkpoint_every"])
    parser.add_argument(
        "--validate-every",
        type=int,
        default=None,
        help="log the validation loss every N iterations and keep the network with the lowest as best.pt",
    )
    parser.add_argument(
        "--validation-timesteps",
        type=_int_list,
        default=defaults["validation_timesteps"],
        help="comma-separated noise levels the validation loss averages over",
    )
    parser.add_argument("--validation-slices", type=int, default=defaults["validation_slices"])
    parser.add_argument("--log-every", type=int, default=defaults["log_every"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--num-workers", type=int, default=defaults["num_workers"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--time-limit-min", type=float, help="stop (saved, exit 0) after this many minutes of training")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the ``train`` command; returns the exit status (130 after a saved stop request)."""
    config = TrainConfig(
        data=args.data,
        iterations=args.iterations,
        network=args.preset,
        sequences=args.sequences,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay_from=args.lr_decay_from,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        validation_timesteps=args.validation_timesteps,
        validation_slices=args.validation_slices,
        log_every=args.log_every,
        seed=args.seed,
        num_workers=args.num_workers,
        bf16=args.bf16,
        device=args.device,
    )
    try:
        limit = None if args.time_limit_min is None else 60.0 * args.time_limit_min
        path = train(config, args.out, resume=args.resume, progress=not args.no_progress, time_limit_s=limit)
    except TrainingInterrupted as stopped:
        logger.warning("%s; continue with --resume", stopped)
        return EXIT_INTERRUPTED
    logger.info("wrote %s", path)
    return 0
