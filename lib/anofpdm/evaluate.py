"""Evaluate AnoFPDM variants and baselines on labelled volumes (docs/method.md section 6).

For every case (BraTS21, BraTS 2023, MSD Task01 or synthetic folders; truth = whole tumour, label > 0)
and method, this computes the paper's slice protocol on the model grid (per-slice Dice / IoU, "mixed"
and "unhealthy", AUPRC over brain pixels, slice verdict accuracy) and per-volume 3-D metrics on the
input grid (Dice, IoU, precision, recall, AUPRC, lesion-volume error, volume verdict accuracy). It writes
``results.json`` (per case and aggregated), ``results.md`` (a table) and PNG overlays of a few cases.

With a prepared data set (``anofpdm prepare``) only its held-out split is evaluated, and the baselines'
per-volume quantiles can be tuned on its validation split first (best mean 3-D Dice); otherwise they
keep their fixed defaults. AnoFPDM needs no tuning here: its c* and Dmax come from the model's calibration.

Each case's result is also stored as soon as it is done (``cases/<case>.json``, tagged with a key of the
model file, the methods, the settings and the library's code), so a long run that stops loses at most the case in
progress: ``resume=True`` (``--resume``) reuses the stored cases whose key matches and computes the rest.

Under torchrun (WORLD_SIZE > 1) the cases are sharded over the ranks (rank r takes cases r::world),
the per-case results are gathered to rank 0 (gloo on CPU, NCCL on GPU) and only rank 0 writes.
Each case's result does not depend on the rank that computed it (seeds are per case), so any number
of processes gives the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist

from anofpdm.baselines import (
    ANODDPM_NOISE_LEVEL,
    BASELINES,
    CFG_NOISE_LEVEL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DECODING_STRIDE,
    DEFAULT_GUIDANCE,
    DEFAULT_QUANTILE,
    BaselineOptions,
    FixedThreshold,
    baseline_maps,
    brain_pixels,
    finish_baseline,
    run_baseline,
)
from anofpdm.calibration import MODES
from anofpdm.data.brats import CaseFiles, find_cases, load_case
from anofpdm.data.slices import MANIFEST_NAME
from anofpdm.decisions import UNCERTAIN_PROBABILITY, is_uncertain, median_filter_2d
from anofpdm.metrics import (
    MM3_PER_ML,
    aggregate_cases,
    aggregate_reliability,
    dice,
    slice_protocol,
    verdict_reliability,
    volume_metrics,
)
from anofpdm.model import MAP_SEQUENCES, LoadedModel, NetworkConfig, load_model
from anofpdm.pipeline import (
    PAPER_IMAGE_SIZE,
    ForwardOutputs,
    InferenceOptions,
    SegmentationResult,
    default_median_kernel,
    run_forward,
    segment_volume,
)
from anofpdm.postprocess import remove_small_components
from anofpdm.progress import progress_bar
from anofpdm.train import distributed_context
from anofpdm.volume import VolumeGeometry, to_model_slices

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "SliceProtocol",
    "EvaluationSettings",
    "EvaluationCase",
    "prepare_case",
    "score_result",
    "run_method",
    "tune_thresholds",
    "source_digest",
    "run_key",
    "split_case_ids",
    "markdown_table",
    "render_overlay",
    "evaluate",
    "add_evaluate_arguments",
    "settings_from_args",
    "run_from_args",
]

ProgressCallback = Callable[[int, int], None]
PAPER_MIN_AREA_PX = 40.0  # the authors drop 2-D components of at most 40 px at 128 x 128
TRUTH_LEVEL = 0.5  # labels are resized, then thresholded at 0.5 (docs/method.md section 1)
RESULTS_JSON, RESULTS_MD, OVERLAY_DIR, CASE_DIR = "results.json", "results.md", "overlays", "cases"
TUNING_JSON = "tuning.json"  # the tuned baseline thresholds, reused by --resume
PACKAGE_ROOT = Path(__file__).resolve().parent  # the anofpdm sources, part of the resume key
DEFAULT_OVERLAY_CASES = 3
OVERLAY_DPI = 90
OVERLAY_TILE_INCHES = 2.6
TRUTH_COLOUR, PREDICTION_COLOUR = "lime", "red"
PERCENT = 100.0

# AnoFPDM variants go through the pipeline; the mode supplies the calibrated settings (c*, Dmax, T_f, stride).
ANOFPDM_VARIANTS: dict[str, dict[str, str]] = {
    **{f"anofpdm-ddim-{mode}": {"mode": mode} for mode in ("fast", "full")},
    # the DDPM forward encoding, with its own calibration (modes "fast-ddpm", "full-ddpm")
    **{f"anofpdm-ddpm-{mode}": {"mode": f"{mode}-ddpm"} for mode in ("fast", "full")},
    # the paper's S_te map: the error at the end step alone
    **{f"anofpdm-ste-{mode}": {"mode": mode, "map_variant": "end_step"}
       for mode in ("fast", "full")},
}
BASELINE_DESCRIPTIONS = {
    "anoddpm-reconstruction": "AnoDDPM-style: Gaussian noise to a fixed t, null-label DDIM decoding, squared error",
    "cfg-ddim": "classifier-free guidance: null-label DDIM encoding, healthy-guided DDIM decoding, squared error",
    "flair-threshold": "normalised FLAIR above a per-volume brain percentile (no network)",
}
METHODS: dict[str, str] = {
    **{name: f"AnoFPDM, {MODES[v['mode']].encoding.upper()} forward, mode {v['mode']}"
       + (", S_te map (error at t_e)" if "map_variant" in v else "") for name, v in ANOFPDM_VARIANTS.items()},
    **BASELINE_DESCRIPTIONS,
}
DEFAULT_METHODS = ("anofpdm-ddim-fast", "anoddpm-reconstruction", "cfg-ddim", "flair-threshold")
DEFAULT_TUNE_QUANTILES = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
DEFAULT_SPLIT = "test"


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


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything besides the model and the data that decides the numbers.

    Args:
        seed: noise seed of every method.
        min_lesion_mm3: 3-D components of at most this volume are removed (every method).
        batch_size: slices per network batch (None: the pipeline's default for AnoFPDM).
        baseline_stride: DDIM step of the network baselines' encoding / decoding.
        anoddpm_noise_level: the fixed step t of the reconstruction baseline.
        cfg_noise_level: the encoding depth of the CFG baseline.
        cfg_guidance: the CFG baseline's guidance weight w.
        thresholds: each baseline's per-volume threshold rule (see ``tune_thresholds``).
        slice_protocol: the 2-D post-processing of the slice protocol.
        overlay_cases: overlays are drawn for this many cases (the first in case-id order).
    """

    seed: int = 0
    min_lesion_mm3: float = InferenceOptions.min_lesion_mm3
    batch_size: int | None = None
    baseline_stride: int = DEFAULT_DECODING_STRIDE
    anoddpm_noise_level: int = ANODDPM_NOISE_LEVEL
    cfg_noise_level: int = CFG_NOISE_LEVEL
    cfg_guidance: float = DEFAULT_GUIDANCE
    thresholds: dict[str, FixedThreshold] = field(default_factory=lambda: {m: FixedThreshold() for m in BASELINES})
    slice_protocol: SliceProtocol = field(default_factory=SliceProtocol)
    overlay_cases: int = DEFAULT_OVERLAY_CASES

    def __post_init__(self) -> None:
        if self.overlay_cases < 0:
            raise ValueError(f"overlay_cases must be >= 0, got {self.overlay_cases}")
        missing = sorted(set(BASELINES) - set(self.thresholds))
        if missing:
            raise ValueError(f"thresholds lack a rule for {missing}")

    def baseline_options(self, method: str) -> BaselineOptions:
        """The ``BaselineOptions`` of one baseline."""
        noise_levels = {"cfg-ddim": self.cfg_noise_level, "anoddpm-reconstruction": self.anoddpm_noise_level}
        return BaselineOptions(threshold=self.thresholds[method], noise_level=noise_levels.get(method),
                               stride=self.baseline_stride, guidance=self.cfg_guidance, seed=self.seed,
                               min_lesion_mm3=self.min_lesion_mm3, batch_size=self.batch_size or DEFAULT_BATCH_SIZE)

    def inference_options(self, method: str) -> InferenceOptions:
        """The pipeline's ``InferenceOptions`` of one AnoFPDM variant."""
        return InferenceOptions(**ANOFPDM_VARIANTS[method], seed=self.seed, min_lesion_mm3=self.min_lesion_mm3,
                                batch_size=self.batch_size)


