"""Training slices from BraTS-style volumes (docs/method.md section 1) and a Dataset over them.

``prepare_dataset`` turns a folder of cases into compact per-split arrays:

- ``{split}_images.npy``: N x C x S x S float16, per volume and sequence normalised to [-1, 1]
  with ``anofpdm.volumes.intensity.normalise`` (histogram-standardised onto the training split's landmarks by default);
- ``{split}_labels.npy``: N uint8, 1 when any tumour pixel remains after resizing (unhealthy);
- ``{split}_masks.npy``: N x S x S uint8 pixel truth (evaluation only, never for training);
- ``{split}_index.json``: the case id and axial index (in the RAS volume) of every row;
- ``manifest.json``: settings, split cases, slice counts, skipped cases with the reason.

Slices are made by ``anofpdm.volumes.slicing.to_model_slices``, the same code inference uses: RAS axial planes
``volume[:, :, k]`` (x, y), a square field of view centred on the brain (BraTS: 240 mm), resized.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from anofpdm.data.brats import SEQUENCES, CaseFiles, find_cases, load_case
from anofpdm.volumes.intensity import brain_landmarks, percentile_normalise
from anofpdm.parallel import ordered_map
from anofpdm.progress import ProgressCallback
from anofpdm.volumes.slicing import MIN_BRAIN_AREA_MM2, to_model_slices

__all__ = [
    "SPLITS",
    "MANIFEST_NAME",
    "split_counts",
    "split_cases",
    "case_slices",
    "training_landmarks",
    "prepare_dataset",
    "load_manifest",
    "SliceDataset",
]


SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = (0.75, 0.05, 0.20)
MIN_SIZE = 8
IMAGE_DTYPE = np.float16
MASK_THRESHOLD = 0.5
DEFAULT_FIELD_OF_VIEW_MM = 240.0  # BraTS: the whole 240 x 240 mm plane
MANIFEST_NAME = "manifest.json"
SPLIT_TOLERANCE = 1e-6
FORMAT = "anofpdm-slices-v1"
CHUNK_ROWS = 4096
# Failures that make one case unusable without stopping the whole run.
CASE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zlib.error,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
)


def _validate(
    sequences: Sequence[str], size: int, seed: int, split: Sequence[float], field_of_view_mm: float
) -> tuple[str, ...]:
    sequences = tuple(sequences)
    if not sequences or len(set(sequences)) != len(sequences) or any(s not in SEQUENCES for s in sequences):
        raise ValueError(f"sequences must be distinct names from {SEQUENCES}, got {sequences}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if len(split) != len(SPLITS) or any(f < 0 for f in split) or abs(sum(split) - 1.0) > SPLIT_TOLERANCE:
        names = "/".join(SPLITS)
        raise ValueError(f"split must be {len(SPLITS)} fractions ({names}), non-negative, summing to 1: {tuple(split)}")
    if field_of_view_mm <= 0:
        raise ValueError(f"field_of_view_mm must be positive, got {field_of_view_mm}")
    return sequences


def split_counts(n_cases: int, fractions: Sequence[float]) -> list[int]:
    """Cases per split by largest-remainder rounding.

    A split with a positive fraction that rounds to no case takes one from the largest split (if that
    keeps at least one), the larger fractions first.
    """
    exact = np.asarray(fractions, dtype=np.float64) * n_cases
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_cases - counts.sum()]:
        counts[i] += 1
    empty = np.nonzero((np.asarray(fractions) > 0) & (counts == 0))[0]
    for i in sorted(empty, key=lambda j: -fractions[j]):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return [int(c) for c in counts]


def split_cases(case_ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Seeded patient-level split: shuffle the sorted ids, cut by ``split_counts``; each list sorted."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    out, start = {}, 0
    for name, count in zip(SPLITS, split_counts(len(ids), fractions)):
        out[name] = sorted(shuffled[start : start + count])
        start += count
    return out


def _case_slices_or_error(
    case: CaseFiles,
    sequences: Sequence[str],
    size: int,
    field_of_view_mm: float,
    landmarks: dict[str, list[float]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | str:
    """``case_slices``, or the reason the case cannot be read (a skipped case does not stop a run)."""
    try:
        return case_slices(case, sequences, size, field_of_view_mm, landmarks)
    except CASE_ERRORS as error:
        return f"{type(error).__name__}: {error}"


def case_slices(
    case: CaseFiles,
    sequences: Sequence[str],
    size: int,
    field_of_view_mm: float,
    landmarks: dict[str, list[float]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brain slices of one case: images N x C x S x S, labels N, masks N x S x S and axial indices N.

    The slices come from ``anofpdm.volumes.slicing.to_model_slices``, the function inference uses, so the
    network is trained on exactly the slice geometry (orientation, brain-centred field of view,
    resizing, brain-slice selection) and intensity normalisation (``landmarks``: histogram standardisation,
    None: percentile scaling only) it later sees.
    """
    volume = load_case(case, sequences)
    images = {name: nib.Nifti1Image(volume.images[name], volume.affine) for name in sequences}
    slices, geometry, extra = to_model_slices(images, sequences, size, field_of_view_mm, extra={"truth": volume.mask},
                                              landmarks=landmarks)
    masks = (extra["truth"] >= MASK_THRESHOLD).astype(np.uint8)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(np.uint8)
    return slices.astype(IMAGE_DTYPE), labels, masks, np.asarray(geometry.slices)


