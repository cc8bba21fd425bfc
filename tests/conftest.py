"""Shared fixtures: a tiny network and small synthetic volumes, fast on a CPU; a real MONAI Label server."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from anofpdm.method.decisions import Calibration
from anofpdm.method.diffusion import ScheduleConfig
from anofpdm.method.model import NetworkConfig, build_network, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "anofpdm"
ACTIVATE = Path(sys.prefix) / "bin" / "activate"
STARTUP_DEADLINE_S = 180.0
POLL_TIMEOUT_S = 1.0


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on two busy cores torch's spinning threads make the tiny network ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def network_cache(tmp_path_factory: pytest.TempPathFactory):
    """Traced networks go to a cache of this test session's (servers started by the tests inherit it), not the
    user's ``~/.cache/anofpdm``."""
    from anofpdm.method.model import CACHE_DIR_VARIABLE

    before = os.environ.get(CACHE_DIR_VARIABLE)
    os.environ[CACHE_DIR_VARIABLE] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ[CACHE_DIR_VARIABLE])
    if before is None:
        del os.environ[CACHE_DIR_VARIABLE]
    else:
        os.environ[CACHE_DIR_VARIABLE] = before


TINY = NetworkConfig(
    sequences=("flair", "t2"),
    image_size=16,
    channels=(16, 16),
    attention_levels=(False, False),
    num_res_blocks=1,
    num_head_channels=16,
    norm_num_groups=4,
)


def tiny_network(std: float = 0.1) -> torch.nn.Module:
    """The tiny network with every weight drawn at random (MONAI zero-initialises the output layer,
    which would make guided and unguided predictions identical)."""
    torch.manual_seed(0)
    network = build_network(TINY)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, std)
    return network


def tiny_calibration(**overrides) -> dict:
    settings = dict(cosine_threshold=0.999, max_divergence=(0.05, 0.05), guidance=2.0, forward_steps=40,
                    stride=10, encoding="ddim", early_stop=None, unhealthy_frequency=((0.999, 0.6), (1.0, 0.1)))
    settings.update(overrides)
    return Calibration(**settings).to_dict()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny model calibrated for the modes "fast", "full" and their DDPM twins (mechanics only)."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    calibration = {"fast": tiny_calibration(), "full": tiny_calibration(stride=1, forward_steps=12)}
    calibration |= {f"{mode}-ddpm": {**settings, "encoding": "ddpm"} for mode, settings in calibration.items()}
    save_checkpoint(path, TINY, tiny_network().state_dict(), ScheduleConfig().to_dict(),
                    {"data_description": "random weights (test)"}, calibration)
    return path


@pytest.fixture(scope="session")
def unhealthy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny network with a calibration that calls every slice unhealthy (non-empty masks)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "unhealthy.pt"
    calibration = {"fast": tiny_calibration(cosine_threshold=2.0),
                   "full": tiny_calibration(cosine_threshold=2.0, stride=1, forward_steps=12)}
    save_checkpoint(path, TINY, build_network(TINY).state_dict(), ScheduleConfig().to_dict(),
                    {"data_description": "random weights (test)"}, calibration)
    return path


def make_volume_pair(shape=(40, 44, 12), affine=None, seed=0, lesion=True) -> dict[str, nib.Nifti1Image]:
    """A blocky 'brain' with an optional bright FLAIR/T2 lesion, on a BraTS-like LPS affine."""
    rng = np.random.default_rng(seed)
    if affine is None:
        affine = np.diag([-4.0, -4.0, 5.0, 1.0])
    brain = np.zeros(shape, dtype=np.float32)
    brain[6:-6, 5:-5, 1:-1] = 1.0
    flair = brain * (100 + 10 * rng.random(shape, dtype=np.float32))
    t2 = brain * (80 + 10 * rng.random(shape, dtype=np.float32))
    if lesion:
        flair[15:25, 15:25, 4:8] *= 2.0
        t2[15:25, 15:25, 4:8] *= 2.0
    return {"flair": nib.Nifti1Image(flair, affine), "t2": nib.Nifti1Image(t2, affine)}


def check_label_values(labels: np.ndarray, report: dict) -> None:
    """The label map holds the values ``label_names`` names, no others (Slicer names its segments by it, in
    value order), a lesion is 2, "tumour (uncertain)", exactly when marking is on and its unhealthy
    probability is below 0.8, and 4 shows the periventricular findings the report lists."""
    present = set(np.unique(labels).tolist()) - {0}
    tumour = present - {4}  # 4: the periventricular findings left out of the tumour, shown apart
    names = {1: "tumour", 2: "tumour (uncertain)", 4: "periventricular finding (not tumour)"}
    assert report["label_names"] == {names[value]: value for value in [*sorted(tumour or {1}), *sorted(present & {4})]}
    assert {row["label"] for row in report["lesions"]} == tumour
    assert 4 not in present or report["periventricular_findings"]
    for row in report["lesions"]:
        uncertain = report["settings"]["mark_uncertain"] and row["unhealthy_probability"] < 0.8
        assert row["label"] == (2 if uncertain else 1), row


