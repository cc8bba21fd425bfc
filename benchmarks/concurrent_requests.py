"""Several clients clicking Run at once on a real MONAI Label server, for each cap on concurrent inferences.

For each ``--caps`` value (repeat one, e.g. ``1 2 1 2``, to see a shared machine's drift) a server starts
(``monailabel start_server --app apps/anofpdm --conf max_concurrent_inferences N``, the venv's launcher) on a copy
of ``--studies``; every image of ``--images`` is first inferred alone (its single time, on that server just before),
then all at once from one thread each. Prints each request's latency, queue wait and inference time, the first and
the slowest request against the single times, the server's CPU time for them all against one by one (the work,
whatever share of a shared machine's cores it got), its peak resident memory (the process tree, sampled with
``/info/`` every 0.5 s) and the slowest ``/info/`` answer meanwhile. Prints figures; asserts nothing. Example
(the shipped model, demo studies; ``--params`` are the requests' options):

    PYTHONPATH=lib python benchmarks/concurrent_requests.py --images SYN_00000 SYN_00001 --caps 1 2 1 2 \
        --params '{"forward_steps": 60}'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
STARTUP_DEADLINE_S = 300.0
POLL_S = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:  # not listening yet
        return False


def start_server(studies: Path, model: Path, cap: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``monailabel start_server`` with the venv's ``python`` first on PATH (its launcher runs that one)."""
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(log.parent)}
    command = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(REPO / "apps" / "anofpdm"),
               "--studies", str(studies), "--conf", "model_path", str(model), "--conf", "max_concurrent_inferences",
               str(cap), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if _answers(f"{url}/info/"):
            return process, url
        time.sleep(POLL_S)
    raise TimeoutError(f"server not ready after {STARTUP_DEADLINE_S} s:\n{log.read_text()[-3000:]}")


def infer(url: str, image: str, params: dict) -> dict:
    """One ``POST /infer/anofpdm?output=json``: latency and the result's timings."""
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/anofpdm", params={"image": image, "output": "json"},
                             data={"params": json.dumps(params)}, timeout=3600)
    latency = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{image}: HTTP {response.status_code}: {response.text[:500]}")
    timings = response.json()["timings_s"]
    return {"image": image, "latency_s": latency, "queue_wait_s": timings["queue_wait_s"],
            "total_s": timings["total_s"], "score": response.json()["score"]}


def tree_rss(process: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the server has used so far: the work, whatever share of the cores it got."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def concurrent(url: str, server: subprocess.Popen, images: list[str], params: dict) -> tuple[list[dict], int, float]:
    """All images at once, one thread each; the results, peak server RSS and slowest /info/ meanwhile."""
    results: list[dict] = []
    threads = [threading.Thread(target=lambda image=image: results.append(infer(url, image, params)))
               for image in images]
    for thread in threads:
        thread.start()
    peak, slowest_info = 0, 0.0
    tree = psutil.Process(server.pid)
    while any(thread.is_alive() for thread in threads):
        sent = time.perf_counter()
        requests.get(f"{url}/info/", timeout=30).raise_for_status()
        slowest_info = max(slowest_info, time.perf_counter() - sent)
        peak = max(peak, tree_rss(tree))
        threads[0].join(timeout=POLL_S)
    for thread in threads:
        thread.join()
    return results, peak, slowest_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=Path, default=REPO / "demo" / "studies")
    parser.add_argument("--model", type=Path, default=REPO / "model" / "anofpdm.pt")
    parser.add_argument("--images", nargs="+", default=["SYN_00000", "SYN_00001"])
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--params", type=json.loads, default={}, help="request params (JSON)")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for index, cap in enumerate(args.caps):
            run = Path(folder) / f"run{index}_cap{cap}"
            singles: dict[str, dict] = {}
            shutil.copytree(args.studies, run / "studies")
            server, url = start_server(run / "studies", args.model.resolve(), cap, run / "server.log")
            try:
                cpu_start = cpu_seconds(server.pid)
                for image in args.images:
                    single = singles[image] = infer(url, image, args.params)
                    print(f"cap {cap}: single {image}: {single['latency_s']:.1f} s (inference "
                          f"{single['total_s']:.1f} s)", flush=True)
                cpu_singles = cpu_seconds(server.pid) - cpu_start
                cpu_start = cpu_seconds(server.pid)
                results, peak, slowest_info = concurrent(url, server, args.images, args.params)
                cpu_together = cpu_seconds(server.pid) - cpu_start
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
            for result in sorted(results, key=lambda r: r["latency_s"]):
                print(f"cap {cap}: {result['image']}: latency {result['latency_s']:.1f} s = queue "
                      f"{result['queue_wait_s']:.1f} s + inference {result['total_s']:.1f} s (+ transfer)", flush=True)
            slowest = max(r["latency_s"] for r in results)
            same = all(r["score"] == singles[r["image"]]["score"] for r in results)
            first = min(results, key=lambda r: r["latency_s"])
            print(f"cap {cap}: {len(results)} at once: first done {first['latency_s']:.1f} s (alone "
                  f"{singles[first['image']]['latency_s']:.1f} s), last {slowest:.1f} s (sum of single times "
                  f"{sum(r['latency_s'] for r in singles.values()):.1f} s), "
                  f"scores as single runs: {same}, server CPU time {cpu_together:.1f} s (one by one "
                  f"{cpu_singles:.1f} s), peak server RSS "
                  f"{peak / 2**30:.2f} GB, slowest /info/ {slowest_info * 1000:.0f} ms, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
