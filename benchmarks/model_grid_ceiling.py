"""The best 3-D Dice a mask made on the model grid can reach: each case's truth taken to the model grid and back.

For labelled cases (BraTS / MSD / synthetic folders) and each network image size, the whole-tumour truth is
resampled to the model's slices exactly as the methods' inputs are, thresholded at the evaluation's truth
level, mapped back to the input grid as the methods' masks are, and compared with the truth. Healthy cases
are skipped. Prints figures; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/model_grid_ceiling.py --data data/synth --prepared data/slices64 --max-cases 6
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from anofpdm.data.brats import find_cases
from anofpdm.evaluate import prepare_case, split_case_ids
from anofpdm.metrics import dice
from anofpdm.model import PRESETS
from anofpdm.volume import to_input_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="labelled cases")
    parser.add_argument("--prepared", help="prepared slices folder: take the cases of its --split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-cases", type=int)
    parser.add_argument("--sizes", default="64,96,128", help="network image sizes")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    args = parser.parse_args()

    cases = find_cases(args.data)
    if args.prepared:
        wanted = set(split_case_ids(args.prepared, args.split))
        cases = [c for c in cases if c.case_id in wanted]
    cases = cases[: args.max_cases]
    print("| image size | pixel (mm) | cases with tumour | 3-D Dice per case | mean |")
    print("|---|---|---|---|---|")
    for size in (int(v) for v in args.sizes.split(",")):
        config = replace(PRESETS[args.preset], image_size=size)
        scores = {}
        for files in cases:
            case = prepare_case(files, config)
            if not case.truth.any():
                continue
            back = to_input_grid(case.truth_slices.transpose(1, 2, 0).astype(np.float32), case.geometry) >= 0.5
            scores[case.case_id] = dice(back, case.truth)
        listed = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        mean = f"{np.mean(list(scores.values())):.3f}" if scores else "-"
        print(f"| {size} | {config.field_of_view_mm / size:.2f} | {len(scores)} | {listed} | {mean} |")


if __name__ == "__main__":
    main()
