"""Latency of one volume through the pipeline, split into its stages, and whether bf16 changes the mask.

Runs the default ("fast") mode and the full mode on each case (e.g. a 240 x 240 x 155 BraTS, synthetic or demo
volume), read as ``anofpdm segment`` reads it. The full mode visits every step up to T_f = 600: on a CPU that takes
long, so ``--full-steps N`` runs it to N forward steps only and extrapolates the network time linearly in the
visited steps (printed as "extrapolated"; the other stages do not depend on the step count).
``--precisions fp32,bf16`` times both (bfloat16 autocast: for GPUs); every run's label map is compared with the
first precision's of the same case and mode (voxels whose label differs, 3-D Dice of the tumour), so
``fp32,fp32`` shows the run-to-run floor. ``--batch-size volume`` puts all of a volume's slices in one network
batch. Per run: wall time of the whole ``segment_volume`` and each stage, and on a GPU the peak memory
(``torch.cuda.max_memory_allocated``). ``--cli-case ID`` also times ``anofpdm segment`` on that case in a fresh
process (process start included). ``--out DIR`` writes the figures as ``volume_latency.json`` and
``volume_latency.md``, each replaced atomically after every run. Asserts nothing. Examples:

    PYTHONPATH=lib python benchmarks/volume_latency.py --model model/anofpdm.pt --data data/synth --full-steps 30
    PYTHONPATH=lib python benchmarks/volume_latency.py --model model/anofpdm.pt --studies demo/studies \
        --batch-size volume --precisions fp32,bf16 --cli-case SYN_00000 --out runs/latency   # on a GPU

``scripts/gpu_performance.sh`` runs the second on a lent GPU (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from anofpdm.arguments import comma_list
from anofpdm.atomic import atomic_path
from anofpdm.data.brats import find_cases
from anofpdm.data.synth import STUDIES_T2_DIR
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import InferenceOptions, default_batch_size, resolve_options, segment_volume
from anofpdm.runtime import default_device, reuse_heap_memory
from anofpdm.volumes.overlap import dice
from anofpdm.volumes.reading import read_image, read_sequence

STAGES = ("load_s", "brain_extraction_s", "alignment_s", "preprocess_s", "network_s", "postprocess_s", "write_s")
WHOLE_VOLUME = "volume"  # --batch-size value: all of a volume's slices in one network batch
NIFTI_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class Study:
    """One case's input files, as ``anofpdm segment`` takes them (``t2`` None: a multi-channel ``flair`` file)."""

    case_id: str
    flair: Path
    t2: Path | None

    def read(self) -> dict[str, nib.spatialimages.SpatialImage]:
        """The sequences, read as the CLI reads them."""
        images = read_image(self.flair).images
        if self.t2 is not None:
            images["t2"] = read_sequence("t2", self.t2)
        return images


def data_studies(data: Path) -> list[Study]:
    """The BraTS / MSD / synthetic cases under ``data`` (an MSD case is one 4-D file)."""
    studies = []
    for case in find_cases(data):
        flair, t2 = case.images["flair"], case.images["t2"]
        studies.append(Study(case.case_id, flair, None if t2 == flair else t2))
    return studies


def folder_studies(folder: Path) -> list[Study]:
    """The cases of a MONAI Label studies folder: ``<ID>.nii.gz`` (FLAIR) and ``t2/<ID>.nii.gz``."""
    studies = [Study(path.name[: -len(NIFTI_SUFFIX)], path, folder / STUDIES_T2_DIR / path.name)
               for path in sorted(folder.glob(f"*{NIFTI_SUFFIX}"))]
    if not studies:
        raise SystemExit(f"no {NIFTI_SUFFIX} study under {folder}")
    missing = [str(s.t2) for s in studies if not s.t2.is_file()]
    if missing:
        raise SystemExit(f"T2 missing for: {', '.join(missing)}")
    return studies


