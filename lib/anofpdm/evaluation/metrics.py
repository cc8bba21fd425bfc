"""Segmentation metrics and the paper's slice-level evaluation protocol (docs/method.md section 6).

The overlap metrics (Dice, IoU, precision, recall) are :mod:`anofpdm.volumes.overlap`'s.

The slice protocol scores every model-grid slice of a volume on its own and averages over slices:
"mixed" takes all slices with the masks gated by the slice verdict (healthy slices get an empty mask),
"unhealthy" takes the tumour slices only, with the ungated mask (map >= tau). AUPRC is the average
precision of the ungated map over brain pixels. The mixed Dice is inflated by healthy slices scoring 1,
so per-volume 3-D metrics are reported beside it.

Lesion-wise Dice and HD95 (``lesion_wise_scores``) are the BraTS 2023+ challenges' ranking metrics, scored per
lesion of the truth so that a missed small lesion or an invented one weighs as much as a large one.

The recall per BraTS sub-region (``sub_region_recall``) says which part of the whole tumour a mask misses: the
necrotic / non-enhancing core, the oedema, the enhancing tumour, and the oedema's faint outer edge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anofpdm.data.brats import SUB_REGIONS
from anofpdm.method.postprocess import lesion_components
from anofpdm.volumes.overlap import OVERLAP_NAMES, check_pair, dice, iou, overlap_scores, precision, recall

__all__ = [
    "MM3_PER_ML",
    "overlap_scores",
    "dice",
    "iou",
    "precision",
    "recall",
    "average_precision",
    "lesion_volume_error_ml",
    "volume_metrics",
    "BRATS_DILATION_ITERATIONS",
    "BRATS_MIN_LESION_MM3",
    "BRATS_MISSING_HD95_MM",
    "hd95_mm",
    "lesion_wise_scores",
    "FAINT_EDGE_MM",
    "FAINT_EDGE",
    "faint_edge",
    "sub_region_recall",
    "aggregate_sub_region_recall",
    "slice_protocol",
    "aggregate_cases",
    "verdict_reliability",
    "aggregate_reliability",
]

MM3_PER_ML = 1000.0
# BraTS 2023 lesion-wise scoring with the BraTS-GLI settings (the challenge's code: github.com/rachitsaluja/
# BraTS-2023-Metrics, eval.py, get_LesionWiseScores and get_LesionWiseResults; kept for BraTS 2024)
BRATS_DILATION_ITERATIONS = 3  # GLI, SSA and PED: 3 iterations of the 18-connected cross; MEN and MET: 1
BRATS_MIN_LESION_MM3 = 50.0  # truth lesions of at most this volume are left out (GLI, SSA, MEN, PED; MET: 2)
BRATS_MISSING_HD95_MM = 374.0  # the HD95 of a missed or invented lesion (about the 240 x 240 x 155 mm diagonal)
# per-case slice-protocol means, the count of slices each is a mean over, and how the pooled value is named
POOLED_SLICE_METRICS = {
    "mixed_dice": "n_slices",
    "mixed_iou": "n_slices",
    "unhealthy_dice": "n_tumour_slices",
    "unhealthy_iou": "n_tumour_slices",
    "slice_accuracy": "n_slices",
}
CASE_MEAN_SLICE_METRICS = ("mixed_auprc", "unhealthy_auprc", "slice_auroc")
# The faint edge of the whole tumour: its voxels within this distance of the nearest voxel outside it. On the
# synthetic cases the oedema fades there (anofpdm.data.synth.OEDEMA_EDGE_FACTOR), and on the 1 mm BraTS grid it is
# the outer two voxels: the part of the oedema a reader draws last (docs/evaluation.md, "The whole tumour ...")
FAINT_EDGE_MM = 2.0
FAINT_EDGE = "faint_edge"


def average_precision(scores: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """Area under the precision-recall curve (scikit-learn's average precision) of a score map.

    Args:
        scores: anomaly scores, higher = more anomalous.
        truth: binary truth of the same shape.
        region: optional boolean mask of the pixels that count (e.g. the brain).

    Returns:
        The average precision, or None when no counted pixel is positive (undefined).
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth).astype(bool)
    if scores.shape != truth.shape:
        raise ValueError(f"scores shape {scores.shape} != truth shape {truth.shape}")
    if region is not None:
        region = np.asarray(region).astype(bool)
        if region.shape != truth.shape:
            raise ValueError(f"region shape {region.shape} != truth shape {truth.shape}")
        scores, truth = scores[region], truth[region]
    if not truth.any():
        return None
    return float(average_precision_score(truth.ravel(), scores.ravel()))


