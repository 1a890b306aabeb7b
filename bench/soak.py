"""`make soak` (`python -m bench.soak`): ten minutes at saturation, with concept reloads and one stub kill.

`safety-checker serve` (supervised, as an operator runs it) serves the tests'
tiny checker (or `--repository`, copied: the soak rewrites its concept set).
Client threads keep it saturated with requests of 1-8 images over gRPC and
HTTP, through the float32 and the uint8 ensembles, with the client's retries
(deadline 120 s). Every minute the custom concept set changes (concepts added,
removed, thresholds moved; some fire on the soak's images); at 40% of the run
the embedder's Python-backend stub is killed, and the supervisor restores the
service.

Every answer is checked: the built-in scores and the embedding must equal the
answer before the soak byte for byte, the custom scores those computed here
from the embedding and the concept set of the `concept_set_version` answered,
the decision and the fired list follow from them. A request that was neither
answered nor refused with an error is lost. The run writes the memory of
tritonserver and its stubs over time as a PNG and prints one JSON summary
line; it exits 0 only with no lost request, no wrong answer and no request
left unchecked, and with the timing checks that no test makes (make test
counts, it does not time): the stub's death noticed within DETECTION_S and
the service answering again within RESTORATION_S of the kill, and `serve`
stopped within STOP_S of its SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from bench.overload import Sampler, loadavg, tiny_repository
from safety_checker_admin.command_line import EXIT_TIMEOUT_S
from safety_checker_admin.procfs import child_processes, running
from safety_checker_admin.server import free_port
from safety_checker_client import spec
from safety_checker_client.client import CheckError, SafetyCheckerClient
from safety_checker_served import concept_set, concept_writer, scoring

COMMAND = str(Path(sys.executable).parent / "safety-checker")
# The supervisor's goals for a dead stub: noticed (its "fault:" line) and restored ("restored:") this soon after the
# kill; and `serve` ends within tritonserver's own exit timeout of a SIGTERM.
DETECTION_S = 10.0
RESTORATION_S = 60.0
STOP_S = float(EXIT_TIMEOUT_S)


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    unchecked: List[str] = field(default_factory=list)  # CheckError after the deadline
    wrong: List[str] = field(default_factory=list)
    retried: int = 0  # attempts beyond the first
    versions: Dict[int, int] = field(default_factory=dict)
    latencies_s: List[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Reference:
    """What every answer must be: the baseline's built-in part, and custom scores from the concept sets."""

    def __init__(self, baseline: Dict[str, np.ndarray]) -> None:
        self.baseline = baseline
        self.sets: Dict[int, concept_set.ConceptSet] = {}
        # The adjustment every later score of an image gets once a special-care concept fired.
        self.adjustment = np.where(
            (baseline[spec.SPECIAL_SCORES.name] > 0).any(axis=1), spec.SPECIAL_CARE_ADJUSTMENT, 0.0
        )

    def check(self, index: Sequence[int], answer: Dict[str, np.ndarray]) -> Optional[str]:
        for tensor in (spec.CONCEPT_SCORES, spec.SPECIAL_SCORES, spec.IMAGE_EMBEDS, spec.STRICTNESS_ADJUSTMENT):
            if not np.array_equal(answer[tensor.name], self.baseline[tensor.name][index]):
                return f"{tensor.name} differs from the answer before the soak"
        versions = set(answer[spec.CONCEPT_SET_VERSION.name].reshape(-1).tolist())
        if len(versions) != 1:
            return f"one request answered under several concept sets: {sorted(versions)}"
        version = versions.pop()
        known = self.sets.get(version)
        if known is None:
            return f"answered with concept set version {version}, which was never written"
        embeds = self.baseline[spec.IMAGE_EMBEDS.name][index]
        cosines = scoring.cosines(embeds, known.unit_embeddings())
        custom = np.round(
            cosines.astype(np.float64) - known.thresholds()[np.newaxis, :] + self.adjustment[index][:, np.newaxis], 3
        )
        builtin_fired = self.baseline[spec.CONCEPT_SCORES.name][index] > 0
        for row, image in enumerate(index):
            got = json.loads(answer[spec.CUSTOM_SCORES.name][row, 0])
            expected = {name: round(float(s), 3) + 0.0 for name, s in zip(known.names, custom[row])}
            if got != expected:
                return f"image {image}: custom scores {got} under version {version}, expected {expected}"
            flagged = bool(builtin_fired[row].any() or (custom[row] > 0).any())
            if bool(answer[spec.HAS_NSFW_CONCEPTS.name][row, 0]) != flagged:
                return f"image {image}: decision {not flagged} under version {version}"
            fired = json.loads(answer[spec.FIRED_CONCEPTS.name][row, 0])
            custom_fired = [n for n, s in zip(known.names, custom[row]) if s > 0]
            if fired[len(fired) - len(custom_fired) :] != custom_fired:
                return f"image {image}: fired {fired} under version {version}"
        return None


