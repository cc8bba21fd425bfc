"""T2 alignment (``anofpdm.volumes.alignment``): recovered rigid transforms, time per pair, and the segmentation it
gives.

For each study (FLAIR ``<studies>/<id>.nii.gz``, T2 ``<studies>/t2/<id>.nii.gz``, on one grid and aligned), the
T2 is moved by known rigid transforms (rotation about a random axis through the brain centre, 0 to
``--max-rotation`` degrees; shift in a random direction, 0 to ``--max-shift`` mm) and written on three grids:

- ``same``: the FLAIR grid (a T2 moved against the FLAIR, same header: the case ``auto`` must detect);
- ``coarse``: 2 x 2 coarser in-plane (a separately acquired series), NIfTI;
- ``oblique``: a 2-D-style series tilted 15 and 5 degrees, 0.8 mm in-plane, 3 mm slices, saved as NRRD.

Each file is read back as the app reads it and aligned with ``align_to_reference`` (``--registration``,
default ``auto``); the script prints, per pair, the recovered transform's error (rotation in degrees, and the
displacement error at the brain centre and, worst, at the corners of the brain's bounding box, in mm), the
overlap before/after, the wall time and the CPU time of all threads (wall time on a shared machine overstates
it). ``--model`` also segments each ``--segment`` study three times (aligned input, the T2 on the coarse grid,
the T2 moved by ``--segment-rotation``/``--segment-shift`` on the FLAIR grid) and prints the Dice of each mask
against the aligned-input mask. Prints figures; asserts nothing.

    PYTHONPATH=lib python benchmarks/t2_alignment.py --studies demo/studies --trials 4
    PYTHONPATH=lib python benchmarks/t2_alignment.py --registration never --magnitudes 0 0.5 1 2 3
    PYTHONPATH=lib python benchmarks/t2_alignment.py --studies demo/studies --trials 0 --model model/anofpdm.pt
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from anofpdm.volumes.alignment import (
    REGISTRATION_MODES,
    RegistrationSettings,
    align_to_reference,
    nifti_to_itk,
    rigid_motion,
)
from anofpdm.volumes.reading import LPS_TO_RAS, read_volume
from anofpdm.evaluation.metrics import dice

GRIDS = ("same", "coarse", "oblique")
OBLIQUE_TILT_DEG = (15.0, 5.0, 0.0)  # about the R-L, A-P and S-I axes
OBLIQUE_SPACING_MM = (0.8, 0.8, 3.0)
COARSE_FACTOR = 2


def rigid_about(rotation_deg: float, axis: np.ndarray, shift_mm: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4 x 4 RAS matrix: rotation by ``rotation_deg`` about ``axis`` through ``centre``, then a shift."""
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec(np.radians(rotation_deg) * axis / np.linalg.norm(axis)).as_matrix()
    matrix[:3, 3] = centre - matrix[:3, :3] @ centre + shift_mm
    return matrix


