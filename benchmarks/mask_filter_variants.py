"""Would a median filter of the 3-D mask (after the slice verdicts gate it) raise the per-volume Dice?

For labelled cases (e.g. the synthetic validation and test splits) runs a calibrated mode's forward process once
per case, then finishes the segmentation as the pipeline does (Algorithm 1 thresholds on the median-filtered map,
verdict gate, component filter, back to the input grid) with and without a median filter of the gated mask, one
column per kernel ("none" is the pipeline). Prints per-case and mean 3-D Dice (cases with tumour) and the
healthy cases left empty; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/mask_filter_variants.py --model M --data data/synth --prepared data/slices64 \\
        --splits val,test --max-cases 6 --kernels none,1x1x3,3x3x3,1x1x5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from anofpdm.arguments import comma_list
from anofpdm.evaluation.metrics import dice
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import (
    InferenceOptions,
    decide_slices,
    default_median_kernel,
    finish_on_input_grid,
)
from anofpdm.runtime import default_device
from cases import prepared_forward, select_cases

NO_FILTER = "none"


def parse_kernel(text: str) -> tuple[int, int, int] | None:
    """"3x3x3" -> (3, 3, 3) (in-plane, in-plane, across slices); "none" -> None."""
    if text == NO_FILTER:
        return None
    sizes = text.split("x")
    if len(sizes) != 3 or not all(s.isdigit() and int(s) % 2 == 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"kernel {text!r} is not 'none' or three odd sizes like 3x3x3")
    return tuple(int(s) for s in sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="labelled cases (BraTS / MSD / synthetic)")
    parser.add_argument("--prepared", type=Path, required=True, help="prepared slices folder naming the splits")
    parser.add_argument("--splits", type=comma_list, default="val,test")
    parser.add_argument("--max-cases", type=int, default=6, help="the first N cases of each split")
    parser.add_argument("--kernels", type=comma_list, default="none,1x1x3,3x3x3,1x1x5")
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()
    kernels = {text: parse_kernel(text) for text in args.kernels}

    model = load_model(args.model, args.device)
    options = InferenceOptions(mode=args.mode)
    map_kernel = default_median_kernel(model.config.image_size)
    print(f"{args.model}, mode {args.mode}; map median kernel {map_kernel}; 3-D Dice per mask-filter kernel")
    for split in args.splits:
        rows = []
        for files in select_cases(args.data, args.prepared, [split])[: args.max_cases]:
            case, outputs = prepared_forward(files, model, options, cache=None)
            case_id = case.case_id
            decided = decide_slices(model, outputs, options)
            gated = decided.candidate
            row = {"case": case_id, "tumour": bool(case.truth.any())}
            for text, kernel in kernels.items():
                mask = gated if kernel is None else (
                    ndimage.median_filter(gated.astype(np.uint8), size=kernel, mode="nearest") > 0)
                mask_input = finish_on_input_grid(decided.filtered_map, mask, outputs.geometry,
                                                  options.min_lesion_mm3).labels
                row[text] = dice(mask_input, case.truth) if row["tumour"] else float(not mask_input.any())
            rows.append(row)
            print(f"  {split} {case_id}: " + ", ".join(f"{k} {row[k]:.3f}" for k in kernels), flush=True)
        tumour = [r for r in rows if r["tumour"]]
        healthy = [r for r in rows if not r["tumour"]]
        means = ", ".join(f"{k} {np.mean([r[k] for r in tumour]):.3f}" for k in kernels) if tumour else "n/a"
        empty = ", ".join(f"{k} {sum(r[k] for r in healthy):.0f}" for k in kernels)
        print(f"{split}: mean 3-D Dice over {len(tumour)} cases with tumour: {means}; "
              f"healthy cases left empty (of {len(healthy)}): {empty}")


if __name__ == "__main__":
    main()
