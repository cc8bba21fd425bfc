"""The MONAI Label app in-process: the infer task on small volumes for every input convention.

The app package is ``apps/anofpdm/lib`` (imported as ``lib``, as MONAI Label does). The model is the
tiny random-weight network of ``conftest`` with a calibration that flags every slice (c* = 2), and
requests use ``median_kernel=1``, ``min_lesion_mm3=0`` so that the masks are not empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from anofpdm.method.diffusion import ScheduleConfig
from anofpdm.method.model import build_network, load_model, save_checkpoint
from anofpdm.volumes.checks import InputError
from conftest import TINY, check_label_values, datastore_state, make_volume_pair, tiny_calibration
from monailabel.utils.sessions import Sessions

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "apps" / "anofpdm"
sys.path.insert(0, str(APP_DIR))  # the app's own package `lib`, as `monailabel start_server` imports it

import lib.configs  # noqa: E402
from lib.infers.anofpdm import SEGMENT_NAMES, ModelUnavailableError, _with_segment  # noqa: E402
from monailabel.interfaces.utils.app import app_instance  # noqa: E402

# an oblique-free but permuted, flipped and shifted grid: the label must come back on exactly this grid
AFFINE = np.array([[0.0, 0.0, 5.0, -30.0], [-4.0, 0.0, 0.0, 80.0], [0.0, 4.0, 0.0, -60.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (40, 44, 12)
# the paper's rule with unhealthy_model's c* masks a quantile of every slice: lesions for the mechanics to handle
SHOW_LESIONS = {"median_kernel": 1, "min_lesion_mm3": 0, "decision_rule": "paper"}
OPTIONS = {"device", "mode", "forward_steps", "stride", "guidance", "encoding", "min_lesion_mm3", "seed",
           "mark_uncertain", "decision_rule", "registration", "brain_extraction", "min_brain_fraction", "brain_segment",
           "bias_correction", "periventricular_findings", "findings_segment", "t2"}


@pytest.fixture(autouse=True)
def results_in_tmp_path(tmp_path, monkeypatch):
    """The task writes its results to the temp folder: keep them in the test's own folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def pair() -> dict[str, nib.Nifti1Image]:
    return make_volume_pair(SHAPE, AFFINE)


def make_task(model_path: Path, studies: Path | None = None, sessions: Sessions | None = None):
    """The infer task as the app builds it: through the ``anofpdm`` config module."""
    config = lib.configs.AnoFPDM()
    config.init("anofpdm", str(REPO / "model"), {"model_path": str(model_path), "device": "cpu"}, None,
                studies=str(studies) if studies else None, sessions=lambda: sessions)
    return config.infer()


def write_studies(root: Path, pair: dict[str, nib.Nifti1Image], case: str = "case1") -> Path:
    """Convention 1: ``studies/<id>.nii.gz`` (FLAIR) and ``studies/t2/<id>.nii.gz``."""
    (root / "t2").mkdir(parents=True, exist_ok=True)
    nib.save(pair["flair"], root / f"{case}.nii.gz")
    nib.save(pair["t2"], root / "t2" / f"{case}.nii.gz")
    return root / f"{case}.nii.gz"


def multichannel(pair: dict[str, nib.Nifti1Image], channels: int) -> nib.Nifti1Image:
    """Convention 2: one 4-D image, channels last: (FLAIR, T2) or MSD Task01 (FLAIR, T1w, T1gd, T2w)."""
    flair, t2 = pair["flair"].get_fdata(dtype=np.float32), pair["t2"].get_fdata(dtype=np.float32)
    stack = [flair, t2] if channels == 2 else [flair, 0.5 * flair, 0.7 * t2, t2]
    return nib.Nifti1Image(np.stack(stack, axis=-1), pair["flair"].affine)


