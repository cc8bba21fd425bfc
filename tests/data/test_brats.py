"""Readers of the BraTS21, BraTS 2023 and MSD Task01 layouts (anofpdm.data.brats)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anofpdm.data.brats import SEQUENCES, find_case, find_cases, load_case

SHAPE = (6, 5, 4)
LPS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 4.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def _save(path: Path, array: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _distinct_volumes() -> dict[str, np.ndarray]:
    base = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1.0
    return {name: base * (i + 1) for i, name in enumerate(SEQUENCES)}


def _seg() -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[0, 0, 1], seg[1, 0, 1], seg[0, 1, 2] = 1, 2, 4
    return seg


def _write_named_case(root: Path, case_id: str, names: dict[str, str], separator: str) -> dict[str, np.ndarray]:
    volumes = _distinct_volumes()
    for sequence, suffix in names.items():
        _save(root / case_id / f"{case_id}{separator}{suffix}.nii.gz", volumes[sequence])
    _save(root / case_id / f"{case_id}{separator}seg.nii.gz", _seg())
    return volumes


BRATS21 = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}
BRATS2023 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}


def _lps_to_ras(array: np.ndarray) -> np.ndarray:
    return array[::-1, ::-1, :]


@pytest.mark.parametrize(
    ("names", "separator", "layout"),
    [(BRATS21, "_", "brats21"), (BRATS2023, "-", "brats2023"), (BRATS2023, "_", "brats2023")],
)
def test_brats_layouts_round_trip_to_ras(tmp_path: Path, names: dict[str, str], separator: str, layout: str) -> None:
    volumes = _write_named_case(tmp_path, "Case-01", names, separator)
    (cases,) = find_cases(tmp_path)
    assert (cases.case_id, cases.layout) == ("Case-01", layout)
    loaded = load_case(cases)
    assert list(loaded.images) == list(SEQUENCES)
    for name in SEQUENCES:
        assert loaded.images[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.images[name], _lps_to_ras(volumes[name]))
    np.testing.assert_array_equal(loaded.mask, _lps_to_ras(_seg() > 0).astype(np.uint8))
    # sub-regions in BraTS21 labels: BraTS 2023's enhancing tumour is 3, so its file's 4 names none
    expected = _seg() if layout == "brats21" else np.where(_seg() == 4, 0, _seg())
    np.testing.assert_array_equal(loaded.sub_regions, _lps_to_ras(expected))
    corner = LPS_AFFINE @ np.array([SHAPE[0] - 1, SHAPE[1] - 1, 0, 1.0])
    np.testing.assert_allclose(loaded.affine @ np.array([0, 0, 0, 1.0]), corner)
    assert np.all(np.diag(loaded.affine)[:3] > 0)


def test_msd_layout_reads_channels_and_whole_tumour(tmp_path: Path) -> None:
    volumes = _distinct_volumes()
    four_d = np.stack([volumes[name] for name in ("flair", "t1", "t1ce", "t2")], axis=-1)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, 2, 2], labels[3, 2, 2], labels[4, 4, 3] = 1, 2, 3
    _save(tmp_path / "imagesTr" / "BRATS_001.nii.gz", four_d, np.eye(4))
    _save(tmp_path / "labelsTr" / "BRATS_001.nii.gz", labels, np.eye(4))
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    (case,) = find_cases(tmp_path)
    assert (case.case_id, case.layout) == ("BRATS_001", "msd")
    loaded = load_case(case, ("t2", "flair"))
    assert list(loaded.images) == ["t2", "flair"]
    np.testing.assert_array_equal(loaded.images["flair"], volumes["flair"])
    np.testing.assert_array_equal(loaded.images["t2"], volumes["t2"])
    assert loaded.mask.sum() == 3 and loaded.mask[4, 4, 3] == 1
    # MSD's oedema 1, non-enhancing 2, enhancing 3 in BraTS21 labels
    assert (loaded.sub_regions[2, 2, 2], loaded.sub_regions[3, 2, 2], loaded.sub_regions[4, 4, 3]) == (2, 1, 4)
    assert load_case(case, ("flair",), with_seg=False).sub_regions is None


def test_missing_file_is_named(tmp_path: Path) -> None:
    _write_named_case(tmp_path, "C1", BRATS21, "_")
    (tmp_path / "C1" / "C1_t2.nii.gz").unlink()
    (case,) = find_cases(tmp_path)
    assert case.missing() == [tmp_path / "C1" / "C1_t2.nii.gz"]
    with pytest.raises(FileNotFoundError, match="C1_t2.nii.gz"):
        load_case(case)
    assert set(load_case(case, ("flair", "t1")).images) == {"flair", "t1"}


def test_missing_seg_only_matters_when_asked(tmp_path: Path) -> None:
    _write_named_case(tmp_path, "C1", BRATS21, "_")
    (tmp_path / "C1" / "C1_seg.nii.gz").unlink()
    (case,) = find_cases(tmp_path)
    with pytest.raises(FileNotFoundError, match="C1_seg.nii.gz"):
        load_case(case)
    assert load_case(case, with_seg=False).mask is None


def test_find_cases_walks_nested_folders_and_ignores_others(tmp_path: Path) -> None:
    _write_named_case(tmp_path / "TrainingData", "B", BRATS21, "_")
    _write_named_case(tmp_path / "TrainingData", "A", BRATS21, "_")
    _save(tmp_path / "studies" / "A.nii.gz", np.ones(SHAPE, np.float32))
    assert [c.case_id for c in find_cases(tmp_path)] == ["A", "B"]
    assert find_case(tmp_path / "studies") is None


def test_find_cases_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        find_cases(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no BraTS21"):
        find_cases(tmp_path)
    _write_named_case(tmp_path / "site1", "X", BRATS21, "_")
    _write_named_case(tmp_path / "site2", "X", BRATS21, "_")
    with pytest.raises(ValueError, match="more than once"):
        find_cases(tmp_path)


def test_sequences_not_on_one_grid_are_rejected(tmp_path: Path) -> None:
    _write_named_case(tmp_path, "C1", BRATS21, "_")
    _save(tmp_path / "C1" / "C1_t1.nii.gz", np.ones((7, 5, 4), np.float32))
    (case,) = find_cases(tmp_path)
    with pytest.raises(ValueError, match="C1: t1 is not on the grid"):
        load_case(case)


def test_unknown_sequence_and_wrong_dimensionality(tmp_path: Path) -> None:
    _write_named_case(tmp_path, "C1", BRATS21, "_")
    (case,) = find_cases(tmp_path)
    with pytest.raises(ValueError, match="sequences must be"):
        load_case(case, ("flair", "dwi"))
    _save(tmp_path / "C1" / "C1_flair.nii.gz", np.ones((*SHAPE, 2), np.float32))
    with pytest.raises(ValueError, match="expected a 3-D image"):
        load_case(case)
