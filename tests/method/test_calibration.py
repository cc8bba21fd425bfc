"""The validation slices' unhealthy frequency by cosine score (fit at calibration, reported when serving)."""

import numpy as np
import pytest

from anofpdm.method.calibration import fit_unhealthy_frequency


def test_hand_worked_isotonic_fit_and_small_group_pooling():
    scores, labels = [0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0]
    # pool-adjacent-violators, fraction non-increasing in the score: 1 | 0, 1 -> 0.5 | 0
    assert fit_unhealthy_frequency(scores, labels, min_group=1) == ((0.1, 1.0), (0.3, 0.5), (0.4, 0.0))
    # groups of at least 2: the lone slice at 0.1 joins the pair (fraction 2/3), then the lone slice at 0.4
    assert fit_unhealthy_frequency(scores, labels, min_group=2) == ((0.4, 0.5),)
    # equal scores always share a group
    assert fit_unhealthy_frequency([0.5, 0.5, 0.7], [1, 0, 0], min_group=1) == ((0.5, 0.5), (0.7, 0.0))


def test_fit_on_overlapping_classes_is_monotone_with_large_groups_holding_their_own_fractions():
    rng = np.random.default_rng(3)
    labels = rng.random(600) < 0.3
    scores = np.where(labels, rng.normal(0.98, 0.01, 600), rng.normal(0.995, 0.004, 600))
    table = fit_unhealthy_frequency(scores, labels, min_group=20)
    bounds, fractions = np.array(table).T
    assert np.all(np.diff(bounds) > 0) and np.all(np.diff(fractions) <= 0)
    assert bounds[-1] == scores.max()
    assert fractions[0] > 0.9 and fractions[-1] < 0.1  # the classes separate at the extremes
    lower = -np.inf
    for bound, fraction in table:  # recount each group from the raw slices
        members = (scores > lower) & (scores <= bound)
        assert members.sum() >= 20
        assert fraction == pytest.approx(labels[members].mean(), abs=1e-6)
        lower = bound


def test_bad_fit_input_is_refused():
    with pytest.raises(ValueError, match="equal length"):
        fit_unhealthy_frequency([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="min_group"):
        fit_unhealthy_frequency([0.1], [1], min_group=0)
