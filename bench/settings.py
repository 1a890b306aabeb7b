"""How much `python -m bench` measures: the full run (`make bench`) and the harness check (`--quick`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from bench.served import PerfSettings

# The concurrency gateway_vs_triton compares the gateway and Triton's own encoded path at (issue 19).
GATEWAY_CONCURRENCY = 8


@dataclass(frozen=True)
class Settings:
    window_s: float  # in-process and load-generator windows
    rounds: int
    warmup_s: float
    concurrency: Sequence[int]  # the served fp32 and int8 pixel rows (perf_analyzer)
    images_concurrency: Sequence[int]  # the image-file rows, Triton's own and the gateway's (load generator)
    cascade_concurrency: Sequence[int]  # the cascade, as exported and at each forced fallback
    batches: Sequence[int]  # for the in-process candidates
    perf: PerfSettings
    # Bounds on the files of the scan against the served checker (sized by the served rate within them), and the
    # seconds of the served rate's work it is sized to (issue 22: at least five minutes in a full run).
    scan_files: Tuple[int, int]
    scan_work_s: float
    # gateway_vs_triton's goal: the gateway's images/s over Triton's own encoded path, at GATEWAY_CONCURRENCY.
    gateway_goal: float
    # The pipeline rows (bench/pipeline.py): the tiny checker's paths at these request batches and concurrencies,
    # perf_analyzer's windows holding about as many images at every batch.
    pipeline_batches: Sequence[int] = (1, 8)
    pipeline_concurrency: Sequence[int] = (1, 2, 4, 8)
    pipeline_perf: PerfSettings = PerfSettings(
        min_requests=400, requests_per_client=50, stability_percentage=10, max_trials=6
    )


FULL = Settings(
    window_s=15.0,
    rounds=2,
    warmup_s=3.0,
    concurrency=tuple(range(1, 9)),
    images_concurrency=(1, 4, GATEWAY_CONCURRENCY),
    cascade_concurrency=(8,),
    batches=(1, 2, 3, 4),  # the in-process reference at batch min(c, best batch) for every concurrency c (issue 22)
    perf=PerfSettings(min_requests=16, requests_per_client=4, stability_percentage=10, max_trials=6),
    scan_files=(48, 4000),
    scan_work_s=300.0,
    gateway_goal=0.95,
)
QUICK = Settings(
    window_s=1.0,
    rounds=2,
    warmup_s=0.3,
    concurrency=(1, 2),
    images_concurrency=(1, GATEWAY_CONCURRENCY),
    cascade_concurrency=(2,),
    batches=(1,),
    # --quick checks the harness, not the machine: any three passes count as stable (on a loaded machine a 10%
    # criterion can leave every window unstable, with no CSV row to check).
    perf=PerfSettings(min_requests=20, requests_per_client=5, stability_percentage=1000, max_trials=4),
    scan_files=(48, 48),
    scan_work_s=0.0,
    gateway_goal=0.8,  # the tiny checker: the gateway's cost per image weighs more against a cheap model
    # pipeline_vs_embedder's point only (tests/test_bench_pipeline.py sends batch 8 through a server).
    pipeline_batches=(1,),
    pipeline_concurrency=(8,),
    pipeline_perf=PerfSettings(min_requests=24, requests_per_client=3, stability_percentage=1000, max_trials=4),
)
# Fallback fractions the cascade is measured at, besides its own; of CASCADE_IMAGES images.
FORCED_FALLBACKS = (0.05, 0.20)
CASCADE_IMAGES = 20
# Images in the scan against a tiny checker (the client's ceiling).
CEILING_IMAGES = {"quick": 96, "full": 800}
