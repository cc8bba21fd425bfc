"""Which holes of a lesion should the post-processing fill: none, those closed in 3-D, or also those closed within
an axial slice?

For labelled cases (e.g. the synthetic validation split) runs AnoFPDM's per-volume rule (the app's default) once per
case and the network-free FLAIR z-score baseline's map once, then finishes both as the pipeline does with each
``--lesion-holes`` choice (``anofpdm.method.postprocess.fill_lesion_holes``). Prints per case and as means over the
cases with tumour the 3-D Dice and the recall per BraTS sub-region (``anofpdm.evaluation.metrics.sub_region_recall``),
and the healthy cases' mask volume; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/lesion_holes.py --model model/anofpdm.pt --data data/synth80 \\
        --prepared data/slices64s --splits val --flair-z 1.5 --flair-min-lesion-mm3 2000 --cache runs/holes_cache
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from anofpdm.arguments import comma_list
from anofpdm.evaluation.baselines import FLAIR_ZSCORE, FixedThreshold, baseline_maps, finish_baseline
from anofpdm.evaluation.methods import EvaluationSettings
from anofpdm.evaluation.metrics import MM3_PER_ML, dice, sub_region_recall
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import segment_volume
from anofpdm.method.postprocess import LESION_HOLES
from anofpdm.runtime import default_device
from cases import prepared_forward, select_cases

ANOFPDM = "anofpdm-volume-fast"
REGIONS = ("necrotic_core", "oedema", "enhancing", "faint_edge")


def _scores(mask: np.ndarray, case) -> dict[str, float | None]:
    volume_ml = float(mask.sum()) * case.voxel_mm3 / MM3_PER_ML
    if not case.truth.any():
        return {"healthy_ml": volume_ml}
    return {"dice": dice(mask, case.truth), **sub_region_recall(mask, case.sub_regions, case.spacing_mm)}


def _mean(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows if row.get(key) is not None]
    return f"{np.mean(values):.3f} ({len(values)})" if values else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="labelled cases (BraTS / MSD / synthetic)")
    parser.add_argument("--prepared", type=Path, help="prepared slices folder naming the splits")
    parser.add_argument("--splits", type=comma_list, default="val", help="with --prepared: the splits' cases")
    parser.add_argument("--case-ids", type=comma_list, help="only these cases")
    parser.add_argument("--max-cases", type=int, help="the first N cases")
    parser.add_argument("--flair-z", type=float, required=True, help="the z-score baseline's z* (validation-tuned)")
    parser.add_argument("--flair-min-lesion-mm3", type=float, required=True, help="its minimum lesion size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache", type=Path, help="folder keeping each case's forward process (rerun without it)")
    parser.add_argument("--device", default=default_device())
    args = parser.parse_args()

    model = load_model(args.model, args.device)
    settings = EvaluationSettings(batch_size=args.batch_size, baseline_min_lesion_mm3={
        FLAIR_ZSCORE: args.flair_min_lesion_mm3}, thresholds={**EvaluationSettings().thresholds, FLAIR_ZSCORE:
                                                              FixedThreshold(quantile=None, value=args.flair_z)})
    options, flair = settings.inference_options(ANOFPDM), settings.baseline_options(FLAIR_ZSCORE)
    rows: dict[tuple[str, str], list[dict]] = {(m, h): [] for m in (ANOFPDM, FLAIR_ZSCORE) for h in LESION_HOLES}
    for files in select_cases(args.data, args.prepared, args.splits, args.case_ids)[: args.max_cases]:
        cache = None if args.cache is None else args.cache / f"{files.case_id}.pkl"
        case, outputs = prepared_forward(files, model, options, cache)
        maps = baseline_maps(FLAIR_ZSCORE, model, case.images, flair)
        for holes in LESION_HOLES:
            results = {ANOFPDM: segment_volume(model, case.images, replace(options, lesion_holes=holes),
                                               forward_outputs=outputs),
                       FLAIR_ZSCORE: finish_baseline(maps, model, case.images, replace(flair, lesion_holes=holes))}
            for method, result in results.items():
                row = {"case": case.case_id, **_scores(np.asanyarray(result.mask.dataobj) > 0, case)}
                rows[method, holes].append(row)
                print(f"{case.case_id} {method} {holes}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    print("\nmeans over the cases with tumour (cases in brackets); healthy cases' mask volume in mL")
    for (method, holes), found in rows.items():
        tumour = [row for row in found if "dice" in row]
        healthy = [row for row in found if "healthy_ml" in row]
        print(f"{method} {holes}: Dice {_mean(tumour, 'dice')}, " + ", ".join(
            f"{name} {_mean(tumour, name)}" for name in REGIONS) + f", healthy {_mean(healthy, 'healthy_ml')}")


if __name__ == "__main__":
    main()
