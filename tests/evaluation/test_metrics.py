"""Metrics on hand-built arrays whose answers are worked out by hand in the comments."""

import numpy as np
import pytest

from anofpdm.evaluation.metrics import (
    aggregate_cases,
    aggregate_reliability,
    aggregate_sub_region_recall,
    average_precision,
    dice,
    faint_edge,
    hd95_mm,
    iou,
    lesion_volume_error_ml,
    lesion_wise_scores,
    overlap_scores,
    precision,
    recall,
    slice_protocol,
    sub_region_recall,
    verdict_reliability,
    volume_metrics,
)


def test_overlap_metrics_and_precision_recall_are_not_swapped():
    # prediction marks 3 pixels, truth 2, one shared: TP = 1, FP = 2, FN = 1
    prediction = np.array([1, 1, 1, 0, 0, 0])
    truth = np.array([1, 0, 0, 1, 0, 0])
    assert dice(prediction, truth) == pytest.approx(2 / 5)  # 2 TP / (2 TP + FP + FN)
    assert iou(prediction, truth) == pytest.approx(1 / 4)  # TP / (TP + FP + FN)
    assert precision(prediction, truth) == pytest.approx(1 / 3)  # TP / (TP + FP): 1 of 3 predicted is tumour
    assert recall(prediction, truth) == pytest.approx(1 / 2)  # TP / (TP + FN): 1 of 2 tumour pixels found


def test_empty_prediction_on_empty_truth_scores_one_and_a_miss_scores_zero():
    empty = np.zeros((3, 3), dtype=bool)
    lesion = empty.copy()
    lesion[1, 1] = True
    for metric in (dice, iou, precision, recall):
        assert metric(empty, empty) == 1.0
        assert metric(empty, lesion) == 0.0  # missed lesion
        assert metric(lesion, empty) == 0.0  # invented lesion


