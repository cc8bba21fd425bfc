"""The noise-prediction network and its self-describing checkpoint (docs/method.md section 2).

A checkpoint is a plain dict of tensors and simple types, loadable with
``torch.load(..., weights_only=True)``. It carries the network config, the diffusion schedule, the
EMA weights, a training record and (after ``anofpdm calibrate``) the calibration, so one file is
enough to serve a model.

On the CPU the network is served as a TorchScript graph traced from those weights and cached under
``ANOFPDM_CACHE_DIR`` (default ``~/.cache/anofpdm``), named by a digest of the weights, the network config and the
torch version, so it can never be out of step with the file: its outputs are the eager network's, and a process that
finds it need not import MONAI (seconds of a command's start-up).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anofpdm.atomic import atomic_path

if TYPE_CHECKING:
    from monai.networks.nets import DiffusionModelUNet

__all__ = [
    "HEALTHY",
    "UNHEALTHY",
    "NULL_LABEL",
    "MAP_SEQUENCES",
    "PRESETS",
    "NetworkConfig",
    "LoadedModel",
    "build_network",
    "network_differences",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "traced_network_path",
    "update_calibration",
]

HEALTHY = 0
UNHEALTHY = 1
NULL_LABEL = 2  # the classifier-free-guidance "no label" index
MAP_SEQUENCES = ("flair", "t2")  # the sequences that get anomaly maps (the model may take more)
NUM_CLASS_EMBEDS = 3
CHECKPOINT_FORMAT = "anofpdm-checkpoint-v1"
CACHE_DIR_VARIABLE = "ANOFPDM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "anofpdm"


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of the 2-D class-conditioned ``DiffusionModelUNet``.

    Args:
        sequences: input (and output) MRI sequences, in channel order.
        image_size: side of the square slices the network sees, in pixels.
        channels: feature channels per level.
        attention_levels: whether each level has self-attention.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: group-norm groups (divides every entry of ``channels``).
        field_of_view_mm: in-plane extent that ``image_size`` pixels cover (BraTS: 240 mm).
        intensity_landmarks: per sequence, the reference landmarks of histogram standardisation
            (``anofpdm.volumes.intensity.standardise``; the mean of the training volumes'); empty: percentile
            scaling only.
    """

    sequences: tuple[str, ...] = ("flair", "t2")
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 8
    field_of_view_mm: float = 240.0
    intensity_landmarks: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        # normalise lists (from JSON or a checkpoint) to tuples so configs compare and hash
        for name in ("sequences", "channels", "attention_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "intensity_landmarks", tuple(tuple(float(v) for v in row)
                                                              for row in self.intensity_landmarks))
        if self.intensity_landmarks and len(self.intensity_landmarks) != len(self.sequences):
            raise ValueError(f"intensity_landmarks needs one row per sequence {self.sequences}, "
                             f"got {len(self.intensity_landmarks)}")
        if not self.sequences:
            raise ValueError("sequences must name at least one MRI sequence")
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(
                f"channels {self.channels} and attention_levels {self.attention_levels} differ in length"
            )
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every channel count {self.channels} must be a multiple of norm_num_groups")
        downsampling = 2 ** (len(self.channels) - 1)
        if self.image_size <= 0 or self.image_size % downsampling:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of {downsampling}")
        if self.field_of_view_mm <= 0:
            raise ValueError("field_of_view_mm must be positive")

    @property
    def landmarks(self) -> dict[str, tuple[float, ...]] | None:
        """Sequence -> histogram-standardisation landmarks, or None when the model has none."""
        return dict(zip(self.sequences, self.intensity_landmarks)) if self.intensity_landmarks else None

    @property
    def pixel_spacing_mm(self) -> float:
        """In-plane pixel spacing of the network grid."""
        return self.field_of_view_mm / self.image_size

    def to_dict(self) -> dict[str, Any]:
        """Plain types; no ``intensity_landmarks`` key without landmarks (as checkpoints saved before them)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        landmarks = out.pop("intensity_landmarks")
        return {**out, "intensity_landmarks": [list(row) for row in landmarks]} if landmarks else out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        return cls(**data)


PRESETS: dict[str, NetworkConfig] = {
    # Sized for a 2-core CPU: ~0.7 M parameters, 64 x 64 slices (3.75 mm pixels), attention at 16 px.
    "cpu": NetworkConfig(),
    # The authors' network (~100 M parameters at 4 sequences): needs a GPU to train and to run.
    # MONAI's DiffusionModelUNet has no residual-block dropout, so the paper's dropout 0.1 is not
    # reproduced.
    "paper": NetworkConfig(
        sequences=("flair", "t1", "t1ce", "t2"),
        image_size=128,
        channels=(128, 128, 256, 384, 512),
        attention_levels=(False, False, True, True, True),
        num_res_blocks=2,
        num_head_channels=64,
        norm_num_groups=32,
    ),
}


def build_network(config: NetworkConfig) -> DiffusionModelUNet:
    """Create the class-conditioned noise-prediction UNet for ``config`` (random weights)."""
    from monai.networks.nets import DiffusionModelUNet  # here, not above: a cached traced graph needs no MONAI

    n = len(config.sequences)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=n,
        out_channels=n,
        channels=config.channels,
        attention_levels=config.attention_levels,
        num_res_blocks=config.num_res_blocks,
        num_head_channels=config.num_head_channels,
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=NUM_CLASS_EMBEDS,
    )


def network_differences(first: NetworkConfig, second: NetworkConfig) -> dict[str, tuple[Any, Any]]:
    """The settings in which two networks differ, as ``{name: (first's, second's)}``, intensity landmarks aside: where
    it is empty, one's weights fit the other (fine-tuning and weight interpolation rely on it)."""
    ours, theirs = (replace(config, intensity_landmarks=()).to_dict() for config in (first, second))
    return {name: (value, theirs.get(name)) for name, value in ours.items() if theirs.get(name) != value}


