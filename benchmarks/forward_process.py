"""Forward-process figures for a network preset: evaluations per step, peak memory versus T_f,
and forward-process time over pure network time (overhead of the streaming statistics).

Prints figures; asserts nothing. Example (CPU preset, random weights: cost does not depend on them):

    PYTHONPATH=lib python benchmarks/forward_process.py --preset cpu --batch 8

``--runtimes`` instead times one network call (healthy + null: 2 x batch slices) of a model's network in other
runtimes side by side with eager PyTorch, rounds interleaved so that a shared machine's load falls on all alike,
for each ``--threads`` count, and prints each runtime's largest difference from eager's output. ONNX Runtime and
OpenVINO are not project dependencies: install them apart (``pip install --no-deps --target DIR onnxruntime
openvino onnx``) and put DIR on PYTHONPATH for the run:

    PYTHONPATH=lib:DIR python benchmarks/forward_process.py --model model/anofpdm.pt --batch 8 --threads 1 2 \
        --runtimes eager,channels_last,torchscript,compile,onnxruntime,openvino
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from anofpdm.method.diffusion import NoiseSchedule
from anofpdm.method.forward_process import ForwardProcessConfig, run_forward_process
from anofpdm.arguments import comma_list
from anofpdm.method.model import HEALTHY, NULL_LABEL, PRESETS, NetworkConfig, build_network, load_model
from anofpdm.runtime import default_device, reuse_heap_memory


class Counter(torch.nn.Module):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.calls, self.evaluations = network, 0, 0

    def forward(self, x, t, class_labels):
        self.calls += 1
        self.evaluations += x.shape[0]
        return self.network(x, t, class_labels=class_labels)


def _setup(preset: str, batch: int, device: str):
    config = PRESETS[preset]
    network = build_network(config).to(device).eval().requires_grad_(False)
    x0 = torch.rand(batch, len(config.sequences), config.image_size, config.image_size, device=device) * 2 - 1
    return network, x0, NoiseSchedule(device=device)


def peak_memory_child(preset: str, batch: int, steps: int, device: str) -> dict:
    """Run in a fresh process: peak RSS (and CUDA peak) of one forward process with T_f = steps."""
    network, x0, schedule = _setup(preset, batch, device)
    run_forward_process(network, x0, schedule, ForwardProcessConfig(forward_steps=2), [0, 1])  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run_forward_process(network, x0, schedule, ForwardProcessConfig(forward_steps=steps), [0, 1])
    figures = {"forward_steps": steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
    if device.startswith("cuda"):
        figures["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def overhead(preset: str, batch: int, steps: int, device: str) -> dict:
    """Forward-process wall time over the time of the same network calls alone."""
    network, x0, schedule = _setup(preset, batch, device)
    counter = Counter(network)
    config = ForwardProcessConfig(forward_steps=steps)
    run_forward_process(counter, x0, schedule, ForwardProcessConfig(forward_steps=2), [0, 1])  # warm-up
    counter.calls = counter.evaluations = 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    run_forward_process(counter, x0, schedule, config, [0, 1])
    sync()
    pipeline_s = time.perf_counter() - start
    z = torch.cat([x0, x0])
    t = torch.zeros(2 * batch, dtype=torch.long, device=device)
    labels = torch.zeros(2 * batch, dtype=torch.long, device=device)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for step in range(steps):
            network(z, t + step, class_labels=labels)
    sync()
    network_s = time.perf_counter() - start
    return {
        "evaluations_per_step_per_slice": counter.evaluations / steps / batch,
        "network_calls_per_step": counter.calls / steps,
        "forward_process_s": round(pipeline_s, 3),
        "network_only_s": round(network_s, 3),
        "overhead_ratio": round(pipeline_s / network_s, 3),
        "ms_per_slice_evaluation": round(1000 * network_s / (2 * batch * steps), 2),
    }


RUNTIMES = ("eager", "channels_last", "torchscript", "compile", "onnxruntime", "openvino")
Call = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Positional(torch.nn.Module):
    """The network with positional inputs (x, timesteps, class labels), as tracing and export need."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, class_labels=labels)