def lesion_volume_error_ml(prediction: np.ndarray, truth: np.ndarray, voxel_volume_mm3: float) -> float:
    """Predicted minus true lesion volume in mL (positive: over-segmentation)."""
    prediction, truth = check_pair(prediction, truth)
    if voxel_volume_mm3 <= 0:
        raise ValueError(f"voxel_volume_mm3 must be positive, got {voxel_volume_mm3}")
    return float((int(prediction.sum()) - int(truth.sum())) * voxel_volume_mm3 / MM3_PER_ML)


def volume_metrics(
    mask: np.ndarray, anomaly_map: np.ndarray, truth: np.ndarray, brain: np.ndarray, voxel_volume_mm3: float
) -> dict[str, Any]:
    """Per-volume 3-D metrics of a final mask and its anomaly map.

    Args:
        mask: binary 3-D prediction.
        anomaly_map: 3-D anomaly scores on the same grid.
        truth: binary 3-D truth.
        brain: boolean brain mask (the pixels AUPRC counts).
        voxel_volume_mm3: volume of one voxel.

    Returns:
        dice, iou, precision, recall, auprc (None without tumour), predicted_ml, truth_ml,
        volume_error_ml and verdict_correct (volume called unhealthy iff it holds tumour).
    """
    scores = {name: float(value) for name, value in overlap_scores(mask, truth).items()}
    mask, truth = check_pair(mask, truth)
    return {
        **scores,
        "auprc": average_precision(anomaly_map, truth, brain),
        "predicted_ml": float(mask.sum() * voxel_volume_mm3 / MM3_PER_ML),
        "truth_ml": float(truth.sum() * voxel_volume_mm3 / MM3_PER_ML),
        "volume_error_ml": lesion_volume_error_ml(mask, truth, voxel_volume_mm3),
        "verdict_correct": bool(mask.any() == truth.any()),
    }


def hd95_mm(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """The 95th-percentile Hausdorff distance (mm) between the borders of two non-empty masks.

    A border voxel is a mask voxel with a face neighbour outside the mask. The distances (Euclidean, in mm on the
    grid's spacing) from each border voxel to the nearest border voxel of the other mask give a 95th percentile
    in each direction; the result is the larger of the two (as the BraTS code's ``compute_robust_hausdorff``,
    which weights each surface element by its area where this counts border voxels alike).
    """
    prediction, truth = check_pair(prediction, truth)
    spacing = _checked_spacing(spacing_mm, truth.ndim)
    if not prediction.any() or not truth.any():
        raise ValueError("HD95 needs two non-empty masks")
    face = ndimage.generate_binary_structure(truth.ndim, 1)
    borders = [mask & ~ndimage.binary_erosion(mask, face) for mask in (prediction, truth)]
    to_truth, to_prediction = (ndimage.distance_transform_edt(~border, sampling=spacing) for border in borders[::-1])
    return float(max(np.percentile(to_truth[borders[0]], 95), np.percentile(to_prediction[borders[1]], 95)))


def _checked_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim or not all(s > 0 for s in spacing):
        raise ValueError(f"need {ndim} positive voxel sizes in mm, got {tuple(spacing_mm)}")
    return spacing


def _padded(box: tuple[slice, ...], pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape))


def _enclosing(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0])))


