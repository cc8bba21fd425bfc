"""One labelled case on the model grid and the scoring of a method's result on it.

The truth is the whole tumour (label > 0), resampled onto the model grid's slices; a result is scored by the
paper's slice protocol there (:class:`SliceProtocol`, :func:`anofpdm.evaluation.metrics.slice_protocol`) and by the
per-volume metrics, the BraTS lesion-wise metrics and the recall per BraTS sub-region on the input grid
(:func:`anofpdm.evaluation.metrics.volume_metrics`, :func:`anofpdm.evaluation.metrics.lesion_wise_scores`,
:func:`anofpdm.evaluation.metrics.sub_region_recall`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from anofpdm.data.brats import CaseFiles, load_case
from anofpdm.evaluation.benign_findings import findings_scores, load_findings
from anofpdm.method.decisions import is_uncertain
from anofpdm.evaluation.metrics import (
    lesion_wise_scores,
    slice_protocol,
    sub_region_recall,
    verdict_reliability,
    volume_metrics,
)
from anofpdm.method.model import NetworkConfig
from anofpdm.method.pipeline import PAPER_IMAGE_SIZE, SegmentationResult, default_median_kernel
from anofpdm.method.postprocess import median_filter_2d, remove_small_components
from anofpdm.volumes.brain_extraction import apply_brain, extract_brain
from anofpdm.volumes.slicing import VolumeGeometry, brain_pixels, brain_voxels, to_model_slices

__all__ = ["SliceProtocol", "EvaluationCase", "prepare_case", "score_result"]

PAPER_MIN_AREA_PX = 40.0  # the authors drop 2-D components of at most 40 px at 128 x 128
TRUTH_LEVEL = 0.5  # labels are resized, then thresholded at 0.5 (docs/method.md section 1)


@dataclass(frozen=True)
class SliceProtocol:
    """The paper's 2-D post-processing of each model-grid slice before slice-level scoring.

    Args:
        median_kernel: odd 2-D median kernel on the raw map (None: the paper's 5 px at 128 px, scaled).
        min_area_px: 8-connected components of at most this many pixels are dropped from each slice's
            mask (None: the authors' 40 px at 128 x 128, scaled by area; 0 keeps all).
    """

    median_kernel: int | None = None
    min_area_px: float | None = None

    def __post_init__(self) -> None:
        if self.median_kernel is not None and (self.median_kernel < 1 or self.median_kernel % 2 == 0):
            raise ValueError(f"median_kernel must be odd and positive, got {self.median_kernel}")
        if self.min_area_px is not None and self.min_area_px < 0:
            raise ValueError(f"min_area_px must be >= 0, got {self.min_area_px}")

    def resolved(self, image_size: int) -> tuple[int, float]:
        """(median kernel, minimum area in px) at ``image_size``."""
        kernel = self.median_kernel or default_median_kernel(image_size)
        area = self.min_area_px
        if area is None:
            area = PAPER_MIN_AREA_PX * (image_size / PAPER_IMAGE_SIZE) ** 2
        return kernel, area


@dataclass
class EvaluationCase:
    """One labelled case, ready for every method.

    Attributes:
        case_id: the case identifier.
        images: the model's sequences as images on the case's (RAS) grid.
        truth: whole-tumour mask on the input grid.
        brain: brain voxels on the input grid (any sequence above zero).
        voxel_mm3: input voxel volume.
        spacing_mm: input voxel size along each axis.
        geometry: the model-grid geometry of the case.
        truth_slices: N x S x S whole-tumour mask on the model grid.
        brain_slices: N x S x S brain pixels on the model grid.
        sub_regions: the truth's BraTS sub-regions on the input grid (``anofpdm.data.brats.SUB_REGIONS``).
        benign: benign-findings map on the input grid (``anofpdm.evaluation.benign_findings``), None without one.
    """

    case_id: str
    images: dict[str, nib.Nifti1Image]
    truth: np.ndarray
    brain: np.ndarray
    voxel_mm3: float
    spacing_mm: tuple[float, ...]
    geometry: VolumeGeometry
    truth_slices: np.ndarray
    brain_slices: np.ndarray
    sub_regions: np.ndarray
    benign: np.ndarray | None = None


def prepare_case(files: CaseFiles, config: NetworkConfig) -> EvaluationCase:
    """Load a case's sequences and truth, and resample the truth onto the model grid's slices.

    A case whose FLAIR is a head (``anofpdm synth --heads``, a scan as the scanner wrote it) keeps the head as the
    methods' input, so they run the app's whole path, brain extraction included; its model grid, truth slices and
    brain are those of the brain the app extracts from it (the same step, so the slices match the results').
    """
    volume = load_case(files, sequences=config.sequences, with_seg=True)
    images = {name: nib.Nifti1Image(volume.images[name], volume.affine) for name in config.sequences}
    truth = volume.mask.astype(bool)
    stripped, extraction = extract_brain(images, config.sequences)
    slices, geometry, extra = to_model_slices(apply_brain(stripped, extraction, config.sequences), config.sequences,
                                              config.image_size, config.field_of_view_mm, extra={"truth": truth})
    brain = extraction.mask if extraction.extracted else brain_voxels(volume.images.values())
    return EvaluationCase(
        case_id=files.case_id,
        images=images,
        truth=truth,
        brain=brain,
        voxel_mm3=float(abs(np.linalg.det(volume.affine[:3, :3]))),
        spacing_mm=tuple(float(s) for s in nib.affines.voxel_sizes(volume.affine)),
        geometry=geometry,
        truth_slices=extra["truth"] >= TRUTH_LEVEL,
        brain_slices=brain_pixels(slices),
        sub_regions=volume.sub_regions,
        benign=load_findings(files, truth.shape, volume.affine),
    )


def _drop_small_areas(masks: np.ndarray, min_area_px: float) -> np.ndarray:
    """Per slice, drop 8-connected components of at most ``min_area_px`` pixels (N x S x S)."""
    if min_area_px <= 0:
        return masks
    unit = (1.0, 1.0, 1.0)  # one slice is an S x S x 1 volume: 26-connectivity is 8-connectivity in-plane
    return np.stack([remove_small_components(m[..., None], unit, min_area_px)[0][..., 0] for m in masks])


def score_result(result: SegmentationResult, case: EvaluationCase, protocol: SliceProtocol) -> dict[str, Any]:
    """Slice-protocol and per-volume metrics of one method's result on one case.

    Returns:
        {"slice": metrics.slice_protocol(...), "volume": metrics.volume_metrics(...), "lesion_wise":
        metrics.lesion_wise_scores(...) on the input grid's spacing, "reliability": metrics.verdict_reliability(...)
        of the reported unhealthy probabilities, None where there are none, "sub_region_recall":
        metrics.sub_region_recall(...)}, and where the case has a benign-findings map "benign_findings":
        benign_findings.findings_scores(...)
    """
    grid = result.model_grid
    if grid is None or tuple(grid.geometry.slices) != tuple(case.geometry.slices):
        raise ValueError(f"case {case.case_id}: the result's model-grid slices differ from the truth's")
    kernel, min_area = protocol.resolved(case.geometry.image_size)
    anomaly_map = median_filter_2d(np.asarray(grid.raw_map, dtype=np.float32), kernel)
    ungated = anomaly_map >= grid.thresholds[:, None, None]
    if grid.eligible is not None:
        ungated &= grid.eligible
    ungated = _drop_small_areas(ungated, min_area)
    slices = slice_protocol(ungated, anomaly_map, grid.unhealthy, case.truth_slices, case.brain_slices, grid.scores)
    mask = np.asanyarray(result.mask.dataobj) > 0
    scores = np.asanyarray(result.anomaly_map.dataobj)
    probability = result.report.get("slices", {}).get("unhealthy_probability")
    reliability = None if probability is None else verdict_reliability(
        probability, grid.unhealthy, case.truth_slices.any(axis=(1, 2)), is_uncertain(np.asarray(probability)))
    findings = {} if case.benign is None else {
        "benign_findings": findings_scores(mask, case.benign, case.truth, case.voxel_mm3)}
    return {"slice": slices, "volume": volume_metrics(mask, scores, case.truth, case.brain, case.voxel_mm3),
            "lesion_wise": lesion_wise_scores(mask, case.truth, case.spacing_mm), "reliability": reliability,
            "sub_region_recall": sub_region_recall(mask, case.sub_regions, case.spacing_mm), **findings}
