"""Reading input volumes (NIfTI, NRRD, MetaImage) and recognising swapped sequences by name
(``anofpdm.volumes.reading``)."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from anofpdm.volumes.reading import check_sequence_name, named_sequences, read_volume, split_channels
from anofpdm.volumes.checks import InputError


@pytest.mark.parametrize(("name", "named"), [
    ("BraTS2021_00000_flair.nii.gz", {"flair"}),
    ("BraTS2021_00000_t2.nii.gz", {"t2"}),
    ("BraTS2021_00000_t1ce.nii.gz", {"t1ce"}),
    ("BraTS-GLI-00000-000-t2f.nii.gz", {"flair"}),  # BraTS 2023: t2f is the FLAIR, t2w the T2
    ("BraTS-GLI-00000-000-t2w.nii.gz", {"t2"}),
    ("BraTS-GLI-00000-000-t1n.nii.gz", {"t1"}),
    ("AX_T2_FLAIR", {"flair"}),  # a T2-weighted FLAIR is a FLAIR
    ("t2_tirm_tra_dark-fluid", {"flair"}),  # Siemens' FLAIR series
    ("sub-01_T1w.nii.gz", {"t1"}),
    ("t2flair_case", set()),  # one word: not a sequence name
    ("SYN_00000.nii.gz", set()),
    ("tmpk2f9_x1.nii.gz", set()),
])
def test_named_sequences(name, named):
    assert named_sequences(name) == named


def test_a_file_named_as_another_sequence_is_refused():
    check_sequence_name("flair", "BraTS2021_00000_flair.nii.gz")
    check_sequence_name("flair", "SYN_00000.nii.gz")  # no sequence in the name: nothing to judge
    check_sequence_name("t2", "t2.nii.gz")
    with pytest.raises(InputError, match=r"the file given as the FLAIR is named 'case_t2.nii.gz', which says T2: "
                                         r"are the sequences swapped\?"):
        check_sequence_name("flair", "case_t2.nii.gz")
    with pytest.raises(InputError, match=r"the file given as the T2 is named 'AX_T2_FLAIR', which says FLAIR"):
        check_sequence_name("t2", "AX_T2_FLAIR")


def test_nrrd_and_metaimage_volumes_read_as_their_nifti(tmp_path):
    """ITK's reading of a NIfTI file, saved as NRRD / MetaImage, comes back as nibabel reads the NIfTI: same
    voxels in the same order, same affine (two independent readers of one grid)."""
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 100, (7, 9, 5)).astype(np.float32)
    affine = np.array([[0.0, 0.0, 5.0, -30.0], [-4.0, 0.0, 0.0, 80.0], [0.0, 4.0, 0.0, -60.0], [0.0, 0.0, 0.0, 1.0]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "case.nii.gz")
    itk_image = sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(itk_image, str(tmp_path / f"case{suffix}"))
        image = read_volume(tmp_path / f"case{suffix}", "FLAIR")
        assert image.shape == data.shape and np.array_equal(image.get_fdata(dtype=np.float32), data)
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)

    vector = sitk.Compose(itk_image, itk_image * 2.0)  # Slicer's multi-component volume: FLAIR, T2
    sitk.WriteImage(vector, str(tmp_path / "two.nrrd"))
    channels = split_channels(read_volume(tmp_path / "two.nrrd", "image"), "two.nrrd")
    assert np.array_equal(channels.images["t2"].get_fdata(dtype=np.float32), 2 * data)
    np.testing.assert_allclose(channels.images["flair"].affine, affine, atol=1e-5)


def test_unreadable_or_unsupported_volumes_are_input_errors(tmp_path):
    sitk.WriteImage(sitk.Image([6, 5], sitk.sitkFloat32), str(tmp_path / "plane.nrrd"))
    with pytest.raises(InputError, match=r"FLAIR file .*plane.nrrd has 2 dimensions \(6, 5\); expected a 3-D volume"):
        read_volume(tmp_path / "plane.nrrd", "FLAIR")
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\n")
    with pytest.raises(InputError, match="cannot read T2 file .*broken.nrrd"):
        read_volume(tmp_path / "broken.nrrd", "T2")
    with pytest.raises(InputError, match=r"case.mgz: only NIfTI \(.nii.gz, .nii\) and NRRD / MetaImage"):
        read_volume(tmp_path / "case.mgz", "T2")
    with pytest.raises(InputError, match="T2 file not found"):
        read_volume(tmp_path / "absent.nrrd", "T2")
