"""One volume through the whole pipeline with a tiny random-weight model (mechanics, not quality)."""

import numpy as np
import pytest
from scipy import ndimage

from anofpdm.method.model import load_model, save_checkpoint
from anofpdm.method.pipeline import InferenceOptions, LesionEdges, finish_on_input_grid, run_forward, segment_volume
from anofpdm.method.decisions import VolumeRule
from anofpdm.volumes.bias_field import correct_bias_fields
from anofpdm.volumes.checks import InputError
from anofpdm.volumes.slicing import brain_pixels, to_input_grid, to_model_slices

from conftest import TINY, check_label_values, make_volume_pair, tiny_calibration


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return load_model(tiny_model_path)


PAPER = {"decision_rule": "paper"}  # the paper's rule: the calibrated c* gates each slice


def _with_calibration(model, tmp_path, **overrides):
    from anofpdm.method.model import load_checkpoint

    payload = load_checkpoint(model.path)
    path = tmp_path / "recalibrated.pt"
    save_checkpoint(path, model.config, payload["state_dict"], payload["schedule"], payload["training"],
                    {"fast": tiny_calibration(**overrides)})
    return load_model(path)


def test_result_is_on_the_exact_input_grid_with_a_full_report(model):
    images = make_volume_pair()
    steps = []
    result = segment_volume(model, images, InferenceOptions(),
                            progress=lambda stage, done, total: steps.append((done, total)))
    flair = images["flair"]
    assert result.mask.shape == flair.shape and result.anomaly_map.shape == flair.shape
    np.testing.assert_array_equal(result.mask.affine, flair.affine)
    np.testing.assert_array_equal(result.anomaly_map.affine, flair.affine)
    assert result.mask.get_data_dtype() == np.uint8
    report = result.report
    check_label_values(np.asanyarray(result.mask.dataobj), report)
    segmented = report["slices"]["segmented"]
    assert segmented == 10  # the make_volume_pair brain spans z = 1..10
    assert report["network_evaluations"] == 2 * segmented * 4  # 4 visited steps: 0, 10, 20, 30
    assert steps[-1] == (2 * 4, 2 * 4)  # 10 slices in 2 chunks of at most 8 (the CPU default), 4 steps each
    assert set(report["slices"]["end_step"]) == {"flair", "t2"}
    assert all(t in (0, 10, 20, 30) for t in report["slices"]["end_step"]["flair"])
    for key in ("verdict", "score", "cosine_threshold", "lesions", "total_volume_ml", "timings_s", "settings"):
        assert key in report
    assert np.asanyarray(result.anomaly_map.dataobj)[0, 0, 0] == 0.0  # outside the brain slices


def test_same_seed_same_result(model):
    first = segment_volume(model, make_volume_pair(), InferenceOptions(seed=4))
    second = segment_volume(model, make_volume_pair(), InferenceOptions(seed=4))
    np.testing.assert_array_equal(np.asanyarray(first.anomaly_map.dataobj), np.asanyarray(second.anomaly_map.dataobj))


def test_the_papers_verdict_gates_the_mask_and_small_components_are_removed(model, tmp_path):
    never = _with_calibration(model, tmp_path, cosine_threshold=-1.0)
    result = segment_volume(never, make_volume_pair(), InferenceOptions(**PAPER))
    assert result.report["verdict"] == "healthy"
    assert not np.asanyarray(result.mask.dataobj).any()
    assert np.asanyarray(result.anomaly_map.dataobj).max() > 0  # the map is still returned

    always = _with_calibration(model, tmp_path, cosine_threshold=1.0)
    kept = segment_volume(always, make_volume_pair(), InferenceOptions(**PAPER, min_lesion_mm3=0, median_kernel=1))
    assert kept.report["slices"]["unhealthy"] == kept.report["slices"]["segmented"]
    kept_voxels = np.count_nonzero(np.asanyarray(kept.mask.dataobj))
    assert kept_voxels > 0
    total_ml = sum(row["volume_ml"] for row in kept.report["lesions"])
    voxel_ml = abs(np.linalg.det(kept.mask.affine[:3, :3])) / 1000
    assert total_ml == pytest.approx(kept_voxels * voxel_ml, rel=1e-3)
    dropped = segment_volume(always, make_volume_pair(), InferenceOptions(**PAPER, min_lesion_mm3=1e9, median_kernel=1))
    assert not np.asanyarray(dropped.mask.dataobj).any() and dropped.report["components_removed"] > 0


