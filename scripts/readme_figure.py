"""The README's picture: FLAIR, anomaly map and mask of one demo study, segmented by the shipped model.

Runs the library's pipeline (``anofpdm.method.pipeline.segment_volume``, the code path of the app and of ``anofpdm
segment``) in the model's default mode, then draws the axial plane with the most tumour in the demo truth:
the FLAIR, the anomaly map over it, and the returned mask with the truth's outline; for a head, the FLAIR panel
also outlines the brain the app extracted. About a minute on an idle 2-core CPU. From the repository root:

    PYTHONPATH=lib python scripts/readme_figure.py            # writes docs/demo_result.png
    PYTHONPATH=lib python scripts/readme_figure.py --case SYN_00003 --out docs/demo_head_result.png  # a head
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from matplotlib.figure import Figure

from anofpdm.volumes.reading import read_image, read_sequence
from anofpdm.evaluation.metrics import dice
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import InferenceOptions, segment_volume
from anofpdm.progress import progress_bar
from anofpdm.runtime import reuse_heap_memory

REPO = Path(__file__).resolve().parents[1]
DPI = 100


def canonical(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The volume's data in RAS axis order, so that axial planes are [:, :, z]."""
    return np.asarray(nib.as_closest_canonical(image).dataobj, dtype=np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "model" / "anofpdm.pt")
    parser.add_argument("--studies", type=Path, default=REPO / "demo" / "studies")
    parser.add_argument("--truth", type=Path, default=REPO / "demo" / "truth")
    parser.add_argument("--case", default="SYN_00000")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "demo_result.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    reuse_heap_memory()
    model = load_model(args.model, args.device)
    images = read_image(args.studies / f"{args.case}.nii.gz").images
    images["t2"] = read_sequence("t2", args.studies / "t2" / f"{args.case}.nii.gz")
    result = segment_volume(model, images, InferenceOptions(), progress=progress_bar("forward process"))
    report = result.report

    flair = canonical(images["flair"])
    anomaly = canonical(result.anomaly_map)
    mask = canonical(result.mask) > 0
    truth = canonical(nib.load(args.truth / f"{args.case}_seg.nii.gz")) > 0
    plane = int(truth.sum(axis=(0, 1)).argmax())
    score = dice(mask, truth)

    extracted = report["brain_extraction"]["extracted"]
    brain_mask = canonical(result.brain_mask) > 0
    brain = flair[brain_mask]
    flair_range = dict(cmap="gray", vmin=0.0, vmax=float(np.percentile(brain, 99.5)))

    def axial(volume: np.ndarray) -> np.ndarray:
        """The plane as an image: RAS x to the right, anterior up (drawn with origin "lower")."""
        return volume[:, :, plane].T

    flair_plane = axial(flair)
    fig = Figure(figsize=(9.0, 3.4), dpi=DPI)
    axes = fig.subplots(1, 3)
    axes[0].imshow(flair_plane, origin="lower", **flair_range)
    axes[0].set_title("FLAIR" + (", extracted brain (green)" if extracted else ""))
    if extracted:
        axes[0].contour(axial(brain_mask), levels=[0.5], colors="lime", linewidths=0.8)
    axes[1].imshow(flair_plane, origin="lower", **flair_range)
    heat = np.ma.masked_where(axial(anomaly) <= 0, axial(anomaly))
    axes[1].imshow(heat, origin="lower", cmap="inferno", alpha=0.6)
    axes[1].set_title("anomaly map")
    axes[2].imshow(flair_plane, origin="lower", **flair_range)
    axes[2].imshow(np.ma.masked_where(~axial(mask), axial(mask)), origin="lower", cmap="autumn", alpha=0.5)
    axes[2].contour(axial(truth), levels=[0.5], colors="cyan", linewidths=0.8)
    axes[2].set_title("mask (red), truth outline (cyan)")
    for ax in axes:
        ax.set_axis_off()
    what = f"demo study {args.case}" + (" (a head)" if extracted else "")
    fig.suptitle(f"{what}, axial plane {plane}: verdict {report['verdict']}, "
                 f"{report['total_volume_ml']:.0f} mL masked, 3-D Dice {score:.2f} against the truth", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=DPI)
    print(f"{args.case}: {report['verdict']}, {report['lesion_count']} lesion(s), {report['total_volume_ml']} mL, "
          f"3-D Dice {score:.3f}, plane {plane}, mode {report['settings']['mode']}, "
          f"{report['timings_s']} -> {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
