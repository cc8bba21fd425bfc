"""Which slices does the label-free verdict miss? Slice-verdict recall by tumour area on a prepared split.

Runs a calibrated mode's forward process on the split's slices, calls a slice unhealthy when its cosine
score is <= the c* stored in the model for that mode, and prints the recall per bin of tumour area (model-grid
pixels and mm^2) and the specificity on healthy slices. Prints figures; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/verdict_by_tumour_size.py --model model/anofpdm.pt --data data/slices64
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from anofpdm.arguments import comma_ints
from anofpdm.data.slices import MANIFEST_NAME, SliceDataset
from anofpdm.method.forward_process import run_on_slices
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import InferenceOptions, resolve_options
from anofpdm.runtime import default_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared slices folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--mode", default="fast", help="a calibrated mode of the model")
    parser.add_argument("--bins", type=comma_ints, default="1,25,50,100,200",
                        help="lower edges of the tumour-area bins, in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    model = load_model(args.model, args.device)
    config, calibration, _ = resolve_options(model, InferenceOptions(mode=args.mode))
    config = replace(config, seed=calibration.validation["seed"])  # the noise the calibration saw
    dataset = SliceDataset(args.data, args.split, sequences=model.config.sequences)
    manifest = json.loads((args.data / MANIFEST_NAME).read_text())
    pixel_mm2 = (manifest["field_of_view_mm"] / manifest["size"]) ** 2
    area = (np.load(args.data / f"{args.split}_masks.npy", mmap_mode="r") > 0).sum(axis=(1, 2))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    stats = run_on_slices(model, images, config, args.batch_size)
    called = stats.scores.numpy() <= calibration.cosine_threshold

    healthy = area == 0
    print(f"{args.model} ({model.training.get('iterations')} iterations), mode {args.mode}, c* "
          f"{calibration.cosine_threshold:.6f}; {args.split}: {len(area)} slices, {int((~healthy).sum())} with tumour")
    print(f"healthy slices called healthy (specificity): {int((~called[healthy]).sum())} / {int(healthy.sum())}")
    print("| tumour area (pixels) | tumour area (mm^2) | slices | called unhealthy | recall |")
    print("|---|---|---|---|---|")
    edges = [*args.bins, None]
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = (area >= low) & (area < high if high is not None else True)
        span = f"{low}-{high - 1}" if high is not None else f">= {low}"
        mm2 = f"{low * pixel_mm2:.0f}-{high * pixel_mm2:.0f}" if high is not None else f">= {low * pixel_mm2:.0f}"
        hits = int(called[chosen].sum())
        recall = f"{hits / chosen.sum():.2f}" if chosen.any() else "-"
        print(f"| {span} | {mm2} | {int(chosen.sum())} | {hits} | {recall} |")


if __name__ == "__main__":
    main()
