"""`python -m bench.overload`: 64 clients sending 32-image requests, three bursts; memory and refusals measured.

What is measured (docs/robustness.md has the figures):

* the resident memory of tritonserver and its Python-backend stubs, summed,
  sampled every 0.25 s: idle before the first burst, the peak of each burst,
  and 60 s after each burst (RSS counts the stubs' shared-memory regions in
  every process that maps them; PSS, which does not, is recorded too);
* the share of requests refused with UNAVAILABLE (queue full, or waited
  longer than the queue timeout), and other errors;
* the latency of the requests that were answered (p50, p95, p99, max).

Clients never retry here (a refusal is what is measured), send random pixels
(the answer's content does not matter for memory) and use gRPC and HTTP half
and half. The machine's load average before and after is recorded, since on
a shared machine other work competes for the same cores.

Goal (issue 13): peak at most 1.5 GB above idle; 60 s after a burst at most
200 MB above idle; no growth from burst to burst. Besides: nothing but
UNAVAILABLE refusals, the health probe (priority 1) answered during every
burst, and the same answers after the bursts as before them. `make overload`
fails when any of these does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from safety_checker_admin.probe import load_health_probe
from safety_checker_admin.procfs import descendants
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient, triton_module

GOAL_PEAK_MB = 1500
GOAL_AFTER_MB = 200


# -- memory ---------------------------------------------------------------------------------------
def tree(pid: int) -> List[int]:
    """`pid` and all its descendants."""
    return [pid, *descendants(pid)]


def _kilobytes(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_mb(pid: int) -> Tuple[float, float]:
    """(RSS, PSS) of the process tree under `pid`, in MB."""
    pids = tree(pid)
    rss = sum(_kilobytes(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kilobytes(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss / 1024, pss / 1024


class Sampler:
    """Samples memory_mb(pid) every `interval_s` in a thread: a list of (seconds since start, RSS, PSS)."""

    def __init__(self, pid_of, interval_s: float = 0.25) -> None:
        self.pid_of, self.interval_s = pid_of, interval_s
        self.samples: List[Tuple[float, float, float]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = self.pid_of()
            if pid is not None:
                rss, pss = memory_mb(pid)
                self.samples.append((time.monotonic() - self.started, rss, pss))
            time.sleep(self.interval_s)

    def now(self) -> float:
        return time.monotonic() - self.started

    def between(self, start: float, end: float) -> List[Tuple[float, float, float]]:
        return [s for s in self.samples if start <= s[0] <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- load -----------------------------------------------------------------------------------------
@dataclass
class Outcomes:
    latencies_s: List[float] = field(default_factory=list)
    refused: int = 0  # UNAVAILABLE / 503
    refusal_latencies_s: List[float] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def sent(self) -> int:
        return len(self.latencies_s) + self.refused + len(self.errors)


def refused(error: BaseException) -> bool:
    """Whether Triton refused the request with UNAVAILABLE for its queue policy (full, or waited too long)."""
    text = str(error)
    return "Exceeds maximum queue size" in text or "Request timeout expired" in text


def client_loop(url: str, protocol: str, pixels: np.ndarray, until: float, outcomes: Outcomes) -> None:
    module = triton_module(protocol)
    kwargs = {"network_timeout": 300.0, "connection_timeout": 300.0} if protocol == "http" else {}
    client = module.InferenceServerClient(url, **kwargs)
    try:
        tensor = module.InferInput(spec.PIXEL_VALUES.name, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        outputs = [module.InferRequestedOutput(spec.HAS_NSFW_CONCEPTS.name)]
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                client.infer(spec.ENSEMBLE_MODEL, [tensor], outputs=outputs)
            except Exception as error:  # refusals and failures are what is measured
                with outcomes.lock:
                    if refused(error):
                        outcomes.refused += 1
                        outcomes.refusal_latencies_s.append(time.monotonic() - started)
                    else:
                        outcomes.errors.append(str(error)[:200])
                time.sleep(0.05)
                continue
            with outcomes.lock:
                outcomes.latencies_s.append(time.monotonic() - started)
    finally:
        client.close()


def burst(server, clients: int, images: int, duration_s: float, seed: int) -> Tuple[Outcomes, List[str]]:
    """The burst's outcomes, and the health probe's statuses: three probes in its last seconds."""
    pixels = np.random.default_rng(seed).standard_normal((images, 3, 224, 224)).astype(np.float32)
    outcomes = Outcomes()
    until = time.monotonic() + duration_s
    probes: List[str] = []
    prober = threading.Thread(target=_probe_near, args=(server, until, probes))
    threads = []
    for index in range(clients):
        protocol = "grpc" if index % 2 == 0 else "http"
        url = server.grpc_url if protocol == "grpc" else server.http_url
        threads.append(threading.Thread(target=client_loop, args=(url, protocol, pixels, until, outcomes)))
    for thread in [*threads, prober]:
        thread.start()
    for thread in [*threads, prober]:
        thread.join()
    return outcomes, probes


def _probe_near(server, until: float, statuses: List[str]) -> None:
    """Three health probes while the burst runs (in its last 10 s): each must be answered ahead of the queue."""
    probe = load_health_probe(server.repository)
    time.sleep(max(0.0, until - 10.0 - time.monotonic()))
    while len(statuses) < 3 and time.monotonic() < until:
        statuses.append(probe.probe(server.client_host, server.ports["HTTP"], timeout_s=30)[0])
        time.sleep(1.0)


def answers(server, pixels: np.ndarray) -> Dict[str, np.ndarray]:
    with SafetyCheckerClient(server.grpc_url) as client:
        return client.infer(pixels)


def latency_summary(latencies: Sequence[float]) -> Dict[str, Optional[float]]:
    if not latencies:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    values = np.array(latencies)
    return {
        "p50": round(float(np.percentile(values, 50)), 3),
        "p95": round(float(np.percentile(values, 95)), 3),
        "p99": round(float(np.percentile(values, 99)), 3),
        "max": round(float(values.max()), 3),
    }


def loadavg() -> List[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


# -- the run --------------------------------------------------------------------------------------
def tiny_repository(folder: Path) -> Path:
    """The tests' tiny random-weight checker, exported (what the figures are for unless --repository is given)."""
    import subprocess
    import sys

    from fixtures.checkers import build_checker, save_checker

    checker = save_checker(folder / "tiny-checker", build_checker(seed=7))
    repository = folder / "repository"
    subprocess.run(
        [sys.executable, "-m", "export", "--model", str(checker), "--repository", str(repository)],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return repository


def run(repository: Path, clients: int, images: int, bursts: int, burst_s: float, settle_s: float, log) -> dict:
    from safety_checker_admin.server import TritonServer, free_port

    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    sampler = Sampler(lambda: server.pid)
    reference = np.random.default_rng(1000).standard_normal((images, 3, 224, 224)).astype(np.float32)
    try:
        expected = answers(server, reference)
        time.sleep(5.0)
        idle = sampler.between(sampler.now() - 4.0, sampler.now())
        idle_rss, idle_pss = float(np.median([s[1] for s in idle])), float(np.median([s[2] for s in idle]))
        log(f"idle: RSS {idle_rss:.0f} MB, PSS {idle_pss:.0f} MB; load average {loadavg()}")
        results = []
        for index in range(bursts):
            load_before = loadavg()
            start = sampler.now()
            outcomes, probes = burst(server, clients, images, burst_s, seed=index)
            end = sampler.now()
            time.sleep(settle_s)
            after = sampler.between(sampler.now() - 2.0, sampler.now())
            during = sampler.between(start, end + 2.0)
            row = {
                "burst": index + 1,
                "sent": outcomes.sent,
                "answered": len(outcomes.latencies_s),
                "refused_unavailable": outcomes.refused,
                "other_errors": len(outcomes.errors),
                "refused_share": round(outcomes.refused / max(outcomes.sent, 1), 3),
                "latency_s": latency_summary(outcomes.latencies_s),
                "refusal_latency_s": latency_summary(outcomes.refusal_latencies_s),
                "peak_rss_mb": round(max(s[1] for s in during)),
                "peak_pss_mb": round(max(s[2] for s in during)),
                "rss_after_mb": round(float(np.median([s[1] for s in after]))),
                "pss_after_mb": round(float(np.median([s[2] for s in after]))),
                "load_average_before": load_before,
                "load_average_after": loadavg(),
                "first_errors": outcomes.errors[:3],
                "health_probes": probes,
            }
            row["peak_above_idle_mb"] = round(row["peak_rss_mb"] - idle_rss)
            row["after_above_idle_mb"] = round(row["rss_after_mb"] - idle_rss)
            log(json.dumps(row))
            results.append(row)
        after_bursts = answers(server, reference)
        return {
            "clients": clients,
            "images_per_request": images,
            "burst_s": burst_s,
            "settle_s": settle_s,
            "idle_rss_mb": round(idle_rss),
            "idle_pss_mb": round(idle_pss),
            "bursts": results,
            "goal": {
                "peak_within_1_5_GB": all(r["peak_above_idle_mb"] <= GOAL_PEAK_MB for r in results),
                "after_within_200_MB": all(r["after_above_idle_mb"] <= GOAL_AFTER_MB for r in results),
                "no_growth": results[-1]["rss_after_mb"] <= results[0]["rss_after_mb"] + 50,
                "only_unavailable_refusals": all(r["other_errors"] == 0 for r in results),
                "probes_answered": all(r["health_probes"] and set(r["health_probes"]) == {"ok"} for r in results),
                "answers_unchanged": all(np.array_equal(after_bursts[k], v) for k, v in expected.items()),
            },
            "samples": [(round(t, 2), round(r), round(p)) for t, r, p in sampler.samples],
            "cores": len(os.sched_getaffinity(0)),
        }
    finally:
        sampler.stop()
        server.stop()


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = np.array(result["samples"])
    figure, axis = plt.subplots(figsize=(9, 3.5))
    axis.plot(samples[:, 0], samples[:, 1], label="RSS (tritonserver + stubs)")
    axis.plot(samples[:, 0], samples[:, 2], label="PSS", alpha=0.7)
    axis.set_xlabel("s")
    axis.set_ylabel("MB")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="default: the tests' tiny checker, exported to a temp dir")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--images", type=int, default=spec.MAX_BATCH_SIZE)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--burst-seconds", type=float, default=30.0)
    parser.add_argument("--settle-seconds", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="overload-") as scratch:
        repository = args.repository or tiny_repository(Path(scratch))
        result = run(repository, args.clients, args.images, args.bursts, args.burst_seconds, args.settle_seconds, print)
    (args.output / "overload.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.output / "overload-rss.png", f"{args.clients} clients x {args.images} images, 3 bursts")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    missed = [goal for goal, held in result["goal"].items() if not held]
    if missed:
        print(f"overload: goals not met: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
