"""Find the FLAIR and the other sequences (T2, ...) of one inference request and read them.

Three conventions, tried in this order for every sequence the model needs besides the FLAIR:

1. a multi-channel image: 4-D NIfTI (or a vector NRRD), channels last, 2 channels (FLAIR, T2) or 4 in the MSD Task01
   order (FLAIR, T1w, T1gd, T2w);
2. request parameters: ``{"t2": "<path on the server>"}`` or ``{"t2_session": "<session id>"}``
   (a MONAI Label session whose image is the T2);
3. a datastore image ``<studies>/<id>.nii.gz`` has its T2 at ``<studies>/t2/<id>.nii.gz`` (or ``.nii``,
   ``.nrrd``...; MONAI Label's local datastore lists only the top level of ``<studies>``, so ``t2/`` is not
   an image);
4. on a DICOMweb datastore (a PACS), the request's image is a FLAIR series and its T2 is the T2 series of the
   same study (``lib.pacs``), or the series named by the request parameter ``{"t2_series": "<series UID>"}``.

Volumes are NIfTI, NRRD (3D Slicer's format) or MetaImage files (``anofpdm.volumes.reading.read_volume``).

A MONAI Label session made of several files (``PUT /session/`` with FLAIR and T2) arrives as a folder;
its files are matched by the sequence name in the file name (``case_flair.nii.gz``, ``case_t2.nii.gz``).
A file whose name says it is another sequence (the request's 3-D image named ``case_t2``, a ``t2`` path named
``case_flair``) is refused as swapped. The request's image is judged by the name its client gave it,
``image_name`` (set by ``lib.serving``: an upload's file name, or the image id sent with a session, which
is the volume's name in Slicer), since MONAI Label stores both under temporary names.
Every failure is an ``InputError`` that names the paths it looked at.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from anofpdm.volumes.reading import (
    SEQUENCE_ALIASES,
    VOLUME_SUFFIXES,
    ResolvedInputs,
    named_sequences,
    read_image,
    read_sequence,
    read_volume,
    split_volume_suffix,
)
from anofpdm.volumes.checks import InputError

IMAGE_NAME = "image_name"  # request key: the name the client gave the image (see the module docstring)
IMAGE_ID = "image_id"  # request key: the datastore id of the request's image (set by lib.serving)

SessionLookup = Callable[[str], Path]
# (sequence, series UID named by the request or None) -> that sequence's file in the study of the request's
# image, its series UID and a description for messages (lib.pacs.PACSDatastore.study_series)
StudyLookup = Callable[[str, str | None], tuple[Path, str, str]]


def _session_files(folder: Path, sequences: Sequence[str]) -> ResolvedInputs:
    """Match the files of a multi-file session to sequences by the sequence name in their file names."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    resolved = ResolvedInputs()
    for name in sequences:
        matches = [p for p in files if name in named_sequences(p.name)]
        if len(matches) != 1:
            raise InputError(
                f"session folder {folder} holds {[p.name for p in files]}: expected exactly one file named "
                f"with {name!r} (one of {sorted(SEQUENCE_ALIASES.get(name, (name,)))}), e.g. case_{name}.nii.gz; "
                f"found {len(matches)}"
            )
        resolved.add(name, read_volume(matches[0], name.upper()), str(matches[0]))
    return resolved


def _datastore_sibling(image_path: Path, name: str) -> list[Path]:
    """Where a datastore image's ``name`` sequence may lie: ``<studies>/<name>/<id>`` with the image's own
    suffix first, then the other volume suffixes (``.nii.gz``, ``.nii``, ``.nrrd``...)."""
    stem, own = split_volume_suffix(image_path.name)
    return [image_path.parent / name / f"{stem}{suffix}" for suffix in (own, *(s for s in VOLUME_SUFFIXES if s != own))]


def resolve_inputs(
    image: str,
    sequences: Sequence[str],
    params: Mapping[str, object],
    studies: str | None,
    session_image: SessionLookup,
    study_series: StudyLookup | None = None,
) -> ResolvedInputs:
    """Read every sequence the model needs for one request.

    Args:
        image: the request's image: a volume file (FLAIR or multi-channel) or a multi-file session folder.
        sequences: the model's sequences; ``flair`` is the reference grid.
        params: request parameters; ``<sequence>`` (a server path), ``<sequence>_session`` (a session id) or
            ``<sequence>_series`` (a series UID of the image's study, with ``study_series``), and
            ``image_name``, the name the client gave the image.
        studies: the local datastore folder, or None (its ``<sequence>/`` sub-folders are searched only
            for images that lie in it).
        session_image: session id -> the file of that session's image (raises ``InputError`` if unknown).
        study_series: for an image from a PACS, finds the other sequences in its study (``StudyLookup``).

    Raises:
        InputError: a sequence is missing, unreadable or given twice; the message names what was tried.
    """
    if not image:
        raise InputError("the request names no image file (an unknown datastore image id?)")
    image_path = Path(image)
    if image_path.is_dir():
        resolved = _session_files(image_path, sequences)
    else:
        resolved = read_image(image_path, str(params.get(IMAGE_NAME) or ""))
    in_datastore = (
        studies is not None and Path(studies).is_dir() and image_path.parent.resolve() == Path(studies).resolve()
    )

    for name in sequences:
        keys = (name, f"{name}_session", f"{name}_series")
        path_param, session_param, series_param = (params.get(key) for key in keys)
        given = [key for key in keys if params.get(key)]
        if name in resolved.images:
            if given:
                raise InputError(f"{name.upper()} is given twice: in the image ({resolved.sources[name]}) and "
                                 f"as the request parameter {given[0]}")
            continue
        if len(given) > 1:
            raise InputError(f"give one of {', '.join(given)}, not several")
        if series_param and study_series is None:
            raise InputError(f"{name}_series names a DICOM series: it needs a DICOMweb datastore (a PACS) and a "
                             f"series id as the image; give {name} or {name}_session instead")
        if study_series is not None and not path_param and not session_param:
            path, series_uid, described = study_series(name, str(series_param) if series_param else None)
            resolved.add(name, read_volume(path, name.upper()), f"{described}: {path}")
            resolved.series[name] = series_uid
        elif path_param:
            path = Path(str(path_param))
            resolved.add(name, read_sequence(name, path), str(path))
        elif session_param:
            path = session_image(str(session_param))
            resolved.add(name, read_sequence(name, path), f"{path} (session {session_param})")
        elif in_datastore:
            candidates = _datastore_sibling(image_path, name)
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise InputError(
                    f"{name.upper()} for datastore image {split_volume_suffix(image_path.name)[0]!r} not found: "
                    "looked for "
                    f"{', '.join(str(p) for p in candidates)}; or give a 2- or 4-channel image"
                )
            resolved.add(name, read_volume(found, name.upper()), str(found))
        else:
            raise InputError(
                f"no {name.upper()} for the image {image_path.name}: give the request parameter "
                f'{{"{name}": "<path on the server>"}} (in 3D Slicer: Options, {name}) or '
                f'{{"{name}_session": "<session id>"}}, upload a 2- or 4-channel image, or create one session with '
                f"the FLAIR and {name.upper()} files"
            )
    return resolved
