"""Training: exact resume, export, learning, label dropout, config errors and two-rank DDP on CPU."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anofpdm.cli import main as cli_main
from anofpdm.method.model import HEALTHY, NULL_LABEL, UNHEALTHY, load_model, save_checkpoint
from anofpdm.training.stop_request import TrainingInterrupted
from anofpdm.training.trainer import train
from anofpdm.training.config import TrainConfig
from anofpdm.training.sampling import GlobalBatchSampler, draw_diffusion_inputs

from conftest import TINY

PREPARED_SEQUENCES = ("flair", "t1", "t2")  # one more than the network uses: exercises channel selection
LIB = Path(__file__).resolve().parents[2] / "lib"


def make_prepared(root: Path, count: int = 8, size: int = 16, constant: float | None = None) -> Path:
    """A prepared folder like ``prepare_dataset``'s: random (or constant) images in [-1, 1], alternating labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (count, len(PREPARED_SEQUENCES), size, size)
    images = np.full(shape, constant, np.float32) if constant is not None else rng.uniform(-1, 1, shape)
    labels = np.array([HEALTHY, UNHEALTHY] * (count // 2), dtype=np.uint8)
    np.save(root / "train_images.npy", images.astype(np.float16))
    np.save(root / "train_labels.npy", labels)
    train_split = {"cases": ["case-a", "case-b"], "slices": count, "healthy": count // 2, "unhealthy": count // 2}
    manifest = {"sequences": list(PREPARED_SEQUENCES), "size": size, "splits": {"train": train_split}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def tiny_config(data: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=data, iterations=6, network=TINY, batch_size=4, lr=1e-3, ema_decay=0.1, checkpoint_every=4, log_every=1
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def read_loss_csv(run_dir: Path) -> list[dict[str, float]]:
    """The loss log, its iterations required to be written as integers (``int("3.0")`` fails)."""
    with (run_dir / "loss.csv").open(newline="") as f:
        return [{k: int(v) if k == "iteration" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "state.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def straight_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six iterations in one go."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(tiny_config(data), run_dir, progress=False)
    return run_dir


def test_stop_and_resume_reaches_the_same_weights(data: Path, straight_run: Path, tmp_path: Path) -> None:
    def terminate_after_two(iteration: int) -> None:
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the end of the next iteration

    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_config(data), tmp_path, progress=False, on_iteration=terminate_after_two)
    assert stopped.value.iteration == 3
    assert load_state(tmp_path)["iteration"] == 3
    log = tmp_path / "loss.csv"  # as a resume before the fix left it: iteration 1 written as "1.0"
    header, first, *rest = log.read_text().splitlines(keepends=True)
    log.write_text("".join([header, first.replace("1,", "1.0,", 1), *rest]))

    train(tiny_config(data), tmp_path, resume=True, progress=False)
    resumed, straight = load_state(tmp_path), load_state(straight_run)
    assert resumed["iteration"] == straight["iteration"] == 6
    for part in ("model", "ema"):
        assert resumed[part].keys() == straight[part].keys()
        for name, tensor in straight[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}.{name} differs after resume"
    assert any(not torch.equal(t, straight["ema"][name]) for name, t in straight["model"].items())  # EMA lags
    # the same losses at every iteration, each logged once
    resumed_rows, straight_rows = read_loss_csv(tmp_path), read_loss_csv(straight_run)
    assert [row["iteration"] for row in resumed_rows] == [1, 2, 3, 4, 5, 6]
    for column in ("loss", "smoothed_loss"):
        assert [row[column] for row in resumed_rows] == [row[column] for row in straight_rows]


def test_time_limit_stops_saved_and_the_run_resumes_exactly(data: Path, straight_run: Path, tmp_path: Path) -> None:
    """A job's wall-time budget: the run stops without error after the iteration that exhausts it."""
    model = train(tiny_config(data), tmp_path / "run", progress=False, time_limit_s=0.0)
    assert load_state(tmp_path / "run")["iteration"] == 1 and load_model(model).training["iterations"] == 1
    with pytest.raises(ValueError, match="time limit"):
        train(tiny_config(data), tmp_path / "run", resume=True, progress=False, time_limit_s=-1.0)
    train(tiny_config(data), tmp_path / "run", resume=True, progress=False, time_limit_s=3600.0)
    resumed, straight = load_state(tmp_path / "run"), load_state(straight_run)
    assert resumed["iteration"] == 6
    assert all(torch.equal(resumed["ema"][name], t) for name, t in straight["ema"].items())


def test_the_record_counts_the_iterations_each_device_ran(data: Path, straight_run: Path, tmp_path: Path) -> None:
    """A resumed run adds its iterations to the device that ran them; a state from before devices were recorded
    says so for its iterations; a session that only exports (no new iteration) adds nothing."""
    run = tmp_path / "run"
    train(tiny_config(data, iterations=2), run, progress=False)
    train(tiny_config(data, iterations=4), run, resume=True, progress=False)
    assert load_state(run)["devices"] == [["cpu", 4]]
    state = load_state(run)
    del state["devices"]  # as the demo run's H200 state was saved
    torch.save(state, run / "state.pt")
    model = train(tiny_config(data, iterations=6), run, resume=True, progress=False)
    assert load_model(model).training["devices"] == [["not recorded", 4], ["cpu", 2]]
    model = train(tiny_config(data, iterations=6), run, resume=True, progress=False)  # export only
    assert load_model(model).training["devices"] == [["not recorded", 4], ["cpu", 2]]
    assert load_model(model).training["iterations"] == 6


def test_resume_finds_the_data_by_content_not_by_path(data: Path, tmp_path: Path) -> None:
    """A run moved to another machine resumes on the same slices at another path, not on other slices."""
    first = tmp_path / "first"
    make_prepared(first)
    train(tiny_config(first, iterations=2), tmp_path / "run", progress=False)
    moved = tmp_path / "moved"
    first.rename(moved)
    train(tiny_config(moved, iterations=3), tmp_path / "run", resume=True, progress=False)
    assert load_state(tmp_path / "run")["iteration"] == 3
    other = make_prepared(tmp_path / "other", constant=0.5)
    np.save(other / "train_labels.npy", np.array([HEALTHY] * 8, dtype=np.uint8))
    with pytest.raises(ValueError, match="data"):
        train(tiny_config(other, iterations=4), tmp_path / "run", resume=True, progress=False)


def test_crash_after_a_checkpoint_resumes_from_it(data: Path, straight_run: Path, tmp_path: Path) -> None:
    """A run that dies without saving (like kill -9) resumes from its last checkpoint, logging nothing twice."""

    def crash_at_five(iteration: int) -> None:
        if iteration == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(data), tmp_path, progress=False, on_iteration=crash_at_five)
    assert load_state(tmp_path)["iteration"] == 4
    assert len(read_loss_csv(tmp_path)) == 5

    train(tiny_config(data), tmp_path, resume=True, progress=False)
    resumed, straight = load_state(tmp_path), load_state(straight_run)
    assert all(torch.equal(resumed["ema"][name], t) for name, t in straight["ema"].items())
    resumed_rows, straight_rows = read_loss_csv(tmp_path), read_loss_csv(straight_run)
    assert [row["iteration"] for row in resumed_rows] == [1, 2, 3, 4, 5, 6]
    assert [row["smoothed_loss"] for row in resumed_rows] == [row["smoothed_loss"] for row in straight_rows]


def test_exported_model_holds_the_ema_weights_and_a_record(straight_run: Path) -> None:
    loaded = load_model(straight_run / "model.pt")
    ema = load_state(straight_run)["ema"]
    assert loaded.config == TINY
    for name, tensor in loaded.network.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    record = loaded.training
    assert record["iterations"] == 6 and record["batch_size"] == 4 and record["seed"] == 0
    assert record["data"]["train_slices"] == 8 and record["data"]["train_unhealthy"] == 4
    assert record["data"]["splits"]["train"] == {"cases": 2, "slices": 8, "healthy": 4, "unhealthy": 4}
    assert record["devices"] == [["cpu", 6]] and record["torch_version"] == torch.__version__
    assert record["wall_time_s"] > 0
    assert (straight_run / "loss.png").stat().st_size > 0


def test_loss_decreases_on_constant_images(tmp_path: Path) -> None:
    constant = make_prepared(tmp_path / "data", constant=0.5)
    config = tiny_config(constant, iterations=40, batch_size=8, lr=3e-3, checkpoint_every=40)
    train(config, tmp_path / "run", progress=False)
    losses = [row["loss"] for row in read_loss_csv(tmp_path / "run")]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.25 * np.mean(losses[:8])


def test_label_dropout_rate_and_timestep_range() -> None:
    count, probability = 20000, 0.1
    draw = draw_diffusion_inputs(torch.Generator().manual_seed(1), count, (1, 2, 2), 1000, probability)
    labels = torch.randint(0, 2, (count,), generator=torch.Generator().manual_seed(2))
    conditioned = draw.conditioning(labels)
    dropped = conditioned == NULL_LABEL
    tolerance = 4 * (probability * (1 - probability) / count) ** 0.5
    assert abs(dropped.float().mean().item() - probability) < tolerance
    assert torch.equal(conditioned[~dropped], labels[~dropped])
    assert draw.timesteps.min() == 0 and draw.timesteps.max() == 999
    assert draw.noise.shape == (count, 1, 2, 2)


def test_global_batches_are_shuffled_epochs_split_across_ranks() -> None:
    one = GlobalBatchSampler(num_samples=6, batch_size=4, seed=3, start=0, stop=6)
    stream = np.concatenate([one.global_batch(i) for i in range(6)])
    for epoch in range(4):
        assert sorted(stream[epoch * 6 : (epoch + 1) * 6]) == list(range(6))
    assert not np.array_equal(stream[:6], stream[6:12])
    ranks = [list(GlobalBatchSampler(6, 4, 3, start=2, stop=6, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == stream[8:].reshape(4, 4).tolist()


def test_a_learning_rate_decay_added_on_resume_trains_as_one_set_from_the_start(
    data: Path, straight_run: Path, tmp_path: Path
) -> None:
    """The decay falls linearly from lr at lr_decay_from towards 0 at the last iteration; it may be added to a
    constant-rate run at an iteration it has not trained yet, never moved into iterations already trained."""
    assert [tiny_config(data, lr_decay_from=2).learning_rate(i) for i in range(6)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3]
    )
    model = train(tiny_config(data, lr_decay_from=3), tmp_path / "set", progress=False)
    train(tiny_config(data, iterations=3), tmp_path / "added", progress=False)
    with pytest.raises(ValueError, match="lr_decay_from 2 is before iteration 3"):
        train(tiny_config(data, lr_decay_from=2), tmp_path / "added", resume=True, progress=False)
    train(tiny_config(data, lr_decay_from=3), tmp_path / "added", resume=True, progress=False)
    decayed, added, constant = load_state(tmp_path / "set"), load_state(tmp_path / "added"), load_state(straight_run)
    for part in ("model", "ema"):
        assert all(torch.equal(added[part][name], t) for name, t in decayed[part].items()), part
    assert any(not torch.equal(constant["model"][name], t) for name, t in decayed["model"].items())
    losses = [row["loss"] for row in read_loss_csv(tmp_path / "set")]
    assert losses[:5] == [row["loss"] for row in read_loss_csv(straight_run)][:5]  # the 5th step is the first slowed
    assert load_model(model).training["lr_decay_from"] == 3
    with pytest.raises(ValueError, match="decay from 3 to 6"):
        train(tiny_config(data, lr_decay_from=3, iterations=8), tmp_path / "set", resume=True, progress=False)
    with pytest.raises(ValueError, match="decay from 3 to 6"):
        train(tiny_config(data), tmp_path / "set", resume=True, progress=False)
    with pytest.raises(ValueError, match="lr_decay_from must be in"):
        tiny_config(data, lr_decay_from=6)


def test_resume_refuses_a_changed_setup(data: Path, straight_run: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_config(data, batch_size=2, iterations=8), straight_run, resume=True, progress=False)
    with pytest.raises(ValueError, match="channels"):
        wider = replace(TINY, channels=(32, 32))
        train(tiny_config(data, network=wider, iterations=8), straight_run, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_config(data), straight_run, progress=False)


def test_config_errors_are_clear(data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="state.pt"):
        train(tiny_config(data), tmp_path / "new", resume=True, progress=False)
    with pytest.raises(ValueError, match="image_size 32 differs .* slice size 16"):
        train(tiny_config(data, network=replace(TINY, image_size=32)), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"\['t1ce'\] are not in the prepared data"):
        train(tiny_config(data, sequences=("flair", "t1ce")), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="bf16"):
        train(tiny_config(data, bf16=True, device="cpu"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="unknown network preset"):
        tiny_config(data, network="huge")
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_config(data, ema_decay=1.0)
    with pytest.raises(ValueError, match="not a torch device"):
        tiny_config(data, device="gpu")
    with pytest.warns(UserWarning, match="lower ema_decay"):
        tiny_config(data, ema_decay=0.9999)


def test_two_rank_ddp_on_cpu_matches_one_process(tmp_path: Path) -> None:
    """Also the validation loss under DDP: the main rank alone measures it while the other waits for it."""
    data = add_validation_split(make_prepared(tmp_path / "data"))
    args = ["--data", str(data), "--preset", "cpu", "--iterations", "2", "--batch-size", "4", "--ema-decay", "0.5",
            "--checkpoint-every", "2", "--log-every", "1", "--device", "cpu", "--no-progress",
            "--validate-every", "1", "--validation-timesteps", "25,100", "--validation-slices", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
              "-m", "anofpdm.cli", "train", "--out", str(tmp_path / "ddp"), *args]
    finished = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "2 ranks x batch 2" in finished.stderr

    with pytest.warns(UserWarning, match="lower ema_decay"):  # 2 iterations are too few for any EMA
        assert cli_main(["train", "--out", str(tmp_path / "single"), *args]) == 0
    ddp, single = load_model(tmp_path / "ddp" / "model.pt"), load_model(tmp_path / "single" / "model.pt")
    assert ddp.config == single.config and ddp.config.sequences == ("flair", "t2") and ddp.config.image_size == 16
    assert ddp.training["world_size"] == 2 and ddp.training["iterations"] == 2
    # same global batches, noise and labels: the first loss agrees up to float summation order
    first_ddp, first_single = read_loss_csv(tmp_path / "ddp")[0], read_loss_csv(tmp_path / "single")[0]
    assert first_ddp["loss"] == pytest.approx(first_single["loss"], rel=1e-5)
    single_weights = single.network.state_dict()
    for name, tensor in ddp.network.state_dict().items():
        torch.testing.assert_close(tensor, single_weights[name], rtol=0, atol=1e-5, msg=name)
    ddp_rows, single_rows = read_validation_csv(tmp_path / "ddp"), read_validation_csv(tmp_path / "single")
    assert [iteration for iteration, _ in ddp_rows] == [iteration for iteration, _ in single_rows] == [1, 2]
    assert [loss for _, loss in ddp_rows] == pytest.approx([loss for _, loss in single_rows], rel=1e-4)
    assert load_model(tmp_path / "ddp" / "best.pt").training["selected_by"]["validation_timesteps"] == [25, 100]


def test_train_command_stops_saved_on_sigterm_and_says_how_to_go_on(data: Path, tmp_path: Path) -> None:
    """``anofpdm train`` killed by a job scheduler: state saved, exit 130 (not 0), and the way to continue."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "anofpdm.cli", "train", "--data", str(data), "--preset", "cpu", "--out",
               str(tmp_path), "--iterations", "1000000", "--batch-size", "4", "--checkpoint-every", "1000000",
               "--device", "cpu", "--no-progress"]
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as run:
        assert run.stderr is not None
        started = next((line for line in run.stderr if line.startswith("INFO training")), None)
        assert started is not None, "the train command ended without announcing the run"
        run.send_signal(signal.SIGTERM)
        rest = run.stderr.read()
        assert run.wait(timeout=120) == 130, rest[-3000:]
    assert "SIGTERM received" in rest and "continue with --resume" in rest
    assert load_state(tmp_path)["iteration"] >= 1


def add_validation_split(root: Path, count: int = 6) -> Path:
    """Give a prepared folder a ``val`` split (random images, alternating labels), as ``prepare_dataset`` does."""
    size = json.loads((root / "manifest.json").read_text())["size"]
    images = np.random.default_rng(1).uniform(-1, 1, (count, len(PREPARED_SEQUENCES), size, size))
    np.save(root / "val_images.npy", images.astype(np.float16))
    np.save(root / "val_labels.npy", np.array([HEALTHY, UNHEALTHY] * (count // 2), dtype=np.uint8))
    return root


def read_validation_csv(run_dir: Path) -> list[tuple[int, float]]:
    with (run_dir / "validation.csv").open(newline="") as f:
        return [(int(row["iteration"]), float(row["validation_loss"])) for row in csv.DictReader(f)]


def test_the_network_with_the_lowest_validation_loss_is_kept_as_best(tmp_path: Path) -> None:
    """Every 2 iterations the validation loss is logged; ``best.pt`` holds the EMA weights of the lowest one, as a
    run that ends at that iteration exports them, and its record says why. A crashed run resumes its log exactly."""
    data = add_validation_split(make_prepared(tmp_path / "data"))
    config = tiny_config(data, iterations=8, lr=3e-3, validate_every=2, validation_slices=4)
    straight = tmp_path / "straight"
    train(config, straight, progress=False)
    rows = read_validation_csv(straight)
    assert [iteration for iteration, _ in rows] == [2, 4, 6, 8] and len({loss for _, loss in rows}) == 4
    best_iteration, best_loss = min(rows, key=lambda row: row[1])
    best = load_model(straight / "best.pt")
    assert best.training["iterations"] == best_iteration
    assert best.training["selected_by"] == {
        "validation_loss": best_loss, "validation_timesteps": [25, 50, 100, 200], "validation_slices": 4}
    shorter = tmp_path / "shorter"
    train(replace(config, iterations=best_iteration), shorter, progress=False)
    exported = load_model(shorter / "model.pt").network.state_dict()
    assert all(torch.equal(tensor, exported[name]) for name, tensor in best.network.state_dict().items())

    def crash_at_seven(iteration: int) -> None:
        if iteration == 7:
            raise RuntimeError("simulated crash")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, crashed, progress=False, on_iteration=crash_at_seven)
    assert [iteration for iteration, _ in read_validation_csv(crashed)] == [2, 4, 6]
    with pytest.raises(ValueError, match=r"validation timesteps \[25\] on 4 slices: .* measured at \[25, 50, 100"):
        train(replace(config, validation_timesteps=(25,)), crashed, resume=True, progress=False)
    train(config, crashed, resume=True, progress=False)
    assert read_validation_csv(crashed) == rows
    assert load_model(crashed / "best.pt").training["selected_by"]["validation_loss"] == best_loss


def test_a_validation_loss_needs_a_validation_split(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a validation loss needs the 'val' split of"):
        train(tiny_config(data, validate_every=2), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="validate_every must be at least 1"):
        tiny_config(data, validate_every=0)
    validated = add_validation_split(make_prepared(tmp_path / "with_val"))
    with pytest.raises(ValueError, match=r"validation timesteps must be in \[0, 1000\), got \[25, 1000\]"):
        train(tiny_config(validated, validate_every=2, validation_timesteps=(25, 1000)), tmp_path / "r", progress=False)


def test_fine_tuning_starts_from_the_given_weights_and_resumes_only_with_them(
    data: Path, straight_run: Path, tmp_path: Path
) -> None:
    trained = load_model(straight_run / "model.pt")
    start = {k: v + 0.5 if v.is_floating_point() else v for k, v in trained.network.state_dict().items()}
    given = save_checkpoint(tmp_path / "given.pt", trained.config, start, trained.schedule)  # far from any init
    fine, fresh = tmp_path / "fine", tmp_path / "fresh"
    train(tiny_config(data, iterations=1, ema_decay=0.5, initial_weights=given), fine, progress=False)
    train(tiny_config(data, iterations=1, ema_decay=0.5), fresh, progress=False)

    def distance(run_dir: Path) -> float:
        weights = load_state(run_dir)["model"]
        return max((weights[k].float() - v.float()).abs().max().item() for k, v in start.items())

    assert distance(fine) < 0.01 < 0.4 < distance(fresh)  # one step of lr 1e-3 from the given weights
    assert load_model(fine / "model.pt").training["initial_weights"] == str(given)
    with pytest.raises(ValueError, match="initial_weights"):
        train(tiny_config(data, iterations=2, ema_decay=0.5), fine, resume=True, progress=False)
    train(tiny_config(data, iterations=2, ema_decay=0.5, initial_weights=given), fine, resume=True, progress=False)
    assert load_state(fine)["iteration"] == 2


def test_fine_tuning_refuses_another_network(data: Path, straight_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"another network .*channels"):
        train(tiny_config(data, network=replace(TINY, channels=(32, 32)), initial_weights=straight_run / "model.pt"),
              tmp_path / "wide", progress=False)
    with pytest.raises(FileNotFoundError, match="initial weights not found"):
        tiny_config(data, initial_weights=tmp_path / "absent.pt")
