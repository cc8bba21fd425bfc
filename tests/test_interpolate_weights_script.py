"""``scripts/interpolate_weights.py``: a model between two exported models of the same network."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from anofpdm.method.diffusion import ScheduleConfig
from anofpdm.method.model import build_network, load_checkpoint, save_checkpoint, weights_fingerprint
from conftest import TINY, tiny_network

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "interpolate_weights.py"


def run_script(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "lib"), os.environ.get("PYTHONPATH", ""))
                                                        if p)}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_interpolation_lies_between_the_models_and_keeps_the_ends_config(tiny_model_path: Path, tmp_path: Path) -> None:
    end_config = replace(TINY, intensity_landmarks=((0.0, 1.0, 2.0, 3.0, 4.0), (0.0, 1.0, 2.0, 3.0, 5.0)))
    end_weights = tiny_network(std=0.3).state_dict()
    save_checkpoint(tmp_path / "end.pt", end_config, end_weights, ScheduleConfig().to_dict(), {"iterations": 7})
    start = load_checkpoint(tiny_model_path)
    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"mix_{alpha}.pt"
        done = run_script("--start", tiny_model_path, "--end", tmp_path / "end.pt", "--alpha", alpha, "--out", out)
        assert done.returncode == 0, done.stderr
        mixed = load_checkpoint(out)
        for name, tensor in mixed["state_dict"].items():
            expected = (1 - alpha) * start["state_dict"][name].double() + alpha * end_weights[name].double()
            torch.testing.assert_close(tensor, expected.to(tensor.dtype))
        assert mixed["network"] == end_config.to_dict() and mixed["calibration"] is None
        assert mixed["training"]["iterations"] == 7
        assert mixed["training"]["interpolation"] == {"start": weights_fingerprint(start["state_dict"]),
                                                      "end": weights_fingerprint(end_weights), "alpha": alpha}


def test_other_networks_and_alphas_outside_0_1_are_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    wider = replace(TINY, channels=(16, 32))
    save_checkpoint(tmp_path / "wider.pt", wider, build_network(wider).state_dict(), ScheduleConfig().to_dict())
    done = run_script("--start", tiny_model_path, "--end", tmp_path / "wider.pt", "--alpha", 0.5,
                      "--out", tmp_path / "out.pt")
    assert done.returncode == 2 and "not the same network" in done.stderr
    done = run_script("--start", tiny_model_path, "--end", tiny_model_path, "--alpha", 1.5, "--out", tmp_path / "o.pt")
    assert done.returncode == 2 and "--alpha must lie in [0, 1]" in done.stderr
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "o.pt").exists()
