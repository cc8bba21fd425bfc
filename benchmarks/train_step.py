"""Seconds per training step (the real ``Trainer`` on prepared slices), eager or under ``torch.compile``.

Prints figures; asserts nothing. The heap is reused as the ``anofpdm`` command does, so the figures are the
trainer's (without it a CPU step at batch 256 takes about twice as long, see ``anofpdm.runtime``). Example:

    PYTHONPATH=lib python benchmarks/train_step.py --data slices --batch-size 256
    PYTHONPATH=lib python benchmarks/train_step.py --data slices --batch-size 256 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from anofpdm.data.slices import SliceDataset
from anofpdm.distributed import Distributed
from anofpdm.runtime import default_device, describe_device, reuse_heap_memory
from anofpdm.training.trainer import Trainer
from anofpdm.training.config import TrainConfig, read_manifest, resolve_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an `anofpdm prepare` output folder")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps, after two untimed ones")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (default backend)")
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()
    reuse_heap_memory()
    config = TrainConfig(data=args.data, iterations=1, network=args.preset, batch_size=args.batch_size,
                         ema_decay=0.0, device=args.device)
    network_config = resolve_network(config, read_manifest(config.data))
    trainer = Trainer(config, network_config, Distributed(rank=0, world_size=1, device=torch.device(args.device)))
    if args.compile:
        trainer.model = torch.compile(trainer.model)
    dataset = SliceDataset(config.data, "train", network_config.sequences)
    batch = [dataset[i % len(dataset)] for i in range(args.batch_size)]
    images = torch.stack([torch.as_tensor(image) for image, _ in batch])
    labels = torch.as_tensor([label for _, label in batch])
    seconds = []
    for iteration in range(args.steps + 2):
        start = time.perf_counter()
        trainer.step(images, labels, iteration)
        if trainer.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    print(f"preset={args.preset} batch={args.batch_size} device={describe_device(trainer.ctx.device)} "
          f"threads={torch.get_num_threads()} compile={args.compile}")
    print(f"first step {seconds[0]:.2f} s; then median {statistics.median(seconds[2:]):.3f} s per step "
          f"(min {min(seconds[2:]):.3f}, max {max(seconds[2:]):.3f}) over {args.steps} steps")


if __name__ == "__main__":
    main()
