"""Synthetic whole heads around the synthetic brain (anofpdm.data.heads, synthesize_case(heads=True))."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anofpdm.cli import build_parser
from anofpdm.data import heads
from anofpdm.data.brats import SEQUENCES
from anofpdm.data.domains import SHIFTED, TRAINING, HeadShape
from anofpdm.data.synth import case_seed, generate_cases, reslice_case, synthesize_case, write_case

SMALL = (60, 60, 39)  # the BraTS field of view at 4 mm
SMALL_MM = 4.0
RAYLEIGH_MEAN_PER_SD = np.sqrt(np.pi / 2.0) / np.sqrt(2.0 - np.pi / 2.0)  # about 1.91
TEMPLATE_STEP = 2  # template voxels between samples of the head-tissue grid
TEMPLATE_BOX = ((-30, 230), (-40, 280), (-60, 200))  # template voxels around the MNI152 box, face and neck


@pytest.fixture(scope="module")
def pair():
    """The same tumour case without and with a head (run seed 7, case 0)."""
    seed = case_seed(7, 0)
    stripped = synthesize_case(seed, healthy=False, shape=SMALL, voxel_mm=SMALL_MM)
    head = synthesize_case(seed, healthy=False, shape=SMALL, voxel_mm=SMALL_MM, heads=True)
    return stripped, head


@pytest.fixture(scope="module")
def template_tissues() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Head tissues of one drawn layout, sampled straight on the template's voxels (no pose) every 2 mm."""
    axes = [np.arange(low, high, TEMPLATE_STEP, dtype=np.float32) for low, high in TEMPLATE_BOX]
    template_vox = np.stack(np.meshgrid(*axes, indexing="ij"))
    layout = heads.draw_head(np.random.default_rng(0), TRAINING.head)
    return heads.head_tissues(np.random.default_rng(1), layout, template_vox, float(TEMPLATE_STEP)), template_vox


def test_heads_leave_the_brain_labels_and_cases_without_heads_unchanged(pair) -> None:
    stripped, head = pair
    again = synthesize_case(stripped.info["seed"], healthy=False, shape=SMALL, voxel_mm=SMALL_MM)
    for name in SEQUENCES:  # drawing a head first changes nothing of a case drawn without one
        np.testing.assert_array_equal(again.images[name], stripped.images[name])
    assert stripped.brain_mask is None
    np.testing.assert_array_equal(head.seg, stripped.seg)
    np.testing.assert_array_equal(head.affine, stripped.affine)
    assert {key: value for key, value in head.info.items() if key != "head"} == stripped.info
    assert set(head.info["head"]) >= {"skull_mm", "fat_mm", "skin_mm", "subarachnoid_mm"}


def test_brain_mask_is_the_skull_stripped_support(pair) -> None:
    stripped, head = pair
    assert head.brain_mask.dtype == np.uint8 and set(np.unique(head.brain_mask).tolist()) == {0, 1}
    np.testing.assert_array_equal(head.brain_mask > 0, stripped.images["flair"] > 0)
    assert np.all(head.brain_mask[head.seg > 0])


def test_brain_region_is_the_skull_stripped_rendering(pair) -> None:
    """Deep in the brain the head image is the skull-stripped one; at its edge only the blur of the head adds."""
    stripped, head = pair
    brain = head.brain_mask > 0
    deep = ndimage.binary_erosion(brain, iterations=2)
    for name in SEQUENCES:
        np.testing.assert_array_equal(head.images[name][deep], stripped.images[name][deep])
        edge = brain & ~deep
        difference = np.abs(head.images[name][edge].astype(float) - stripped.images[name][edge])
        assert np.median(difference) < 0.1 * np.median(stripped.images[name][brain])


def test_head_has_signal_outside_the_brain(pair) -> None:
    _, head = pair
    outside = head.brain_mask == 0
    for name in SEQUENCES:
        image = head.images[name].astype(float)
        background = np.median(image[:3, :3, :])
        tissue = outside & (image > 10 * max(background, 1.0))
        litres = np.count_nonzero(tissue) * SMALL_MM**3 / 1e6
        assert 0.4 < litres < 3.0, (name, litres)  # scalp, skull marrow, muscle, face: about a litre or two


