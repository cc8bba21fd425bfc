"""The written results of an evaluation: the per-method summary, its Markdown table and the PNG overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anofpdm.evaluation.benign_findings import aggregate_findings, findings_table
from anofpdm.evaluation.case_scoring import EvaluationCase
from anofpdm.method.decisions import UNCERTAIN_PROBABILITY
from anofpdm.evaluation.methods import METHODS
from anofpdm.data.brats import SUB_REGIONS
from anofpdm.evaluation.metrics import (
    FAINT_EDGE,
    FAINT_EDGE_MM,
    aggregate_cases,
    aggregate_reliability,
    aggregate_sub_region_recall,
)
from anofpdm.method.model import MAP_SEQUENCES
from anofpdm.method.pipeline import SegmentationResult

__all__ = ["aggregate_methods", "markdown_table", "overlay_payload", "render_overlay"]

OVERLAY_DPI = 90
OVERLAY_TILE_INCHES = 2.6
TRUTH_COLOUR, PREDICTION_COLOUR = "lime", "red"
PERCENT = 100.0
SUB_REGION_TITLES = {"necrotic_core": "necrotic / non-enhancing core", "oedema": "oedema", "enhancing": "enhancing"}


def _mean_of(per_case: Sequence[Mapping[str, Any]], key: str) -> float | None:
    return float(np.mean([c[key] for c in per_case])) if per_case else None


def aggregate_methods(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: the case metrics aggregated over the scored cases, its cost per case and verdict reliability.

    Where cases carry a benign-findings map, also ``"benign_findings"``: ``benign_findings.aggregate_findings``.
    """
    scored = [r for r in records if "error" not in r]
    summary = {}
    for method in methods:
        per_case = [r["methods"][method] for r in scored]
        reliability = [c["reliability"] for c in per_case if c["reliability"] is not None]
        summary[method] = {
            "description": METHODS[method],
            **(aggregate_cases(per_case) if per_case else {"cases": 0}),
            "seconds_per_case": _mean_of(per_case, "seconds"),
            "network_evaluations_per_case": _mean_of(per_case, "network_evaluations"),
            "verdict_reliability": aggregate_reliability(reliability) if reliability else None,
            "sub_region_recall": aggregate_sub_region_recall([c["sub_region_recall"] for c in per_case]),
        }
        findings = aggregate_findings(per_case)
        if findings is not None:
            summary[method]["benign_findings"] = findings
    return summary


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{PERCENT * value:.1f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The aggregated results as a Markdown table (overlap metrics in %)."""
    header = ("| method | mixed Dice | mixed IoU | mixed AUPRC | unhealthy Dice | unhealthy IoU | unhealthy AUPRC "
              "| slice acc. | slice AUROC | 3-D Dice | 3-D precision | 3-D recall | abs. volume error (mL) "
              "| volume acc. | healthy FP (mL) | healthy called healthy | lesion-wise Dice | lesion-wise HD95 (mm) "
              "| s / case |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for method, result in summary.items():
        if not result["cases"]:
            lines.append(f"| {method} | no case scored |" + " |" * (header.count(" | ") - 1))
            continue
        s, v = result["slice_protocol"], result["volume"]

        def spread(metric: str, scale: float = PERCENT) -> str:
            entry = v[metric]
            return "n/a" if entry["mean"] is None else f"{scale * entry['mean']:.1f} ± {scale * entry['std']:.1f}"

        cells = [_percent(s[k]) for k in ("mixed_dice", "mixed_iou", "mixed_auprc", "unhealthy_dice", "unhealthy_iou",
                                            "unhealthy_auprc", "slice_accuracy", "slice_auroc")]
        cells += [spread("dice"), spread("precision"), spread("recall"), spread("abs_volume_error_ml", 1.0),
                  _percent(v["volume_accuracy"]["mean"]), spread("healthy_false_positive_ml", 1.0),
                  _percent(v["healthy_called_healthy"]["mean"])]
        lesion_wise = result["lesion_wise"]
        cells += [f"{PERCENT * lesion_wise['dice']['mean']:.1f} ± {PERCENT * lesion_wise['dice']['std']:.1f}",
                  f"{lesion_wise['hd95_mm']['mean']:.1f} ± {lesion_wise['hd95_mm']['std']:.1f}",
                  f"{result['seconds_per_case']:.1f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    notes = [
        "",
        "Slice protocol (model grid, paper): Dice / IoU averaged over all slices (mixed, gated by the slice verdict) "
        "or tumour slices (unhealthy, ungated); AUPRC over brain pixels, mean over cases with tumour; slice acc. = "
        "verdict accuracy; slice AUROC = how well the slice scores rank a volume's tumour slices first, mean over "
        "volumes with both kinds of slice. 3-D metrics: per volume on the input grid, mean ± std over cases with "
        "tumour; volume acc. over all cases; healthy FP = mask volume on cases without tumour. Lesion-wise Dice and "
        "HD95 (mm, on the input grid's spacing): BraTS 2023 (BraTS-GLI settings), per truth lesion and invented "
        "lesion, mean ± std over all cases (a healthy case with an empty mask scores 100 and 0). Baselines have no "
        "slice classifier: a slice is unhealthy when its final mask is not empty.",
    ]
    reliable = {method: result["verdict_reliability"] for method, result in summary.items()
                if result["verdict_reliability"]}
    if reliable:
        low, high = UNCERTAIN_PROBABILITY
        header = ("| method | slices | uncertain share | verdict acc., confident slices "
                  "| verdict acc., uncertain slices | Brier score | Brier score, constant |")
        notes += ["", header, "|---|---|---|---|---|---|---|"]
        notes += [(f"| {method} | {r['n_slices']} | {_percent(r['uncertain_share'])} | "
                   f"{_percent(r['confident_accuracy'])} | {_percent(r['uncertain_accuracy'])} | {r['brier']:.3f} | "
                   f"{r['brier_constant']:.3f} |") for method, r in reliable.items()]
        notes += ["", (f"Verdict reliability: a slice is uncertain when the calibration's unhealthy probability at its "
                       f"score lies between {low} and {high}; accuracies in %; Brier score of the probability against "
                       "whether the slice holds tumour, beside that of a constant probability equal to the share of "
                       "tumour slices (lower is better).")]
    return "\n".join(lines + notes + _sub_region_table(summary)) + "\n" + findings_table(summary)


def _sub_region_table(summary: Mapping[str, Any]) -> list[str]:
    """The recall per BraTS sub-region, a table of its own under the main one."""
    names = {**{name: f"{SUB_REGION_TITLES[name]} ({label})" for name, label in SUB_REGIONS.items()},
             FAINT_EDGE: f"faint edge (outer {FAINT_EDGE_MM:g} mm)"}
    lines = ["", "| method | " + " | ".join(names.values()) + " |", "|---|" + "---|" * len(names)]
    for method, result in summary.items():
        recall = result["sub_region_recall"]
        cells = ["n/a" if recall[n]["mean"] is None else
                 f"{PERCENT * recall[n]['mean']:.1f} ± {PERCENT * recall[n]['std']:.1f} ({recall[n]['n']})"
                 for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + ["", "Recall per BraTS sub-region (%): the share of the truth's region inside the mask, mean ± std "
                        "over the cases whose truth has it (their number in brackets); the faint edge is the whole "
                        f"tumour's voxels within {FAINT_EDGE_MM:g} mm of the nearest voxel outside it."]


def _overlay_slice(case: EvaluationCase) -> int:
    """The axial slice with the most tumour (the middle brain slice without tumour)."""
    area = case.truth.sum(axis=(0, 1))
    if area.any():
        return int(area.argmax())
    brain_z = np.nonzero(case.brain.any(axis=(0, 1)))[0]
    return int(brain_z[len(brain_z) // 2])


def overlay_payload(case: EvaluationCase, results: Mapping[str, SegmentationResult]) -> dict[str, Any]:
    """The arrays of one axial slice that the overlay figure draws (small enough to gather)."""
    z = _overlay_slice(case)
    return {
        "case": case.case_id,
        "z": z,
        "flair": case.images[MAP_SEQUENCES[0]].get_fdata(dtype=np.float32)[:, :, z],
        "truth": case.truth[:, :, z],
        "methods": {name: (np.asanyarray(r.mask.dataobj)[:, :, z] > 0,
                           np.asanyarray(r.anomaly_map.dataobj)[:, :, z].astype(np.float32))
                    for name, r in results.items()},
    }


def render_overlay(payload: Mapping[str, Any], path: Path) -> Path:
    """Per method: FLAIR with truth (green) and prediction (red) contours, and the anomaly map below."""
    from matplotlib.figure import Figure

    methods = payload["methods"]
    figure = Figure(figsize=(OVERLAY_TILE_INCHES * len(methods), 2 * OVERLAY_TILE_INCHES))
    axes = figure.subplots(2, len(methods), squeeze=False)
    flair = payload["flair"]
    for column, (name, (mask, heat)) in enumerate(methods.items()):
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(flair.T, cmap="gray", origin="lower")
        bottom.imshow(heat.T, cmap="magma", origin="lower")
        for axis in (top, bottom):
            if payload["truth"].any():
                axis.contour(payload["truth"].T, levels=[0.5], colors=TRUTH_COLOUR, linewidths=0.8)
            axis.set_axis_off()
        if mask.any():
            top.contour(mask.T, levels=[0.5], colors=PREDICTION_COLOUR, linewidths=0.8)
        top.set_title(name, fontsize=8)
    figure.suptitle(f"{payload['case']}, axial slice {payload['z']}: truth green, prediction red", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=OVERLAY_DPI)
    return path