def test_per_slice_overlap_with_batch_dimension():
    prediction = np.array([[[1, 1]], [[0, 0]], [[1, 0]]])
    truth = np.array([[[1, 0]], [[0, 0]], [[0, 1]]])
    scores = overlap_scores(prediction, truth, batch_dims=1)
    np.testing.assert_allclose(scores["dice"], [2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(scores["precision"], [1 / 2, 1.0, 0.0])
    np.testing.assert_allclose(scores["recall"], [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        dice(prediction, truth[:2])


def test_average_precision_counts_only_the_region():
    # ranked: 0.9 pos (P 1, R 1/2), 0.8 neg, 0.7 pos (P 2/3, R 1) -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.99])
    truth = np.array([1, 0, 1, 0, 0])
    region = np.array([1, 1, 1, 1, 0], dtype=bool)  # the 0.99 false alarm lies outside the brain
    assert average_precision(scores, truth, region) == pytest.approx(5 / 6)
    # with it: 0.99 neg, 0.9 pos (P 1/2, R 1/2), 0.8 neg, 0.7 pos (P 2/4, R 1) -> AP = 1/2
    assert average_precision(scores, truth) == pytest.approx(1 / 2)
    assert average_precision(scores, np.zeros(5)) is None  # no positive pixel: undefined


def test_volume_metrics_by_hand():
    truth = np.zeros((2, 2, 3), dtype=bool)
    truth[0, :, :2] = True  # 4 voxels
    mask = np.zeros_like(truth)
    mask[0, 0, :2] = True
    mask[0, 1, 0] = True  # 3 shared voxels
    mask[1, :, 2] = True
    mask[1, 0, 0] = True  # 3 false positives: 6 predicted, TP = 3, FP = 3, FN = 1
    scores = mask.astype(float)
    result = volume_metrics(mask, scores, truth, np.ones_like(truth), voxel_volume_mm3=2.0)
    assert result["dice"] == pytest.approx(6 / 10)
    assert result["iou"] == pytest.approx(3 / 7)
    assert result["precision"] == pytest.approx(3 / 6)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["predicted_ml"] == pytest.approx(0.012) and result["truth_ml"] == pytest.approx(0.008)
    assert result["volume_error_ml"] == pytest.approx(0.004)
    # a binary map: 6 tied at 1 with 3 positives (P 1/2 at R 3/4), then all (P 4/12 at R 1) -> 3/4 * 1/2 + 1/4 * 1/3
    assert result["auprc"] == pytest.approx(3 / 8 + 1 / 12)
    assert result["verdict_correct"] is True
    assert lesion_volume_error_ml(np.zeros(4), np.ones(4), 500.0) == pytest.approx(-2.0)


def _three_slices():
    """Three 1 x 4 slices: a healthy one called healthy, a tumour slice called unhealthy, a missed one."""
    anomaly_map = np.array([[[0.95, 0.05, 0.04, 0.03]], [[0.9, 0.2, 0.8, 0.1]], [[0.15, 0.25, 0.7, 0.3]]])
    truth = np.array([[[0, 0, 0, 0]], [[1, 1, 0, 0]], [[0, 0, 1, 0]]], dtype=bool)
    return anomaly_map, anomaly_map >= 0.5, np.array([False, True, False]), truth


def test_slice_protocol_by_hand():
    anomaly_map, ungated, verdict, truth = _three_slices()
    result = slice_protocol(ungated, anomaly_map, verdict, truth, np.ones_like(truth))
    assert result["n_slices"] == 3 and result["n_tumour_slices"] == 2
    # mixed (gated): slice 0 empty on empty = 1; slice 1 [1,0,1,0] vs [1,1,0,0] = 2/4; slice 2 gated away = 0
    assert result["mixed_dice"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert result["mixed_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    # unhealthy (ungated, tumour slices only): slice 1 = 1/2 (IoU 1/3), slice 2 [0,0,1,0] = 1
    assert result["unhealthy_dice"] == pytest.approx(0.75)
    assert result["unhealthy_iou"] == pytest.approx((1 / 3 + 1) / 2)
    # verdicts [F, T, F] against tumour [F, T, T]
    assert result["slice_accuracy"] == pytest.approx(2 / 3)
    # tumour slices ranked: .9 pos, .8, .7 pos, .3, .25, .2 pos -> 1/3 (1 + 2/3 + 3/6) = 13/18
    assert result["unhealthy_auprc"] == pytest.approx(13 / 18)
    # all slices: the healthy slice's .95 comes first -> 1/3 (1/2 + 2/4 + 3/7) = 10/21
    assert result["mixed_auprc"] == pytest.approx(10 / 21)


def test_slice_protocol_auprc_ignores_pixels_outside_the_brain_and_healthy_volumes_have_none():
    anomaly_map, ungated, verdict, truth = _three_slices()
    brain = np.ones_like(truth)
    brain[0, 0, 0] = False  # the healthy slice's 0.95 is off the brain
    assert slice_protocol(ungated, anomaly_map, verdict, truth, brain)["mixed_auprc"] == pytest.approx(13 / 18)
    healthy = slice_protocol(ungated, anomaly_map, verdict, np.zeros_like(truth), brain)
    assert healthy["unhealthy_dice"] is None and healthy["mixed_auprc"] is None and healthy["n_tumour_slices"] == 0
    # no tumour: slice 1's mask (called unhealthy) is a false alarm, the other two are empty after the gate
    assert healthy["mixed_dice"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="verdicts"):
        slice_protocol(ungated, anomaly_map, verdict[:2], truth, brain)


def _case(n, n_tumour, mixed, unhealthy, accuracy, auprc, dice_3d, truth_ml, verdict):
    slice_result = {"n_slices": n, "n_tumour_slices": n_tumour, "mixed_dice": mixed[0], "mixed_iou": mixed[1],
                    "unhealthy_dice": unhealthy and unhealthy[0], "unhealthy_iou": unhealthy and unhealthy[1],
                    "slice_accuracy": accuracy, "mixed_auprc": auprc and auprc[0],
                    "unhealthy_auprc": auprc and auprc[1], "slice_auroc": auprc and auprc[0] / 2}
    volume = {"dice": dice_3d, "iou": dice_3d / 2, "precision": 1.0, "recall": dice_3d, "auprc": auprc and auprc[0],
              "truth_ml": truth_ml, "predicted_ml": 1.0, "volume_error_ml": 1.0 - truth_ml,
              "verdict_correct": verdict}
    # lesion-wise: made-up per-case values (Dice half the 3-D Dice, HD95 374 mm x (1 - that))
    lesion_wise = {"dice": dice_3d / 2, "hd95_mm": 374.0 * (1 - dice_3d / 2)}
    return {"slice": slice_result, "volume": volume, "lesion_wise": lesion_wise}


def test_aggregation_pools_slices_and_averages_volumes():
    cases = [
        _case(10, 4, (0.8, 0.7), (0.5, 0.4), 0.9, (0.6, 0.7), 0.6, 5.0, True),
        _case(30, 0, (1.0, 1.0), None, 0.5, None, 1.0, 0.0, False),  # healthy volume
        _case(20, 12, (0.5, 0.25), (0.3, 0.2), 0.8, (0.4, 0.5), 0.2, 2.0, True),
    ]
    result = aggregate_cases(cases)
    assert result["cases"] == 3 and result["tumour_cases"] == 2
    pooled = result["slice_protocol"]
    assert pooled["mixed_dice"] == pytest.approx((8 + 30 + 10) / 60)  # weighted by 10, 30, 20 slices
    assert pooled["mixed_iou"] == pytest.approx((7 + 30 + 5) / 60)
    assert pooled["unhealthy_dice"] == pytest.approx((0.5 * 4 + 0.3 * 12) / 16)  # tumour slices only
    assert pooled["slice_accuracy"] == pytest.approx((9 + 15 + 16) / 60)
    assert pooled["mixed_auprc"] == pytest.approx(0.5) and pooled["unhealthy_auprc"] == pytest.approx(0.6)
    assert pooled["slice_auroc"] == pytest.approx(0.25)  # mean over the volumes that have one
    assert pooled["n_slices"] == 60 and pooled["n_tumour_slices"] == 16
    volume = result["volume"]
    assert volume["dice"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.2), "n": 2}  # tumour cases only
    assert volume["abs_volume_error_ml"]["mean"] == pytest.approx((4.0 + 1.0) / 2)
    assert volume["volume_accuracy"]["mean"] == pytest.approx(2 / 3)  # all cases
    # the healthy volume's mask (1 mL) is its false positive; it was not called healthy
    assert volume["healthy_false_positive_ml"] == {"mean": pytest.approx(1.0), "std": pytest.approx(0.0), "n": 1}
    assert volume["healthy_called_healthy"]["mean"] == 0.0
    # lesion-wise over all three cases, the healthy one included (as BraTS ranks): Dice 0.3, 0.5, 0.1
    assert result["lesion_wise"]["dice"] == {"mean": pytest.approx(0.3), "std": pytest.approx(np.sqrt(0.08 / 3)),
                                             "n": 3}
    assert result["lesion_wise"]["hd95_mm"]["mean"] == pytest.approx(374.0 * 0.7)
    with pytest.raises(ValueError, match="no cases"):
        aggregate_cases([])


def test_verdict_reliability_by_hand_and_pooled_over_volumes():
    probability = [0.9, 0.5, 0.1, 0.7, 0.05]
    unhealthy = [True, True, False, False, True]
    tumour = [True, False, False, True, False]
    # uncertain: 0.5 and 0.7 (wrong, wrong); confident: 0.9 right, 0.1 right, 0.05 wrong
    uncertain = [False, True, False, True, False]
    first = verdict_reliability(probability, unhealthy, tumour, uncertain)
    assert first == {"n_slices": 5, "n_tumour_slices": 2, "n_uncertain": 2, "confident_correct": 2,
                     "uncertain_correct": 0, "squared_error": pytest.approx(0.01 + 0.25 + 0.01 + 0.09 + 0.0025)}
    second = verdict_reliability([0.3], [True], [True], [True])  # uncertain, right
    pooled = aggregate_reliability([first, second])
    assert pooled == {"n_slices": 6, "uncertain_share": pytest.approx(3 / 6),
                      "confident_accuracy": pytest.approx(2 / 3), "uncertain_accuracy": pytest.approx(1 / 3),
                      "brier": pytest.approx((0.3625 + 0.49) / 6), "brier_constant": pytest.approx(0.5 * 0.5)}
    assert aggregate_reliability([second])["confident_accuracy"] is None
    with pytest.raises(ValueError, match="one probability, verdict, truth and uncertainty flag per slice"):
        verdict_reliability([0.5, 0.5], [True], [True], [True])


def test_slice_score_auroc_ranks_tumour_slices_by_low_scores():
    from anofpdm.evaluation.metrics import slice_score_auroc

    tumour = np.array([False, True, True, False, False])
    assert slice_score_auroc(np.array([0.99, 0.90, 0.95, 0.97, 0.98]), tumour) == 1.0
    assert slice_score_auroc(np.array([0.90, 0.99, 0.98, 0.95, 0.94]), tumour) == 0.0
    assert slice_score_auroc(np.array([0.99, 0.90, 0.98, 0.95, 0.97]), tumour) == pytest.approx(4 / 6)
    assert slice_score_auroc(np.full(5, np.nan), tumour) is None  # a method without slice scores
    assert slice_score_auroc(np.ones(5), np.zeros(5, bool)) is None  # a healthy volume
    with pytest.raises(ValueError, match="one score per slice"):
        slice_score_auroc(np.ones(4), tumour)


def _cube(mask: np.ndarray, corner: tuple[int, int, int], side: int) -> None:
    x, y, z = corner
    mask[x : x + side, y : y + side, z : z + side] = True


def test_lesion_wise_one_lesion_found_exactly_and_one_missed_scores_half():
    truth = np.zeros((40, 20, 20), dtype=bool)
    _cube(truth, (2, 5, 5), 5)  # 125 voxels of 1 mm^3: above the 50 mm^3 BraTS-GLI floor
    _cube(truth, (30, 5, 5), 5)  # 23 voxels apart: far beyond the 3-voxel dilation, a lesion of its own
    prediction = np.zeros_like(truth)
    _cube(prediction, (2, 5, 5), 5)
    scores = lesion_wise_scores(prediction, truth, (1.0, 1.0, 1.0))
    assert scores["dice"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert scores["hd95_mm"] == pytest.approx((0.0 + 374.0) / 2)  # the missed lesion scores 374 mm
    assert (scores["truth_lesions"], scores["detected"], scores["missed"], scores["false_positives"]) == (2, 1, 1, 0)


def test_lesion_wise_an_invented_lesion_is_a_false_positive_and_empty_cases_score_one():
    truth = np.zeros((40, 20, 20), dtype=bool)
    _cube(truth, (2, 5, 5), 5)
    prediction = truth.copy()
    _cube(prediction, (30, 5, 5), 3)  # far from the truth lesion
    scores = lesion_wise_scores(prediction, truth, (1.0, 1.0, 1.0))
    assert scores["dice"] == pytest.approx(0.5) and scores["hd95_mm"] == pytest.approx(187.0)
    assert scores["false_positives"] == 1 and scores["missed"] == 0
    empty = np.zeros_like(truth)
    assert lesion_wise_scores(empty, empty, (1, 1, 1))["dice"] == 1.0
    assert lesion_wise_scores(empty, empty, (1, 1, 1))["hd95_mm"] == 0.0
    invented = lesion_wise_scores(prediction, empty, (1, 1, 1))  # a healthy case with two invented lesions
    assert invented["dice"] == 0.0 and invented["hd95_mm"] == pytest.approx(374.0)
    assert invented["false_positives"] == 2


def test_lesion_wise_half_found_lesion_gives_its_dice():
    truth = np.zeros((20, 20, 20), dtype=bool)
    truth[4:12, 4:9, 4:9] = True  # 8 x 5 x 5 = 200 voxels
    prediction = np.zeros_like(truth)
    prediction[4:8, 4:9, 4:9] = True  # its first half, 100 voxels: Dice 2 * 100 / 300
    assert lesion_wise_scores(prediction, truth, (1, 1, 1))["dice"] == pytest.approx(2 / 3)


def test_lesion_wise_small_truth_lesions_are_left_out_by_volume_in_mm3():
    truth = np.zeros((40, 20, 20), dtype=bool)
    _cube(truth, (2, 5, 5), 5)  # found
    truth[30:40, 5:9, 5] = True  # 40 voxels, missed
    prediction = np.zeros_like(truth)
    _cube(prediction, (2, 5, 5), 5)
    at_1mm = lesion_wise_scores(prediction, truth, (1.0, 1.0, 1.0))  # 40 mm^3 <= 50: left out
    assert at_1mm["dice"] == 1.0 and at_1mm["small_lesions_left_out"] == 1 and at_1mm["truth_lesions"] == 1
    at_2mm = lesion_wise_scores(prediction, truth, (1.0, 1.0, 2.0))  # 80 mm^3: scored, and missed
    assert at_2mm["dice"] == pytest.approx(0.5) and at_2mm["small_lesions_left_out"] == 0


def test_lesion_wise_truth_lesions_within_the_dilation_count_as_one():
    truth = np.zeros((50, 20, 20), dtype=bool)
    _cube(truth, (2, 5, 5), 5)  # x 2..6
    _cube(truth, (12, 5, 5), 5)  # x 12..16: 5 voxels between, bridged by 3 + 3 dilations
    prediction = np.zeros_like(truth)
    _cube(prediction, (2, 5, 5), 5)
    merged = lesion_wise_scores(prediction, truth, (1, 1, 1))  # one lesion of 250 voxels, half found
    assert merged["truth_lesions"] == 1 and merged["dice"] == pytest.approx(2 * 125 / (250 + 125))
    far = np.zeros_like(truth)
    _cube(far, (2, 5, 5), 5)
    _cube(far, (20, 5, 5), 5)  # 13 voxels between: two lesions
    apart = lesion_wise_scores(prediction, far, (1, 1, 1))
    assert apart["truth_lesions"] == 2 and apart["dice"] == pytest.approx(0.5)


def test_lesion_wise_hd95_is_in_mm_on_the_grid_spacing():
    truth = np.zeros((9, 9, 9), dtype=bool)
    truth[4, 4, 2] = True
    prediction = np.zeros_like(truth)
    prediction[4, 4, 4] = True  # two voxels away along z: within the dilation, so matched, Dice 0
    scores = lesion_wise_scores(prediction, truth, (1.0, 1.0, 2.5), min_lesion_mm3=0)
    assert scores["false_positives"] == 0 and scores["detected"] == 1
    assert scores["dice"] == 0.0 and scores["hd95_mm"] == pytest.approx(5.0)  # 2 voxels of 2.5 mm
    assert hd95_mm(truth, truth, (1, 1, 1)) == 0.0
    with pytest.raises(ValueError, match="voxel sizes"):
        lesion_wise_scores(prediction, truth, (1.0, 1.0))
    with pytest.raises(ValueError, match="dilation_iterations"):
        lesion_wise_scores(prediction, truth, (1, 1, 1), dilation_iterations=0)


def _tumour() -> np.ndarray:
    """An 8^3 whole tumour in BraTS labels: oedema around a 4^3 enhancing core with a 2^3 necrotic centre."""
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[2:10, 2:10, 2:10] = 2
    labels[4:8, 4:8, 4:8] = 4
    labels[5:7, 5:7, 5:7] = 1
    return labels


def test_the_faint_edge_is_the_outer_shell_of_the_whole_tumour():
    whole = _tumour() > 0
    edge = faint_edge(whole, (1.0, 1.0, 1.0))  # 1 mm: voxels 1 and 2 mm deep (and 1.4 mm diagonally)
    assert edge.sum() == 8**3 - 4**3 and not edge[4:8, 4:8, 4:8].any()
    assert faint_edge(whole, (1.0, 1.0, 1.0), edge_mm=1.0).sum() == 8**3 - 6**3
    assert faint_edge(whole, (4.0, 4.0, 4.0)).sum() == 8**3 - 6**3  # coarser than 2 mm: the outer layer
    cored = whole.copy()
    cored[5:7, 5:7, 5:7] = False  # a hole inside is not outside: no edge around it
    assert (faint_edge(cored, (1.0, 1.0, 1.0)) == edge).all()
    assert not faint_edge(np.zeros_like(whole), (1.0, 1.0, 1.0)).any()
    with pytest.raises(ValueError, match="edge_mm"):
        faint_edge(whole, (1.0, 1.0, 1.0), edge_mm=0)


def test_recall_per_sub_region_and_its_aggregate():
    labels = _tumour()
    ring = labels > 0
    ring[5:7, 5:7, 5:7] = False  # the necrotic centre is a hole in the prediction
    shrunk = np.zeros_like(ring)
    shrunk[3:9, 3:9, 3:9] = True  # misses the outer voxel layer: half of the faint edge, 6^3 - 4^3 of the oedema
    spacing = (1.0, 1.0, 1.0)
    assert sub_region_recall(ring, labels, spacing) == {
        "necrotic_core": 0.0, "oedema": 1.0, "enhancing": 1.0, "faint_edge": 1.0}
    scores = sub_region_recall(shrunk, labels, spacing)
    assert scores["necrotic_core"] == 1.0 and scores["enhancing"] == 1.0
    assert scores["oedema"] == pytest.approx((6**3 - 4**3) / (8**3 - 4**3))
    assert scores["faint_edge"] == pytest.approx((6**3 - 4**3) / (8**3 - 4**3))  # the 2 mm shell is the oedema
    without_core = np.where(labels == 1, 4, labels)
    assert sub_region_recall(ring, without_core, spacing)["necrotic_core"] is None
    assert set(sub_region_recall(ring, np.zeros_like(labels), spacing).values()) == {None}
    summary = aggregate_sub_region_recall([sub_region_recall(ring, labels, spacing),
                                           sub_region_recall(ring, without_core, spacing)])
    assert summary["necrotic_core"] == {"mean": 0.0, "std": 0.0, "n": 1}  # only the case whose truth has it
    assert summary["oedema"]["n"] == 2 and summary["faint_edge"]["mean"] == 1.0
