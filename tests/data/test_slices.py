"""Training-slice preparation and the slice Dataset (anofpdm.data.slices)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anofpdm.data.slices import SPLITS, SliceDataset, prepare_dataset, split_cases, split_counts

SHAPE = (32, 32, 12)  # LPS voxel order, like BraTS
BRAIN_Z = range(2, 10)  # axial planes with brain
SLIVER_Z = 10  # a plane with a few brain pixels only
TUMOUR_Z = range(4, 7)
SIZE = 16
FOV_MM = 32.0  # the whole 32 x 32 mm plane, as BraTS's 240 mm
LPS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 31.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
TUMOUR_CASES = {"case00", "case02", "case04", "case06"}


def _case_arrays(case_id: str) -> dict[str, np.ndarray]:
    brain = np.zeros(SHAPE, bool)
    brain[4:28, 4:28, BRAIN_Z.start : BRAIN_Z.stop] = True
    sliver = np.zeros(SHAPE, bool)
    sliver[14:16, 14:16, SLIVER_Z] = True  # 4 mm^2: under anofpdm.volumes.slicing.MIN_BRAIN_AREA_MM2
    flair = np.where(brain | sliver, 50.0, 0.0).astype(np.float32)
    t1 = np.where(brain, 100.0, 0.0).astype(np.float32)
    t1[4:16] *= 2.0  # two brain halves: 200 is the 99th percentile, 100 maps to 0
    seg = np.zeros(SHAPE, np.uint8)
    if case_id in TUMOUR_CASES:
        seg[4:10, 4:10, TUMOUR_Z.start : TUMOUR_Z.stop] = 2  # low LPS x and y: high RAS x and y
    return {"flair": flair, "t1": t1, "t1ce": flair * 1.5, "t2": flair * 0.5, "seg": seg}


def _write_case(root: Path, case_id: str) -> None:
    (root / case_id).mkdir(parents=True)
    for name, array in _case_arrays(case_id).items():
        nib.save(nib.Nifti1Image(array, LPS_AFFINE), str(root / case_id / f"{case_id}_{name}.nii.gz"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    for i in range(8):
        _write_case(root, f"case{i:02d}")
    _write_case(root, "broken_gz")
    (root / "broken_gz" / "broken_gz_flair.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    _write_case(root, "no_seg")
    (root / "no_seg" / "no_seg_seg.nii.gz").unlink()
    return root


@pytest.fixture(scope="module")
def prepared(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    calls = []
    manifest = prepare_dataset(
        data_dir, out, size=SIZE, seed=3, progress=lambda *call: calls.append(call), field_of_view_mm=FOV_MM
    )
    assert calls[-1] == (10, 10) and len(calls) == 10
    return out, manifest


def _load(out: Path, split: str, what: str) -> np.ndarray:
    return np.load(out / f"{split}_{what}.npy")


def test_broken_cases_are_skipped_by_name(prepared: tuple[Path, dict]) -> None:
    _, manifest = prepared
    skipped = {s["case"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"broken_gz", "no_seg"}
    assert "no_seg_seg.nii.gz" in skipped["no_seg"]
    used = [c for split in SPLITS for c in manifest["splits"][split]["cases"]]
    assert sorted(used) == [f"case{i:02d}" for i in range(8)]
    # histogram standardisation onto the training split's landmarks, recorded for the models trained on it
    assert set(manifest["intensity_landmarks"]) == {"flair", "t1", "t1ce", "t2"}
    assert all(np.all(np.diff(row) > 0) for row in manifest["intensity_landmarks"].values())


def test_split_is_by_patient_disjoint_and_seeded(prepared: tuple[Path, dict]) -> None:
    out, manifest = prepared
    cases = [set(manifest["splits"][s]["cases"]) for s in SPLITS]
    assert all(cases) and not (cases[0] & cases[1] or cases[0] & cases[2] or cases[1] & cases[2])
    for split, members in zip(SPLITS, cases):
        rows = json.loads((out / f"{split}_index.json").read_text())["rows"]
        assert {case for case, _ in rows} == members
    ids = [f"p{i}" for i in range(40)]
    assert split_cases(ids, (0.75, 0.05, 0.2), 1) == split_cases(ids, (0.75, 0.05, 0.2), 1)
    assert len({json.dumps(split_cases(ids, (0.75, 0.05, 0.2), seed)) for seed in range(4)}) > 1
    assert [len(v) for v in split_cases(ids, (0.75, 0.05, 0.2), 1).values()] == [30, 2, 8]


def test_arrays_shapes_ranges_and_brain_slices(prepared: tuple[Path, dict]) -> None:
    out, manifest = prepared
    for split in SPLITS:
        images, labels, masks = (_load(out, split, w) for w in ("images", "labels", "masks"))
        n = len(manifest["splits"][split]["cases"]) * len(BRAIN_Z)
        assert images.shape == (n, 4, SIZE, SIZE) and images.dtype == np.float16
        assert labels.shape == (n,) and labels.dtype == np.uint8
        assert masks.shape == (n, SIZE, SIZE) and masks.dtype == np.uint8
        assert images.min() == -1.0 and images.max() == 1.0
        rows = json.loads((out / f"{split}_index.json").read_text())["rows"]
        assert {z for _, z in rows} == set(BRAIN_Z)
        # brain interior: FLAIR at its percentile -> 1; T1 at 200 (LPS x < 16 = RAS rows >= 8) -> 1, 100 -> 0
        assert set(np.unique(images[:, 0, 4:12, 4:12]).tolist()) == {1.0}
        assert set(np.unique(images[:, 1, 10:13, 4:12]).tolist()) == {1.0}
        assert set(np.unique(images[:, 1, 3:6, 4:12]).tolist()) == {0.0}


def test_slice_labels_follow_resized_masks(prepared: tuple[Path, dict]) -> None:
    out, manifest = prepared
    for split in SPLITS:
        labels, masks = _load(out, split, "labels"), _load(out, split, "masks")
        np.testing.assert_array_equal(labels, masks.reshape(len(masks), -1).max(axis=1))
        rows = json.loads((out / f"{split}_index.json").read_text())["rows"]
        expected = [int(case in TUMOUR_CASES and z in TUMOUR_Z) for case, z in rows]
        assert labels.tolist() == expected
        counts = manifest["splits"][split]
        assert (counts["unhealthy"], counts["healthy"]) == (sum(expected), len(expected) - sum(expected))


def test_orientation_is_ras_x_y(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    masks = _load(out, "train", "masks")
    rows, cols = np.nonzero(masks.max(axis=0))
    # tumour at LPS x, y in [4, 10) of 32 -> RAS [22, 28) -> rows and columns [11, 14) at 16 px
    assert rows.min() >= 10 and cols.min() >= 10 and rows.max() <= 14 and cols.max() <= 14


def test_parallel_rerun_is_byte_identical(data_dir: Path, prepared: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = prepared
    again = prepare_dataset(data_dir, tmp_path, size=SIZE, seed=3, field_of_view_mm=FOV_MM, workers=2)
    assert again["splits"] == manifest["splits"] and again["skipped"] == manifest["skipped"]
    with pytest.raises(ValueError, match="workers"):
        prepare_dataset(data_dir, tmp_path / "none", size=SIZE, seed=3, field_of_view_mm=FOV_MM, workers=0)
    assert not (tmp_path / "none").exists()
    for split in SPLITS:
        for name in ("images.npy", "labels.npy", "masks.npy", "index.json"):
            assert (out / f"{split}_{name}").read_bytes() == (tmp_path / f"{split}_{name}").read_bytes()
    assert not list(tmp_path.glob(".*.raw"))


def test_slice_dataset_selects_channels(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    images, labels = _load(out, "train", "images"), _load(out, "train", "labels")
    dataset = SliceDataset(out, "train", sequences=("t2", "flair"))
    assert len(dataset) == len(labels)
    index = int(np.argmax(labels))
    image, label = dataset[index]
    assert image.dtype == torch.float32 and image.shape == (2, SIZE, SIZE)
    assert label == 1 and isinstance(label, int)
    np.testing.assert_array_equal(image.numpy(), images[index, [3, 0]].astype(np.float32))
    assert SliceDataset(out, "val")[0][0].shape == (4, SIZE, SIZE)


def test_slice_dataset_batch_read_matches_single_reads(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    dataset = SliceDataset(out, "train", sequences=("t2", "flair"))
    indices = [len(dataset) - 1, 0, int(np.argmax(dataset.labels)), 0]  # unsorted, repeated
    batch = next(iter(DataLoader(dataset, batch_sampler=[indices])))  # the DataLoader uses __getitems__
    singles = [dataset[i] for i in indices]
    torch.testing.assert_close(batch[0], torch.stack([image for image, _ in singles]), rtol=0, atol=0)
    assert batch[0].dtype == torch.float32
    assert batch[1].tolist() == [label for _, label in singles]


def test_slice_dataset_sample_is_a_seeded_subset_of_distinct_slices(tmp_path: Path) -> None:
    n = 12  # slice i holds the value i in every pixel of both channels: rows are recognisable
    images = np.broadcast_to(np.arange(n, dtype=np.float16)[:, None, None, None], (n, 2, 4, 4))
    labels = np.arange(n) % 3 == 0
    np.save(tmp_path / "val_images.npy", np.ascontiguousarray(images))
    np.save(tmp_path / "val_labels.npy", labels.astype(np.uint8))
    (tmp_path / "manifest.json").write_text(json.dumps({"sequences": ["flair", "t2"]}))
    dataset = SliceDataset(tmp_path, "val", sequences=("t2", "flair"))
    drawn, drawn_labels = dataset.sample(5, seed=3)
    rows = drawn[:, 0, 0, 0].long().tolist()
    assert drawn.shape == (5, 2, 4, 4) and drawn.dtype == torch.float32
    assert len(set(rows)) == 5 and drawn_labels == [int(labels[r]) for r in rows]
    torch.testing.assert_close(dataset.sample(5, seed=3)[0], drawn, rtol=0, atol=0)
    assert dataset.sample(5, seed=4)[0][:, 0, 0, 0].long().tolist() != rows
    everything, _ = dataset.sample(None, seed=3)
    assert sorted(everything[:, 0, 0, 0].long().tolist()) == list(range(n))
    with pytest.raises(ValueError, match="max_slices"):
        dataset.sample(0, seed=3)


def test_slice_dataset_pickles_without_its_arrays(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    dataset = SliceDataset(out, "test", sequences=("flair",))
    first = dataset[0][0]
    payload = pickle.dumps(dataset)
    assert len(payload) < first.numel() * len(dataset)  # the images are re-mapped, not copied
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone[0][0].numpy(), first.numpy())


def test_split_counts_small_and_large() -> None:
    assert split_counts(40, (0.75, 0.05, 0.2)) == [30, 2, 8]
    assert split_counts(10, (0.75, 0.05, 0.2)) == [7, 1, 2]
    assert split_counts(2, (0.75, 0.05, 0.2)) == [1, 0, 1]
    assert split_counts(1, (0.75, 0.05, 0.2)) == [1, 0, 0]
    assert split_counts(5, (1.0, 0.0, 0.0)) == [5, 0, 0]


def test_slice_dataset_errors(prepared: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = prepared
    with pytest.raises(ValueError, match="dwi"):
        SliceDataset(out, "train", sequences=("flair", "dwi"))
    with pytest.raises(ValueError, match="split must be one of"):
        SliceDataset(out, "training")
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        SliceDataset(tmp_path, "train")


def test_prepare_dataset_validates_arguments(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be"):
        prepare_dataset(data_dir, tmp_path, split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="sequences must be"):
        prepare_dataset(data_dir, tmp_path, sequences=("flair", "flair"))
    with pytest.raises(ValueError, match="size must be"):
        prepare_dataset(data_dir, tmp_path, size=2)
