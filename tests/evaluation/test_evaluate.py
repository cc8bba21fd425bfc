"""Evaluation end to end on two tiny BraTS-layout cases with the tiny model, in one and in two processes."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anofpdm.evaluation.baseline_tuning import (
    DEFAULT_TUNE_MIN_LESION_MM3,
    DEFAULT_TUNE_ZSCORES,
    TuningGrid,
    tune_thresholds,
)
from anofpdm.evaluation.case_scoring import SliceProtocol, prepare_case, score_result
from anofpdm.cli import main as cli_main
from anofpdm.data.brats import find_cases
from anofpdm.data.synth import synthesize_case, write_case
from anofpdm.evaluation.evaluate import evaluate
from anofpdm.evaluation.methods import ANOFPDM_VARIANTS, METHODS, EvaluationSettings, run_method
from anofpdm.evaluation.store import run_key, source_digest
from anofpdm.method.model import load_model
from anofpdm.method.pipeline import ModelGridOutputs, SegmentationResult
from anofpdm.volumes.overlap import dice
from anofpdm.volumes.slicing import to_input_grid

from conftest import make_volume_pair

LIB = Path(__file__).resolve().parents[2] / "lib"
LESION = (slice(15, 25), slice(15, 25), slice(4, 8))  # make_volume_pair's bright block
CHEAP = ["--baseline-stride", "10", "--anoddpm-noise-level", "20", "--cfg-noise-level", "20", "--min-lesion-mm3", "0",
         "--overlays", "1", "--seed", "3"]


def _write_case(root: Path, case_id: str, seed: int, lesion: bool) -> None:
    images = make_volume_pair(seed=seed, lesion=lesion)
    folder = root / case_id
    folder.mkdir(parents=True)
    for name, image in images.items():
        nib.save(image, folder / f"{case_id}_{name}.nii.gz")
    seg = np.zeros(images["flair"].shape, dtype=np.uint8)
    if lesion:
        seg[LESION] = 2  # oedema
        seg[18:22, 18:22, 5:7] = 4  # enhancing: still whole tumour
    nib.save(nib.Nifti1Image(seg, images["flair"].affine), folder / f"{case_id}_seg.nii.gz")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    _write_case(root, "BraTS2021_00001", seed=1, lesion=True)
    _write_case(root, "BraTS2021_00002", seed=2, lesion=False)
    _write_case(root, "BraTS2021_00003", seed=3, lesion=True)  # validation: tunes the baselines' quantiles
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The part of a prepared data set's manifest that names the splits."""
    root = tmp_path_factory.mktemp("prepared")
    splits = {"test": {"cases": ["BraTS2021_00001", "BraTS2021_00002"]}, "val": {"cases": ["BraTS2021_00003"]}}
    (root / "manifest.json").write_text(json.dumps({"splits": splits}))
    return root


def main(argv: list[str]) -> int:
    """``anofpdm evaluate ARGV``."""
    return cli_main(["evaluate", *argv])


def _argv(model: Path, data: Path, prepared: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--methods", ",".join(METHODS),
            "--prepared", str(prepared), "--split", "test", "--tune-split", "val", "--tune-quantiles", "0.9,0.95,0.99",
            *CHEAP]