def test_report_gives_each_slice_the_validation_frequency_at_its_score(model, tmp_path):
    unrecorded = segment_volume(_with_calibration(model, tmp_path, unhealthy_frequency=()), make_volume_pair(),
                                InferenceOptions(**PAPER)).report
    assert unrecorded["uncertain_slices"] is None and unrecorded["slices"]["unhealthy_probability"] is None
    assert any("recalibrate" in w for w in unrecorded["warnings"])
    unmarked = segment_volume(_with_calibration(model, tmp_path, cosine_threshold=1.0, unhealthy_frequency=()),
                              make_volume_pair(), InferenceOptions(**PAPER, min_lesion_mm3=0, median_kernel=1))
    assert unmarked.report["lesions"] and unmarked.report["settings"]["mark_uncertain"] is False  # nothing to mark by
    assert set(np.unique(np.asanyarray(unmarked.mask.dataobj))) == {0, 1}
    assert unmarked.report["label_names"] == {"tumour": 1}

    ranked = sorted(unrecorded["slices"]["score"])  # group bounds midway between this volume's slice scores
    low, high = (ranked[2] + ranked[3]) / 2, (ranked[6] + ranked[7]) / 2
    table = ((float(low), 0.95), (float(high), 0.5), (float(high) + 1.0, 0.05))
    report = segment_volume(_with_calibration(model, tmp_path, unhealthy_frequency=table), make_volume_pair(),
                            InferenceOptions(**PAPER)).report
    assert report["slices"]["score"] == unrecorded["slices"]["score"]
    expected = [next((fraction for bound, fraction in table if score <= bound), table[-1][1])
                for score in report["slices"]["score"]]
    assert report["slices"]["unhealthy_probability"] == pytest.approx(expected, abs=1e-4)
    assert report["uncertain_slices"] == sum(0.2 < p < 0.8 for p in expected)
    assert report["unhealthy_probability"] == pytest.approx(expected[int(np.argmin(report["slices"]["score"]))],
                                                            abs=1e-4)
    assert len(set(expected)) == 3 and not report["warnings"]

    always = _with_calibration(model, tmp_path, cosine_threshold=1.0, unhealthy_frequency=table)
    kept = segment_volume(always, make_volume_pair(), InferenceOptions(**PAPER, min_lesion_mm3=0, median_kernel=1))
    mask = np.asanyarray(kept.mask.dataobj) > 0  # make_volume_pair's axial planes are the model slices
    planes = set(np.flatnonzero(mask.any(axis=(0, 1))))
    by_plane = dict(zip(kept.report["slices"]["index"], kept.report["slices"]["unhealthy_probability"], strict=True))
    assert kept.report["lesions"] and max(row["unhealthy_probability"] for row in kept.report["lesions"]) == \
        pytest.approx(max(by_plane[z] for z in planes), abs=1e-4)
    labels = np.asanyarray(kept.mask.dataobj)
    check_label_values(labels, kept.report)
    # each lesion is 1 or 2 by the highest probability of the planes it spans, checked here plane by plane
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    peaks = [max(by_plane[z] for z in np.flatnonzero((components == c).any(axis=(0, 1)))) for c in range(1, count + 1)]
    assert [int(labels[components == c].max()) for c in range(1, count + 1)] == [1 if p >= 0.8 else 2 for p in peaks]
    assert set(np.unique(labels)) == {0, 1, 2}  # both kinds of lesion occur here
    binary = segment_volume(always, make_volume_pair(), InferenceOptions(**PAPER, min_lesion_mm3=0, median_kernel=1,
                                                                         mark_uncertain=False))
    assert np.array_equal(np.asanyarray(binary.mask.dataobj), mask.astype(np.uint8))
    assert binary.report["label_names"] == {"tumour": 1} and binary.report["settings"]["mark_uncertain"] is False


