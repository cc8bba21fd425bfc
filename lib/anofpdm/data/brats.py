"""Find and load BraTS-style cases: BraTS21, BraTS 2023 names and the MSD Task01 4-D layout.

Every layout is read into the same form: float32 arrays keyed by the canonical sequence names
``SEQUENCES`` (flair, t1, t1ce, t2), the whole-tumour mask (label > 0) and the affine, all reoriented
to RAS (a lossless axis permutation / flip) so that training slices match what ``anofpdm.volumes.slicing``
feeds the network at inference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from anofpdm.volumes.checks import AFFINE_TOLERANCE_MM
from anofpdm.volumes.sequences import MSD_CHANNELS, SEQUENCES

__all__ = [
    "SEQUENCES",
    "SEG",
    "SUB_REGIONS",
    "CaseFiles",
    "CaseVolume",
    "find_case",
    "find_cases",
    "load_case",
]

SEG = "seg"
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
BRATS21_NAMES = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", SEG: "seg"}
BRATS2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", SEG: "seg"}
FILE_SEPARATORS = ("_", "-")  # BraTS21 uses <case>_flair, BraTS 2023 <case>-t2f
MSD_IMAGES, MSD_LABELS = "imagesTr", "labelsTr"
LAYOUTS = {"brats21": BRATS21_NAMES, "brats2023": BRATS2023_NAMES}
# The BraTS sub-regions as BraTS21 labels them (so do the synthetic cases, anofpdm.data.synth), and each layout's
# label of them: BraTS 2023 labels enhancing tumour 3; MSD Task01 labels oedema 1, non-enhancing tumour 2,
# enhancing tumour 3 (its dataset.json)
SUB_REGIONS = {"necrotic_core": 1, "oedema": 2, "enhancing": 4}
LAYOUT_SUB_REGION_LABELS = {
    "brats21": SUB_REGIONS,
    "brats2023": {"necrotic_core": 1, "oedema": 2, "enhancing": 3},
    "msd": {"necrotic_core": 2, "oedema": 1, "enhancing": 3},
}


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files are (or are expected to be).

    Attributes:
        case_id: the case identifier (folder name, or MSD file stem).
        layout: "brats21", "brats2023" or "msd".
        images: canonical sequence name -> path (for MSD every sequence names the same 4-D file).
        seg: path of the label map (may not exist; ``missing`` says so).
    """

    case_id: str
    layout: str
    images: dict[str, Path]
    seg: Path

    def missing(self, sequences: Sequence[str] = SEQUENCES, with_seg: bool = True) -> list[Path]:
        """Paths needed for ``sequences`` (and the seg) that do not exist."""
        paths = [self.images[s] for s in _check_sequences(sequences)] + ([self.seg] if with_seg else [])
        return sorted({p for p in paths if not p.is_file()})


@dataclass
class CaseVolume:
    """One loaded case, reoriented to RAS.

    Attributes:
        case_id: the case identifier.
        images: sequence name -> float32 3-D array.
        mask: whole tumour (label > 0) as uint8, or None when loaded without the seg.
        affine: RAS voxel-to-world affine shared by all arrays.
        sub_regions: the label map in BraTS21 labels whatever the layout (``SUB_REGIONS``; 0 elsewhere, and where
            the layout's label names no sub-region), or None when loaded without the seg.
    """

    case_id: str
    images: dict[str, np.ndarray]
    mask: np.ndarray | None
    affine: np.ndarray = field(repr=False)
    sub_regions: np.ndarray | None = field(default=None, repr=False)


def _check_sequences(sequences: Sequence[str]) -> tuple[str, ...]:
    sequences = tuple(sequences)
    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown or not sequences or len(set(sequences)) != len(sequences):
        raise ValueError(f"sequences must be distinct names from {SEQUENCES}, got {sequences}")
    return sequences


def _stem(path: Path) -> str:
    for extension in NIFTI_EXTENSIONS:
        if path.name.endswith(extension):
            return path.name[: -len(extension)]
    return path.name


def _nifti_names(folder: Path) -> dict[str, Path]:
    """NIfTI files of a folder by stem (hidden files, e.g. macOS ``._`` forks, are ignored)."""
    names = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name.endswith(NIFTI_EXTENSIONS):
            names.setdefault(_stem(path), path)
    return names


def _match(case_id: str, stems: dict[str, Path], names: dict[str, str]) -> dict[str, Path | None]:
    """Sequence (and seg) -> existing path for one naming scheme, None where absent."""
    found: dict[str, Path | None] = {}
    for key, suffix in names.items():
        hits = [stems[case_id + sep + suffix] for sep in FILE_SEPARATORS if case_id + sep + suffix in stems]
        found[key] = hits[0] if hits else None
    return found


