"""Overload is answered fast, with bounded memory (finding 3).

Every model with a scheduler has a bounded queue: at most `max_queue_size`
waiting requests, and UNAVAILABLE for a request that waited longer than its
model's timeout; the ensembles have no queue of their own (Triton has none
for them) and hand each request straight to their first step's. Requests are
bounded in size by Triton (max_batch_size, the exact shape) and again by the
Python models themselves. Under a burst of 32-image requests the server
refuses what it cannot queue, answers the rest exactly, lets the health probe
(priority 1) through, and hands its memory back afterwards.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import serving

from bench.overload import Outcomes, client_loop, memory_mb
from export import configs
from export.models import PRIORITY_LEVELS, served_models
from export.served import served_module
from safety_checker_admin import health_probe
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient

GOAL_PEAK_MB = 1500
GOAL_AFTER_MB = 200


def _parsed():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for relative, text in configs.render_all(spec.REFERENCE_DIMS).items():
        yield relative, text_format.Parse(text, model_config_pb2.ModelConfig())


def test_every_scheduled_model_has_a_bounded_queue_that_refuses_with_unavailable():
    checked = 0
    for relative, config in _parsed():
        if config.platform == "ensemble":
            assert not config.HasField("dynamic_batching"), relative
            continue
        batching = config.dynamic_batching
        assert config.HasField("dynamic_batching"), relative
        policy = batching.default_queue_policy
        assert policy.max_queue_size > 0, relative
        assert policy.default_timeout_microseconds > 0, relative
        assert policy.timeout_action == policy.REJECT, relative  # Triton answers UNAVAILABLE
        assert batching.priority_levels == PRIORITY_LEVELS and batching.default_priority_level == PRIORITY_LEVELS
        assert health_probe.PROBE_PRIORITY < batching.default_priority_level, "the probe goes first"
        checked += 1
    assert checked == sum(len(m.variants) for m in served_models() if m.variants[0].backend != "ensemble")


def test_the_probe_names_the_served_contract():
    assert health_probe.PROBE_MODEL == spec.UINT8_ENSEMBLE_MODEL
    assert (health_probe.PROBE_INPUT, list(health_probe.PROBE_SHAPE[1:])) == (spec.IMAGES.name, list(spec.IMAGES.dims))
    assert health_probe.DECISION == spec.HAS_NSFW_CONCEPTS.name
    assert health_probe.VERSION == spec.CONCEPT_SET_VERSION.name


def test_the_python_models_own_request_limits():
    limits_module = served_module(spec.EMBEDDER_MODEL, "request_limits")
    (config,) = [c for r, c in _parsed() if r.parts[0] == spec.POSTPROCESS_MODEL]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    limits = limits_module.RequestLimits(parameters)
    assert limits.images(spec.MAX_BATCH_SIZE) is None
    assert "at most 32 images, this one 33" in limits.images(spec.MAX_BATCH_SIZE + 1)
    assert limits.parameters('{"strictness": "max"}') == ({"strictness": "max"}, None)
    assert limits.parameters("") == ({}, None)
    _, error = limits.parameters('{"x": "' + "y" * 2000 + '"}')
    assert "more than the 1024 allowed" in error
    _, error = limits.parameters('{"strictness": 1, "strictness": 2}')
    assert "given more than once" in error
    _, error = limits.parameters('{"' + "k" * 500 + '": 1}')
    assert len(error) < 500  # a name is quoted in at most 64 characters
    for reserved in ("priority", "timeout", "sequence_id", "binary_data_output"):
        assert limits.parameters(f'{{"{reserved}": 1}}') == ({}, None)


@pytest.mark.server
@pytest.mark.slow
def test_a_burst_is_refused_fast_answered_exactly_and_its_memory_handed_back(repository, parity_set):
    pixels = parity_set.pixels[: spec.MAX_BATCH_SIZE]
    started = serving(repository)
    server = next(started)
    try:
        with SafetyCheckerClient(server.grpc_url) as client:
            expected = client.infer(pixels)
        time.sleep(3.0)
        idle = min(memory_mb(server.pid)[0] for _ in range(8) if not time.sleep(0.25))

        outcomes, peak = Outcomes(), [idle]
        until = time.monotonic() + 15.0
        threads = [
            threading.Thread(
                target=client_loop,
                args=(
                    server.grpc_url if i % 2 else server.http_url,
                    "grpc" if i % 2 else "http",
                    pixels,
                    until,
                    outcomes,
                ),
            )
            for i in range(32)
        ]
        for thread in threads:
            thread.start()
        probes = []
        while time.monotonic() < until:
            peak[0] = max(peak[0], memory_mb(server.pid)[0])
            if len(probes) < 3 and time.monotonic() > until - 10:
                probes.append(health_probe.probe("127.0.0.1", server.ports["HTTP"], timeout_s=30))
            time.sleep(0.25)
        for thread in threads:
            thread.join()
        peak[0] = max(peak[0], memory_mb(server.pid)[0])

        # What the queues could not hold was refused with UNAVAILABLE; nothing else failed.
        assert outcomes.refused > 0 and outcomes.errors == [], outcomes.errors[:3]
        assert len(outcomes.latencies_s) > 0
        # The health probe goes ahead of the queue (priority 1): answered under the burst.
        assert all(status == health_probe.OK for status, _ in probes), probes
        # Memory: bounded at the peak, handed back afterwards (within 60 s).
        assert peak[0] - idle <= GOAL_PEAK_MB, (idle, peak)
        deadline = time.monotonic() + 60
        while memory_mb(server.pid)[0] - idle > GOAL_AFTER_MB and time.monotonic() < deadline:
            time.sleep(1.0)
        assert memory_mb(server.pid)[0] - idle <= GOAL_AFTER_MB, (idle, memory_mb(server.pid))
        # And what is answered is exactly what was answered before the burst.
        with SafetyCheckerClient(server.grpc_url) as client:
            after = client.infer(pixels)
        for name, value in expected.items():
            assert np.array_equal(after[name], value), name
    finally:
        next(started, None)
