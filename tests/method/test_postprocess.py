"""3-D median and connected-component filters, and the lesion table."""

import numpy as np
import pytest
import torch

from anofpdm.data.synth import LABEL_ENHANCING, LABEL_NECROTIC, LABEL_OEDEMA, synthesize_case
from anofpdm.method.decisions import robust_z_scores
from anofpdm.method.postprocess import (
    fill_lesion_holes,
    lesion_table,
    mark_uncertain_lesions,
    median_filter_3d,
    refine_lesion_boundaries,
    remove_small_components,
)


def test_median_filter_removes_isolated_voxel_keeps_block():
    volume = np.zeros((12, 12, 12), dtype=np.float32)
    volume[2, 2, 2] = 5.0
    volume[5:10, 5:10, 5:10] = 1.0
    filtered = median_filter_3d(volume, 3)
    assert filtered[2, 2, 2] == 0.0
    assert filtered[7, 7, 7] == 1.0
    with pytest.raises(ValueError, match="3-D"):
        median_filter_3d(volume[0], 3)


def test_component_filter_uses_physical_volume():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[5:9, 5:9, 5:9] = True  # 64 voxels
    spacing = (1.0, 1.0, 2.0)  # 2 mm^3 voxels: 16 and 128 mm^3
    kept, removed = remove_small_components(mask, spacing, min_size_mm3=16.0)
    assert removed == 1 and kept.sum() == 64  # "at most min size" is removed
    kept, removed = remove_small_components(mask, spacing, min_size_mm3=15.9)
    assert removed == 0 and kept.sum() == 72
    diagonal = np.zeros((3, 3, 3), dtype=bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # touch at a corner: one 26-connected component
    assert remove_small_components(diagonal, (1, 1, 1), 1.5)[0].sum() == 2


def test_lesion_table_volume_centroid_and_scores():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[2:4, 2:4, 2:4] = True
    mask[6:10, 6:10, 6:10] = True
    scores = np.zeros(mask.shape, dtype=np.float32)
    scores[6:10, 6:10, 6:10] = 0.5
    scores[9, 9, 9] = 2.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 0, 5]
    rows = lesion_table(mask, scores, affine)
    assert [r["volume_ml"] for r in rows] == [0.512, 0.064]  # 64 and 8 voxels of 8 mm^3
    assert [r["label"] for r in rows] == [1, 1]
    assert rows[0]["centroid_mm"] == [-10 + 2 * 7.5, 2 * 7.5, 5 + 2 * 7.5]
    assert rows[0]["peak_anomaly"] == 2.0
    assert rows[0]["mean_anomaly"] == pytest.approx((63 * 0.5 + 2.0) / 64)
    assert lesion_table(np.zeros_like(mask), scores, affine) == []
    assert "unhealthy_probability" not in rows[0]
    probability = np.broadcast_to(np.linspace(0.0, 0.9, 10, dtype=np.float32), mask.shape)  # by the last axis
    rows = lesion_table(mask, scores, affine, probability)
    assert [r["unhealthy_probability"] for r in rows] == [0.9, pytest.approx(0.3, abs=1e-4)]  # z up to 9 and 3
    with pytest.raises(ValueError, match="unhealthy probability"):
        lesion_table(mask, scores, affine, probability[:5])


def test_lesions_below_the_confident_probability_are_marked_uncertain():
    """Each lesion takes the highest probability of its voxels' slices; from ``confident`` on it is tumour (1)."""
    mask = np.zeros((12, 12, 8), dtype=bool)
    probability = np.zeros(mask.shape, dtype=np.float32)
    for x, peak in zip((0, 3, 6, 9), (0.85, 0.5, 0.8, 0.1)):  # four separate lesions, two slices each
        mask[x : x + 2, 0:2, 2:4] = True
        probability[x : x + 2, :, 2] = peak
        probability[x : x + 2, :, 3] = peak / 2  # a lesion's lower slice does not demote it
    labels = mark_uncertain_lesions(mask, probability, confident=0.8)
    assert labels.dtype == np.uint8 and np.array_equal(labels > 0, mask)
    assert [int(labels[x, 0, 2]) for x in (0, 3, 6, 9)] == [1, 2, 1, 2]
    rows = lesion_table(labels, probability, np.eye(4), probability)
    assert sorted((r["unhealthy_probability"], r["label"]) for r in rows) == [(0.1, 2), (0.5, 2), (0.8, 1), (0.85, 1)]
    assert not mark_uncertain_lesions(np.zeros_like(mask), probability, 0.8).any()
    with pytest.raises(ValueError, match="unhealthy probability"):
        mark_uncertain_lesions(mask, probability[:5], 0.8)


def _hollow_cube() -> np.ndarray:
    """A 7^3 lesion wall around a 3^3 core, inside a 12^3 volume."""
    mask = np.zeros((12, 12, 12), dtype=bool)
    mask[2:9, 2:9, 2:9] = True
    mask[4:7, 4:7, 4:7] = False
    return mask


def test_a_core_the_lesion_encloses_is_filled_in_3d_and_the_outline_kept():
    mask = _hollow_cube()
    filled = fill_lesion_holes(mask, "3d")
    assert filled[4:7, 4:7, 4:7].all() and filled.sum() == 7**3  # the core, nothing outside the wall
    assert (fill_lesion_holes(mask, "keep") == mask).all()
    assert (fill_lesion_holes(mask, "axial") == filled).all()
    leak = mask.copy()
    leak[5, 5, 7:9] = False  # a one-voxel channel to the outside: no longer a hole in 3-D
    assert (fill_lesion_holes(leak, "3d") == leak).all()


