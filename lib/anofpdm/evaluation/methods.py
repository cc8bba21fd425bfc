"""The methods an evaluation compares (AnoFPDM variants and baselines), their settings, and one run of one
method on one case."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from anofpdm.evaluation.baselines import (
    ANODDPM_NOISE_LEVEL,
    BASELINES,
    CFG_NOISE_LEVEL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DECODING_STRIDE,
    DEFAULT_GUIDANCE,
    FLAIR_ZSCORE,
    BaselineOptions,
    FixedThreshold,
    default_threshold,
    run_baseline,
)
from anofpdm.method.calibration import MODES
from anofpdm.evaluation.case_scoring import EvaluationCase, SliceProtocol
from anofpdm.method.model import LoadedModel
from anofpdm.method.pipeline import ForwardOutputs, InferenceOptions, SegmentationResult, run_forward, segment_volume

__all__ = ["ANOFPDM_VARIANTS", "METHODS", "DEFAULT_METHODS", "EvaluationSettings", "run_method"]

DEFAULT_OVERLAY_CASES = 3
# AnoFPDM variants go through the pipeline; the mode supplies the calibrated settings (c*, Dmax, T_f, stride).
ANOFPDM_VARIANTS: dict[str, dict[str, str]] = {
    # the paper's method: each slice's verdict against c*, Algorithm 1's threshold
    **{f"anofpdm-ddim-{mode}": {"mode": mode, "decision_rule": "paper"} for mode in ("fast", "full")},
    # the DDPM forward encoding, with its own calibration (modes "fast-ddpm", "full-ddpm")
    **{f"anofpdm-ddpm-{mode}": {"mode": f"{mode}-ddpm", "decision_rule": "paper"} for mode in ("fast", "full")},
    # the paper's S_te map: the error at the end step alone
    **{f"anofpdm-ste-{mode}": {"mode": mode, "map_variant": "end_step", "decision_rule": "paper"}
       for mode in ("fast", "full")},
    # each pixel and slice judged against its own volume (anofpdm.method.decisions.VolumeRule; the app's default)
    **{f"anofpdm-volume-{mode}": {"mode": mode, "decision_rule": "volume"} for mode in ("fast", "full")},
}
BASELINE_DESCRIPTIONS = {
    "anoddpm-reconstruction": "AnoDDPM-style: Gaussian noise to a fixed t, null-label DDIM decoding, squared error",
    "cfg-ddim": "classifier-free guidance: null-label DDIM encoding, healthy-guided DDIM decoding, squared error",
    "flair-threshold": "normalised FLAIR above a per-volume brain percentile (no network)",
    FLAIR_ZSCORE: "FLAIR robust z-score within the volume's brain at least z*, the app's filters (no network)",
}
METHODS: dict[str, str] = {
    **{name: f"AnoFPDM, {MODES[v['mode']].encoding.upper()} forward, mode {v['mode']}"
       + (", S_te map (error at t_e)" if "map_variant" in v else "")
       + (", per-volume decision rule" if v["decision_rule"] == "volume" else ", paper's decision rule")
       for name, v in ANOFPDM_VARIANTS.items()},
    **BASELINE_DESCRIPTIONS,
}
# the app's default (per-volume rule) and the paper's rule share one forward process per case; the network-free
# per-volume FLAIR z-score is the bar the per-volume rule must clear
DEFAULT_METHODS = ("anofpdm-volume-fast", "anofpdm-ddim-fast", "anoddpm-reconstruction", "cfg-ddim", "flair-threshold",
                   FLAIR_ZSCORE)


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything besides the model and the data that decides the numbers.

    Args:
        seed: noise seed of every method.
        min_lesion_mm3: 3-D components of at most this volume are removed (every method).
        batch_size: slices per network batch (None: the pipeline's default for AnoFPDM).
        min_brain_fraction: AnoFPDM leaves out slices with less brain than this fraction of the largest slice's.
        bias_correction: AnoFPDM's bias-field correction (``InferenceOptions.bias_correction``).
        baseline_bias_correction: the baselines' ("none": as they are defined).
        baseline_stride: DDIM step of the network baselines' encoding / decoding.
        anoddpm_noise_level: the fixed step t of the reconstruction baseline.
        cfg_noise_level: the encoding depth of the CFG baseline.
        cfg_guidance: the CFG baseline's guidance weight w.
        thresholds: each baseline's per-volume threshold rule (see ``tune_thresholds``).
        baseline_min_lesion_mm3: the minimum lesion size of baselines that have their own (tuned), in place of
            ``min_lesion_mm3``.
        slice_protocol: the 2-D post-processing of the slice protocol.
        lesion_holes: the holes a lesion encloses, filled or kept (every method; ``InferenceOptions.lesion_holes``).
        lesion_boundary: where AnoFPDM draws a lesion's edge (``InferenceOptions.lesion_boundary``); the baselines
            are as they are defined.
        periventricular_findings: the periventricular findings left out of the mask or kept (every method;
            ``InferenceOptions.periventricular_findings``).
        overlay_cases: overlays are drawn for this many cases (the first in case-id order).
    """

    seed: int = InferenceOptions.seed
    min_lesion_mm3: float = InferenceOptions.min_lesion_mm3
    batch_size: int | None = None
    min_brain_fraction: float = InferenceOptions.min_brain_fraction
    bias_correction: str = InferenceOptions.bias_correction
    baseline_bias_correction: str = BaselineOptions.bias_correction
    baseline_stride: int = DEFAULT_DECODING_STRIDE
    anoddpm_noise_level: int = ANODDPM_NOISE_LEVEL
    cfg_noise_level: int = CFG_NOISE_LEVEL
    cfg_guidance: float = DEFAULT_GUIDANCE
    thresholds: dict[str, FixedThreshold] = field(default_factory=lambda: {m: default_threshold(m) for m in BASELINES})
    baseline_min_lesion_mm3: dict[str, float] = field(default_factory=dict)
    slice_protocol: SliceProtocol = field(default_factory=SliceProtocol)
    lesion_holes: str = InferenceOptions.lesion_holes
    lesion_boundary: str = InferenceOptions.lesion_boundary
    periventricular_findings: str = InferenceOptions.periventricular_findings
    overlay_cases: int = DEFAULT_OVERLAY_CASES

    def __post_init__(self) -> None:
        if self.overlay_cases < 0:
            raise ValueError(f"overlay_cases must be >= 0, got {self.overlay_cases}")
        missing = sorted(set(BASELINES) - set(self.thresholds))
        if missing:
            raise ValueError(f"thresholds lack a rule for {missing}")
        unknown = sorted(set(self.baseline_min_lesion_mm3) - set(BASELINES))
        negative = {m: v for m, v in self.baseline_min_lesion_mm3.items() if v < 0}
        if unknown or negative:
            raise ValueError(f"baseline_min_lesion_mm3 needs baselines and sizes >= 0, "
                             f"got {self.baseline_min_lesion_mm3}")

    def baseline_options(self, method: str) -> BaselineOptions:
        """The ``BaselineOptions`` of one baseline."""
        noise_levels = {"cfg-ddim": self.cfg_noise_level, "anoddpm-reconstruction": self.anoddpm_noise_level}
        return BaselineOptions(threshold=self.thresholds[method], noise_level=noise_levels.get(method),
                               stride=self.baseline_stride, guidance=self.cfg_guidance, seed=self.seed,
                               min_lesion_mm3=self.baseline_min_lesion_mm3.get(method, self.min_lesion_mm3),
                               lesion_holes=self.lesion_holes, batch_size=self.batch_size or DEFAULT_BATCH_SIZE,
                               bias_correction=self.baseline_bias_correction,
                               periventricular_findings=self.periventricular_findings)

    def inference_options(self, method: str) -> InferenceOptions:
        """The pipeline's ``InferenceOptions`` of one AnoFPDM variant."""
        return InferenceOptions(**ANOFPDM_VARIANTS[method], seed=self.seed, min_lesion_mm3=self.min_lesion_mm3,
                                lesion_holes=self.lesion_holes, lesion_boundary=self.lesion_boundary,
                                batch_size=self.batch_size, min_brain_fraction=self.min_brain_fraction,
                                bias_correction=self.bias_correction,
                                periventricular_findings=self.periventricular_findings)


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
            and add theirs (so do those that differ only in the decision rule). None: nothing is shared.
    """
    if method in ANOFPDM_VARIANTS:
        options = settings.inference_options(method)
        if shared_forward is None:
            return segment_volume(model, case.images, options)
        key = replace(options, map_variant=InferenceOptions.map_variant, decision_rule=InferenceOptions.decision_rule)
        if key not in shared_forward:
            shared_forward[key] = run_forward(model, case.images, options)
        return segment_volume(model, case.images, options, forward_outputs=shared_forward[key])
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return run_baseline(method, model, case.images, settings.baseline_options(method))
