"""anofpdm.volumes.dicom: NIfTI volumes written as DICOM series read back (SimpleITK / GDCM, as MONAI Label reads
them) on the same grid with the same values; the ``to-dicom`` command."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from anofpdm.cli import main
from anofpdm.volumes.dicom import write_series, write_study
from anofpdm.volumes.reading import read_volume
from conftest import make_volume_pair
from pydicom import dcmread

AFFINE = np.array([[0.0, 0.0, 5.0, -30.0], [-4.0, 0.0, 0.0, 80.0], [0.0, 4.0, 0.0, -60.0], [0.0, 0.0, 0.0, 1.0]])


def read_series(folder) -> nib.Nifti1Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    path = folder.parent / f"{folder.name}.nii.gz"
    sitk.WriteImage(reader.Execute(), str(path))
    return read_volume(path, "series")


@pytest.mark.parametrize("affine", [np.diag([-4.0, -4.0, 5.0, 1.0]), AFFINE], ids=["axial", "rotated"])
def test_study_reads_back_on_the_same_grid(tmp_path, affine):
    pair = make_volume_pair(affine=affine)
    study = write_study(pair, tmp_path, "P1")
    for name, image in pair.items():  # compared in physical space: a reader stacks slices along their normal
        back, image = nib.as_closest_canonical(read_series(study.folders[name])), nib.as_closest_canonical(image)
        np.testing.assert_allclose(back.affine, image.affine, atol=1e-4)
        expected = image.get_fdata()
        np.testing.assert_allclose(back.get_fdata(), expected, atol=1e-4 * np.abs(expected).max())
        first = dcmread(sorted(study.folders[name].glob("*.dcm"))[0])
        assert (first.Modality, first.StudyInstanceUID, first.SeriesInstanceUID) == \
            ("MR", study.study_uid, study.series_uids[name])
        assert first.SeriesDescription == first.ProtocolName == {"flair": "AX FLAIR", "t2": "AX T2"}[name]
    assert write_study(pair, tmp_path / "again", "P1").series_uids == study.series_uids  # same UIDs again


def test_integer_volume_is_stored_as_is(tmp_path):
    data = np.arange(6 * 7 * 3, dtype=np.int16).reshape(6, 7, 3)
    study = write_study({"flair": nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]))}, tmp_path, "P2")
    first = dcmread(sorted(study.folders["flair"].glob("*.dcm"))[0])
    assert float(first.RescaleSlope) == 1.0
    np.testing.assert_array_equal(read_series(study.folders["flair"]).get_fdata(), data)


def test_bad_volumes_are_refused(tmp_path):
    pair = make_volume_pair()
    study = write_study({"flair": pair["flair"]}, tmp_path, "P3")
    sheared = AFFINE.copy()
    sheared[0, 0] = 1.0
    with pytest.raises(ValueError, match="sheared"):
        write_series(nib.Nifti1Image(pair["flair"].get_fdata(), sheared), tmp_path / "s", study, "AX FLAIR", 9)
    with pytest.raises(ValueError, match="3-D"):
        write_series(nib.Nifti1Image(np.ones((4, 4, 4, 2)), AFFINE), tmp_path / "4d", study, "AX FLAIR", 9)
    nan = pair["flair"].get_fdata()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_series(nib.Nifti1Image(nan, AFFINE), tmp_path / "nan", study, "AX FLAIR", 9)
    with pytest.raises(ValueError, match="modality"):
        write_series(pair["flair"], tmp_path / "us", study, "US", 9, modality="US")


def test_to_dicom_command(tmp_path, capsys):
    pair = make_volume_pair()
    for name, image in pair.items():
        nib.save(image, tmp_path / f"case_{name}.nii.gz")
    assert main(["to-dicom", "--flair", str(tmp_path / "case_flair.nii.gz"), "--t2", str(tmp_path / "case_t2.nii.gz"),
                 "--out", str(tmp_path / "dicom"), "--patient-id", "CASE"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["series"]) == {"flair", "t2"}
    assert len(list((tmp_path / "dicom" / "AX_T2").glob("*.dcm"))) == pair["t2"].shape[2]
    swapped = main(["to-dicom", "--flair", str(tmp_path / "case_t2.nii.gz"), "--out", str(tmp_path / "bad"),
                    "--patient-id", "CASE"])
    assert swapped == 2 and "swapped" in capsys.readouterr().err
