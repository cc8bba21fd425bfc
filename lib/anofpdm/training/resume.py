"""The resume state of a run folder (``state.pt``) and the checks that a resumed run continues the same one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anofpdm.method.model import NetworkConfig, weights_fingerprint
from anofpdm.training.config import TrainConfig

__all__ = [
    "STATE_FILE",
    "STATE_FORMAT",
    "check_lr_history",
    "check_validation_history",
    "load_state",
    "resume_invariants",
]

STATE_FILE = "state.pt"
STATE_FORMAT = "anofpdm-train-state-v1"
# TrainConfig fields that define the optimisation problem: a resumed run must not change them
RESUME_INVARIANTS = (
    "network",
    "data",
    "train_slices",
    "batch_size",
    "lr",
    "weight_decay",
    "ema_decay",
    "null_label_probability",
    "seed",
    "schedule",
    "augment",
    "initial_weights",
)
# what a state saved before an invariant existed trained with
LEGACY_INVARIANTS = {"augment": False, "initial_weights": None}


def resume_invariants(
    config: TrainConfig,
    network_config: NetworkConfig,
    data: dict[str, Any],
    start_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The setup a resumed run must share with the saved one (``start_weights``: those of ``initial_weights``)."""
    values = config.to_dict()
    values.update(network=network_config.to_dict(), data=data["fingerprint"], train_slices=data["train_slices"])
    if start_weights is not None:  # the weights, not the file's path or calibration
        values["initial_weights"] = weights_fingerprint(start_weights)
    return {key: values[key] for key in RESUME_INVARIANTS}


def load_state(run_dir: Path, resume: bool, invariants: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
    """The saved state to resume from (None for a new run), checked against this run's invariants."""
    path = run_dir / STATE_FILE
    if not resume:
        if path.exists():
            raise FileExistsError(f"{run_dir} already holds a training run; resume it or choose another folder")
        return None
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no {STATE_FILE} in {run_dir}")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an anofpdm training state ({STATE_FORMAT})")
    changed = [
        f"{key}: run has {state['invariants'].get(key, LEGACY_INVARIANTS.get(key))!r}, now {value!r}"
        for key, value in invariants.items()
        if state["invariants"].get(key, LEGACY_INVARIANTS.get(key)) != value
    ]
    if changed:
        raise ValueError(f"cannot resume {run_dir} with a different setup:\n  " + "\n  ".join(changed))
    return state


def check_lr_history(state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a learning-rate decay that would change the rate of iterations the run has already trained."""
    start, saved = state["iteration"], state["config"]
    saved_from = saved.get("lr_decay_from")  # None in states saved before the decay existed
    if saved_from is not None and saved_from < start:
        if (config.lr_decay_from, config.iterations) != (saved_from, saved["iterations"]):
            raise ValueError(
                f"cannot resume {start} iterations into a learning-rate decay from {saved_from} to "
                f"{saved['iterations']} with another one: resume with lr_decay_from {saved_from} and iterations "
                f"{saved['iterations']}"
            )
    elif config.lr_decay_from is not None and config.lr_decay_from < start:
        raise ValueError(
            f"lr_decay_from {config.lr_decay_from} is before iteration {start}, which the run has reached at a "
            f"constant learning rate; start the decay at {start} or later"
        )


def check_validation_history(state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse validation settings other than those the run's ``validation.csv`` was measured with."""
    saved = state["config"]
    if saved.get("validate_every") is None or config.validate_every is None:
        return
    before = (list(saved["validation_timesteps"]), saved["validation_slices"])
    now = (list(config.validation_timesteps), config.validation_slices)
    if before != now:
        raise ValueError(
            f"cannot resume with validation timesteps {now[0]} on {now[1]} slices: the run's validation losses "
            f"were measured at {before[0]} on {before[1]}; resume with those"
        )