def test_background_is_rayleigh_noise(pair) -> None:
    stripped, head = pair
    for name in SEQUENCES:
        corners = np.concatenate([head.images[name][i, j, :] for i in (0, 1, -2, -1) for j in (0, 1, -2, -1)])
        corners = corners.astype(float)
        assert np.mean(corners > 0) > 0.9  # noise, not zeros
        assert corners.mean() < 0.1 * np.median(stripped.images[name][stripped.images[name] > 0])  # noise ~ 2-4 %
        assert corners.mean() / corners.std() == pytest.approx(RAYLEIGH_MEAN_PER_SD, rel=0.15)


def test_tissue_fractions_and_anatomy(template_tissues) -> None:
    tissues, template_vox = template_tissues
    total = sum(tissues.values())
    assert total.min() >= -1e-5 and total.max() <= 1.0 + 1e-5
    voxel_ml = TEMPLATE_STEP**3 / 1000.0
    volumes = {name: float(fraction.sum()) * voxel_ml for name, fraction in tissues.items()}
    assert 300 < volumes["bone"] + volumes["marrow"] < 1500  # an adult skull: several hundred mL
    for name in ("csf", "muscle", "fat", "skin", "vitreous", "cord"):
        assert volumes[name] > 1.0, name
    assert 10 < volumes["vitreous"] < 25  # two eyes of about 6.4 mL each
    eyes = template_vox[:, tissues["vitreous"] > 0.5]
    brain_origin = np.array([-98.0, -134.0, -72.0])  # MNI mm of template voxel 0
    eye_mm = eyes + brain_origin[:, None]
    assert np.all(eye_mm[1] > 40) and np.all(eye_mm[2] < -20)  # anterior and inferior
    assert np.count_nonzero(eye_mm[0] > 0) == pytest.approx(np.count_nonzero(eye_mm[0] < 0), rel=0.2)


def test_skull_is_darker_than_scalp_fat_and_csf_bright_on_t2(template_tissues) -> None:
    tissues, _ = template_tissues
    for seed in range(5):
        rng = np.random.default_rng(seed)
        for sequence in SEQUENCES:
            contrast = heads.draw_head_contrast(rng, sequence, csf=heads.HEAD_CONTRAST[sequence]["vitreous"],
                                                jitter=SHIFTED.head.contrast_jitter)
            signal = sum(tissues[name] * contrast[name] for name in heads.HEAD_TISSUES)
            bone, fat = tissues["bone"] > 0.9, tissues["fat"] > 0.9
            assert signal[bone].mean() < 0.3 * signal[fat].mean(), sequence
        t2 = heads.draw_head_contrast(rng, "t2", csf=2.1, jitter=SHIFTED.head.contrast_jitter)
        flair = heads.draw_head_contrast(rng, "flair", csf=0.12, jitter=SHIFTED.head.contrast_jitter)
        assert t2["vitreous"] > t2["muscle"] and t2["fat"] > t2["muscle"]
        assert flair["vitreous"] < flair["muscle"] < flair["fat"]


def test_render_head_and_contrast_check_their_arguments() -> None:
    with pytest.raises(ValueError, match="jitter"):
        heads.draw_head_contrast(np.random.default_rng(0), "t2", csf=2.1, jitter=0.5)
    brain = np.zeros((8, 8, 8), bool)
    tissues = {name: np.zeros((8, 8, 8), np.float32) for name in heads.HEAD_TISSUES}
    acquisition = heads.Acquisition(np.ones((8, 8, 9), np.float32), 1.0, 2.5, 100.0, 2.0)
    with pytest.raises(ValueError, match="share one shape"):
        heads.render_head(np.random.default_rng(0), tissues, dict.fromkeys(heads.HEAD_TISSUES, 1.0), brain,
                          np.zeros((8, 8, 8), np.int16), np.zeros((8, 8, 8), np.float32), acquisition)
    with pytest.raises(ValueError, match="template_vox"):
        heads.head_tissues(np.random.default_rng(0), heads.draw_head(np.random.default_rng(0), TRAINING.head),
                           np.zeros((8, 8, 8)), 1.0)