@pytest.fixture(scope="module")
def single_process(tiny_model_path, data_dir, prepared, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval1")
    assert main(_argv(tiny_model_path, data_dir, prepared, out)) == 0
    return json.loads((out / "results.json").read_text()) | {"out": str(out)}


def test_results_json_markdown_and_overlays(single_process):
    results, out = single_process, Path(single_process["out"])
    assert [case["case"] for case in results["cases"]] == ["BraTS2021_00001", "BraTS2021_00002"]
    assert results["settings"]["world_size"] == 1 and results["failed_cases"] == []
    assert results["settings"]["cases"] == ["BraTS2021_00001", "BraTS2021_00002"]  # the test split only
    tuned = results["settings"]["tuned_thresholds"]
    assert set(tuned) == {"anoddpm-reconstruction", "cfg-ddim", "flair-threshold", "flair-zscore"}
    for method, choice in tuned.items():
        assert choice["cases"] == ["BraTS2021_00003"]
        if method == "flair-zscore":  # its z* and minimum lesion size, from the default candidates
            assert choice["threshold"]["value"] in DEFAULT_TUNE_ZSCORES and choice["threshold"]["quantile"] is None
            assert choice["min_lesion_mm3"] in DEFAULT_TUNE_MIN_LESION_MM3
        else:  # a quantile of --tune-quantiles, at the run's --min-lesion-mm3
            assert choice["threshold"]["quantile"] in (0.9, 0.95, 0.99) and choice["min_lesion_mm3"] == 0
        assert results["settings"]["thresholds"][method] == choice["threshold"]
        assert results["settings"]["baseline_min_lesion_mm3"][method] == choice["min_lesion_mm3"]
    tumour_case, healthy_case = results["cases"]
    assert tumour_case["truth_ml"] == pytest.approx(10 * 10 * 4 * 80 / 1000)  # 4 x 4 x 5 mm voxels
    assert healthy_case["truth_ml"] == 0
    for method in METHODS:
        summary = results["summary"][method]
        assert summary["cases"] == 2 and summary["tumour_cases"] == 1
        assert summary["slice_protocol"]["n_slices"] == 20  # 10 brain slices per case
        tumour_slices = tumour_case["methods"][method]["slice"]["n_tumour_slices"]
        assert summary["slice_protocol"]["n_tumour_slices"] == tumour_slices
        assert 0 <= summary["slice_protocol"]["mixed_dice"] <= 1
        assert summary["volume"]["dice"]["n"] == 1 and summary["volume"]["volume_accuracy"]["n"] == 2
        assert summary["volume"]["dice"]["std"] == 0.0
        for case in results["cases"]:
            scored = case["methods"][method]
            assert set(scored) == {"slice", "volume", "lesion_wise", "reliability", "sub_region_recall", "seconds",
                                   "network_evaluations", "warnings"}
            assert 0 <= scored["lesion_wise"]["dice"] <= 1 and 0 <= scored["lesion_wise"]["hd95_mm"] <= 374
            assert scored["slice"]["n_slices"] == 10
            # AnoFPDM's calibration reports unhealthy probabilities; the baselines have no slice classifier
            assert (scored["reliability"] is not None) == (method in ANOFPDM_VARIANTS)
        # the tumour case's truth holds oedema and enhancing tumour, no necrotic core; the healthy case none
        recall = tumour_case["methods"][method]["sub_region_recall"]
        assert recall["necrotic_core"] is None
        assert all(0 <= recall[name] <= 1 for name in ("oedema", "enhancing", "faint_edge")), recall
        assert set(healthy_case["methods"][method]["sub_region_recall"].values()) == {None}
        assert summary["sub_region_recall"]["necrotic_core"]["n"] == 0
        assert summary["sub_region_recall"]["oedema"] == {"mean": recall["oedema"], "std": 0.0, "n": 1}
        if method in ANOFPDM_VARIANTS:
            assert summary["verdict_reliability"]["n_slices"] == 20
        assert healthy_case["methods"][method]["slice"]["unhealthy_dice"] is None
    assert results["summary"]["flair-threshold"]["network_evaluations_per_case"] == 0
    assert results["summary"]["flair-zscore"]["network_evaluations_per_case"] == 0
    assert not results["cases"][0]["methods"]["anofpdm-ddpm-fast"]["warnings"]  # its own calibration: no override
    table = (out / "results.md").read_text()
    assert all(f"| {method} |" in table for method in METHODS)
    assert "| lesion-wise Dice | lesion-wise HD95 (mm) |" in table
    assert "Verdict reliability" in table
    assert ("| method | necrotic / non-enhancing core (1) | oedema (2) | enhancing (4) | faint edge (outer 2 mm) |"
            in table)
    assert (out / "overlays" / "BraTS2021_00001.png").stat().st_size > 0
    assert not (out / "overlays" / "BraTS2021_00002.png").exists()  # --overlays 1


def _without_seconds(record: dict) -> dict:
    methods = {name: {k: v for k, v in scored.items() if k != "seconds"} for name, scored in record["methods"].items()}
    return {**record, "methods": methods}


def test_each_case_is_stored_and_resume_computes_only_what_is_missing(single_process, tiny_model_path, data_dir,
                                                                       prepared, tmp_path):
    first = Path(single_process["out"])
    stored = sorted(path.name for path in (first / "cases").glob("*.json"))
    assert stored == ["BraTS2021_00001.json", "BraTS2021_00002.json"]
    shutil.copytree(first / "cases", tmp_path / "cases")
    (tmp_path / "cases" / "BraTS2021_00002.json").unlink()  # a run stopped during its second case
    argv = [*_argv(tiny_model_path, data_dir, prepared, tmp_path), "--overlays", "0", "--resume"]
    assert main(argv) == 0
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["settings"]["reused_cases"] == ["BraTS2021_00001"]
    assert resumed["settings"]["run_key"] == single_process["settings"]["run_key"]  # overlays change no number
    reused, recomputed = resumed["cases"]
    assert reused == single_process["cases"][0]  # taken as stored: even its timings are the first run's
    assert _without_seconds(recomputed) == _without_seconds(single_process["cases"][1])  # seeded per case
    assert resumed["summary"].keys() == single_process["summary"].keys()
    assert (tmp_path / "cases" / "BraTS2021_00002.json").is_file()


def test_resume_names_a_damaged_stored_case_and_keeps_it(single_process, tiny_model_path, data_dir, prepared,
                                                         tmp_path, capsys):
    damaged = tmp_path / "cases" / "BraTS2021_00001.json"
    damaged.parent.mkdir()
    damaged.write_text('{"key": "trunc')
    argv = [*_argv(tiny_model_path, data_dir, prepared, tmp_path), "--overlays", "0", "--resume"]
    assert main(argv) == 2
    assert "BraTS2021_00001.json is not a stored case result" in capsys.readouterr().err
    assert damaged.read_text() == '{"key": "trunc'


def test_resume_reuses_the_stored_tuning_only_for_the_same_validation_setup(tiny_model_path, data_dir, prepared,
                                                                             tmp_path):
    argv = ["--model", str(tiny_model_path), "--data", str(data_dir), "--out", str(tmp_path), "--methods",
            "flair-threshold", "--prepared", str(prepared), "--split", "test", "--tune-split", "val",
            "--tune-quantiles", "0.5,0.95", "--overlays", "0", "--min-lesion-mm3", "0"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    stored = json.loads((tmp_path / "tuning.json").read_text())
    assert first["settings"]["reused_tuning"] is False and stored["tuned"] == first["settings"]["tuned_thresholds"]
    assert stored["tuned"]["flair-threshold"]["threshold"]["quantile"] == 0.95  # see test_tuning_picks_the_quantile...
    stored["tuned"]["flair-threshold"]["threshold"]["quantile"] = 0.5  # a choice tuning would not make: reuse takes it
    (tmp_path / "tuning.json").write_text(json.dumps(stored))
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["settings"]["reused_tuning"] is True
    assert resumed["settings"]["thresholds"]["flair-threshold"]["quantile"] == 0.5
    other_candidates = [*argv[:-5], "0.5,0.9,0.95", *argv[-4:], "--resume"]  # another setup: tuned again
    assert main(other_candidates) == 0
    retuned = json.loads((tmp_path / "results.json").read_text())
    assert retuned["settings"]["reused_tuning"] is False
    assert retuned["settings"]["thresholds"]["flair-threshold"]["quantile"] == 0.95
    assert json.loads((tmp_path / "tuning.json").read_text())["tuned"] == retuned["settings"]["tuned_thresholds"]


def test_run_key_follows_model_methods_and_scoring_settings(tiny_model_path, tmp_path):
    settings = EvaluationSettings()
    key = run_key(tiny_model_path, ["flair-threshold"], settings)
    assert run_key(tiny_model_path, ["flair-threshold"], replace(settings, overlay_cases=5)) == key
    assert run_key(tiny_model_path, ["flair-threshold"], replace(settings, seed=1)) != key
    assert run_key(tiny_model_path, ["flair-threshold", "cfg-ddim"], settings) != key
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_model_path.read_bytes() + b"\0")
    assert run_key(other, ["flair-threshold"], settings) != key


def test_run_key_follows_the_library_code(tiny_model_path, tmp_path, monkeypatch):
    import shutil

    import anofpdm.evaluation.store as store_module

    copy = tmp_path / "anofpdm"
    shutil.copytree(store_module.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(copy) == source_digest(store_module.PACKAGE_ROOT)
    (copy / "method" / "pipeline.py").write_text((copy / "method" / "pipeline.py").read_text() + "\n# changed\n")
    changed = source_digest(copy)
    assert changed != source_digest(store_module.PACKAGE_ROOT)
    key = run_key(tiny_model_path, ["flair-threshold"], EvaluationSettings())
    monkeypatch.setattr(store_module, "source_digest", lambda: changed)
    assert run_key(tiny_model_path, ["flair-threshold"], EvaluationSettings()) != key


def test_truth_as_prediction_scores_one(tiny_model_path, data_dir):
    model = load_model(tiny_model_path)
    case = prepare_case(find_cases(data_dir)[0], model.config)
    assert case.truth.sum() == 400 and case.truth_slices.any()
    # the model-grid truth maps back onto the input-grid truth (same geometry as the methods use)
    back = to_input_grid(case.truth_slices.transpose(1, 2, 0).astype(np.float32), case.geometry) >= 0.5
    assert (back & case.truth).sum() / case.truth.sum() > 0.5
    truth_map = case.truth_slices.astype(np.float32)
    grid = ModelGridOutputs(slices=np.zeros(0), raw_map=truth_map, scores=np.zeros(len(truth_map)),
                            unhealthy=case.truth_slices.any(axis=(1, 2)), thresholds=np.full(len(truth_map), 0.5),
                            geometry=case.geometry)
    affine = case.images["flair"].affine
    perfect = SegmentationResult(nib.Nifti1Image(case.truth.astype(np.uint8), affine),
                                 nib.Nifti1Image(case.truth.astype(np.float32), affine), {}, grid)
    scored = score_result(perfect, case, SliceProtocol(median_kernel=1, min_area_px=0))
    for name in ("mixed_dice", "mixed_iou", "unhealthy_dice", "unhealthy_iou", "mixed_auprc", "unhealthy_auprc",
                 "slice_accuracy"):
        assert scored["slice"][name] == pytest.approx(1.0), name
    for name in ("dice", "iou", "precision", "recall", "auprc"):
        assert scored["volume"][name] == pytest.approx(1.0), name
    assert scored["lesion_wise"]["dice"] == 1.0 and scored["lesion_wise"]["hd95_mm"] == 0.0
    assert scored["sub_region_recall"] == {"necrotic_core": None, "oedema": 1.0, "enhancing": 1.0, "faint_edge": 1.0}
    assert case.spacing_mm == (4.0, 4.0, 5.0)  # make_volume_pair's grid: the lesion-wise HD95 is in these mm
    assert scored["volume"]["volume_error_ml"] == 0 and scored["volume"]["verdict_correct"]


def test_map_variants_share_one_forward_process_and_match_running_alone(tiny_model_path, data_dir):
    model = load_model(tiny_model_path)
    case = prepare_case(find_cases(data_dir)[0], model.config)
    settings = EvaluationSettings(min_lesion_mm3=0, seed=3)
    shared: dict = {}
    maps = {}
    for method in ("anofpdm-ddim-fast", "anofpdm-ste-fast", "anofpdm-ddpm-fast"):
        with_sharing = run_method(method, model, case, settings, shared)
        maps[method] = with_sharing.model_grid.raw_map
        alone = run_method(method, model, case, settings)
        assert np.array_equal(np.asanyarray(with_sharing.mask.dataobj), np.asanyarray(alone.mask.dataobj)), method
        assert np.array_equal(with_sharing.model_grid.raw_map, alone.model_grid.raw_map), method
        assert with_sharing.report["slices"] == alone.report["slices"], method
        assert with_sharing.report["settings"] == alone.report["settings"], method
    # S_te reused the DDIM fast forward process; the DDPM encoding is a forward process of its own
    assert len(shared) == 2
    assert not np.array_equal(maps["anofpdm-ddim-fast"], maps["anofpdm-ste-fast"])  # the map is still the variant's


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def test_two_processes_give_the_one_process_results(tiny_model_path, data_dir, prepared, single_process, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(LIB), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "anofpdm.cli", "evaluate", *_argv(tiny_model_path, data_dir, prepared, tmp_path)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["world_size"] == 2
    assert results["settings"]["tuned_thresholds"] == single_process["settings"]["tuned_thresholds"]
    assert [case["case"] for case in results["cases"]] == ["BraTS2021_00001", "BraTS2021_00002"]
    for method in METHODS:
        for block in ("slice_protocol", "volume"):
            two, one = _flat(results["summary"][method][block]), _flat(single_process["summary"][method][block])
            assert two.keys() == one.keys()
            for key, value in one.items():
                assert two[key] == (value if value is None else pytest.approx(value)), (method, key)
    assert (tmp_path / "overlays" / "BraTS2021_00001.png").exists()  # rank 0 drew rank 0's case


def test_tuning_picks_the_quantile_that_fits_the_lesion(tiny_model_path, data_dir):
    model = load_model(tiny_model_path)
    case = prepare_case(find_cases(data_dir)[2], model.config)
    # the lesion is 400 of about 9500 brain voxels (4 %): the 95th percentile fits it, the median marks half the brain
    settings = EvaluationSettings(min_lesion_mm3=0)
    tuned = tune_thresholds(model, [case], ["flair-threshold", "anofpdm-ddim-fast"], settings,
                            TuningGrid(quantiles=(0.95, 0.5)))
    assert set(tuned) == {"flair-threshold"}  # AnoFPDM is calibrated, not tuned
    assert tuned["flair-threshold"]["threshold"] == {"quantile": 0.95, "value": None}
    at_95, at_50 = ({row["quantile"]: row["dice"] for row in tuned["flair-threshold"]["validation_dice"]}[q]
                    for q in (0.95, 0.5))
    assert at_95 > 2 * at_50
    healthy = prepare_case(find_cases(data_dir)[1], model.config)
    with pytest.raises(ValueError, match="with tumour"):
        tune_thresholds(model, [healthy], ["flair-threshold"], EvaluationSettings())


def test_bad_arguments_are_refused(tiny_model_path, data_dir, tmp_path):
    with pytest.raises(ValueError, match="methods must be"):
        evaluate(tiny_model_path, data_dir, ["anofpdm-ddim-fast", "magic"], tmp_path)
    with pytest.raises(ValueError, match="max_cases"):
        evaluate(tiny_model_path, data_dir, ["flair-threshold"], tmp_path, max_cases=0)
    with pytest.raises(ValueError, match="not found"):
        evaluate(tiny_model_path, data_dir, ["flair-threshold"], tmp_path, case_ids=["BraTS2021_09999"])
    with pytest.raises(ValueError, match="overlap"):
        evaluate(tiny_model_path, data_dir, ["flair-threshold"], tmp_path, case_ids=["BraTS2021_00001"],
                 tune_case_ids=["BraTS2021_00001"])
    calls = []
    results = evaluate(tiny_model_path, data_dir, ["flair-threshold"], tmp_path, max_cases=1,
                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)] and results["settings"]["cases"] == ["BraTS2021_00001"]


def test_head_cases_are_scored_through_the_apps_brain_extraction(tiny_model_path, tmp_path):
    """A case written as a head (``synth --heads``): the methods get the head and extract its brain as the app
    does, the truth slices are those of that brain (the scoring checks the slices match), and the brain the
    false positives are counted in is the extracted one, close to the case's truth brain."""
    case = synthesize_case(21, False, shape=(120, 120, 78), voxel_mm=2.0, heads=True)
    write_case(case, tmp_path / "heads", "SYN_00000")
    model = load_model(tiny_model_path)
    prepared_case = prepare_case(find_cases(tmp_path / "heads")[0], model.config)
    head_flair = prepared_case.images["flair"].get_fdata()
    assert (head_flair > 0).sum() * 8 / 1000 > 3000  # the methods' input is the head, 8 mm^3 voxels
    truth_brain = nib.as_closest_canonical(nib.load(tmp_path / "heads" / "SYN_00000" / "SYN_00000_brainmask.nii.gz"))
    assert dice(prepared_case.brain, np.asanyarray(truth_brain.dataobj) > 0) > 0.93
    results = evaluate(tiny_model_path, tmp_path / "heads", ["anofpdm-volume-fast", "flair-threshold"],
                       tmp_path / "out")
    assert results["failed_cases"] == [] and len(results["cases"]) == 1
    assert set(results["cases"][0]["methods"]) == {"anofpdm-volume-fast", "flair-threshold"}
