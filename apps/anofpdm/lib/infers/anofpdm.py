"""The MONAI Label infer task: find the request's sequences, call ``anofpdm.method.pipeline``, write the results.

No method logic lives here: the segmentation is ``anofpdm.method.pipeline.segment_volume``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from anofpdm.method.model import LoadedModel, load_checkpoint, load_model
from anofpdm.method.pipeline import (
    DECISION_RULES,
    InferenceOptions,
    SegmentationResult,
    resolve_options,
    segment_volume,
)
from anofpdm.method.periventricular import PERIVENTRICULAR_FINDINGS
from anofpdm.method.postprocess import BRAIN_LABEL, FINDINGS_LABEL, SHOWN_NAMES
from anofpdm.runtime import default_device
from anofpdm.volumes.alignment import REGISTRATION_MODES
from anofpdm.volumes.bias_field import BIAS_CORRECTIONS
from anofpdm.volumes.brain_extraction import BRAIN_EXTRACTION_MODES
from anofpdm.volumes.checks import InputError
from lib.request_inputs import IMAGE_ID, ResolvedInputs, StudyLookup, resolve_inputs
from lib.pacs import PACSDatastore
from lib.queueing import InferenceGate
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.generic import device_list, device_map
from monailabel.utils.sessions import Sessions

logger = logging.getLogger(__name__)

CALIBRATED = "calibrated"  # shown in Slicer for options that default to the mode's calibrated value
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
MAP_SUFFIX = "_anomaly_map.nii.gz"
BRAIN_SUFFIX = "_brain_mask.nii.gz"
OUTPUT_SUFFIXES = (MAP_SUFFIX, BRAIN_SUFFIX)  # the extra outputs kept in map_dir and offered by URL
MAP_FOLDER = "anofpdm_anomaly_maps"  # under the temp folder; MONAI Label deletes the label once sent, not the map
KEPT_MAPS = 50  # the newest maps (and brain masks) stay for clients to fetch; older ones are deleted
PROGRESS_STEP_PERCENT = 10
# request option -> type; a value of "", "calibrated" or None means the model's calibrated value
OPTION_TYPES: dict[str, type] = {
    "mode": str,
    "guidance": float,
    "forward_steps": int,
    "stride": int,
    "encoding": str,
    "early_stop": int,
    "seed": int,
    "min_lesion_mm3": float,
    "median_kernel": int,
    "batch_size": int,
    "mark_uncertain": bool,
    "registration": str,
    "decision_rule": str,
    "brain_extraction": str,
    "min_brain_fraction": float,
    "bias_correction": str,
    "periventricular_findings": str,
    "brain_segment": bool,  # the app's own: the extracted brain as label BRAIN_LABEL of the returned label map
    "findings_segment": bool,  # the app's own: the periventricular findings as label FINDINGS_LABEL
}
APP_OPTIONS = ("brain_segment", "findings_segment")  # request options that are not InferenceOptions
SEGMENT_NAMES = {value: name for name, value in SHOWN_NAMES.items()}
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class _CheckpointCheck(NamedTuple):
    """What the model file said when it was last read (it is read again when its mtime changes)."""

    mtime: float
    reason: str | None  # why the model cannot be served; None when it can
    modes: tuple[str, ...] = ()
    sequences: tuple[str, ...] = ()  # the network's input sequences, the FLAIR (reference grid) first


class ModelUnavailableError(RuntimeError):
    """The model file is missing, unreadable or uncalibrated: the task must not run."""


class ProgressLog:
    """A ``segment_volume`` progress callback that logs every ``step`` percent."""

    def __init__(self, what: str, step: int = PROGRESS_STEP_PERCENT) -> None:
        self._what = what
        self._step = step
        self._next = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent >= self._next:
            logger.info(f"{self._what}: {stage} {percent}% ({done}/{total})")
            self._next = (percent // self._step + 1) * self._step


def _parse_option(name: str, value: Any) -> Any:
    """A request value as the option's type; None for "use the calibrated value"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", CALIBRATED)):
        return None
    kind = OPTION_TYPES[name]
    if kind is bool:  # Slicer sends JSON booleans; REST users may send text
        text = str(value).strip().lower()
        if text not in BOOLEANS:
            raise InputError(f"option {name}={value!r} is not a valid bool (true or false)")
        return BOOLEANS[text]
    try:
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError("not an integer")
            return int(number)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"option {name}={value!r} is not a valid {kind.__name__}") from exc


