"""Where the app draws a lesion's edge: the network grid's mask resampled, or redrawn at half the FLAIR contrast.

Each case's forward process runs once (``--mode``, fast by default; cached with ``--cache``); the per-volume rule's
decisions are then finished on the input grid with ``lesion_boundary`` "model-grid" and with the half-contrast edge
(``anofpdm.method.postprocess.refine_lesion_boundaries``) at each ``--contrast`` and ``--lesion-quantile``, through
the pipeline's own ``finish_on_input_grid``. Prints per setting the 3-D Dice, precision and recall over the tumour
cases, the faint-edge recall (outer 2 mm) and the healthy volumes' false-positive mL. Choose on a validation split.

    PYTHONPATH=lib:benchmarks python benchmarks/lesion_edges.py --model model/anofpdm.pt --data data/synth80 \\
        --prepared data/slices64s --split val --contrast 0.3,0.4,0.5,0.6 --lesion-quantile 0.5,0.75,0.9
"""

from __future__ import annotations

import argparse

import numpy as np

from anofpdm.arguments import comma_floats
from anofpdm.evaluation.metrics import sub_region_recall
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import InferenceOptions, LesionEdges, decide_slices, finish_on_input_grid
from anofpdm.method.postprocess import EDGE_CONTRAST, LESION_LEVEL_QUANTILE
from anofpdm.runtime import default_device
from anofpdm.volumes.overlap import overlap_scores
from cases import add_forward_arguments, forward_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_forward_arguments(parser)
    parser.add_argument("--contrast", type=comma_floats, default=(EDGE_CONTRAST,))
    parser.add_argument("--lesion-quantile", type=comma_floats, default=(LESION_LEVEL_QUANTILE,))
    args = parser.parse_args()

    model = load_model(args.model, device=args.device or default_device())
    options = InferenceOptions(mode=args.mode, batch_size=args.batch_size)
    settings = [None] + [(c, q) for c in args.contrast for q in args.lesion_quantile]
    rows: dict[tuple[float, float] | None, list[dict[str, float]]] = {setting: [] for setting in settings}
    for case, outputs in forward_cases(args, model, options):
        decided = decide_slices(model, outputs, options)
        reach = max(outputs.geometry.spacing_mm[:2])
        for setting in settings:
            edges = None if setting is None else LesionEdges(outputs.flair, outputs.brain, reach, *setting)
            labels = finish_on_input_grid(decided.filtered_map, decided.candidate, outputs.geometry,
                                          options.min_lesion_mm3, lesion_holes=options.lesion_holes,
                                          edges=edges).labels
            mask = labels > 0
            volume = {name: float(value) for name, value in overlap_scores(mask, case.truth).items()}
            edge = sub_region_recall(mask, case.sub_regions, case.spacing_mm).get("faint_edge")
            rows[setting].append({**volume, "truth": float(case.truth.any()), "edge": np.nan if edge is None else edge,
                                  "predicted_ml": mask.sum() * case.voxel_mm3 / 1000.0})
        print(f"{case.case_id} done", flush=True)

    print("edge | contrast | lesion quantile | 3-D Dice | precision | recall | faint edge | healthy FP (mL) | "
          "per tumour case")
    for setting, figures in rows.items():
        tumour = [f for f in figures if f["truth"]]
        healthy = [f["predicted_ml"] for f in figures if not f["truth"]]
        name, contrast, quantile = ("model-grid", "-", "-") if setting is None else ("half-contrast", *setting)
        print(f"{name} | {contrast} | {quantile} | " + " | ".join(
            f"{100 * np.nanmean([f[key] for f in tumour]):.1f}" for key in ("dice", "precision", "recall", "edge"))
              + f" | {np.mean(healthy) if healthy else float('nan'):.2f} | "
              + " ".join(f"{100 * f['dice']:.0f}" for f in tumour))


if __name__ == "__main__":
    main()
