"""The streaming forward process against a brute-force implementation that stores every step."""

from __future__ import annotations

import gc
import threading
from dataclasses import replace

import pytest
import torch

from anofpdm.method.diffusion import NoiseSchedule, slice_noise_seed
from anofpdm.method.decisions import cosine_scores
from anofpdm.method.forward_process import ForwardProcessConfig, chunk_workers, run_forward_process, run_on_slices
from anofpdm.method.model import HEALTHY, NULL_LABEL, load_model

from conftest import tiny_network

MAPS = [0, 1]


class CountingNetwork(torch.nn.Module):
    """Wraps a network; counts calls and single-slice evaluations and checks the labels it gets."""

    def __init__(self, network: torch.nn.Module, measure_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.network = network
        self.calls = 0
        self.evaluations = 0
        self.measure_at = measure_at
        self.live_tensor_bytes: list[int] = []

    def forward(self, x, timesteps, class_labels):
        self.calls += 1
        self.evaluations += x.shape[0]
        if self.calls in self.measure_at:
            self.live_tensor_bytes.append(_live_tensor_bytes())
        return self.network(x, timesteps, class_labels=class_labels)


def _live_tensor_bytes() -> int:
    return sum(o.numel() * o.element_size() for o in gc.get_objects() if torch.is_tensor(o))


@pytest.fixture(scope="module")
def network():
    return tiny_network().eval()


def brute_force(network, x0, schedule, config):
    """docs/method.md sections 3-4 done naively: keep every step's predictions, then decide."""
    steps = config.visited_steps
    b = x0.shape[0]
    # slice i draws from its own generator (SliceNoise)
    generators = [torch.Generator().manual_seed(slice_noise_seed(config.seed, i)) for i in range(b)]
    noise = lambda: torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])  # noqa: E731
    z = schedule.add_noise(x0, noise(), steps[0])
    guided_all, reference_all = [], []
    with torch.no_grad():
        for i, t in enumerate(steps):
            if config.encoding == "ddpm" and i:
                z = schedule.add_noise(x0, noise(), t)
            tt = torch.full((b,), t)
            eps_h = network(z, tt, class_labels=torch.full((b,), HEALTHY))
            eps_n = network(z, tt, class_labels=torch.full((b,), NULL_LABEL))
            eps_g = (1 + config.guidance) * eps_h - config.guidance * eps_n
            guided_all.append(schedule.predict_x0(z, eps_g, t).clamp(-1, 1))
            reference_all.append(schedule.predict_x0(z, eps_n, t).clamp(-1, 1))
            if config.encoding == "ddim" and i + 1 < len(steps):
                x0_hat = (z - (1 - schedule.alpha_bar[t]).sqrt().float() * eps_n) / schedule.alpha_bar[t].sqrt().float()
                ab_next = schedule.alpha_bar[steps[i + 1]].float()
                z = ab_next.sqrt() * x0_hat + (1 - ab_next).sqrt() * eps_n
    xh, xr = torch.stack(guided_all), torch.stack(reference_all)  # K x B x C x H x W
    errors = (xh - x0) ** 2
    divergence = ((xh - xr) ** 2).mean(dim=(3, 4))  # K x B x C
    t_index = divergence.argmax(dim=0)  # B x C
    maps, end_step_maps = torch.zeros_like(x0), torch.zeros_like(x0)
    for bi in range(b):
        for m in MAPS:
            k = int(t_index[bi, m])
            maps[bi, m] = errors[k, bi, m] if k == 0 else errors[:k, bi, m].mean(dim=0)
            end_step_maps[bi, m] = errors[k, bi, m]
    return {
        "anomaly_maps": maps,
        "end_step_maps": end_step_maps,
        "end_steps": torch.tensor(steps)[t_index],
        "max_divergence": divergence.max(dim=0).values,
        "mse_guided": errors.mean(dim=(2, 3, 4)).T,
        "mse_reference": ((xr - x0) ** 2).mean(dim=(2, 3, 4)).T,
        "divergence": divergence.permute(1, 2, 0),
    }


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
def test_streaming_equals_brute_force(network, encoding):
    x0 = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    schedule = NoiseSchedule()
    config = ForwardProcessConfig(guidance=2.0, forward_steps=300, stride=50, encoding=encoding, seed=3)
    result = run_forward_process(network, x0, schedule, config, MAPS)
    expected = brute_force(network, x0, schedule, config)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(result, name), value, atol=1e-5, rtol=1e-4, msg=name)
    assert result.visited_steps == list(range(0, 300, 50))
    # the end steps are not all the first step: the test exercises the "mean before t_e" branch
    assert (result.end_steps > 0).any()


