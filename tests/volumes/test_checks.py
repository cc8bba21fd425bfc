"""Input checks (``anofpdm.volumes.checks``): each refusal names the sequence and the figure."""

import nibabel as nib
import numpy as np
import pytest

from anofpdm.volumes.checks import MAX_BRAIN_ML, InputError, check_inputs

from conftest import make_volume_pair


def test_input_errors_name_the_problem():
    pair = make_volume_pair()
    affine = pair["flair"].affine
    with pytest.raises(InputError, match="missing input sequence.*t2"):
        check_inputs({"flair": pair["flair"]}, ("flair", "t2"))
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), affine)
    with pytest.raises(InputError, match="t2 has 4 dimensions"):
        check_inputs({"flair": pair["flair"], "t2": four_d}, ("flair", "t2"))
    small = nib.Nifti1Image(pair["t2"].get_fdata()[:-1], affine)
    with pytest.raises(InputError, match="t2 grid .* does not match flair grid"):
        check_inputs({"flair": pair["flair"], "t2": small}, ("flair", "t2"))
    shifted = nib.Nifti1Image(pair["t2"].get_fdata(), affine + np.eye(4) * 0.5)
    with pytest.raises(InputError, match=r"does not match flair grid \(40, 44, 12\) \(or their affines differ\)"):
        check_inputs({"flair": pair["flair"], "t2": shifted}, ("flair", "t2"))
    data = pair["t2"].get_fdata()
    data[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="t2 contains 1 NaN/Inf"):
        check_inputs({"flair": pair["flair"], "t2": nib.Nifti1Image(data, affine)}, ("flair", "t2"))
    empty = nib.Nifti1Image(np.zeros(pair["flair"].shape, np.float32), affine)
    with pytest.raises(InputError, match="flair is empty"):
        check_inputs({"flair": empty, "t2": pair["t2"]}, ("flair", "t2"))


def test_inputs_unlike_a_skull_stripped_brain_are_refused():
    """Z-scored intensities, a noisy background (not skull-stripped), misaligned sequences and one volume given
    as both sequences are errors; interpolation ringing, a stripped brain on the same coarse grid, a one-voxel
    offset and another volume on the same brain mask are not."""
    coarse = np.diag([-6.0, -6.0, 8.0, 1.0])  # 288 mm^3 voxels: the 40 x 44 x 12 grid spans 6.1 L, its brain 2.7 L
    pair = make_volume_pair(affine=coarse)
    flair, t2 = (pair[name].get_fdata(dtype=np.float32) for name in ("flair", "t2"))
    assert (flair > 0).sum() * 0.288 < MAX_BRAIN_ML < flair.size * 0.288  # the test spans the bound (mL)
    check_inputs(pair, ("flair", "t2"))

    def check(flair_data, t2_data):
        check_inputs({"flair": nib.Nifti1Image(flair_data, coarse), "t2": nib.Nifti1Image(t2_data, coarse)},
                     ("flair", "t2"))

    rng = np.random.default_rng(1)
    noisy = flair + rng.uniform(1.0, 5.0, flair.shape).astype(np.float32)
    with pytest.raises(InputError, match=r"flair has 6083 mL of nonzero voxels, more than any skull-stripped brain"):
        check(noisy, t2)
    z_scored = (t2 - t2.mean()) / t2.std()
    with pytest.raises(InputError, match=r"t2 has 55% negative voxels .*z-scored"):  # its background: 11600 of 21120
        check(flair, z_scored)
    ringing = t2.copy()
    ringing.flat[np.flatnonzero(t2)[:50]] = -3.0  # 50 of 9520 brain voxels
    check(flair, ringing)
    # shifted by 15 of the brain's 28 columns, 13 + 3 (wrapped round) still overlap: Dice 16 / 28
    with pytest.raises(InputError, match=r"brain regions \(nonzero voxels\) of t2 and flair overlap with Dice 0\.57"):
        check(flair, np.roll(t2, 15, axis=0))
    check(flair, np.roll(t2, 1, axis=0))
    with pytest.raises(InputError, match=r"t2 and flair are the same volume, voxel for voxel"):
        check(flair, flair.copy())
    check(flair, np.where(flair > 0, flair + 1.0, 0.0).astype(np.float32))  # the FLAIR's brain, other values
    segmentation = np.where(flair > 150, 2.0, 0.0).astype(np.float32)  # the lesion of make_volume_pair
    with pytest.raises(InputError, match=r"Dice 0\.08.*segmentation loaded as an image"):  # 800 / (400 + 9520)
        check(segmentation, t2)
