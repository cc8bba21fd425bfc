"""The T2 onto the FLAIR grid (``anofpdm.volumes.alignment``): resampling by world coordinates, rigid registration,
refusals.

The volumes are an analytic phantom (``conftest.make_phantom``) sampled on small grids, so each grid holds the
same brain in world coordinates and a moved head's true transform is known.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_phantom, phantom_grid, rigid_ras

from anofpdm.volumes.alignment import (
    AUTO_REGISTRATION_OVERLAP,
    REGISTERED,
    RESAMPLED,
    USED_AS_IS,
    RegistrationSettings,
    align_sequences,
    align_to_reference,
    rigid_motion,
)
from anofpdm.volumes.reading import read_volume
from anofpdm.volumes.checks import InputError

FLAIR_GRID = phantom_grid()
OBLIQUE_SHAPE, OBLIQUE_GRID = (80, 70, 20), phantom_grid((80, 70, 20), (2.0, 2.4, 6.0), tilt_deg=(18.0, -7.0, 25.0))


@pytest.fixture(scope="module")
def flair() -> nib.Nifti1Image:
    return make_phantom("flair")


def residual(truth: np.ndarray, recovered: list) -> tuple[float, float]:
    """Rotation (degrees) and shift at the brain centre (mm) left by a recovered transform (0 when exact):
    the truth maps grid points to phantom points, the recovered transform FLAIR points to T2 points."""
    angle, shift = rigid_motion(truth @ np.asarray(recovered), np.array([2.0, -12.0, 14.0]))
    return angle, float(np.linalg.norm(shift))


def test_a_t2_on_another_grid_is_resampled_by_world_coordinates(flair, tmp_path):
    """An oblique, anisotropic T2 with another field of view, saved as NRRD (LPS) as Slicer does, lands on the
    FLAIR grid where the same brain is: it matches the phantom sampled there directly."""
    oblique = make_phantom("t2", OBLIQUE_SHAPE, OBLIQUE_GRID)
    nifti = tmp_path / "t2.nii.gz"
    nib.save(oblique, nifti)
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(tmp_path / "t2.nrrd"))
    aligned, record = align_to_reference(read_volume(tmp_path / "t2.nrrd", "T2"), flair, "never")
    assert record.action == RESAMPLED and record.source_shape == OBLIQUE_SHAPE
    assert record.source_spacing_mm == pytest.approx((2.0, 2.4, 6.0))
    assert aligned.shape == flair.shape and np.array_equal(aligned.affine, flair.affine)
    truth = make_phantom("t2").get_fdata()
    result = aligned.get_fdata()
    assert record.overlap_before == record.overlap_after > 0.9
    # away from the edges (where the 6 mm slices blur), the value of the same world point
    inner = nib.affines.apply_affine(FLAIR_GRID, np.argwhere(truth > 0)) - [2.0, -12.0, 14.0]
    core = np.zeros(truth.shape, bool)
    core[tuple(np.argwhere(truth > 0)[((inner / [40.0, 54.0, 30.0]) ** 2).sum(1) <= 1].T)] = True
    assert np.median(np.abs(result[core] - truth[core])) < 5.0  # intensities 60-230
    lesion = lambda data: np.argwhere(data >= 205).mean(0)  # noqa: E731  the lesion (210) alone is this bright
    assert np.linalg.norm((lesion(result) - lesion(truth)) * 3.0) < 1.5  # mm
    # the headers ignored (the arrays taken as if on one grid) the T2 would be nowhere near
    assert np.abs(np.asanyarray(oblique.dataobj)[:48, :56, :20] - truth[:, :, :20]).mean() > 20.0


def test_a_moved_t2_is_registered_back(flair):
    """A head rotated 7.7 degrees and shifted 7 mm between the series, same header: ``auto`` notices (the overlap
    drops below its threshold), registers, and the transform found undoes the motion to < 1 degree and < 1 mm."""
    motion = rigid_ras((5.0, -4.0, 4.5), (4.0, -5.0, 3.0))
    moved = make_phantom("t2", motion=motion)
    aligned, record = align_to_reference(moved, flair)
    assert record.overlap_before < AUTO_REGISTRATION_OVERLAP and record.action == REGISTERED
    assert record.overlap_after > record.overlap_before + 0.05
    angle, shift = residual(motion, record.transform_ras)
    assert angle < 1.0 and shift < 1.0, (angle, shift)
    true_angle = np.degrees(np.arccos((np.trace(motion[:3, :3]) - 1) / 2))  # 7.7 degrees about the brain centre
    assert record.rotation_deg == pytest.approx(true_angle, abs=1.0)
    assert record.translation_mm == pytest.approx(np.sqrt(4**2 + 5**2 + 3**2), abs=1.0)
    assert record.translation_mm == pytest.approx(np.linalg.norm(record.translation_ras_mm))
    assert len(record.warnings) == 1 and "t2 was registered to flair by a large correction (" in record.warnings[0]
    assert aligned.shape == flair.shape and np.array_equal(aligned.affine, flair.affine)
    assert 0.0 < record.time_s < 30.0
    report = record.to_dict()
    assert report["action"] == "registered" and len(report["transform_ras"]) == 4


def test_the_option_decides_whether_to_register(flair):
    """``auto`` uses an aligned T2 on the FLAIR grid as is (the same image object: the fast path); ``always``
    registers it all the same (and finds almost nothing to correct); ``never`` leaves a moved T2 as it is."""
    t2 = make_phantom("t2")
    same, record = align_to_reference(t2, flair, "auto")
    assert same is t2 and record.action == USED_AS_IS and record.overlap_before == 1.0
    assert record.rotation_deg == 0.0 and record.transform_ras == np.eye(4).tolist() and not record.warnings
    _, always = align_to_reference(t2, flair, "always")
    assert always.action == REGISTERED and always.rotation_deg < 0.5 and always.translation_mm < 0.5
    assert not always.warnings
    moved = make_phantom("t2", motion=rigid_ras((0.0, 0.0, 3.0), (2.0, 0.0, 0.0)))
    kept, never = align_to_reference(moved, flair, "never")
    assert kept is moved and never.action == USED_AS_IS and never.overlap_after == never.overlap_before < 0.99
    with pytest.raises(InputError, match=r"registration must be one of \('auto', 'always', 'never'\), got 'yes'"):
        align_to_reference(t2, flair, "yes")


def test_pairs_that_cannot_overlap_are_refused_with_the_figures(flair):
    far = make_phantom("t2", motion=rigid_ras(shift_mm=(0.0, 0.0, -90.0)))  # the head 90 mm up: another exam
    with pytest.raises(InputError, match=r"t2 and flair are not two series of one examination as their headers "
                                         r"place them: their brain regions overlap with Dice 0\.00 and lining them up "
                                         r"takes [0-9.]+ degrees and (8[5-9]|9[0-5])\.\d mm"):
        align_to_reference(far, flair)
    with pytest.raises(InputError, match=r"do not overlap: Dice 0\.00 on the flair grid \(at least 0\.8 needed\): "
                                         r"registration is off \(registration=never\)"):
        align_to_reference(far, flair, "never")
    blob = np.zeros(flair.shape, np.float32)  # a small bright region, as a mask loaded as the T2 would be
    blob[20:28, 24:32, 14:22] = 1.0
    with pytest.raises(InputError, match=r"t2 and flair do not overlap: Dice 0\.0\d on the flair grid"):
        align_to_reference(nib.Nifti1Image(blob, FLAIR_GRID), flair)


def test_align_sequences_leaves_the_reference_and_names_missing_sequences_to_the_checks(flair):
    t2 = make_phantom("t2", OBLIQUE_SHAPE, OBLIQUE_GRID)
    images, records = align_sequences({"flair": flair, "t2": t2}, ("flair", "t2"), "never")
    assert images["flair"] is flair and set(records) == {"t2"} and records["t2"].action == RESAMPLED
    assert images["t2"].shape == flair.shape
    assert align_sequences({"flair": flair}, ("flair", "t2")) == ({"flair": flair}, {})


def test_registration_settings_are_checked():
    with pytest.raises(ValueError, match="one smoothing sigma per shrink factor"):
        RegistrationSettings(shrink_factors=(4, 2, 1))
    with pytest.raises(ValueError, match="samples must be >= 1000"):
        RegistrationSettings(samples=10)
