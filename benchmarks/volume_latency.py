"""Latency of one volume through the pipeline, split into load, preprocessing, network, post-processing and write.

Runs the default ("fast") mode and the full mode on one case (e.g. a 240 x 240 x 155 BraTS or synthetic
volume). The full mode visits every step up to T_f = 600: on a CPU that takes long, so ``--full-steps N``
runs it to N forward steps only and extrapolates the network time linearly in the visited steps (printed
as "extrapolated"; preprocessing, post-processing and writing do not depend on the step count).
``--precisions fp32,bf16`` times both (bfloat16 autocast: for GPUs). Prints figures; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/volume_latency.py --model model/anofpdm.pt --data data/synth --full-steps 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch

from anofpdm.arguments import comma_list
from anofpdm.data.brats import find_cases, load_case
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import InferenceOptions, resolve_options, segment_volume
from anofpdm.runtime import default_device, reuse_heap_memory

STAGES = ("load_s", "preprocess_s", "network_s", "postprocess_s", "write_s")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(model) -> None:
    """One small network call, so that library and kernel start-up is not billed to the first mode."""
    size = model.config.image_size
    x = torch.zeros(2, len(model.config.sequences), size, size, device=model.device)
    t = torch.zeros(2, dtype=torch.long, device=model.device)
    with torch.no_grad():
        model.network(x, t, class_labels=t)
    _sync(model.device)


def measure(model, case, mode: str, forward_steps: int | None, batch_size: int | None, bf16: bool) -> dict:
    """Time one segmentation of ``case`` in ``mode`` (optionally limited to ``forward_steps``)."""
    start = time.perf_counter()
    volume = load_case(case, sequences=model.config.sequences, with_seg=False)
    images = {name: nib.Nifti1Image(volume.images[name], volume.affine) for name in model.config.sequences}
    load_s = time.perf_counter() - start
    options = InferenceOptions(mode=mode, forward_steps=forward_steps, batch_size=batch_size, bf16=bf16)
    result = segment_volume(model, images, options)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        nib.save(result.mask, Path(folder) / "mask.nii.gz")
        nib.save(result.anomaly_map, Path(folder) / "map.nii.gz")
    write_s = time.perf_counter() - start
    report = result.report
    figures = {"mode": mode, "precision": "bf16" if bf16 else "fp32",
               "shape": list(volume.images[model.config.sequences[0]].shape),
               "slices": report["slices"]["segmented"], "visited_steps": report["settings"]["visited_steps"],
               "network_evaluations": report["network_evaluations"], "load_s": load_s, **report["timings_s"],
               "write_s": write_s, "extrapolated": False}
    return figures


def extrapolate(figures: dict, model, mode: str) -> dict:
    """Scale the network time of a step-limited full-mode run to the mode's calibrated T_f."""
    forward, _, _ = resolve_options(model, InferenceOptions(mode=mode))
    planned = len(forward.visited_steps)
    scale = planned / figures["visited_steps"]
    return {**figures, "network_s": figures["network_s"] * scale, "visited_steps": planned,
            "network_evaluations": int(round(figures["network_evaluations"] * scale)), "extrapolated": True}


def _row(figures: dict) -> str:
    total = sum(figures[s] for s in STAGES)
    label = f"{figures['mode']} {figures['precision']}" + (" (extrapolated)" if figures["extrapolated"] else "")
    cells = [label, str(figures["visited_steps"]), *(f"{figures[s]:.2f}" for s in STAGES), f"{total:.2f}",
             f"{figures['slices'] / total:.2f}", f"{figures['network_evaluations'] / figures['network_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BraTS / MSD / synthetic cases; the first is timed")
    parser.add_argument("--case", help="case id to time (default: the first)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--fast-mode", default="fast")
    parser.add_argument("--full-mode", default="full")
    parser.add_argument("--full-steps", type=int,
                        help="run the full mode to this many forward steps only and extrapolate its network time")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--precisions", type=comma_list, default="fp32",
                        help="comma list of fp32, bf16 (bf16: autocast, for GPUs)")
    parser.add_argument("--glibc-default-heap", action="store_true",
                        help="leave glibc's allocator as it is, without the CLI's and app's reuse_heap_memory")
    args = parser.parse_args()
    if not args.glibc_default_heap:
        reuse_heap_memory()
    precisions = list(args.precisions)
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")

    cases = find_cases(args.data)
    chosen = [c for c in cases if args.case in (None, c.case_id)]
    if not chosen:
        raise SystemExit(f"case {args.case} not found under {args.data}")
    start = time.perf_counter()
    model = load_model(args.model, args.device)
    model_load_s = time.perf_counter() - start
    _warm_up(model)
    device_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    print(f"case {chosen[0].case_id}; device {model.device} ({device_name}); threads {torch.get_num_threads()}; "
          f"model load {model_load_s:.2f} s (once per server, not per volume)")
    runs, measured_full = [], []
    for precision in precisions:
        bf16 = precision == "bf16"
        runs.append(measure(model, chosen[0], args.fast_mode, None, args.batch_size, bf16))
        full = measure(model, chosen[0], args.full_mode, args.full_steps, args.batch_size, bf16)
        runs.append(extrapolate(full, model, args.full_mode) if args.full_steps else full)
        measured_full.append(full)
    print("| mode | visited steps | " + " | ".join(s[:-2] + " (s)" for s in STAGES)
          + " | total (s) | volume slices / s | network slice-evaluations / s |")
    print("|---" * (len(STAGES) + 5) + "|")
    for figures in runs:
        print(_row(figures))
    if args.full_steps:
        print(f"full mode measured to {args.full_steps} forward steps and extrapolated linearly in visited steps")
    print(json.dumps({"device": str(model.device), "device_name": device_name, "model_load_s": model_load_s,
                      "runs": runs + (measured_full if args.full_steps else [])}, indent=2))


if __name__ == "__main__":
    main()
