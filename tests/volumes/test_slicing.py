"""Volumes to network slices and back (``anofpdm.volumes.slicing``): orientation, field of view, exact grid."""

import nibabel as nib
import numpy as np
import pytest

from anofpdm.volumes.slicing import to_input_grid, to_model_slices

from conftest import make_volume_pair


def _round_trip(images, size, fov, truth):
    slices, geometry, extra = to_model_slices(images, ("flair", "t2"), size, fov, extra={"truth": truth})
    back = to_input_grid(extra["truth"].transpose(1, 2, 0), geometry)
    return slices, geometry, back


def test_identity_geometry_round_trips_exactly():
    """When the network grid equals the input plane spacing, mapping there and back is lossless."""
    images = make_volume_pair(shape=(16, 16, 6), affine=np.diag([15.0, 15.0, 4.0, 1.0]))
    truth = np.zeros((16, 16, 6), dtype=np.float32)
    truth[7:10, 6:11, 2:4] = 1.0
    slices, geometry, back = _round_trip(images, 16, 240.0, truth)
    assert geometry.window_size == (16, 16) and geometry.spacing_mm == (15.0, 15.0, 4.0)
    assert slices.shape == (4, 2, 16, 16)  # only the 4 planes that hold brain
    np.testing.assert_array_equal(back, truth)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("S", "R", "A"), ("P", "I", "L")])
def test_any_orientation_maps_back_onto_the_input_grid(codes):
    """A lesion mask survives the trip through the model grid in any orientation and spacing."""
    ras_shape, spacing = (60, 64, 20), (2.0, 1.5, 3.0)
    target = nib.orientations.axcodes2ornt(codes)
    to_input = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), target)
    ras_affine = np.diag([*spacing, 1.0])
    affine = ras_affine @ nib.orientations.inv_ornt_aff(to_input, ras_shape)
    pair = make_volume_pair(shape=ras_shape)
    images = {k: nib.Nifti1Image(nib.orientations.apply_orientation(v.get_fdata(), to_input), affine)
              for k, v in pair.items()}
    assert nib.aff2axcodes(affine) == codes
    truth_ras = np.zeros(ras_shape, dtype=np.float32)
    truth_ras[20:40, 20:44, 6:14] = 1.0
    truth = nib.orientations.apply_orientation(truth_ras, to_input)
    _, geometry, back = _round_trip(images, 32, 120.0, truth)
    assert back.shape == truth.shape
    recovered = back >= 0.5
    dice = 2 * (recovered & (truth > 0)).sum() / (recovered.sum() + truth.sum())
    assert dice > 0.95
    # the network slice is brain-centred: the brain lies inside the field of view
    assert geometry.window_size == (60, 80)


def test_slices_are_normalised_and_background_is_minus_one():
    slices, _, _ = to_model_slices(make_volume_pair(), ("flair", "t2"), 16, 240.0)
    assert slices.dtype == np.float32
    assert slices.min() == -1.0 and slices.max() <= 1.0
    assert (slices[:, :, 0, 0] == -1.0).all()