def lesion_wise_scores(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing_mm: Sequence[float],
    dilation_iterations: int = BRATS_DILATION_ITERATIONS,
    min_lesion_mm3: float = BRATS_MIN_LESION_MM3,
) -> dict[str, Any]:
    """Lesion-wise Dice and HD95 of one case, as the BraTS 2023 challenge computes them (BraTS-GLI settings).

    The definitions of the challenge's code (github.com/rachitsaluja/BraTS-2023-Metrics, ``eval.py``):

    - truth lesions: the truth is dilated ``dilation_iterations`` times with the 18-connected 3-D cross, and truth
      voxels that fall into one 26-connected component of the dilation form one lesion (lesions close together
      count as one);
    - predicted lesions: the 26-connected components of the prediction;
    - each truth lesion is matched with every predicted lesion that touches its own dilation (same structure and
      iterations) and scored by the Dice and the HD95 (``hd95_mm``) of it against the union of those predicted
      lesions; with none it is missed: Dice 0, HD95 ``BRATS_MISSING_HD95_MM`` (374 mm);
    - a predicted lesion matched with no truth lesion is a false positive: Dice 0, HD95 374 mm;
    - truth lesions of ``min_lesion_mm3`` or less are left out of the scores (the predicted lesions matched with
      them are not false positives);
    - the case's lesion-wise Dice and HD95 are the means over the scored truth lesions and the false positives;
      with neither (an empty prediction on an empty truth) they are 1 and 0.

    HD95 here counts border voxels alike where the challenge weights surface elements by area (``hd95_mm``);
    dilation and connectivity are in voxels, as there, whatever the spacing (BraTS grids are 1 mm).

    Args:
        prediction: binary 3-D prediction.
        truth: binary 3-D truth on the same grid.
        spacing_mm: the grid's voxel size along each axis (lesion volumes and distances in mm).
        dilation_iterations: dilations of a truth lesion that gather its predicted lesions (>= 1).
        min_lesion_mm3: truth lesions of at most this volume are left out.

    Returns:
        dice, hd95_mm, truth_lesions (scored), detected (matched with a predicted lesion), missed,
        false_positives, small_lesions_left_out.
    """
    prediction, truth = check_pair(prediction, truth)
    spacing = _checked_spacing(spacing_mm, truth.ndim)
    if dilation_iterations < 1:  # scipy dilates until nothing changes at 0
        raise ValueError(f"dilation_iterations must be >= 1, got {dilation_iterations}")
    if min_lesion_mm3 < 0:
        raise ValueError(f"min_lesion_mm3 must be >= 0, got {min_lesion_mm3}")
    cross = ndimage.generate_binary_structure(truth.ndim, 2)
    predicted, _ = lesion_components(prediction)
    predicted_boxes = ndimage.find_objects(predicted)
    predicted_sizes = np.bincount(predicted.ravel(), minlength=len(predicted_boxes) + 1)
    lesions = np.zeros(truth.shape, dtype=np.int32)
    if truth.any():
        near = _padded(_enclosing(ndimage.find_objects(truth.astype(np.uint8))), dilation_iterations, truth.shape)
        grouped, _ = lesion_components(ndimage.binary_dilation(truth[near], cross, dilation_iterations))
        lesions[near] = np.where(truth[near], grouped, 0)
    voxel_mm3 = float(np.prod(spacing))
    matched: set[int] = set()
    dice_scores, hd95_scores, small, missed = [], [], 0, 0
    for index, box in enumerate(ndimage.find_objects(lesions), start=1):
        near = _padded(box, dilation_iterations, truth.shape)
        lesion = lesions[near] == index
        reach = ndimage.binary_dilation(lesion, cross, dilation_iterations)
        hits = [int(label) for label in np.unique(predicted[near][reach]) if label]
        matched.update(hits)
        size = int(lesion.sum())
        if size * voxel_mm3 <= min_lesion_mm3:
            small += 1
            continue
        if not hits:
            missed += 1
            dice_scores.append(0.0)
            hd95_scores.append(BRATS_MISSING_HD95_MM)
            continue
        overlap = int(np.isin(predicted[near][lesion], hits).sum())
        dice_scores.append(2.0 * overlap / (size + int(predicted_sizes[hits].sum())))
        both = _enclosing([box, *(predicted_boxes[label - 1] for label in hits)])
        hd95_scores.append(hd95_mm(np.isin(predicted[both], hits), lesions[both] == index, spacing))
    false_positives = len(predicted_boxes) - len(matched)
    counted = len(dice_scores) + false_positives
    return {
        "dice": float(sum(dice_scores) / counted) if counted else 1.0,
        "hd95_mm": float((sum(hd95_scores) + false_positives * BRATS_MISSING_HD95_MM) / counted) if counted else 0.0,
        "truth_lesions": len(dice_scores),
        "detected": len(dice_scores) - missed,
        "missed": missed,
        "false_positives": false_positives,
        "small_lesions_left_out": small,
    }