def test_overrides_warn_and_unknown_mode_is_an_error(model):
    result = segment_volume(model, make_volume_pair(), InferenceOptions(stride=20))
    assert result.report["settings"]["stride"] == 20
    assert any("stride=20" in w for w in result.report["warnings"])
    with pytest.raises(ValueError, match="no calibration for mode 'turbo'"):
        segment_volume(model, make_volume_pair(), InferenceOptions(mode="turbo"))


def test_bad_input_is_an_input_error(model):
    images = make_volume_pair()
    with pytest.raises(InputError, match="missing input sequence"):
        segment_volume(model, {"flair": images["flair"]})


def test_an_early_stop_calibration_from_the_batch_wide_forward_process_is_refused(model, tmp_path):
    outdated = tiny_calibration(early_stop=2)
    del outdated["forward_process_version"]  # stored before the version was recorded: version 1
    from anofpdm.method.model import load_checkpoint

    payload = load_checkpoint(model.path)
    path = tmp_path / "old.pt"
    save_checkpoint(path, model.config, payload["state_dict"], payload["schedule"], payload["training"],
                    {"fast": outdated, "full": {**outdated, "early_stop": None}})
    old = load_model(path)
    with pytest.raises(InputError, match="Recalibrate: anofpdm calibrate"):
        segment_volume(old, make_volume_pair(), InferenceOptions(mode="fast"))
    # without early stop only the noise draws changed, which a calibration does not depend on
    images = make_volume_pair()
    assert segment_volume(old, images, InferenceOptions(mode="full")).mask.shape == images["flair"].shape


def test_a_lesion_cut_by_the_field_of_view_is_held_to_the_minimum_on_the_input_grid():
    _, geometry, _ = to_model_slices(make_volume_pair(), TINY.sequences, TINY.image_size, TINY.field_of_view_mm)
    model_voxel_mm3 = float(np.prod(geometry.spacing_mm))  # 15 x 15 x 5 mm: the model window is wider than the input
    input_voxel_mm3 = 4.0 * 4.0 * 5.0
    for pixel, kept in (((2, 2), False), ((3, 3), True)):  # (2, 2) lies mostly outside the input's field of view
        candidate = np.zeros((TINY.image_size, TINY.image_size, len(geometry.slices)), dtype=bool)
        candidate[pixel[0], pixel[1], 4] = True
        mask, mask_input, _, lesions, removed, _, _ = finish_on_input_grid(candidate.astype(np.float32), candidate,
                                                                           geometry, min_lesion_mm3=500)
        assert model_voxel_mm3 > 500 and mask.sum() == 1  # kept on the model grid
        assert bool(lesions) == kept and removed == (0 if kept else 1)
        assert mask_input.sum() * input_voxel_mm3 > 500 if kept else not mask_input.any()
        assert all(row["volume_ml"] * 1000 > 500 for row in lesions)


def test_a_lesion_is_filled_before_the_component_filter_so_its_core_counts_to_its_size():
    _, geometry, _ = to_model_slices(make_volume_pair(), TINY.sequences, TINY.image_size, TINY.field_of_view_mm)
    model_voxel_mm3 = float(np.prod(geometry.spacing_mm))
    hollow = np.zeros((TINY.image_size, TINY.image_size, len(geometry.slices)), dtype=bool)
    hollow[6:9, 6:9, 3:6] = True
    hollow[7, 7, 4] = False  # a 26-voxel wall around a one-voxel core
    wall_mm3 = 26 * model_voxel_mm3
    kept = finish_on_input_grid(hollow.astype(np.float32), hollow, geometry, wall_mm3).mask
    assert kept.sum() == 27 and kept[7, 7, 4]  # the default fills it: 27 voxels, more than the minimum
    kept, _, _, lesions, removed, _, _ = finish_on_input_grid(hollow.astype(np.float32), hollow, geometry, wall_mm3,
                                                              lesion_holes="keep")
    assert not kept.any() and not lesions and removed == 1  # kept hollow, the wall alone is at the minimum
    with pytest.raises(InputError, match="lesion_holes"):
        InferenceOptions(lesion_holes="2d")



