"""Active learning's "next sample": MONAI Label's random pick, without its failure on a small datastore."""

from __future__ import annotations

import random
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy


class RandomNotRecent(Strategy):
    """A random unlabeled image, each weighted by the seconds since this strategy last offered it.

    MONAI Label 0.8.5's ``Random`` weights the same way but raises (a server error) once every image was offered
    within the current second, which a few quick "Next sample" clicks on a small PACS reach; then every image is
    equally likely here.
    """

    def __init__(self) -> None:
        super().__init__("Random, the least recently offered images more likely")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        now = int(time.time())
        offered = [datastore.get_image_info(image).get("strategy", {}).get(request["strategy"], {}) for image in images]
        weights = [max(now - info.get("ts", 0), 0) for info in offered]
        if not any(weights):
            weights = [1] * len(images)
        index = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[index], "weight": weights[index]}
