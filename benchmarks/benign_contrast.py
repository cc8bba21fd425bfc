"""How bright the clinical benign findings of a synthetic set are, beside the tumour's oedema (docs/evaluation.md).

For a folder written by ``anofpdm synth --benign-findings clinical``, prints per case its Fazekas grades, the
findings' volume and, on FLAIR and T2, the median and 90th percentile of the findings' voxels (the lacunes' CSF
cavities left out) and the median of the oedema (label 2), each relative to the median of the rest of the brain
(no tumour, no finding); then the range of each over the cases. No network.

    PYTHONPATH=lib python benchmarks/benign_contrast.py --data data/benign12_training
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from anofpdm.data.brats import load_case
from anofpdm.data.synth import BENIGN_CODES, LABEL_OEDEMA, MANIFEST_NAME
from anofpdm.evaluation.benign_findings import load_findings

from cases import select_cases

SEQUENCES = ("flair", "t2")
BRIGHT_CODES = [code for name, code in BENIGN_CODES.items() if name != "lacune"]  # the cavity is CSF, dark on FLAIR
UPPER_PERCENTILE = 90.0
UPPER = f"findings p{UPPER_PERCENTILE:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="anofpdm synth --benign-findings clinical folder")
    args = parser.parse_args()
    described = {c["case"]: c for c in json.loads((args.data / MANIFEST_NAME).read_text())["cases"]}
    columns = [f"{s} {k}" for s in SEQUENCES for k in ("findings median", UPPER, "oedema")]
    print("| case | healthy | Fazekas PV / deep | findings (mL) | " + " | ".join(columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    ratios: dict[str, list[float]] = {name: [] for name in columns}
    for files in select_cases(args.data):
        volume = load_case(files, sequences=SEQUENCES)
        seg = np.asarray(nib.as_closest_canonical(nib.load(str(files.seg))).dataobj)
        findings = load_findings(files, seg.shape, volume.affine)
        if findings is None:
            print(f"{files.case_id} left out: no findings map")
            continue
        brain = volume.images["flair"] > 0
        bright = np.isin(findings, BRIGHT_CODES)
        normal = brain & (seg == 0) & (findings == 0)
        oedema = seg == LABEL_OEDEMA
        cells = []
        for sequence in SEQUENCES:
            image = volume.images[sequence]
            reference = float(np.median(image[normal]))
            values = {
                "findings median": np.median(image[bright]) if bright.any() else None,
                UPPER: np.percentile(image[bright], UPPER_PERCENTILE) if bright.any() else None,
                "oedema": np.median(image[oedema]) if oedema.any() else None,
            }
            for key, value in values.items():
                ratio = None if value is None else float(value) / reference
                cells.append("n/a" if ratio is None else f"{ratio:.2f}")
                if ratio is not None:
                    ratios[f"{sequence} {key}"].append(ratio)
        info = described[files.case_id]["benign_findings"]
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        print(f"| {files.case_id} | {described[files.case_id]['healthy']} | {info['fazekas_periventricular']} / "
              f"{info['fazekas_deep']} | {np.count_nonzero(findings) * voxel_ml:.1f} | " + " | ".join(cells) + " |")
    print("\nrelative to the median of the rest of the brain, over the cases (min - max):")
    for name, values in ratios.items():
        if values:
            print(f"  {name}: {min(values):.2f} - {max(values):.2f} ({len(values)} cases)")


if __name__ == "__main__":
    main()