def datastore_state(studies: Path) -> dict[str, tuple[str, int]]:
    """Every file of the datastore: content hash and modification time."""
    return {str(p.relative_to(studies)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(studies.rglob("*")) if p.is_file() and p.name != ".lock"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, process: subprocess.Popen, name: str, log: Callable[[], str]) -> None:
    """Poll ``url`` (short request timeout) until it answers 200; an error with ``log``'s tail when ``process``
    exits first (a crash ends the wait at once) or the deadline passes."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=POLL_TIMEOUT_S).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout) as exc:
            last_error = exc
        try:  # between polls, wait for the process to die
            code = process.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"{name} exited with {code}:\n{log()[-4000:]}")
    raise TimeoutError(f"{name} not ready after {STARTUP_DEADLINE_S} s ({last_error}):\n{log()[-4000:]}")


class Server:
    """A shell command that starts ``monailabel start_server`` on ``port``; ``stop`` terminates, then kills.

    The shell activates the venv first, as the README does: monailabel's launcher runs the ``python`` on PATH.
    """

    def __init__(self, command: str, port: int, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "server.log"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
            "TMPDIR": str(workdir),  # results (label, anomaly map) and uploads land here, not in /tmp
            **(env or {}),
        }
        env.pop("MONAILABEL_PYEXE", None)
        with open(self.log_path, "w") as log:  # its own process group: stop reaches the server under the shell
            self.process = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=REPO, start_new_session=True)

    @classmethod
    def start(cls, studies: Path | str, model_path: Path, workdir: Path, env: dict[str, str] | None = None,
              conf: dict[str, str] | None = None) -> Server:
        """The README's start command on ``studies`` (a folder or a DICOMweb URL), serving ``model_path``;
        ``env``: extra environment variables (MONAI Label settings); ``conf``: more ``--conf`` settings of the app."""
        port = free_port()
        settings = [part for key, value in (conf or {}).items() for part in ("--conf", key, value)]
        arguments = ["--app", APP_DIR, "--studies", studies, "--conf", "model_path", model_path, *settings,
                     "--host", "127.0.0.1", "--port", port]
        return cls(f". {shlex.quote(str(ACTIVATE))} && monailabel start_server {shlex.join(map(str, arguments))}",
                   port, workdir, env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Poll ``/info/`` until it answers or the deadline passes."""
        wait_until_answering(f"{self.url}/info/", self.process, "server", self.log)

    def pause(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the server to exit (the pause between polls); an error with its log if it did."""
        try:
            code = self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return
        raise RuntimeError(f"server exited with {code}:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is not None:  # it exited already (a failed start): nothing to stop
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


PHANTOM_CENTRE = np.array([2.0, -12.0, 14.0])  # RAS mm
PHANTOM_RADII = np.array([52.0, 66.0, 42.0])  # mm: an ellipsoid 'brain' of 0.6 L


def rigid_ras(rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0), shift_mm=(0.0, 0.0, 0.0),
              centre: np.ndarray = PHANTOM_CENTRE) -> np.ndarray:
    """4 x 4 RAS matrix: rotations about the x, y, z axes through ``centre`` (degrees), then a shift (mm)."""
    rx, ry, rz = np.radians(rotation_deg)
    rotation = (np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
                @ np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
                @ np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]]))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre + np.asarray(shift_mm, dtype=float)
    return matrix


def phantom_grid(shape=(48, 56, 36), spacing=(3.0, 3.0, 3.0), tilt_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A NIfTI affine: an LPS-like grid (x towards the left) of ``spacing`` mm, axes rotated by ``tilt_deg``,
    centred on the phantom."""
    affine = rigid_ras(tilt_deg, centre=np.zeros(3)) @ np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = PHANTOM_CENTRE - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def make_phantom(sequence: str, shape=(48, 56, 36), affine=None, motion: np.ndarray | None = None) -> nib.Nifti1Image:
    """An analytic skull-stripped head sampled at the voxel centres of a grid: an ellipsoid brain with smooth
    texture, two ventricles (dark on FLAIR, bright on T2) and a lesion (bright on both).

    Defined in world (RAS mm) coordinates, so a volume on any grid is the same brain there. ``motion`` (4 x 4)
    maps each grid point to the phantom point sampled there: the head moved by its inverse.
    """
    affine = phantom_grid(shape) if affine is None else affine
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(affine if motion is None else motion @ affine, index)
    p = world - PHANTOM_CENTRE
    brain = ((p / PHANTOM_RADII) ** 2).sum(1) <= 1.0
    ventricles = [((p - [side * 11.0, 4.0, 6.0]) ** 2 / np.array([7.0, 22.0, 9.0]) ** 2).sum(1) <= 1.0
                  for side in (-1.0, 1.0)]
    lesion = np.linalg.norm(p - [24.0, 22.0, -8.0], axis=1) <= 11.0
    if sequence == "flair":
        value = 100.0 + 25.0 * np.sin(p[:, 0] / 9.0) * np.cos(p[:, 1] / 13.0) + 10.0 * np.sin(p[:, 2] / 7.0)
        value = np.where(ventricles[0] | ventricles[1], 25.0, value)
    else:
        value = 80.0 + 20.0 * np.cos(p[:, 0] / 11.0 + p[:, 2] / 8.0) + 10.0 * np.sin(p[:, 1] / 6.0)
        value = np.where(ventricles[0] | ventricles[1], 230.0, value)
    value = np.where(lesion, 210.0, value)
    data = np.where(brain, value, 0.0).astype(np.float32).reshape(shape)
    return nib.Nifti1Image(data, affine)
