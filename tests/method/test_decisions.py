"""Verdict, Algorithm 1 threshold and map filtering on hand-built inputs with known answers."""

import numpy as np
import pytest
import torch

from anofpdm.method.decisions import (
    Calibration,
    QuantileRule,
    combine_maps,
    cosine_scores,
    row_quantiles,
    slice_thresholds,
    threshold_quantiles,
)
from anofpdm.method.postprocess import median_filter_2d


def test_cosine_scores_of_known_curves():
    guided = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    reference = torch.tensor([[2.0, 4.0, 6.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(cosine_scores(guided, reference), torch.tensor([1.0, 0.0]))


def test_quantile_rule_maps_divergence_ratio_to_quantile():
    rule = QuantileRule(low=0.90, high=0.98)
    q = threshold_quantiles(torch.tensor([[0.0, 0.05, 0.2]]), torch.tensor([0.1, 0.1, 0.1]), rule)
    # ratio 0 -> 0.98, ratio 0.5 -> 0.94, ratio clipped at 1 -> 0.90: bigger divergence, lower quantile
    torch.testing.assert_close(q, torch.tensor([[0.98, 0.94, 0.90]]))


def test_slice_threshold_is_mean_of_per_modality_quantiles():
    values = torch.arange(100.0)
    maps = torch.stack([values, 2 * values]).reshape(1, 2, 10, 10)
    tau = slice_thresholds(maps, torch.tensor([[0.0, 0.1]]), torch.tensor([0.1, 0.1]), QuantileRule())
    expected = (np.quantile(np.arange(100.0), 0.98) + np.quantile(2 * np.arange(100.0), 0.90)) / 2
    assert tau.item() == pytest.approx(expected)


def test_row_quantiles_match_numpy():
    values = torch.rand(4, 3, 50)
    q = torch.rand(4, 3)
    expected = np.array([[np.quantile(values[i, j].numpy(), q[i, j].item()) for j in range(3)] for i in range(4)])
    np.testing.assert_allclose(row_quantiles(values, q).numpy(), expected, rtol=1e-5)


def test_combined_map_is_modality_mean_and_median_removes_a_spike():
    maps = torch.zeros(1, 2, 9, 9)
    maps[0, 0, 4, 4] = 10.0
    maps[0, 1, 4, 4] = 6.0
    combined = combine_maps(maps)
    assert combined[0, 4, 4].item() == 8.0
    assert np.abs(median_filter_2d(combined.numpy(), 5)).max() == 0.0
    block = np.zeros((1, 9, 9), np.float32)
    block[0, 2:7, 2:7] = 1.0
    filtered = median_filter_2d(block, 3)
    assert filtered[0, 4, 4] == 1.0 and filtered[0, 2, 2] == 0.0  # corners of the block erode
    with pytest.raises(ValueError, match="odd"):
        median_filter_2d(block, 4)


def test_2d_median_mirrors_the_borders_and_filters_each_map_alone():
    maps = np.zeros((2, 7, 7), np.float32)
    maps[0, 0, :] = 1.0  # a line along the top border
    maps[1, 2:5, 2:5] = 1.0
    filtered = median_filter_2d(maps, 3)
    # mirrored, the row above the border is a copy of the row below it: 3 of 9 values are 1, so the line goes
    # (edge replication would copy the line itself: 6 of 9, and keep it)
    assert filtered[0].max() == 0.0
    assert filtered[1, 3, 3] == 1.0 and filtered[1, 2, 2] == 0.0  # the other map's block is filtered in-plane only


def test_calibration_round_trip_and_validation():
    calibration = Calibration(0.99, [0.05, 0.04], 2.0, 600, 1, "ddim", validation={"accuracy": 0.9},
                              unhealthy_frequency=[[0.98, 0.9], [0.995, 0.3], [1.0, 0.0]])
    assert Calibration.from_dict(calibration.to_dict()) == calibration
    with pytest.raises(ValueError, match="max_divergence"):
        Calibration(0.99, [0.0, 0.04], 2.0, 600, 1, "ddim")
    with pytest.raises(ValueError, match="non-increasing"):
        Calibration(0.99, [0.05, 0.04], 2.0, 600, 1, "ddim", unhealthy_frequency=[[0.98, 0.2], [0.995, 0.3]])
    with pytest.raises(ValueError, match="ascend"):
        Calibration(0.99, [0.05, 0.04], 2.0, 600, 1, "ddim", unhealthy_frequency=[[0.995, 0.3], [0.98, 0.2]])


def test_unhealthy_probability_looks_up_the_group_of_each_score():
    calibration = Calibration(0.99, [0.05, 0.04], 2.0, 600, 1, "ddim",
                              unhealthy_frequency=[[0.98, 0.9], [0.995, 0.3], [1.0, 0.0]])
    # groups (.., 0.98], (0.98, 0.995], (0.995, ..)
    scores = torch.tensor([0.5, 0.98, 0.981, 0.995, 0.999, 1.2], dtype=torch.float64)
    assert calibration.unhealthy_probability(scores).tolist() == pytest.approx([0.9, 0.9, 0.3, 0.3, 0.0, 0.0])
    assert Calibration(0.99, [0.05, 0.04], 2.0, 600, 1, "ddim").unhealthy_probability(scores) is None
    with pytest.raises(ValueError, match="low <= high"):
        QuantileRule(low=0.99, high=0.9)


def test_volume_rule_masks_what_stands_out_in_its_own_volume_and_is_flair_bright():
    from anofpdm.method.decisions import VolumeRule, decide_by_volume

    size, slices = 8, 6
    noise = torch.rand(size, size, slices, generator=torch.Generator().manual_seed(0))
    maps = 0.10 + 0.01 * noise  # S x S x N, the volume's background
    flair = 0.5 + 0.1 * noise
    maps[2:4, 2:4, 4], flair[2:4, 2:4, 4] = 1.0, 0.9  # a FLAIR-bright lesion that lights the map
    maps[5:7, 5:7, 1], flair[5:7, 5:7, 1] = 1.0, 0.05  # CSF (FLAIR-dark) that lights the map as much
    brain = torch.ones(size, size, slices, dtype=torch.bool)
    brain[0] = False  # outside the brain: neither masked nor part of the volume's statistics
    maps[0], flair[0] = 5.0, 5.0
    tau = torch.full((slices,), 0.105)  # Algorithm 1 masks a quantile of every slice
    decided = decide_by_volume(maps, brain, flair, tau, VolumeRule())
    assert decided.candidate.sum() == 4 and decided.candidate[2:4, 2:4, 4].all()
    assert decided.candidate.any(dim=0).any(dim=0).tolist() == [False, False, False, False, True, False]
    assert int(decided.slice_z.argmax()) == 4 and decided.slice_z[4] > 10 > decided.slice_z[1]
    assert not decided.eligible[5:7, 5:7, 1].any() and not decided.eligible[0].any()
    assert (decided.thresholds > 0.11).all() and (decided.thresholds < 1.0).all()  # the volume's floor, not tau
    # Algorithm 1's tau still applies above the floor
    strict = decide_by_volume(maps, brain, flair, torch.tensor([0.105] * 4 + [2.0, 0.105]), VolumeRule())
    assert not strict.candidate.any()
    # a lesion no brighter than the volume's map elsewhere is not masked
    assert not decide_by_volume(maps, brain, flair, tau, VolumeRule(map_z=1e9)).candidate.any()
    with pytest.raises(ValueError, match="map_z"):
        VolumeRule(map_z=-1.0)
    with pytest.raises(ValueError, match="map_z"):
        VolumeRule(map_z=float("nan"))
    with pytest.raises(ValueError, match="flair_quantile"):
        VolumeRule(flair_quantile=1.0)


def test_volume_rule_keeps_only_lesions_hyperintense_on_t2():
    """Two lesions that light the map and are FLAIR-bright: the one T2-bright as well (a tumour and its oedema) is
    kept whole, the one whose T2 is below the brain's median (a bias field's FLAIR brightening) is dropped."""
    from anofpdm.method.decisions import VolumeRule, decide_by_volume

    size, slices = 12, 6
    noise = torch.rand(size, size, slices, generator=torch.Generator().manual_seed(1))
    maps, flair, t2 = 0.10 + 0.01 * noise, 0.5 + 0.1 * noise, 0.5 + 0.1 * noise
    maps[2:5, 2:5, 2:4], flair[2:5, 2:5, 2:4], t2[2:5, 2:5, 2:4] = 1.0, 0.9, 0.9  # tumour-like
    maps[8:10, 8:10, 1:3], flair[8:10, 8:10, 1:3], t2[8:10, 8:10, 1:3] = 1.0, 0.9, 0.5  # FLAIR-only
    t2[3, 3, 2] = 0.0  # one dark pixel does not move a lesion's median
    brain = torch.ones(size, size, slices, dtype=torch.bool)
    tau = torch.zeros(slices)
    decided = decide_by_volume(maps, brain, flair, tau, VolumeRule(t2_quantile=0.6), t2).candidate
    assert decided[2:5, 2:5, 2:4].all() and decided.sum() == 18
    for without in (decide_by_volume(maps, brain, flair, tau, VolumeRule(t2_quantile=0.6)),  # no T2 given
                    decide_by_volume(maps, brain, flair, tau, VolumeRule(), t2)):  # the default: off
        assert without.candidate.sum() == 18 + 8
    with pytest.raises(ValueError, match="t2_quantile"):
        VolumeRule(t2_quantile=1.0)