def _case_landmarks(case: CaseFiles, sequences: Sequence[str]) -> dict[str, np.ndarray] | str:
    """Each sequence's brain landmarks of one case, or the reason it cannot be read."""
    try:
        volume = load_case(case, sequences)
        return {name: brain_landmarks(percentile_normalise(volume.images[name])) for name in sequences}
    except CASE_ERRORS as error:
        return f"{type(error).__name__}: {error}"


def training_landmarks(
    cases: Sequence[CaseFiles], sequences: Sequence[str], workers: int = 1
) -> dict[str, list[float]]:
    """Histogram-standardisation reference: per sequence, the mean brain landmarks of the training volumes.

    Raises:
        ValueError: no training case could be read.
    """
    read = functools.partial(_case_landmarks, sequences=sequences)
    rows = [row for row in ordered_map(read, list(cases), workers) if not isinstance(row, str)]
    if not rows:
        raise ValueError("no training case could be read to compute the intensity landmarks")
    return {name: [round(float(v), 6) for v in np.mean([row[name] for row in rows], axis=0)] for name in sequences}


class _SplitWriter:
    """Streams one split's rows to raw files, then turns them into ``.npy`` arrays of the final length."""

    def __init__(self, out_dir: Path, split: str, channels: int, size: int) -> None:
        self.out_dir, self.split, self.channels, self.size = out_dir, split, channels, size
        self.rows: list[list[Any]] = []
        self.labels: list[np.ndarray] = []
        self.raw = {"images": out_dir / f".{split}_images.raw", "masks": out_dir / f".{split}_masks.raw"}
        self.handles = {k: open(p, "wb") for k, p in self.raw.items()}

    def add(self, case_id: str, images: np.ndarray, labels: np.ndarray, masks: np.ndarray, indices: np.ndarray) -> None:
        self.handles["images"].write(np.ascontiguousarray(images, dtype=IMAGE_DTYPE).tobytes())
        self.handles["masks"].write(np.ascontiguousarray(masks, dtype=np.uint8).tobytes())
        self.labels.append(labels)
        self.rows.extend([case_id, int(k)] for k in indices)

    def _to_npy(self, key: str, dtype: type, row_shape: tuple[int, ...]) -> None:
        n = len(self.rows)
        path = self.out_dir / f"{self.split}_{key}.npy"
        target = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *row_shape))
        if n:
            source = np.memmap(self.raw[key], dtype=dtype, mode="r", shape=(n, *row_shape))
            for start in range(0, n, CHUNK_ROWS):
                target[start : start + CHUNK_ROWS] = source[start : start + CHUNK_ROWS]
            del source
        target.flush()
        del target
        self.raw[key].unlink()

    def close(self) -> dict[str, int]:
        for handle in self.handles.values():
            handle.close()
        self._to_npy("images", IMAGE_DTYPE, (self.channels, self.size, self.size))
        self._to_npy("masks", np.uint8, (self.size, self.size))
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.uint8)
        np.save(self.out_dir / f"{self.split}_labels.npy", labels.astype(np.uint8))
        index = {"columns": ["case", "slice"], "rows": self.rows}
        (self.out_dir / f"{self.split}_index.json").write_text(json.dumps(index))
        unhealthy = int(labels.sum())
        return {"slices": len(labels), "healthy": len(labels) - unhealthy, "unhealthy": unhealthy}