def faint_edge(whole_tumour: np.ndarray, spacing_mm: Sequence[float], edge_mm: float = FAINT_EDGE_MM) -> np.ndarray:
    """The whole tumour's voxels within ``edge_mm`` (Euclidean, on the grid's spacing) of the nearest voxel outside
    it, and its outer layer (voxels with a face neighbour outside) on grids coarser than that; a hole inside the
    tumour is not outside it, so only the outer boundary counts."""
    whole_tumour = np.asarray(whole_tumour).astype(bool)
    spacing = _checked_spacing(spacing_mm, whole_tumour.ndim)
    if edge_mm <= 0:
        raise ValueError(f"edge_mm must be positive, got {edge_mm}")
    edge = np.zeros(whole_tumour.shape, dtype=bool)
    if not whole_tumour.any():
        return edge
    near = _padded(_enclosing(ndimage.find_objects(whole_tumour.astype(np.uint8))), 1, whole_tumour.shape)
    filled = np.pad(ndimage.binary_fill_holes(whole_tumour[near]), 1)  # padded: the volume's border is outside
    inner = (slice(1, -1),) * whole_tumour.ndim
    depth = ndimage.distance_transform_edt(filled, sampling=spacing)[inner]
    outer_layer = filled[inner] & ~ndimage.binary_erosion(filled)[inner]
    edge[near] = whole_tumour[near] & ((depth <= edge_mm) | outer_layer)
    return edge


def sub_region_recall(
    prediction: np.ndarray, sub_regions: np.ndarray, spacing_mm: Sequence[float], edge_mm: float = FAINT_EDGE_MM
) -> dict[str, float | None]:
    """The share of each BraTS sub-region of the truth that a binary prediction covers.

    Args:
        prediction: binary 3-D prediction.
        sub_regions: the truth's label map in BraTS21 labels (``anofpdm.data.brats.SUB_REGIONS``).
        spacing_mm: the grid's voxel size along each axis.
        edge_mm: the depth of the faint edge (``faint_edge``).

    Returns:
        {"necrotic_core", "oedema", "enhancing", ``FAINT_EDGE``: recall}, None for a region the truth lacks.
    """
    prediction, whole = check_pair(prediction, np.asarray(sub_regions) > 0)
    regions = {name: np.asarray(sub_regions) == label for name, label in SUB_REGIONS.items()}
    regions[FAINT_EDGE] = faint_edge(whole, spacing_mm, edge_mm)
    return {name: float(recall(prediction, region)) if region.any() else None for name, region in regions.items()}


def aggregate_sub_region_recall(cases: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, Any]]:
    """Mean +- std (population) of ``sub_region_recall`` per region over the cases whose truth has it."""
    names = (*SUB_REGIONS, FAINT_EDGE)
    return {name: _mean_std([case[name] for case in cases if case[name] is not None]) for name in names}


def slice_score_auroc(scores: np.ndarray, tumour: np.ndarray) -> float | None:
    """How well one volume's slice scores rank its tumour slices first: AUROC of ``-score`` (a low slice score
    means unhealthy: a cosine score, or minus a map z-score). None without scores (NaN: a method with no slice
    classifier) or without both kinds of slice."""
    scores, tumour = np.asarray(scores, dtype=np.float64), np.asarray(tumour).astype(bool)
    if scores.shape != tumour.shape:
        raise ValueError(f"need one score per slice, got {scores.shape} for {tumour.shape} slices")
    if np.isnan(scores).any() or tumour.all() or not tumour.any():
        return None
    return float(roc_auc_score(tumour, -scores))


