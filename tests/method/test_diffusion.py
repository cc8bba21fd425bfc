"""The schedule's closed forms and DDIM inversion (docs/method.md sections 2-3)."""

import numpy as np
import pytest
import torch

from anofpdm.method.diffusion import NoiseSchedule, ScheduleConfig


def reference_alpha_bar() -> np.ndarray:
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def test_alpha_bar_is_the_linear_schedule_product():
    schedule = NoiseSchedule()
    np.testing.assert_allclose(schedule.alpha_bar.numpy(), reference_alpha_bar(), rtol=1e-6)


def test_alpha_bar_is_monais_linear_beta_schedule_exactly():
    from monai.networks.schedulers import DDPMScheduler

    config = ScheduleConfig(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    assert torch.equal(NoiseSchedule(config).alpha_bar, monai.alphas_cumprod.double())


def test_add_noise_and_predict_x0_match_closed_forms():
    schedule = NoiseSchedule()
    x0, noise = torch.rand(3, 2, 8, 8) * 2 - 1, torch.randn(3, 2, 8, 8)
    t = torch.tensor([0, 250, 999])
    ab = torch.tensor(reference_alpha_bar()[[0, 250, 999]], dtype=torch.float32).view(3, 1, 1, 1)
    z = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(z, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(schedule.predict_x0(z, noise, t), x0, atol=2e-4, rtol=1e-4)


def test_timestep_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="timestep out of range"):
        NoiseSchedule().add_noise(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 1000)


def test_invalid_schedule_config():
    with pytest.raises(ValueError, match="beta_start"):
        ScheduleConfig(beta_start=0.1, beta_end=0.01)


def test_ddim_encode_then_decode_recovers_input_with_an_exact_noise_oracle():
    """With the true noise as the prediction, DDIM inversion and decoding are exact inverses."""
    schedule = NoiseSchedule()
    x0 = torch.rand(2, 2, 8, 8, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)

    def oracle(z, t):  # the noise that explains z at level t given the true x0
        ab = schedule.alpha_bar[t]
        return (z - ab.sqrt() * x0) / (1 - ab).sqrt()

    steps = list(range(0, 600, 37))
    z = schedule.add_noise(x0, noise, steps[0])
    for t, t_next in zip(steps, steps[1:]):
        z = schedule.ddim_step(z, oracle(z, t), t, t_next)
    torch.testing.assert_close(z, schedule.add_noise(x0, noise, steps[-1]))
    for t, t_prev in zip(reversed(steps), list(reversed(steps))[1:]):
        z = schedule.ddim_step(z, oracle(z, t), t, t_prev)
    recovered = schedule.predict_x0(z, oracle(z, steps[0]), steps[0])
    torch.testing.assert_close(recovered, x0)
