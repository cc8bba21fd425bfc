"""One volume in, tumour mask + anomaly map + report out: the code path of the app, the CLI and evaluation.

Steps: the brain out of a head (``brain_extraction``: FLAIR and T2 as the scanner wrote them), the other sequences
onto the FLAIR grid (``alignment``: resampled, registered when they do not line up),
input checks and slicing (``volume``), the forward process on all brain slices in chunks
(``forward_process``), the per-slice decisions (``decisions``), restacking with the 3-D median and
connected-component filters (``postprocess``), and the inverse mapping onto the input grid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch

from anofpdm.volumes.alignment import REGISTRATION_MODES, Alignment, align_sequences
from anofpdm.volumes.bias_field import BIAS_CORRECTIONS, BiasCorrection, correct_bias_fields
from anofpdm.volumes.brain_extraction import BRAIN_EXTRACTION_MODES, BrainExtraction, apply_brain, extract_brain
from anofpdm.method.decisions import (
    UNCERTAIN_PROBABILITY,
    Calibration,
    QuantileRule,
    VolumeRule,
    combine_maps,
    decide_by_volume,
    is_uncertain,
    slice_thresholds,
)
from anofpdm.method.forward_process import ForwardProcessConfig, SliceStatistics, run_on_slices
from anofpdm.method.model import MAP_SEQUENCES, LoadedModel
from anofpdm.method.periventricular import PERIVENTRICULAR_FINDINGS, PeriventricularRule, periventricular_lesions
from anofpdm.method.postprocess import (
    EDGE_CONTRAST,
    LABEL_NAMES,
    LESION_BOUNDARIES,
    LESION_LEVEL_QUANTILE,
    LESION_HOLES,
    TUMOUR,
    fill_lesion_holes,
    lesion_table,
    mark_uncertain_lesions,
    median_filter_3d,
    refine_lesion_boundaries,
    remove_small_components,
)
from anofpdm.progress import StageProgressCallback
from anofpdm.volumes.checks import InputError, as_3d
from anofpdm.volumes.slicing import (
    VolumeGeometry,
    brain_pixels,
    brain_voxels,
    image_like,
    slices_with_brain,
    to_input_grid,
    to_model_slices,
)

__all__ = ["InferenceOptions", "InputError", "ModelGridOutputs", "SegmentationResult", "ForwardOutputs", "run_forward",
           "SliceDecisions", "decide_slices", "segment_volume", "resolve_options", "LesionEdges",
           "PeriventricularFilter", "InputGridMask", "finish_on_input_grid", "slices_holding", "input_anatomy",
           "default_median_kernel", "default_batch_size"]

MAP_VARIANTS = ("mean", "end_step")
DECISION_RULES = ("volume", "paper")  # the default first
PAPER_MEDIAN_KERNEL = 5  # 5 x 5 at 128 px (1.875 mm): the paper's
PAPER_IMAGE_SIZE = 128


@dataclass(frozen=True)
class InferenceOptions:
    """What a user may set for one segmentation; ``None`` means "the model's calibrated value".

    Args:
        mode: a calibrated mode of the model ("fast" or "full"); it supplies the forward-process
            settings and the calibration constants.
        guidance, forward_steps, stride, encoding, early_stop: overrides of the mode's settings.
        seed: noise seed.
        min_lesion_mm3: connected components of this volume or less are removed.
        median_kernel: odd 3-D median kernel in voxels (None: the paper's 5 px at 128 px, scaled).
        lesion_holes: the holes a lesion encloses on the model grid, filled before the component filter ("3d",
            "axial") or kept ("keep"): ``anofpdm.method.postprocess.fill_lesion_holes``.
        lesion_boundary: where each lesion's edge is drawn: "half-contrast" (on the input grid, halfway between its
            FLAIR and the surrounding brain's, within one network pixel of the network grid's mask:
            ``anofpdm.method.postprocess.refine_lesion_boundaries``) or "model-grid" (the network grid's mask
            resampled).
        batch_size: slices per network batch (None: 8 on CPU, 64 on CUDA).
        bf16: run the network under bfloat16 autocast (fast on recent GPUs; calibrated in float32).
        map_variant: "mean" (docs/method.md section 4: mean error before t_e) or "end_step" (the paper's
            S_te variant: the error at t_e alone).
        mark_uncertain: label lesions whose unhealthy probability stays below the confident level
            (``UNCERTAIN_PROBABILITY[1]``) as "tumour (uncertain)" (2) instead of "tumour" (1); needs a
            calibration with unhealthy probabilities.
        decision_rule: "volume" (each pixel's map value and FLAIR judged against its own volume's, and a slice
            unhealthy when it holds a masked pixel: ``anofpdm.method.decisions.VolumeRule``) or "paper" (each slice's
            cosine score against the calibrated c*, and Algorithm 1's threshold).
        registration: rigid registration of the T2 (and other sequences) to the FLAIR: "auto" (when their
            brain regions do not line up), "always" or "never" (``anofpdm.volumes.alignment``); a sequence on another
            grid is resampled onto the FLAIR's in every case.
        brain_extraction: "auto" (the brain is extracted from a head, a skull-stripped brain used as it is),
            "always" or "never" (``anofpdm.volumes.brain_extraction``).
        min_brain_fraction: slices whose brain area is below this fraction of the volume's largest slice's (the
            brain's top and bottom) are not run through the network: no mask there, a zero map; 0 visits all.
        bias_correction: "none" (the default) or "n4": each sequence divided by its N4 bias field, fitted in the
            brain (``anofpdm.volumes.bias_field``).
        periventricular_findings: "leave-out" (the default: thin lesions lining the ventricles are reported as
            periventricular findings, not as tumour: ``anofpdm.method.periventricular``) or "keep".
    """

    mode: str = "fast"
    guidance: float | None = None
    forward_steps: int | None = None
    stride: int | None = None
    encoding: str | None = None
    early_stop: int | None = None
    seed: int = 0
    min_lesion_mm3: float = 500.0
    median_kernel: int | None = None
    lesion_holes: str = LESION_HOLES[0]
    lesion_boundary: str = LESION_BOUNDARIES[0]
    batch_size: int | None = None
    bf16: bool = False
    map_variant: str = "mean"
    mark_uncertain: bool = True
    decision_rule: str = "volume"
    registration: str = "auto"
    brain_extraction: str = "auto"
    # the top and bottom slices under a tenth of the largest slice's brain: 7 and 6 % of the test slices of the
    # in-domain and shifted sets, their 3-D Dice unchanged (docs/performance.md, "Visiting less")
    min_brain_fraction: float = 0.1
    bias_correction: str = BIAS_CORRECTIONS[0]
    periventricular_findings: str = PERIVENTRICULAR_FINDINGS[0]

    def __post_init__(self) -> None:
        for name, choices in (("registration", REGISTRATION_MODES), ("map_variant", MAP_VARIANTS),
                              ("decision_rule", DECISION_RULES), ("brain_extraction", BRAIN_EXTRACTION_MODES),
                              ("lesion_holes", LESION_HOLES), ("lesion_boundary", LESION_BOUNDARIES),
                              ("bias_correction", BIAS_CORRECTIONS),
                              ("periventricular_findings", PERIVENTRICULAR_FINDINGS)):
            if getattr(self, name) not in choices:
                raise InputError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.min_lesion_mm3 < 0:
            raise InputError(f"min_lesion_mm3 must be >= 0, got {self.min_lesion_mm3}")
        if self.median_kernel is not None and (self.median_kernel < 1 or self.median_kernel % 2 == 0):
            raise InputError(f"median_kernel must be odd and positive, got {self.median_kernel}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.min_brain_fraction < 1.0:  # NaN too
            raise InputError(f"min_brain_fraction must lie in [0, 1), got {self.min_brain_fraction}")


@dataclass
class ModelGridOutputs:
    """Per-slice results on the network grid (N brain slices of S x S), for slice-level evaluation.

    Attributes:
        slices: N x C x S x S network input.
        raw_map: N x S x S combined anomaly map before any median filter.
        scores: N slice scores the verdict rests on, low = unhealthy: the cosine scores (paper's rule) or minus
            each slice's highest robust z-score of the map (volume rule, ``anofpdm.method.decisions.VolumeDecisions``).
        unhealthy: N slice verdicts.
        thresholds: N thresholds (tau; with the volume rule at least the volume's map floor).
        geometry: the mapping between the input grid and these slices.
        eligible: N x S x S pixels the decision rule may mask (None: all).
    """

    slices: np.ndarray
    raw_map: np.ndarray
    scores: np.ndarray
    unhealthy: np.ndarray
    thresholds: np.ndarray
    geometry: VolumeGeometry
    eligible: np.ndarray | None = None


@dataclass
class SegmentationResult:
    """Mask, anomaly map and brain mask on the input grid, the JSON-ready report, the model-grid outputs, and the
    periventricular findings left out of the mask (None: not looked for)."""

    mask: nib.Nifti1Image
    anomaly_map: nib.Nifti1Image
    report: dict[str, Any] = field(default_factory=dict)
    model_grid: ModelGridOutputs | None = None
    brain_mask: nib.Nifti1Image | None = None
    periventricular_mask: nib.Nifti1Image | None = None


def resolve_options(
    model: LoadedModel, options: InferenceOptions
) -> tuple[ForwardProcessConfig, Calibration, list[str]]:
    """The forward-process settings and calibration for ``options``, and warnings about overrides."""
    modes = model.calibration or {}
    if options.mode not in modes:
        raise InputError(
            f"model {model.path} has no calibration for mode {options.mode!r} "
            f"(calibrated modes: {sorted(modes) or 'none; run anofpdm calibrate'})"
        )
    calibration = Calibration.from_dict(modes[options.mode])
    if calibration.outdated:
        raise InputError(
            f"model {model.path}: mode {options.mode!r} was calibrated with an earlier forward process whose early "
            "stop ended whole batches; its c* does not fit this version's scores. Recalibrate: anofpdm calibrate "
            f"--model {model.path} --data <prepared slices> --modes {options.mode}"
        )
    settings = {
        "guidance": calibration.guidance,
        "forward_steps": calibration.forward_steps,
        "stride": calibration.stride,
        "encoding": calibration.encoding,
        "early_stop": calibration.early_stop,
    }
    warnings = []
    if not calibration.unhealthy_frequency:
        warnings.append(f"mode {options.mode!r} was calibrated before unhealthy probabilities were recorded, so "
                        "no uncertain slices are reported; recalibrate for them "
                        f"(anofpdm calibrate --modes {options.mode})")
    for name in settings:
        value = getattr(options, name)
        if value is not None and value != settings[name]:
            warnings.append(f"{name}={value} differs from the {settings[name]} the model was calibrated at: "
                            "the verdict and threshold may be off")
            settings[name] = value
    try:
        forward = ForwardProcessConfig(seed=options.seed, **settings)
    except ValueError as exc:  # an override out of range: the user's request, not a bug
        raise InputError(str(exc)) from exc
    return forward, calibration, warnings


def default_median_kernel(image_size: int) -> int:
    """The paper's 5 px kernel at 128 px, scaled to ``image_size`` (odd, at least 3)."""
    scaled = int(round(PAPER_MEDIAN_KERNEL * image_size / PAPER_IMAGE_SIZE))
    return max(3, scaled + (scaled + 1) % 2)


@dataclass
class ForwardOutputs:
    """The network part of one segmentation, before any per-slice decision.

    Attributes:
        slices: N x C x S x S network input.
        geometry: the mapping between the input grid and the slices.
        forward: the forward-process settings used.
        calibration: the mode's calibration.
        stats: the forward process's per-slice statistics.
        warnings: warnings about overridden settings and large alignment corrections.
        timings: "brain_extraction_s", "alignment_s", "bias_correction_s", "preprocess_s" and "network_s".
        alignment: what was done to each sequence besides the FLAIR to put it on the FLAIR grid.
        brain_extraction: what brain extraction did, and the brain mask on the FLAIR grid.
        visited: N booleans, the slices run through the network (``InferenceOptions.min_brain_fraction``); None: all.
        flair: the FLAIR on its own (the output) grid as the network's input was made from it (brain only when
            the brain was extracted), float32; None where not kept.
        brain: the brain voxels on that grid (any of the model's sequences above zero); None where not kept.
        bias_correction: what the bias-field correction did; None where not kept.
    """

    slices: np.ndarray
    geometry: VolumeGeometry
    forward: ForwardProcessConfig
    calibration: Calibration
    stats: SliceStatistics
    warnings: list[str]
    timings: dict[str, float]
    alignment: dict[str, Alignment] = field(default_factory=dict)
    brain_extraction: BrainExtraction | None = None
    visited: np.ndarray | None = None
    flair: np.ndarray | None = None
    brain: np.ndarray | None = None
    bias_correction: BiasCorrection | None = None


def run_forward(
    model: LoadedModel,
    images: Mapping[str, nib.spatialimages.SpatialImage],
    options: InferenceOptions,
    progress: StageProgressCallback | None = None,
) -> ForwardOutputs:
    """Brain extraction, alignment, input checks, slicing and the forward process of ``segment_volume``: everything
    but the decisions.

    ``options.map_variant`` plays no part here, so the map variants of one setting can share the result.
    """
    config = model.config
    missing_maps = [name for name in MAP_SEQUENCES if name not in config.sequences]
    if missing_maps:
        raise ValueError(f"model sequences {config.sequences} lack {missing_maps} needed for the anomaly maps")
    forward, calibration, warnings = resolve_options(model, options)
    images, extraction = extract_brain(images, config.sequences, options.brain_extraction, model.device)
    start = time.perf_counter()
    images, alignment = align_sequences(images, config.sequences, options.registration)
    images = apply_brain(images, extraction, config.sequences)
    warnings += extraction.warnings + [warning for record in alignment.values() for warning in record.warnings]
    alignment_s = time.perf_counter() - start
    images, bias = correct_bias_fields(images, config.sequences, options.bias_correction)
    start = time.perf_counter()
    slices, geometry, _ = to_model_slices(images, config.sequences, config.image_size, config.field_of_view_mm,
                                          landmarks=config.landmarks)
    preprocess_s = time.perf_counter() - start

    start = time.perf_counter()
    batch = options.batch_size or default_batch_size(model.device)
    report_step = None if progress is None else (lambda done, total: progress("forward process", done, total))
    visited = slices_with_brain(slices, options.min_brain_fraction)
    # each visited slice keeps its noise (seeded by its index among all slices): its statistics are those of a full run
    stats = run_on_slices(model, slices[visited], forward, batch, report_step, bf16=options.bf16,
                          slice_indices=np.flatnonzero(visited)).scattered(visited)
    timings = {"brain_extraction_s": extraction.time_s, "alignment_s": alignment_s, "bias_correction_s": bias.time_s,
               "preprocess_s": preprocess_s, "network_s": time.perf_counter() - start}
    flair, brain = input_anatomy(images, config.sequences)
    return ForwardOutputs(slices, geometry, forward, calibration, stats, warnings, timings, alignment, extraction,
                          visited, flair, brain, bias)


def input_anatomy(
    images: Mapping[str, nib.spatialimages.SpatialImage], sequences: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The FLAIR (``sequences[0]``) and the brain voxels (any sequence above zero) on the input grid, as the lesion
    edges and the periventricular findings read them."""
    return as_3d(sequences[0], images[sequences[0]]), brain_voxels(as_3d(name, images[name]) for name in sequences)


def segment_volume(
    model: LoadedModel,
    images: Mapping[str, nib.spatialimages.SpatialImage],
    options: InferenceOptions | None = None,
    progress: StageProgressCallback | None = None,
    forward_outputs: ForwardOutputs | None = None,
    volume_rule: VolumeRule | None = None,
) -> SegmentationResult:
    """Segment the tumour in one FLAIR + T2 (+ other) volume set: heads as the scanner wrote them, or brains.

    Args:
        model: a calibrated model (``anofpdm.method.model.load_model``).
        images: sequence name -> image; must hold the model's sequences. The FLAIR's grid is the output grid;
            the others are resampled onto it and registered to it as ``options.registration`` says.
        options: mode and overrides.
        progress: called with (stage, done, total) as the forward process advances.
        forward_outputs: ``run_forward(model, images, options)`` already computed (e.g. for another map
            variant of the same options); None computes it.
        volume_rule: the per-volume rule's settings (None: ``VolumeRule()``'s defaults).

    Returns:
        label map (uint8: tumour = 1, tumour (uncertain) = 2) and anomaly map (float32) on the FLAIR grid,
        and the report.

    Raises:
        InputError: the inputs cannot be segmented (missing sequence, NaN, empty, not overlapping...).
    """
    options = options or InferenceOptions()
    outputs = forward_outputs or run_forward(model, images, options, progress)
    stats, geometry = outputs.stats, outputs.geometry
    start = time.perf_counter()
    decided = decide_slices(model, outputs, options, volume_rule)
    probability = outputs.calibration.unhealthy_probability(stats.scores)
    edges, periventricular = None, None
    if options.lesion_boundary == "half-contrast" or options.periventricular_findings == "leave-out":
        if outputs.flair is None or outputs.brain is None:
            raise ValueError("the lesion edges and the periventricular findings need the forward outputs' FLAIR and "
                             "brain")
    if options.lesion_boundary == "half-contrast":
        edges = LesionEdges(outputs.flair, outputs.brain, max(geometry.spacing_mm[:2]))
    if options.periventricular_findings == "leave-out":
        periventricular = PeriventricularFilter(outputs.flair, outputs.brain)
    finished = finish_on_input_grid(
        decided.filtered_map, decided.candidate, geometry, options.min_lesion_mm3, probability, options.mark_uncertain,
        options.lesion_holes, edges, periventricular,
    )
    labels_input, map_input = finished.labels, finished.anomaly_map
    unhealthy = decided.unhealthy
    if options.decision_rule == "volume":  # its verdict: the slice's plane holds a lesion of the mask returned
        unhealthy = torch.from_numpy(slices_holding(labels_input, geometry))
    timings = {**outputs.timings, "postprocess_s": time.perf_counter() - start}

    mask_image = image_like(images[MAP_SEQUENCES[0]], labels_input, np.uint8)
    map_image = image_like(images[MAP_SEQUENCES[0]], map_input, np.float32)
    report = _report(model, options, outputs, probability, unhealthy, decided.thresholds, finished,
                     decided.median_kernel, timings)
    eligible = None if decided.eligible is None else decided.eligible.transpose(2, 0, 1)
    model_grid = ModelGridOutputs(outputs.slices, decided.raw_map.transpose(2, 0, 1), decided.slice_scores.numpy(),
                                  unhealthy.numpy(), decided.thresholds.numpy(), geometry, eligible)
    brain = outputs.brain_extraction
    brain_image = None if brain is None else image_like(images[MAP_SEQUENCES[0]], brain.mask, np.uint8)
    findings = finished.periventricular_mask
    findings_image = None if findings is None else image_like(images[MAP_SEQUENCES[0]], findings, np.uint8)
    return SegmentationResult(mask=mask_image, anomaly_map=map_image, report=report, model_grid=model_grid,
                              brain_mask=brain_image, periventricular_mask=findings_image)


@dataclass
class SliceDecisions:
    """The per-slice decisions on the restacked model grid (N slices of S x S).

    Attributes:
        unhealthy: N slice verdicts (paper's rule: score <= c*; volume rule: the slice holds a candidate pixel;
            ``segment_volume`` then reports a slice unhealthy when it holds a lesion that passed the component
            filter).
        thresholds: N thresholds (Algorithm 1's tau; volume rule: at least the volume's map floor).
        raw_map: S x S x N combined anomaly map of the options' map variant.
        filtered_map: ``raw_map`` after the 3-D median filter.
        candidate: S x S x N mask before the component filter (paper's rule: ``filtered_map >= tau`` on unhealthy
            slices only).
        median_kernel: the median kernel used.
        slice_scores: N scores the verdict rests on, low = unhealthy (``ModelGridOutputs.scores``).
        eligible: S x S x N pixels the rule may mask (None: all).
    """

    unhealthy: torch.Tensor
    thresholds: torch.Tensor
    raw_map: np.ndarray
    filtered_map: np.ndarray
    candidate: np.ndarray
    median_kernel: int
    slice_scores: torch.Tensor
    eligible: np.ndarray | None = None


def decide_slices(
    model: LoadedModel, outputs: ForwardOutputs, options: InferenceOptions, volume_rule: VolumeRule | None = None
) -> SliceDecisions:
    """Verdicts, thresholds and the gated mask from a forward process (docs/method.md section 4, 3-D median); the
    volume rule's settings are ``volume_rule`` (None: its defaults)."""
    stats, calibration = outputs.stats, outputs.calibration
    unhealthy = stats.scores <= calibration.cosine_threshold
    maps = stats.anomaly_maps if options.map_variant == "mean" else stats.end_step_maps
    thresholds = slice_thresholds(maps, stats.max_divergence, torch.tensor(calibration.max_divergence), QuantileRule())
    raw_map = combine_maps(maps).numpy().transpose(1, 2, 0)  # S x S x N
    kernel = options.median_kernel or default_median_kernel(model.config.image_size)
    filtered = median_filter_3d(raw_map, kernel)
    if options.decision_rule == "volume":
        brain = brain_pixels(outputs.slices)
        if outputs.visited is not None:  # slices left out of the network are no part of the volume's reference
            brain &= outputs.visited[:, None, None]
        brain = brain.transpose(1, 2, 0)
        channel = {name: torch.from_numpy(np.ascontiguousarray(outputs.slices[:, index].transpose(1, 2, 0)))
                   for index, name in enumerate(model.config.sequences)}  # S x S x N each
        volume = decide_by_volume(torch.from_numpy(filtered), torch.from_numpy(brain), channel[MAP_SEQUENCES[0]],
                                  thresholds, volume_rule or VolumeRule(), channel.get("t2"))
        candidate = volume.candidate.numpy()
        return SliceDecisions(torch.from_numpy(candidate.any(axis=(0, 1))), volume.thresholds, raw_map, filtered,
                              candidate, kernel, -volume.slice_z, volume.eligible.numpy())
    candidate = (filtered >= thresholds.numpy()[None, None, :]) & unhealthy.numpy()[None, None, :]
    return SliceDecisions(unhealthy, thresholds, raw_map, filtered, candidate, kernel, stats.scores)


@dataclass(frozen=True)
class LesionEdges:
    """What redraws the lesions' edges on the input grid (``anofpdm.method.postprocess.refine_lesion_boundaries``).

    Attributes:
        flair: the FLAIR on the input grid.
        brain: brain voxels on the input grid.
        reach_mm: how far an edge may move from the resampled mask: one network pixel.
        contrast, lesion_quantile: where the edge lies between the surroundings' and the lesion's FLAIR, and the
            lesion's level (``refine_lesion_boundaries``'s).
    """

    flair: np.ndarray
    brain: np.ndarray
    reach_mm: float
    contrast: float = EDGE_CONTRAST
    lesion_quantile: float = LESION_LEVEL_QUANTILE


@dataclass(frozen=True)
class PeriventricularFilter:
    """What leaves the periventricular findings out of a mask on the input grid
    (``anofpdm.method.periventricular.periventricular_lesions``).

    Attributes:
        flair: the FLAIR on the input grid.
        brain: brain voxels on the input grid.
        rule: the distance, share, thickness and tumour margin that make a finding.
    """

    flair: np.ndarray
    brain: np.ndarray
    rule: PeriventricularRule = PeriventricularRule()


class InputGridMask(NamedTuple):
    """A mask finished on the input grid (``finish_on_input_grid``).

    Attributes:
        mask: the filtered model-grid mask (the periventricular findings, judged on the input grid, still in it).
        labels: the input-grid label map (uint8, ``TUMOUR`` or ``UNCERTAIN_TUMOUR``).
        anomaly_map: the map on the input grid.
        lesions: the lesion table of ``labels``.
        removed: the number of components the size filters removed.
        periventricular_findings: the lesion table of the periventricular findings left out of ``labels``.
        periventricular_mask: those findings on the input grid (None: not looked for).
    """

    mask: np.ndarray
    labels: np.ndarray
    anomaly_map: np.ndarray
    lesions: list[dict[str, Any]]
    removed: int
    periventricular_findings: list[dict[str, Any]]
    periventricular_mask: np.ndarray | None


def slices_holding(labels: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Per model-grid slice, whether its plane of the input-grid label map holds a lesion (N booleans)."""
    planes = nib.orientations.apply_orientation(labels > 0, geometry.to_ras).any(axis=(0, 1))
    return planes[list(geometry.slices)].copy()


def finish_on_input_grid(
    filtered: np.ndarray,
    candidate: np.ndarray,
    geometry: VolumeGeometry,
    min_lesion_mm3: float,
    unhealthy_probability: torch.Tensor | None = None,
    mark_uncertain: bool = False,
    lesion_holes: str = InferenceOptions.lesion_holes,
    edges: LesionEdges | None = None,
    periventricular: PeriventricularFilter | None = None,
) -> InputGridMask:
    """Hole and component filters on the model grid, then label map and map onto the input grid, and the lesion
    table.

    Args:
        filtered: S x S x N median-filtered anomaly map.
        candidate: S x S x N thresholded (and, for AnoFPDM, verdict-gated) mask.
        geometry: the volume's model-grid mapping.
        min_lesion_mm3: components of at most this volume are removed.
        unhealthy_probability: optional N per-slice unhealthy probabilities: each lesion then gets the highest
            of its slices.
        mark_uncertain: with ``unhealthy_probability``, label lesions below the confident level
            ``UNCERTAIN_PROBABILITY[1]`` as ``UNCERTAIN_TUMOUR``.
        lesion_holes: how the holes a lesion encloses are filled, before the component filter so that a lesion's
            size counts its core (``anofpdm.method.postprocess.fill_lesion_holes``).
        edges: when given, each lesion's edge is redrawn on the input grid, and the holes and the component filter
            applied again there (None: the model grid's mask resampled).
        periventricular: when given, the periventricular findings are left out of the mask, last (None: kept).
    """
    mask, removed = remove_small_components(fill_lesion_holes(candidate, lesion_holes), geometry.spacing_mm,
                                            min_lesion_mm3)
    # resampling can leave a kept component smaller (cut by the field of view) or split off pieces of it: the
    # lesions the user gets are held to the same minimum on the input grid
    spacing_input = nib.affines.voxel_sizes(geometry.affine)
    mask_input, fragments = remove_small_components(
        to_input_grid(mask.astype(np.float32), geometry) >= 0.5, spacing_input, min_lesion_mm3
    )
    if edges is not None:
        redrawn = refine_lesion_boundaries(mask_input, edges.flair, edges.brain, spacing_input, edges.reach_mm,
                                           edges.contrast, edges.lesion_quantile)
        # holes filled in RAS order, so that "axial" fills axial planes whichever way the input is stored
        ras = fill_lesion_holes(nib.orientations.apply_orientation(redrawn, geometry.to_ras), lesion_holes)
        filled = nib.orientations.apply_orientation(ras, geometry.from_ras)
        mask_input, dropped = remove_small_components(filled, spacing_input, min_lesion_mm3)
        fragments += dropped
    map_input = to_input_grid(filtered, geometry)
    findings, left_out = [], None
    if periventricular is not None:
        left_out = periventricular_lesions(mask_input, periventricular.flair, periventricular.brain, spacing_input,
                                           periventricular.rule)
        if left_out.any():
            findings = lesion_table(left_out, map_input, geometry.affine)
            mask_input &= ~left_out
    labels_input = mask_input.astype(np.uint8) * TUMOUR
    probability_input = None
    if unhealthy_probability is not None:  # constant per slice, so each input plane gets its slice's value
        planes = np.broadcast_to(unhealthy_probability.numpy().astype(np.float32), filtered.shape)
        probability_input = to_input_grid(np.ascontiguousarray(planes), geometry)
        if mark_uncertain:
            labels_input = mark_uncertain_lesions(mask_input, probability_input, UNCERTAIN_PROBABILITY[1])
    lesions = lesion_table(labels_input, map_input, geometry.affine, probability_input)
    return InputGridMask(mask, labels_input, map_input, lesions, removed + fragments, findings, left_out)


def default_batch_size(device: torch.device) -> int:
    """Slices per network batch when the request names none."""
    # 2-core CPU, one volume's network time: batch 8 85-99 s, 32 88-89 s (docs/performance.md), for ~0.7 GB more memory
    return 64 if device.type == "cuda" else 8


def _report(
    model: LoadedModel,
    options: InferenceOptions,
    outputs: ForwardOutputs,
    probability: torch.Tensor | None,
    unhealthy: torch.Tensor,
    thresholds: torch.Tensor,
    finished: InputGridMask,
    kernel: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The JSON-ready description of one segmentation."""
    forward, calibration, geometry, stats = outputs.forward, outputs.calibration, outputs.geometry, outputs.stats
    scores, brain_extraction = stats.scores, outputs.brain_extraction
    visited = np.ones(len(scores), bool) if outputs.visited is None else outputs.visited
    lesions = finished.lesions
    total_ml = round(sum(row["volume_ml"] for row in lesions), 3)
    present = {row["label"] for row in lesions} or {TUMOUR}
    return {
        # the label map's values, only those it holds: Slicer names its segments by this, in value order
        "label_names": {name: value for name, value in LABEL_NAMES.items() if value in present},
        "verdict": "unhealthy" if lesions else "healthy",
        # the most anomalous slice's cosine score; slices at or below the threshold are unhealthy
        "score": float(scores.min()),
        "cosine_threshold": calibration.cosine_threshold,
        # how often validation slices at the volume's score were unhealthy, and the slices whose verdict is a
        # toss-up by that measure (None: the calibration predates it)
        "unhealthy_probability": None if probability is None else round(float(probability.max()), 4),
        "uncertain_slices": None if probability is None else int(is_uncertain(probability).sum()),
        "slices": {
            "segmented": len(geometry.slices),
            # run through the network; the others hold too little brain (settings' min_brain_fraction)
            "visited": int(visited.sum()),
            "unhealthy": int(unhealthy.sum()),
            "index": list(geometry.slices),
            "score": [round(float(v), 6) for v in scores],
            "unhealthy_flag": [bool(v) for v in unhealthy],
            "unhealthy_probability": None if probability is None else [round(float(v), 4) for v in probability],
            "threshold": [float(v) for v in thresholds],
            "end_step": {name: [int(v) for v in stats.end_steps[:, i]] for i, name in enumerate(MAP_SEQUENCES)},
            "visited_flag": [bool(v) for v in visited],
        },
        "lesions": lesions,
        "lesion_count": len(lesions),
        "total_volume_ml": total_ml,
        "components_removed": finished.removed,
        # lesions left out of the mask as periventricular findings (thin, lining the ventricles), not tumour
        "periventricular_findings": finished.periventricular_findings,
        "network_evaluations": stats.network_evaluations,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        # per sequence besides the FLAIR: used as is, resampled or registered onto the FLAIR grid, and how much
        "alignment": {name: record.to_dict() for name, record in outputs.alignment.items()},
        # whether the brain was extracted from a head, how, its volume and the time taken
        "brain_extraction": None if brain_extraction is None else brain_extraction.to_dict(),
        # N4 or none, the bias field's range in the brain per sequence, the time taken
        "bias_correction": None if outputs.bias_correction is None else outputs.bias_correction.to_dict(),
        "settings": {
            **asdict(forward),
            "mode": options.mode,
            "map_variant": options.map_variant,
            "decision_rule": options.decision_rule,
            "mark_uncertain": options.mark_uncertain and probability is not None,
            "registration": options.registration,
            "brain_extraction": options.brain_extraction,
            "bias_correction": options.bias_correction,
            "visited_steps": stats.visited_steps,
            "min_brain_fraction": options.min_brain_fraction,
            "min_lesion_mm3": options.min_lesion_mm3,
            "median_kernel": kernel,
            "lesion_holes": options.lesion_holes,
            "periventricular_findings": options.periventricular_findings,
            "model_grid_spacing_mm": [round(s, 4) for s in geometry.spacing_mm],
            "device": str(model.device),
            "precision": "bf16 autocast" if options.bf16 else "fp32",
        },
        "model": {
            "path": str(model.path) if model.path else None,
            "sequences": list(model.config.sequences),
            "image_size": model.config.image_size,
            "training_data": model.training.get("data_description", model.training.get("data")),
            "training_iterations": model.training.get("iterations"),
            # how well this mode's verdict did on the calibration's validation slices (None: not recorded)
            "calibration_validation": {key: calibration.validation.get(key)
                                       for key in ("slices", "accuracy", "device")},
        },
        "warnings": outputs.warnings,
        "notice": "Research software, not for clinical use. Assumes FLAIR and T2 of one examination.",
    }
