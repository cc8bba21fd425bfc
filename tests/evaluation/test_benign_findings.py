"""False positives on benign findings (anofpdm.evaluation.benign_findings), by hand and through ``evaluate``."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anofpdm.data.brats import find_cases
from anofpdm.data.synth import case_seed, synthesize_case, write_case
from anofpdm.evaluation.benign_findings import aggregate_findings, findings_scores, findings_table, load_findings
from anofpdm.evaluation.case_scoring import prepare_case
from anofpdm.evaluation.evaluate import evaluate
from anofpdm.method.model import load_model

VOXEL_MM3 = 8.0  # 2 mm voxels


def test_findings_scores_on_a_hand_made_case() -> None:
    findings = np.zeros((12, 12, 12), np.uint8)
    findings[2:4, 2:4, 2:4] = 5  # 8 voxels of a deep white-matter lesion
    truth = np.zeros_like(findings, dtype=bool)
    truth[7:10, 2:4, 2:4] = True  # a tumour one voxel beyond the finding's dilation
    mask = np.zeros_like(truth)
    mask[3, 3, 2:4] = True  # 2 finding voxels
    mask[4, 4, 4] = True  # diagonal neighbour: within the one-voxel dilation
    mask[5, 3, 3] = True  # two voxels away: not on the finding
    mask[7:10, 2:4, 2:4] = True  # the tumour, found: never a false positive on findings
    scores = findings_scores(mask, findings, truth, VOXEL_MM3)
    assert scores["findings_ml"] == pytest.approx(8 * VOXEL_MM3 / 1000)
    assert scores["predicted_on_findings_ml"] == pytest.approx(3 * VOXEL_MM3 / 1000)
    assert scores["findings_masked_share"] == pytest.approx(2 / 8)
    truth[4, 4, 4] = True  # a truth voxel inside the dilation is not counted
    assert findings_scores(mask, findings, truth, VOXEL_MM3)["predicted_on_findings_ml"] == pytest.approx(0.016)
    empty = findings_scores(mask, np.zeros_like(findings), truth, VOXEL_MM3)
    assert empty == {"findings_ml": 0.0, "predicted_on_findings_ml": 0.0, "findings_masked_share": None}
    with pytest.raises(ValueError, match="shape"):
        findings_scores(mask[:-1], findings, truth, VOXEL_MM3)


def _case(truth_ml: float, on_findings: float | None, share: float | None = None) -> dict:
    findings = None if on_findings is None else {"findings_ml": 2.0, "predicted_on_findings_ml": on_findings,
                                                 "findings_masked_share": share}
    return {"volume": {"truth_ml": truth_ml}, **({"benign_findings": findings} if findings else {})}


def test_aggregate_and_table_keep_healthy_and_tumour_cases_apart() -> None:
    assert aggregate_findings([_case(0.0, None), _case(5.0, None)]) is None  # no map: no figure
    cases = [_case(0.0, 0.0, 0.0), _case(0.0, 1.5, 0.25), _case(30.0, 0.5, 0.5), _case(10.0, None)]
    summary = aggregate_findings(cases)
    healthy, tumour = summary["healthy"], summary["tumour"]
    assert healthy["cases"] == 2 and healthy["predicted_on_findings_ml"]["mean"] == pytest.approx(0.75)
    assert healthy["findings_masked_share"]["mean"] == pytest.approx(0.125)
    assert healthy["cases_with_false_positive"] == 1
    assert tumour["cases"] == 1 and tumour["predicted_on_findings_ml"]["mean"] == pytest.approx(0.5)
    table = findings_table({"flair-zscore": {"benign_findings": summary}, "other": {}})
    assert "| flair-zscore | healthy | 2 | 2.00 | 0.75 ± 0.75 | 12.5 | 1 of 2 |" in table
    assert "| flair-zscore | tumour | 1 | 2.00 | 0.50 ± 0.00 | 50.0 | 1 of 1 |" in table
    assert findings_table({"other": {}}) == ""


def test_a_clinical_synthetic_case_is_scored_on_its_findings(tiny_model_path, tmp_path: Path) -> None:
    """Written by the generator with clinical findings: loaded on the case's (RAS) grid, scored per method."""
    data = tmp_path / "data"
    clinical = synthesize_case(case_seed(7, 0), False, shape=(120, 120, 78), voxel_mm=2.0, benign_findings="clinical")
    assert clinical.benign.any()
    write_case(clinical, data, "SYN_00000")
    write_case(synthesize_case(case_seed(7, 1), True, shape=(120, 120, 78), voxel_mm=2.0), data, "SYN_00001")
    files = find_cases(data)
    case = prepare_case(files[0], load_model(tiny_model_path).config)
    np.testing.assert_array_equal(case.benign, clinical.benign[::-1, ::-1, :])  # LPS on disk, RAS here
    assert prepare_case(files[1], load_model(tiny_model_path).config).benign is None  # basic findings: no map
    results = evaluate(tiny_model_path, data, ["flair-threshold"], tmp_path / "out")
    with_map, without = (record["methods"]["flair-threshold"] for record in results["cases"])
    assert "benign_findings" not in without
    scores = with_map["benign_findings"]
    assert scores["findings_ml"] == pytest.approx(np.count_nonzero(clinical.benign) * VOXEL_MM3 / 1000)
    assert 0.0 <= scores["findings_masked_share"] <= 1.0 and scores["predicted_on_findings_ml"] >= 0.0
    summary = results["summary"]["flair-threshold"]["benign_findings"]
    assert summary["tumour"]["cases"] == 1 and summary["healthy"]["cases"] == 0
    assert "| flair-threshold | tumour | 1 |" in (tmp_path / "out" / "results.md").read_text()
    path = data / "SYN_00000" / "SYN_00000_benign.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-1], image.affine), path)
    with pytest.raises(ValueError, match="not on the case's grid"):
        load_findings(files[0], case.truth.shape, case.images["flair"].affine)
