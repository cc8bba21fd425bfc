"""Intensity normalisation: percentile scaling and histogram standardisation (anofpdm.volumes.intensity)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from anofpdm.volumes.intensity import (
    LANDMARK_PERCENTILES,
    brain_landmarks,
    normalise,
    percentile_normalise,
    standardise,
)
from anofpdm.method.model import NetworkConfig
from anofpdm.training.config import TrainConfig, resolve_network
from anofpdm.volumes.slicing import to_model_slices

from conftest import make_volume_pair


def tissue_volume(seed: int = 0, gamma: float = 1.0, gain: float = 100.0) -> np.ndarray:
    """A 'brain' of three tissue classes with noise, background 0; ``gamma`` changes its contrast."""
    rng = np.random.default_rng(seed)
    volume = np.zeros((30, 30, 20), np.float32)
    tissue = rng.choice([0.3, 0.6, 0.8], size=(20, 20, 12), p=[0.2, 0.4, 0.4]) + rng.normal(0, 0.03, (20, 20, 12))
    volume[5:25, 5:25, 4:16] = gain * np.clip(tissue, 0.05, None) ** gamma
    return volume


def test_percentile_scaling_and_the_paper_normalisation() -> None:
    volume = tissue_volume()
    scaled = percentile_normalise(volume)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert np.mean(scaled[volume > 0] >= 1.0) == pytest.approx(0.01, 0.5)
    paper = normalise(volume)  # no landmarks: the paper's [-1, 1] with background -1
    assert np.allclose(paper, scaled * 2 - 1) and (paper[volume == 0] == -1).all()
    with pytest.raises(ValueError, match="no positive"):
        percentile_normalise(np.zeros((4, 4, 4)))


def test_standardisation_moves_the_landmarks_onto_the_reference_and_keeps_order() -> None:
    reference = brain_landmarks(percentile_normalise(tissue_volume(0)))
    other = percentile_normalise(tissue_volume(1, gamma=1.8, gain=3000.0))  # another scanner's contrast and scale
    assert np.abs(brain_landmarks(other) - reference).max() > 0.1
    out = standardise(other, reference)
    assert np.allclose(brain_landmarks(out), reference, atol=0.01)
    brain = other > 0
    assert (out[~brain] == 0).all() and (out[brain] > 0).all() and out.max() <= 1.0
    order = np.argsort(other[brain], kind="stable")
    assert (np.diff(out[brain][order]) >= -1e-6).all()  # monotonic: no intensity overtakes another
    # a volume already at the reference is left as it is
    same = percentile_normalise(tissue_volume(0))
    assert np.allclose(standardise(same, reference), same, atol=1e-5)


def test_a_bright_lesion_above_the_landmarks_keeps_its_contrast() -> None:
    volume = tissue_volume(2)
    volume[10:14, 10:14, 8:11] = 140.0  # brighter than all tissue, above the top landmark
    scaled = percentile_normalise(volume)
    reference = brain_landmarks(scaled) * 0.9  # a darker reference: everything moves down
    out = standardise(scaled, reference)
    lesion, tissue = out[10:14, 10:14, 8:11].mean(), np.median(out[volume > 0])
    assert lesion > tissue + 0.25  # still far above the tissue around it, not clipped onto it


def test_bad_references_are_refused() -> None:
    scaled = percentile_normalise(tissue_volume())
    with pytest.raises(ValueError, match=f"{len(LANDMARK_PERCENTILES)} increasing landmarks"):
        standardise(scaled, [0.5, 0.4, 0.6, 0.7, 0.8])
    with pytest.raises(ValueError, match="increasing landmarks"):
        standardise(scaled, [0.1, 0.2])


def test_model_slices_use_the_landmarks_and_models_carry_them() -> None:
    images = make_volume_pair()
    plain, _, _ = to_model_slices(images, ("flair", "t2"), 16, 240.0)
    landmarks = {"flair": (0.2, 0.3, 0.4, 0.5, 0.6), "t2": (0.3, 0.4, 0.5, 0.6, 0.7)}
    standard, _, _ = to_model_slices(images, ("flair", "t2"), 16, 240.0, landmarks=landmarks)
    assert not np.allclose(plain, standard) and np.array_equal(plain == -1, standard == -1)
    config = NetworkConfig(intensity_landmarks=(landmarks["flair"], landmarks["t2"]))
    assert config.landmarks == landmarks and NetworkConfig.from_dict(config.to_dict()) == config
    assert "intensity_landmarks" not in NetworkConfig().to_dict()  # as checkpoints saved before landmarks
    with pytest.raises(ValueError, match="one row per sequence"):
        NetworkConfig(intensity_landmarks=(landmarks["flair"],))
    # training takes the prepared data's landmarks into the model, for the sequences it trains on
    manifest = {"sequences": ["flair", "t1", "t2"], "size": 64,
                "intensity_landmarks": {**landmarks, "t1": (0.1, 0.2, 0.3, 0.4, 0.5)}}
    network = resolve_network(TrainConfig(data="unused", iterations=1), manifest)
    assert network.landmarks == landmarks
    assert resolve_network(TrainConfig(data="unused", iterations=1), {**manifest, "intensity_landmarks": None}) \
        == replace(network, intensity_landmarks=())
