"""The ``anofpdm`` command: segment and calibrate on the tiny model, and clear input errors."""

import json

import nibabel as nib
import numpy as np
import pytest

from anofpdm.cli import main
from anofpdm.method.model import load_checkpoint, load_model

from conftest import make_phantom, make_volume_pair, phantom_grid, rigid_ras


@pytest.fixture()
def volume_files(tmp_path):
    paths = {}
    for name, image in make_volume_pair().items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(image, paths[name])
    return paths


def test_segment_writes_mask_map_and_report(tiny_model_path, volume_files, tmp_path):
    out, heat, report = tmp_path / "out" / "mask.nii.gz", tmp_path / "map.nii.gz", tmp_path / "report.json"
    code = main(["segment", "--model", str(tiny_model_path), "--flair", str(volume_files["flair"]),
                 "--t2", str(volume_files["t2"]), "--out", str(out), "--map", str(heat), "--report", str(report)])
    assert code == 0
    flair = nib.load(volume_files["flair"])
    for path in (out, heat):
        image = nib.load(path)
        assert image.shape == flair.shape
        np.testing.assert_array_equal(image.affine, flair.affine)
    assert json.loads(report.read_text())["slices"]["segmented"] == 10
    assert json.loads(report.read_text())["settings"]["mark_uncertain"] is True
    assert main(["segment", "--model", str(tiny_model_path), "--flair", str(volume_files["flair"]),
                 "--t2", str(volume_files["t2"]), "--out", str(out), "--report", str(report),
                 "--no-mark-uncertain"]) == 0
    assert json.loads(report.read_text())["settings"]["mark_uncertain"] is False


def test_segment_options_reach_the_forward_process_with_a_progress_bar(tiny_model_path, volume_files, tmp_path,
                                                                       capsys):
    """Every option the app exposes is a flag here too; overrides of the calibration are reported, and the seed
    draws other noise."""
    args = ["segment", "--model", str(tiny_model_path), "--flair", str(volume_files["flair"]), "--t2",
            str(volume_files["t2"]), "--out", str(tmp_path / "m.nii.gz"), "--mode", "full", "--steps", "8",
            "--stride", "2", "--guidance", "1.5", "--encoding", "ddpm", "--early-stop", "2", "--min-lesion-mm3", "0",
            "--device", "cpu"]
    maps = {}
    for seed in ("3", "4"):
        report = tmp_path / f"report{seed}.json"
        assert main([*args, "--seed", seed, "--map", str(tmp_path / f"map{seed}.nii.gz"), "--report", str(report)]) == 0
        maps[seed] = nib.load(tmp_path / f"map{seed}.nii.gz").get_fdata()
        assert "forward process: 100%" in capsys.readouterr().err
    result = json.loads(report.read_text())
    assert {key: result["settings"][key] for key in ("mode", "forward_steps", "stride", "guidance", "encoding",
                                                     "early_stop", "seed", "min_lesion_mm3", "device")} == {
        "mode": "full", "forward_steps": 8, "stride": 2, "guidance": 1.5, "encoding": "ddpm", "early_stop": 2,
        "seed": 4, "min_lesion_mm3": 0.0, "device": "cpu"}
    assert result["settings"]["visited_steps"] <= 4
    assert any(warning.startswith("guidance=1.5 differs") for warning in result["warnings"])
    assert not np.allclose(maps["3"], maps["4"])


