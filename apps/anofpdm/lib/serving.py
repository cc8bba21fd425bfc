"""Keep the server answering while inferences run, and turn input errors into clear HTTP errors.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as an ``async`` endpoint that calls the blocking
inference directly, so one inference freezes the event loop and every other request (``/info/``
included) waits for it. ``MONAI_LABEL_INFER_CONCURRENCY`` does not help: it moves the task into a
thread pool, but the event loop still waits on that pool's future. This module re-registers the same
route with a plain (synchronous) endpoint, which FastAPI runs in its worker threads; the event loop
stays free, and the infer task lets ``--conf max_concurrent_inferences`` of them run at once while the
others wait their turn (``lib.queueing``). The endpoint also maps errors to status codes with
the message in the body: ``InputError`` -> 422, a PACS that does not answer -> 502, model unavailable -> 503,
anything else -> 500; ``output=dicom_seg`` (written by dcmqi in MONAI Label) is a 422 pointing to Submit
Label. It passes the name the client gave the image to the task as ``image_name`` (an upload's file name, or
the image id sent with a session: the volume's name in Slicer), which MONAI Label would replace by a temporary
path, and the datastore image id as ``image_id`` (a PACS series: its study holds the T2).

``PUT /datastore/label`` (Submit Label) is re-registered the same way: in a worker thread (on a PACS it
writes and uploads a DICOM SEG), with an empty label -> 422 and a PACS that does not answer -> 502.

It also adds ``GET /infer/{model}/anomaly_maps/{name}``: the anomaly map an inference result names
(``anomaly_map_url``), for clients that do not share the server's file system (Slicer on a workstation,
the server on a GPU machine).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from anofpdm.volumes.checks import InputError
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute, APIRouter
from lib.infers.anofpdm import OUTPUT_SUFFIXES, ModelUnavailableError
from lib.request_inputs import IMAGE_ID, IMAGE_NAME
from lib.pacs import PACSUnavailableError
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_endpoint
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelException

logger = logging.getLogger(__name__)

INFER_PATH = "/{model}"
LABEL_PATH = "/label"
ANOMALY_MAP_PATH = "/{model}/anomaly_maps/{name}"


def anomaly_map_url(model: str) -> str:
    """The server path under which ``model``'s anomaly maps are offered (a map's file name follows)."""
    prefix = settings.MONAI_LABEL_API_STR + infer_endpoint.router.prefix
    return prefix + ANOMALY_MAP_PATH.format(model=model, name="").rstrip("/")


def api_run_inference_in_thread(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: infer_endpoint.ResultType | None = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> Any:
    """MONAI Label's ``/infer/{model}`` (same parameters), run by FastAPI in a worker thread."""
    try:
        request_params = json.loads(params) if params else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(status_code=422, detail=f"params is not valid JSON: {exc}") from exc
    if not isinstance(request_params, dict):
        raise HTTPException(status_code=422, detail=f"params must be a JSON object, got {params!r}")
    if output == infer_endpoint.ResultType.dicom_seg:  # MONAI Label writes it with dcmqi, which is not installed
        raise HTTPException(status_code=422, detail="output=dicom_seg is not offered (MONAI Label would write it "
                            "with dcmqi, which this offline server does not download): ask for the label (output "
                            "image or all) and Submit Label (save_label, tag final) to store it in the PACS as a "
                            "DICOM SEG")
    image_name = file.filename if file is not None and file.filename else (image if session_id else "")
    if image_name:
        request_params.setdefault(IMAGE_NAME, image_name)
    request_params.pop(IMAGE_ID, None)  # set here only, from the request's datastore image
    if image and file is None and not session_id:
        request_params[IMAGE_ID] = image
    try:
        return infer_endpoint.run_inference(background_tasks, model, image, session_id, json.dumps(request_params),
                                            file, label, output)
    except HTTPException:
        raise
    except (InputError, PACSUnavailableError) as exc:
        raise _client_error(exc, f"infer {model}") from exc
    except ModelUnavailableError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    except MONAILabelException as exc:  # e.g. an unknown model name
        raise HTTPException(status_code=404, detail=exc.msg) from exc
    except Exception as exc:
        logger.exception(f"infer {model} failed")
        raise HTTPException(status_code=500, detail=f"inference failed: {type(exc).__name__}: {exc}") from exc


