"""``scripts/train_demo_model.sh``, the one command that makes the demo model (and the core of the GPU lease),
run end to end on a tiny setting: synthetic cases -> slices -> training -> calibration -> evaluation, then a
second session that skips the data and resumes the training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from anofpdm.method.model import load_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_demo_model.sh"
METHODS = ("anofpdm-ddim-fast", "flair-threshold")


def run_script(work: Path, **settings: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "lib"), os.environ.get("PYTHONPATH", "")) if p),
        "ANOFPDM": f"{sys.executable} -m anofpdm.cli",
        "WORK": str(work), "CASES": "6", "SIZE": "16", "WORKERS": "2", "ITERATIONS": "3", "BATCH": "4",
        "CHECKPOINT_EVERY": "3", "CALIBRATION_MODES": "fast", "CALIBRATION_SLICES": "60", "INFER_BATCH": "16",
        "EVAL_CASES": "1", "EVAL_METHODS": ",".join(METHODS), "SHIFTED_CASES": "1",
        "SHIFTED_METHODS": ",".join(METHODS),
        **settings,
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)


def test_demo_script_makes_a_calibrated_evaluated_model_and_resumes(tmp_path: Path) -> None:
    first = run_script(tmp_path, BENIGN_FINDINGS="clinical")
    assert first.returncode == 0, first.stderr[-3000:]
    model = load_model(tmp_path / "anofpdm.pt")
    assert model.training["iterations"] == 3 and model.config.image_size == 16
    assert model.calibration is not None and set(model.calibration) == {"fast"}
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert set(results["summary"]) == set(METHODS) and len(results["cases"]) == 1
    assert (tmp_path / "evaluation" / "results.md").is_file()
    # training cases with the clinical benign findings (labelled healthy), as BENIGN_FINDINGS asked
    assert json.loads((tmp_path / "cases" / "manifest.json").read_text())["benign_findings"] == "clinical"
    # augmented training on histogram-standardised slices, the model carrying their landmarks
    assert model.training["augment"] is True and model.config.landmarks is not None
    # and the shifted domain's test case, on its own grid, beside the in-domain evaluation
    shifted = json.loads((tmp_path / "evaluation_shifted" / "results.json").read_text())
    assert set(shifted["summary"]) == set(METHODS) and len(shifted["cases"]) == 1
    assert json.loads((tmp_path / "shifted" / "manifest.json").read_text())["domain"]["name"] == "shifted"

    # a later session, a longer run ending in a learning-rate decay, validated every iteration from now on
    second = run_script(tmp_path, ITERATIONS="5", LR_DECAY_FROM="4", VALIDATE_EVERY="1", STAGES="data,train")
    assert second.returncode == 0, second.stderr[-3000:]
    assert " synth " not in second.stderr and " prepare " not in second.stderr  # the data exist: not remade
    assert "iterations 3 -> 5" in second.stderr
    record = load_model(tmp_path / "run" / "model.pt").training
    assert record["iterations"] == 5 and record["lr_decay_from"] == 4
    logged = [line.split(",")[0] for line in (tmp_path / "run" / "validation.csv").read_text().split()[1:]]
    assert logged == ["4", "5"]
    assert load_model(tmp_path / "run" / "best.pt").training["iterations"] in (4, 5)


def test_demo_script_rejects_an_unknown_stage(tmp_path: Path) -> None:
    finished = run_script(tmp_path, STAGES="data,trian")
    assert finished.returncode == 2 and "unknown stage 'trian'" in finished.stderr
    assert not any(tmp_path.iterdir())  # nothing was started
