"""What a trained checkpoint records about its training: the data it saw and how it was trained."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anofpdm.data.slices import SliceDataset
from anofpdm.distributed import Distributed
from anofpdm.training.config import TrainConfig

__all__ = ["TRAIN_SPLIT", "data_summary", "training_record"]

TRAIN_SPLIT = "train"


def _train_split_fingerprint(data: Path, manifest: dict[str, Any]) -> str:
    """Identifies the training split wherever the folder lies: its case list, sequences, size and labels."""
    digest = hashlib.sha256()
    described = {k: manifest.get(k) for k in ("sequences", "size", "seed", "field_of_view_mm")}
    described["train"] = manifest.get("splits", {}).get(TRAIN_SPLIT)
    digest.update(json.dumps(described, sort_keys=True).encode())
    digest.update((data / f"{TRAIN_SPLIT}_labels.npy").read_bytes())
    return digest.hexdigest()[:16]


def data_summary(data: Path, manifest: dict[str, Any], dataset: SliceDataset) -> dict[str, Any]:
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


def training_record(
    config: TrainConfig,
    data: dict[str, Any],
    ctx: Distributed,
    iteration: int,
    elapsed_s: float,
    devices: list[list[Any]],
) -> dict[str, Any]:
    """The ``training`` entry of an exported checkpoint after ``iteration`` iterations."""
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
        "augment": config.augment,
        "initial_weights": None if config.initial_weights is None else str(config.initial_weights),
        "bf16": config.bf16,
        "wall_time_s": round(elapsed_s, 3),
        "devices": devices,  # [device, iterations it ran], in order: a run may resume on other hardware
        "world_size": ctx.world_size,
        "torch_version": str(torch.__version__),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
