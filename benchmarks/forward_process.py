"""Forward-process figures for a network preset: evaluations per step, peak memory versus T_f,
and forward-process time over pure network time (overhead of the streaming statistics).

Prints figures; asserts nothing. Example (CPU preset, random weights: cost does not depend on them):

    PYTHONPATH=lib python benchmarks/forward_process.py --preset cpu --batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from anofpdm.method.diffusion import NoiseSchedule
from anofpdm.method.forward_process import ForwardProcessConfig, run_forward_process
from anofpdm.method.model import PRESETS, build_network
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--overhead-steps", type=int, default=30)
    parser.add_argument("--memory-steps", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--glibc-default-heap", action="store_true",
                        help="leave glibc's allocator as it is, without the CLI's and app's reuse_heap_memory")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.glibc_default_heap:
        reuse_heap_memory()
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
