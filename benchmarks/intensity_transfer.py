"""Does a model transfer to other cases with histogram standardisation, and with which decision rule? (#30)

For each case of a folder (e.g. the shifted domain, ``anofpdm synth --domain shifted``), the model's forward
process runs twice: on percentile-scaled slices (the model as it is) and on histogram-standardised ones (the
model given the landmarks of its training volumes, ``anofpdm.data.slices.training_landmarks``). Each is decided
with the paper's rule and the per-volume rule, beside the FLAIR-percentile baseline. Prints per case and the means:
3-D Dice over tumour cases, healthy volumes' false-positive mL and how many were called healthy, slice AUROC and
map AUPRC (``anofpdm.evaluation.metrics``).

    PYTHONPATH=lib python benchmarks/intensity_transfer.py --model model/anofpdm.pt --data data/shifted12 \\
        --training-cases data/synth80 --prepared data/slices64 --cases SYN_00000,SYN_00001 --cache runs/transfer

``--cache`` keeps each case's forward process (pickles, for this benchmark only), so decision rules can be
compared again without the network.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from anofpdm.arguments import comma_list
from anofpdm.evaluation.baselines import BaselineOptions, FixedThreshold, run_baseline
from anofpdm.evaluation.case_scoring import SliceProtocol, score_result
from anofpdm.data.brats import find_cases
from anofpdm.data.slices import load_manifest, training_landmarks
from anofpdm.method.model import LoadedModel, load_model
from anofpdm.method.pipeline import InferenceOptions, segment_volume
from anofpdm.runtime import default_device
from cases import prepared_forward, select_cases

NORMALISATIONS = ("percentile", "standardised")
RULES = ("paper", "volume")


def with_landmarks(model: LoadedModel, training_cases: Path, prepared: Path) -> LoadedModel:
    """The model given the mean landmarks of its training split's volumes."""
    train_ids = set(load_manifest(prepared)["splits"]["train"]["cases"])
    cases = [c for c in find_cases(training_cases) if c.case_id in train_ids]
    landmarks = training_landmarks(cases, model.config.sequences)
    rows = tuple(tuple(landmarks[s]) for s in model.config.sequences)
    return replace(model, config=replace(model.config, intensity_landmarks=rows))


def figures(result, case) -> tuple[float, float, float, float | None, float | None]:
    scored = score_result(result, case, SliceProtocol())
    volume = scored["volume"]
    return volume["dice"], volume["predicted_ml"], volume["truth_ml"], scored["slice"]["slice_auroc"], volume["auprc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="cases to segment (BraTS layout)")
    parser.add_argument("--training-cases", type=Path, required=True, help="the model's training cases")
    parser.add_argument("--prepared", type=Path, required=True, help="their prepared slices (for the train split)")
    parser.add_argument("--cases", type=comma_list, help="case ids (default: all)")
    parser.add_argument("--flair-quantile", type=float, default=0.97)
    parser.add_argument("--cache", type=Path, help="folder keeping each case's forward processes")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    plain = load_model(args.model, args.device or default_device())
    models = {"percentile": plain, "standardised": with_landmarks(plain, args.training_cases, args.prepared)}
    rows: dict[str, dict[str, tuple]] = {}
    for files in select_cases(args.data, case_ids=args.cases):
        row = {}
        for normalisation, model in models.items():
            cached = args.cache / normalisation / f"{files.case_id}.pkl" if args.cache else None
            case, forward = prepared_forward(files, model, InferenceOptions(), cached)
            for rule in RULES:
                result = segment_volume(model, case.images, InferenceOptions(decision_rule=rule),
                                        forward_outputs=forward)
                row[f"AnoFPDM fast, {normalisation}, {rule} rule"] = figures(result, case)
        flair = run_baseline("flair-threshold", plain, case.images,
                             BaselineOptions(threshold=FixedThreshold(args.flair_quantile)))
        row[f"FLAIR > {args.flair_quantile:g} brain quantile"] = figures(flair, case)
        rows[files.case_id] = row
        print(files.case_id, {name: tuple(None if v is None else round(v, 3) for v in values)
                              for name, values in row.items()}, flush=True)

    print("\n| method | 3-D Dice, tumour cases | healthy FP (mL) | healthy called healthy | slice AUROC | map AUPRC |")
    print("|---|---|---|---|---|---|")
    for name in next(iter(rows.values())):
        tumour = [r[name] for r in rows.values() if r[name][2] > 0]
        healthy = [r[name] for r in rows.values() if r[name][2] == 0]
        auroc = [t[3] for t in tumour if t[3] is not None]
        cells = [f"{100 * np.mean([t[0] for t in tumour]):.1f}" if tumour else "-",
                 f"{np.mean([h[1] for h in healthy]):.1f}" if healthy else "-",
                 f"{sum(h[1] == 0 for h in healthy)} of {len(healthy)}",
                 f"{100 * np.mean(auroc):.1f}" if auroc else "-",
                 f"{100 * np.mean([t[4] for t in tumour]):.1f}" if tumour else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
