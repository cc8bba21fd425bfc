"""N4 bias-field correction of the stripped volumes (anofpdm.volumes.bias_field)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from anofpdm.volumes.bias_field import bias_field, correct_bias_fields
from anofpdm.volumes.checks import InputError

SHAPE, SPACING = (60, 72, 50), 2.0


def two_tissues(field_strength: float, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ellipsoid brain of 2 mm voxels: an inner tissue (120) inside an outer one (80), slightly noisy, times
    ``exp(field_strength * x)`` (x from -1 to 1 across the brain); also the two tissues' masks."""
    axes = np.meshgrid(*(np.linspace(-1.2, 1.2, n) for n in SHAPE), indexing="ij")
    radius = np.sqrt(sum(a**2 for a in axes))
    outer, inner = (radius <= 1.0) & (radius > 0.5), radius <= 0.5
    rng = np.random.default_rng(0)
    clean = np.where(inner, 120.0, np.where(outer, 80.0, 0.0)) * (1 + 0.02 * rng.standard_normal(SHAPE))
    return (scale * clean * np.exp(field_strength * axes[0])).astype(np.float32), inner, outer


def variation(data: np.ndarray, tissue: np.ndarray) -> float:
    return float(data[tissue].std() / data[tissue].mean())


def images_of(flair: np.ndarray, t2: np.ndarray) -> dict[str, nib.Nifti1Image]:
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    return {"flair": nib.Nifti1Image(flair, affine), "t2": nib.Nifti1Image(t2, affine)}


def test_a_smooth_field_is_taken_out_of_each_tissue_and_the_background_stays_zero():
    biased, inner, outer = two_tissues(0.4)
    t2 = two_tissues(0.25)[0] * 0.8  # a field of its own
    corrected, record = correct_bias_fields(images_of(biased, t2), ("flair", "t2"), "n4")
    flair = np.asanyarray(corrected["flair"].dataobj)
    for tissue in (inner, outer):
        assert variation(flair, tissue) < 0.35 * variation(biased, tissue)
    assert (flair[~(inner | outer)] == 0).all() and corrected["flair"].get_data_dtype() == np.float32
    assert variation(np.asanyarray(corrected["t2"].dataobj), outer) < 0.5 * variation(t2, outer)
    low, high = record.field_range["flair"]
    assert low < 0.8 and high > 1.25  # the field found spans exp(+-0.4) over the brain
    assert record.method == "n4" and record.time_s > 0
    np.testing.assert_allclose(np.median(bias_field(biased, (SPACING,) * 3, inner | outer)[inner | outer]), 1.0,
                               rtol=1e-3)


def test_a_volume_without_a_field_is_left_nearly_as_it_is_and_scale_carries_through():
    clean, inner, outer = two_tissues(0.0)
    brain = inner | outer
    fitted = bias_field(clean, (SPACING,) * 3, brain)
    assert np.abs(fitted[brain] - 1.0).max() < 0.05
    scaled = bias_field(clean * 7.0, (SPACING,) * 3, brain)
    np.testing.assert_allclose(scaled[brain], fitted[brain], rtol=1e-3)


def test_none_leaves_the_images_and_bad_input_is_refused_before_fitting():
    biased, inner, outer = two_tissues(0.4)
    images = images_of(biased, biased * 0.5)
    kept, record = correct_bias_fields(images, ("flair", "t2"), "none")
    assert kept["flair"] is images["flair"] and record.field_range == {} and record.method == "none"
    with pytest.raises(ValueError, match="bias correction must be one of"):
        correct_bias_fields(images, ("flair", "t2"), "n3")
    broken = biased.copy()
    broken[30, 30, 25] = np.nan
    with pytest.raises(InputError, match="flair"):
        correct_bias_fields(images_of(broken, biased * 0.5), ("flair", "t2"), "n4")
    with pytest.raises(InputError, match="t2"):
        correct_bias_fields({"flair": images["flair"]}, ("flair", "t2"), "n4")
