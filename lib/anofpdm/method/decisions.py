"""Per-slice decisions without pixel labels (docs/method.md section 4).

From the forward-process statistics of a slice: the healthy/unhealthy verdict (cosine similarity of
the MSE curves against the calibrated c*), the quantile threshold of Algorithm 1 (driven by the peak
divergence against the calibrated Dmax), and the combined anomaly map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anofpdm.method.postprocess import lesion_components

__all__ = [
    "FORWARD_PROCESS_VERSION",
    "UNCERTAIN_PROBABILITY",
    "is_uncertain",
    "Calibration",
    "QuantileRule",
    "cosine_scores",
    "threshold_quantiles",
    "slice_thresholds",
    "row_quantiles",
    "combine_maps",
    "VolumeRule",
    "VolumeDecisions",
    "robust_z_scores",
    "decide_by_volume",
]


# 2 (2026-11-28): each slice stops early on its own and draws its own noise; 1: early stop ended whole batches
FORWARD_PROCESS_VERSION = 2

# A slice's verdict is reported as uncertain when the validation slices at its cosine score were between
# 20 % and 80 % unhealthy (Calibration.unhealthy_probability)
UNCERTAIN_PROBABILITY = (0.2, 0.8)


def is_uncertain(probability: Any) -> Any:
    """Per slice (tensor or array), whether its unhealthy probability lies strictly inside ``UNCERTAIN_PROBABILITY``."""
    low, high = UNCERTAIN_PROBABILITY
    return (probability > low) & (probability < high)


@dataclass(frozen=True)
class QuantileRule:
    """Algorithm 1: quantile q = high - (high - low) * ratio, ratio = clip(max D / Dmax, 0, 1)."""

    low: float = 0.90
    high: float = 0.98

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")


@dataclass(frozen=True)
class Calibration:
    """Constants calibrated once per trained model on validation slices (image-level labels only).

    Args:
        cosine_threshold: c*; a slice is unhealthy when its cosine score is <= c*.
        max_divergence: Dmax per map modality (max over unhealthy validation slices of max_t D_t).
        guidance: guidance weight w the values were calibrated at.
        forward_steps: T_f they were calibrated at.
        stride: stride they were calibrated at.
        encoding: "ddim" or "ddpm".
        early_stop: early-stop patience they were calibrated at (None: no early stop).
        validation: what the calibration measured (accuracy, confusion counts, slices used).
        forward_process_version: the forward process's ``FORWARD_PROCESS_VERSION`` at calibration (a stored
            calibration without one is version 1).
        unhealthy_frequency: (highest cosine score, unhealthy fraction) per group of validation slices, ascending
            in score, the fraction non-increasing (``anofpdm.method.calibration.fit_unhealthy_frequency``); empty for a
            calibration stored before it was recorded.
    """

    cosine_threshold: float
    max_divergence: tuple[float, ...]
    guidance: float
    forward_steps: int
    stride: int
    encoding: str
    early_stop: int | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    forward_process_version: int = FORWARD_PROCESS_VERSION
    unhealthy_frequency: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_divergence", tuple(float(v) for v in self.max_divergence))
        if not self.max_divergence or any(v <= 0 for v in self.max_divergence):
            raise ValueError(f"max_divergence must be positive per modality, got {self.max_divergence}")
        table = tuple((float(score), float(fraction)) for score, fraction in self.unhealthy_frequency)
        object.__setattr__(self, "unhealthy_frequency", table)
        scores, fractions = [row[0] for row in table], [row[1] for row in table]
        if scores != sorted(set(scores)) or fractions != sorted(fractions, reverse=True):
            raise ValueError("unhealthy_frequency must ascend strictly in score with a non-increasing fraction")
        if any(not 0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"unhealthy_frequency fractions must lie in [0, 1], got {fractions}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["max_divergence"] = list(self.max_divergence)
        data["unhealthy_frequency"] = [list(row) for row in self.unhealthy_frequency]
        return data

    def unhealthy_probability(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Per slice, the unhealthy fraction of the validation slices at its cosine score (None: not recorded).

        A score beyond the validation scores takes the nearest group's fraction.
        """
        if not self.unhealthy_frequency:
            return None
        bounds, fractions = torch.tensor(self.unhealthy_frequency, dtype=torch.float64).T.contiguous()
        group = torch.searchsorted(bounds, scores.double().cpu()).clamp_max(len(bounds) - 1)
        return fractions[group].float()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**{"forward_process_version": 1, **data})

    @property
    def outdated(self) -> bool:
        """Made with an early stop that ended whole batches (version 1): its c* does not fit today's scores."""
        return self.early_stop is not None and self.forward_process_version < FORWARD_PROCESS_VERSION