def test_a_core_open_above_is_filled_only_within_axial_slices():
    cup = _hollow_cube()
    cup[4:7, 4:7, 7:9] = False  # the core reaches the lesion's top: open in 3-D, enclosed in each axial plane
    assert (fill_lesion_holes(cup, "3d") == cup).all()
    axial = fill_lesion_holes(cup, "axial")
    assert axial[4:7, 4:7, 4:9].all() and axial.sum() == 7**3
    side = _hollow_cube()
    side[4:7, 7:9, 4:7] = False  # open to the side within the axial planes: neither fills it
    assert (fill_lesion_holes(side, "axial") == side).all()


def test_lesion_holes_are_checked():
    with pytest.raises(ValueError, match="holes must be one of"):
        fill_lesion_holes(_hollow_cube(), "2d")
    with pytest.raises(ValueError, match="3-D"):
        fill_lesion_holes(_hollow_cube()[0], "3d")


def test_a_synthetic_tumours_flair_dark_necrotic_core_is_the_hole_its_flair_bright_rest_encloses():
    case = synthesize_case(11, False, shape=(64, 64, 48), voxel_mm=3.0, tumour_volume_ml=(40, 80))
    core = case.seg == LABEL_NECROTIC
    bright = (case.seg == LABEL_OEDEMA) | (case.seg == LABEL_ENHANCING)  # what a FLAIR-driven mask finds at best
    flair = case.images["flair"].astype(np.float64)
    brain = flair > 0
    z = robust_z_scores(torch.from_numpy(flair), torch.from_numpy(brain))[0].numpy()
    assert core.sum() >= 20 and np.median(z[core]) < np.median(z[case.seg == LABEL_OEDEMA]) - 1.5  # dark core
    filled = fill_lesion_holes(bright, "3d")
    assert (filled == (case.seg > 0)).all()  # exactly the BraTS whole tumour: the core, nothing else
    assert not fill_lesion_holes(bright, "keep")[core].any()


def _soft_sphere(shape=(40, 40, 40), radius=9.0, edge_mm=1.5):
    """A FLAIR-bright sphere whose brightness falls smoothly across its edge (half of it at ``radius``)."""
    grid = np.indices(shape, dtype=np.float64) - (np.asarray(shape)[:, None, None, None] - 1) / 2.0
    distance = np.sqrt((grid**2).sum(axis=0))
    return 1.0 + 2.0 / (1.0 + np.exp((distance - radius) / edge_mm)), distance


def test_a_lesion_edge_is_redrawn_where_its_flair_is_halfway_to_the_surroundings():
    flair, distance = _soft_sphere()
    truth = distance <= 9.0
    brain = np.ones(flair.shape, dtype=bool)
    too_large, too_small = distance <= 11.5, distance <= 6.5  # blocky masks from a coarse grid, past or short
    for coarse in (too_large, too_small):  # Dice 0.66 and 0.52
        redrawn = refine_lesion_boundaries(coarse, flair, brain, (1.0, 1.0, 1.0), reach_mm=3.75)
        assert _dice(redrawn, truth) > max(0.9, _dice(coarse, truth) + 0.2)
    scaled = refine_lesion_boundaries(too_large, 40.0 * flair + 7.0, brain, (1.0, 1.0, 1.0), reach_mm=3.75)
    assert (scaled == refine_lesion_boundaries(too_large, flair, brain, (1.0, 1.0, 1.0), reach_mm=3.75)).all()


def test_a_lesion_edge_moves_at_most_its_reach_and_stays_in_the_brain():
    flair, distance = _soft_sphere(radius=14.0)
    small = distance <= 5.0
    brain = np.ones(flair.shape, dtype=bool)
    brain[:, :, :18] = False
    redrawn = refine_lesion_boundaries(small, flair, brain, (1.0, 1.0, 1.0), reach_mm=2.0)
    assert redrawn.any() and not redrawn[distance > 7.01].any() and not redrawn[~brain].any()


def test_a_flair_dark_core_deeper_than_the_reach_stays_in_the_lesion():
    flair, distance = _soft_sphere(radius=12.0)
    flair[distance <= 5.0] = 0.8  # a necrotic core darker than the brain around the lesion, open to one side
    flair[(distance <= 12.5) & (np.indices(flair.shape)[0] > 26)] = 1.0
    coarse = distance <= 13.5
    redrawn = refine_lesion_boundaries(coarse, flair, np.ones(flair.shape, dtype=bool), (1.0, 1.0, 1.0), 3.75)
    assert redrawn[distance <= 5.0].all() and not redrawn[distance > 13.5 + 3.75].any()


def test_a_lesion_no_brighter_than_its_surroundings_is_kept_as_it_was():
    flair, distance = _soft_sphere()
    mask = distance <= 6.0
    dark = 4.0 - flair  # the lesion darker than the brain around it: no half-contrast edge
    brain = np.ones(flair.shape, dtype=bool)
    assert (refine_lesion_boundaries(mask, dark, brain, (1.0, 1.0, 1.0), reach_mm=3.75) == mask).all()
    with pytest.raises(ValueError, match="differ in shape"):
        refine_lesion_boundaries(mask, flair[1:], brain, (1.0, 1.0, 1.0), reach_mm=3.75)
    with pytest.raises(ValueError, match="reach_mm"):
        refine_lesion_boundaries(mask, flair, brain, (1.0, 1.0, 1.0), reach_mm=0.0)


def _dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())
