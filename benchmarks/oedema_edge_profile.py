"""How bright is the oedema on FLAIR from the whole tumour's outer boundary inwards? (Why the faint edge of
``anofpdm.evaluation.metrics.faint_edge`` is the outer 2 mm.)

For labelled cases prints, per case, the median robust z-score of the FLAIR within the brain (the statistics of the
per-volume rule and of the ``flair-zscore`` baseline) over the oedema voxels (label 2) at each depth under the
whole tumour's outer boundary (Euclidean distance in mm to the nearest voxel outside the hole-filled whole tumour),
and over the necrotic / non-enhancing core (label 1) and the enhancing tumour (label 4); no network. Example:

    PYTHONPATH=lib python benchmarks/oedema_edge_profile.py --data data/synth80 --prepared data/slices64s \\
        --splits val
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from anofpdm.arguments import comma_floats, comma_list
from anofpdm.data.brats import SUB_REGIONS, load_case
from anofpdm.method.decisions import robust_z_scores
from anofpdm.method.model import MAP_SEQUENCES
from cases import select_cases

DEPTH_BINS_MM = "1,2,3,4,6"  # upper ends of the depth bins (the last bin is everything deeper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="labelled cases (BraTS / MSD / synthetic)")
    parser.add_argument("--prepared", type=Path, help="prepared slices folder naming the splits")
    parser.add_argument("--splits", type=comma_list, default="val", help="with --prepared: the splits' cases")
    parser.add_argument("--depths-mm", type=comma_floats, default=DEPTH_BINS_MM, help="upper ends of the depth bins")
    args = parser.parse_args()
    edges = [0.0, *args.depths_mm, np.inf]
    names = [f"<= {high:g} mm" if np.isfinite(high) else f"> {low:g} mm" for low, high in zip(edges, edges[1:])]
    print("median FLAIR robust z of the oedema by depth under the whole tumour's outer boundary: " + ", ".join(names))
    for files in select_cases(args.data, args.prepared, args.splits):
        volume = load_case(files, sequences=MAP_SEQUENCES)
        labels = volume.sub_regions
        if not labels.any():
            continue
        brain = np.zeros(labels.shape, dtype=bool)
        for image in volume.images.values():
            brain |= image > 0
        flair = torch.from_numpy(volume.images[MAP_SEQUENCES[0]])
        z = robust_z_scores(flair, torch.from_numpy(brain))[0].numpy()
        spacing = nib.affines.voxel_sizes(volume.affine)
        depth = ndimage.distance_transform_edt(np.pad(ndimage.binary_fill_holes(labels > 0), 1), sampling=spacing)
        depth = depth[1:-1, 1:-1, 1:-1]
        oedema = labels == SUB_REGIONS["oedema"]
        cells = []
        for low, high in zip(edges, edges[1:]):
            shell = oedema & (depth > low) & (depth <= high)
            cells.append(f"{np.median(z[shell]):.1f} ({shell.sum()})" if shell.any() else "-")
        regions = {name: labels == label for name, label in SUB_REGIONS.items() if name != "oedema"}
        rest = ", ".join(f"{name} {np.median(z[inside]):.1f}" for name, inside in regions.items() if inside.any())
        print(f"{files.case_id} ({'x'.join(f'{s:g}' for s in spacing)} mm): " + ", ".join(cells) + f"; {rest}",
              flush=True)


if __name__ == "__main__":
    main()