def grid_like(flair: nib.Nifti1Image, kind: str, brain_ras: np.ndarray) -> sitk.Image:
    """An empty ITK image on the ``kind`` grid, covering the FLAIR's brain."""
    if kind == "same":
        return nifti_to_itk(np.zeros(flair.shape, np.float32), flair.affine, "grid")
    if kind == "coarse":
        affine = flair.affine.copy()
        affine[:3, :2] *= COARSE_FACTOR
        affine[:3, 3] += (COARSE_FACTOR - 1) / 2.0 * (flair.affine[:3, 0] + flair.affine[:3, 1])
        shape = tuple(-(-n // COARSE_FACTOR) for n in flair.shape[:2]) + (flair.shape[2],)
        return nifti_to_itk(np.zeros(shape, np.float32), affine, "grid")
    # oblique: a box around the brain, axes tilted; LPS-to-RAS flips x and y, the 2-D series' usual orientation
    rotation = Rotation.from_euler("xyz", OBLIQUE_TILT_DEG, degrees=True).as_matrix()
    low, high = brain_ras.min(axis=0) - 20.0, brain_ras.max(axis=0) + 20.0
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    local = corners @ rotation  # coordinates along the tilted axes
    spacing = np.asarray(OBLIQUE_SPACING_MM)
    shape = np.ceil((local.max(axis=0) - local.min(axis=0)) / spacing).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = rotation @ local.min(axis=0)
    return nifti_to_itk(np.zeros(tuple(shape), np.float32), affine, "grid")


def moved_t2(t2: nib.Nifti1Image, grid: sitk.Image, truth_ras: np.ndarray) -> sitk.Image:
    """The T2 sampled on ``grid`` at the points ``truth_ras`` maps each grid point to (linear)."""
    lps = LPS_TO_RAS @ truth_ras @ LPS_TO_RAS
    transform = sitk.AffineTransform(lps[:3, :3].flatten().tolist(), lps[:3, 3].tolist())
    moving = nifti_to_itk(t2.get_fdata(dtype=np.float32), t2.affine, "t2")
    return sitk.Resample(moving, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def transform_error(truth_ras: np.ndarray, recovered_ras: np.ndarray, points: np.ndarray) -> tuple[float, float, float]:
    """Rotation error (degrees) of truth o recovered (identity when exact), and its displacement at the first
    point (the brain centre) and the largest over all ``points`` (mm)."""
    residual = truth_ras @ recovered_ras
    angle, _ = rigid_motion(residual, points[0])
    moved = points @ residual[:3, :3].T + residual[:3, 3]
    errors = np.linalg.norm(moved - points, axis=1)
    return float(angle), float(errors[0]), float(errors.max())


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def brain_points(flair: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """The brain's world centroid followed by its bounding-box corners (RAS mm), and all brain voxel centres."""
    voxels = np.argwhere(np.asanyarray(flair.dataobj) > 0)
    world = nib.affines.apply_affine(flair.affine, voxels)
    low, high = world.min(axis=0), world.max(axis=0)
    corners = [[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    return np.vstack([world.mean(axis=0), corners]), world


def run_pairs(args: argparse.Namespace, settings: RegistrationSettings, folder: Path) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    rows = []
    for study in args.cases:
        flair = read_volume(args.studies / f"{study}.nii.gz", "FLAIR")
        t2 = read_volume(args.studies / "t2" / f"{study}.nii.gz", "T2")
        points, world = brain_points(flair)
        for trial in range(len(args.magnitudes) if args.magnitudes else args.trials):
            axis, direction = rng.normal(size=3), rng.normal(size=3)
            rotation, shift = rng.uniform(0, args.max_rotation), rng.uniform(0, args.max_shift)
            if args.magnitudes:
                rotation = shift = args.magnitudes[trial]
            elif trial == 0:  # the extremes of the range first
                rotation, shift = args.max_rotation, args.max_shift
            truth = rigid_about(rotation, axis, shift * direction / np.linalg.norm(direction), points[0])
            for kind in args.grids:
                grid = grid_like(flair, kind, world)
                suffix = ".nrrd" if kind == "oblique" else ".nii"
                path = write(moved_t2(t2, grid, truth), folder / f"{study}_{kind}_{trial}{suffix}")
                image = read_volume(path, "T2")
                start, cpu = time.perf_counter(), time.process_time()
                _, record = align_to_reference(image, flair, args.registration, settings=settings)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                angle, centre, worst = transform_error(truth, np.asarray(record.transform_ras), points)
                row = {"study": study, "grid": kind, "shape": list(image.shape), "rotation_deg": round(rotation, 2),
                       "shift_mm": round(shift, 2), "action": record.action,
                       "found_deg": round(record.rotation_deg, 2), "found_mm": round(record.translation_mm, 2),
                       "error_deg": round(angle, 3), "error_centre_mm": round(centre, 3),
                       "error_corners_mm": round(worst, 3), "overlap_before": round(record.overlap_before, 4),
                       "overlap_after": round(record.overlap_after, 4), "time_s": round(seconds, 2),
                       "cpu_s": round(cpu, 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                path.unlink()
    return rows


def summarise(rows: list[dict]) -> None:
    for kind in sorted({row["grid"] for row in rows}):
        group = [row for row in rows if row["grid"] == kind]
        print(f"{kind}: {len(group)} pairs, actions {sorted({r['action'] for r in group})}; "
              f"error deg max {max(r['error_deg'] for r in group):.3f}, centre mm max "
              f"{max(r['error_centre_mm'] for r in group):.3f}, corners mm max "
              f"{max(r['error_corners_mm'] for r in group):.3f}; time s median "
              f"{np.median([r['time_s'] for r in group]):.2f}, max {max(r['time_s'] for r in group):.2f}; CPU s (all "
              f"threads) median {np.median([r['cpu_s'] for r in group]):.2f}, max {max(r['cpu_s'] for r in group):.2f}")


def segment_pairs(args: argparse.Namespace, folder: Path) -> None:
    """Dice of the masks from misaligned T2s against the aligned-input mask (the shipped model, slow on a CPU)."""
    import torch

    from anofpdm.method.model import load_model
    from anofpdm.method.pipeline import InferenceOptions, segment_volume

    model = load_model(args.model, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for study in args.segment:
        flair = read_volume(args.studies / f"{study}.nii.gz", "FLAIR")
        t2 = read_volume(args.studies / "t2" / f"{study}.nii.gz", "T2")
        points, world = brain_points(flair)
        moved = rigid_about(args.segment_rotation, np.array([1.0, 1.0, 0.0]),
                            np.array([args.segment_shift, 0.0, 0.0]), points[0])
        variants = {
            "aligned": t2,
            "coarse": read_volume(write(moved_t2(t2, grid_like(flair, "coarse", world), np.eye(4)),
                                        folder / f"{study}_coarse.nii"), "T2"),
            "moved": read_volume(write(moved_t2(t2, grid_like(flair, "same", world), moved),
                                       folder / f"{study}_moved.nii"), "T2"),
        }
        masks = {}
        for name, image in variants.items():
            start = time.perf_counter()
            result = segment_volume(model, {"flair": flair, "t2": image}, InferenceOptions(mode=args.mode))
            masks[name] = np.asanyarray(result.mask.dataobj) > 0
            alignment = result.report["alignment"]["t2"]
            print(json.dumps({"study": study, "t2": name, "action": alignment["action"],
                              "rotation_deg": alignment["rotation_deg"], "translation_mm": alignment["translation_mm"],
                              "mask_ml": result.report["total_volume_ml"],
                              "dice_vs_aligned": round(dice(masks[name], masks["aligned"]), 4),
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=Path, default=Path("demo/studies"))
    parser.add_argument("--cases", nargs="+", default=None, help="study ids (default: every study in --studies)")
    parser.add_argument("--grids", nargs="+", choices=GRIDS, default=list(GRIDS))
    parser.add_argument("--trials", type=int, default=4, help="random rigid transforms per study and grid")
    parser.add_argument("--max-rotation", type=float, default=10.0, help="degrees")
    parser.add_argument("--max-shift", type=float, default=10.0, help="mm")
    parser.add_argument("--magnitudes", type=float, nargs="+",
                        help="instead of random trials: one pair per value, rotated by it (degrees) and shifted by it "
                             "(mm), in random directions (with --registration never: the overlap misalignment leaves)")
    parser.add_argument("--registration", choices=REGISTRATION_MODES, default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK threads")
    parser.add_argument("--working-spacing", type=float, default=RegistrationSettings.working_spacing_mm, help="mm")
    parser.add_argument("--shrink-factors", type=int, nargs="+", default=list(RegistrationSettings.shrink_factors))
    parser.add_argument("--smoothing-mm", type=float, nargs="+",
                        default=list(RegistrationSettings.smoothing_sigmas_mm))
    parser.add_argument("--samples", type=int, default=RegistrationSettings.samples, help="metric samples per level")
    parser.add_argument("--iterations", type=int, default=RegistrationSettings.iterations)
    parser.add_argument("--model", type=Path, help="also segment --segment studies with this model")
    parser.add_argument("--segment", nargs="+", default=["SYN_00000"])
    parser.add_argument("--segment-rotation", type=float, default=4.0, help="degrees, for the moved T2")
    parser.add_argument("--segment-shift", type=float, default=3.6, help="mm, for the moved T2")
    parser.add_argument("--mode", default="fast")
    parser.add_argument("--device")
    args = parser.parse_args()
    args.cases = args.cases or sorted(p.name[: -len(".nii.gz")] for p in args.studies.glob("*.nii.gz"))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = RegistrationSettings(working_spacing_mm=args.working_spacing, shrink_factors=tuple(args.shrink_factors),
                                    smoothing_sigmas_mm=tuple(args.smoothing_mm), samples=args.samples,
                                    iterations=args.iterations)
    with tempfile.TemporaryDirectory() as folder:
        if args.trials or args.magnitudes:
            summarise(run_pairs(args, settings, Path(folder)))
        if args.model:
            segment_pairs(args, Path(folder))


if __name__ == "__main__":
    main()
