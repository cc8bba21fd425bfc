"""Segmentation quality versus forward-process cost for several stride / early-stop settings.

For a few labelled cases with tumour (e.g. synthetic test cases) and each setting "stride:early_stop",
runs the pipeline and reports the per-volume 3-D Dice and the unhealthy-slice Dice (slice protocol,
ungated) against the visited steps. A setting without early stop ("none") runs the full mode with the
stride overridden; one with early stop runs the fast mode with stride and patience overridden. By default
both reuse that mode's stored calibration (c*, Dmax): only a mode's own setting is calibrated, so the gated
per-volume Dice of the other settings carries that mismatch (the ungated slice Dice does not use c*).
With ``--calibrate-split`` each setting is first calibrated on its own, on that split of ``--prepared``
(image-level labels, as ``anofpdm calibrate``), and its validation accuracy is reported: the gated Dice
of every setting is then what that setting would give as a calibrated mode.
Writes a PNG plot (updated after each setting) and prints a table; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/quality_vs_cost.py --model model/anofpdm.pt --data data/synth \\
        --prepared data/slices64 --out quality_vs_cost.png --cases 3 --settings 10:none,30:none,30:4,60:none,60:2 \\
        --calibrate-split val --calibration-slices 600
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from anofpdm.method.calibration import MODES, calibrate_mode
from anofpdm.evaluation.case_scoring import SliceProtocol, score_result
from anofpdm.data.slices import SliceDataset
from anofpdm.evaluation.metrics import aggregate_cases
from anofpdm.method.model import LoadedModel, load_model
from anofpdm.method.pipeline import InferenceOptions, default_batch_size, segment_volume
from anofpdm.runtime import default_device, reuse_heap_memory
from cases import readable_cases, select_cases

NO_EARLY_STOP = "none"
OWN_CALIBRATION = "setting"  # the mode name a setting's own calibration is stored under
PLOT_DPI = 110


def parse_settings(text: str) -> list[tuple[int, int | None]]:
    """"10:none,30:4" -> [(10, None), (30, 4)]."""
    settings = []
    for item in text.split(","):
        stride, _, patience = item.strip().partition(":")
        if not stride.isdigit() or not (patience == NO_EARLY_STOP or patience.isdigit()):
            raise argparse.ArgumentTypeError(f"setting {item!r} is not stride:early_stop (e.g. 30:4 or 10:none)")
        settings.append((int(stride), None if patience == NO_EARLY_STOP else int(patience)))
    return settings


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def options_for(stride: int, early_stop: int | None, args: argparse.Namespace) -> InferenceOptions:
    mode = args.full_mode if early_stop is None else args.fast_mode
    return InferenceOptions(mode=mode, stride=stride, early_stop=early_stop, forward_steps=args.forward_steps,
                            seed=args.seed, min_lesion_mm3=args.min_lesion_mm3, batch_size=args.batch_size)


def calibrated_for(
    model: LoadedModel, stride: int, early_stop: int | None, args: argparse.Namespace,
    validation: tuple[torch.Tensor, list[int]],
) -> tuple[LoadedModel, InferenceOptions, dict]:
    """The model with one calibration made at this setting (its mode's settings with stride, patience and T_f
    replaced), the options that select it, and what the calibration measured."""
    settings = MODES[args.full_mode if early_stop is None else args.fast_mode]
    config = replace(settings, stride=stride, early_stop=early_stop, seed=args.seed,
                     forward_steps=args.forward_steps or settings.forward_steps)
    images, labels = validation
    calibration = calibrate_mode(model, images, labels, config, args.batch_size or default_batch_size(model.device))
    options = InferenceOptions(mode=OWN_CALIBRATION, seed=args.seed, min_lesion_mm3=args.min_lesion_mm3,
                               batch_size=args.batch_size)
    return replace(model, calibration={OWN_CALIBRATION: calibration.to_dict()}), options, calibration.validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="labelled cases (BraTS / MSD / synthetic)")
    parser.add_argument("--out", type=Path, required=True, help="PNG plot")
    parser.add_argument("--prepared", type=Path, help="prepared slices folder: take only the cases of its --split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cases", type=int, default=3, help="the first N cases with tumour")
    parser.add_argument("--settings", type=parse_settings, default=parse_settings("10:none,30:none,30:4,60:none,60:2"))
    parser.add_argument("--forward-steps", type=int, help="T_f (default: each mode's calibrated one)")
    parser.add_argument("--fast-mode", default="fast")
    parser.add_argument("--full-mode", default="full")
    parser.add_argument("--min-lesion-mm3", type=float, default=InferenceOptions.min_lesion_mm3)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--calibrate-split", help="calibrate each setting on this split of --prepared (e.g. val)")
    parser.add_argument("--calibration-slices", type=int, help="with --calibrate-split: a seeded random subset")
    args = parser.parse_args()
    reuse_heap_memory()  # as the CLI and the app do: the seconds per case are theirs
    if args.calibrate_split and not args.prepared:
        parser.error("--calibrate-split needs --prepared")

    model = load_model(args.model, args.device)
    cases = []
    for case in readable_cases(select_cases(args.data, args.prepared, [args.split]), model.config):
        if case.truth.any():
            cases.append(case)
        if len(cases) == args.cases:
            break
    if not cases:
        raise SystemExit(f"no case with tumour under {args.data}")
    print(f"{len(cases)} cases ({', '.join(c.case_id for c in cases)}); device {model.device}")
    validation = None
    if args.calibrate_split:
        dataset = SliceDataset(args.prepared, args.calibrate_split, sequences=model.config.sequences)
        validation = dataset.sample(args.calibration_slices, args.seed)
        print(f"each setting calibrated on {len(validation[1])} {args.calibrate_split} slices "
              f"({sum(validation[1])} unhealthy)")
    rows = []
    for stride, early_stop in args.settings:
        options = options_for(stride, early_stop, args)
        setting_model, calibration_of, accuracy = model, options.mode, None
        if validation is not None:
            start = time.perf_counter()
            setting_model, options, measured = calibrated_for(model, stride, early_stop, args, validation)
            calibration_of, accuracy = "own", measured["accuracy"]
            print(f"stride {stride}, early stop {early_stop}: calibrated in {time.perf_counter() - start:.0f} s, "
                  f"validation accuracy {accuracy}")
        scored, visited, evaluations, seconds = [], [], [], []
        for case in cases:
            start = time.perf_counter()
            result = segment_volume(setting_model, case.images, options)
            seconds.append(time.perf_counter() - start)
            scored.append(score_result(result, case, SliceProtocol()))
            visited.append(result.report["settings"]["visited_steps"])
            evaluations.append(result.report["network_evaluations"] / result.report["slices"]["segmented"])
        summary = aggregate_cases(scored)
        rows.append({
            "stride": stride, "early_stop": early_stop, "calibration_of_mode": calibration_of,
            "validation_accuracy": accuracy,
            "visited_steps": float(np.mean(visited)), "evaluations_per_slice": float(np.mean(evaluations)),
            "seconds_per_case": float(np.mean(seconds)), "volume_dice": summary["volume"]["dice"]["mean"],
            "unhealthy_slice_dice": summary["slice_protocol"]["unhealthy_dice"],
            "mixed_slice_dice": summary["slice_protocol"]["mixed_dice"],
        })
        print(json.dumps(rows[-1]))
        plot(rows, args.out, model.device)  # after every setting: a time-boxed run keeps the plot of what finished

    print("| stride | early stop | calibration | validation accuracy | visited steps | evaluations / slice | s / case "
          "| 3-D Dice | unhealthy slice Dice | mixed slice Dice |")
    print("|---" * 10 + "|")
    for r in rows:
        print(f"| {r['stride']} | {r['early_stop'] or NO_EARLY_STOP} | {r['calibration_of_mode']} "
              f"| {_fmt(r['validation_accuracy'])} "
              f"| {r['visited_steps']:.1f} | {r['evaluations_per_slice']:.1f} | {r['seconds_per_case']:.2f} "
              f"| {_fmt(r['volume_dice'])} | {_fmt(r['unhealthy_slice_dice'])} | {_fmt(r['mixed_slice_dice'])} |")
    print(f"wrote {args.out}")


def plot(rows: list[dict], out: Path, device: torch.device) -> None:
    """Per-volume Dice and unhealthy-slice Dice against visited steps, one labelled point per setting."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for axis, key, title in ((axes[0], "volume_dice", "per-volume 3-D Dice"),
                             (axes[1], "unhealthy_slice_dice", "unhealthy-slice Dice (ungated)")):
        x = [r["visited_steps"] for r in rows]
        y = [r[key] for r in rows]
        axis.scatter(x, y)
        for r, xi, yi in zip(rows, x, y):
            axis.annotate(f"s={r['stride']}, es={r['early_stop'] or NO_EARLY_STOP}", (xi, yi), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        axis.set_xscale("log")
        axis.set_xticks(sorted(set(x)))  # ticks at the measured step counts, written plainly
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("visited forward steps (mean per case)")
        axis.set_ylabel("Dice")
        axis.set_ylim(0.0, 1.0)
        axis.set_title(title)
    figure.suptitle(f"quality versus cost ({device})")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=PLOT_DPI)


if __name__ == "__main__":
    main()
