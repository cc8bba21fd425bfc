"""Write NIfTI volumes as DICOM image series (pydicom): a FLAIR + T2 pair becomes two MR series of one study.

For trying the app on a PACS (``docs/pacs.md``) with NIfTI studies such as the demo's: each volume is written
slice by slice on its own grid (position, orientation and spacing from the NIfTI affine), so a DICOM reader
(SimpleITK / GDCM, as MONAI Label uses) gives back the same voxels in the same places (a reader stacks slices
along their normal, row x column: a volume whose slice axis points the other way comes back with its slices in
reverse order, the same image in physical space). Both series share the study and the frame
of reference, and are named as a scanner would name them ("AX FLAIR", "AX T2": SeriesDescription and
ProtocolName), which is how the app finds the T2 of a FLAIR series. Integer volumes are stored as they are;
other volumes as int16 with a rescale slope (about 1e-4 relative precision at the maximum).
UIDs are derived from the patient id, the study description and the series description: writing the
same study again gives the same UIDs (a PACS then replaces the instances instead of duplicating them).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["SERIES_DESCRIPTIONS", "SOP_CLASSES", "DicomStudy", "write_series", "write_study"]

SERIES_DESCRIPTIONS = {"flair": "AX FLAIR", "t2": "AX T2"}
SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}  # Image Storage
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
INT16_MAX = 32767
STORED_MAX = 32000  # a float volume's maximum magnitude is stored as this value (with the rescale slope)
PARALLEL_TOLERANCE = 1e-4


@dataclass
class DicomStudy:
    """The UIDs of a written study and the folder of each series, by sequence name."""

    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    series_uids: dict[str, str] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=list(parts))


def _stored_values(data: np.ndarray) -> tuple[np.ndarray, float]:
    """The volume as int16 pixel values and the rescale slope that gives back its values."""
    if not np.isfinite(data).all():
        raise ValueError("the volume holds NaN or Inf values: it cannot be written as DICOM")
    if np.issubdtype(data.dtype, np.integer) and data.min() >= -INT16_MAX - 1 and data.max() <= INT16_MAX:
        return data.astype(np.int16), 1.0
    peak = float(np.abs(data).max())
    slope = peak / STORED_MAX if peak > 0 else 1.0
    return np.round(data / slope).astype(np.int16), slope


def write_series(
    image: nib.spatialimages.SpatialImage,
    out_dir: Path,
    study: DicomStudy,
    description: str,
    series_number: int,
    modality: str = "MR",
) -> str:
    """Write one 3-D volume as one DICOM series of ``study`` into ``out_dir`` (one file per slice); returns
    the SeriesInstanceUID.

    Args:
        image: a 3-D NIfTI (or other nibabel) volume; its third voxel axis becomes the slice axis.
        out_dir: the folder for the series' files (created).
        study: the study the series belongs to (patient, study and frame-of-reference UIDs).
        description: SeriesDescription and ProtocolName, e.g. "AX FLAIR".
        series_number: SeriesNumber.
        modality: "MR" (default) or "CT".

    Raises:
        ValueError: not a 3-D volume, NaN/Inf values, a sheared grid (slices not stacked along their
            normal) or an unknown modality.
    """
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality {modality!r} is not supported (one of {sorted(SOP_CLASSES)})")
    if len(image.shape) != 3:
        raise ValueError(f"{description}: expected a 3-D volume, got shape {image.shape}")
    lps = RAS_TO_LPS @ image.affine
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    row, column, slice_axis = (axes[:, n] / spacing[n] for n in range(3))
    if abs(abs(float(np.dot(np.cross(row, column), slice_axis))) - 1.0) > PARALLEL_TOLERANCE:
        raise ValueError(f"{description}: the grid is sheared (slices not stacked along their normal); "
                         "resample it to an orthogonal grid first")
    pixels, slope = _stored_values(np.asanyarray(image.dataobj))
    series_uid = _uid(study.study_uid, description)
    out_dir.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().strftime("%Y%m%d")
    for k in range(image.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = _uid(series_uid, str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID = ds.PatientName = study.patient_id
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate = study.study_uid, "1", today
        ds.StudyDescription = "AnoFPDM"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, series_number, modality
        ds.SeriesDescription = ds.ProtocolName = description
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *column)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0.0, slope
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()  # rows along j, columns along i
        ds.save_as(path, write_like_original=False)
    return series_uid


def write_study(
    volumes: Mapping[str, nib.spatialimages.SpatialImage], out_dir: Path, patient_id: str
) -> DicomStudy:
    """Write each volume (by sequence name: ``flair``, ``t2``) as an MR series of one study into
    ``out_dir/<series description>/``; series are named by ``SERIES_DESCRIPTIONS`` ("AX FLAIR", "AX T2")."""
    unknown = set(volumes) - set(SERIES_DESCRIPTIONS)
    if unknown:
        raise ValueError(f"no series description for {sorted(unknown)} (known: {sorted(SERIES_DESCRIPTIONS)})")
    study_uid = _uid(patient_id, "study")
    study = DicomStudy(patient_id, study_uid, _uid(study_uid, "frame of reference"))
    for number, (name, image) in enumerate(volumes.items(), start=1):
        description = SERIES_DESCRIPTIONS[name]
        study.folders[name] = out_dir / description.replace(" ", "_")
        study.series_uids[name] = write_series(image, study.folders[name], study, description, number)
    return study