def test_lesion_edges_are_redrawn_on_the_input_grid_at_half_the_flair_contrast():
    images = make_volume_pair()  # a 40 x 40 x 20 mm FLAIR-bright block (voxels 15:25, 15:25, 4:8) in the brain
    _, geometry, _ = to_model_slices(images, TINY.sequences, TINY.image_size, TINY.field_of_view_mm)
    flair = np.asanyarray(images["flair"].dataobj)
    block = np.zeros(flair.shape, dtype=bool)
    block[15:25, 15:25, 4:8] = True
    size, planes = TINY.image_size, len(geometry.slices)  # the model-grid pixels (15 mm) the block's voxels fall in
    index = np.arange(size, dtype=np.float32)
    pixel_x = to_input_grid(np.broadcast_to(index[:, None, None], (size, size, planes)).copy(), geometry)
    pixel_y = to_input_grid(np.broadcast_to(index[None, :, None], (size, size, planes)).copy(), geometry)
    coarse = np.zeros((size, size, planes), dtype=bool)
    for i, j, k in np.argwhere(block):  # the input's axial planes are the model's slices here
        coarse[int(round(pixel_x[i, j, k])), int(round(pixel_y[i, j, k])), geometry.slices.index(k)] = True
    edges = LesionEdges(flair, flair > 0, max(geometry.spacing_mm[:2]))
    assert InferenceOptions().lesion_boundary == "half-contrast"
    resampled = finish_on_input_grid(coarse.astype(np.float32), coarse, geometry, 0.0).labels
    finished = finish_on_input_grid(coarse.astype(np.float32), coarse, geometry, 0.0, edges=edges)
    redrawn, lesions = finished.labels, finished.lesions
    assert (resampled[~block] > 0).sum() > 100  # the blocky mask runs past the block
    assert not redrawn[~block].any() and (redrawn > 0).sum() >= 0.8 * block.sum() and len(lesions) == 1
    with pytest.raises(InputError, match="lesion_boundary"):
        InferenceOptions(lesion_boundary="voxel")


def test_the_volume_rule_is_the_default_and_masks_only_flair_bright_brain(model, tmp_path):
    never = _with_calibration(model, tmp_path, cosine_threshold=-1.0)  # the paper's rule calls every slice healthy
    images = make_volume_pair()
    options = InferenceOptions(min_lesion_mm3=0, median_kernel=1)
    assert options.decision_rule == "volume"
    # the random network's map has no outlier at the default map_z: any pixel above the volume's median map counts
    volume = segment_volume(never, images, options, volume_rule=VolumeRule(map_z=0.0))
    paper = segment_volume(never, images, InferenceOptions(min_lesion_mm3=0, median_kernel=1, decision_rule="paper"))
    assert volume.report["settings"]["decision_rule"] == "volume"
    assert not np.asanyarray(paper.mask.dataobj).any()  # c* gates the paper's rule; it plays no part in the volume's
    grid = volume.model_grid
    brain, flair = brain_pixels(grid.slices), grid.slices[:, 0]
    assert grid.eligible is not None and grid.eligible.any()
    assert not (grid.eligible & ~(brain & (flair > np.median(flair[brain])))).any()
    flags = np.array(volume.report["slices"]["unhealthy_flag"])
    np.testing.assert_array_equal(flags, grid.unhealthy)
    assert (grid.scores[flags] <= 0.0).all()  # an unhealthy slice holds a pixel at map_z or above
    mask = np.asanyarray(volume.mask.dataobj) > 0  # make_volume_pair's axial planes are the model slices
    assert flags.any() and set(np.flatnonzero(mask.any(axis=(0, 1)))) == {volume.report["slices"]["index"][i]
                                                                            for i in np.flatnonzero(flags)}
    # the verdict follows the filtered mask: a slice whose pixels all fall in removed components is healthy
    filtered = segment_volume(never, images, InferenceOptions(min_lesion_mm3=1e9, median_kernel=1),
                              volume_rule=VolumeRule(map_z=0.0))
    assert not any(filtered.report["slices"]["unhealthy_flag"]) and filtered.report["verdict"] == "healthy"
    assert np.array_equal(np.asanyarray(paper.anomaly_map.dataobj), np.asanyarray(volume.anomaly_map.dataobj))
    with pytest.raises(InputError, match="decision_rule must be one of"):
        InferenceOptions(decision_rule="both")