def test_exactly_two_evaluations_per_step_in_one_call(network):
    counter = CountingNetwork(network)
    x0 = torch.zeros(5, 2, 16, 16)
    config = ForwardProcessConfig(forward_steps=70, stride=10)
    result = run_forward_process(counter, x0, NoiseSchedule(), config, MAPS)
    assert counter.calls == 7
    assert counter.evaluations == 2 * 5 * 7 == result.network_evaluations


def test_memory_does_not_grow_with_steps(network):
    """Live tensor bytes at the last step exceed those at the second by no more than the scalar curves."""
    steps = 20
    counter = CountingNetwork(network, measure_at=(2, steps))
    x0 = torch.rand(4, 2, 16, 16) * 2 - 1
    run_forward_process(counter, x0, NoiseSchedule(), ForwardProcessConfig(forward_steps=steps), MAPS)
    growth = counter.live_tensor_bytes[1] - counter.live_tensor_bytes[0]
    one_map = x0.numel() * x0.element_size()
    # per step only B + B + B x M floats of curves are kept (plus tensor headers, counted as 0)
    assert growth <= steps * (4 + 4 + 8) * 4
    assert growth < one_map


def test_ddim_is_deterministic_for_a_seed_and_differs_across_seeds(network):
    x0 = torch.rand(2, 2, 16, 16) * 2 - 1
    run = lambda seed: run_forward_process(  # noqa: E731
        network, x0, NoiseSchedule(), ForwardProcessConfig(forward_steps=30, stride=10, seed=seed), MAPS
    )
    torch.testing.assert_close(run(0).anomaly_maps, run(0).anomaly_maps, atol=0, rtol=0)
    assert not torch.equal(run(0).anomaly_maps, run(1).anomaly_maps)


class ScriptedDivergence(torch.nn.Module):
    """Predicts noise so that the guided-vs-reference divergence rises then falls (peak at call 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.call = 0

    def forward(self, x, timesteps, class_labels):
        out = torch.zeros_like(x)
        half = x.shape[0] // 2
        out[:half] = [0.0, 0.1, 0.3, 0.5, 0.2, 0.1, 0.05, 0.0, 0.0, 0.0][self.call]
        self.call += 1
        return out


def test_early_stop_after_the_peak():
    config = ForwardProcessConfig(forward_steps=100, stride=10, early_stop=2, guidance=1.0)
    result = run_forward_process(ScriptedDivergence(), torch.zeros(1, 2, 8, 8), NoiseSchedule(), config, MAPS)
    assert result.end_steps.tolist() == [[30, 30]]
    assert result.visited_steps == [0, 10, 20, 30, 40, 50]


def test_invalid_config_and_inputs(network):
    with pytest.raises(ValueError, match="encoding"):
        ForwardProcessConfig(encoding="euler")
    with pytest.raises(ValueError, match="stride"):
        ForwardProcessConfig(stride=0)
    with pytest.raises(ValueError, match="exceeds"):
        too_long = ForwardProcessConfig(forward_steps=1001)
        run_forward_process(network, torch.zeros(1, 2, 16, 16), NoiseSchedule(), too_long, MAPS)
    with pytest.raises(ValueError, match="B x C x H x W"):
        run_forward_process(network, torch.zeros(2, 16, 16), NoiseSchedule(), ForwardProcessConfig(), MAPS)


@pytest.mark.parametrize("encoding", ["ddim", "ddpm"])
def test_a_slice_result_depends_on_the_slice_not_on_its_batch(network, encoding):
    """Each slice stops early on its own and draws its own noise: alone or in any batch, the same result."""
    scales = torch.linspace(0.05, 1, 6)[:, None, None, None]  # slices whose divergence peaks at different steps
    x0 = (torch.rand(6, 2, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1) * scales
    config = ForwardProcessConfig(forward_steps=400, stride=20, early_stop=1, encoding=encoding, seed=3)
    alone = [run_forward_process(network, x0[i : i + 1], NoiseSchedule(), config, MAPS, slice_indices=[i])
             for i in range(6)]
    together = run_forward_process(network, x0, NoiseSchedule(), config, MAPS)
    stopped_after = [len(result.visited_steps) for result in alone]
    assert len(set(stopped_after)) > 1  # the slices do stop at different steps
    assert len(together.visited_steps) == max(stopped_after)  # the batch runs until its last slice stops
    assert together.network_evaluations == 2 * sum(stopped_after)  # but a stopped slice is not evaluated again
    for name in ("anomaly_maps", "end_step_maps", "end_steps", "max_divergence"):
        torch.testing.assert_close(getattr(together, name), torch.cat([getattr(r, name) for r in alone]), msg=name)
    scores_alone = torch.cat([cosine_scores(r.mse_guided, r.mse_reference) for r in alone])
    torch.testing.assert_close(cosine_scores(together.mse_guided, together.mse_reference), scores_alone)
    # a stopped slice's curves are zero from its stop on
    first = stopped_after.index(min(stopped_after))
    assert together.mse_guided[first, min(stopped_after):].eq(0).all()
    assert together.mse_guided[first, : min(stopped_after)].gt(0).all()


def test_chunked_runner_gives_each_slice_its_own_result_whatever_the_batch_size(tiny_model_path):
    model = load_model(tiny_model_path)
    slices = (torch.rand(5, 2, 16, 16) * 2 - 1) * torch.linspace(0.1, 1, 5)[:, None, None, None]
    config = ForwardProcessConfig(forward_steps=200, stride=20, seed=3, early_stop=1)
    by_batch = {size: run_on_slices(model, slices, config, batch_size=size) for size in (1, 2, 5)}
    assert by_batch[2].anomaly_maps.shape == (5, 2, 16, 16) and by_batch[2].scores.shape == (5,)
    for size in (1, 2):
        for name in ("scores", "anomaly_maps", "end_steps", "max_divergence"):
            torch.testing.assert_close(getattr(by_batch[size], name), getattr(by_batch[5], name), msg=(size, name))
    different_seed = run_on_slices(model, slices, replace(config, seed=4), batch_size=5)
    assert not torch.allclose(different_seed.anomaly_maps, by_batch[5].anomaly_maps)
    with pytest.raises(ValueError, match="batch_size"):
        run_on_slices(model, slices, config, batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        ForwardProcessConfig(seed=-1)


def test_bf16_autocast_changes_precision_not_results(tiny_model_path):
    """bfloat16 network evaluations (the GPU speed option) give nearly the float32 maps and scores."""
    model = load_model(tiny_model_path)
    slices = torch.rand(3, 2, 16, 16) * 2 - 1
    config = ForwardProcessConfig(forward_steps=40, stride=10)
    fp32 = run_on_slices(model, slices, config, batch_size=3)
    bf16 = run_on_slices(model, slices, config, batch_size=3, bf16=True)
    assert bf16.anomaly_maps.dtype == torch.float32
    assert not torch.equal(bf16.anomaly_maps, fp32.anomaly_maps)  # it did run in lower precision
    torch.testing.assert_close(bf16.anomaly_maps, fp32.anomaly_maps, rtol=0.1, atol=0.02)
    torch.testing.assert_close(bf16.scores, fp32.scores, rtol=0.02, atol=0.02)


class FirstCallWaitsForAnotherThread(torch.nn.Module):
    """A network whose first call on each thread waits (up to 30 s) for a first call on a second thread: a run
    fails with ``BrokenBarrierError`` unless two threads are in the network at once (a wrapper, as a traced network
    takes no hooks)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.both_running = threading.Barrier(2, timeout=30)
        self.called = threading.local()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if not getattr(self.called, "before", False):
            self.called.before = True
            self.both_running.wait()
        return self.network(*args, **kwargs)