def check_result(label_file: str, result: dict, flair: nib.Nifti1Image) -> np.ndarray:
    """The label and the map lie on the FLAIR grid; the JSON holds the report and agrees with the mask."""
    label = nib.load(label_file)
    mask = np.asanyarray(label.dataobj)
    assert label.shape == flair.shape and np.array_equal(label.affine, flair.affine)
    assert label.get_data_dtype() == np.uint8
    check_label_values(mask, result)
    assert {"verdict", "score", "cosine_threshold", "unhealthy_probability", "uncertain_slices", "lesions",
            "total_volume_ml", "network_evaluations", "settings"} <= set(result)
    assert len(result["slices"]["unhealthy_probability"]) == result["slices"]["segmented"]
    assert set(result["slices"]["end_step"]) == {"flair", "t2"}
    assert {"preprocess_s", "network_s", "postprocess_s", "write_s", "total_s"} <= set(result["timings_s"])
    voxel_ml = abs(np.linalg.det(flair.affine[:3, :3])) / 1000.0
    tumour = np.isin(mask, (1, 2))  # 4: periventricular findings, shown apart
    assert result["total_volume_ml"] == pytest.approx(np.count_nonzero(tumour) * voxel_ml, abs=1e-3)
    assert result["lesion_count"] == len(result["lesions"])
    assert result["verdict"] == ("unhealthy" if tumour.any() else "healthy")
    anomaly = nib.load(result["anomaly_map"])
    assert Path(result["anomaly_map"]).name.startswith(Path(label_file).name.split("_label")[0])
    assert result["anomaly_map_url"] == "/infer/anofpdm/anomaly_maps/" + Path(result["anomaly_map"]).name
    assert anomaly.shape == flair.shape and np.array_equal(anomaly.affine, flair.affine)
    assert anomaly.get_data_dtype() == np.float32
    json.dumps(result)  # the result must travel as JSON
    return mask


# ---- conventions ---------------------------------------------------------------------------------------
def test_datastore_convention_t2_folder(tmp_path, unhealthy_model, pair):
    flair_path = write_studies(tmp_path / "studies", pair)
    task = make_task(unhealthy_model, tmp_path / "studies")
    label_file, result = task({"image": str(flair_path), **SHOW_LESIONS})
    mask = check_result(label_file, result, pair["flair"])
    assert mask.any() and result["verdict"] == "unhealthy"
    assert result["inputs"] == {"flair": str(flair_path), "t2": str(tmp_path / "studies" / "t2" / "case1.nii.gz")}


def test_the_task_on_the_demo_studies(unhealthy_model):
    """The bundled demo studies (BraTS grid, convention 1) through the task: label and map on each FLAIR's grid,
    label values and report fields, and the datastore left as it was."""
    studies = REPO / "demo" / "studies"
    before = datastore_state(studies)
    task = make_task(unhealthy_model, studies)
    for case in ("SYN_00000", "SYN_00001", "SYN_00002"):
        label_file, result = task({"image": str(studies / f"{case}.nii.gz"), **SHOW_LESIONS})
        flair = nib.load(studies / f"{case}.nii.gz")
        assert check_result(label_file, result, flair).any() and flair.shape == (240, 240, 155)
        assert result["inputs"] == {"flair": str(studies / f"{case}.nii.gz"),
                                    "t2": str(studies / "t2" / f"{case}.nii.gz")}
    assert datastore_state(studies) == before


@pytest.mark.parametrize("channels", [2, 4])
def test_multichannel_image_equals_separate_files(tmp_path, unhealthy_model, pair, channels):
    reference_label, _ = make_task(unhealthy_model, tmp_path / "studies")(
        {"image": str(write_studies(tmp_path / "studies", pair)), **SHOW_LESIONS})
    path = tmp_path / f"multi{channels}.nii.gz"
    nib.save(multichannel(pair, channels), path)
    label_file, result = make_task(unhealthy_model)({"image": str(path), **SHOW_LESIONS})
    mask = check_result(label_file, result, pair["flair"])
    assert np.array_equal(mask, np.asanyarray(nib.load(reference_label).dataobj))
    assert result["inputs"]["t2"] == f"{path} [channel {channels} of {channels}]"


