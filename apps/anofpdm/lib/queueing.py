"""How many inferences the server runs at once; the others wait their turn, first come first served.

On a 2-core CPU two inferences at once take as long together as one after the other (each runs torch on both
cores), so running them side by side only makes every client wait for the slowest and doubles the memory;
queueing gives the first client its mask in its single time (docs/serving.md, "Many requests").
``--conf max_concurrent_inferences N`` sets the cap; ``/info/`` reports it with what runs and waits now, and each
result's ``timings_s.queue_wait_s`` says how long that request waited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

CONF_KEY = "max_concurrent_inferences"
DEFAULT_MAX_CONCURRENT = 1  # measured on the 2-core CPU (docs/performance.md, "Concurrent requests")


class InferenceGate:
    """Admits at most ``limit`` inferences at once, in order of arrival.

    Args:
        limit: how many inferences may run together (>= 1).
    """

    def __init__(self, limit: int = DEFAULT_MAX_CONCURRENT) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"the number of concurrent inferences must be an integer >= 1, got {limit!r}")
        self.limit = limit
        self._condition = threading.Condition()
        self._running = 0
        self._arrived = 0  # tickets handed out
        self._admitted = 0  # tickets let in; tickets in between wait

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> InferenceGate:
        """The gate ``--conf max_concurrent_inferences N`` asks for (default 1)."""
        text = str(conf.get(CONF_KEY, DEFAULT_MAX_CONCURRENT)).strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"--conf {CONF_KEY} must be a whole number >= 1, got {text!r}")
        return cls(int(text))

    @contextmanager
    def slot(self) -> Iterator[float]:
        """Wait for this request's turn and a free slot; yields the seconds waited, and frees the slot on exit."""
        start = time.perf_counter()
        with self._condition:
            ticket = self._arrived
            self._arrived += 1
            self._condition.wait_for(lambda: ticket == self._admitted and self._running < self.limit)
            self._admitted += 1
            self._running += 1
            self._condition.notify_all()  # the next ticket may take another free slot
        try:
            yield time.perf_counter() - start
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    def status(self) -> dict[str, int]:
        """The cap, the inferences running and those waiting now (for ``/info/``)."""
        with self._condition:
            return {"max_concurrent": self.limit, "running": self._running,
                    "waiting": self._arrived - self._admitted}