def test_head_shape_validation_and_shifted_ranges() -> None:
    with pytest.raises(ValueError, match="skull_mm"):
        HeadShape(skull_mm=(8.0, 4.0))
    with pytest.raises(ValueError, match="contrast_jitter"):
        HeadShape(contrast_jitter=-0.1)
    wide, narrow = SHIFTED.head, TRAINING.head
    for name in ("subarachnoid_mm", "skull_mm", "temporalis_mm", "fat_mm", "skin_mm", "face_scale"):
        assert getattr(wide, name)[0] < getattr(narrow, name)[0] and getattr(wide, name)[1] > getattr(narrow, name)[1]
    assert wide.contrast_jitter > narrow.contrast_jitter and wide.thickness_variation > narrow.thickness_variation
    assert "head" not in TRAINING.to_dict()  # manifests of cases without heads keep their keys


def test_heads_vary_between_cases() -> None:
    first = synthesize_case(case_seed(7, 1), healthy=True, shape=SMALL, voxel_mm=SMALL_MM, heads=True)
    second = synthesize_case(case_seed(7, 2), healthy=True, shape=SMALL, voxel_mm=SMALL_MM, heads=True)
    assert first.info["head"] != second.info["head"]
    first_head = np.count_nonzero(first.images["t1"] > 10 * np.median(first.images["t1"][:3, :3]))
    second_head = np.count_nonzero(second.images["t1"] > 10 * np.median(second.images["t1"][:3, :3]))
    assert first_head != second_head


def test_shifted_heads_carry_the_brain_mask_onto_every_grid() -> None:
    case = synthesize_case(case_seed(3, 1), healthy=False, shape=SMALL, voxel_mm=SMALL_MM, domain=SHIFTED,
                           heads=True)
    brain_ml = np.count_nonzero(case.brain_mask) * SMALL_MM**3 / 1000.0
    for index, grid in enumerate(SHIFTED.grids):
        moved = reslice_case(case, SHIFTED, index)
        assert moved.brain_mask.shape == grid.shape and moved.brain_mask.dtype == np.uint8
        moved_ml = np.count_nonzero(moved.brain_mask) * float(np.prod(grid.spacing_mm)) / 1000.0
        assert moved_ml == pytest.approx(brain_ml, rel=0.1), grid.name
        assert np.all(moved.brain_mask[moved.seg > 0])
        outside = moved.brain_mask == 0
        assert np.count_nonzero(moved.images["flair"][outside] > 0) > 0.3 * np.count_nonzero(outside)


def test_written_head_case_has_its_brain_mask(tmp_path: Path, pair) -> None:
    _, head = pair
    case_dir = write_case(head, tmp_path, "SYN_00000")
    mask = nib.load(str(case_dir / "SYN_00000_brainmask.nii.gz"))
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask.dataobj), head.brain_mask)
    np.testing.assert_array_equal(mask.affine, head.affine)


def test_generate_cases_with_heads_writes_masks_manifest_and_studies(tmp_path: Path) -> None:
    manifest = generate_cases(tmp_path, n_cases=1, seed=11, heads=True)
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["heads"] is True and written["heads"] is True
    assert written["head_shape"]["skull_mm"] == list(TRAINING.head.skull_mm)
    case = tmp_path / "SYN_00000"
    mask = np.asarray(nib.load(str(case / "SYN_00000_brainmask.nii.gz")).dataobj)
    flair = np.asarray(nib.load(str(case / "SYN_00000_flair.nii.gz")).dataobj)
    assert mask.shape == flair.shape == (240, 240, 155)
    assert np.count_nonzero(flair[mask == 0] > 0) > np.count_nonzero(mask)  # the head and the noise around it
    studies = tmp_path / "studies"
    assert (studies / "SYN_00000.nii.gz").read_bytes() == (case / "SYN_00000_flair.nii.gz").read_bytes()
    assert (studies / "t2" / "SYN_00000.nii.gz").read_bytes() == (case / "SYN_00000_t2.nii.gz").read_bytes()
    assert "heads" not in generate_cases(tmp_path / "plain", n_cases=1, seed=11, healthy_fraction=1.0)


def test_cli_synth_heads_flag() -> None:
    parser = build_parser()
    assert parser.parse_args(["synth", "--out", "x", "--heads"]).heads is True
    assert parser.parse_args(["synth", "--out", "x"]).heads is False
