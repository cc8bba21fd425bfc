"""Evaluate AnoFPDM variants and baselines on labelled volumes (docs/method.md section 6).

For every case (BraTS21, BraTS 2023, MSD Task01 or synthetic folders; truth = whole tumour, label > 0)
and method, this computes the paper's slice protocol on the model grid (per-slice Dice / IoU, "mixed"
and "unhealthy", AUPRC over brain pixels, slice verdict accuracy) and per-volume 3-D metrics on the
input grid (Dice, IoU, precision, recall, AUPRC, lesion-volume error, volume verdict accuracy) and the BraTS
lesion-wise Dice and HD95 there. It writes
``results.json`` (per case and aggregated), ``results.md`` (a table) and PNG overlays of a few cases.

With a prepared data set (``anofpdm prepare``) only its held-out split is evaluated, and the baselines'
constants (per-volume quantiles; the FLAIR z-score's z* and minimum lesion size) can be tuned on its validation
split first (best mean 3-D Dice); otherwise they keep their fixed defaults. AnoFPDM needs no tuning here: its c*
and Dmax come from the model's calibration.

Each case's result is also stored as soon as it is done (``cases/<case>.json``, tagged with a key of the
model file, the methods, the settings and the library's code), so a long run that stops loses at most the case in
progress:
``resume=True`` (``--resume``) reuses the stored cases whose key matches and computes the rest.

Under torchrun (WORLD_SIZE > 1) the cases are sharded over the ranks (rank r takes cases r::world),
the per-case results are gathered to rank 0 (gloo on CPU, NCCL on GPU) and only rank 0 writes.
Each case's result does not depend on the rank that computed it (seeds are per case), so any number
of processes gives the same numbers.

This module holds the evaluation loop and the ``evaluate`` command; the methods and their settings are
:mod:`anofpdm.evaluation.methods`, case loading and scoring :mod:`anofpdm.evaluation.case_scoring`, baseline threshold
tuning :mod:`anofpdm.evaluation.baseline_tuning`, the stored per-case results :mod:`anofpdm.evaluation.store` and the
summary, table and overlays :mod:`anofpdm.evaluation.report`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from anofpdm.arguments import comma_floats, comma_list
from anofpdm.evaluation.baseline_tuning import (
    DEFAULT_TUNE_MIN_LESION_MM3,
    DEFAULT_TUNE_QUANTILES,
    DEFAULT_TUNE_ZSCORES,
    TuningGrid,
    tune_thresholds,
    tuned_or_stored,
)
from anofpdm.evaluation.baselines import (
    ANODDPM_NOISE_LEVEL,
    BASELINES,
    CFG_NOISE_LEVEL,
    DEFAULT_DECODING_STRIDE,
    DEFAULT_FLAIR_Z,
    DEFAULT_GUIDANCE,
    DEFAULT_QUANTILE,
    FLAIR_ZSCORE,
    FixedThreshold,
)
from anofpdm.evaluation.case_scoring import EvaluationCase, SliceProtocol, prepare_case, score_result
from anofpdm.data.brats import CaseFiles, find_cases
from anofpdm.data.slices import MANIFEST_NAME, load_manifest
from anofpdm.distributed import broadcast_from_main, distributed_context, gather_to_main
from anofpdm.evaluation.methods import (
    ANOFPDM_VARIANTS,
    DEFAULT_METHODS,
    DEFAULT_OVERLAY_CASES,
    METHODS,
    EvaluationSettings,
    run_method,
)
from anofpdm.evaluation.report import aggregate_methods, markdown_table, overlay_payload, render_overlay
from anofpdm.evaluation.store import run_key, source_digest, store_case, stored_case
from anofpdm.evaluation.metrics import MM3_PER_ML
from anofpdm.method.model import LoadedModel, load_model
from anofpdm.method.periventricular import PERIVENTRICULAR_FINDINGS
from anofpdm.method.pipeline import ForwardOutputs, InferenceOptions, SegmentationResult
from anofpdm.method.postprocess import LESION_BOUNDARIES, LESION_HOLES
from anofpdm.progress import ProgressCallback, progress_bar
from anofpdm.volumes.bias_field import BIAS_CORRECTIONS

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


RESULTS_JSON, RESULTS_MD, OVERLAY_DIR, CASE_DIR = "results.json", "results.md", "overlays", "cases"
DEFAULT_SPLIT = "test"


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
    return record, (overlay_payload(case, results) if overlay else None)


def _select_cases(cases: Sequence[CaseFiles], case_ids: Sequence[str] | None, data_dir: Path) -> list[CaseFiles]:
    """``cases`` restricted to ``case_ids`` (in case-id order), all of which must exist."""
    if case_ids is None:
        return list(cases)
    by_id = {case.case_id: case for case in cases}
    missing = sorted(set(case_ids) - set(by_id))
    if missing:
        raise ValueError(f"cases not found under {data_dir}: {missing}")
    return [by_id[case_id] for case_id in sorted(set(case_ids))]


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
    tune_grid: TuningGrid = TuningGrid(),
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
        tune_case_ids: validation cases on which each baseline's constants are chosen (``tune_thresholds``)
            before evaluation; must not overlap the evaluated cases.
        tune_grid: the candidate constants.
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
                tuned, reused_tuning = tuned_or_stored(model, Path(model_path), tune_files, methods, settings,
                                                        tune_grid, out_path, resume, tune_progress)
            tuned = broadcast_from_main(tuned, ctx.world_size)
            chosen = {method: FixedThreshold(**t["threshold"]) for method, t in tuned.items()}
            sizes = {method: t["min_lesion_mm3"] for method, t in tuned.items()}
            settings = replace(settings, thresholds={**settings.thresholds, **chosen},
                               baseline_min_lesion_mm3={**settings.baseline_min_lesion_mm3, **sizes})
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
            stored = stored_case(case_dir, key, cases[index].case_id) if resume and not overlay else None
            if stored is not None:
                records.append(stored)
                reused.append(stored["case"])
                for _ in methods:
                    step()
                continue
            record, payload = _evaluate_case(cases[index], model, methods, settings, overlay, step)
            store_case(case_dir, key, record)
            records.append(record)
            if payload is not None:
                payloads.append(payload)
        records = gather_to_main(records, ctx.world_size, ctx.is_main)
        payloads = gather_to_main(payloads, ctx.world_size, ctx.is_main)
        reused = gather_to_main(reused, ctx.world_size, ctx.is_main)
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
            "summary": aggregate_methods(records, methods),
            "failed_cases": [{"case": r["case"], "error": r["error"]} for r in records if "error" in r],
            "cases": records,
        }
        (out_path / RESULTS_JSON).write_text(json.dumps(results, indent=2))
        (out_path / RESULTS_MD).write_text(markdown_table(results["summary"]))
        for payload in payloads:
            render_overlay(payload, out_path / OVERLAY_DIR / f"{payload['case']}.png")
        return results


def split_case_ids(prepared: Path, split: str) -> list[str]:
    """The case ids of one split of a prepared data set (``anofpdm prepare``'s manifest.json)."""
    splits = load_manifest(prepared).get("splits", {})
    if split not in splits:
        raise ValueError(f"{Path(prepared) / MANIFEST_NAME} has no split {split!r} (splits: {sorted(splits)})")
    return list(splits[split]["cases"])


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``anofpdm evaluate``."""
    parser.add_argument("--model", type=Path, required=True, help="calibrated model checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="BraTS21 / BraTS2023 / MSD Task01 / synthetic cases")
    parser.add_argument("--methods", type=comma_list, default=list(DEFAULT_METHODS),
                        help=f"comma list from: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, overlays/)")
    parser.add_argument("--prepared", type=Path,
                        help="prepared slices folder: evaluate only its --split cases (the model's held-out cases)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, help="with --prepared: the split to evaluate")
    parser.add_argument("--tune-split",
                        help="with --prepared: tune the baselines' constants on this split (e.g. val), never the test")
    parser.add_argument("--tune-quantiles", type=comma_floats, default=list(DEFAULT_TUNE_QUANTILES),
                        help="candidate brain quantiles of the map-quantile baselines")
    parser.add_argument("--tune-zscores", type=comma_floats, default=list(DEFAULT_TUNE_ZSCORES),
                        help=f"candidate z* of {FLAIR_ZSCORE}")
    parser.add_argument("--tune-min-lesion-mm3", type=comma_floats, default=list(DEFAULT_TUNE_MIN_LESION_MM3),
                        help=f"candidate minimum lesion sizes of {FLAIR_ZSCORE}, each tried with every z*")
    parser.add_argument("--max-cases", type=int, help="only the first N cases in case-id order")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--seed", type=int, default=EvaluationSettings.seed)
    parser.add_argument("--min-lesion-mm3", type=float, default=EvaluationSettings.min_lesion_mm3)
    parser.add_argument("--lesion-holes", choices=LESION_HOLES, default=EvaluationSettings.lesion_holes,
                        help="every method: fill the holes a lesion encloses in 3-D, also within axial slices, or "
                        "keep them")
    parser.add_argument("--lesion-boundary", choices=LESION_BOUNDARIES, default=EvaluationSettings.lesion_boundary,
                        help="AnoFPDM: redraw each lesion's edge on the input grid at half its FLAIR contrast to the "
                        "brain around it, or keep the network grid's mask resampled")
    parser.add_argument("--periventricular-findings", choices=PERIVENTRICULAR_FINDINGS,
                        default=EvaluationSettings.periventricular_findings,
                        help="every method: leave thin lesions lining the ventricles out of the mask, or keep them")
    parser.add_argument("--batch-size", type=int, help="slices per network batch")
    parser.add_argument("--min-brain-fraction", type=float, default=EvaluationSettings.min_brain_fraction,
                        help="AnoFPDM leaves out slices with less brain than this fraction of the largest slice's")
    parser.add_argument("--bias-correction", choices=BIAS_CORRECTIONS, default=EvaluationSettings.bias_correction,
                        help="AnoFPDM: divide each sequence by its N4 bias field, or not")
    parser.add_argument("--baseline-bias-correction", choices=BIAS_CORRECTIONS,
                        default=EvaluationSettings.baseline_bias_correction,
                        help="the baselines: as they are defined (none), or on N4-corrected sequences (n4)")
    parser.add_argument("--baseline-stride", type=int, default=DEFAULT_DECODING_STRIDE,
                        help="DDIM step of the network baselines")
    parser.add_argument("--anoddpm-noise-level", type=int, default=ANODDPM_NOISE_LEVEL)
    parser.add_argument("--cfg-noise-level", type=int, default=CFG_NOISE_LEVEL)
    parser.add_argument("--cfg-guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--flair-quantile", type=float, default=DEFAULT_QUANTILE,
                        help="FLAIR baseline: brain quantile of the normalised FLAIR (0.99 = 99th percentile)")
    parser.add_argument("--flair-z", type=float, default=DEFAULT_FLAIR_Z,
                        help=f"{FLAIR_ZSCORE}: the FLAIR's robust z-score within the brain a pixel must reach")
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
    thresholds[FLAIR_ZSCORE] = FixedThreshold(quantile=None, value=args.flair_z)
    return EvaluationSettings(
        seed=args.seed, min_lesion_mm3=args.min_lesion_mm3, batch_size=args.batch_size,
        min_brain_fraction=args.min_brain_fraction, bias_correction=args.bias_correction,
        baseline_bias_correction=args.baseline_bias_correction,
        periventricular_findings=args.periventricular_findings,
        baseline_stride=args.baseline_stride, anoddpm_noise_level=args.anoddpm_noise_level,
        cfg_noise_level=args.cfg_noise_level, cfg_guidance=args.cfg_guidance, thresholds=thresholds,
        slice_protocol=SliceProtocol(min_area_px=args.slice_min_area_px), lesion_holes=args.lesion_holes,
        lesion_boundary=args.lesion_boundary, overlay_cases=args.overlays,
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
                       tune_grid=TuningGrid(args.tune_quantiles, args.tune_zscores, args.tune_min_lesion_mm3),
                       resume=args.resume,
                       tune_progress=progress_bar("tune thresholds", unit="map") if is_main else None)
    if is_main:
        print(markdown_table(results["summary"]))
        for failure in results["failed_cases"]:
            print(f"warning: case {failure['case']} not scored: {failure['error']}", file=sys.stderr)
        for method, tuned in (results["settings"]["tuned_thresholds"] or {}).items():
            rule = tuned["threshold"]
            chosen = f"quantile {rule['quantile']}" if rule["value"] is None else f"threshold {rule['value']}"
            print(f"{method}: {chosen}, minimum lesion {tuned['min_lesion_mm3']} mm^3, tuned on "
                  f"{len(tuned['cases'])} validation cases"
                  + (" (stored by an earlier run)" if results["settings"]["reused_tuning"] else ""))
        if results["settings"]["reused_cases"]:
            print(f"reused the stored results of {len(results['settings']['reused_cases'])} cases")
        print(f"wrote {args.out / RESULTS_JSON}, {args.out / RESULTS_MD}")
    return 0
