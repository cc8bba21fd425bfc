"""Baselines on the same model, data and post-processing as AnoFPDM (docs/method.md section 6).

- "flair-threshold": no network. The normalised FLAIR on the model grid is the anomaly map.
- "flair-zscore": no network. The map is each voxel's robust z-score of the FLAIR within its own volume's brain
  (``anofpdm.method.decisions.robust_z_scores``: the median and 1.4826 x MAD the per-volume decision rule judges
  its anomaly map by), thresholded at a fixed z* (``FixedThreshold.value``). The z-score is taken on the input
  volume, over its brain as the slicing defines it (voxels where any of the model's sequences is above zero, the
  brain the model-grid slices keep), and then resampled onto the model grid like the images, where the same
  filters as AnoFPDM's follow. Not on the model-grid slices themselves: they clip the FLAIR at its 99th brain
  percentile, which capped the tumour's z-score at about 3.5 on two in-domain validation cases (90th percentile of
  the tumour's z unclipped: 4.8 and 7.4) and would make the baseline weaker than the rule it stands for.
- "anoddpm-reconstruction" (AnoDDPM-style, Gaussian noise): noise every slice to one fixed step t,
  decode it back to t = 0 with the unguided (null-label) network by deterministic DDIM steps, and finish
  with the network's clean-image prediction at t = 0. The map is the squared reconstruction error.
- "cfg-ddim" (classifier-free-guidance DDIM): DDIM-encode each slice with the null label from
  t = 0 (the slice itself) up to a fixed step, decode it back with the healthy-guided prediction
  (weight w), finish with the guided clean-image prediction at t = 0. The map is the squared error.

Network maps are the squared error averaged over the map sequences (FLAIR and T2). Every baseline
thresholds its map once per volume with a fixed rule (a quantile of the map over the volume's brain
pixels, or a fixed value), then gets the pipeline's 3-D post-processing: median filter, threshold,
removal of small components, mapping back onto the input grid. A baseline has no slice classifier: a
slice is called unhealthy when its final mask is not empty. Results have the pipeline's form
(``SegmentationResult`` with ``ModelGridOutputs``), so evaluation treats every method alike. The maps
(``baseline_maps``) are kept apart from thresholding (``finish_baseline``) so that a threshold can be
tuned on validation cases without recomputing them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch

from anofpdm.method.decisions import robust_z_scores
from anofpdm.method.diffusion import NoiseSchedule, SliceNoise
from anofpdm.method.model import MAP_SEQUENCES, NULL_LABEL, LoadedModel
from anofpdm.method.forward_process import guided_and_null_noise
from anofpdm.method.pipeline import (
    InferenceOptions,
    ModelGridOutputs,
    PeriventricularFilter,
    SegmentationResult,
    default_median_kernel,
    finish_on_input_grid,
    input_anatomy,
    slices_holding,
)
from anofpdm.method.periventricular import PERIVENTRICULAR_FINDINGS
from anofpdm.method.postprocess import LESION_HOLES, median_filter_3d
from anofpdm.volumes.bias_field import BIAS_CORRECTIONS, correct_bias_fields
from anofpdm.volumes.brain_extraction import apply_brain, extract_brain
from anofpdm.volumes.slicing import (
    BACKGROUND,
    VolumeGeometry,
    brain_pixels,
    image_like,
    to_model_grid,
    to_model_slices,
)

__all__ = [
    "BASELINES",
    "FLAIR_ZSCORE",
    "FixedThreshold",
    "default_threshold",
    "BaselineOptions",
    "BaselineMaps",
    "decoding_steps",
    "ddim_encode",
    "ddim_decode",
    "reconstruct_from_noise",
    "reconstruct_guided",
    "baseline_maps",
    "finish_baseline",
    "run_baseline",
]

DEFAULT_QUANTILE = 0.99  # the FLAIR baseline's usual 99th percentile; tune on validation cases
FLAIR_ZSCORE = "flair-zscore"
DEFAULT_FLAIR_Z = 3.0  # a round z*, not tuned on anything: tune it on validation cases (evaluate --tune-split)
ANODDPM_NOISE_LEVEL = 250  # AnoDDPM's noise level: 250 of 1000 steps
CFG_NOISE_LEVEL = 500  # a setting for the CFG baseline, not from the paper: tune on validation cases
DEFAULT_DECODING_STRIDE = 10
DEFAULT_GUIDANCE = 2.0  # the paper's BraTS w
DEFAULT_BATCH_SIZE = 32
Reconstructor = Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]  # (x0, first slice index) -> (x, evals)
MapOutput = tuple[np.ndarray, int, dict[str, Any]]  # N x S x S maps, network evaluations, settings for the report


@dataclass(frozen=True)
class FixedThreshold:
    """One threshold per volume: a quantile of the raw map over the brain pixels, or a fixed map value.

    Args:
        quantile: in (0, 1): the map's quantile over the volume's brain pixels (0.99: the 99th percentile).
        value: a fixed map value instead (then ``quantile`` must be None).
    """

    quantile: float | None = DEFAULT_QUANTILE
    value: float | None = None

    def __post_init__(self) -> None:
        if (self.quantile is None) == (self.value is None):
            raise ValueError(
                f"give exactly one of quantile and value, got quantile={self.quantile}, value={self.value}"
            )
        if self.quantile is not None and not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")

    def resolve(self, raw_map: np.ndarray, brain: np.ndarray) -> float:
        """The threshold for one volume's N x S x S raw map and brain pixels."""
        if self.value is not None:
            return float(self.value)
        if not brain.any():
            raise ValueError("no brain pixel on the model grid: cannot take a brain quantile")
        return float(np.quantile(raw_map[brain], self.quantile))