@dataclass
class EvaluationCase:
    """One labelled case, ready for every method.

    Attributes:
        case_id: the case identifier.
        images: the model's sequences as images on the case's (RAS) grid.
        truth: whole-tumour mask on the input grid.
        brain: brain voxels on the input grid (any sequence above zero).
        voxel_mm3: input voxel volume.
        geometry: the model-grid geometry of the case.
        truth_slices: N x S x S whole-tumour mask on the model grid.
        brain_slices: N x S x S brain pixels on the model grid.
    """

    case_id: str
    images: dict[str, nib.Nifti1Image]
    truth: np.ndarray
    brain: np.ndarray
    voxel_mm3: float
    geometry: VolumeGeometry
    truth_slices: np.ndarray
    brain_slices: np.ndarray


def prepare_case(files: CaseFiles, config: NetworkConfig) -> EvaluationCase:
    """Load a case's sequences and truth, and resample the truth onto the model grid's slices."""
    volume = load_case(files, sequences=config.sequences, with_seg=True)
    images = {name: nib.Nifti1Image(volume.images[name], volume.affine) for name in config.sequences}
    truth = volume.mask.astype(bool)
    slices, geometry, extra = to_model_slices(images, config.sequences, config.image_size, config.field_of_view_mm,
                                              extra={"truth": truth})
    brain = np.zeros(truth.shape, dtype=bool)
    for array in volume.images.values():
        brain |= array > 0
    return EvaluationCase(
        case_id=files.case_id,
        images=images,
        truth=truth,
        brain=brain,
        voxel_mm3=float(abs(np.linalg.det(volume.affine[:3, :3]))),
        geometry=geometry,
        truth_slices=extra["truth"] >= TRUTH_LEVEL,
        brain_slices=brain_pixels(slices),
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
        {"slice": metrics.slice_protocol(...), "volume": metrics.volume_metrics(...), "reliability":
        metrics.verdict_reliability(...) of the reported unhealthy probabilities, None where there are none}
    """
    grid = result.model_grid
    if grid is None or tuple(grid.geometry.slices) != tuple(case.geometry.slices):
        raise ValueError(f"case {case.case_id}: the result's model-grid slices differ from the truth's")
    kernel, min_area = protocol.resolved(case.geometry.image_size)
    raw_map = torch.from_numpy(np.ascontiguousarray(grid.raw_map, dtype=np.float32))
    anomaly_map = median_filter_2d(raw_map, kernel).numpy()
    ungated = _drop_small_areas(anomaly_map >= grid.thresholds[:, None, None], min_area)
    slices = slice_protocol(ungated, anomaly_map, grid.unhealthy, case.truth_slices, case.brain_slices)
    mask = np.asanyarray(result.mask.dataobj) > 0
    scores = np.asanyarray(result.anomaly_map.dataobj)
    probability = result.report.get("slices", {}).get("unhealthy_probability")
    reliability = None if probability is None else verdict_reliability(
        probability, grid.unhealthy, case.truth_slices.any(axis=(1, 2)), is_uncertain(np.asarray(probability)))
    return {"slice": slices, "volume": volume_metrics(mask, scores, case.truth, case.brain, case.voxel_mm3),
            "reliability": reliability}


def run_method(
    method: str,
    model: LoadedModel,
    case: EvaluationCase,
    settings: EvaluationSettings,
    shared_forward: dict[InferenceOptions, ForwardOutputs] | None = None,
) -> SegmentationResult:
    """Segment one case with one named method.

    Args:
        shared_forward: the case's forward processes so far, keyed by their options with the map variant
            left at its default; AnoFPDM variants that differ only in the map (e.g. S_te) reuse one there
            and add theirs. None: nothing is shared.
    """
    if method in ANOFPDM_VARIANTS:
        options = settings.inference_options(method)
        if shared_forward is None:
            return segment_volume(model, case.images, options)
        key = replace(options, map_variant=InferenceOptions.map_variant)
        if key not in shared_forward:
            shared_forward[key] = run_forward(model, case.images, options)
        return segment_volume(model, case.images, options, forward_outputs=shared_forward[key])
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return run_baseline(method, model, case.images, settings.baseline_options(method))


def tune_thresholds(
    model: LoadedModel,
    cases: Sequence[EvaluationCase],
    methods: Sequence[str],
    settings: EvaluationSettings,
    quantiles: Sequence[float] = DEFAULT_TUNE_QUANTILES,
    progress: ProgressCallback | None = None,
) -> dict[str, dict[str, Any]]:
    """Choose each baseline's brain quantile on validation cases: the best mean per-volume 3-D Dice.

    Each case's maps are computed once and thresholded at every candidate. Ties go to the higher quantile.

    Args:
        model: the model.
        cases: validation cases; those with tumour are used.
        methods: baselines to tune (AnoFPDM variants are calibrated, not tuned, and are skipped).
        settings: the baselines' other settings.
        quantiles: candidate quantiles in (0, 1).
        progress: called with (baseline-case maps done, total).

    Returns:
        baseline -> {"quantile": chosen, "validation_dice": {quantile: mean Dice}, "cases": [ids]}.
    """
    with_tumour = [case for case in cases if case.truth.any()]
    if not with_tumour:
        raise ValueError("threshold tuning needs validation cases with tumour")
    candidates = [FixedThreshold(quantile=q) for q in quantiles]
    baselines = [m for m in methods if m in BASELINES]
    tuned, done = {}, 0
    for method in baselines:
        options = settings.baseline_options(method)
        scores: dict[float, list[float]] = {q: [] for q in quantiles}
        for case in with_tumour:
            maps = baseline_maps(method, model, case.images, options)
            for rule in candidates:
                result = finish_baseline(maps, model, case.images, replace(options, threshold=rule))
                scores[rule.quantile].append(dice(np.asanyarray(result.mask.dataobj) > 0, case.truth))
            done += 1
            if progress is not None:
                progress(done, len(baselines) * len(with_tumour))
        means = {q: float(np.mean(v)) for q, v in scores.items()}
        tuned[method] = {"quantile": max(quantiles, key=lambda q: (means[q], q)), "validation_dice": means,
                         "cases": [case.case_id for case in with_tumour]}
    return tuned


def _overlay_slice(case: EvaluationCase) -> int:
    """The axial slice with the most tumour (the middle brain slice without tumour)."""
    area = case.truth.sum(axis=(0, 1))
    if area.any():
        return int(area.argmax())
    brain_z = np.nonzero(case.brain.any(axis=(0, 1)))[0]
    return int(brain_z[len(brain_z) // 2])


def _overlay_payload(case: EvaluationCase, results: Mapping[str, SegmentationResult]) -> dict[str, Any]:
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


def _evaluate_case(
    files: CaseFiles, model: LoadedModel, methods: Sequence[str], settings: EvaluationSettings, overlay: bool,
    step: Callable[[], None],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Per-method metrics (and the overlay payload) of one case; a case that cannot be read is recorded as such."""
    try:
        case = prepare_case(files, model.config)
    except (ValueError, FileNotFoundError) as exc:  # unreadable or invalid case data: reported, not scored
        for _ in methods:
            step()
        return {"case": files.case_id, "error": str(exc)}, None
    record: dict[str, Any] = {
        "case": case.case_id,
        "truth_ml": float(case.truth.sum() * case.voxel_mm3 / MM3_PER_ML),
        "model_grid_slices": len(case.geometry.slices),
        "methods": {},
    }
    results: dict[str, SegmentationResult] = {}
    shared_forward: dict[InferenceOptions, ForwardOutputs] = {}
    for method in methods:
        start = time.perf_counter()
        result = run_method(method, model, case, settings, shared_forward)
        seconds = time.perf_counter() - start
        if method in ANOFPDM_VARIANTS:  # its whole cost, a forward process shared with another variant included
            seconds = sum(result.report["timings_s"].values())
        record["methods"][method] = {
            **score_result(result, case, settings.slice_protocol),
            "seconds": seconds,
            "network_evaluations": result.report["network_evaluations"],
            "warnings": result.report["warnings"],
        }
        results[method] = result
        step()
    return record, (_overlay_payload(case, results) if overlay else None)


def source_digest(root: Path = PACKAGE_ROOT) -> str:
    """A digest of the library's Python sources under ``root`` (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(model_path: Path, methods: Sequence[str], settings: EvaluationSettings) -> str:
    """What a stored case result depends on besides the case: the model file's bytes, the methods, the
    settings (the tuned thresholds included) and the library's code (a changed method must not be mixed with
    results of the old one)."""
    digest = hashlib.sha256(model_path.read_bytes())
    digest.update(source_digest().encode())
    scoring = asdict(replace(settings, overlay_cases=0))  # which cases are drawn changes no number
    digest.update(json.dumps({"methods": list(methods), "settings": scoring}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _store(path: Path, key: str, name: str, value: Any) -> None:
    """Write ``{"key": key, name: value}`` atomically (a stopped run leaves either the whole file or none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"key": key, name: value}, indent=1))
    tmp.replace(path)


