"""Tuning each baseline's constants on validation cases (best mean 3-D Dice).

The map-quantile baselines tune their per-volume brain quantile; the FLAIR z-score baseline its two constants, the
z-score threshold z* and the minimum lesion size. AnoFPDM needs no tuning: its c* and Dmax come from the model's
calibration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from anofpdm.evaluation.baselines import BASELINES, FLAIR_ZSCORE, FixedThreshold, baseline_maps, finish_baseline
from anofpdm.evaluation.case_scoring import EvaluationCase, prepare_case
from anofpdm.data.brats import CaseFiles
from anofpdm.evaluation.methods import EvaluationSettings
from anofpdm.evaluation.store import run_key, store_result, stored_result
from anofpdm.evaluation.metrics import dice
from anofpdm.method.model import LoadedModel
from anofpdm.progress import ProgressCallback

__all__ = ["DEFAULT_TUNE_QUANTILES", "DEFAULT_TUNE_ZSCORES", "DEFAULT_TUNE_MIN_LESION_MM3", "TuningGrid",
           "tune_thresholds", "tuned_or_stored"]

TUNING_JSON = "tuning.json"  # the tuned baseline thresholds, reused by --resume
DEFAULT_TUNE_QUANTILES = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
DEFAULT_TUNE_ZSCORES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)
DEFAULT_TUNE_MIN_LESION_MM3 = (250.0, 500.0, 1000.0, 2000.0)  # 500: the pipeline's default


@dataclass(frozen=True)
class TuningGrid:
    """The candidate constants tuning tries.

    Args:
        quantiles: brain quantiles of the map, in (0, 1), for the map-quantile baselines (which keep the
            evaluation's minimum lesion size).
        zscores: z-score thresholds z* for the FLAIR z-score baseline, each tried with every size in ...
        min_lesion_mm3: ... these minimum lesion sizes (components of at most this volume are removed).
    """

    quantiles: tuple[float, ...] = DEFAULT_TUNE_QUANTILES
    zscores: tuple[float, ...] = DEFAULT_TUNE_ZSCORES
    min_lesion_mm3: tuple[float, ...] = DEFAULT_TUNE_MIN_LESION_MM3

    def __post_init__(self) -> None:
        for name in ("quantiles", "zscores", "min_lesion_mm3"):
            values = tuple(sorted(float(v) for v in getattr(self, name)))
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct candidates, at least one, got {getattr(self, name)}")
            object.__setattr__(self, name, values)
        if self.min_lesion_mm3[0] < 0:
            raise ValueError(f"min_lesion_mm3 candidates must be >= 0, got {self.min_lesion_mm3}")
        for q in self.quantiles:
            FixedThreshold(quantile=q)  # refuses a quantile outside (0, 1)

    def candidates(self, method: str, min_lesion_mm3: float) -> list[tuple[FixedThreshold, float]]:
        """(threshold rule, minimum lesion size) pairs to try for one baseline, from the least to the most
        conservative (a tie goes to the later one); ``min_lesion_mm3`` is the size of those that do not tune it."""
        if method == FLAIR_ZSCORE:
            return [(FixedThreshold(quantile=None, value=z), size)
                    for z in self.zscores for size in self.min_lesion_mm3]
        return [(FixedThreshold(quantile=q), min_lesion_mm3) for q in self.quantiles]


def tune_thresholds(
    model: LoadedModel,
    cases: Sequence[EvaluationCase],
    methods: Sequence[str],
    settings: EvaluationSettings,
    grid: TuningGrid = TuningGrid(),
    progress: ProgressCallback | None = None,
) -> dict[str, dict[str, Any]]:
    """Choose each baseline's constants on validation cases: the best mean per-volume 3-D Dice.

    Each case's maps are computed once and finished (thresholded and filtered as the pipeline does) with every
    candidate of ``grid``. Ties go to the more conservative candidate (the higher quantile or z*, then the larger
    minimum lesion size).

    Args:
        model: the model.
        cases: validation cases; those with tumour are used.
        methods: baselines to tune (AnoFPDM variants are calibrated, not tuned, and are skipped).
        settings: the baselines' other settings.
        grid: the candidates.
        progress: called with (baseline-case maps done, total).

    Returns:
        baseline -> {"threshold": the chosen ``FixedThreshold`` as a dict, "min_lesion_mm3": the chosen size,
        "validation_dice": [{"quantile", "value", "min_lesion_mm3", "dice": mean}, one per candidate],
        "cases": [ids]}.
    """
    with_tumour = [case for case in cases if case.truth.any()]
    if not with_tumour:
        raise ValueError("threshold tuning needs validation cases with tumour")
    baselines = [m for m in methods if m in BASELINES]
    tuned, done = {}, 0
    for method in baselines:
        options = settings.baseline_options(method)
        candidates = grid.candidates(method, options.min_lesion_mm3)
        scores: list[list[float]] = [[] for _ in candidates]
        for case in with_tumour:
            maps = baseline_maps(method, model, case.images, options)
            for (rule, min_lesion_mm3), case_scores in zip(candidates, scores):
                chosen = replace(options, threshold=rule, min_lesion_mm3=min_lesion_mm3)
                result = finish_baseline(maps, model, case.images, chosen)
                case_scores.append(dice(np.asanyarray(result.mask.dataobj) > 0, case.truth))
            done += 1
            if progress is not None:
                progress(done, len(baselines) * len(with_tumour))
        means = [float(np.mean(case_scores)) for case_scores in scores]
        best = max(range(len(candidates)), key=lambda i: (means[i], i))
        tuned[method] = {
            "threshold": asdict(candidates[best][0]),
            "min_lesion_mm3": candidates[best][1],
            "validation_dice": [{**asdict(rule), "min_lesion_mm3": size, "dice": mean}
                                for (rule, size), mean in zip(candidates, means)],
            "cases": [case.case_id for case in with_tumour],
        }
    return tuned


def tuned_or_stored(
    model: LoadedModel,
    model_path: Path,
    tune_files: Sequence[CaseFiles],
    methods: Sequence[str],
    settings: EvaluationSettings,
    grid: TuningGrid,
    out_path: Path,
    resume: bool,
    progress: ProgressCallback | None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """The baselines' tuned constants: stored ones from an earlier run with the same model, baselines, settings,
    validation cases and candidates when resuming, else ``tune_thresholds`` (then stored). Also: were they reused."""
    baselines = [m for m in methods if m in BASELINES]
    identity = [run_key(model_path, baselines, settings), sorted(f.case_id for f in tune_files), asdict(grid)]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    path = out_path / TUNING_JSON
    stored = stored_result(path, key, "tuned", "tuning") if resume else None
    if stored is not None:
        return stored, True
    cases = [prepare_case(files, model.config) for files in tune_files]
    tuned = json.loads(json.dumps(tune_thresholds(model, cases, baselines, settings, grid, progress)))
    out_path.mkdir(parents=True, exist_ok=True)
    store_result(path, key, "tuned", tuned)
    return tuned, False  # through JSON either way: the same types whether stored or fresh
