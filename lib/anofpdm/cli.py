"""The ``anofpdm`` command: synth, prepare, train, calibrate, segment, evaluate, to-dicom.

Each subcommand parses its options here and calls the library, importing it only when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from anofpdm.arguments import comma_floats, comma_list
from anofpdm.progress import progress_bar

__all__ = ["main", "build_parser"]


def _synth(args: argparse.Namespace) -> int:
    from anofpdm.data.preview import render_preview
    from anofpdm.data.synth import generate_cases

    if args.preview and not args.out:
        case_dirs = sorted(p for p in args.cases_dir.iterdir() if p.is_dir() and p.name != "studies")
        render_preview(case_dirs[: args.preview_cases], args.preview)
        return 0
    manifest = generate_cases(args.out, args.cases, args.seed, args.healthy_fraction,
                              progress=progress_bar("synth", unit="case"), workers=args.workers,
                              tumour_volume_ml=args.tumour_volume_ml, domain=args.domain, heads=args.heads,
                              tumour_site=args.tumour_site, benign_findings=args.benign_findings)
    if args.preview:
        case_dirs = [args.out / case["case"] for case in manifest["cases"][: args.preview_cases]]
        render_preview(case_dirs, args.preview)
    print(f"wrote {len(manifest['cases'])} cases to {args.out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from anofpdm.data.slices import prepare_dataset

    manifest = prepare_dataset(args.data, args.out, sequences=args.sequences, size=args.size, seed=args.seed,
                               progress=progress_bar("prepare", unit="case"), workers=args.workers,
                               standardise=args.intensity == "standardised")
    print(json.dumps(manifest["splits"], indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from anofpdm.training.trainer import run_from_args

    return run_from_args(args)


def _calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from anofpdm.method.calibration import MODES, calibrate_mode, choose_guidance
    from anofpdm.data.slices import SliceDataset
    from anofpdm.method.model import load_model, update_calibration
    from anofpdm.runtime import default_device

    model = load_model(args.model, args.device or default_device())
    dataset = SliceDataset(args.data, args.split, sequences=model.config.sequences)
    images, labels = dataset.sample(args.max_slices, args.seed)
    results = {}
    for mode in args.modes:
        overrides = {"forward_steps": args.steps, "stride": args.stride, "early_stop": args.early_stop}
        settings = replace(MODES[mode], **{name: value for name, value in overrides.items() if value is not None})
        candidates = [
            calibrate_mode(model, images, labels, replace(settings, guidance=w, seed=args.seed), args.batch_size,
                           progress_bar(f"calibrate {mode} w={w}"))
            for w in (args.guidance or (settings.guidance,))
        ]
        chosen = choose_guidance(candidates)
        results[mode] = chosen.to_dict()
        frequency = chosen.unhealthy_frequency
        print(f"{mode}: w={chosen.guidance} c*={chosen.cosine_threshold:.6f} Dmax={chosen.max_divergence} "
              f"accuracy={chosen.validation['accuracy']} unhealthy fraction by score: {frequency[0][1]:.0%} (lowest) "
              f"to {frequency[-1][1]:.0%} (highest) in {len(frequency)} groups")
    update_calibration(args.model, results)
    return 0


def _segment(args: argparse.Namespace) -> int:
    import nibabel as nib

    from anofpdm.volumes.reading import read_image, read_sequence
    from anofpdm.method.model import load_model
    from anofpdm.method.pipeline import InferenceOptions, segment_volume
    from anofpdm.method.postprocess import UNCERTAIN_TUMOUR
    from anofpdm.runtime import default_device
    from anofpdm.volumes.checks import InputError

    model = load_model(args.model, args.device or default_device())
    options = InferenceOptions(
        mode=args.mode, guidance=args.guidance, forward_steps=args.steps, stride=args.stride,
        encoding=args.encoding, early_stop=args.early_stop, seed=args.seed, min_lesion_mm3=args.min_lesion_mm3,
        median_kernel=args.median_kernel, batch_size=args.batch_size, bf16=args.bf16,
        mark_uncertain=args.mark_uncertain, decision_rule=args.decision_rule, registration=args.registration,
        brain_extraction=args.brain_extraction, min_brain_fraction=args.min_brain_fraction,
        bias_correction=args.bias_correction, periventricular_findings=args.periventricular_findings,
    )
    images = read_image(args.flair).images
    if args.t2 is not None:
        if "t2" in images:
            raise InputError(f"T2 given twice: as a channel of {args.flair} and as --t2 {args.t2}")
        images["t2"] = read_sequence("t2", args.t2)
    try:
        result = segment_volume(model, images, options, progress=progress_bar("forward process"))
    except InputError as exc:  # name the files, as the app does
        raise InputError(f"{exc} [inputs: flair={args.flair}, t2={args.t2 or args.flair}]") from exc
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(result.mask, args.out)
    if args.map:
        nib.save(result.anomaly_map, args.map)
    if args.brain_mask:
        nib.save(result.brain_mask, args.brain_mask)
    if args.report:
        args.report.write_text(json.dumps(result.report, indent=2))
    report = result.report
    brain = report["brain_extraction"]
    if brain["extracted"]:
        print(f"brain: {brain['brain_ml']:.0f} mL, extracted by {brain['method'] or 'the FLAIR'} "
              f"in {brain['time_s']:.1f} s")
    certainty = "" if report["uncertain_slices"] is None else (
        f"; validation slices at that score {report['unhealthy_probability']:.0%} unhealthy, "
        f"{report['uncertain_slices']} uncertain slice(s)")
    uncertain = sum(row["label"] == UNCERTAIN_TUMOUR for row in report["lesions"])
    print(f"{report['verdict']}: {report['lesion_count']} lesion(s) ({uncertain} marked uncertain), "
          f"{report['total_volume_ml']} mL "
          f"(score {report['score']:.5f}, c* {report['cosine_threshold']:.5f}{certainty}) -> {args.out}")
    for name, alignment in report["alignment"].items():
        moved = "" if alignment["action"] != "registered" else (
            f" by {alignment['rotation_deg']:.1f} degrees, {alignment['translation_mm']:.1f} mm")
        print(f"{name}: {alignment['action']}{moved} (brain overlap with the FLAIR {alignment['overlap_before']:.3f}"
              f" -> {alignment['overlap_after']:.3f}, {alignment['time_s']:.1f} s)")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from anofpdm.evaluation.evaluate import run_from_args

    return run_from_args(args)


def _to_dicom(args: argparse.Namespace) -> int:
    from anofpdm.volumes.dicom import write_study
    from anofpdm.volumes.reading import read_sequence

    volumes = {name: read_sequence(name, path) for name, path in (("flair", args.flair), ("t2", args.t2)) if path}
    study = write_study(volumes, args.out, args.patient_id)
    print(json.dumps({"patient_id": study.patient_id, "study": study.study_uid, "series": study.series_uids,
                      "folders": {name: str(folder) for name, folder in study.folders.items()}}, indent=2))
    return 0


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    from anofpdm.method.decisions import UNCERTAIN_PROBABILITY
    from anofpdm.method.periventricular import PERIVENTRICULAR_FINDINGS
    from anofpdm.method.pipeline import DECISION_RULES, InferenceOptions
    from anofpdm.volumes.alignment import REGISTRATION_MODES
    from anofpdm.volumes.bias_field import BIAS_CORRECTIONS
    from anofpdm.volumes.brain_extraction import BRAIN_EXTRACTION_MODES

    defaults = InferenceOptions()
    parser.add_argument("--mode", default=defaults.mode,
                        help=f"calibrated mode: {defaults.mode} (the default) or full (600 steps)")
    parser.add_argument("--guidance", type=float, help="guidance weight w (default: the mode's calibrated one)")
    parser.add_argument("--steps", type=int, help="forward steps T_f (default: the mode's)")
    parser.add_argument("--stride", type=int, help="visit every n-th step (default: the mode's)")
    parser.add_argument("--encoding", choices=("ddim", "ddpm"), help="forward encoding (default: the mode's)")
    parser.add_argument("--early-stop", type=int, help="stop n visited steps after the divergence peak")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-lesion-mm3", type=float, default=defaults.min_lesion_mm3,
                        help="drop components of at most this volume")
    parser.add_argument("--median-kernel", type=int,
                        help="odd 3-D median filter size in voxels (default: the paper's 5 px at 128 px, scaled)")
    parser.add_argument("--batch-size", type=int,
                        help="slices per network batch: speed and memory only (default: 8 on a CPU, 64 on CUDA)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the network (for GPUs)")
    parser.add_argument("--mark-uncertain", action=argparse.BooleanOptionalAction, default=defaults.mark_uncertain,
                        help="label lesions whose unhealthy probability stays below the confident level "
                        f"({UNCERTAIN_PROBABILITY[1]}) as 2")
    parser.add_argument("--decision-rule", choices=DECISION_RULES, default=defaults.decision_rule,
                        help="volume (the default): each pixel's anomaly map value and FLAIR against its own "
                        "volume's, a slice unhealthy when it holds a masked pixel; paper: each slice's cosine score "
                        "against the calibrated c*, and Algorithm 1")
    parser.add_argument("--registration", choices=REGISTRATION_MODES, default=defaults.registration,
                        help="rigid registration of the T2 to the FLAIR: when their brain regions do not line up "
                             "(auto, the default), always, or never")
    parser.add_argument("--brain-extraction", choices=BRAIN_EXTRACTION_MODES, default=defaults.brain_extraction,
                        help="extract the brain from a head (skull, scalp, background): auto (the default; a "
                             "skull-stripped brain is used as it is), always, or never")
    parser.add_argument("--min-brain-fraction", type=float, default=defaults.min_brain_fraction,
                        help="slices whose brain area is below this fraction of the largest slice's are not "
                             f"segmented (default {defaults.min_brain_fraction}; 0: every brain slice)")
    parser.add_argument("--bias-correction", choices=BIAS_CORRECTIONS, default=defaults.bias_correction,
                        help="divide each sequence by its N4 bias field, fitted in the brain (n4), or not (none, "
                             "the default); n4 costs 1-7 s per sequence on a 2-core CPU")
    parser.add_argument("--periventricular-findings", choices=PERIVENTRICULAR_FINDINGS,
                        default=defaults.periventricular_findings,
                        help="thin lesions lining the ventricles (caps, halo): left out of the tumour mask and listed "
                             "in the report (leave-out, the default), or kept")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``anofpdm`` parser; with ``command``, train's and evaluate's options (from modules that import much: 1.7 s
    on a 2-core CPU) only for that command, so that ``anofpdm segment`` does not import the training and evaluation
    code (None: every command's options)."""
    parser = argparse.ArgumentParser(prog="anofpdm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="synthetic BraTS-format cases on the MNI152 anatomy")
    synth.add_argument("--out", type=Path, help="output folder (BraTS layout + studies/)")
    synth.add_argument("--cases", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--healthy-fraction", type=float, default=0.2)
    synth.add_argument("--tumour-volume-ml", type=comma_floats, metavar="LOW,HIGH",
                       help="range of the nominal whole-tumour volume in mL, drawn log-uniformly (default: the "
                            "domain's, 8,250 for training; written to manifest.json)")
    synth.add_argument("--domain", choices=("training", "shifted"), default="training",
                       help="training: the cases models are trained on; shifted: a test domain outside every "
                            "training range (anatomy, contrast, noise, grids), never for training or calibration")
    synth.add_argument("--heads", action="store_true",
                       help="whole heads (skull, scalp, eyes, neck) around the brain instead of skull-stripped "
                            "images; each case also gets <CASE>_brainmask.nii.gz, the truth brain mask")
    synth.add_argument("--tumour-site", choices=("deep", "surface"), default="deep",
                       help="where tumours grow: deep white matter (the default) or just under the brain's surface "
                            "(at the cortex, where brain extraction may cut them)")
    synth.add_argument("--benign-findings", choices=("basic", "clinical"), default="basic",
                       help="benign FLAIR-bright findings (labelled healthy): basic caps and blobs (default, every "
                            "recorded figure) or clinical (Fazekas-graded white-matter lesions, caps, lining, halo, "
                            "lacunes; each case also gets <CASE>_benign.nii.gz, their truth map)")
    synth.add_argument("--workers", type=int, default=1, help="cases generated in parallel (same output)")
    synth.add_argument("--preview", type=Path, help="also render a PNG of the first cases")
    synth.add_argument("--preview-cases", type=int, default=4)
    synth.add_argument("--cases-dir", type=Path, help="with --preview and no --out: preview existing cases")
    synth.set_defaults(run=_synth)

    prepare = commands.add_parser("prepare", help="volumes -> normalised training slices with a split")
    prepare.add_argument("--data", type=Path, required=True, help="BraTS21 / BraTS2023 / MSD Task01 / synth folder")
    prepare.add_argument("--out", type=Path, required=True)
    from anofpdm.volumes.sequences import SEQUENCES

    prepare.add_argument("--sequences", type=comma_list, default=SEQUENCES)
    prepare.add_argument("--size", type=int, default=128)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--workers", type=int, default=1, help="cases read in parallel (same output)")
    prepare.add_argument("--intensity", choices=("standardised", "percentile"), default="standardised",
                         help="standardised: histogram standardisation onto the training split's landmarks, carried "
                              "into the model (robust to another scanner's contrast); percentile: the paper's "
                              "99th-percentile scaling only")
    prepare.set_defaults(run=_prepare)

    train = commands.add_parser("train", help="classifier-free-guidance training (torchrun for several GPUs)")
    if command in (None, "train"):
        from anofpdm.training.trainer import add_train_arguments

        add_train_arguments(train)
    train.set_defaults(run=_train)

    calibrate = commands.add_parser("calibrate", help="store c* and Dmax per mode in the model file")
    calibrate.add_argument("--model", type=Path, required=True)
    calibrate.add_argument("--data", type=Path, required=True, help="prepared slices folder")
    calibrate.add_argument("--split", default="val")
    calibrate.add_argument("--modes", type=comma_list, default=("fast", "full"))
    calibrate.add_argument("--guidance", type=comma_floats, help="several w: keep the largest within 99%% of the best")
    calibrate.add_argument("--steps", type=int, help="forward steps T_f (default: each mode's)")
    calibrate.add_argument("--stride", type=int, help="visit every n-th step (default: each mode's)")
    calibrate.add_argument("--early-stop", type=int,
                           help="stop n visited steps after the divergence peak (default: each mode's)")
    calibrate.add_argument("--max-slices", type=int, help="a seeded random subset of the split")
    calibrate.add_argument("--batch-size", type=int, default=32)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--device")
    calibrate.set_defaults(run=_calibrate)

    segment = commands.add_parser("segment", help="segment one FLAIR + T2 volume")
    segment.add_argument("--model", type=Path, required=True)
    segment.add_argument("--flair", type=Path, required=True,
                         help="FLAIR volume (NIfTI, NRRD or MetaImage; a head or a skull-stripped brain), or one "
                              "multi-channel image: 2 channels "
                              "(FLAIR, T2) or 4 (MSD Task01 order)")
    segment.add_argument("--t2", type=Path, help="T2 volume, on any grid: resampled onto the FLAIR's (not needed for a "
                                                 "multi-channel image)")
    segment.add_argument("--out", type=Path, required=True,
                         help="label map NIfTI (uint8: tumour = 1, tumour (uncertain) = 2)")
    segment.add_argument("--map", type=Path, help="also write the anomaly map NIfTI")
    segment.add_argument("--report", type=Path, help="also write the JSON report")
    segment.add_argument("--brain-mask", type=Path, help="also write the brain mask NIfTI (uint8, on the FLAIR grid)")
    _add_inference_options(segment)
    segment.set_defaults(run=_segment)

    to_dicom = commands.add_parser("to-dicom", help="a NIfTI FLAIR (+ T2) as DICOM MR series of one study, "
                                     "for a PACS (docs/pacs.md)")
    to_dicom.add_argument("--flair", type=Path, required=True, help="FLAIR volume (NIfTI, NRRD or MetaImage)")
    to_dicom.add_argument("--t2", type=Path, help="T2 volume")
    to_dicom.add_argument("--out", type=Path, required=True,
                          help="output folder: one sub-folder per series (AX_FLAIR/, AX_T2/), one file per slice")
    to_dicom.add_argument("--patient-id", required=True,
                          help="PatientID (and PatientName); the UIDs derive from it, so writing again gives the same")
    to_dicom.set_defaults(run=_to_dicom)

    evaluate = commands.add_parser(
        "evaluate", help="AnoFPDM variants and baselines on volume folders: metrics, tables, overlays")
    if command in (None, "evaluate"):
        from anofpdm.evaluation.evaluate import add_evaluate_arguments

        add_evaluate_arguments(evaluate)
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anofpdm`` console command, also under ``torchrun -m anofpdm.cli``."""
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(next((word for word in words if not word.startswith("-")), None)).parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 reports progress
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(levelname)s %(message)s")
    from anofpdm.runtime import reuse_heap_memory

    reuse_heap_memory()  # large-batch network calls on the CPU page in fresh memory otherwise (anofpdm.runtime)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input or settings (InputError is a ValueError)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