def _stored(path: Path, key: str, name: str, what: str) -> Any:
    """The value ``_store`` wrote under the same key, else None; a damaged file is named, never overwritten."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not a stored {what} ({exc}); delete it to recompute it") from exc
    return stored.get(name) if stored.get("key") == key else None


def _store_case(case_dir: Path, key: str, record: dict[str, Any]) -> None:
    _store(case_dir / f"{record['case']}.json", key, "record", record)


def _stored_case(case_dir: Path, key: str, case_id: str) -> dict[str, Any] | None:
    """A scored record of ``case_id`` stored under the same key, else None (failures are always recomputed)."""
    record = _stored(case_dir / f"{case_id}.json", key, "record", "case result")
    return record if record is not None and "error" not in record else None


def _tuned_or_stored(
    model: LoadedModel,
    model_path: Path,
    tune_files: Sequence[CaseFiles],
    methods: Sequence[str],
    settings: EvaluationSettings,
    quantiles: Sequence[float],
    out_path: Path,
    resume: bool,
    progress: ProgressCallback | None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """The baselines' tuned thresholds: stored ones from an earlier run with the same model, baselines, settings,
    validation cases and candidates when resuming, else ``tune_thresholds`` (then stored). Also: were they reused."""
    baselines = [m for m in methods if m in BASELINES]
    identity = [run_key(model_path, baselines, settings), sorted(f.case_id for f in tune_files), list(quantiles)]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    path = out_path / TUNING_JSON
    stored = _stored(path, key, "tuned", "tuning") if resume else None
    if stored is not None:
        return stored, True
    cases = [prepare_case(files, model.config) for files in tune_files]
    tuned = json.loads(json.dumps(tune_thresholds(model, cases, baselines, settings, quantiles, progress)))
    out_path.mkdir(parents=True, exist_ok=True)
    _store(path, key, "tuned", tuned)
    return tuned, False  # through JSON either way: the same types whether stored or fresh


def _mean_of(per_case: Sequence[Mapping[str, Any]], key: str) -> float | None:
    return float(np.mean([c[key] for c in per_case])) if per_case else None


def _aggregate(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
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
        }
    return summary


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{PERCENT * value:.1f}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The aggregated results as a Markdown table (overlap metrics in %)."""
    header = ("| method | mixed Dice | mixed IoU | mixed AUPRC | unhealthy Dice | unhealthy IoU | unhealthy AUPRC "
              "| slice acc. | 3-D Dice | 3-D precision | 3-D recall | abs. volume error (mL) | volume acc. "
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
                                            "unhealthy_auprc", "slice_accuracy")]
        cells += [spread("dice"), spread("precision"), spread("recall"), spread("abs_volume_error_ml", 1.0),
                  _percent(v["volume_accuracy"]["mean"]), f"{result['seconds_per_case']:.1f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    notes = [
        "",
        "Slice protocol (model grid, paper): Dice / IoU averaged over all slices (mixed, gated by the slice verdict) "
        "or tumour slices (unhealthy, ungated); AUPRC over brain pixels, mean over cases with tumour; slice acc. = "
        "verdict accuracy. 3-D metrics: per volume on the input grid, mean ± std over cases with tumour; volume acc. "
        "over all cases. Baselines have no slice classifier: a slice is unhealthy when its final mask is not empty.",
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
    return "\n".join(lines + notes) + "\n"


def _gather(local: list[Any], world_size: int, is_main: bool) -> list[Any]:
    """Every rank's list, concatenated on rank 0 (``[]`` elsewhere)."""
    if world_size == 1:
        return local
    parts: list[Any] | None = [None] * world_size if is_main else None
    dist.gather_object(local, parts, dst=0)
    return [item for part in parts for item in part] if is_main else []


def _select_cases(cases: Sequence[CaseFiles], case_ids: Sequence[str] | None, data_dir: Path) -> list[CaseFiles]:
    """``cases`` restricted to ``case_ids`` (in case-id order), all of which must exist."""
    if case_ids is None:
        return list(cases)
    by_id = {case.case_id: case for case in cases}
    missing = sorted(set(case_ids) - set(by_id))
    if missing:
        raise ValueError(f"cases not found under {data_dir}: {missing}")
    return [by_id[case_id] for case_id in sorted(set(case_ids))]


def _broadcast(value: Any, world_size: int) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def evaluate(
    model_path: str | Path,
    data_dir: str | Path,
    methods: Sequence[str],
    out_path: str | Path,
    max_cases: int | None = None,
    progress: ProgressCallback | None = None,
    device: str | None = None,
    settings: EvaluationSettings | None = None,
    case_ids: Sequence[str] | None = None,
    tune_case_ids: Sequence[str] | None = None,
    tune_quantiles: Sequence[float] = DEFAULT_TUNE_QUANTILES,
    resume: bool = False,
    tune_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Evaluate methods on the labelled cases of a data folder and write the results.

    Args:
        model_path: a calibrated model checkpoint.
        data_dir: BraTS21 / BraTS 2023 / MSD Task01 / synthetic cases (with segmentations).
        methods: method names (``METHODS``).
        out_path: output folder: results.json, results.md, overlays/<case>.png.
        max_cases: only the first cases in case-id order.
        progress: called with (case-method runs done, total) on this rank.
        device: torch device (default: cuda:LOCAL_RANK if available, else CPU).
        settings: seeds, baseline settings, slice protocol, overlays.
        case_ids: evaluate only these cases (e.g. a prepared data set's test split).
        tune_case_ids: validation cases on which each baseline's quantile is chosen (``tune_thresholds``)
            before evaluation; must not overlap the evaluated cases.
        tune_quantiles: the candidate quantiles.
        resume: reuse the case results stored in ``out_path/cases`` by an earlier run with the same model
            file, methods and settings (cases drawn as overlays are recomputed: their images are not stored),
            and the tuned thresholds stored in ``out_path/tuning.json`` for the same validation cases.
        tune_progress: called with (validation maps done, total) while tuning.

    Returns:
        On rank 0 the results as written to results.json; ``{}`` on the other ranks.
    """
    settings = settings or EvaluationSettings()
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {', '.join(METHODS)}; got {methods}")
    if max_cases is not None and max_cases < 1:
        raise ValueError(f"max_cases must be >= 1, got {max_cases}")
    data_dir = Path(data_dir)
    found = find_cases(data_dir)
    cases = _select_cases(found, case_ids, data_dir)[:max_cases]
    tune_files = [] if tune_case_ids is None else _select_cases(found, tune_case_ids, data_dir)
    shared = sorted({c.case_id for c in tune_files} & {c.case_id for c in cases})
    if shared:
        raise ValueError(f"tuning and evaluation cases overlap: {shared}")
    out_path = Path(out_path)
    with distributed_context(device) as ctx:
        model = load_model(model_path, ctx.device)
        tuned, reused_tuning = None, False
        if tune_files and any(m in BASELINES for m in methods):
            if ctx.is_main:
                tuned, reused_tuning = _tuned_or_stored(model, Path(model_path), tune_files, methods, settings,
                                                        tune_quantiles, out_path, resume, tune_progress)
            tuned = _broadcast(tuned, ctx.world_size)
            chosen = {method: FixedThreshold(quantile=t["quantile"]) for method, t in tuned.items()}
            settings = replace(settings, thresholds={**settings.thresholds, **chosen})
        key = run_key(Path(model_path), methods, settings)
        case_dir = out_path / CASE_DIR
        case_dir.mkdir(parents=True, exist_ok=True)
        shard = list(range(ctx.rank, len(cases), ctx.world_size))
        done = 0
        total = len(shard) * len(methods)

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        records, payloads, reused = [], [], []
        for index in shard:
            overlay = index < settings.overlay_cases
            stored = _stored_case(case_dir, key, cases[index].case_id) if resume and not overlay else None
            if stored is not None:
                records.append(stored)
                reused.append(stored["case"])
                for _ in methods:
                    step()
                continue
            record, payload = _evaluate_case(cases[index], model, methods, settings, overlay, step)
            _store_case(case_dir, key, record)
            records.append(record)
            if payload is not None:
                payloads.append(payload)
        records = _gather(records, ctx.world_size, ctx.is_main)
        payloads = _gather(payloads, ctx.world_size, ctx.is_main)
        reused = _gather(reused, ctx.world_size, ctx.is_main)
        if not ctx.is_main:
            return {}
        records.sort(key=lambda r: r["case"])
        results = {
            "settings": {
                "model": str(model_path),
                "model_training_data": model.training.get("data_description", model.training.get("data")),
                "data": str(data_dir),
                "methods": methods,
                "cases": [case.case_id for case in cases],
                "world_size": ctx.world_size,
                "device": str(ctx.device),
                "image_size": model.config.image_size,
                **asdict(settings),
                "tuned_thresholds": tuned,
                "reused_tuning": reused_tuning,
                "run_key": key,
                "reused_cases": sorted(reused),
            },
            "summary": _aggregate(records, methods),
            "failed_cases": [{"case": r["case"], "error": r["error"]} for r in records if "error" in r],
            "cases": records,
        }
        (out_path / RESULTS_JSON).write_text(json.dumps(results, indent=2))
        (out_path / RESULTS_MD).write_text(markdown_table(results["summary"]))
        for payload in payloads:
            render_overlay(payload, out_path / OVERLAY_DIR / f"{payload['case']}.png")
        return results


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str) -> list[float]:
    return [float(v) for v in _csv(value)]


def split_case_ids(prepared: Path, split: str) -> list[str]:
    """The case ids of one split of a prepared data set (``anofpdm prepare``'s manifest.json)."""
    path = Path(prepared) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {prepared}: run anofpdm prepare first")
    splits = json.loads(path.read_text()).get("splits", {})
    if split not in splits:
        raise ValueError(f"{path} has no split {split!r} (splits: {sorted(splits)})")
    return list(splits[split]["cases"])


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``anofpdm evaluate``."""
    parser.add_argument("--model", type=Path, required=True, help="calibrated model checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="BraTS21 / BraTS2023 / MSD Task01 / synthetic cases")
    parser.add_argument("--methods", type=_csv, default=list(DEFAULT_METHODS),
                        help=f"comma list from: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, overlays/)")
    parser.add_argument("--prepared", type=Path,
                        help="prepared slices folder: evaluate only its --split cases (the model's held-out cases)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, help="with --prepared: the split to evaluate")
    parser.add_argument("--tune-split", help="with --prepared: tune the baselines' quantiles on this split (e.g. val)")
    parser.add_argument("--tune-quantiles", type=_floats, default=list(DEFAULT_TUNE_QUANTILES))
    parser.add_argument("--max-cases", type=int, help="only the first N cases in case-id order")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-lesion-mm3", type=float, default=InferenceOptions.min_lesion_mm3)
    parser.add_argument("--batch-size", type=int, help="slices per network batch")
    parser.add_argument("--baseline-stride", type=int, default=DEFAULT_DECODING_STRIDE,
                        help="DDIM step of the network baselines")
    parser.add_argument("--anoddpm-noise-level", type=int, default=ANODDPM_NOISE_LEVEL)
    parser.add_argument("--cfg-noise-level", type=int, default=CFG_NOISE_LEVEL)
    parser.add_argument("--cfg-guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--flair-quantile", type=float, default=DEFAULT_QUANTILE,
                        help="FLAIR baseline: brain quantile of the normalised FLAIR (0.99 = 99th percentile)")
    parser.add_argument("--error-quantile", type=float, default=DEFAULT_QUANTILE,
                        help="network baselines: brain quantile of the error map")
    parser.add_argument("--error-threshold", type=float, help="network baselines: a fixed error value instead")
    parser.add_argument("--slice-min-area-px", type=float,
                        help="slice protocol: drop 2-D components of at most this area (default: 40 px at 128, scaled)")
    parser.add_argument("--overlays", type=int, default=DEFAULT_OVERLAY_CASES, help="cases drawn as PNG overlays")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the case results stored in --out by an earlier run with the same model, "
                        "settings and code")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    """``EvaluationSettings`` from parsed ``add_evaluate_arguments`` options."""
    error = (FixedThreshold(quantile=None, value=args.error_threshold) if args.error_threshold is not None
             else FixedThreshold(quantile=args.error_quantile))
    thresholds = {method: error for method in BASELINES}
    thresholds["flair-threshold"] = FixedThreshold(quantile=args.flair_quantile)
    return EvaluationSettings(
        seed=args.seed, min_lesion_mm3=args.min_lesion_mm3, batch_size=args.batch_size,
        baseline_stride=args.baseline_stride, anoddpm_noise_level=args.anoddpm_noise_level,
        cfg_noise_level=args.cfg_noise_level, cfg_guidance=args.cfg_guidance, thresholds=thresholds,
        slice_protocol=SliceProtocol(min_area_px=args.slice_min_area_px), overlay_cases=args.overlays,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed options; rank 0 prints the table. Returns the exit status."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    if args.tune_split and not args.prepared:
        raise ValueError("--tune-split needs --prepared (the prepared data set whose splits name the cases)")
    case_ids = split_case_ids(args.prepared, args.split) if args.prepared else None
    tune_ids = split_case_ids(args.prepared, args.tune_split) if args.tune_split else None
    results = evaluate(args.model, args.data, args.methods, args.out, args.max_cases,
                       progress=progress_bar("evaluate", unit="run") if is_main else None, device=args.device,
                       settings=settings_from_args(args), case_ids=case_ids, tune_case_ids=tune_ids,
                       tune_quantiles=args.tune_quantiles, resume=args.resume,
                       tune_progress=progress_bar("tune thresholds", unit="map") if is_main else None)
    if is_main:
        print(markdown_table(results["summary"]))
        for failure in results["failed_cases"]:
            print(f"warning: case {failure['case']} not scored: {failure['error']}", file=sys.stderr)
        for method, tuned in (results["settings"]["tuned_thresholds"] or {}).items():
            print(f"{method}: quantile {tuned['quantile']} tuned on {len(tuned['cases'])} validation cases"
                  + (" (stored by an earlier run)" if results["settings"]["reused_tuning"] else ""))
        if results["settings"]["reused_cases"]:
            print(f"reused the stored results of {len(results['settings']['reused_cases'])} cases")
        print(f"wrote {args.out / RESULTS_JSON}, {args.out / RESULTS_MD}")
    return 0
