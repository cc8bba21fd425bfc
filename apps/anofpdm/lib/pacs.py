"""The app on a PACS: MONAI Label's DICOMweb datastore, offline, with each FLAIR series' T2 from its own study.

``monailabel start_server --studies http://<pacs>/dicom-web`` makes MONAI Label 0.8.5 download dcmqi's
``itkimage2segimage`` at startup (from GitHub) to write DICOM SEG; an offline hospital server then fails
to start. :class:`PACSDatastore` is MONAI Label's ``DICOMWebDatastore`` with the same settings
(``MONAI_LABEL_DICOMWEB_*``) that writes DICOM SEG with pydicom-seg instead (MONAI Label's own
pydicom-seg writer), so nothing is downloaded. It also:

- finds the T2 (any sequence besides the FLAIR) of a FLAIR series in the same study, by the words of
  SeriesDescription and ProtocolName (``anofpdm.volumes.reading.named_sequences``: "AX T2" is a T2, "AX T2 FLAIR"
  a FLAIR), or takes the series a request names (``t2_series``), and fetches and converts it once, as
  MONAI Label does the FLAIR (cached under ``MONAI_LABEL_DICOMWEB_CACHE_PATH``);
- refuses unknown and non-MR series with an ``InputError`` (HTTP 422), and turns a DICOMweb server that
  does not answer into :class:`PACSUnavailableError` (HTTP 502) naming the server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom_seg
import requests
from anofpdm.volumes.reading import named_sequences, read_volume
from anofpdm.method.postprocess import LABEL_NAMES, SHOWN_NAMES
from anofpdm.volumes.checks import InputError
from dicomweb_client import DICOMwebClient
from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom import dcmread
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

SEG_WRITER = f"pydicom-seg {pydicom_seg.__version__}"
SEG_SERIES_DESCRIPTION = "AnoFPDM"
NAME_FIELDS = ("SeriesDescription", "ProtocolName")  # the series names a sequence is recognised by
SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", *NAME_FIELDS)
IMAGE_MODALITY = "MR"
# tries of each DICOMweb request (dicomweb-client's default is 5: 30 s of exponential back-off, 2 + 4 + 8 + 16 s,
# before a PACS that does not answer is reported; 3 tries wait 6 s)
DICOMWEB_ATTEMPTS = 3


class PACSUnavailableError(RuntimeError):
    """The DICOMweb server did not answer (down, unreachable, or an HTTP error)."""


@dataclass(frozen=True)
class SeriesInfo:
    """What the DICOMweb server says about one series."""

    uid: str
    study_uid: str
    modality: str
    description: str
    protocol: str

    @classmethod
    def from_json(cls, attributes: dict[str, Any]) -> SeriesInfo:
        meta = Dataset.from_json(attributes)
        return cls(*(str(meta.get(name, "") or "") for name in
                     ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "ProtocolName")))

    def fit(self, sequence: str) -> int:
        """How many of its names (SeriesDescription, ProtocolName) name ``sequence``: 0, 1 or 2."""
        return sum(sequence in named_sequences(name) for name in (self.description, self.protocol) if name)

    def __str__(self) -> str:
        return f"{self.uid} ({self.modality} {self.description or self.protocol or 'unnamed'!r})"


def dicomweb_client(url: str) -> DICOMwebClient:
    """The DICOMweb client MONAI Label 0.8.5 makes for ``url`` from its settings (Google Cloud credentials
    for a ``googleapis.com`` URL; else ``MONAI_LABEL_DICOMWEB_USERNAME`` / ``_PASSWORD`` and the
    ``MONAI_LABEL_QIDO_PREFIX`` / ``WADO`` / ``STOW`` prefixes), trying each request ``DICOMWEB_ATTEMPTS`` times."""
    if "googleapis.com" in url:
        client = DICOMwebClient(url=url, session=create_session_from_gcp_credentials())
    else:
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    client.set_http_retry_params(max_attempts=DICOMWEB_ATTEMPTS)
    return client


def segment_descriptions(label_file: str, label_info: Any) -> list[dict[str, Any]]:
    """The segments to describe in a DICOM SEG, in the order MONAI Label's writer expects (one per label
    value present, ascending): the client's ``label_info`` entry with that ``idx`` when it sends one
    (3D Slicer does), else the app's name for the value ("tumour", "tumour (uncertain)", "brain", ...). The SEG
    series is described as ``SEG_SERIES_DESCRIPTION`` unless the client names a ``model_name``."""
    values = sorted(int(v) for v in np.unique(np.asanyarray(read_volume(Path(label_file), "label").dataobj)) if v)
    given = {int(info["idx"]): info for info in label_info or [] if isinstance(info, dict) and "idx" in info}
    names = {value: name for name, value in {**LABEL_NAMES, **SHOWN_NAMES}.items()}
    segments = [{"name": names.get(value, f"label {value}"), **given.get(value, {}), "idx": value} for value in values]
    if segments:
        segments[0].setdefault("model_name", SEG_SERIES_DESCRIPTION)
    return segments


def share_frame_of_reference(seg_file: str, image_dir: str) -> None:
    """Give a DICOM SEG the FrameOfReferenceUID of its source series: pydicom-seg 0.4.1 copies it from the
    source, then replaces it by a new UID, and viewers do not overlay a SEG on another frame of reference."""
    source = dcmread(next(Path(image_dir).glob("*.dcm")), stop_before_pixels=True)
    seg = dcmread(seg_file)
    seg.FrameOfReferenceUID = source.FrameOfReferenceUID
    seg.save_as(seg_file)


class PACSDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore without dcmqi, and with the other sequences of a study.

    Args: as ``DICOMWebDatastore``; ``convert_to_nifti`` must be True (the app reads NIfTI).
    """

    def __init__(
        self,
        client: DICOMwebClient,
        search_filter: dict[str, Any],
        cache_path: str | None = None,
        fetch_by_frame: bool = False,
        convert_to_nifti: bool = True,
    ) -> None:
        if not convert_to_nifti:
            raise ValueError("the app reads NIfTI volumes: MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI must stay true")
        super().__init__(client, search_filter, cache_path, fetch_by_frame, convert_to_nifti)
        logger.info(f"DICOMweb datastore {client.base_url}: series listed by {search_filter}; DICOM SEG written "
                    f"with {SEG_WRITER} (dcmqi is not used, nothing is downloaded)")

    @classmethod
    def from_settings(cls, url: str) -> PACSDatastore:
        """The datastore MONAI Label would make for ``--studies url`` (``MONAI_LABEL_DICOMWEB_*`` settings)."""
        cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        return cls(dicomweb_client(url), settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, cache_path or None,
                   settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME, settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI)

    @contextmanager
    def _server(self, doing: str) -> Iterator[None]:
        """Turn a DICOMweb failure while ``doing`` into :class:`PACSUnavailableError` naming the server."""
        try:
            yield
        except requests.RequestException as exc:
            raise PACSUnavailableError(f"DICOMweb server {self._client.base_url} failed while {doing}: "
                                       f"{type(exc).__name__}: {exc}") from exc

    def _search(self, doing: str, **filters: str) -> list[SeriesInfo]:
        with self._server(doing):
            found = self._client.search_for_series(search_filters=filters, fields=list(SERIES_FIELDS))
        return [SeriesInfo.from_json(attributes) for attributes in found]

    def series_info(self, series_uid: str) -> SeriesInfo:
        """The series ``series_uid``; ``InputError`` when the server has none."""
        found = [s for s in self._search(f"looking up series {series_uid}", SeriesInstanceUID=series_uid)
                 if s.uid == series_uid]
        if not found:
            raise InputError(f"no series {series_uid!r} on the DICOMweb server {self._client.base_url}")
        return found[0]

    def get_image_uri(self, image_id: str) -> str:
        """The NIfTI file of MR series ``image_id`` in MONAI Label's cache (fetched and converted once).

        MONAI Label returns the conversion's temporary file the first time (and leaves it in the temp
        folder) after copying it to the cache; here the cached copy is returned and the temporary one deleted.
        """
        info = self.series_info(image_id)
        if info.modality != IMAGE_MODALITY:
            raise InputError(f"series {info} is not an MR series: the app segments MR FLAIR series "
                             f"(list them with MONAI_LABEL_DICOMWEB_SEARCH_FILTER='{{\"Modality\": \"MR\"}}')")
        with self._server(f"fetching series {info}"):
            uri = super().get_image_uri(image_id)
        cached = Path(os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz")))
        if Path(os.path.realpath(uri)) != cached and cached.is_file():
            Path(uri).unlink(missing_ok=True)
            return str(cached)
        return uri

    def study_series(self, image_id: str, sequence: str, series_uid: str | None = None) -> tuple[str, SeriesInfo]:
        """The NIfTI file and the series of ``sequence`` (e.g. "t2") in the study of series ``image_id``.

        Args:
            image_id: the FLAIR series (the request's image).
            sequence: the sequence wanted.
            series_uid: that sequence's series, named by the request; None: the one MR series of the study
                whose names (SeriesDescription, ProtocolName) name ``sequence`` best.

        Raises:
            InputError: ``series_uid`` is not an MR series of the study, or no series or several equally
                fitting series name ``sequence``; the message names the study and its series.
        """
        image = self.series_info(image_id)
        study = self._search(f"listing the series of study {image.study_uid}", StudyInstanceUID=image.study_uid)
        listing = "; ".join(str(s) for s in study)
        option = f"{sequence}_series"
        if series_uid:
            chosen = next((s for s in study if s.uid == series_uid), None)
            if chosen is None or chosen.modality != IMAGE_MODALITY or chosen.uid == image_id:
                raise InputError(f"{option} {series_uid!r} is not another MR series of study {image.study_uid} "
                                 f"(FLAIR series {image_id}); its series: {listing}")
        else:
            fits = {s: s.fit(sequence) for s in study if s.uid != image_id and s.modality == IMAGE_MODALITY}
            best = max(fits.values(), default=0)
            candidates = [s for s, fit in fits.items() if fit == best and best > 0]
            if len(candidates) != 1:
                found = (f"{len(candidates)} series fit equally: {'; '.join(str(s) for s in candidates)}"
                         if candidates else f"no MR series is named {sequence.upper()} (by {', '.join(NAME_FIELDS)})")
                raise InputError(f"no single {sequence.upper()} series in study {image.study_uid} of FLAIR series "
                                 f"{image_id}: {found}; its series: {listing}. Name it with the option {option}")
            chosen = candidates[0]
        return self.get_image_uri(chosen.uid), chosen

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """As MONAI Label's: a final label ("Submit Label") is also stored in the PACS as a DICOM SEG
        referencing series ``image_id``, here written by pydicom-seg (MONAI Label's dcmqi path is not used)."""
        if label_tag != DefaultLabelTag.FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        image_uri = self.get_image_uri(image_id)  # the series' DICOM files are now in the cache
        converted = binary_to_image(image_uri, label_filename) if label_filename.endswith(".bin") else ""
        try:
            label_filename = converted or label_filename
            label_info.update(self._store_seg(image_id, label_filename, label_info.get("label_info")))
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if converted:
                Path(converted).unlink(missing_ok=True)

    def _store_seg(self, image_id: str, label_file: str, label_info: Any) -> dict[str, str]:
        """Write ``label_file`` as a DICOM SEG of series ``image_id`` (pydicom-seg), store it in the PACS and
        return what MONAI Label records of it (its series UID...)."""
        segments = segment_descriptions(label_file, label_info)
        if not segments:
            raise InputError(f"the label for series {image_id} is empty: there is no segment to store as DICOM SEG")
        image_dir = os.path.join(self._datastore.image_path(), image_id)
        seg_file = nifti_to_dicom_seg(image_dir, label_file, segments, use_itk=False)
        try:
            share_frame_of_reference(seg_file, image_dir)
            with self._server(f"storing the DICOM SEG of series {image_id}"):
                seg_series = dicom_web_upload_dcm(seg_file, self._client)
        finally:
            Path(seg_file).unlink(missing_ok=True)
        image = self.series_info(image_id)
        logger.info(f"stored DICOM SEG series {seg_series} for series {image} ({SEG_WRITER})")
        return {"SeriesInstanceUID": seg_series, "Modality": image.modality, "StudyInstanceUID": image.study_uid,
                "SegmentWriter": SEG_WRITER}