def batch_size_arg(text: str) -> int | str:
    """A positive slice count, or "volume" (all of a volume's slices in one batch)."""
    if text == WHOLE_VOLUME:
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be >= 1 or {WHOLE_VOLUME!r}, got {text}")
    return value


def axial_planes(image: nib.spatialimages.SpatialImage) -> int:
    """The planes along the axis nearest superior-inferior: the most slices the network gets from ``image``."""
    codes = nib.aff2axcodes(image.affine)
    return int(image.shape[[code in ("S", "I") for code in codes].index(True)])


def _batch(batch_size: int | str | None, images: dict, device: torch.device) -> int:
    """The slices per network batch that ``--batch-size`` asks for on these images."""
    if batch_size == WHOLE_VOLUME:
        return axial_planes(images["flair"])
    return batch_size or default_batch_size(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(model, precisions: list[str]) -> None:
    """One small network call per precision, so that library and kernel start-up is not billed to the first run."""
    size = model.config.image_size
    x = torch.zeros(2, len(model.config.sequences), size, size, device=model.device)
    t = torch.zeros(2, dtype=torch.long, device=model.device)
    for precision in dict.fromkeys(precisions):
        with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model.network(x, t, class_labels=t)
    _sync(model.device)


def measure(model, study: Study, mode: str, forward_steps: int | None, batch_size: int | str,
            bf16: bool) -> tuple[dict, np.ndarray]:
    """Time one segmentation of ``study`` in ``mode`` (optionally limited to ``forward_steps``); its figures and
    label map."""
    start = time.perf_counter()
    images = study.read()
    load_s = time.perf_counter() - start
    batch = _batch(batch_size, images, model.device)
    options = InferenceOptions(mode=mode, forward_steps=forward_steps, batch_size=batch, bf16=bf16)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    _sync(model.device)
    start = time.perf_counter()
    result = segment_volume(model, images, options)
    _sync(model.device)
    segment_s = time.perf_counter() - start
    peak_mb = torch.cuda.max_memory_allocated(model.device) / 2**20 if cuda else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        nib.save(result.mask, Path(folder) / "mask.nii.gz")
        nib.save(result.anomaly_map, Path(folder) / "map.nii.gz")
    write_s = time.perf_counter() - start
    report = result.report
    labels = np.asarray(result.mask.dataobj)
    slices = report["slices"]["segmented"]
    figures = {"case": study.case_id, "mode": mode, "precision": "bf16" if bf16 else "fp32",
               "shape": list(images["flair"].shape), "slices": slices, "batch_size": batch,
               "network_batches": math.ceil(slices / batch), "visited_steps": report["settings"]["visited_steps"],
               "network_evaluations": report["network_evaluations"], "load_s": load_s,
               **{stage: report["timings_s"].get(stage, 0.0) for stage in STAGES[1:-1]}, "write_s": write_s,
               "segment_volume_s": segment_s, "gpu_peak_mb": peak_mb, "verdict": report["verdict"],
               "tumour_voxels": int((labels > 0).sum()), "mask_vs_first": None, "extrapolated": False}
    return figures, labels


def compare_masks(labels: np.ndarray, reference: np.ndarray, reference_precision: str) -> dict:
    """How a label map differs from the reference run's: voxels whose label differs, 3-D Dice of the tumour."""
    return {"reference": reference_precision, "differing_voxels": int((labels != reference).sum()),
            "dice": dice(labels > 0, reference > 0)}


def extrapolate(figures: dict, model, mode: str) -> dict:
    """Scale the network time of a step-limited full-mode run to the mode's calibrated T_f."""
    forward, _, _ = resolve_options(model, InferenceOptions(mode=mode))
    planned = len(forward.visited_steps)
    scale = planned / figures["visited_steps"]
    added_s = figures["network_s"] * (scale - 1)
    return {**figures, "network_s": figures["network_s"] + added_s,
            "segment_volume_s": figures["segment_volume_s"] + added_s, "visited_steps": planned,
            "network_evaluations": int(round(figures["network_evaluations"] * scale)), "extrapolated": True}


def time_cli(study: Study, model_path: Path, device: str, mode: str, forward_steps: int | None,
             batch_size: int | str | None) -> dict:
    """``anofpdm segment`` on ``study`` in a fresh process: wall time with process start, and its report's timings
    (``forward_steps``: a step-limited run, not extrapolated)."""
    batch = _batch(batch_size, study.read(), torch.device(device))
    with tempfile.TemporaryDirectory() as folder:
        report_path = Path(folder) / "report.json"
        command = [sys.executable, "-m", "anofpdm.cli", "segment", "--model", str(model_path), "--flair",
                   str(study.flair), "--out", str(Path(folder) / "mask.nii.gz"), "--report", str(report_path),
                   "--device", device, "--mode", mode]
        command += ["--t2", str(study.t2)] if study.t2 is not None else []
        command += ["--steps", str(forward_steps)] if forward_steps else []
        command += ["--batch-size", str(batch)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
        wall_s = time.perf_counter() - start
        report = json.loads(report_path.read_text())
    return {"case": study.case_id, "mode": mode, "precision": "fp32", "batch_size": batch,
            "visited_steps": report["settings"]["visited_steps"], "wall_s": wall_s,
            "network_s": report["timings_s"]["network_s"], "slices": report["slices"]["segmented"],
            "verdict": report["verdict"]}


def _cells(figures: dict) -> list[str]:
    label = f"{figures['mode']} {figures['precision']}" + (" (extrapolated)" if figures["extrapolated"] else "")
    total = figures["load_s"] + figures["segment_volume_s"] + figures["write_s"]
    compared = figures["mask_vs_first"]
    versus = "-" if compared is None else (f"{compared['differing_voxels']} / {compared['dice']:.4f} "
                                           f"(vs {compared['reference']})")
    peak = "-" if figures["gpu_peak_mb"] is None else f"{figures['gpu_peak_mb']:.0f}"
    return [figures["case"], label, str(figures["visited_steps"]), f"{figures['slices']} / {figures['batch_size']}",
            *(f"{figures[s]:.2f}" for s in STAGES), f"{figures['segment_volume_s']:.2f}", f"{total:.2f}",
            f"{figures['network_evaluations'] / figures['network_s']:.0f}", peak, figures["verdict"],
            str(figures["tumour_voxels"]), versus]


def markdown(header: dict, runs: list[dict], cli_runs: list[dict]) -> str:
    """The figures as markdown tables."""
    columns = ["case", "mode, precision", "visited steps", "slices / batch", *(s[:-2] + " (s)" for s in STAGES),
               "segment_volume (s)", "total (s)", "network slice-evaluations / s", "GPU peak (MiB)", "verdict",
               "tumour voxels", "mask vs first precision: differing voxels / 3-D Dice"]
    lines = [f"Device {header['device']} ({header['device_name']}), torch {header['torch']}, model "
             f"{header['model']} (loaded in {header['model_load_s']:.2f} s, once per server); "
             f"{header['threads']} CPU threads.", "",
             "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(_cells(figures)) + " |" for figures in runs]
    if header["full_steps"]:
        lines += ["", f"Full mode measured to {header['full_steps']} forward steps, its network time extrapolated "
                      "linearly in visited steps (`anofpdm segment`'s below: not extrapolated)."]
    if cli_runs:
        lines += ["", "`anofpdm segment`, process start included:", "",
                  "| case | mode, precision | visited steps | slices / batch | wall (s) | network (s) | verdict |",
                  "|---" * 7 + "|"]
        lines += [f"| {r['case']} | {r['mode']} {r['precision']} | {r['visited_steps']} | {r['slices']} / "
                  f"{r['batch_size']} | {r['wall_s']:.2f} | {r['network_s']:.2f} | {r['verdict']} |"
                  for r in cli_runs]
    return "\n".join(lines) + "\n"


def publish(out: Path | None, header: dict, runs: list[dict], cli_runs: list[dict]) -> None:
    """Replace ``out``'s JSON and markdown with the figures so far (atomically: a killed run keeps
    the last complete pair)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "volume_latency.json") as path:
        path.write_text(json.dumps({**header, "runs": runs, "cli_runs": cli_runs}, indent=2))
    with atomic_path(out / "volume_latency.md") as path:
        path.write_text(markdown(header, runs, cli_runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="BraTS / MSD / synthetic cases")
    source.add_argument("--studies", type=Path, help="a MONAI Label studies folder (<ID>.nii.gz, t2/<ID>.nii.gz)")
    parser.add_argument("--cases", "--case", type=comma_list,
                        help="comma list of case ids to time, or 'all' (default: the first case)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--fast-mode", default="fast")
    parser.add_argument("--full-mode", default="full")
    parser.add_argument("--full-steps", type=int,
                        help="run the full mode to this many forward steps only and extrapolate its network time")
    parser.add_argument("--batch-size", type=batch_size_arg, default=None,
                        help=f"slices per network batch, or {WHOLE_VOLUME!r}: all of a volume's slices in one "
                             "(default: the pipeline's)")
    parser.add_argument("--precisions", type=comma_list, default="fp32",
                        help="comma list of fp32, bf16 (bf16: autocast, for GPUs); a repeat is timed again")
    parser.add_argument("--cli-case", help="also time `anofpdm segment` on this case in each mode (fp32)")
    parser.add_argument("--out", type=Path, help="write volume_latency.json and .md here after every run")
    parser.add_argument("--glibc-default-heap", action="store_true",
                        help="leave glibc's allocator as it is, without the CLI's and app's reuse_heap_memory")
    args = parser.parse_args()
    if not args.glibc_default_heap:
        reuse_heap_memory()
    precisions = list(args.precisions)
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")

    studies = data_studies(args.data) if args.data else folder_studies(args.studies)
    by_id = {study.case_id: study for study in studies}
    wanted = [studies[0].case_id] if not args.cases else list(by_id) if args.cases == ("all",) else args.cases
    unknown = [case for case in [*wanted, *([args.cli_case] if args.cli_case else [])] if case not in by_id]
    if unknown:
        raise SystemExit(f"case(s) {unknown} not found under {args.data or args.studies}")
    start = time.perf_counter()
    model = load_model(args.model, args.device)
    header = {"device": str(model.device),
              "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "model": str(args.model),
              "model_load_s": time.perf_counter() - start, "full_steps": args.full_steps,
              "batch_size": args.batch_size, "precisions": precisions}
    _warm_up(model, precisions)
    print(f"cases {', '.join(wanted)}; device {header['device']} ({header['device_name']}); threads "
          f"{header['threads']}; model load {header['model_load_s']:.2f} s (once per server, not per volume)",
          flush=True)
    runs, measured_full, cli_runs = [], [], []
    for case in wanted:
        for mode, steps in ((args.fast_mode, None), (args.full_mode, args.full_steps)):
            reference = None
            for precision in precisions:
                figures, labels = measure(model, by_id[case], mode, steps, args.batch_size, precision == "bf16")
                if reference is None:
                    reference = labels
                else:
                    figures["mask_vs_first"] = compare_masks(labels, reference, precisions[0])
                if steps:
                    measured_full.append(figures)
                    figures = extrapolate(figures, model, mode)
                runs.append(figures)
                print("| " + " | ".join(_cells(figures)) + " |", flush=True)
                publish(args.out, header, runs, cli_runs)
    if args.cli_case:
        for mode, steps in ((args.fast_mode, None), (args.full_mode, args.full_steps)):
            cli_runs.append(time_cli(by_id[args.cli_case], args.model, str(model.device), mode, steps,
                                     args.batch_size))
            publish(args.out, header, runs, cli_runs)
    print(markdown(header, runs, cli_runs))
    print(json.dumps({**header, "runs": runs, "step_limited_full_runs": measured_full, "cli_runs": cli_runs},
                     indent=2))


if __name__ == "__main__":
    main()
