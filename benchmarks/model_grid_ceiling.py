"""The best 3-D Dice a mask made on the model grid can reach, and the best the threshold rule allows.

For labelled cases (BraTS / MSD / synthetic folders) and each network image size, the whole-tumour truth is
resampled to the model's slices exactly as the methods' inputs are, thresholded at the evaluation's truth
level, mapped back to the input grid as the methods' masks are, and compared with the truth ("grid").
Then docs/method.md section 4's threshold (Algorithm 1: tau = the q-quantile of the map over the whole slice, q between
0.90 and 0.98) is applied, as the pipeline applies it, to an ideal anomaly map (1 on the model-grid truth,
decaying with the distance to it outside: every pixel ranked, the nearest to the tumour first) with an ideal
slice verdict, at q = 0.98 (the smallest masks the rule makes) and q = 0.90: the most AnoFPDM's masks could
reach with a perfect network. The rule masks at least 2 % of every unhealthy slice, so tumour cross-sections
smaller than that are over-segmented whatever the network. Healthy cases are skipped. With ``--flair-model``
the FLAIR-percentile baseline (``anofpdm evaluate``'s ``flair-threshold`` at ``--flair-quantile``, the value its
validation tuning chose) is scored beside them on that model's grid, and ``--size-bins`` groups every row by the
cases' tumour volume. Prints figures; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/model_grid_ceiling.py --data data/synth --prepared data/slices64
    PYTHONPATH=lib python benchmarks/model_grid_ceiling.py --data data/synth --prepared data/slices64 \\
        --split train,test --sizes 64 --flair-model M --flair-quantile 0.98 --size-bins 10,25,50,100
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from itertools import pairwise

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from anofpdm.arguments import comma_floats, comma_ints, comma_list
from anofpdm.evaluation.baselines import BaselineOptions, FixedThreshold, run_baseline
from anofpdm.evaluation.case_scoring import EvaluationCase, prepare_case
from anofpdm.method.decisions import row_quantiles
from anofpdm.evaluation.metrics import dice
from anofpdm.method.model import PRESETS, load_model
from anofpdm.method.pipeline import default_median_kernel
from anofpdm.method.postprocess import median_filter_3d
from anofpdm.volumes.slicing import to_input_grid
from cases import select_cases

QUANTILES = (0.98, 0.90)  # Algorithm 1's range: b (no divergence) and a (divergence at Dmax)
IDEAL_DECAY_PX = 2.0


def _grid_dice(case: EvaluationCase, slices: np.ndarray) -> float:
    """3-D Dice against the truth of an N x S x S model-grid mask mapped back to the input grid."""
    back = to_input_grid(slices.transpose(1, 2, 0).astype(np.float32), case.geometry) >= 0.5
    return dice(back, case.truth)


def ideal_map(truth: np.ndarray) -> np.ndarray:
    """A map that ranks every pixel by its distance to the tumour (1 inside, decaying outside, never 0)."""
    if not truth.any():
        return np.zeros(truth.shape, dtype=np.float32)
    return np.exp(-distance_transform_edt(~truth) / IDEAL_DECAY_PX).astype(np.float32)


def ideal_algorithm1_mask(truth_slices: np.ndarray, quantile: float) -> np.ndarray:
    """The pipeline's thresholding (tau from the unfiltered map, mask = 3-D median-filtered map >= tau) applied
    to an ideal map (smoothed truth) with an ideal verdict (tumour slices only); N x S x S."""
    maps = np.stack([ideal_map(t) for t in truth_slices])
    tau = row_quantiles(torch.from_numpy(maps).flatten(1), torch.full((len(maps),), quantile)).numpy()
    filtered = median_filter_3d(maps.transpose(1, 2, 0), default_median_kernel(maps.shape[-1])).transpose(2, 0, 1)
    return (filtered >= tau[:, None, None]) & truth_slices.any(axis=(1, 2))[:, None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="labelled cases")
    parser.add_argument("--prepared", help="prepared slices folder: take the cases of its --split")
    parser.add_argument("--split", type=comma_list, default="test", help="split(s) of --prepared, comma-separated")
    parser.add_argument("--max-cases", type=int)
    parser.add_argument("--sizes", type=comma_ints, default="64,96,128", help="network image sizes")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--flair-model", help="also score the FLAIR-percentile baseline on this model's grid")
    parser.add_argument("--flair-quantile", type=float, default=0.98, help="the baseline's tuned brain quantile")
    parser.add_argument("--size-bins", type=comma_floats,
                        help="tumour-volume bin edges in mL (e.g. 10,25,50,100): a table by size")
    args = parser.parse_args()
    flair_model = load_model(args.flair_model, "cpu") if args.flair_model else None
    flair_options = BaselineOptions(threshold=FixedThreshold(quantile=args.flair_quantile))

    cases = select_cases(args.data, args.prepared, args.split)[: args.max_cases]
    print("| image size | pixel (mm) | mask | cases with tumour | 3-D Dice per case | mean |")
    print("|---|---|---|---|---|---|")
    tables = []
    for size in args.sizes:
        config = replace(PRESETS[args.preset], image_size=size)
        flair = flair_model if flair_model is not None and flair_model.config.image_size == size else None
        rows: dict[str, dict[str, float]] = {"grid": {}, **{f"Algorithm 1, q = {q}": {} for q in QUANTILES}}
        if flair is not None:
            rows[f"FLAIR percentile, q = {args.flair_quantile}"] = {}
        volumes_ml: dict[str, float] = {}
        for files in cases:
            case = prepare_case(files, config)
            if not case.truth.any():
                continue
            volumes_ml[case.case_id] = float(case.truth.sum()) * case.voxel_mm3 / 1000.0
            rows["grid"][case.case_id] = _grid_dice(case, case.truth_slices)
            for q in QUANTILES:
                ideal = ideal_algorithm1_mask(case.truth_slices, q)
                rows[f"Algorithm 1, q = {q}"][case.case_id] = _grid_dice(case, ideal)
            if flair is not None:
                mask = np.asanyarray(run_baseline("flair-threshold", flair, case.images, flair_options).mask.dataobj)
                rows[f"FLAIR percentile, q = {args.flair_quantile}"][case.case_id] = dice(mask > 0, case.truth)
        for mask, scores in rows.items():
            listed = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
            mean = f"{np.mean(list(scores.values())):.3f}" if scores else "-"
            print(f"| {size} | {config.field_of_view_mm / size:.2f} | {mask} | {len(scores)} | {listed} | {mean} |")
        tables.append((size, rows, volumes_ml))
    if args.size_bins:
        _print_by_size(tables, list(args.size_bins))


def _print_by_size(tables: list[tuple[int, dict[str, dict[str, float]], dict[str, float]]], edges: list[float]) -> None:
    """Mean 3-D Dice of every row per tumour-volume bin."""
    bounds = [0.0, *edges, float("inf")]
    print("\n| image size | mask | " + " | ".join(
        f"{low:g}-{high:g} mL" if high < float("inf") else f">= {low:g} mL" for low, high in pairwise(bounds))
        + " |")
    print("|---|---|" + "---|" * (len(bounds) - 1))
    for size, rows, volumes_ml in tables:
        for mask, scores in rows.items():
            cells = []
            for low, high in pairwise(bounds):
                chosen = [scores[c] for c, ml in volumes_ml.items() if low <= ml < high and c in scores]
                cells.append(f"{np.mean(chosen):.3f} (n = {len(chosen)})" if chosen else "-")
            print(f"| {size} | {mask} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