def cosine_scores(mse_guided: torch.Tensor, mse_reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the MSE curves (MSEh_t) and (MSEr_t) per slice (B x K -> B)."""
    return F.cosine_similarity(mse_guided.double(), mse_reference.double(), dim=1, eps=1e-12).float()


def threshold_quantiles(max_divergence: torch.Tensor, d_max: torch.Tensor, rule: QuantileRule) -> torch.Tensor:
    """Quantile q_m per slice and modality: a larger divergence means a lower quantile (B x M)."""
    ratio = (max_divergence / d_max.to(max_divergence)).clamp(0.0, 1.0)
    return rule.high - (rule.high - rule.low) * ratio


def slice_thresholds(
    anomaly_maps: torch.Tensor, max_divergence: torch.Tensor, d_max: torch.Tensor, rule: QuantileRule
) -> torch.Tensor:
    """tau per slice: the mean over modalities of the q_m-quantile of H_m over the whole slice.

    Args:
        anomaly_maps: B x M x H x W, the per-modality maps H_m.
        max_divergence: B x M, max_t D_t[m].
        d_max: M, the calibrated Dmax per modality.
        rule: the quantile range of Algorithm 1.

    Returns:
        B thresholds.
    """
    q = threshold_quantiles(max_divergence, d_max, rule)
    return row_quantiles(anomaly_maps.flatten(2).float(), q.float()).mean(dim=1)


def row_quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantile ``q[..., i]`` of row ``values[..., i, :]``, linear interpolation as ``torch.quantile``."""
    ordered = values.sort(dim=-1).values
    position = q * (values.shape[-1] - 1)
    lower = position.floor().long()
    upper = position.ceil().long()
    low_value = ordered.gather(-1, lower[..., None]).squeeze(-1)
    high_value = ordered.gather(-1, upper[..., None]).squeeze(-1)
    return low_value + (high_value - low_value) * (position - lower)


def combine_maps(anomaly_maps: torch.Tensor) -> torch.Tensor:
    """Unfiltered combined map (H_FLAIR + H_T2) / 2: the mean over modalities (B x M x H x W -> B x H x W)."""
    return anomaly_maps.mean(dim=1)


@dataclass(frozen=True)
class VolumeRule:
    """A label-free per-volume decision rule: each pixel and slice judged against its own volume.

    A pixel is masked when its median-filtered map value stands out from the volume's brain (robust z-score at
    least ``map_z``), reaches Algorithm 1's threshold tau, and its FLAIR is brighter than the ``flair_quantile``
    of the volume's brain FLAIR (a tumour and its oedema are FLAIR-hyperintense; the dark CSF and the brain's
    edges, where anatomy unlike the training brains lights the map, are not). A slice is unhealthy when it holds a
    masked pixel (``anofpdm.method.pipeline.segment_volume``: a pixel of a lesion that passed the component filter): the
    map, not the cosine score, gives the verdict, and calibrated c* plays no part. On a brain
    unlike the training anatomy, where every score drops and every map rises, what stands out within the volume
    is kept.

    With ``t2_quantile``, a lesion (26-connected piece of those pixels) is kept only when its median T2 exceeds that
    quantile of the volume's brain T2: a tumour and its oedema are hyperintense on T2 as on FLAIR, some false
    lesions (a bias field's FLAIR brightening) are not (docs/evaluation.md, "Lesion-level tests"; off by default).

    Args:
        map_z: how far above the volume's median brain map value (in robust standard deviations) a pixel must lie.
        flair_quantile: the volume's brain FLAIR quantile a masked pixel must exceed.
        t2_quantile: the volume's brain T2 quantile a lesion's median T2 must exceed (0: no T2 test).
    """

    # chosen on validation volumes of both domains, with the lesion edges redrawn and the fast mode's 5 visited steps
    # (docs/performance.md, "Five visited steps"; first set to 8 at 20 steps without the edges: docs/generalisation.md)
    map_z: float = 5.0
    flair_quantile: float = 0.8
    # off: on the validation volumes of five sets (docs/evaluation.md, "Lesion-level tests") 0.6 frees three
    # healthy volumes and drops no tumour, but 0.7 drops two, too thin a margin for an unseen brain
    t2_quantile: float = 0.0

    def __post_init__(self) -> None:
        if not self.map_z >= 0:  # NaN too
            raise ValueError(f"map_z must be >= 0, got {self.map_z}")
        if not 0.0 <= self.flair_quantile < 1.0:
            raise ValueError(f"flair_quantile must lie in [0, 1), got {self.flair_quantile}")
        if not 0.0 <= self.t2_quantile < 1.0:
            raise ValueError(f"t2_quantile must lie in [0, 1), got {self.t2_quantile}")


MAD_TO_SD = 1.4826  # a normal distribution's standard deviation per median absolute deviation


def _median_and_spread(values: torch.Tensor) -> tuple[float, float]:
    """The median and 1.4826 x the median absolute deviation of all entries (the middle two averaged; numpy, as
    ``torch.quantile`` refuses more than 2**24 values)."""
    flat = values.detach().double().cpu().numpy().ravel()
    median = float(np.median(flat))
    return median, float(MAD_TO_SD * np.median(np.abs(flat - median)))


def robust_z_scores(values: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Every entry's robust z-score against the entries in ``region``: (value - median) / (1.4826 x the median
    absolute deviation), in float64; also that median and spread.

    Args:
        values: any shape.
        region: boolean, of the same shape: the entries that make the reference (e.g. one volume's brain pixels).
    """
    median, spread = _median_and_spread(values[region])
    return (values.double() - median) / max(spread, 1e-12), median, spread


@dataclass
class VolumeDecisions:
    """The ``VolumeRule``'s decisions for one volume's N slices (maps S x S x N, slices last).

    Attributes:
        candidate: S x S x N pixels masked before the component filter.
        eligible: S x S x N pixels the rule may mask (brain pixels with a bright enough FLAIR).
        slice_z: N, each slice's highest robust z-score of the map among its eligible pixels (the volume's lowest
            z-score where it has none); the slice score the verdict rests on, higher = more anomalous.
        thresholds: N, the larger of tau and the volume's map floor (the value at ``map_z``).
    """

    candidate: torch.Tensor
    eligible: torch.Tensor
    slice_z: torch.Tensor
    thresholds: torch.Tensor


def _brain_quantile(values: torch.Tensor, brain: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of ``values`` over the ``brain`` entries (numpy: ``torch.quantile`` refuses more than 2**24)."""
    return float(np.quantile(values[brain].detach().double().cpu().numpy(), quantile))


def _t2_hyperintense(candidate: torch.Tensor, t2: torch.Tensor, level: float) -> torch.Tensor:
    """The 26-connected pieces of ``candidate`` whose median T2 exceeds ``level``."""
    labels, count = lesion_components(candidate.cpu().numpy())
    if count == 0:
        return candidate
    medians = ndimage.median(t2.double().cpu().numpy(), labels, index=np.arange(1, count + 1))
    keep = np.concatenate([[False], np.asarray(medians) > level])
    return torch.from_numpy(keep[labels]).to(candidate.device)


def decide_by_volume(
    filtered_map: torch.Tensor,
    brain: torch.Tensor,
    flair: torch.Tensor,
    thresholds: torch.Tensor,
    rule: VolumeRule,
    t2: torch.Tensor | None = None,
) -> VolumeDecisions:
    """The ``VolumeRule`` applied to one volume.

    Args:
        filtered_map: S x S x N median-filtered combined map.
        brain: S x S x N brain pixels.
        flair: S x S x N network-input FLAIR.
        thresholds: N taus of Algorithm 1.
        rule: the rule's settings.
        t2: S x S x N network-input T2 (None: a model without T2, no T2 test).
    """
    if not bool(brain.any()):
        brain = torch.ones_like(brain)
    z, median, spread = robust_z_scores(filtered_map, brain)
    eligible = brain & (flair.double() > _brain_quantile(flair, brain, rule.flair_quantile))
    candidate = eligible & (z >= rule.map_z) & (filtered_map >= thresholds)
    if t2 is not None and rule.t2_quantile > 0:
        candidate = _t2_hyperintense(candidate, t2, _brain_quantile(t2, brain, rule.t2_quantile))
    slice_z = torch.where(eligible, z, z.min()).amax(dim=(0, 1)).float()
    levels = thresholds.clamp_min(median + rule.map_z * spread)
    return VolumeDecisions(candidate, eligible, slice_z, levels)