def test_upload_with_t2_path_parameter(tmp_path, unhealthy_model, pair):
    nib.save(pair["flair"], tmp_path / "upload.nii.gz")
    nib.save(pair["t2"], tmp_path / "t2_elsewhere.nii.gz")
    label_file, result = make_task(unhealthy_model)(
        {"image": str(tmp_path / "upload.nii.gz"), "t2": str(tmp_path / "t2_elsewhere.nii.gz"), **SHOW_LESIONS})
    assert check_result(label_file, result, pair["flair"]).any()
    assert result["inputs"]["t2"] == str(tmp_path / "t2_elsewhere.nii.gz")


def test_t2_from_a_session_and_multi_file_session(tmp_path, unhealthy_model, pair):
    sessions = Sessions(str(tmp_path / "sessions"))
    nib.save(pair["t2"], tmp_path / "t2.nii.gz")
    t2_session, _ = sessions.add_session(str(tmp_path / "t2.nii.gz"))
    nib.save(pair["flair"], tmp_path / "flair.nii.gz")
    task = make_task(unhealthy_model, sessions=sessions)
    label_a, result_a = task({"image": str(tmp_path / "flair.nii.gz"), "t2_session": t2_session, **SHOW_LESIONS})
    assert f"(session {t2_session})" in result_a["inputs"]["t2"]

    folder = tmp_path / "upload"  # PUT /session/ with two files makes a session whose image is a folder
    folder.mkdir()
    nib.save(pair["flair"], folder / "BraTS_00001_flair.nii.gz")
    nib.save(pair["t2"], folder / "BraTS_00001_t2.nii.gz")
    both, _ = sessions.add_session(str(folder))
    label_b, result_b = task({"image": sessions.get_session(both).image, **SHOW_LESIONS})
    mask_a, mask_b = (check_result(f, r, pair["flair"]) for f, r in ((label_a, result_a), (label_b, result_b)))
    assert mask_a.any() and np.array_equal(mask_a, mask_b)
    assert result_b["inputs"]["t2"].endswith("BraTS_00001_t2.nii.gz")

    with pytest.raises(InputError, match="session 'nope' not found"):
        task({"image": str(tmp_path / "flair.nii.gz"), "t2_session": "nope"})


def test_datastore_does_not_list_the_t2_folder(tmp_path, tiny_model_path, pair):
    write_studies(tmp_path / "studies", pair, "case1")
    write_studies(tmp_path / "studies", pair, "case2")
    app = app_instance(str(APP_DIR), str(tmp_path / "studies"), {"model_path": str(tiny_model_path)})
    assert sorted(app.datastore().list_images()) == ["case1", "case2"]
    info = app.info()
    assert info["models"]["anofpdm"]["labels"] == {"tumour": 1, "tumour (uncertain)": 2}
    assert info["labels"] == ["tumour", "tumour (uncertain)"]
    result = app.infer({"model": "anofpdm", "image": "case2"})
    assert result["params"]["inputs"]["t2"] == str((tmp_path / "studies" / "t2" / "case2.nii.gz").resolve())
    assert nib.load(result["file"]).shape == SHAPE


# ---- options, progress, outputs ------------------------------------------------------------------------
def test_config_lists_the_options_slicer_shows(tiny_model_path):
    config = make_task(tiny_model_path).config()
    assert set(config) == OPTIONS
    assert config["mode"] == ["fast", "fast-ddpm", "full", "full-ddpm"] and config["device"][0] == "cpu"
    assert config["encoding"] == ["calibrated", "ddim", "ddpm"] and config["forward_steps"] == "calibrated"
    assert config["mark_uncertain"] is True  # a checkbox in Slicer, ticked
    assert config["decision_rule"] == ["volume", "paper"]  # a drop-down, the per-volume rule first (the default)
    assert config["t2"] == ""  # a text cell in Slicer: the T2's path on the server
    assert config["brain_extraction"] == ["auto", "always", "never"]  # a drop-down, auto (the default) first
    assert config["bias_correction"] == ["none", "n4"]  # a drop-down, off (the default) first
    assert config["periventricular_findings"] == ["leave-out", "keep"]  # a drop-down, the default first
    assert config["brain_segment"] is False  # a checkbox, off: the label map holds the tumour only
    assert config["findings_segment"] is True  # a checkbox, on: the findings left out of the tumour are shown