def test_segment_aligns_a_t2_from_another_series(tiny_model_path, tmp_path, capsys):
    """``--t2`` on a coarser grid and moved: the CLI says what it did (and the report holds it); ``--registration
    never`` leaves the moved T2 as it is; a T2 90 mm away is an error naming both files and the overlap."""
    flair, t2 = tmp_path / "flair.nii.gz", tmp_path / "t2.nii.gz"
    nib.save(make_phantom("flair"), flair)
    coarse = ((24, 28, 36), phantom_grid((24, 28, 36), (6.0, 6.0, 3.0)))
    nib.save(make_phantom("t2", *coarse, motion=rigid_ras((0.0, 0.0, 6.0), (4.0, 0.0, 0.0))), t2)
    args = ["segment", "--model", str(tiny_model_path), "--flair", str(flair), "--t2", str(t2),
            "--out", str(tmp_path / "mask.nii.gz"), "--report", str(tmp_path / "report.json")]
    assert main(args) == 0
    out = capsys.readouterr()
    alignment = json.loads((tmp_path / "report.json").read_text())["alignment"]["t2"]
    assert alignment["action"] == "registered" and alignment["source_shape"] == [24, 28, 36]
    assert alignment["rotation_deg"] == pytest.approx(6.0, abs=1.0)
    assert f"t2: registered by {alignment['rotation_deg']:.1f} degrees, {alignment['translation_mm']:.1f} mm" in out.out
    assert "t2 was registered to flair by a large correction" in out.err  # 6 degrees: a warning
    assert nib.load(tmp_path / "mask.nii.gz").shape == make_phantom("flair").shape
    assert main([*args, "--registration", "never"]) == 0
    assert "t2: resampled (brain overlap with the FLAIR" in capsys.readouterr().out
    nib.save(make_phantom("t2", motion=rigid_ras(shift_mm=(0.0, 0.0, -90.0))), t2)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "overlap with Dice 0.00" in err and f"[inputs: flair={flair}, t2={t2}]" in err


def test_segment_reports_missing_and_corrupt_files(tiny_model_path, volume_files, tmp_path, capsys):
    args = ["segment", "--model", str(tiny_model_path), "--flair", str(volume_files["flair"]),
            "--out", str(tmp_path / "m.nii.gz")]
    assert main([*args, "--t2", str(tmp_path / "absent.nii.gz")]) == 2
    assert "T2 file not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 broken")
    assert main([*args, "--t2", str(corrupt)]) == 2
    assert "cannot read T2 file" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_segment_reads_nrrd_as_its_nifti(tiny_model_path, volume_files, tmp_path):
    """The same volumes as NRRD (3D Slicer's format) give the same anomaly map and mask on the same grid."""
    import SimpleITK as sitk

    outputs = {}
    for suffix in (".nii.gz", ".nrrd"):
        files = {name: tmp_path / f"{name}{suffix}" for name in ("flair", "t2")}
        for name, path in files.items():
            sitk.WriteImage(sitk.ReadImage(str(volume_files[name])), str(path))
        mask, heat = tmp_path / f"mask_{suffix[1:]}.nii.gz", tmp_path / f"map_{suffix[1:]}.nii.gz"
        assert main(["segment", "--model", str(tiny_model_path), "--flair", str(files["flair"]), "--t2",
                     str(files["t2"]), "--out", str(mask), "--map", str(heat)]) == 0
        outputs[suffix] = [nib.load(mask), nib.load(heat)]
    reference_map = outputs[".nii.gz"][1].get_fdata()
    assert reference_map.std() > 0
    for reference, image in zip(outputs[".nii.gz"], outputs[".nrrd"]):
        assert np.array_equal(image.affine, nib.load(volume_files["flair"]).affine)
        assert np.array_equal(np.asanyarray(image.dataobj), np.asanyarray(reference.dataobj))


def test_segment_batch_size_and_median_kernel(tiny_model_path, volume_files, tmp_path, capsys):
    """The batch changes speed and memory only (each slice draws its own noise), up to float rounding; the median
    kernel is used."""
    args = ["segment", "--model", str(tiny_model_path), "--flair", str(volume_files["flair"]), "--t2",
            str(volume_files["t2"])]
    maps = {}
    for batch in ("8", "3"):
        heat, report = tmp_path / f"map{batch}.nii.gz", tmp_path / f"report{batch}.json"
        assert main([*args, "--out", str(tmp_path / "m.nii.gz"), "--map", str(heat), "--report", str(report),
                     "--batch-size", batch, "--median-kernel", "1"]) == 0
        maps[batch] = nib.load(heat).get_fdata()
        assert json.loads(report.read_text())["settings"]["median_kernel"] == 1
    np.testing.assert_allclose(maps["3"], maps["8"], rtol=1e-4, atol=1e-9)  # convolutions sum in another order
    assert main([*args, "--out", str(tmp_path / "m.nii.gz"), "--median-kernel", "4"]) == 2
    assert "median_kernel must be odd and positive, got 4" in capsys.readouterr().err


