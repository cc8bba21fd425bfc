"""Tuning each baseline's per-volume threshold quantile on validation cases (best mean 3-D Dice).

AnoFPDM needs no tuning: its c* and Dmax come from the model's calibration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from anofpdm.evaluation.baselines import BASELINES, FixedThreshold, baseline_maps, finish_baseline
from anofpdm.evaluation.case_scoring import EvaluationCase, prepare_case
from anofpdm.data.brats import CaseFiles
from anofpdm.evaluation.methods import EvaluationSettings
from anofpdm.evaluation.store import run_key, store_result, stored_result
from anofpdm.evaluation.metrics import dice
from anofpdm.method.model import LoadedModel
from anofpdm.progress import ProgressCallback

__all__ = ["DEFAULT_TUNE_QUANTILES", "tune_thresholds", "tuned_or_stored"]

TUNING_JSON = "tuning.json"  # the tuned baseline thresholds, reused by --resume
DEFAULT_TUNE_QUANTILES = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


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


def tuned_or_stored(
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
    stored = stored_result(path, key, "tuned", "tuning") if resume else None
    if stored is not None:
        return stored, True
    cases = [prepare_case(files, model.config) for files in tune_files]
    tuned = json.loads(json.dumps(tune_thresholds(model, cases, baselines, settings, quantiles, progress)))
    out_path.mkdir(parents=True, exist_ok=True)
    store_result(path, key, "tuned", tuned)
    return tuned, False  # through JSON either way: the same types whether stored or fresh
