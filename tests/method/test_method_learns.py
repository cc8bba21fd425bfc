"""The method end to end on a problem a CPU learns in a minute: train with image-level labels only, calibrate
on validation slices, then check on held-out slices that the verdict and the anomaly map find the anomalies.

Slices are textured ellipses ("brains"); an unhealthy slice carries a bright disc ("tumour") at a random
place. No pixel label is used until scoring. Elsewhere the suite checks that the method runs as specified;
here it has to work: a model trained by `anofpdm.training.trainer` must give verdicts and anomaly maps that find the
discs (the real synthetic brains need far longer training, see docs/training.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from anofpdm.method.calibration import calibrate_mode
from anofpdm.method.forward_process import ForwardProcessConfig, run_on_slices
from anofpdm.method.model import HEALTHY, UNHEALTHY, NetworkConfig, load_model
from anofpdm.training.trainer import train
from anofpdm.training.config import TrainConfig

SIZE = 32
NETWORK = NetworkConfig(sequences=("flair", "t2"), image_size=SIZE, channels=(16, 32), attention_levels=(False, False),
                        num_res_blocks=1, num_head_channels=32, norm_num_groups=8)
FORWARD = ForwardProcessConfig(guidance=2.0, forward_steps=600, stride=30)
BACKGROUND = -1.0


def toy_slices(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images count x 2 x S x S in [-1, 1], labels (every other slice unhealthy) and disc masks."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    y, x = rows / (SIZE - 1) * 2 - 1, cols / (SIZE - 1) * 2 - 1
    images = np.full((count, 2, SIZE, SIZE), BACKGROUND, np.float32)
    masks = np.zeros((count, SIZE, SIZE), bool)
    labels = np.tile([HEALTHY, UNHEALTHY], count // 2).astype(np.uint8)
    for i in range(count):
        a, b = rng.uniform(0.6, 0.9, 2)
        brain = (x / a) ** 2 + (y / b) ** 2 < 1
        texture = F.interpolate(torch.randn(1, 2, 4, 4), size=(SIZE, SIZE), mode="bilinear", align_corners=True)[0]
        images[i][:, brain] = (np.array([0.0, -0.2])[:, None] + 0.15 * texture.numpy()[:, brain])
        if labels[i] == UNHEALTHY:
            radius, (cy, cx) = rng.uniform(2.5, 5.0), rng.uniform(0.3, 0.7, 2) * SIZE
            disc = ((rows - cy) ** 2 + (cols - cx) ** 2 < radius**2) & brain
            images[i][:, disc] = np.array([0.8, 0.7])[:, None]
            masks[i] = disc
    return images, labels, masks


def write_prepared(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    root.mkdir(parents=True)
    np.save(root / "train_images.npy", images.astype(np.float16))
    np.save(root / "train_labels.npy", labels)
    split = {"cases": ["toy"], "slices": len(labels), "healthy": int((labels == 0).sum()),
             "unhealthy": int((labels == 1).sum())}
    (root / "manifest.json").write_text(json.dumps({"sequences": ["flair", "t2"], "size": SIZE,
                                                    "splits": {"train": split}}))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Train a few hundred iterations on toy slices with image-level labels, calibrate, run on held-out slices."""
    root = tmp_path_factory.mktemp("toy")
    images, labels, _ = toy_slices(2000, seed=0)
    config = TrainConfig(data=write_prepared(root / "slices", images, labels), iterations=400, network=NETWORK,
                         batch_size=32, lr=1e-3, ema_decay=0.98, checkpoint_every=400, seed=0)
    model = load_model(train(config, root / "run", progress=False))
    val_images, val_labels, _ = toy_slices(48, seed=1)
    calibration = calibrate_mode(model, torch.from_numpy(val_images), val_labels, FORWARD, batch_size=48)
    test_images, test_labels, test_masks = toy_slices(48, seed=2)
    stats = run_on_slices(model, test_images, FORWARD, batch_size=48)
    return calibration, stats, test_images, test_labels, test_masks


def test_calibrated_verdict_separates_unhealthy_slices(trained):
    calibration, stats, _, labels, _ = trained
    assert calibration.validation["accuracy"] >= 0.9
    called_unhealthy = (stats.scores <= calibration.cosine_threshold).numpy()
    assert (called_unhealthy == labels.astype(bool)).mean() >= 0.9


def test_anomaly_map_finds_the_discs(trained):
    _, stats, images, labels, masks = trained
    unhealthy = labels == UNHEALTHY
    brain = images[:, 0] > BACKGROUND
    anomaly = stats.anomaly_maps.mean(dim=1).numpy()
    truth, scores = masks[unhealthy][brain[unhealthy]], anomaly[unhealthy][brain[unhealthy]]
    assert truth.mean() < 0.2 and average_precision_score(truth, scores) >= 0.8


def test_unhealthy_probability_from_validation_holds_on_held_out_slices(trained):
    calibration, stats, _, labels, _ = trained
    probability = calibration.unhealthy_probability(stats.scores).numpy()
    brier = ((probability - labels) ** 2).mean()
    assert brier <= 0.1  # 0.25 for a constant 0.5; the toy classes separate, so the fractions should be near 0 or 1
