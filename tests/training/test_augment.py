"""On-the-fly training augmentation (anofpdm.training.augment) and its use in training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anofpdm.training.augment import Augmentation, augment_batch
from anofpdm.training.trainer import train

from test_trainer import load_state, make_prepared, read_loss_csv, tiny_config


def brain_slices(n: int = 8, size: int = 32) -> torch.Tensor:
    """Slices in [-1, 1] with a background of exactly -1 around a textured 'brain'."""
    images = -torch.ones(n, 2, size, size)
    texture = torch.rand(n, 2, size // 2, size // 2, generator=torch.Generator().manual_seed(0))
    images[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = texture * 1.6 - 0.6
    return images


def draw(images: torch.Tensor, seed: int, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return augment_batch(images, generator, kwargs.pop("global_batch", len(images)), **kwargs)


def test_augmented_slices_stay_brain_on_background_and_vary() -> None:
    images = brain_slices()
    out = draw(images, 1)
    assert out.shape == images.shape and out.min() >= -1.0 and out.max() <= 1.0
    assert (out[:, :, :2, :2] == -1.0).all()  # the background far from the brain stays exactly -1
    assert torch.equal(out, draw(images, 1)) and not torch.equal(out, draw(images, 2))
    changed = (out - images).abs().flatten(1).mean(1)
    assert (changed > 0).sum() >= len(images) // 2  # most slices get some transform at probability 0.5


def test_no_transform_at_probability_zero_leaves_the_slices_as_they_are() -> None:
    images = brain_slices()
    assert torch.allclose(draw(images, 3, options=Augmentation(probability=0.0)), images, atol=1e-5)


def test_ranks_share_out_the_draws_of_the_global_batch() -> None:
    images = brain_slices()
    whole = draw(images, 4)
    halves = [draw(images[r * 4 : (r + 1) * 4], 4, global_batch=8, rank=r, world_size=2) for r in range(2)]
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)
    with pytest.raises(ValueError, match="not the global batch 6"):
        draw(images, 4, global_batch=6)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="probability"):
        Augmentation(probability=1.5)
    with pytest.raises(ValueError, match="gamma and blur_px"):
        Augmentation(gamma=(1.5, 0.7))
    with pytest.raises(ValueError, match="zoom"):
        Augmentation(zoom=1.0)


def test_augmented_training_resumes_exactly_and_differs_from_plain(tmp_path: Path) -> None:
    data = make_prepared(tmp_path / "data", size=16)
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    train(tiny_config(data, augment=True), straight, progress=False)
    train(tiny_config(data, augment=True, iterations=3), resumed, progress=False)
    train(tiny_config(data, augment=True), resumed, resume=True, progress=False)
    train(tiny_config(data), plain, progress=False)
    assert [r["loss"] for r in read_loss_csv(resumed)] == [r["loss"] for r in read_loss_csv(straight)]
    assert [r["loss"] for r in read_loss_csv(plain)] != [r["loss"] for r in read_loss_csv(straight)]
    for name, tensor in load_state(straight)["ema"].items():
        assert torch.equal(load_state(resumed)["ema"][name], tensor)
    with pytest.raises(ValueError, match="augment: run has True, now False"):
        train(tiny_config(data), resumed, resume=True, progress=False)