def test_the_label_map_layers_tumour_over_findings_over_brain():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    tumour = np.zeros((6, 6, 4), np.uint8)
    tumour[1:3, 1:3, 1] = 1
    tumour[4, 4, 2] = 2
    findings, brain = np.zeros_like(tumour), np.ones_like(tumour)
    findings[2:5, 2:5, 1] = 1  # overlaps the tumour at (2, 2, 1)
    shown = _with_segment(nib.Nifti1Image(tumour, affine), nib.Nifti1Image(findings, affine), 4)
    shown = np.asanyarray(_with_segment(shown, nib.Nifti1Image(brain, affine), 3).dataobj)
    assert shown.dtype == np.uint8 and shown[2, 2, 1] == 1 and shown[4, 4, 2] == 2
    assert set(np.unique(shown[findings.astype(bool) & (tumour == 0)])) == {4}
    assert set(np.unique(shown[(findings == 0) & (tumour == 0)])) == {3}
    assert "not tumour" in SEGMENT_NAMES[4] and SEGMENT_NAMES[3] == "brain"


def test_request_options_override_the_calibration(tmp_path, tiny_model_path, pair):
    task = make_task(tiny_model_path)
    nib.save(pair["flair"], tmp_path / "f.nii.gz")
    nib.save(pair["t2"], tmp_path / "t2.nii.gz")
    request = {"image": str(tmp_path / "f.nii.gz"), "t2": str(tmp_path / "t2.nii.gz")}
    _, fast = task(request)
    assert fast["settings"]["mode"] == "fast" and fast["settings"]["forward_steps"] == 40 and not fast["warnings"]
    # as Slicer sends them: strings from the table, "calibrated" for untouched cells
    _, full = task({**request, "mode": "full", "forward_steps": "calibrated", "stride": "", "encoding": "calibrated",
                    "seed": "3", "min_lesion_mm3": "100.5"})
    assert (full["settings"]["mode"], full["settings"]["forward_steps"], full["settings"]["stride"]) == ("full", 12, 1)
    assert full["settings"]["seed"] == 3 and full["settings"]["min_lesion_mm3"] == 100.5
    assert full["settings"]["decision_rule"] == "volume"
    _, paper = task({**request, "decision_rule": "paper", "bias_correction": "n4", "periventricular_findings": "keep"})
    assert paper["settings"]["decision_rule"] == "paper" and paper["bias_correction"]["method"] == "n4"
    assert paper["settings"]["periventricular_findings"] == "keep" and paper["periventricular_findings"] == []
    assert fast["settings"]["periventricular_findings"] == "leave-out"
    assert fast["bias_correction"] == {"method": "none", "time_s": 0.0, "field_range": {}}
    _, custom = task({**request, "forward_steps": "20", "guidance": 1.5, "encoding": "ddpm"})
    settings = custom["settings"]
    assert (settings["forward_steps"], settings["guidance"], settings["encoding"]) == (20, 1.5, "ddpm")
    assert len(custom["warnings"]) == 3  # each override of a calibrated setting is flagged
    only_full = tmp_path / "only_full.pt"
    save_checkpoint(only_full, TINY, build_network(TINY).state_dict(), ScheduleConfig().to_dict(),
                    calibration={"full": tiny_calibration(stride=1, forward_steps=12)})
    assert make_task(only_full)(request)[1]["settings"]["mode"] == "full"  # no mode: the first calibrated one
    for bad, message in (({"forward_steps": "many"}, "forward_steps='many' is not a valid int"),
                         ({"stride": 2.5}, "stride=2.5 is not a valid int"),
                         ({"mode": "slow"}, "no calibration for mode 'slow'"),
                         ({"decision_rule": "both"}, "decision_rule must be one of"),
                         ({"min_brain_fraction": 1.5}, "min_brain_fraction must lie in"),
                         ({"bias_correction": "n3"}, "bias_correction must be one of"),
                         ({"periventricular_findings": "drop"}, "periventricular_findings must be one of"),
                         ({"findings_segment": "perhaps"}, "findings_segment='perhaps' is not a valid bool"),
                         ({"device": "abacus"}, "device 'abacus'"),
                         ({"result_extension": ".mha"}, "result_extension '.mha' is not supported"),
                         ({"mark_uncertain": "maybe"}, "mark_uncertain='maybe' is not a valid bool")):
        with pytest.raises(InputError, match=message):
            task({**request, **bad})


