"""Reading input volumes with clear errors: NIfTI, NRRD and MetaImage files, multi-channel images (app, CLI).

A request may hold a 3-D FLAIR, or one 4-D image with channels last: 2 channels (FLAIR, T2) or 4 in
the MSD Task01 order (FLAIR, T1w, T1gd, T2w). Every failure is an ``InputError`` naming the file.
A file whose name says it is another sequence than the one it is given as (``case_t2.nii.gz`` as the
FLAIR) is refused: segmenting swapped sequences gives a mask that looks like a result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from anofpdm.volumes.sequences import MSD_CHANNELS
from anofpdm.volumes.checks import InputError

__all__ = [
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "VOLUME_SUFFIXES",
    "CHANNEL_LAYOUTS",
    "SEQUENCE_ALIASES",
    "ResolvedInputs",
    "split_volume_suffix",
    "read_volume",
    "read_image",
    "read_sequence",
    "split_channels",
    "named_sequences",
    "check_sequence_name",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # read with SimpleITK; 3D Slicer saves volumes as .nrrd
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CHANNEL_LAYOUTS: dict[int, tuple[str, ...]] = {2: ("flair", "t2"), 4: MSD_CHANNELS}
REFERENCE = "flair"
# words that name a sequence in file and volume names: BraTS21 (_flair, _t1ce), BraTS 2023 (-t2f, -t1n, -t1c, -t2w),
# MSD (T1w, T1gd, T2w) and scanner series names (Siemens' FLAIR is "t2_tirm_tra_dark-fluid")
SEQUENCE_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2f", "tirm", "fluid"),
    "t1": ("t1", "t1w", "t1n"),
    "t1ce": ("t1ce", "t1gd", "t1c"),
    "t2": ("t2", "t2w"),
}


@dataclass
class ResolvedInputs:
    """The images of one request, by sequence name, where each came from, and the DICOM series (UID) of
    those read from a PACS."""

    images: dict[str, nib.spatialimages.SpatialImage] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, image: nib.spatialimages.SpatialImage, source: str) -> None:
        self.images[name] = image
        self.sources[name] = source

    def describe(self) -> str:
        """``flair=<source>, t2=<source>`` for error messages."""
        return ", ".join(f"{name}={source}" for name, source in self.sources.items())


def split_volume_suffix(name: str) -> tuple[str, str]:
    """``case.nii.gz`` -> (``case``, ``.nii.gz``); raises ``InputError`` for formats other than ``VOLUME_SUFFIXES``."""
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    raise InputError(f"{name}: only NIfTI ({', '.join(NIFTI_SUFFIXES)}) and NRRD / MetaImage "
                     f"({', '.join(ITK_SUFFIXES)}) volumes are supported")


def read_volume(path: Path, what: str) -> nib.spatialimages.SpatialImage:
    """Read a volume fully into memory as NIfTI (an NRRD or MetaImage file gets the NIfTI affine of its grid).

    Raises:
        InputError: the format is not supported, the file is missing or unreadable; the message names
            ``what`` (the sequence) and the file.
    """
    suffix = split_volume_suffix(path.name)[1]
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        if suffix in NIFTI_SUFFIXES:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)  # reads everything now: a truncated file fails here
            return type(image)(data, image.affine, image.header)
        itk_image = sitk.ReadImage(str(path))
    except Exception as exc:  # nibabel, gzip, zlib and ITK raise many types for corrupt files
        raise InputError(f"cannot read {what} file {path}: {exc}") from exc
    return _itk_to_nifti(itk_image, f"{what} file {path}")


def _itk_to_nifti(image: sitk.Image, what: str) -> nib.Nifti1Image:
    """An ITK image (LPS physical space, components last) as NIfTI: voxel axes x, y, z[, component]."""
    if image.GetDimension() != 3:
        raise InputError(f"{what} has {image.GetDimension()} dimensions {image.GetSize()}; expected a 3-D volume")
    data = sitk.GetArrayFromImage(image)  # (z, y, x[, component])
    data = data.transpose(2, 1, 0, *range(3, data.ndim))
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return nib.Nifti1Image(data, LPS_TO_RAS @ affine)


def split_channels(image: nib.spatialimages.SpatialImage, source: str) -> ResolvedInputs:
    """One image as sequences: a 3-D FLAIR, or the channels of a 2- or 4-channel 4-D image."""
    shape = image.shape
    resolved = ResolvedInputs()
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        resolved.add(REFERENCE, image, source)
        return resolved
    layout = CHANNEL_LAYOUTS.get(shape[3]) if len(shape) == 4 else None
    if layout is None:
        raise InputError(
            f"{source} has shape {shape}: expected a 3-D FLAIR, or a 4-D image with channels last holding "
            "2 channels (FLAIR, T2) or 4 channels in MSD Task01 order (FLAIR, T1w, T1gd, T2w)"
        )
    data = np.asanyarray(image.dataobj)
    for channel, name in enumerate(layout):
        resolved.add(name, type(image)(data[..., channel], image.affine, image.header),
                     f"{source} [channel {channel + 1} of {len(layout)}]")
    return resolved




def named_sequences(name: str) -> set[str]:
    """The sequences a file or volume name names by its words: ``BraTS2021_00001_t2.nii.gz`` -> {"t2"}.

    A name that names a FLAIR is a FLAIR whatever else it holds (``AX_T2_FLAIR`` is a T2-weighted FLAIR);
    a name without such words (``SYN_00000``, an upload's temporary name) names none.
    """
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    named = {sequence for sequence, aliases in SEQUENCE_ALIASES.items() if words & set(aliases)}
    return {REFERENCE} if REFERENCE in named else named


def check_sequence_name(sequence: str, name: str) -> None:
    """Refuse a file given as ``sequence`` whose name names other sequences only (swapped inputs)."""
    named = named_sequences(name)
    if named and sequence not in named:
        others = " or ".join(other.upper() for other in sorted(named))
        raise InputError(
            f"the file given as the {sequence.upper()} is named {name!r}, which says {others}: are the sequences "
            f"swapped? Give each file as its own sequence (if it is the {sequence.upper()}, rename it)"
        )


def read_image(path: Path, name: str = "") -> ResolvedInputs:
    """A request's image as sequences: a 3-D FLAIR, judged by ``name`` (default: its file name) as
    :func:`check_sequence_name` does, or the channels of a multi-channel image (which have no names to judge)."""
    resolved = split_channels(read_volume(path, "image (FLAIR or multi-channel)"), str(path))
    if len(resolved.images) == 1:
        check_sequence_name(REFERENCE, name or path.name)
    return resolved


def read_sequence(sequence: str, path: Path) -> nib.spatialimages.SpatialImage:
    """The volume of one sequence, refused when its file name says it is another sequence."""
    check_sequence_name(sequence, path.name)
    return read_volume(path, sequence.upper())
