"""MONAI Label's batch inference (``POST /batch/infer/anofpdm?images=all``) on any server, GPUs or not.

MONAI Label 0.8.5 spreads a batch over the CUDA devices unless the request says ``"multi_gpu": false``; its
default body says ``true``, and on a server without CUDA there are no devices to spread over: the batch dies with a
ZeroDivisionError before the first image. Here a batch asked to spread over GPUs that are not there runs on the one
device the request names (MONAI Label's default ``"cuda"`` means the CPU when CUDA is absent). A datastore image
that cannot be segmented (bad input) is skipped with a warning instead of ending the batch, and each image's result
is logged: MONAI Label runs a batch in a process of its own, whose log lines ``GET /batch/infer`` reports as the
task's ``details``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from anofpdm.volumes.checks import InputError
from lib.pacs import PACSUnavailableError
from lib.request_inputs import IMAGE_ID
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

logger = logging.getLogger(__name__)

Infer = Callable[[dict[str, Any], Datastore], dict[str, Any]]


class BatchInfer(BatchInferTask):
    """MONAI Label's batch inference, on the CPU when the server has no CUDA device, skipping bad images."""

    def __call__(self, request: dict[str, Any], datastore: Datastore, infer: Infer) -> dict[str, Any]:
        """Segment the request's images (``images``: all, labeled, unlabeled or a list of ids) and store each label
        in the datastore under ``label_tag`` (default ``original``); returns image id -> result ({} when skipped)."""
        request = dict(request)
        if request.get("multi_gpu", True) and torch.cuda.device_count() == 0:
            logger.info(f"batch infer: no CUDA device, so the images run one by one on {request.get('device')!r} "
                        "(cpu when CUDA is absent)")
            request["multi_gpu"] = False
        return super().__call__(request, datastore, _skipping_bad_inputs(infer))


def _skipping_bad_inputs(infer: Infer) -> Infer:
    """``infer`` with the datastore image id passed on (a PACS series finds its T2 by it); bad input gives {}."""

    def infer_one(request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        image_id = request["image"]
        start = time.perf_counter()
        try:
            result = infer({**request, IMAGE_ID: image_id}, datastore)
        except (InputError, PACSUnavailableError) as exc:
            logger.warning(f"batch infer: {image_id} skipped: {exc}")
            return {}
        report = result.get("params") or {}
        logger.info(f"batch infer: {image_id} done in {time.perf_counter() - start:.1f} s: "
                    f"{report.get('verdict')}, {report.get('lesion_count')} lesion(s), label stored as "
                    f"{result.get('label')!r} (tag {result.get('tag')})")
        return result

    return infer_one
