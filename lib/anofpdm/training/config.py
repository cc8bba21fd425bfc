"""What to train and how (:class:`TrainConfig`), and the network it resolves to on the prepared data."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from anofpdm.data.slices import MANIFEST_NAME, load_manifest
from anofpdm.method.diffusion import ScheduleConfig
from anofpdm.method.model import PRESETS, NetworkConfig

__all__ = ["TrainConfig", "read_manifest", "resolve_network"]

EMA_HORIZONS = 5.0  # warn when a run is shorter than this many EMA time constants 1 / (1 - decay)


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how.

    Args:
        data: prepared slice folder (``manifest.json``, ``train_images.npy``, ``train_labels.npy``).
        iterations: total optimiser steps of the run (a resumed run may raise it).
        network: a preset name from :data:`anofpdm.method.model.PRESETS`, whose ``image_size`` is taken from the
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
        validate_every: every this many iterations, add the validation loss (:mod:`anofpdm.training.validation`) to
            ``validation.csv`` and, when it is the lowest yet, export the network as ``best.pt``; None: never.
        validation_timesteps: the noise levels the validation loss averages over (small ones: the fast mode's).
        validation_slices: how many validation slices (a seeded subset) it uses.
        log_every: add a ``loss.csv`` row every this many iterations.
        seed: seeds the initial weights, the data order and every diffusion draw.
        num_workers: data-loading worker processes.
        augment: draw every training slice anew with random spatial and intensity transforms
            (``anofpdm.training.augment``), for a network that generalises beyond its training anatomy and scanner.
        initial_weights: an exported model (``model.pt``) whose weights the run starts from instead of a
            random initialisation (fine-tuning); its network must be the one trained, intensity landmarks aside.
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
    augment: bool = False
    initial_weights: Path | None = None
    bf16: bool = False
    device: str | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        if self.initial_weights is not None:
            object.__setattr__(self, "initial_weights", Path(self.initial_weights))
            if not self.initial_weights.is_file():
                raise FileNotFoundError(f"initial weights not found: {self.initial_weights}")
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
                f"carry much of the {'initial weights' if self.initial_weights else 'random initialisation'}; "
                "lower ema_decay for short runs",
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
        out["initial_weights"] = None if self.initial_weights is None else str(self.initial_weights)
        out["network"] = self.network if isinstance(self.network, str) else self.network.to_dict()
        out["sequences"] = None if self.sequences is None else list(self.sequences)
        out["validation_timesteps"] = list(self.validation_timesteps)
        out["schedule"] = self.schedule.to_dict()
        return out


def read_manifest(data: Path) -> dict[str, Any]:
    """The prepared data's manifest, checked for the keys training needs."""
    manifest = load_manifest(data)
    missing = [k for k in ("sequences", "size") if k not in manifest]
    if missing:
        raise ValueError(f"{data / MANIFEST_NAME} lacks {missing}")
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
    # the network sees the slices as prepared: their histogram standardisation, if any, is the model's
    landmarks = manifest.get("intensity_landmarks") or {}
    return replace(base, sequences=sequences,
                   intensity_landmarks=tuple(tuple(landmarks[s]) for s in sequences) if landmarks else ())
