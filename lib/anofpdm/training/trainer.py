"""Classifier-free-guidance training of the noise-prediction UNet (docs/method.md section 2).

Epsilon-prediction MSE with t uniform in [0, T), the slice label (healthy 0 / unhealthy 1) replaced by
the null label with probability 0.1, AdamW and an exponential moving average (EMA) of the weights; the
EMA weights are what is exported.

Every random draw is a pure function of ``(seed, iteration)`` (:mod:`anofpdm.training.sampling`), so a run
resumes bit-exactly from the iteration counter alone.

A run folder holds:

- ``state.pt``: resume state (weights, EMA, optimizer, iteration, config, elapsed time), plain tensors
  and simple types, written atomically;
- ``model.pt``: the inference checkpoint (:func:`anofpdm.method.model.save_checkpoint`) with the EMA weights and
  a training record;
- ``loss.csv`` and ``loss.png``: the loss curve.

Launch on several GPUs with ``torchrun --nproc_per_node N -m anofpdm.cli train ...``; without torchrun it
runs as one process.

This module holds the training step (:class:`Trainer`), the loop of one session and the ``train`` command;
the configuration is :mod:`anofpdm.training.config`, the random draws :mod:`anofpdm.training.sampling`, the
resume checks :mod:`anofpdm.training.resume`, the checkpoint's training record :mod:`anofpdm.training.record`,
the EMA :mod:`anofpdm.training.ema`, the loss log :mod:`anofpdm.training.loss_log`, stopping
:mod:`anofpdm.training.stop_request` and
the torchrun context :mod:`anofpdm.distributed`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from anofpdm.arguments import comma_ints, comma_list
from anofpdm.atomic import atomic_path
from anofpdm.training.augment import augment_batch
from anofpdm.data.slices import SliceDataset
from anofpdm.method.diffusion import NoiseSchedule
from anofpdm.distributed import Distributed, distributed_context
from anofpdm.training.ema import EMA
from anofpdm.training.loss_log import LossLog
from anofpdm.method.model import (
    PRESETS, NetworkConfig, build_network, load_checkpoint, network_differences, save_checkpoint,
)
from anofpdm.runtime import describe_device
from anofpdm.seeds import derive_seed
from anofpdm.training.stop_request import STOP_REQUESTED, STOP_TIME_LIMIT, StopRequest, TrainingInterrupted
from anofpdm.training.config import TrainConfig, read_manifest, resolve_network
from anofpdm.training.record import TRAIN_SPLIT, data_summary, training_record
from anofpdm.training.resume import (
    STATE_FILE,
    STATE_FORMAT,
    check_lr_history,
    check_validation_history,
    load_state,
    resume_invariants,
)
from anofpdm.training.sampling import (
    AUGMENT_STREAM,
    DIFFUSION_STREAM,
    INIT_STREAM,
    DiffusionDraw,
    GlobalBatchSampler,
    draw_diffusion_inputs,
)
from anofpdm.training.validation import ValidationLog, ValidationLoss

__all__ = [
    "TrainConfig",
    "TrainingInterrupted",
    "GlobalBatchSampler",
    "DiffusionDraw",
    "draw_diffusion_inputs",
    "resolve_network",
    "read_manifest",
    "Distributed",
    "Trainer",
    "train",
    "add_train_arguments",
    "run_from_args",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "best.pt"  # the network with the lowest validation loss
UNRECORDED_DEVICE = "not recorded"  # iterations of a state saved before devices were recorded
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C


class Trainer:
    """The network, its EMA and optimiser, and one training step.

    Args:
        config: the training config.
        network_config: the resolved network.
        ctx: the distributed context.
        start_weights: weights to start from instead of the seeded initialisation (fine-tuning), or None.
    """

    def __init__(
        self,
        config: TrainConfig,
        network_config: NetworkConfig,
        ctx: Distributed,
        start_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.config, self.network_config, self.ctx = config, network_config, ctx
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, INIT_STREAM, 0))
            self.network = build_network(network_config)
        if start_weights is not None:
            self.network.load_state_dict(start_weights)
        self.network.to(ctx.device)
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
        self.generator.manual_seed(derive_seed(self.config.seed, DIFFUSION_STREAM, iteration))
        draw = draw_diffusion_inputs(
            self.generator,
            self.config.batch_size,
            self.image_shape,
            self.schedule.num_timesteps,
            self.config.null_label_probability,
        ).shard(self.ctx.rank, self.ctx.world_size)
        images = images.to(self.ctx.device, non_blocking=True)
        labels = labels.to(self.ctx.device, non_blocking=True)
        if self.config.augment:
            self.generator.manual_seed(derive_seed(self.config.seed, AUGMENT_STREAM, iteration))
            images = augment_batch(images, self.generator, self.config.batch_size, self.ctx.rank, self.ctx.world_size)
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


def initial_weights(path: Path, network_config: NetworkConfig) -> dict[str, torch.Tensor]:
    """The weights of the exported model at ``path``, checked to be those of ``network_config``'s network.

    The intensity landmarks may differ: fine-tuning may move a model onto newly standardised slices.
    """
    payload = load_checkpoint(path)
    differ = network_differences(NetworkConfig.from_dict(payload["network"]), network_config)
    if differ:
        raise ValueError(f"initial weights {path} are another network than the one trained: "
                         + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items()))
    return payload["state_dict"]


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
        start_weights: the weights a new run starts from (``initial_weights``), or None.
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
        start_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.config, self.network_config, self.data, self.invariants = config, network_config, data, invariants
        self.ctx, self.run_dir = ctx, run_dir
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = Trainer(config, network_config, ctx, start_weights if state is None else None)
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
        training = training_record(self.config, self.data, self.ctx, iteration, seconds, devices)
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
        state = {
            "format": STATE_FORMAT,
            "iteration": iteration,
            "elapsed_s": seconds,
            "smoothed_loss": self.log.smoothed,
            "devices": devices,
            "invariants": self.invariants,
            "config": self.config.to_dict(),
            **self.trainer.state_dict(),
        }
        with atomic_path(self.run_dir / STATE_FILE) as tmp:
            torch.save(state, tmp)
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
    data = data_summary(config.data, manifest, dataset)
    start_weights = None if config.initial_weights is None else initial_weights(config.initial_weights, network_config)
    invariants = resume_invariants(config, network_config, data, start_weights)
    with distributed_context(config.device) as ctx:
        if config.batch_size % ctx.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {ctx.world_size} ranks")
        if config.bf16 and ctx.device.type != "cuda":
            raise ValueError(f"bf16 autocast is for CUDA only; the device is {ctx.device}")
        state = load_state(run_dir, resume, invariants, ctx.device)
        if state is not None:
            check_lr_history(state, config)
            check_validation_history(state, config)
        session = _Run(config, network_config, data, invariants, ctx, run_dir, state, start_weights)
        session.fit(dataset, progress, on_iteration, time_limit_s)
    return run_dir / MODEL_FILE


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` command's options to ``parser``."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    parser.add_argument("--data", type=Path, required=True, help="prepared slice folder (from `anofpdm prepare`)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: state.pt, model.pt, loss.csv, loss.png")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=defaults["network"], help="network size")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    parser.add_argument(
        "--sequences", type=comma_list, default=None, help="comma-separated, e.g. flair,t2 (default: the preset's)"
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
        type=comma_ints,
        default=defaults["validation_timesteps"],
        help="comma-separated noise levels the validation loss averages over",
    )
    parser.add_argument("--validation-slices", type=int, default=defaults["validation_slices"])
    parser.add_argument("--log-every", type=int, default=defaults["log_every"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--num-workers", type=int, default=defaults["num_workers"])
    parser.add_argument("--augment", action="store_true",
                        help="random spatial and intensity augmentation of every slice (anofpdm.training.augment)")
    parser.add_argument("--initial-weights", type=Path, default=None,
                        help="start from this exported model's weights (fine-tuning; same network)")
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
        augment=args.augment,
        initial_weights=args.initial_weights,
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
