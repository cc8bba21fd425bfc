"""Brain extraction on head cases (#39): the brain mask against the truth, the tumour kept, the time, and what the
app's default segmentation loses on the head against the same case skull-stripped.

Head cases come from ``anofpdm synth --heads`` (each case has ``<CASE>_brainmask.nii.gz``, the truth brain). Per
case it prints the extracted brain's Dice against the truth, both volumes, the share of tumour voxels inside the
extracted brain and the extraction time; with ``--model``, the 3-D Dice (or a healthy volume's false-positive mL)
of the app's default segmentation on the head and on the case skull-stripped with the truth brain (head x truth
mask), each beside the network-free per-volume rule (``flair-zscore``: the FLAIR's robust z-score within the
brain, z >= ``--flair-z``, the app's filters with ``--min-lesion-mm3``; give the constants ``evaluate --tune-split``
chose on validation cases) on the same inputs, the head's brain extracted as the app does.

    PYTHONPATH=lib python benchmarks/brain_extraction.py --data data/heads_train data/heads_shifted \\
        --model model/anofpdm.pt --flair-z 1.5 --min-lesion-mm3 2000 --cache runs/heads

``--cache`` keeps each segmentation (pickles, for this benchmark only), so the table can be printed again without
the network.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from anofpdm.data.brats import find_cases, load_case
from anofpdm.data.synth import BRAIN_MASK_SUFFIX
from anofpdm.evaluation.baselines import DEFAULT_FLAIR_Z, FLAIR_ZSCORE, BaselineOptions, FixedThreshold, run_baseline
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import InferenceOptions, segment_volume
from anofpdm.runtime import default_device
from anofpdm.volumes.brain_extraction import extract_brain
from anofpdm.volumes.checks import InputError, voxel_ml
from anofpdm.volumes.overlap import dice
from cases import cached

SEQUENCES = ("flair", "t2")


def _score(label: nib.Nifti1Image, truth: np.ndarray) -> float:
    """3-D Dice for a tumour case, false-positive mL for a healthy one."""
    mask = np.asanyarray(label.dataobj) > 0
    return dice(mask, truth) if truth.any() else float(mask.sum()) * voxel_ml(label.affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="folders of head cases")
    parser.add_argument("--model", type=Path, help="also segment each case as a head and skull-stripped")
    parser.add_argument("--flair-z", type=float, default=DEFAULT_FLAIR_Z, help="the network-free rule's z*")
    parser.add_argument("--min-lesion-mm3", type=float, default=InferenceOptions.min_lesion_mm3,
                        help="the network-free rule's minimum lesion size")
    parser.add_argument("--cache", type=Path, help="folder keeping each segmentation")
    parser.add_argument("--reference", choices=SEQUENCES, default=SEQUENCES[0],
                        help="the sequence the brain is extracted from (the app's: flair)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = args.device or default_device()
    model = load_model(args.model, device) if args.model else None
    flair_rule = BaselineOptions(threshold=FixedThreshold(quantile=None, value=args.flair_z),
                                 min_lesion_mm3=args.min_lesion_mm3)
    order = (args.reference, *(name for name in SEQUENCES if name != args.reference))

    print("| case | truth brain (mL) | extracted (mL) | brain Dice | tumour inside (%) | extraction (s) |"
          + (" head: app | stripped: app | head: FLAIR z rule | stripped: FLAIR z rule |" if model else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|---|" if model else ""))
    for folder in args.data:
        for files in find_cases(folder):
            case_dir = files.seg.parent
            volume = load_case(files, sequences=SEQUENCES)
            heads = {name: nib.Nifti1Image(volume.images[name], volume.affine) for name in SEQUENCES}
            truth_brain = nib.as_closest_canonical(
                nib.load(case_dir / f"{files.case_id}_{BRAIN_MASK_SUFFIX}.nii.gz")).get_fdata() > 0
            tumour = volume.mask > 0
            start = time.perf_counter()
            try:
                _, extraction = extract_brain(heads, order, "auto", device)
            except InputError as exc:  # a refusal is a result: the app would answer it with a 422
                print(f"| {folder.name}/{files.case_id} | refused: {exc} |", flush=True)
                continue
            seconds = time.perf_counter() - start
            inside = 100.0 * float(extraction.mask[tumour].mean()) if tumour.any() else float("nan")
            row = [f"{folder.name}/{files.case_id}", f"{float(truth_brain.sum()) * voxel_ml(volume.affine):.0f}",
                   f"{extraction.brain_ml:.0f}", f"{dice(extraction.mask, truth_brain):.4f}", f"{inside:.2f}",
                   f"{seconds:.1f}"]
            if model is not None:
                stripped = {name: nib.Nifti1Image(volume.images[name] * truth_brain, volume.affine)
                            for name in SEQUENCES}
                for inputs, variant in ((heads, "head"), (stripped, "stripped")):
                    cache = args.cache / folder.name / f"{files.case_id}.{variant}.pkl" if args.cache else None
                    result = cached(cache, lambda inputs=inputs: segment_volume(model, inputs, InferenceOptions()))
                    row.append(f"{_score(result.mask, tumour):.3f}")
                for inputs in (heads, stripped):
                    result = run_baseline(FLAIR_ZSCORE, model, inputs, flair_rule)
                    row.append(f"{_score(result.mask, tumour):.3f}")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