def find_case(case_dir: Path) -> CaseFiles | None:
    """The case in one BraTS-style folder, or None when the folder holds no file of a case.

    A folder is a case when it holds at least one ``<folder>_<sequence>`` (or ``-``) NIfTI file of
    either naming scheme; expected files that are absent are still listed (see ``CaseFiles.missing``).
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise ValueError(f"not a folder: {case_dir}")
    stems = _nifti_names(case_dir)
    case_id = case_dir.name
    best: tuple[int, str, dict[str, Path | None]] | None = None
    for layout, names in LAYOUTS.items():
        found = _match(case_id, stems, names)
        count = sum(p is not None for k, p in found.items() if k != SEG)
        if count and (best is None or count > best[0]):
            best = (count, layout, found)
    if best is None:
        return None
    _, layout, found = best
    names = LAYOUTS[layout]
    default = {k: case_dir / f"{case_id}_{suffix}{NIFTI_EXTENSIONS[0]}" for k, suffix in names.items()}
    expected = {k: p if p is not None else default[k] for k, p in found.items()}
    return CaseFiles(case_id, layout, {s: expected[s] for s in SEQUENCES}, expected[SEG])


def _find_msd(data_dir: Path) -> list[CaseFiles]:
    cases = []
    for stem, path in _nifti_names(data_dir / MSD_IMAGES).items():
        seg = data_dir / MSD_LABELS / path.name
        cases.append(CaseFiles(stem, "msd", {s: path for s in SEQUENCES}, seg))
    return cases


def find_cases(data_dir: Path) -> list[CaseFiles]:
    """All cases under ``data_dir``, sorted by case id.

    An MSD Task01 folder (``imagesTr/`` with 4-D images, ``labelsTr/``) is read as such; otherwise
    every folder below ``data_dir`` (at any depth) that is a BraTS21 / BraTS 2023 case is returned.

    Raises:
        ValueError: if ``data_dir`` is not a folder, holds no case, or two cases share an id.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"data folder does not exist: {data_dir}")
    if (data_dir / MSD_IMAGES).is_dir():
        cases = _find_msd(data_dir)
    else:
        cases = []
        for root, dirs, _ in os.walk(data_dir):
            dirs.sort()
            case = find_case(Path(root))
            if case is not None:
                cases.append(case)
                dirs.clear()
    if not cases:
        raise ValueError(f"no BraTS21, BraTS 2023 or MSD Task01 case found under {data_dir}")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"case ids occur more than once under {data_dir}: {duplicates}")
    return sorted(cases, key=lambda c: c.case_id)


def _load_ras(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    return nib.as_closest_canonical(nib.load(str(path)))


def _as_float_3d(image: nib.spatialimages.SpatialImage, path: Path, channel: int | None) -> np.ndarray:
    if channel is None:
        if len(image.shape) != 3:
            raise ValueError(f"{path}: expected a 3-D image, got shape {image.shape}")
        return np.asarray(image.dataobj, dtype=np.float32)
    if len(image.shape) != 4 or image.shape[3] != len(MSD_CHANNELS):
        raise ValueError(
            f"{path}: expected a 4-D image with {len(MSD_CHANNELS)} channels {MSD_CHANNELS}, got shape {image.shape}"
        )
    return np.asarray(image.dataobj[..., channel], dtype=np.float32)


def _check_grid(
    case_id: str, name: str, array: np.ndarray, affine: np.ndarray, reference: tuple[tuple[int, ...], np.ndarray] | None
) -> None:
    """Finite values, and the shape and affine of the first loaded array (``reference``) when given."""
    if not np.isfinite(array).all():
        raise ValueError(f"case {case_id}: {name} holds NaN or Inf values")
    if reference is None:
        return
    shape, ref_affine = reference
    if array.shape != shape or not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE_MM):
        raise ValueError(
            f"case {case_id}: {name} is not on the grid of the first sequence (shape {array.shape} vs {shape})"
        )


def load_case(case: CaseFiles, sequences: Sequence[str] = SEQUENCES, with_seg: bool = True) -> CaseVolume:
    """Load a case as float32 RAS arrays plus the whole-tumour mask and its sub-regions.

    Args:
        case: the case files (from ``find_cases`` / ``find_case``).
        sequences: which sequences to load (canonical names).
        with_seg: load the label map too (whole tumour = label > 0).

    Raises:
        FileNotFoundError: naming the first missing file.
        ValueError: unknown sequence, wrong dimensionality, non-finite values, or sequences not on one grid.
    """
    sequences = _check_sequences(sequences)
    missing = case.missing(sequences, with_seg)
    if missing:
        raise FileNotFoundError(f"case {case.case_id}: missing file {missing[0]}")
    images: dict[str, np.ndarray] = {}
    reference = None
    for name in sequences:
        path = case.images[name]
        image = _load_ras(path)
        channel = MSD_CHANNELS.index(name) if case.layout == "msd" else None
        array = _as_float_3d(image, path, channel)
        _check_grid(case.case_id, name, array, image.affine, reference)
        reference = reference or (array.shape, image.affine)
        images[name] = array
    mask = sub_regions = None
    if with_seg:
        seg_image = _load_ras(case.seg)
        seg = np.asarray(seg_image.dataobj)
        seg = seg[..., 0] if seg.ndim == 4 and seg.shape[3] == 1 else seg
        _check_grid(case.case_id, SEG, seg, seg_image.affine, reference)
        mask = (seg > 0).astype(np.uint8)
        sub_regions = np.zeros(seg.shape, dtype=np.uint8)
        for name, label in LAYOUT_SUB_REGION_LABELS[case.layout].items():
            sub_regions[seg == label] = SUB_REGIONS[name]
    return CaseVolume(case.case_id, images, mask, reference[1], sub_regions)
