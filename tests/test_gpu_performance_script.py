"""``scripts/gpu_performance.sh``, the one script that measures the GPU figures (docs/performance.md), run unchanged on
the CPU with small settings: the shipped model on four axial planes of a demo study through its tumour, the full mode
to a few steps, fp32 twice (the mask comparison's floor: no voxel may differ)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_performance.sh"
CASE = "SYN_00000"  # the demo study with the large tumour (axial planes 40-124)
PLANES = slice(80, 84)
PRECISIONS = ("fp32", "fp32")
FULL_STEPS = 1


def write_study(studies: Path) -> None:
    """A MONAI Label studies folder holding four axial planes of the demo study through its tumour."""
    (studies / "t2").mkdir(parents=True)
    for source, target in ((REPO / "demo" / "studies" / f"{CASE}.nii.gz", studies / f"{CASE}.nii.gz"),
                           (REPO / "demo" / "studies" / "t2" / f"{CASE}.nii.gz", studies / "t2" / f"{CASE}.nii.gz")):
        nib.save(nib.load(source).slicer[:, :, PLANES], target)


def test_script_measures_both_modes_with_the_volume_in_one_batch_and_compares_masks(tmp_path: Path) -> None:
    write_study(tmp_path / "studies")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "PY": sys.executable, "OUT": str(out), "DEVICE": "cpu",
           "STUDIES": str(tmp_path / "studies"), "CASES": "all",
           "PRECISIONS": ",".join(PRECISIONS), "FULL_STEPS": str(FULL_STEPS), "WHEELS": str(tmp_path / "none")}
    finished = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    figures = json.loads((out / "volume_latency.json").read_text())
    assert figures["device"] == "cpu" and figures["device_name"] == "cpu" and figures["precisions"] == list(PRECISIONS)
    runs = figures["runs"]
    assert [(r["mode"], r["precision"]) for r in runs] == [(m, p) for m in ("fast", "full") for p in PRECISIONS]
    for run in runs:
        assert run["case"] == CASE and run["slices"] == 4
        assert run["batch_size"] == 4 and run["network_batches"] == 1  # every plane of the volume in one batch
        assert run["segment_volume_s"] >= run["network_s"] > 0 and run["gpu_peak_mb"] is None
    for mode in ("fast", "full"):
        first, repeat = (r for r in runs if r["mode"] == mode)
        assert first["mask_vs_first"] is None and first["extrapolated"] == (mode == "full")
        assert repeat["mask_vs_first"] == {"reference": "fp32", "differing_voxels": 0, "dice": 1.0}
    fast = runs[0]
    assert fast["verdict"] == "unhealthy" and fast["tumour_voxels"] > 0  # the fast mode's repeat compared a mask
    assert all(r["visited_steps"] == 600 for r in runs if r["mode"] == "full")  # extrapolated from 1 step

    cli = figures["cli_runs"]
    assert [(r["case"], r["mode"], r["visited_steps"]) for r in cli] == [
        (CASE, "fast", fast["visited_steps"]), (CASE, "full", FULL_STEPS)]
    assert cli[0]["verdict"] == "unhealthy" and all(r["wall_s"] > r["network_s"] > 0 and r["batch_size"] == 4
                                                    for r in cli)

    table = (out / "volume_latency.md").read_text()
    assert f"| {CASE} | fast fp32 |" in table and "`anofpdm segment`, process start included" in table
    assert f"Full mode measured to {FULL_STEPS} forward steps" in (out / "log.txt").read_text()
    assert not list(out.glob("*.tmp"))  # each file was replaced whole
