"""False positives on benign FLAIR-bright findings (``anofpdm synth --benign-findings clinical``).

A case written with clinical benign findings carries their truth map, ``<CASE>_benign.nii.gz`` (codes
``anofpdm.data.synth.BENIGN_CODES``; the findings are labelled healthy: the seg is 0 there). Per case and method,
:func:`findings_scores` gives the predicted volume on the findings (mL of the mask within the findings map dilated
by one voxel, the truth tumour left out) and the share of the findings' voxels masked; :func:`aggregate_findings`
averages them over the healthy and over the tumour cases apart, and :func:`findings_table` writes them as a
Markdown table. Cases without a findings map take no part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from anofpdm.data.brats import CaseFiles
from anofpdm.data.synth import BENIGN_SUFFIX
from anofpdm.evaluation.metrics import MM3_PER_ML, _mean_std
from anofpdm.volumes.checks import AFFINE_TOLERANCE_MM

__all__ = ["FINDINGS_DILATION", "load_findings", "findings_scores", "aggregate_findings", "findings_table"]

FINDINGS_DILATION = np.ones((3, 3, 3), bool)  # "dilated by 1 voxel" (issue #41): all 26 neighbours
CASE_GROUPS = ("healthy", "tumour")
PERCENT = 100.0


def load_findings(files: CaseFiles, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray | None:
    """The case's benign-findings map (uint8, RAS as ``anofpdm.data.brats.load_case``), None when it has none.

    Raises:
        ValueError: if the map is not on the case's grid (``shape``, ``affine``).
    """
    path = files.seg.parent / f"{files.case_id}_{BENIGN_SUFFIX}.nii.gz"
    if not path.is_file():
        return None
    image = nib.as_closest_canonical(nib.load(str(path)))
    if image.shape != tuple(shape) or not np.allclose(image.affine, affine, atol=AFFINE_TOLERANCE_MM):
        raise ValueError(f"{path}: not on the case's grid (shape {image.shape} vs {tuple(shape)})")
    return np.asarray(image.dataobj).astype(np.uint8)


def findings_scores(mask: np.ndarray, findings: np.ndarray, truth: np.ndarray, voxel_mm3: float) -> dict[str, Any]:
    """One method's mask on one case's benign findings.

    Args:
        mask: the predicted tumour mask on the input grid.
        findings: the findings map on the same grid (any nonzero code is a finding).
        truth: the whole-tumour truth; its voxels never count as a false positive here.
        voxel_mm3: input voxel volume.

    Returns:
        findings_ml (the findings' volume), predicted_on_findings_ml (mask volume within the findings dilated by
        ``FINDINGS_DILATION``, outside the truth) and findings_masked_share (share of the findings' voxels
        masked; None without findings).
    """
    mask, region, truth = (np.asarray(a).astype(bool) for a in (mask, findings, truth))
    if not mask.shape == region.shape == truth.shape:
        raise ValueError(f"mask, findings and truth differ in shape: {mask.shape}, {region.shape}, {truth.shape}")
    near = ndimage.binary_dilation(region, FINDINGS_DILATION) & ~truth
    found = int(np.count_nonzero(region))
    return {
        "findings_ml": found * voxel_mm3 / MM3_PER_ML,
        "predicted_on_findings_ml": float(np.count_nonzero(mask & near)) * voxel_mm3 / MM3_PER_ML,
        "findings_masked_share": float(np.count_nonzero(mask & region)) / found if found else None,
    }


def aggregate_findings(per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One method's findings scores over the healthy and over the tumour cases (None: no case has a map).

    Args:
        per_case: the method's case results (``score_result``), each with ``"volume"`` and, where the case has a
            findings map, ``"benign_findings"``.

    Returns:
        Per group ("healthy", "tumour"): cases, findings_ml, predicted_on_findings_ml ({mean, std, n}),
        findings_masked_share ({mean, std, n} over the cases with findings) and cases_with_false_positive (how
        many cases have any mask on their findings).
    """
    scored = [case for case in per_case if case.get("benign_findings") is not None]
    if not scored:
        return None
    summary = {}
    for group in CASE_GROUPS:
        healthy = group == "healthy"
        scores = [case["benign_findings"] for case in scored if (case["volume"]["truth_ml"] == 0) == healthy]
        summary[group] = {
            "cases": len(scores),
            "findings_ml": _mean_std([s["findings_ml"] for s in scores]),
            "predicted_on_findings_ml": _mean_std([s["predicted_on_findings_ml"] for s in scores]),
            "findings_masked_share": _mean_std([s["findings_masked_share"] for s in scores
                                                if s["findings_masked_share"] is not None]),
            "cases_with_false_positive": sum(s["predicted_on_findings_ml"] > 0 for s in scores),
        }
    return summary


def findings_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of each method's ``"benign_findings"`` summary; empty when no method has one."""
    rows = []
    for method, result in summary.items():
        groups = result.get("benign_findings")
        for group, entry in (groups or {}).items():
            if not entry["cases"]:
                continue
            spread = entry["predicted_on_findings_ml"]
            share = entry["findings_masked_share"]["mean"]
            rows.append(f"| {method} | {group} | {entry['cases']} | {entry['findings_ml']['mean']:.2f} | "
                        f"{spread['mean']:.2f} ± {spread['std']:.2f} | "
                        f"{'n/a' if share is None else f'{PERCENT * share:.1f}'} | "
                        f"{entry['cases_with_false_positive']} of {entry['cases']} |")
    if not rows:
        return ""
    header = ("| method | case group | n | findings (mL) | predicted on findings (mL) | findings masked (%) "
              "| cases with a false positive on findings |")
    note = ("Benign findings (cases with a `<CASE>_benign.nii.gz` truth map): predicted on findings = mask volume "
            "within the findings dilated by one voxel (26 neighbours), outside the truth tumour, mean ± std; findings "
            "masked = share of the findings' voxels in the mask, mean over cases with findings.")
    return "\n".join(["", header, "|---|---|---|---|---|---|---|", *rows, "", note]) + "\n"
