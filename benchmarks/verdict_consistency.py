"""Do the slice verdicts, scores and maps of a calibrated mode depend on the batch size or the device?

Runs the mode's forward process on a seeded random sample of a prepared split once per (device, batch size)
setting and prints, for each setting against the first, the time, the unhealthy calls, the verdicts that differ
and the largest score and anomaly-map differences. A slice's result should depend on the slice alone: any
difference across batch sizes is a bug; across devices it is the devices' arithmetic (e.g. TF32 convolutions on
a GPU, which ``NVIDIA_TF32_OVERRIDE=0`` turns off). Prints figures; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/verdict_consistency.py --model model/anofpdm.pt --data data/slices64 \\
        --settings cpu:16,cpu:128,cuda:128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from anofpdm.data.slices import SliceDataset
from anofpdm.method.forward_process import SliceStatistics, run_on_slices
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import InferenceOptions, resolve_options


def parse_settings(text: str) -> list[tuple[str, int]]:
    """"cpu:16,cuda:128" -> [("cpu", 16), ("cuda", 128)]."""
    settings = []
    for item in text.split(","):
        device, _, batch = item.strip().rpartition(":")
        if not device or not batch.isdigit() or int(batch) < 1:
            raise argparse.ArgumentTypeError(f"setting {item!r} is not device:batch_size (e.g. cpu:16)")
        settings.append((device, int(batch)))
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared slices folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--mode", default="fast", help="a calibrated mode of the model")
    parser.add_argument("--slices", type=int, default=128, help="size of the seeded random sample")
    parser.add_argument("--settings", type=parse_settings, default=parse_settings("cpu:16,cpu:128"))
    parser.add_argument("--seed", type=int, default=0, help="sample and noise seed")
    args = parser.parse_args()

    models = {device: load_model(args.model, device) for device in dict.fromkeys(d for d, _ in args.settings)}
    dataset = SliceDataset(args.data, args.split, sequences=next(iter(models.values())).config.sequences)
    rows = np.sort(np.random.default_rng(args.seed).choice(len(dataset), min(args.slices, len(dataset)), replace=False))
    pairs = dataset.__getitems__(rows.tolist())
    images = torch.stack([image for image, _ in pairs])
    unhealthy = sum(label for _, label in pairs)
    print(f"{args.model}, mode {args.mode}: {len(rows)} {args.split} slices ({unhealthy} unhealthy)")
    first: SliceStatistics | None = None
    for device, batch_size in args.settings:
        model = models[device]
        config, calibration, _ = resolve_options(model, InferenceOptions(mode=args.mode, seed=args.seed))
        start = time.perf_counter()
        stats = run_on_slices(model, images, config, batch_size)
        seconds = time.perf_counter() - start
        called = stats.scores <= calibration.cosine_threshold
        line = (f"{device}, batch {batch_size}: {seconds:.1f} s, {stats.network_evaluations / len(rows):.1f} network "
                f"evaluations per slice, {int(called.sum())} called unhealthy (c* {calibration.cosine_threshold:.6f})")
        if first is not None:
            differing = int((called != (first.scores <= calibration.cosine_threshold)).sum())
            line += (f"; against the first setting: {differing} verdicts differ, max |score difference| "
                     f"{(stats.scores - first.scores).abs().max().item():.2e}, max |map difference| "
                     f"{(stats.anomaly_maps - first.anomaly_maps).abs().max().item():.2e}")
        print(line, flush=True)
        first = first or stats


if __name__ == "__main__":
    main()
