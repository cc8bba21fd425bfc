"""Where a method's false positives lie on labelled volumes: depth under the brain's surface, place, FLAIR level.

Runs the method on each case as ``anofpdm evaluate`` does and prints, per 26-connected component of its mask
outside the truth tumour: volume, depth under the brain's surface (median over its voxels, mm), its centroid
relative to the brain's (RAS mm: right, anterior, superior), the median percentile of its voxels' FLAIR within the
brain, and where the case has a benign-findings map, its distance from the nearest finding (mm). Prints figures;
asserts nothing. Example (docs/evaluation.md, "Benign FLAIR-bright findings"):

    PYTHONPATH=lib python benchmarks/false_positive_sites.py --model model/anofpdm.pt \
        --data data/benign12_shifted --cases SYN_00001,SYN_00007,SYN_00009
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from anofpdm.method.postprocess import lesion_components

from cases import add_method_arguments, method_results

PERCENT = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_method_arguments(parser)
    args = parser.parse_args()
    print("| case | component | mL | depth (mm) | centroid - brain's (R, A, S mm) | FLAIR percentile | "
          "to nearest finding (mm) |")
    print("|---|---|---|---|---|---|---|")
    for case, result in method_results(args):
        false = (np.asanyarray(result.mask.dataobj) > 0) & ~case.truth
        components, count = lesion_components(false)
        if not count:
            print(f"| {case.case_id} | none | 0 | | | | |")
            continue
        spacing = np.asarray(case.spacing_mm)
        depth = ndimage.distance_transform_edt(case.brain, sampling=spacing)
        to_finding = None if case.benign is None or not case.benign.any() else \
            ndimage.distance_transform_edt(case.benign == 0, sampling=spacing)
        flair = case.images["flair"].get_fdata(dtype=np.float32)
        brain_values = np.sort(flair[case.brain])
        brain_centre = np.argwhere(case.brain).mean(0)
        for label in range(1, count + 1):
            voxels = components == label
            centre_mm = (np.argwhere(voxels).mean(0) - brain_centre) * spacing  # RAS voxel axes (canonical)
            percentile = PERCENT * np.searchsorted(brain_values, np.median(flair[voxels])) / len(brain_values)
            nearest = "n/a" if to_finding is None else f"{float(to_finding[voxels].min()):.1f}"
            print(f"| {case.case_id} | {label} | {voxels.sum() * case.voxel_mm3 / 1000.0:.2f} | "
                  f"{float(np.median(depth[voxels])):.1f} | {', '.join(f'{c:+.0f}' for c in centre_mm)} | "
                  f"{percentile:.1f} | {nearest} |", flush=True)


if __name__ == "__main__":
    main()
