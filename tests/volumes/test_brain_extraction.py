"""Brain extraction from heads (``anofpdm.volumes.brain_extraction``): deepbet's networks on synthetic heads, the
brain the one mask of every sequence, skull-stripped inputs left alone, and refusals that name the figure.

The heads are synthetic cases (``anofpdm.data.synth`` with heads) on a 2 mm grid: the real networks run on them.
"""

import functools

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from anofpdm.data.synth import synthesize_case
from anofpdm.volumes.alignment import align_sequences, nifti_to_itk
from anofpdm.volumes.brain_extraction import (
    _deepbet_networks,
    _first_block,
    apply_brain,
    brain_network_probability,
    extract_brain,
)
from anofpdm.volumes.checks import MAX_BRAIN_ML, InputError, check_inputs
from anofpdm.volumes.overlap import dice

SEQUENCES = ("flair", "t2")
SHAPE, VOXEL_MM = (120, 120, 78), 2.0  # the BraTS field of view at 2 mm


@functools.lru_cache(maxsize=None)
def _case(seed: int = 7, healthy: bool = False, tumour_site: str = "deep"):
    return synthesize_case(seed, healthy, shape=SHAPE, voxel_mm=VOXEL_MM, heads=True, tumour_site=tumour_site)


def _images(case, sequences=SEQUENCES) -> dict[str, nib.Nifti1Image]:
    return {name: nib.Nifti1Image(case.images[name].astype(np.float32), case.affine) for name in sequences}


@pytest.mark.parametrize("tumour_site", ["deep", "surface"])
def test_a_head_gives_its_brain_and_keeps_the_tumour(tumour_site):
    case = _case(tumour_site=tumour_site)
    truth = case.brain_mask > 0
    stripped, extraction = extract_brain(_images(case), SEQUENCES)
    assert extraction.extracted and extraction.method.startswith("deepbet")
    assert dice(extraction.mask, truth) > 0.93  # a 2 mm grid; full-size figures: docs/brain-extraction.md
    assert extraction.mask[case.seg > 0].mean() > 0.99
    assert abs(extraction.brain_ml - truth.sum() * VOXEL_MM**3 / 1000.0) < 0.1 * extraction.brain_ml
    for name in SEQUENCES:
        data = stripped[name].get_fdata()
        assert not data[~extraction.mask].any() and (data[extraction.mask] > 0).mean() > 0.99
    assert extraction.sequences == {"flair": "brain extracted (deepbet 1.0.2)",
                                     "t2": "stripped with the brain of flair"}
    assert extraction.nonzero_ml["flair"] > MAX_BRAIN_ML  # a head, as the input checks would have refused it
    arrays = check_inputs(stripped, SEQUENCES)  # a brain now, the contrast of a FLAIR
    assert set(arrays) == set(SEQUENCES)


def test_a_skull_stripped_brain_is_left_as_it_is():
    case = synthesize_case(7, False, shape=SHAPE, voxel_mm=VOXEL_MM)
    images = _images(case)
    out, extraction = extract_brain(images, SEQUENCES)
    assert not extraction.extracted and extraction.method is None
    assert all(out[name] is images[name] for name in SEQUENCES)
    assert np.array_equal(extraction.mask, case.images["flair"] > 0)
    assert apply_brain(out, extraction, SEQUENCES) == out
    assert extraction.to_dict()["sequences"] == {"flair": "used as it came", "t2": "used as it came"}


def test_never_leaves_a_head_to_the_input_checks_and_always_extracts_a_brain():
    head = _images(_case())
    out, extraction = extract_brain(head, SEQUENCES, "never")
    assert not extraction.extracted and out == head
    with pytest.raises(InputError, match=r"flair has \d+ mL of nonzero voxels.*brain_extraction auto or always"):
        check_inputs(out, SEQUENCES)
    brain = _images(synthesize_case(7, False, shape=SHAPE, voxel_mm=VOXEL_MM))
    _, always = extract_brain(brain, SEQUENCES, "always")
    assert always.extracted and dice(always.mask, brain["flair"].get_fdata() > 0) > 0.93
    with pytest.raises(InputError, match="brain_extraction must be one of"):
        extract_brain(head, SEQUENCES, "sometimes")