def test_slices_with_little_brain_are_left_out_of_the_network(model):
    images = make_volume_pair()
    for name in ("flair", "t2"):  # the top and bottom brain slices (z = 1 and 10) keep a 4 x 4 corner of brain
        data = np.asanyarray(images[name].dataobj).copy()
        corner = data[6:10, 5:9, [1, 10]].copy()
        data[:, :, [1, 10]] = 0.0
        data[6:10, 5:9, [1, 10]] = corner
        images[name] = type(images[name])(data, images[name].affine)
    every = segment_volume(model, images, InferenceOptions(min_lesion_mm3=0, min_brain_fraction=0.0))
    fewer = segment_volume(model, images, InferenceOptions(min_lesion_mm3=0))
    assert InferenceOptions().min_brain_fraction == 0.1
    assert every.report["slices"]["visited"] == every.report["slices"]["segmented"] == 10
    slices = fewer.report["slices"]
    assert slices["segmented"] == 10 and slices["visited"] == 8
    left_out = [index for index, flag in zip(slices["index"], slices["visited_flag"]) if not flag]
    assert left_out == [1, 10]
    assert fewer.report["network_evaluations"] == every.report["network_evaluations"] * 8 // 10
    assert fewer.report["settings"]["min_brain_fraction"] == 0.1
    anomaly_map, mask = np.asanyarray(fewer.anomaly_map.dataobj), np.asanyarray(fewer.mask.dataobj)
    assert not anomaly_map[:, :, left_out].any() and not mask[:, :, left_out].any()
    assert anomaly_map[:, :, 2:10].any()
    # a visited slice keeps its own noise, so its statistics are those of the run over every slice
    kept = np.array(slices["visited_flag"])
    np.testing.assert_allclose(fewer.model_grid.raw_map[kept], every.model_grid.raw_map[kept], rtol=1e-4, atol=1e-6)
    assert not any(flag for flag, visited in zip(slices["unhealthy_flag"], slices["visited_flag"]) if not visited)
    with pytest.raises(InputError, match="min_brain_fraction must lie in"):
        InferenceOptions(min_brain_fraction=1.0)


def test_each_sequence_is_divided_by_its_bias_field_before_slicing_and_for_the_lesion_edges(model):
    images = make_volume_pair()
    field = np.exp(0.5 * np.linspace(-1, 1, 40))[:, None, None].astype(np.float32)  # brighter towards +x
    for name in ("flair", "t2"):
        images[name] = type(images[name])(np.asanyarray(images[name].dataobj) * field, images[name].affine)
    corrected, _ = correct_bias_fields(images, ("flair", "t2"), "n4")
    outputs = run_forward(model, images, InferenceOptions(bias_correction="n4"))
    np.testing.assert_allclose(outputs.flair, np.asanyarray(corrected["flair"].dataobj), rtol=1e-5)
    brain = outputs.brain
    left, right = outputs.flair[:20][brain[:20]].mean(), outputs.flair[20:][brain[20:]].mean()
    assert abs(right / left - 1) < 0.5 * (np.exp(0.5) - 1)  # the field's brightening mostly taken out
    report = segment_volume(model, images, InferenceOptions(bias_correction="n4"), forward_outputs=outputs).report
    assert report["bias_correction"]["method"] == "n4" and report["settings"]["bias_correction"] == "n4"
    assert set(report["bias_correction"]["field_range"]) == {"flair", "t2"}
    assert "bias_correction_s" in report["timings_s"]
    assert InferenceOptions().bias_correction == "none"
    unchanged = run_forward(model, images, InferenceOptions())
    np.testing.assert_array_equal(unchanged.flair, np.asanyarray(images["flair"].dataobj))
    assert unchanged.bias_correction.field_range == {}
    with pytest.raises(InputError, match="bias_correction must be one of"):
        InferenceOptions(bias_correction="n3")