def load(url: str, protocol: str, uint8: bool, images, reference: Reference, tally: Tally, until: float, seed: int):
    rng = random.Random(seed)
    with SafetyCheckerClient(url, protocol=protocol, uint8=uint8, timeout_s=120) as client:
        while time.monotonic() < until:
            index = sorted(rng.sample(range(len(images)), rng.randint(1, 8)))
            batch = images[index]
            with tally.lock:
                tally.sent += 1
            before, started = client.attempts, time.monotonic()
            try:
                answer = client.infer(batch)
            except CheckError as error:
                with tally.lock:
                    tally.unchecked.append(str(error)[:300])
                continue
            wrong = reference.check(index, answer)
            with tally.lock:
                tally.answered += 1
                tally.retried += client.attempts - before - 1
                tally.latencies_s.append(time.monotonic() - started)
                version = int(answer[spec.CONCEPT_SET_VERSION.name][0, 0])
                tally.versions[version] = tally.versions.get(version, 0) + 1
                if wrong:
                    tally.wrong.append(wrong)


def next_set(current: concept_set.ConceptSet, step: int, embeds: np.ndarray) -> concept_set.ConceptSet:
    """The soak's next concept set: concepts near the images' own embeddings (some fire), changed each step."""
    rng = np.random.default_rng(step)
    concepts = list(current.concepts)
    if step % 3 == 2 and concepts:
        concepts.pop(0)  # remove the oldest
    else:
        target = embeds[rng.integers(len(embeds))] + 0.3 * rng.standard_normal(embeds.shape[1])
        threshold = float(np.round(rng.uniform(0.3, 0.95), 3))
        name = f"soak-{step}"
        concepts.append(concept_set.make_concept(name, target, threshold, {"kind": "text", "text": f"soak {step}"}))
    if concepts and step % 4 == 3:
        first = concepts[0]
        concepts[0] = dataclasses.replace(first, threshold=0.5)
    return concept_set.parse(
        concept_writer.dumps(
            concept_set.ConceptSet(current.version + 1, current.embedding_dim, tuple(concepts), current.updated)
        ),
        embedding_dim=current.embedding_dim,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repository", type=Path, help="default: the tests' tiny checker, exported")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8: the server saturates)")
    parser.add_argument("--reload-every", type=float, default=60.0, help="seconds between concept-set changes")
    parser.add_argument("--kill", default=spec.EMBEDDER_MODEL, help="the model whose stub is killed part-way")
    parser.add_argument("--output", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60.0
    scratch = Path(tempfile.mkdtemp(prefix="soak-"))
    serve = None
    try:
        if args.repository is None:
            repository = tiny_repository(scratch)
        else:
            repository = shutil.copytree(args.repository, scratch / "repository")
        concept_file = repository / spec.POSTPROCESS_MODEL / spec.POSTPROCESS_VERSION / spec.CUSTOM_CONCEPTS_FILENAME
        http, grpc, metrics = free_port(), free_port(), free_port()
        serve = subprocess.Popen(
            [COMMAND, "serve", "--repository", str(repository), "--http-port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        for line in serve.stdout:
            if "Press Ctrl-C" in line:
                break
        if serve.poll() is not None:
            print(serve.stderr.read(), file=sys.stderr)
            return 1
        events: List[Tuple[float, str]] = []  # (when, line) of serve's stderr

        def pump() -> None:
            for line in serve.stderr:
                events.append((time.monotonic(), line))

        threading.Thread(target=pump, daemon=True).start()

        def tritonserver() -> Optional[int]:
            found = running(child_processes(serve.pid), "tritonserver")
            return found[0] if found else None

        sampler = Sampler(tritonserver, interval_s=1.0)
        grpc_url, http_url = f"127.0.0.1:{grpc}", f"127.0.0.1:{http}"
        images = np.random.default_rng(2026).standard_normal((16, 3, 224, 224)).astype(np.float32)
        images = np.clip(images * 0.5, -1.8, 2.1).astype(np.float32)
        uint8_images = np.random.default_rng(2027).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
        with SafetyCheckerClient(grpc_url) as client:
            baseline = client.infer(images)
        with SafetyCheckerClient(grpc_url, uint8=True) as client:
            uint8_baseline = client.infer(uint8_images)
        references = [Reference(baseline), Reference(uint8_baseline)]
        current = concept_set.read(concept_file)
        for reference in references:
            reference.sets[current.version] = current
        idle = sampler.samples[-1][1] if sampler.samples else None
        load_before = loadavg()

        tally = Tally()
        started = time.monotonic()
        until = started + duration
        threads = []
        for i in range(args.clients):
            protocol = ("grpc", "http")[i % 2]
            uint8 = i % 4 == 3  # one client in four sends uint8 images to safety_checker_uint8
            url = grpc_url if protocol == "grpc" else http_url
            data, reference = (uint8_images, references[1]) if uint8 else (images, references[0])
            threads.append(threading.Thread(target=load, args=(url, protocol, uint8, data, reference, tally, until, i)))
        for thread in threads:
            thread.start()

        kill_at, killed, killed_at, reloads = started + 0.4 * duration, None, None, []
        next_reload = started + args.reload_every / 2
        step = 0
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= next_reload:
                step += 1
                current = next_set(current, step, baseline[spec.IMAGE_EMBEDS.name])
                for reference in references:
                    reference.sets[current.version] = current  # known before the server can answer with it
                concept_writer.write(concept_file, current)
                reloads.append(
                    {"at_s": round(now - started, 1), "version": current.version, "concepts": len(current.concepts)}
                )
                next_reload = now + args.reload_every
            if killed is None and now >= kill_at:
                server = tritonserver()
                stubs = running(child_processes(server), f"/{args.kill}/1/model.py") if server else []
                if stubs:
                    os.kill(stubs[0], signal.SIGKILL)
                    killed, killed_at = {"model": args.kill, "at_s": round(now - started, 1), "pid": stubs[0]}, now
            time.sleep(0.5)
        for thread in threads:
            thread.join()
        sampler.stop()

        stopping = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
        stopped_s = time.monotonic() - stopping
        restored = [(when, e) for when, e in events if e.startswith("restored:")]
        faults = [(when, e) for when, e in events if e.startswith("fault:")]
        detected_s = faults[0][0] - killed_at if faults and killed_at else None
        restored_s = restored[0][0] - killed_at if restored and killed_at else None
        checks = {
            f"stub death noticed within {DETECTION_S:g} s": detected_s is not None and detected_s <= DETECTION_S,
            f"ready again within {RESTORATION_S:g} s": restored_s is not None and restored_s <= RESTORATION_S,
            f"serve stopped within {STOP_S:g} s of SIGTERM": serve.returncode == 0 and stopped_s <= STOP_S,
        }
        rss = [s[1] for s in sampler.samples]
        summary = {
            "minutes": args.minutes,
            "clients": len(threads),
            "requests": tally.sent,
            "answered": tally.answered,
            "unchecked": len(tally.unchecked),
            "lost": tally.sent - tally.answered - len(tally.unchecked),
            "wrong": len(tally.wrong),
            "retried_attempts": tally.retried,
            "latency_s": {
                "p50": round(float(np.percentile(tally.latencies_s, 50)), 3) if tally.latencies_s else None,
                "p99": round(float(np.percentile(tally.latencies_s, 99)), 3) if tally.latencies_s else None,
                "max": round(max(tally.latencies_s), 3) if tally.latencies_s else None,
            },
            "concept_set_versions_answered": {str(k): v for k, v in sorted(tally.versions.items())},
            "reloads": len(reloads),
            "stub_kill": killed,
            "faults_seen": [f.strip()[:160] for _, f in faults],
            "restorations": [r.strip()[:160] for _, r in restored],
            "stub_death_noticed_s": None if detected_s is None else round(detected_s, 1),
            "ready_again_s": None if restored_s is None else round(restored_s, 1),
            "serve_stopped_s": round(stopped_s, 1),
            "failed_checks": [name for name, passed in checks.items() if not passed],
            "rss_mb": {
                "before_load": round(idle) if idle else None,
                "peak": round(max(rss)) if rss else None,
                "end": round(float(np.median(rss[-10:]))) if rss else None,
            },
            "load_average_before": load_before,
            "load_average_after": loadavg(),
            "cores": len(os.sched_getaffinity(0)),
            "first_wrong": tally.wrong[:3],
            "first_unchecked": tally.unchecked[:3],
        }
        shift = started - sampler.started  # the samples' clock starts before the load's
        samples = [(t - shift, r, p) for t, r, p in sampler.samples]
        plot(samples, killed, reloads, args.output / "soak-rss.png", args.minutes)
        (args.output / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary))
        clean = summary["lost"] == 0 and summary["wrong"] == 0 and summary["unchecked"] == 0
        return 0 if clean and not summary["failed_checks"] else 1
    finally:
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


def plot(samples, killed, reloads, path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.array(samples) if samples else np.zeros((0, 3))
    figure, axis = plt.subplots(figsize=(9, 3.5))
    if len(data):
        axis.plot(data[:, 0], data[:, 1], label="RSS, tritonserver + stubs")
        axis.plot(data[:, 0], data[:, 2], label="PSS", alpha=0.7)
    for index, reload in enumerate(reloads):
        axis.axvline(reload["at_s"], color="grey", linestyle=":", label="concept set change" if index == 0 else None)
    if killed:
        axis.axvline(killed["at_s"], color="red", linestyle="--", label=f"{killed['model']} stub killed")
    axis.set_xlabel("s")
    axis.set_ylabel("MB")
    axis.set_title(f"soak: {minutes:g} minutes at saturation")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
