"""What tells a method's false lesions from its tumours: per lesion of its mask, the figures a lesion-level test
could use.

Runs the method on each case as ``anofpdm evaluate`` does and prints, per 26-connected component of its mask: its
volume, the share of it inside the truth tumour and on benign findings (one voxel's reach, as ``evaluate`` counts
them), its median FLAIR and T2 relative to the brain's medians, its anomaly map's median and 98th-percentile robust
z-score against the brain (the returned map, on the input grid), and its contralateral contrast: the FLAIR at the
mirror image of its voxels across the brain's midline (the FLAIR registered rigidly to its own left-right flip;
voxels whose mirror falls in the lesion itself left out), as (75th percentile - brain median) over the lesion's own
(the same). A finding that is bilateral has a mirror as bright as itself (about 1), a glioma not (about 0). Its
local contrast: its FLAIR's 75th percentile over the median FLAIR of the brain tissue (fluid aside) 3-8 mm around
it, which a smooth bias field does not raise. Last, the periventricular rule's own figures
(``anofpdm.method.periventricular.lesion_figures``): the share of the lesion
within 10 mm of the ventricles and its thickness. Prints figures; asserts nothing. Example (docs/evaluation.md,
"Lesion-level tests" and "Periventricular findings"):

    PYTHONPATH=lib:benchmarks python benchmarks/lesion_features.py --model model/anofpdm.pt --data data/benign12_val \
        --periventricular-findings keep
"""

from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from anofpdm.method.decisions import MAD_TO_SD
from anofpdm.method.periventricular import FLUID_FLAIR_RATIO, PeriventricularRule, lesion_figures
from anofpdm.method.postprocess import LESION_LEVEL_QUANTILE, lesion_components, widened_box
from anofpdm.volumes.alignment import RegistrationSettings, nifti_to_itk, register_rigid

from cases import add_method_arguments, method_results

CONTRALATERAL_QUANTILE = 0.75
MAP_PEAK_QUANTILE = 0.98
SURROUNDINGS_MM = (3.0, 8.0)  # the local contrast's ring of tissue around a lesion


def local_contrast(flair: np.ndarray, voxels: np.ndarray, tissue: np.ndarray, spacing_mm) -> float:
    """A lesion's FLAIR level (``LESION_LEVEL_QUANTILE``, as the lesion edges take it) over the median FLAIR of
    ``tissue`` within ``SURROUNDINGS_MM`` of it."""
    region = ndimage.find_objects(voxels.astype(np.uint8))[0]
    margin = [int(np.ceil(SURROUNDINGS_MM[1] / s)) + 1 for s in spacing_mm]
    box = widened_box(region, margin, voxels.shape)
    distance = ndimage.distance_transform_edt(~voxels[box], sampling=spacing_mm)
    ring = (distance > SURROUNDINGS_MM[0]) & (distance <= SURROUNDINGS_MM[1]) & tissue[box]
    return float(np.quantile(flair[voxels], LESION_LEVEL_QUANTILE) / np.median(flair[box][ring])) \
        if ring.any() else float("nan")


def mirror_images(flair: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The FLAIR and the lesion labels at each voxel's mirror image across the brain's midline, on the FLAIR's grid."""
    axis = int(np.argmax(np.abs(np.asarray(affine)[0, :3])))  # the voxel axis nearest to left-right
    fixed = nifti_to_itk(flair.astype(np.float32), affine, "the FLAIR")
    flipped = nifti_to_itk(np.flip(flair, axis).astype(np.float32).copy(), affine, "the flipped FLAIR")
    transform = register_rigid(fixed, flipped, RegistrationSettings())
    flipped_labels = nifti_to_itk(np.flip(labels, axis).astype(np.float32).copy(), affine, "the flipped lesions")
    mirrored = [sitk.GetArrayFromImage(sitk.Resample(image, fixed, transform, interpolation, 0.0)).transpose(2, 1, 0)
                for image, interpolation in ((flipped, sitk.sitkLinear), (flipped_labels, sitk.sitkNearestNeighbor))]
    return mirrored[0], mirrored[1].astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_method_arguments(parser)
    args = parser.parse_args()
    print("| case | healthy | lesion | mL | in tumour | on findings | FLAIR / brain | T2 / brain | map z median | "
          "map z peak | contralateral contrast | local contrast | within 10 mm of the ventricles | thickness (mm) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, result in method_results(args):
        labels, count = lesion_components(np.asanyarray(result.mask.dataobj) > 0)
        healthy = not case.truth.any()
        if not count:
            print(f"| {case.case_id} | {healthy} | none | 0 | | | | | | | | | | |")
            continue
        flair = case.images["flair"].get_fdata(dtype=np.float32)
        t2 = case.images["t2"].get_fdata(dtype=np.float32)
        anomaly = np.asanyarray(result.anomaly_map.dataobj, dtype=np.float32)
        flair_median, t2_median = np.median(flair[case.brain]), np.median(t2[case.brain])
        map_median = np.median(anomaly[case.brain])
        map_spread = MAD_TO_SD * np.median(np.abs(anomaly[case.brain] - map_median))
        findings = None if case.benign is None else ndimage.binary_dilation(case.benign > 0,
                                                                            np.ones((3, 3, 3), bool))
        mirror, mirror_labels = mirror_images(flair, labels, case.images["flair"].affine)
        shapes = lesion_figures(labels, flair, case.brain, case.spacing_mm, PeriventricularRule.reach_mm)
        tissue = case.brain & (flair >= FLUID_FLAIR_RATIO * flair_median)
        for label in range(1, count + 1):
            voxels = labels == label
            other_side = voxels & (mirror_labels != label) & (mirror > 0)
            own = np.quantile(flair[voxels], CONTRALATERAL_QUANTILE) - flair_median
            contralateral = (np.quantile(mirror[other_side], CONTRALATERAL_QUANTILE) - flair_median) / own \
                if other_side.any() and own > 0 else float("nan")
            z = (anomaly[voxels] - map_median) / max(map_spread, 1e-12)
            on_findings = "n/a" if findings is None else f"{(voxels & findings).mean() / voxels.mean():.2f}"
            print(f"| {case.case_id} | {healthy} | {label} | {voxels.sum() * case.voxel_mm3 / 1000.0:.2f} | "
                  f"{(voxels & case.truth).sum() / voxels.sum():.2f} | {on_findings} | "
                  f"{np.median(flair[voxels]) / flair_median:.2f} | {np.median(t2[voxels]) / t2_median:.2f} | "
                  f"{np.median(z):.1f} | {np.quantile(z, MAP_PEAK_QUANTILE):.1f} | {contralateral:.2f} | "
                  f"{local_contrast(flair, voxels, tissue, case.spacing_mm):.2f} | {shapes[label - 1][0]:.2f} | "
                  f"{shapes[label - 1][1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