def api_save_label_in_thread(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
) -> Any:
    """MONAI Label's ``PUT /datastore/label`` (same parameters), run by FastAPI in a worker thread."""
    try:
        return datastore_endpoint.save_label(background_tasks, image, params, tag, label, user.username)
    except (InputError, PACSUnavailableError) as exc:
        raise _client_error(exc, f"save label of {image}") from exc


def _client_error(exc: InputError | PACSUnavailableError, what: str) -> HTTPException:
    """The answer to bad input (422) or a PACS that does not answer (502), logged with ``what`` was asked."""
    if isinstance(exc, InputError):
        logger.warning(f"{what}: bad input: {exc}")
        return HTTPException(status_code=422, detail=str(exc))
    logger.warning(f"{what}: {exc}")
    return HTTPException(status_code=502, detail=str(exc))


def _replace_route(router: APIRouter, path: str, method: str, endpoint: Callable[..., Any]) -> None:
    """Replace MONAI Label's ``method`` route at ``path`` of ``router`` by ``endpoint`` (idempotent)."""
    routes = [r for r in router.routes
              if isinstance(r, APIRoute) and r.path == router.prefix + path and method in r.methods]
    if len(routes) != 1 or routes[0].methods != {method}:
        raise RuntimeError(f"expected one {method} {router.prefix}{path} route in MONAI Label, found {routes}")
    route = routes[0]
    if route.endpoint is endpoint:
        return
    router.routes.remove(route)
    router.add_api_route(path, endpoint, methods=[method], summary=route.summary, responses=route.responses)
    logger.info(f"{method} {router.prefix}{path} now runs in worker threads (event loop stays responsive)")


def serve_infer_in_worker_threads() -> None:
    """Replace MONAI Label's ``POST /infer/{model}`` and ``PUT /datastore/label`` routes by
    :func:`api_run_inference_in_thread` and :func:`api_save_label_in_thread` (idempotent)."""
    _replace_route(infer_endpoint.router, INFER_PATH, "POST", api_run_inference_in_thread)
    _replace_route(datastore_endpoint.router, LABEL_PATH, "PUT", api_save_label_in_thread)


def serve_anomaly_maps(map_dirs: Mapping[str, Path]) -> None:
    """Add ``GET /infer/{model}/anomaly_maps/{name}``, serving the anomaly maps and brain masks
    (``*_anomaly_map.nii.gz``, ``*_brain_mask.nii.gz``) of ``map_dirs[model]`` (idempotent)."""
    router = infer_endpoint.router
    if any(isinstance(r, APIRoute) and r.path == router.prefix + ANOMALY_MAP_PATH for r in router.routes):
        return
    folders = {model: Path(folder) for model, folder in map_dirs.items()}

    def get_anomaly_map(
        model: str, name: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    ) -> FileResponse:
        """An anomaly map (float32) or brain mask (uint8) named by an inference result, NIfTI on the input's grid."""
        folder = folders.get(model)
        path = folder / name if folder is not None and Path(name).name == name else None
        if path is None or not name.endswith(OUTPUT_SUFFIXES) or not path.is_file():
            raise HTTPException(status_code=404, detail=f"no anomaly map or brain mask {name!r} for model {model!r} "
                                "(the server keeps the newest ones only; run the inference again)")
        return FileResponse(path, media_type="application/gzip", filename=name)

    router.add_api_route(ANOMALY_MAP_PATH, get_anomaly_map, methods=["GET"], summary="Download an anomaly map")
    logger.info(f"GET {router.prefix}{ANOMALY_MAP_PATH} serves the anomaly maps of {sorted(folders)}")
