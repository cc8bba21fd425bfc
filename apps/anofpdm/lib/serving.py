"""Keep the server answering while inferences run, and turn input errors into clear HTTP errors.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as an ``async`` endpoint that calls the blocking
inference directly, so one inference freezes the event loop and every other request (``/info/``
included) waits for it. ``MONAI_LABEL_INFER_CONCURRENCY`` does not help: it moves the task into a
thread pool, but the event loop still waits on that pool's future. This module re-registers the same
route with a plain (synchronous) endpoint, which FastAPI runs in its worker threads; the event loop
stays free, several inferences can run at once, and ``MONAI_LABEL_INFER_CONCURRENCY=N`` (a MONAI
Label setting) still caps how many run together. The endpoint also maps errors to status codes with
the message in the body: ``InputError`` -> 422, model unavailable -> 503, anything else -> 500.
"""

from __future__ import annotations

import logging
from typing import Any

from anofpdm.volume import InputError
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.routing import APIRoute
from lib.infers.anofpdm import ModelUnavailableError
from monailabel.config import settings
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import MONAILabelException

logger = logging.getLogger(__name__)

INFER_PATH = "/{model}"


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
        return infer_endpoint.run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except HTTPException:
        raise
    except InputError as exc:
        logger.warning(f"infer {model}: bad input: {exc}")
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    except ModelUnavailableError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    except MONAILabelException as exc:  # e.g. an unknown model name
        raise HTTPException(status_code=404, detail=exc.msg) from exc
    except Exception as exc:
        logger.exception(f"infer {model} failed")
        raise HTTPException(status_code=500, detail=f"inference failed: {type(exc).__name__}: {exc}") from exc


def serve_infer_in_worker_threads() -> None:
    """Replace MONAI Label's ``POST /infer/{model}`` route by :func:`api_run_inference_in_thread` (idempotent)."""
    router = infer_endpoint.router
    routes = [r for r in router.routes if isinstance(r, APIRoute) and r.path == router.prefix + INFER_PATH]
    if len(routes) != 1 or routes[0].methods != {"POST"}:
        raise RuntimeError(f"expected one POST {router.prefix}{INFER_PATH} route in MONAI Label, found {routes}")
    route = routes[0]
    if route.endpoint is api_run_inference_in_thread:
        return
    router.routes.remove(route)
    router.add_api_route(INFER_PATH, api_run_inference_in_thread, methods=["POST"], summary=route.summary,
                         responses=route.responses)
    logger.info(f"POST {router.prefix}{INFER_PATH} now runs in worker threads (event loop stays responsive)")