class AnoFPDM(InferTask):
    """Whole-tumour segmentation of a FLAIR + T2 volume by AnoFPDM (``anofpdm.method.pipeline``).

    Args:
        path: the model checkpoint (weights + calibration); the task is offered only if it is valid.
        labels: label name -> value of the output map.
        device: default device ("cpu", "cuda", "cuda:1" or a MONAI Label device name); None: CUDA if present.
        studies: the local datastore folder, whose ``<sequence>/`` sub-folders hold the T2 of its images.
        sessions: returns MONAI Label's session store (or None when sessions are off).
        datastore: returns the app's datastore; on a PACS (``lib.pacs.PACSDatastore``) the T2 of a FLAIR
            series is the T2 series of its study.
        map_dir: where anomaly maps and brain masks are written (default: ``<TMPDIR>/anofpdm_anomaly_maps``).
        kept_maps: how many of the newest anomaly maps (and as many brain masks) are kept there.
        map_url: the server path that offers ``map_dir``'s files; the result JSON then names each map's and
            brain mask's URL (``anomaly_map_url``, ``brain_mask_url``) beside its path, for clients on another
            machine.
        gate: caps the inferences that run at once (the app's, shared by its tasks; None: a cap of 1 of its own).
    """

    def __init__(
        self,
        path: str,
        labels: dict[str, int],
        device: str | None = None,
        studies: str | None = None,
        sessions: Callable[[], Sessions | None] | None = None,
        datastore: Callable[[], Datastore] | None = None,
        map_dir: str | None = None,
        kept_maps: int = KEPT_MAPS,
        map_url: str | None = None,
        gate: InferenceGate | None = None,
    ) -> None:
        if kept_maps < 1:
            raise ValueError(f"kept_maps must be >= 1, got {kept_maps}")
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description="AnoFPDM: weakly supervised brain-tumour (whole tumour) segmentation from FLAIR + T2 "
            "with the forward process of a diffusion model. Research software, not for clinical use.",
        )
        self.path = Path(path)
        self.studies = studies
        self._sessions = sessions
        self._datastore = datastore
        self.map_dir = Path(map_dir) if map_dir else Path(tempfile.gettempdir()) / MAP_FOLDER
        self.kept_maps = kept_maps
        self.map_url = map_url
        self.gate = gate or InferenceGate()
        self._map_lock = threading.Lock()
        self._default_device = device or default_device()
        self._check_lock = threading.Lock()  # separate locks: /info/ must not wait for a model to load
        self._load_lock = threading.Lock()
        self._checked: _CheckpointCheck | None = None
        self._models: dict[str, tuple[float, LoadedModel]] = {}
        reason = self.unavailable_reason()
        if reason:
            logger.warning(f"model 'anofpdm' is not offered: {reason}")

    # ---- MONAI Label interface -------------------------------------------------------------------------
    def is_valid(self) -> bool:
        """True only for a readable, calibrated checkpoint: never serve a random network."""
        return self.unavailable_reason() is None

    def config(self) -> dict[str, Any]:
        """Options shown in Slicer; lists offer choices (first = default); "calibrated" = the mode's value.

        Each sequence besides the FLAIR (``t2``) is a text option for its path on the server: for a volume
        loaded in Slicer, the module sends only the first volume of the scene.
        """
        devices = device_list()
        if self._default_device not in devices:
            devices.insert(0, self._default_device)
        else:
            devices.insert(0, devices.pop(devices.index(self._default_device)))
        defaults = InferenceOptions()
        return {
            "device": devices,
            "mode": self._modes(),
            "forward_steps": CALIBRATED,
            "stride": CALIBRATED,
            "guidance": CALIBRATED,
            "encoding": [CALIBRATED, "ddim", "ddpm"],
            "min_lesion_mm3": float(defaults.min_lesion_mm3),
            "seed": int(defaults.seed),
            "mark_uncertain": defaults.mark_uncertain,
            # the T2 onto the FLAIR grid: rigid registration when they do not line up (auto), always or never
            "registration": [defaults.registration, *(m for m in REGISTRATION_MODES if m != defaults.registration)],
            "decision_rule": [defaults.decision_rule, *(r for r in DECISION_RULES if r != defaults.decision_rule)],
            # the brain out of a head (skull, scalp, background): auto leaves a skull-stripped brain as it is
            "brain_extraction": [defaults.brain_extraction,
                                 *(m for m in BRAIN_EXTRACTION_MODES if m != defaults.brain_extraction)],
            # slices with less brain than this fraction of the largest slice's are not segmented (0: all are)
            "min_brain_fraction": float(defaults.min_brain_fraction),
            # each sequence divided by its N4 bias field (the scanner's smooth brightening), or not
            "bias_correction": [defaults.bias_correction,
                                *(m for m in BIAS_CORRECTIONS if m != defaults.bias_correction)],
            # thin lesions lining the ventricles (caps, halo) reported as periventricular findings, not tumour
            "periventricular_findings": [defaults.periventricular_findings,
                                         *(m for m in PERIVENTRICULAR_FINDINGS
                                           if m != defaults.periventricular_findings)],
            "brain_segment": False,  # the brain as a segment of the label map
            "findings_segment": True,  # the periventricular findings left out of the tumour, as a segment
            **{name: "" for name in self._other_sequences()},
        }

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segment the request's image when the gate lets it in; returns the label file and the result JSON, whose
        ``timings_s.queue_wait_s`` is the time spent waiting (``total_s`` leaves it out)."""
        with self.gate.slot() as waited_s:
            label, result = self._infer(request)
        result["timings_s"]["queue_wait_s"] = round(waited_s, 3)
        return label, result

    def _infer(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segment the request's image; returns the label file and the result JSON."""
        start = time.perf_counter()
        model = self._model(self._device(request.get("device")))
        options = self._options(model, request)
        brain_segment = _parse_option("brain_segment", request.get("brain_segment"))  # refused before the work
        findings_segment = _parse_option("findings_segment", request.get("findings_segment"))
        extension = request.get("result_extension") or RESULT_EXTENSIONS[0]
        if extension not in RESULT_EXTENSIONS:
            raise InputError(f"result_extension {extension!r} is not supported (use one of {RESULT_EXTENSIONS})")
        inputs = resolve_inputs(str(request.get("image") or ""), model.config.sequences, request, self.studies,
                                self._session_image, self._study_series(request))
        logger.info(f"anofpdm inputs: {inputs.describe()}; options: {options}")
        result = self._segment(model, inputs, options, Path(str(request["image"])).name)

        write_start = time.perf_counter()
        report = result.report
        mask = result.mask
        findings = result.periventricular_mask
        shown = findings_segment is not False  # unset: on
        if shown and findings is not None and np.asanyarray(findings.dataobj).any():
            mask = _with_segment(mask, findings, FINDINGS_LABEL)
            report["label_names"] = {**report["label_names"], SEGMENT_NAMES[FINDINGS_LABEL]: FINDINGS_LABEL}
        if brain_segment:
            mask = _with_segment(mask, result.brain_mask, BRAIN_LABEL)
            report["label_names"] = {**report["label_names"], SEGMENT_NAMES[BRAIN_LABEL]: BRAIN_LABEL}
        label_path, map_path = self._write(mask, result.anomaly_map, extension)
        brain_path = self._write_output(result.brain_mask, map_path.name[: -len(MAP_SUFFIX)], BRAIN_SUFFIX)
        report["timings_s"]["write_s"] = round(time.perf_counter() - write_start, 3)
        report["timings_s"]["total_s"] = round(time.perf_counter() - start, 3)
        logger.info(f"anofpdm: {report['verdict']}, {report['lesion_count']} lesion(s), "
                    f"{report['total_volume_ml']} mL in {report['timings_s']['total_s']} s -> {label_path}")
        return str(label_path), {
            **report,
            "anomaly_map": str(map_path),
            **({"anomaly_map_url": f"{self.map_url}/{map_path.name}"} if self.map_url else {}),
            "brain_mask": str(brain_path),
            **({"brain_mask_url": f"{self.map_url}/{brain_path.name}"} if self.map_url else {}),
            "inputs": inputs.sources,
            **({"series": {model.config.sequences[0]: request[IMAGE_ID], **inputs.series}} if inputs.series else {}),
        }

    # ---- model -------------------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """Why the model cannot be served (None when it can); re-checked when the file changes."""
        if not self.path.is_file():
            return f"model weights not found at {self.path} (train and calibrate one, or pass --conf model_path PATH)"
        mtime = self.path.stat().st_mtime
        with self._check_lock:
            if self._checked is None or self._checked.mtime != mtime:
                self._checked = self._check_checkpoint(mtime)
            return self._checked.reason

    def _check_checkpoint(self, mtime: float) -> _CheckpointCheck:
        try:
            payload = load_checkpoint(self.path)
        except (FileNotFoundError, ValueError) as exc:
            return _CheckpointCheck(mtime, str(exc))
        calibration = payload.get("calibration")
        if not calibration:
            return _CheckpointCheck(mtime, f"{self.path} has no calibration (run anofpdm calibrate)")
        modes = sorted(calibration, key=lambda mode: (mode != "fast", mode))
        return _CheckpointCheck(mtime, None, tuple(modes), tuple(payload["network"]["sequences"]))

    def _modes(self) -> list[str]:
        """The checkpoint's calibrated modes, "fast" first (none when the model is unavailable)."""
        return list(self._checked.modes) if self.is_valid() and self._checked else []

    def _other_sequences(self) -> list[str]:
        """The sequences the model needs besides the FLAIR, the request's image (none when unavailable)."""
        return list(self._checked.sequences[1:]) if self.is_valid() and self._checked else []

    def _device(self, requested: Any) -> str:
        name = requested[0] if isinstance(requested, list) and requested else requested
        name = str(name) if name else self._default_device
        device = device_map().get(name, name)
        try:
            torch.device(device)
        except RuntimeError as exc:
            raise InputError(f"device {name!r} is not a torch device: {exc}") from exc
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device {name!r} is not available on this server (devices: {device_list()})")
        return device

    def _model(self, device: str) -> LoadedModel:
        """The network on ``device``, loaded once per device and reloaded when the file changes."""
        reason = self.unavailable_reason()
        if reason:
            raise ModelUnavailableError(f"model 'anofpdm' is not available: {reason}")
        mtime = self.path.stat().st_mtime
        with self._load_lock:
            cached = self._models.get(device)
            if cached is None or cached[0] != mtime:
                logger.info(f"loading {self.path} on {device}")
                cached = (mtime, load_model(self.path, device))
                self._models[device] = cached
            return cached[1]

    # ---- request -----------------------------------------------------------------------------------------
    def _options(self, model: LoadedModel, request: dict[str, Any]) -> InferenceOptions:
        """The request's options, checked against the model; no mode means the first calibrated one ("fast")."""
        parsed = {name: _parse_option(name, request[name]) for name in OPTION_TYPES
                  if name in request and name not in APP_OPTIONS}
        if parsed.get("mode") is None:
            parsed["mode"] = self._modes()[0]
        # a None keeps the InferenceOptions default (seed 0, the mode's calibrated settings...); a bad
        # mode, encoding or kernel is an InputError whose message says which
        options = InferenceOptions(**{name: value for name, value in parsed.items() if value is not None})
        resolve_options(model, options)
        return options

    def _session_image(self, session_id: str) -> Path:
        sessions = self._sessions() if self._sessions else None
        if sessions is None:
            raise InputError("sessions are disabled on this server (MONAI_LABEL_SESSIONS=false)")
        session = sessions.get_session(session_id)
        if session is None:
            raise InputError(f"session {session_id!r} not found (expired or never created)")
        return Path(session.image)

    def _study_series(self, request: dict[str, Any]) -> StudyLookup | None:
        """For a series of a PACS: finds the other sequences in its study (None for other datastores)."""
        datastore = self._datastore() if self._datastore else None
        image_id = request.get(IMAGE_ID)
        if not isinstance(datastore, PACSDatastore) or not image_id:
            return None

        def lookup(sequence: str, series_uid: str | None) -> tuple[Path, str, str]:
            path, series = datastore.study_series(str(image_id), sequence, series_uid)
            return Path(path), series.uid, f"DICOM series {series}"

        return lookup

    @staticmethod
    def _segment(
        model: LoadedModel, inputs: ResolvedInputs, options: InferenceOptions, name: str
    ) -> SegmentationResult:
        """``segment_volume`` with progress logged; input errors name the files used."""
        try:
            return segment_volume(model, inputs.images, options, ProgressLog(f"anofpdm {name}"))
        except InputError as exc:
            raise InputError(f"{exc} [inputs: {inputs.describe()}]") from exc

    # ---- results -----------------------------------------------------------------------------------------
    def _write(self, mask: nib.Nifti1Image, anomaly_map: nib.Nifti1Image, extension: str) -> tuple[Path, Path]:
        """Write the label (``extension``) to a temp file and the float anomaly map (NIfTI) to ``map_dir``."""
        handle, name = tempfile.mkstemp(prefix="anofpdm_", suffix=f"_label{extension}")
        os.close(handle)
        label_path = Path(name)
        base = label_path.name[: -len(f"_label{extension}")]
        if extension == ".nrrd":
            nifti_path = label_path.with_name(base + "_label.nii.gz")
            nib.save(mask, nifti_path)
            sitk.WriteImage(sitk.ReadImage(str(nifti_path)), str(label_path), useCompression=True)
            nifti_path.unlink()
        else:
            nib.save(mask, label_path)
        return label_path, self._write_output(anomaly_map, base, MAP_SUFFIX)

    def _write_output(self, image: nib.Nifti1Image, base: str, suffix: str) -> Path:
        """Save an extra output (anomaly map or brain mask) to ``map_dir``, then delete all but the ``kept_maps``
        newest of its kind (disk use stays bounded)."""
        with self._map_lock:
            self.map_dir.mkdir(parents=True, exist_ok=True)
            path = self.map_dir / (base + suffix)
            nib.save(image, path)
            kept = sorted(self.map_dir.glob(f"*{suffix}"), key=lambda p: (p == path, p.stat().st_mtime_ns))
            for old in kept[: -self.kept_maps]:
                old.unlink(missing_ok=True)
        return path


def _with_segment(mask: nib.Nifti1Image, segment: nib.Nifti1Image, label: int) -> nib.Nifti1Image:
    """The label map with the segment's voxels not yet labelled labelled ``label`` (earlier labels kept)."""
    labels = np.asanyarray(mask.dataobj)
    combined = np.where(labels > 0, labels, np.where(np.asanyarray(segment.dataobj) > 0, label, 0))
    out = nib.Nifti1Image(combined.astype(labels.dtype), mask.affine, mask.header)
    out.set_data_dtype(labels.dtype)
    return out