def build_runtime(name: str, network: torch.nn.Module, example: tuple[torch.Tensor, ...], threads: int,
                  onnx_path: Path) -> Call:
    """``network`` (CPU, eval) as ``name`` runs it, called as ``f(x, t, labels)``; ``onnx_path`` is exported once."""
    wrapped = Positional(network).eval()
    if name == "eager":
        return wrapped
    if name == "channels_last":
        last = copy.deepcopy(wrapped).to(memory_format=torch.channels_last)
        return lambda x, t, labels: last(x.contiguous(memory_format=torch.channels_last), t, labels)
    if name == "torchscript":  # traced, frozen, oneDNN fusions (optimize_for_inference)
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(wrapped, example)))
    if name == "compile":  # inductor's C++ kernels, static shapes
        return torch.compile(wrapped, dynamic=False)
    if not onnx_path.exists():
        torch.onnx.export(wrapped, example, str(onnx_path), input_names=["x", "t", "labels"], output_names=["eps"],
                          opset_version=17, dynamo=False)
    if name == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        return lambda x, t, labels: torch.from_numpy(session.run(None, {"x": x.numpy(), "t": t.numpy(),
                                                                        "labels": labels.numpy()})[0])
    if name == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                         "INFERENCE_PRECISION_HINT": "f32"})
        return lambda x, t, labels: torch.from_numpy(compiled([x.numpy(), t.numpy(), labels.numpy()])[0])
    raise ValueError(f"unknown runtime {name!r} (choose from {RUNTIMES})")


def runtime_latency(network: torch.nn.Module, config: NetworkConfig, batch: int, runtimes: list[str],
                    threads: list[int], rounds: int, calls: int) -> None:
    """Per-call latency of each runtime (median over ``rounds`` of ``calls`` calls) and its largest deviation from
    eager on inputs at four timesteps, for each thread count; printed as one table."""
    channels, image_size = len(config.sequences), config.image_size
    torch.manual_seed(0)
    x = torch.rand(2 * batch, channels, image_size, image_size) * 2 - 1
    labels = torch.tensor([HEALTHY] * batch + [NULL_LABEL] * batch)
    example = (x, torch.full((2 * batch,), 300, dtype=torch.long), labels)
    checks = [torch.full((2 * batch,), t, dtype=torch.long) for t in (0, 150, 300, 570)]
    print(f"network call: {2 * batch} slices of {channels} x {image_size} x {image_size} (batch {batch}, healthy + "
          f"null); median of {rounds} interleaved rounds of {calls} calls")
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        onnx_path = Path(folder) / "network.onnx"
        for count in threads:
            torch.set_num_threads(count)
            built, setup_s = {}, {}
            for name in runtimes:
                start = time.perf_counter()
                built[name] = build_runtime(name, network, example, count, onnx_path)
                built[name](*example)  # warm-up: compilation, first-call planning
                setup_s[name] = time.perf_counter() - start
            references = [network(x, t, class_labels=labels) for t in checks]
            deviation = {name: max(float((built[name](x, t, labels) - ref).abs().max())
                                   for t, ref in zip(checks, references)) for name in runtimes}
            times: dict[str, list[float]] = {name: [] for name in runtimes}
            for _ in range(rounds):
                for name in runtimes:
                    start = time.perf_counter()
                    for call in range(calls):
                        built[name](x, checks[call % len(checks)], labels)
                    times[name].append((time.perf_counter() - start) / calls)
            eager = statistics.median(times[runtimes[0]])
            for name in runtimes:
                median = statistics.median(times[name])
                per_slice = 1000 * median / (2 * batch)
                print(f"threads {count} {name:>14}: {1000 * median:7.1f} ms per call ({per_slice:5.2f} "
                      f"ms per slice evaluation; rounds {min(times[name]) * 1000:.1f}-{max(times[name]) * 1000:.1f}), "
                      f"x{eager / median:.2f} vs {runtimes[0]}, max |diff| {deviation[name]:.1e}, setup "
                      f"{setup_s[name]:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--overhead-steps", type=int, default=30)
    parser.add_argument("--memory-steps", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--glibc-default-heap", action="store_true",
                        help="leave glibc's allocator as it is, without the CLI's and app's reuse_heap_memory")
    parser.add_argument("--runtimes", type=comma_list, help=f"time one network call in these runtimes instead (of "
                        f"{', '.join(RUNTIMES)}; the first is the reference)")
    parser.add_argument("--model", help="with --runtimes: a checkpoint whose network to time (default: the preset's, "
                        "random weights)")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.glibc_default_heap:
        reuse_heap_memory()
    if args.runtimes:
        if args.model:
            loaded = load_model(args.model)
            network, config = loaded.network, loaded.config
        else:
            config = PRESETS[args.preset]
            network = build_network(config).eval()
        print(f"model={args.model or args.preset} load average {os.getloadavg()}")
        runtime_latency(network.requires_grad_(False), config, args.batch, args.runtimes, args.threads, args.rounds,
                        args.calls)
        return
    if args.child is not None:
        print(json.dumps(peak_memory_child(args.preset, args.batch, args.child, args.device)))
        return
    heap = "glibc default" if args.glibc_default_heap else "reused"
    print(f"preset={args.preset} batch={args.batch} device={args.device} threads={torch.get_num_threads()} heap={heap}")
    print(json.dumps(overhead(args.preset, args.batch, args.overhead_steps, args.device), indent=2))
    for steps in args.memory_steps:
        command = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                   "--device", args.device, "--child", str(steps)] + ["--glibc-default-heap"] * args.glibc_default_heap
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