@dataclass
class LoadedModel:
    """A network ready for inference plus what its checkpoint says about it."""

    network: torch.nn.Module
    config: NetworkConfig
    schedule: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device


def save_checkpoint(
    path: str | Path,
    config: NetworkConfig,
    state_dict: dict[str, torch.Tensor],
    schedule: dict[str, Any],
    training: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write a self-describing inference checkpoint atomically (temp file, then rename)."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "network": config.to_dict(),
        "schedule": dict(schedule),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "training": dict(training or {}),
        "calibration": None if calibration is None else dict(calibration),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"cannot read model checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an anofpdm checkpoint (expected format {CHECKPOINT_FORMAT})")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an inference checkpoint onto ``device``, in eval mode with gradients off; on the CPU as the cached
    traced graph of its weights (made on first use)."""
    payload = load_checkpoint(path)
    config = NetworkConfig.from_dict(payload["network"])
    if torch.device(device).type == "cpu":
        network = _traced_network(config, payload["state_dict"])
    else:
        network = _eager_network(config, payload["state_dict"]).to(device)
    return LoadedModel(
        network=network,
        config=config,
        schedule=payload["schedule"],
        training=payload.get("training") or {},
        calibration=payload.get("calibration"),
        path=Path(path),
    )


def _eager_network(config: NetworkConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    network = build_network(config)
    network.load_state_dict(state_dict)
    return network.eval().requires_grad_(False)


def traced_network_path(config: NetworkConfig, state_dict: dict[str, torch.Tensor]) -> Path:
    """Where the traced graph of these weights is cached (``ANOFPDM_CACHE_DIR``, default ``~/.cache/anofpdm``)."""
    key = json.dumps([weights_fingerprint(state_dict), config.to_dict(), torch.__version__], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR) / "networks" / f"{digest}.torchscript"


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """TorchScript without its notices: torch 2.13 calls it deprecated (it is the one format that loads in a fraction
    of a second without the network's Python classes; ``torch.export``'s took 3 s), and the tracer warns of shape
    checks it records as constants (the graph is tested batch-free)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _traced_network(config: NetworkConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The CPU network as a TorchScript graph: read from the cache, else traced from the weights and cached (an
    unwritable cache only costs the next process the tracing)."""
    path = traced_network_path(config, state_dict)
    if path.is_file():
        try:
            with _quiet_torchscript():
                return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as exc:  # cut short (a full disk, a killed process): trace it again
            warnings.warn(f"unreadable traced network {path} is traced again: {exc}", stacklevel=3)
    network = _eager_network(config, state_dict)
    n = len(config.sequences)
    example = {"x": torch.zeros(2, n, config.image_size, config.image_size), "timesteps": torch.tensor([0, 1]),
               "class_labels": torch.tensor([HEALTHY, NULL_LABEL])}
    with _quiet_torchscript():
        traced = torch.jit.trace(network, example_kwarg_inputs=example, check_trace=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, _quiet_torchscript():  # processes starting at once each write their own
            torch.jit.save(traced, str(tmp))
    except OSError as exc:
        warnings.warn(f"cannot cache the traced network at {path}: {exc}", stacklevel=3)
    return traced.eval()


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """Identifies a set of weights whatever file holds them (calibration rewrites a checkpoint, not its weights)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def update_calibration(path: str | Path, calibration: dict[str, dict[str, Any]]) -> Path:
    """Store per-mode calibrations in an existing checkpoint (merged, atomically rewritten)."""
    payload = load_checkpoint(path)
    merged = {**(payload.get("calibration") or {}), **calibration}
    return save_checkpoint(
        path,
        NetworkConfig.from_dict(payload["network"]),
        payload["state_dict"],
        payload["schedule"],
        payload.get("training"),
        merged,
    )
