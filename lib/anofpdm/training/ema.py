"""The exponential moving average (EMA) of the trained network's weights, the weights training exports.

Not ``torch.optim.swa_utils.AveragedModel``: its first update replaces the average by the weights instead of
averaging from the initial copy, and its state adds an ``n_averaged`` counter and ``module.`` key prefixes, so it
would change trained weights and the ``ema`` entry of the resume states (``state.pt``) written so far.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a module's weights: ``ema <- decay * ema + (1 - decay) * weights``.

    Args:
        source: the module being trained (its parameters are updated in place by the optimiser).
        decay: weight of the old average per update.
    """

    def __init__(self, source: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(source).requires_grad_(False).eval()
        pairs = list(zip(self.module.state_dict().values(), source.state_dict().values()))
        self._averages = [average for average, _ in pairs if average.is_floating_point()]
        self._currents = [current for average, current in pairs if average.is_floating_point()]
        self._copied = [(average, current) for average, current in pairs if not average.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the source's current weights; copy its integer buffers."""
        if self._averages:  # one multi-tensor kernel instead of one launch per tensor (matters on GPUs)
            torch._foreach_lerp_(self._averages, self._currents, 1 - self.decay)
        for average, current in self._copied:
            average.copy_(current)