def test_progress_is_logged_every_ten_percent(tmp_path, tiny_model_path, pair, caplog):
    nib.save(pair["flair"], tmp_path / "f.nii.gz")
    nib.save(pair["t2"], tmp_path / "t2.nii.gz")
    with caplog.at_level(logging.INFO, logger="lib.infers.anofpdm"):
        make_task(tiny_model_path)({"image": str(tmp_path / "f.nii.gz"), "t2": str(tmp_path / "t2.nii.gz"),
                                    "mode": "full", "forward_steps": 40})
    steps = [r.getMessage() for r in caplog.records if "forward process" in r.getMessage()]
    percents = [int(m.split("forward process ")[1].split("%")[0]) for m in steps]
    assert percents == sorted(percents) and percents[-1] == 100
    assert len(percents) == 11 and [p // 10 for p in percents] == list(range(11))


def test_only_the_newest_anomaly_maps_are_kept(tmp_path, tiny_model_path, pair):
    """MONAI Label deletes a label once sent but not the map beside it: the task bounds the maps it keeps."""
    task = lib.infers.AnoFPDM(str(tiny_model_path), {"tumour": 1}, device="cpu", map_dir=str(tmp_path), kept_maps=2)
    mask = nib.Nifti1Image(np.zeros(pair["flair"].shape, np.uint8), pair["flair"].affine)
    written = []
    for _ in range(3):
        label_path, map_path = task._write(mask, pair["flair"], ".nii.gz")
        label_path.unlink()
        written.append(map_path)
    assert sorted(tmp_path.iterdir()) == sorted(written[1:])
    with pytest.raises(ValueError, match="kept_maps"):
        lib.infers.AnoFPDM(str(tiny_model_path), {"tumour": 1}, kept_maps=0)


def test_nrrd_result_for_slicer_keeps_the_geometry(tmp_path, tiny_model_path, pair):
    nib.save(pair["flair"], tmp_path / "f.nii.gz")
    nib.save(pair["t2"], tmp_path / "t2.nii.gz")
    label_file, result = make_task(tiny_model_path)(
        {"image": str(tmp_path / "f.nii.gz"), "t2": str(tmp_path / "t2.nii.gz"), "result_extension": ".nrrd"})
    assert label_file.endswith("_label.nrrd") and result["anomaly_map"].endswith("_anomaly_map.nii.gz")
    label, flair = sitk.ReadImage(label_file), sitk.ReadImage(str(tmp_path / "f.nii.gz"))
    assert label.GetSize() == flair.GetSize() and label.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(label.GetOrigin(), flair.GetOrigin()) and np.allclose(label.GetDirection(), flair.GetDirection())
    assert np.allclose(label.GetSpacing(), flair.GetSpacing())


def test_nrrd_volumes_segment_as_their_nifti(tmp_path, unhealthy_model, pair):
    """A datastore of NRRD files (3D Slicer's format; MONAI Label lists them as images), the T2 at t2/<id>.nrrd:
    the same mask as from the NIfTI files they were converted from, on the same grid."""
    studies = tmp_path / "studies"
    (studies / "t2").mkdir(parents=True)
    for name, folder in (("flair", studies), ("t2", studies / "t2")):
        nib.save(pair[name], tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")), str(folder / "case.nrrd"))
    task = make_task(unhealthy_model, studies)
    reference, _ = task({"image": str(tmp_path / "flair.nii.gz"), "t2": str(tmp_path / "t2.nii.gz"), **SHOW_LESIONS})
    label, result = task({"image": str(studies / "case.nrrd"), **SHOW_LESIONS})
    assert result["inputs"] == {"flair": str(studies / "case.nrrd"), "t2": str(studies / "t2" / "case.nrrd")}
    mask = np.asanyarray(nib.load(label).dataobj)
    assert mask.any() and np.array_equal(mask, np.asanyarray(nib.load(reference).dataobj))
    np.testing.assert_allclose(nib.load(label).affine, pair["flair"].affine, atol=1e-5)


# ---- errors ----------------------------------------------------------------------------------------------
def test_missing_t2_names_the_paths_tried(tmp_path, tiny_model_path, pair):
    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(pair["flair"], studies / "lonely.nii.gz")
    task = make_task(tiny_model_path, studies)
    with pytest.raises(InputError) as error:
        task({"image": str(studies / "lonely.nii.gz")})
    assert f"looked for {studies / 't2' / 'lonely.nii.gz'}, {studies / 't2' / 'lonely.nii'}" in str(error.value)
    nib.save(pair["flair"], tmp_path / "upload.nii.gz")
    with pytest.raises(InputError, match=r'"t2": "<path on the server>"\} \(in 3D Slicer: Options, t2\)'):
        task({"image": str(tmp_path / "upload.nii.gz"), "t2": ""})  # Slicer sends the untouched text cell: ""
    with pytest.raises(InputError, match="T2 file not found: /no/such/t2.nii.gz"):
        task({"image": str(tmp_path / "upload.nii.gz"), "t2": "/no/such/t2.nii.gz"})
    nib.save(multichannel(pair, 2), tmp_path / "multi.nii.gz")
    with pytest.raises(InputError, match="T2 is given twice"):
        task({"image": str(tmp_path / "multi.nii.gz"), "t2": str(tmp_path / "upload.nii.gz")})
    with pytest.raises(InputError, match="T2 is given twice: .* as the request parameter t2_series"):
        task({"image": str(tmp_path / "multi.nii.gz"), "t2_series": "1.2.3"})
    with pytest.raises(InputError, match="give one of t2, t2_series, not several"):
        task({"image": str(tmp_path / "upload.nii.gz"), "t2": str(tmp_path / "upload.nii.gz"), "t2_series": "1.2.3"})
    with pytest.raises(InputError, match="t2_series names a DICOM series: it needs a DICOMweb datastore"):
        task({"image": str(tmp_path / "upload.nii.gz"), "t2_series": "1.2.3"})


def test_sequences_named_as_swapped_are_refused(tmp_path, tiny_model_path, pair):
    """The request's 3-D image and the t2 path are judged by their names; the image by the name its client gave
    it (``image_name``: the upload's file name, or the volume's name in Slicer) when there is one."""
    task = make_task(tiny_model_path)
    for name in ("case_flair", "case_t2", "upload"):
        nib.save(pair["t2" if name == "case_t2" else "flair"], tmp_path / f"{name}.nii.gz")
    flair, t2 = str(tmp_path / "case_flair.nii.gz"), str(tmp_path / "case_t2.nii.gz")
    with pytest.raises(InputError, match="the file given as the FLAIR is named 'case_t2.nii.gz', which says T2"):
        task({"image": t2, "t2": flair})
    with pytest.raises(InputError, match="the file given as the T2 is named 'case_flair.nii.gz', which says FLAIR"):
        task({"image": str(tmp_path / "upload.nii.gz"), "t2": flair})
    with pytest.raises(InputError, match="the file given as the FLAIR is named 'BraTS_001_t2', which says T2"):
        task({"image": str(tmp_path / "upload.nii.gz"), "image_name": "BraTS_001_t2", "t2": t2})
    _, result = task({"image": str(tmp_path / "upload.nii.gz"), "image_name": "AX T2 FLAIR", "t2": t2})
    assert result["inputs"] == {"flair": str(tmp_path / "upload.nii.gz"), "t2": t2}


def bad_inputs(pair: dict[str, nib.Nifti1Image]) -> dict[str, tuple[nib.Nifti1Image | bytes, nib.Nifti1Image, str]]:
    """name -> (FLAIR image or raw bytes, T2 image, expected message)."""
    flair, t2 = pair["flair"].get_fdata(dtype=np.float32), pair["t2"]
    nan = flair.copy()
    nan[10, 10, 5] = np.nan
    inf = flair.copy()
    inf[3, 3, 3] = np.inf
    return {
        "corrupt": (b"\x1f\x8b\x08\x00 this is not a NIfTI file", t2, "cannot read image"),
        "flat": (nib.Nifti1Image(flair[:, :, 5], AFFINE), t2, r"has shape \(40, 44\): expected a 3-D FLAIR"),
        "three_channels": (nib.Nifti1Image(np.stack([flair] * 3, -1), AFFINE), t2, "4-D image with channels last"),
        "nan": (nib.Nifti1Image(nan, AFFINE), t2, "flair contains 1 NaN/Inf voxels"),
        "inf": (nib.Nifti1Image(inf, AFFINE), t2, "flair contains 1 NaN/Inf voxels"),
        "zero": (nib.Nifti1Image(np.zeros_like(flair), AFFINE), t2, "flair is empty"),
        "mismatch": (pair["flair"], nib.Nifti1Image(np.ones((40, 44, 10), np.float32), AFFINE),
                     r"t2 and flair do not overlap: Dice 0\.63 on the flair grid"),  # a block on 10 of 12 slices
        "z_scored": (nib.Nifti1Image((flair - flair.mean()) / flair.std(), AFFINE), t2,
                     "flair has 55% negative voxels"),  # the background: 11600 of 21120 voxels
        # 21120 nonzero voxels of 640 mm^3: more than any brain, so a head to extract, in which no brain is found
        "head_without_a_brain": (nib.Nifti1Image(flair + 1.0, AFFINE * [[2], [2], [2], [1]]), t2,
                                 r"brain extraction on flair found \d+ mL of brain, outside the plausible 500-3000"),
        "misaligned": (pair["flair"], nib.Nifti1Image(np.roll(t2.get_fdata(dtype=np.float32), 20, axis=1), AFFINE),
                       r"t2 and flair do not overlap: Dice 0\.71 on the flair grid, 0\.71 after rigid registration"),
        # (rolled by 20 of 44 columns, the brain wraps round: no rigid motion undoes it)
        "same_volume": (pair["flair"], pair["flair"], "t2 and flair are the same volume, voxel for voxel"),
    }


def test_bad_inputs_are_clear_input_errors(tmp_path, tiny_model_path, pair):
    studies = tmp_path / "studies"
    (studies / "t2").mkdir(parents=True)
    task = make_task(tiny_model_path, studies)
    for name, (flair, t2, message) in bad_inputs(pair).items():
        path = studies / f"{name}.nii.gz"
        if isinstance(flair, bytes):
            path.write_bytes(flair)
        else:
            nib.save(flair, path)
        nib.save(t2, studies / "t2" / f"{name}.nii.gz")
        with pytest.raises(InputError, match=message):
            task({"image": str(path)})
    with pytest.raises(InputError, match=str(studies / "t2" / "mismatch.nii.gz")):  # a mismatch names the T2 used
        task({"image": str(studies / "mismatch.nii.gz")})
    with pytest.raises(InputError, match=r"volume.mgz: only NIfTI \(.nii.gz, .nii\) and NRRD / MetaImage"):
        task({"image": str(tmp_path / "volume.mgz")})
    with pytest.raises(InputError, match="names no image file"):
        task({"image": ""})


# ---- no weights: never serve a random network ------------------------------------------------------------
def test_no_weights_no_model(tmp_path, pair):
    task = make_task(tmp_path / "missing.pt")
    assert not task.is_valid()
    with pytest.raises(ModelUnavailableError, match=f"model weights not found at {tmp_path / 'missing.pt'}"):
        task({"image": "whatever.nii.gz"})
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    assert not make_task(tmp_path / "corrupt.pt").is_valid()
    save_checkpoint(tmp_path / "uncalibrated.pt", TINY, build_network(TINY).state_dict(), ScheduleConfig().to_dict())
    uncalibrated = make_task(tmp_path / "uncalibrated.pt")
    assert not uncalibrated.is_valid() and "no calibration" in uncalibrated.unavailable_reason()

    write_studies(tmp_path / "studies", pair)
    app = app_instance(str(APP_DIR), str(tmp_path / "studies"), {"model_path": str(tmp_path / "missing.pt")})
    assert app.info()["models"] == {} and app.info()["labels"] == []


def test_the_shipped_model_is_servable_and_its_card_describes_it():
    """``model/anofpdm.pt`` is offered by the app, and ``model/README.md`` names its digest, iterations and c*."""
    path = REPO / "model" / "anofpdm.pt"
    task = make_task(path)
    assert task.is_valid() and task.config()["mode"][0] == "fast"
    model = load_model(path, "cpu")
    assert model.calibration["fast"]["unhealthy_frequency"]
    card = (REPO / "model" / "README.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card
    assert f"{model.training['iterations']} iterations" in card
    assert f"c* = {model.calibration['fast']['cosine_threshold']:.6f}" in card


def test_default_weights_are_the_repository_model_file(tmp_path):
    app = app_instance(str(APP_DIR), str(tmp_path / "studies"), {})
    task = app._infers["anofpdm"]
    assert task.path == REPO / "model" / "anofpdm.pt"
    assert task.is_valid() == task.path.is_file()


def test_uncertain_lesions_are_a_second_segment_unless_turned_off(tmp_path, unhealthy_model, pair):
    """The tiny calibration gives every slice an unhealthy probability of 0.6 or 0.1, so every lesion is uncertain
    (2, its own Slicer segment); turned off, as REST users may send it, the same voxels come back as tumour (1)."""
    request = {"image": str(write_studies(tmp_path / "studies", pair)), **SHOW_LESIONS}
    task = make_task(unhealthy_model, tmp_path / "studies")
    label_file, marked = task(request)
    labels = check_result(label_file, marked, pair["flair"])
    assert set(np.unique(labels)) == {0, 2} and marked["label_names"] == {"tumour (uncertain)": 2}
    assert all(row["unhealthy_probability"] in (0.6, 0.1) for row in marked["lesions"])
    for off in (False, "false", "0"):
        label_file, binary = task({**request, "mark_uncertain": off})
        assert np.array_equal(check_result(label_file, binary, pair["flair"]), (labels > 0).astype(np.uint8))
        assert binary["label_names"] == {"tumour": 1} and binary["lesions"] == [
            {**row, "label": 1} for row in marked["lesions"]]


def test_next_sample_still_picks_when_every_image_was_just_offered(tmp_path, pair):
    """MONAI Label's own random strategy raises once every image was offered within the current second (all
    weights 0); the app's offers one of them. Here the only image was offered 'in the future': weight 0 whatever
    the clock does while the test runs."""
    write_studies(tmp_path / "studies", pair)
    app = app_instance(str(APP_DIR), str(tmp_path / "studies"), {"model_path": str(tmp_path / "missing.pt")})
    image = app.datastore().list_images()[0]
    app.datastore().update_image_info(image, {"strategy": {"random": {"ts": int(time.time()) + 3600}}})
    assert app.next_sample({"strategy": "random"})["id"] == image


def test_the_concurrency_cap_is_a_whole_number_of_at_least_one():
    from lib.queueing import InferenceGate

    assert InferenceGate.from_conf({}).status() == {"max_concurrent": 1, "running": 0, "waiting": 0}
    assert InferenceGate.from_conf({"max_concurrent_inferences": " 3 "}).limit == 3
    for text in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="max_concurrent_inferences must be a whole number >= 1"):
            InferenceGate.from_conf({"max_concurrent_inferences": text})
    with pytest.raises(ValueError, match="an integer >= 1, got True"):
        InferenceGate(True)
