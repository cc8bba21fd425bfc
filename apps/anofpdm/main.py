"""MONAI Label app for AnoFPDM brain-tumour segmentation: wiring only.

Start: ``monailabel start_server --app apps/anofpdm --studies demo/studies``
(``--conf model_path PATH`` for other weights, ``--conf device cpu|cuda``, ``--conf max_concurrent_inferences N``
to run N inferences at once, default 1, and queue the rest), or ``--studies
http://<pacs>/dicom-web`` for a PACS (``docs/pacs.md``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anofpdm
import lib.configs
from lib.batch import BatchInfer
from anofpdm.runtime import reuse_heap_memory
from lib.pacs import PACSDatastore
from lib.queueing import InferenceGate
from lib.serving import serve_anomaly_maps, serve_infer_in_worker_threads
from lib.strategies import RandomNotRecent
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.utils.others.class_utils import get_class_names


class AnoFPDMApp(MONAILabelApp):
    """One infer task per config module in ``lib.configs``; weights default to the repository's ``model/``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        reuse_heap_memory()  # process-wide: network buffers stay in the heap instead of paging in afresh
        model_dir = os.path.realpath(os.path.join(app_dir, "..", "..", "model"))
        self.gate = InferenceGate.from_conf(conf)  # one queue for all models: they share the machine
        self.models: dict[str, TaskConfig] = {}
        for class_path in get_class_names(lib.configs, "TaskConfig"):
            module, _, class_name = class_path.rpartition(".")
            name = module.rpartition(".")[2]
            self.models[name] = getattr(sys.modules[module], class_name)()
            self.models[name].init(name, model_dir, conf, None, studies=studies, sessions=self.sessions,
                                   datastore=self.datastore, gate=self.gate)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="AnoFPDM",
            description="Brain-tumour segmentation with the forward process of a diffusion model "
            "(FLAIR + T2; research use only)",
            version=anofpdm.__version__,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        """A PACS: MONAI Label's DICOMweb datastore, offline (no dcmqi download), finding each FLAIR's T2."""
        return PACSDatastore.from_settings(self.studies)

    def init_infers(self) -> dict[str, InferTask]:
        return {name: config.infer() for name, config in self.models.items()}

    def init_batch_infer(self) -> BatchInfer:
        return BatchInfer()

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``/info/``, with the inference queue: the cap, what runs and what waits now."""
        return {**super().info(), "inference_queue": self.gate.status()}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": RandomNotRecent()}

    def on_init_complete(self) -> None:
        super().on_init_complete()
        serve_infer_in_worker_threads()
        serve_anomaly_maps({name: infer.map_dir for name, infer in self._infers.items()})