def test_segment_refuses_swapped_or_doubled_sequences(tiny_model_path, volume_files, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    args = ["segment", "--model", str(tiny_model_path), "--out", str(out)]
    assert main([*args, "--flair", str(volume_files["t2"]), "--t2", str(volume_files["flair"])]) == 2
    assert "the file given as the FLAIR is named 't2.nii.gz', which says T2" in capsys.readouterr().err
    copy = tmp_path / "second.nii.gz"
    copy.write_bytes(volume_files["flair"].read_bytes())
    assert main([*args, "--flair", str(volume_files["flair"]), "--t2", str(copy)]) == 2
    assert "t2 and flair are the same volume, voxel for voxel" in capsys.readouterr().err
    assert not out.exists()


def test_bad_settings_are_a_one_line_error_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--cases", "1", "--tumour-volume-ml", "50,10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tumour_volume_ml must be (low, high)") and err.count("\n") == 1
    assert main(["synth", "--out", str(out), "--cases", "1", "--healthy-fraction", "1.5"]) == 2
    assert "healthy_fraction must be in [0, 1]" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_stores_each_mode_in_the_model_file(tiny_model_path, tmp_path):
    from anofpdm.method.model import save_checkpoint

    payload = load_checkpoint(tiny_model_path)
    model_path = tmp_path / "model.pt"
    save_checkpoint(model_path, load_model(tiny_model_path).config, payload["state_dict"], payload["schedule"])
    data = tmp_path / "slices"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "val_images.npy", rng.uniform(-1, 1, (6, 2, 16, 16)).astype(np.float16))
    np.save(data / "val_labels.npy", np.array([0, 1, 0, 1, 0, 1], np.uint8))
    (data / "manifest.json").write_text(json.dumps({"sequences": ["flair", "t2"], "size": 16}))
    code = main(["calibrate", "--model", str(model_path), "--data", str(data), "--modes", "fast",
                 "--steps", "40", "--stride", "8", "--early-stop", "2", "--guidance", "1,2"])
    assert code == 0
    calibration = load_model(model_path).calibration["fast"]
    assert calibration["forward_steps"] == 40 and calibration["guidance"] in (1.0, 2.0)
    assert (calibration["stride"], calibration["early_stop"], calibration["encoding"]) == (8, 2, "ddim")
    assert calibration["validation"]["slices"] == 6 and calibration["validation"]["device"] == "cpu"
    counts = calibration["validation"]
    assert counts["true_positive"] + counts["false_negative"] == 3
    frequency = calibration["unhealthy_frequency"]  # 6 slices, fewer than a group's 20: one group, 3 of 6 unhealthy
    assert len(frequency) == 1 and frequency[0][1] == 0.5

    # every report says which model made it and how its verdict did on the calibration's validation slices
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    for name, image in make_volume_pair().items():
        nib.save(image, volumes / f"{name}.nii.gz")
    report = tmp_path / "report.json"
    assert main(["segment", "--model", str(model_path), "--flair", str(volumes / "flair.nii.gz"), "--t2",
                 str(volumes / "t2.nii.gz"), "--out", str(tmp_path / "mask.nii.gz"), "--report", str(report)]) == 0
    provenance = json.loads(report.read_text())["model"]
    assert provenance["path"] == str(model_path) and provenance["training_iterations"] is None  # no training record
    assert provenance["calibration_validation"] == {"slices": 6, "accuracy": counts["accuracy"], "device": "cpu"}


def test_segment_accepts_one_two_channel_image(tiny_model_path, tmp_path):
    pair = make_volume_pair()
    stacked = np.stack([pair["flair"].get_fdata(), pair["t2"].get_fdata()], axis=-1).astype(np.float32)
    image = tmp_path / "flair_t2.nii.gz"
    nib.save(nib.Nifti1Image(stacked, pair["flair"].affine), image)
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", "--model", str(tiny_model_path), "--flair", str(image), "--out", str(out)]) == 0
    assert nib.load(out).shape == pair["flair"].shape
