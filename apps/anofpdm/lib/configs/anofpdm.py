"""Model ``anofpdm``: where its weights are, its labels and device (``--conf model_path``, ``--conf device``)."""

from __future__ import annotations

import os
from typing import Any

import lib.infers
from anofpdm.method.postprocess import LABEL_NAMES
from lib.serving import anomaly_map_url
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask


class AnoFPDM(TaskConfig):
    """AnoFPDM whole-tumour segmentation (FLAIR + T2).

    Conf keys: ``model_path`` (default ``<model_dir>/anofpdm.pt``, i.e. the repository's ``model/``) and
    ``device`` (default CUDA when present, else CPU). ``init`` also takes ``studies`` (the datastore
    folder or URL), ``sessions`` and ``datastore`` (the app's session store and datastore accessors) and
    ``gate`` (the app's cap on concurrent inferences, ``lib.queueing``) as keyword arguments.
    """

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.labels = dict(LABEL_NAMES)  # "tumour" 1; "tumour (uncertain)" 2 unless the request turns it off
        self.path = os.path.realpath(conf.get("model_path") or os.path.join(model_dir, f"{name}.pt"))

    def infer(self) -> InferTask:
        return lib.infers.AnoFPDM(
            path=self.path,
            labels=self.labels,
            device=self.conf.get("device"),
            studies=self.kwargs.get("studies"),
            sessions=self.kwargs.get("sessions"),
            datastore=self.kwargs.get("datastore"),
            map_url=anomaly_map_url(self.name),
            gate=self.kwargs.get("gate"),
        )

    def trainer(self) -> TrainTask | None:
        """None: training needs the weak labels of a whole data set; it is ``anofpdm train`` (see README)."""
        return None