@dataclass(frozen=True)
class BaselineOptions:
    """Settings of one baseline run.

    Args:
        threshold: the per-volume threshold rule.
        noise_level: the fixed step t the network baselines noise (or encode) to (None: the method's default,
            250 for the reconstruction baseline as in AnoDDPM, 500 for CFG).
        stride: DDIM step between visited timesteps while decoding (and encoding).
        guidance: guidance weight w of the CFG baseline's decoding.
        seed: noise seed (the reconstruction baseline's only random draw).
        min_lesion_mm3: connected components of this volume or less are removed.
        median_kernel: odd 3-D median kernel in voxels (None: the paper's 5 px at 128 px, scaled).
        lesion_holes: the holes a lesion encloses, filled or kept as the pipeline's ``InferenceOptions.lesion_holes``.
        batch_size: slices per network batch.
        bias_correction: each sequence divided by its N4 bias field first ("n4"), as the pipeline's
            ``InferenceOptions.bias_correction``, or not ("none": the baselines as defined).
        periventricular_findings: the periventricular findings left out of the mask or kept, as the pipeline's
            ``InferenceOptions.periventricular_findings`` (the same filter for every method).
    """

    threshold: FixedThreshold = field(default_factory=FixedThreshold)
    noise_level: int | None = None
    stride: int = DEFAULT_DECODING_STRIDE
    guidance: float = DEFAULT_GUIDANCE
    seed: int = InferenceOptions.seed
    min_lesion_mm3: float = InferenceOptions.min_lesion_mm3
    median_kernel: int | None = None
    lesion_holes: str = InferenceOptions.lesion_holes
    batch_size: int = DEFAULT_BATCH_SIZE
    bias_correction: str = BIAS_CORRECTIONS[0]
    periventricular_findings: str = InferenceOptions.periventricular_findings

    def __post_init__(self) -> None:
        if self.noise_level is not None and self.noise_level < 1:
            raise ValueError(f"noise_level must be >= 1, got {self.noise_level}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.min_lesion_mm3 < 0:
            raise ValueError(f"min_lesion_mm3 must be >= 0, got {self.min_lesion_mm3}")
        if self.median_kernel is not None and (self.median_kernel < 1 or self.median_kernel % 2 == 0):
            raise ValueError(f"median_kernel must be odd and positive, got {self.median_kernel}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lesion_holes not in LESION_HOLES:
            raise ValueError(f"lesion_holes must be one of {LESION_HOLES}, got {self.lesion_holes!r}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS}, got {self.bias_correction!r}")
        if self.periventricular_findings not in PERIVENTRICULAR_FINDINGS:
            raise ValueError(f"periventricular_findings must be one of {PERIVENTRICULAR_FINDINGS}, got "
                             f"{self.periventricular_findings!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def decoding_steps(noise_level: int, stride: int) -> list[int]:
    """Timesteps visited from ``noise_level`` down to 0: noise_level, noise_level - stride, ..., 0."""
    if noise_level < 0 or stride < 1:
        raise ValueError(f"need noise_level >= 0 and stride >= 1, got {noise_level}, {stride}")
    steps = list(range(noise_level, -1, -stride))
    return steps if steps[-1] == 0 else [*steps, 0]


def _labelled(network: torch.nn.Module, z: torch.Tensor, t: int, label: int) -> torch.Tensor:
    timesteps = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
    labels = torch.full((z.shape[0],), label, device=z.device, dtype=torch.long)
    return network(z, timesteps, class_labels=labels)


def _unguided(network: torch.nn.Module, z: torch.Tensor, t: int) -> torch.Tensor:
    """eps(z, t, null): one evaluation per slice."""
    return _labelled(network, z, t, NULL_LABEL)


def _guided(network: torch.nn.Module, z: torch.Tensor, t: int, guidance: float) -> torch.Tensor:
    """(1 + w) eps(z, t, healthy) - w eps(z, t, null), the two in one batch: two evaluations per slice."""
    return guided_and_null_noise(network, z, t, guidance)[0]


def ddim_encode(network: torch.nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """Deterministic DDIM inversion with the null label, from the clean slice at ``steps[0] = 0`` to ``steps[-1]``."""
    z = x0
    with torch.no_grad():
        for t, t_next in zip(steps[:-1], steps[1:]):
            z = schedule.ddim_step(z, _unguided(network, z, t), t, t_next)
    return z


def ddim_decode(
    schedule: NoiseSchedule,
    z: torch.Tensor,
    steps: list[int],
    noise_prediction: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """DDIM decoding through ``steps`` (descending to 0); the clean-image prediction at the last step, clipped.

    Args:
        schedule: the diffusion schedule.
        z: the noised slices at ``steps[0]``.
        steps: descending timesteps, the last one 0.
        noise_prediction: eps(z, t) (unguided or guided).
    """
    with torch.no_grad():
        for t, t_next in zip(steps[:-1], steps[1:]):
            z = schedule.ddim_step(z, noise_prediction(z, t), t, t_next)
        return schedule.predict_x0(z, noise_prediction(z, steps[-1]), steps[-1]).clamp(-1, 1)


def _check_noise_level(schedule: NoiseSchedule, noise_level: int) -> None:
    if not 1 <= noise_level < schedule.num_timesteps:
        raise ValueError(f"noise_level must be in [1, {schedule.num_timesteps}), got {noise_level}")


def reconstruct_from_noise(
    network: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    noise_level: int,
    stride: int,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """AnoDDPM-style reconstruction: ``noise`` (like ``x0``) to ``noise_level``, DDIM-decode with the null label.

    Returns:
        The reconstruction (B x C x S x S) and the single-slice network evaluations spent.
    """
    _check_noise_level(schedule, noise_level)
    steps = decoding_steps(noise_level, stride)
    z = schedule.add_noise(x0, noise, noise_level)
    reconstruction = ddim_decode(schedule, z, steps, lambda z, t: _unguided(network, z, t))
    return reconstruction, x0.shape[0] * len(steps)


def reconstruct_guided(
    network: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    noise_level: int,
    stride: int,
    guidance: float,
) -> tuple[torch.Tensor, int]:
    """CFG-DDIM reconstruction: null-label DDIM encoding to ``noise_level``, healthy-guided DDIM decoding.

    Returns:
        The reconstruction (B x C x S x S) and the single-slice network evaluations spent.
    """
    _check_noise_level(schedule, noise_level)
    steps = decoding_steps(noise_level, stride)
    z = ddim_encode(network, schedule, x0, steps[::-1])
    reconstruction = ddim_decode(schedule, z, steps, lambda z, t: _guided(network, z, t, guidance))
    return reconstruction, x0.shape[0] * ((len(steps) - 1) + 2 * len(steps))


def _error_maps(
    model: LoadedModel, slices: np.ndarray, options: BaselineOptions, reconstruct: Reconstructor
) -> tuple[np.ndarray, int]:
    """Squared reconstruction error averaged over the map sequences, per slice (N x S x S)."""
    channels = [model.config.sequences.index(s) for s in MAP_SEQUENCES]
    maps, evaluations = [], 0
    for begin in range(0, len(slices), options.batch_size):
        x0 = torch.from_numpy(slices[begin : begin + options.batch_size]).to(model.device)
        reconstruction, spent = reconstruct(x0, begin)
        maps.append(((reconstruction - x0)[:, channels] ** 2).mean(dim=1).cpu().numpy())
        evaluations += spent
    return np.concatenate(maps), evaluations


@dataclass(frozen=True)
class SlicedVolume:
    """One volume as the baselines see it: the input images, their model-grid slices and the mapping between."""

    images: Mapping[str, nib.spatialimages.SpatialImage]
    slices: np.ndarray
    geometry: VolumeGeometry


def _flair_maps(model: LoadedModel, volume: SlicedVolume, options: BaselineOptions) -> MapOutput:
    """The normalised FLAIR, back from [-1, 1] to the [0, 1] intensity scale (background 0, like off-grid voxels)."""
    flair = model.config.sequences.index(MAP_SEQUENCES[0])
    return (volume.slices[:, flair] - BACKGROUND) / (1.0 - BACKGROUND), 0, {}


def _flair_zscore_maps(model: LoadedModel, volume: SlicedVolume, options: BaselineOptions) -> MapOutput:
    """The input FLAIR's robust z-score within the input brain, resampled onto the model grid."""
    arrays = {name: np.ascontiguousarray(volume.images[name].dataobj, dtype=np.float32)
              for name in model.config.sequences}
    brain = np.any([array > 0 for array in arrays.values()], axis=0)
    z, median, spread = robust_z_scores(torch.from_numpy(arrays[MAP_SEQUENCES[0]]), torch.from_numpy(brain))
    settings = {"brain_flair_median": median, "brain_flair_spread": spread, "grid": "input, resampled"}
    return to_model_grid(z.float().numpy(), volume.geometry), 0, settings


def _reconstruction_maps(model: LoadedModel, volume: SlicedVolume, options: BaselineOptions) -> MapOutput:
    schedule = NoiseSchedule.from_dict(model.schedule, device=model.device)
    noise_level = options.noise_level or ANODDPM_NOISE_LEVEL

    def reconstruct(x0: torch.Tensor, begin: int) -> tuple[torch.Tensor, int]:
        noise = SliceNoise(options.seed, range(begin, begin + len(x0)), x0).draw()
        return reconstruct_from_noise(model.network, schedule, x0, noise_level, options.stride, noise)

    maps, evaluations = _error_maps(model, volume.slices, options, reconstruct)
    return maps, evaluations, {"noise_level": noise_level, "stride": options.stride, "seed": options.seed,
                               "decoding": "ddim, null label, clean-image prediction at t = 0"}


def _cfg_maps(model: LoadedModel, volume: SlicedVolume, options: BaselineOptions) -> MapOutput:
    schedule = NoiseSchedule.from_dict(model.schedule, device=model.device)
    noise_level = options.noise_level or CFG_NOISE_LEVEL

    def reconstruct(x0: torch.Tensor, begin: int) -> tuple[torch.Tensor, int]:
        return reconstruct_guided(model.network, schedule, x0, noise_level, options.stride, options.guidance)

    maps, evaluations = _error_maps(model, volume.slices, options, reconstruct)
    return maps, evaluations, {"noise_level": noise_level, "stride": options.stride, "guidance": options.guidance,
                               "encoding": "ddim, null label, from the clean slice", "decoding": "ddim, healthy-guided"}


MapFunction = Callable[[LoadedModel, SlicedVolume, BaselineOptions], MapOutput]
BASELINES: dict[str, MapFunction] = {
    "anoddpm-reconstruction": _reconstruction_maps,
    "cfg-ddim": _cfg_maps,
    "flair-threshold": _flair_maps,
    FLAIR_ZSCORE: _flair_zscore_maps,
}


def default_threshold(method: str) -> FixedThreshold:
    """A baseline's threshold rule when none is tuned: z >= ``DEFAULT_FLAIR_Z`` for the FLAIR z-score, the brain
    quantile ``DEFAULT_QUANTILE`` of the map for the others."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    return FixedThreshold(quantile=None, value=DEFAULT_FLAIR_Z) if method == FLAIR_ZSCORE else FixedThreshold()


@dataclass
class BaselineMaps:
    """A baseline's raw anomaly maps of one volume, before any threshold (computed once, thresholded many times).

    Attributes:
        method: the baseline's name (a key of ``BASELINES``).
        slices: N x C x S x S model-grid slices.
        geometry: the mapping between the input grid and the slices.
        raw_map: N x S x S anomaly map.
        network_evaluations: single-slice network evaluations spent.
        settings: the method's settings, for the report.
        timings: seconds spent slicing and mapping.
    """

    method: str
    slices: np.ndarray
    geometry: VolumeGeometry
    raw_map: np.ndarray
    network_evaluations: int
    settings: dict[str, Any]
    timings: dict[str, float]


def baseline_maps(
    method: str, model: LoadedModel, images: Mapping[str, nib.spatialimages.SpatialImage], options: BaselineOptions
) -> BaselineMaps:
    """Slice one volume onto the model grid and compute a baseline's raw anomaly maps.

    Args:
        method: a key of ``BASELINES``.
        model: the model (for the FLAIR baselines, only its grid: image size, field of view, standardisation).
        images: sequence name -> image, as for ``segment_volume``.
        options: the baseline's settings (the threshold rule is not used here).
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    config = model.config
    start = time.perf_counter()
    stripped, extraction = extract_brain(images, config.sequences, "auto", model.device)  # a head: its brain
    images = apply_brain(stripped, extraction, config.sequences)
    images, _ = correct_bias_fields(images, config.sequences, options.bias_correction)
    slices, geometry, _ = to_model_slices(images, config.sequences, config.image_size, config.field_of_view_mm,
                                          landmarks=config.landmarks)
    preprocess_s = time.perf_counter() - start
    start = time.perf_counter()
    raw_map, evaluations, settings = BASELINES[method](model, SlicedVolume(images, slices, geometry), options)
    timings = {"preprocess_s": preprocess_s, "network_s": time.perf_counter() - start}
    return BaselineMaps(method, slices, geometry, raw_map.astype(np.float32), evaluations, settings, timings)


def finish_baseline(
    maps: BaselineMaps,
    model: LoadedModel,
    images: Mapping[str, nib.spatialimages.SpatialImage],
    options: BaselineOptions,
) -> SegmentationResult:
    """Threshold and post-process a baseline's maps exactly as the pipeline does; only the map differs."""
    start = time.perf_counter()
    geometry = maps.geometry
    threshold = options.threshold.resolve(maps.raw_map, brain_pixels(maps.slices))
    kernel = options.median_kernel or default_median_kernel(model.config.image_size)
    filtered = median_filter_3d(maps.raw_map.transpose(1, 2, 0), kernel)  # S x S x N
    periventricular = None
    if options.periventricular_findings == "leave-out":
        periventricular = PeriventricularFilter(*input_anatomy(images, model.config.sequences))
    finished = finish_on_input_grid(filtered, filtered >= threshold, geometry, options.min_lesion_mm3,
                                    lesion_holes=options.lesion_holes, periventricular=periventricular)
    mask_input, map_input, lesions = finished.labels, finished.anomaly_map, finished.lesions
    unhealthy = slices_holding(mask_input, geometry)
    timings = {**maps.timings, "postprocess_s": time.perf_counter() - start}

    reference = images[MAP_SEQUENCES[0]]
    report = {
        "method": maps.method,
        "verdict": "unhealthy" if lesions else "healthy",
        "threshold": threshold,
        "lesions": lesions,
        "lesion_count": len(lesions),
        "total_volume_ml": round(sum(row["volume_ml"] for row in lesions), 3),
        "components_removed": finished.removed,
        "periventricular_findings": finished.periventricular_findings,
        "network_evaluations": maps.network_evaluations,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "settings": {**maps.settings, "threshold_rule": asdict(options.threshold),
                     "min_lesion_mm3": options.min_lesion_mm3, "median_kernel": kernel,
                     "lesion_holes": options.lesion_holes,
                     "periventricular_findings": options.periventricular_findings, "device": str(model.device)},
        "slices": {"segmented": len(geometry.slices), "unhealthy": int(unhealthy.sum())},
        "warnings": [],
    }
    n = len(maps.slices)
    grid = ModelGridOutputs(
        slices=maps.slices,
        raw_map=maps.raw_map,
        scores=np.full(n, np.nan, dtype=np.float32),  # no cosine score: no slice classifier
        unhealthy=unhealthy,
        thresholds=np.full(n, threshold, dtype=np.float32),
        geometry=geometry,
    )
    mask_image = image_like(reference, mask_input, np.uint8)
    return SegmentationResult(mask_image, image_like(reference, map_input, np.float32), report, grid)


def run_baseline(
    method: str,
    model: LoadedModel,
    images: Mapping[str, nib.spatialimages.SpatialImage],
    options: BaselineOptions | None = None,
) -> SegmentationResult:
    """Segment one volume with a baseline: its maps, then the pipeline's threshold and post-processing.

    Args:
        method: a key of ``BASELINES``.
        model: the model whose grid (and, except for the FLAIR baselines, network) the baseline uses.
        images: sequence name -> image, as for ``segment_volume``.
        options: the baseline's settings (default: ``BaselineOptions`` with the method's ``default_threshold``).

    Returns:
        The pipeline's result form: mask and map on the input grid, a report and the model-grid outputs.
    """
    options = options or BaselineOptions(threshold=default_threshold(method))
    return finish_baseline(baseline_maps(method, model, images, options), model, images, options)