def test_on_a_cpu_with_two_threads_two_chunks_run_at_once_with_the_same_results(tiny_model_path):
    model = load_model(tiny_model_path)
    slices = (torch.rand(7, 2, 16, 16) * 2 - 1) * torch.linspace(0.1, 1, 7)[:, None, None, None]
    config = ForwardProcessConfig(forward_steps=120, stride=20, seed=2)
    one_at_a_time = run_on_slices(model, slices, config, batch_size=2)  # the session's one torch thread: in turn
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert chunk_workers(model.device, 4) == 2 and chunk_workers(model.device, 1) == 1
        assert chunk_workers(torch.device("cuda"), 4) == 1  # a GPU runs its chunks in turn
        progress, seen = [], set()
        bf16_seen = []
        def report(done: int, total: int) -> None:
            progress.append((done, total))
            seen.add(threading.get_ident())
            bf16_seen.append(torch.is_autocast_enabled('cpu'))

        waiting = replace(model, network=FirstCallWaitsForAnotherThread(model.network))
        at_once = run_on_slices(waiting, slices, config, batch_size=2, progress=report)
        workers_at_once = set(seen)  # the bf16 run's pool has threads of its own (their ids may be new or reused)
        assert torch.get_num_threads() == 2  # restored after the workers' one thread each
        run_on_slices(model, slices, config, batch_size=2, progress=report, bf16=True)
    finally:
        torch.set_num_threads(threads)
    assert len(workers_at_once) == 2  # two worker threads did the chunks, at once (FirstCallWaitsForAnotherThread)
    assert [done for done, _ in progress[:24]] == list(range(1, 25)) and progress[23][1] == 4 * 6  # 4 chunks x 6
    assert not any(bf16_seen[:24]) and all(bf16_seen[24:])  # autocast reaches the worker threads
    for name in ("scores", "anomaly_maps", "end_steps", "max_divergence"):
        torch.testing.assert_close(getattr(at_once, name), getattr(one_at_a_time, name), msg=name)
    assert at_once.network_evaluations == one_at_a_time.network_evaluations == 2 * 7 * 6
