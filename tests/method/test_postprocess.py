"""3-D median and connected-component filters, and the lesion table."""

import numpy as np
import pytest

from anofpdm.method.postprocess import lesion_table, mark_uncertain_lesions, median_filter_3d, remove_small_components


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