def slice_protocol(
    ungated: np.ndarray,
    anomaly_map: np.ndarray,
    unhealthy: np.ndarray,
    truth: np.ndarray,
    brain: np.ndarray,
    scores: np.ndarray | None = None,
) -> dict[str, Any]:
    """The paper's slice-level metrics of one volume's N model-grid slices.

    Args:
        ungated: N x H x W binary masks before the verdict gate (map >= tau, post-processed).
        anomaly_map: N x H x W anomaly maps the masks were thresholded from (scored by AUPRC).
        unhealthy: N slice verdicts; the mixed protocol empties the masks of slices called healthy.
        truth: N x H x W binary truth.
        brain: N x H x W brain pixels (AUPRC counts these only).
        scores: optional N slice scores, low = unhealthy (``slice_score_auroc``).

    Returns:
        n_slices, n_tumour_slices; mixed_dice / mixed_iou (means over all slices, gated); unhealthy_dice /
        unhealthy_iou (means over tumour slices, ungated; None without any); mixed_auprc /
        unhealthy_auprc (the map over brain pixels of all / tumour slices; None without tumour);
        slice_accuracy (a slice's verdict is right when it says whether the slice holds tumour); slice_auroc
        (``slice_score_auroc`` of ``scores``; None without them).
    """
    ungated, truth = check_pair(ungated, truth)
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    brain = np.asarray(brain).astype(bool)
    if truth.ndim != 3 or anomaly_map.shape != truth.shape or brain.shape != truth.shape:
        raise ValueError(f"need N x H x W masks, map, truth and brain of one shape, got {ungated.shape}, "
                         f"{anomaly_map.shape}, {truth.shape}, {brain.shape}")
    unhealthy = np.asarray(unhealthy).astype(bool)
    if unhealthy.shape != (truth.shape[0],):
        raise ValueError(f"need {truth.shape[0]} slice verdicts, got shape {unhealthy.shape}")
    gated = ungated & unhealthy[:, None, None]
    tumour = truth.any(axis=(1, 2))
    mixed = overlap_scores(gated, truth, batch_dims=1)
    lesional = overlap_scores(ungated[tumour], truth[tumour], batch_dims=1)
    has_tumour = bool(tumour.any())
    return {
        "n_slices": int(truth.shape[0]),
        "n_tumour_slices": int(tumour.sum()),
        "mixed_dice": float(mixed["dice"].mean()),
        "mixed_iou": float(mixed["iou"].mean()),
        "unhealthy_dice": float(lesional["dice"].mean()) if has_tumour else None,
        "unhealthy_iou": float(lesional["iou"].mean()) if has_tumour else None,
        "mixed_auprc": average_precision(anomaly_map, truth, brain),
        "unhealthy_auprc": average_precision(anomaly_map[tumour], truth[tumour], brain[tumour]),
        "slice_accuracy": float((unhealthy == tumour).mean()),
        "slice_auroc": None if scores is None else slice_score_auroc(scores, tumour),
    }


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def aggregate_cases(cases: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Aggregate one method's per-case results (each ``{"slice": slice_protocol(...), "volume": volume_metrics(...)}``).

    Slice protocol, as the paper: Dice, IoU and verdict accuracy are pooled over slices (the mean over all
    slices of all volumes, i.e. per-case means weighted by their slice counts); AUPRC is the mean of the
    per-case values over cases with tumour (the pooled-pixel AUPRC would need every pixel of the data set).
    Per-volume: overlap metrics, AUPRC and volume errors are mean +- std (population) over the cases with
    tumour; ``volume_accuracy`` is over all cases; ``healthy_false_positive_ml`` (the mask volume) and
    ``healthy_called_healthy`` (an empty mask) over the cases without tumour. Lesion-wise Dice and HD95
    (``lesion_wise_scores``, each case's ``"lesion_wise"``) are mean +- std over all cases, as BraTS ranks them.

    Returns:
        {"cases", "tumour_cases", "slice_protocol": {name: pooled value, ...}, "volume": {name: {mean, std, n}},
        "lesion_wise": {"dice": {mean, std, n}, "hd95_mm": {mean, std, n}}}
    """
    if not cases:
        raise ValueError("no cases to aggregate")
    slice_results = [case["slice"] for case in cases]
    pooled: dict[str, Any] = {}
    for name, count in POOLED_SLICE_METRICS.items():
        weighted = [(r[name], r[count]) for r in slice_results if r[name] is not None and r[count] > 0]
        total = sum(n for _, n in weighted)
        pooled[name] = sum(v * n for v, n in weighted) / total if total else None
    for name in CASE_MEAN_SLICE_METRICS:
        pooled[name] = _mean_std([r[name] for r in slice_results if r[name] is not None])["mean"]
    pooled["n_slices"] = sum(r["n_slices"] for r in slice_results)
    pooled["n_tumour_slices"] = sum(r["n_tumour_slices"] for r in slice_results)
    with_tumour = [case["volume"] for case in cases if case["volume"]["truth_ml"] > 0]
    volume: dict[str, Any] = {}
    for name in (*OVERLAP_NAMES, "auprc", "volume_error_ml"):
        volume[name] = _mean_std([v[name] for v in with_tumour if v[name] is not None])
    volume["abs_volume_error_ml"] = _mean_std([abs(v["volume_error_ml"]) for v in with_tumour])
    volume["volume_accuracy"] = _mean_std([float(case["volume"]["verdict_correct"]) for case in cases])
    healthy = [case["volume"] for case in cases if case["volume"]["truth_ml"] == 0]
    volume["healthy_false_positive_ml"] = _mean_std([v["predicted_ml"] for v in healthy])
    volume["healthy_called_healthy"] = _mean_std([float(v["predicted_ml"] == 0) for v in healthy])
    lesion_wise = {name: _mean_std([case["lesion_wise"][name] for case in cases]) for name in ("dice", "hd95_mm")}
    return {"cases": len(cases), "tumour_cases": len(with_tumour), "slice_protocol": pooled, "volume": volume,
            "lesion_wise": lesion_wise}


def verdict_reliability(
    probability: Sequence[float], unhealthy: Sequence[bool], tumour: Sequence[bool], uncertain: Sequence[bool]
) -> dict[str, Any]:
    """How one volume's slice verdicts fare where the reported unhealthy probability was decided or a toss-up.

    Args:
        probability: per slice, the calibration's unhealthy probability at its score.
        unhealthy: per slice, the verdict.
        tumour: per slice, whether the truth holds tumour.
        uncertain: per slice, whether its verdict was reported as uncertain.

    Returns:
        Counts and sums to pool over volumes: n_slices, n_tumour_slices, n_uncertain, confident_correct,
        uncertain_correct and squared_error (the Brier score's sum of (probability - truth)^2).
    """
    probability = np.asarray(probability, dtype=np.float64)
    unhealthy, tumour = np.asarray(unhealthy).astype(bool), np.asarray(tumour).astype(bool)
    is_uncertain = np.asarray(uncertain).astype(bool)
    if not probability.shape == unhealthy.shape == tumour.shape == is_uncertain.shape or probability.ndim != 1:
        raise ValueError(f"need one probability, verdict, truth and uncertainty flag per slice, got shapes "
                         f"{probability.shape}, {unhealthy.shape}, {tumour.shape}, {is_uncertain.shape}")
    correct = unhealthy == tumour
    return {
        "n_slices": int(probability.size),
        "n_tumour_slices": int(tumour.sum()),
        "n_uncertain": int(is_uncertain.sum()),
        "confident_correct": int((correct & ~is_uncertain).sum()),
        "uncertain_correct": int((correct & is_uncertain).sum()),
        "squared_error": float(((probability - tumour) ** 2).sum()),
    }


def aggregate_reliability(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool ``verdict_reliability`` over volumes: the uncertain share of slices, the verdict accuracy of the
    confident and of the uncertain slices (None without any), the Brier score, and the Brier score of a constant
    probability equal to the share of tumour slices (what a probability must beat to carry information)."""
    total = {key: sum(case[key] for case in cases) for key in
             ("n_slices", "n_tumour_slices", "n_uncertain", "confident_correct", "uncertain_correct", "squared_error")}
    if not total["n_slices"]:
        raise ValueError("no slices to pool")
    confident = total["n_slices"] - total["n_uncertain"]
    tumour_share = total["n_tumour_slices"] / total["n_slices"]
    return {
        "n_slices": total["n_slices"],
        "uncertain_share": total["n_uncertain"] / total["n_slices"],
        "confident_accuracy": total["confident_correct"] / confident if confident else None,
        "uncertain_accuracy": total["uncertain_correct"] / total["n_uncertain"] if total["n_uncertain"] else None,
        "brier": total["squared_error"] / total["n_slices"],
        "brier_constant": tumour_share * (1.0 - tumour_share),
    }