def test_a_t2_head_on_another_grid_ends_with_the_flair_brain():
    """The T2 of another series (3 mm, shifted field of view) is stripped with the FLAIR's brain grown by a margin,
    resampled onto the FLAIR grid, and then given exactly the FLAIR's brain."""
    case = _case()
    images = _images(case)
    t2 = images["t2"]
    coarse = t2.affine @ np.diag([1.5, 1.5, 1.5, 1.0])
    coarse[:3, 3] += [3.0, -2.0, 4.0]
    reference = nifti_to_itk(np.zeros((80, 80, 52), np.float32), coarse, "grid")
    moved = sitk.Resample(nifti_to_itk(t2.get_fdata(dtype=np.float32), t2.affine, "t2"), reference)
    images["t2"] = nib.Nifti1Image(sitk.GetArrayFromImage(moved).transpose(2, 1, 0), coarse)
    stripped, extraction = extract_brain(images, SEQUENCES)
    assert extraction.sequences["t2"] == "stripped with the brain of flair"
    assert stripped["t2"].shape == (80, 80, 52)
    aligned, _ = align_sequences(stripped, SEQUENCES, "never")
    final = apply_brain(aligned, extraction, SEQUENCES)
    t2_brain = final["t2"].get_fdata() > 0
    assert not t2_brain[~extraction.mask].any() and t2_brain[extraction.mask].mean() > 0.99


def test_no_brain_and_a_brain_cut_by_the_field_of_view_are_refused():
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    noise = np.abs(rng.normal(0.0, 40.0, SHAPE)).astype(np.float32) + 1.0
    with pytest.raises(InputError, match=r"brain extraction on flair found \d+ mL of brain, outside the plausible"):
        extract_brain({"flair": nib.Nifti1Image(noise, affine), "t2": nib.Nifti1Image(noise, affine)}, SEQUENCES)
    case = _case()
    top = np.nonzero(case.brain_mask.any(axis=(0, 1)))[0].max()  # the vertex: the brain's highest plane
    cut = {name: nib.Nifti1Image(image.get_fdata(dtype=np.float32)[:, :, : top - 10], image.affine)
           for name, image in _images(case).items()}  # 20 mm of brain cut off at the top
    top_cut = r"the brain in flair runs off the top of the field of view \(\d+ mm\^2.*at the vertex"
    with pytest.raises(InputError, match=top_cut):
        extract_brain(cut, SEQUENCES)


def test_a_t1_given_as_the_flair_is_refused():
    case = _case()
    images = _images(case, ("t1", "t2"))
    t1_as_flair = {"flair": images["t1"], "t2": images["t2"]}
    stripped, _ = extract_brain(t1_as_flair, SEQUENCES)
    with pytest.raises(InputError, match=r"flair does not look like a FLAIR: its grey matter is 0\.\d+ times"):
        check_inputs(stripped, SEQUENCES)


@pytest.mark.parametrize("shape", [(37, 40, 33), (64, 48, 70)])
def test_the_chunked_first_block_equals_deepbets(shape):
    """Chunk edges, the convolution's zero padding at both ends and the pooling's shared rows, at depths that are and
    are not multiples of the chunk."""
    network = _deepbet_networks("cpu")[1]
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network.init(getattr(network.conv, "2"), x)
        got = _first_block(network.init, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("which", [0, 1])  # the box network and the brain network: one architecture
def test_the_networks_run_step_by_step_give_deepbets_probability(which):
    network = _deepbet_networks("cpu")[which]
    x = torch.randn(1, 1, 64, 96, 64, generator=torch.Generator().manual_seed(which))
    with torch.no_grad():
        expected = network(x)[0, 1]
        got = brain_network_probability(network, x.clone())
        consumed = x.clone()
        again = brain_network_probability(network, consumed, consume=True)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-4)
    assert torch.equal(again, got)
    assert consumed.untyped_storage().nbytes() == 0  # released once read