def prepare_dataset(
    data_dir: Path,
    out_dir: Path,
    sequences: Sequence[str] = SEQUENCES,
    size: int = 128,
    seed: int = 0,
    split: Sequence[float] = DEFAULT_SPLIT,
    progress: ProgressCallback | None = None,
    field_of_view_mm: float = DEFAULT_FIELD_OF_VIEW_MM,
    workers: int = 1,
    standardise: bool = True,
) -> dict[str, Any]:
    """Prepare normalised, resized axial training slices with a seeded patient-level split.

    Args:
        data_dir: folder of BraTS21 / BraTS 2023 cases or an MSD Task01 folder.
        out_dir: where the arrays and ``manifest.json`` go (created).
        sequences: channels, in order (default FLAIR, T1, T1ce, T2).
        size: output slice side.
        seed: split seed.
        split: train / val / test fractions of the cases.
        progress: optional callable(done, total) after each case.
        field_of_view_mm: in-plane extent of a slice, centred on the brain (BraTS: 240 mm). Axial
            planes with less than ``anofpdm.volumes.slicing.MIN_BRAIN_AREA_MM2`` of brain are left out.
        workers: processes reading cases in parallel (the arrays are identical for any number).
        standardise: histogram-standardise every volume onto the training split's mean landmarks
            (``anofpdm.volumes.intensity``; written to the manifest, and from there into every model trained on it);
            False: percentile scaling only, as the paper.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``). A case that cannot be read is
        listed under "skipped" with the reason and left out; it does not stop the run.
    """
    sequences = _validate(sequences, size, seed, split, field_of_view_mm)
    cases = {c.case_id: c for c in find_cases(Path(data_dir))}
    assignment = split_cases(list(cases), split, seed)
    ordered = [(name, case_id) for name in SPLITS for case_id in assignment[name]]
    landmarks = None
    if standardise:
        landmarks = training_landmarks([cases[case_id] for case_id in assignment["train"]], sequences, workers)
    read = functools.partial(_case_slices_or_error, sequences=sequences, size=size, field_of_view_mm=field_of_view_mm,
                             landmarks=landmarks)
    outcomes = ordered_map(read, [cases[case_id] for _, case_id in ordered], workers, progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {name: _SplitWriter(out_dir, name, len(sequences), size) for name in SPLITS}
    used: dict[str, list[str]] = {name: [] for name in SPLITS}
    skipped: list[dict[str, str]] = []
    for (split_name, case_id), outcome in zip(ordered, outcomes):
        if isinstance(outcome, str):
            skipped.append({"case": case_id, "reason": outcome})
            continue
        writers[split_name].add(case_id, *outcome)
        used[split_name].append(case_id)
    summary = {name: {"cases": used[name], **writers[name].close()} for name in SPLITS}
    manifest = {
        "format": FORMAT,
        "data_dir": str(data_dir),
        "sequences": list(sequences),
        "size": size,
        "seed": seed,
        "split_fractions": list(split),
        "field_of_view_mm": field_of_view_mm,
        "min_brain_area_mm2": MIN_BRAIN_AREA_MM2,
        "image_dtype": np.dtype(IMAGE_DTYPE).name,
        "orientation": "RAS; axial planes volume[:, :, k] as (x, y); a square field of view centred on the brain "
                       "(anofpdm.volumes.slicing.to_model_slices)",
        "normalisation": "per volume and sequence: anofpdm.volumes.intensity.normalise "
                         "(99th percentile of nonzero voxels "
        + ("-> 1, histogram standardisation onto intensity_landmarks" if standardise else "-> 1")
        + ", [0, 1] -> [-1, 1])",
        "intensity_landmarks": landmarks,
        "splits": summary,
        "skipped": skipped,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def load_manifest(root: Path) -> dict[str, Any]:
    """The ``manifest.json`` of a prepared folder (:func:`prepare_dataset`'s output)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no prepared data at {root}: {MANIFEST_NAME} is missing (run `anofpdm prepare` or prepare_dataset)"
        )
    return json.loads(path.read_text())


class SliceDataset(Dataset):
    """Prepared slices of one split, memory-mapped: items are (image float32 C x S x S, label int).

    Args:
        root: the ``prepare_dataset`` output folder.
        split: "train", "val" or "test".
        sequences: subset of the prepared channels, by name and in the order wanted (None: all).
    """

    def __init__(self, root: Path, split: str, sequences: Sequence[str] | None = None) -> None:
        root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.manifest = load_manifest(root)
        prepared = list(self.manifest["sequences"])
        wanted = prepared if sequences is None else list(sequences)
        unknown = [s for s in wanted if s not in prepared]
        if unknown or not wanted:
            raise ValueError(f"sequences {unknown or wanted} not among the prepared channels {prepared}")
        self.sequences = tuple(wanted)
        self.channels = [prepared.index(s) for s in wanted]
        self.images_path = root / f"{split}_images.npy"
        self.labels = np.load(root / f"{split}_labels.npy")
        self._images: np.ndarray | None = None
        if len(self.images) != len(self.labels):
            raise ValueError(f"{root}: {split} images ({len(self.images)}) and labels ({len(self.labels)}) differ")

    @property
    def images(self) -> np.ndarray:
        """The N x C x S x S array, memory-mapped on first use (so each DataLoader worker maps its own)."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = np.asarray(self.images[index, self.channels], dtype=np.float32)
        return torch.from_numpy(image), int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch in one read: the DataLoader calls this instead of ``__getitem__`` once per slice."""
        rows = np.asarray(indices, dtype=np.int64)
        batch = torch.from_numpy(self.images[rows][:, self.channels]).float()
        return list(zip(batch.unbind(0), self.labels[rows].tolist()))

    def sample(self, max_slices: int | None, seed: int) -> tuple[torch.Tensor, list[int]]:
        """A seeded random subset (all slices when ``max_slices`` is None), in drawn order: N x C x S x S, labels."""
        if max_slices is not None and max_slices < 1:
            raise ValueError(f"max_slices must be >= 1, got {max_slices}")
        order = np.random.default_rng(seed).permutation(len(self))[:max_slices]
        pairs = self.__getitems__(order.tolist())
        return torch.stack([image for image, _ in pairs]), [label for _, label in pairs]
