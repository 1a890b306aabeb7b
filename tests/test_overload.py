"""Overload is answered fast, with bounded memory (finding 3).

Every model with a scheduler has a bounded queue: at most `max_queue_size`
waiting requests, and UNAVAILABLE for a request that waited longer than its
model's timeout; the ensembles have no queue of their own (Triton has none
for them) and hand each request straight to their first step's. Requests are
bounded in size by Triton (max_batch_size, the exact shape) and again by the
Python models themselves. What a burst of 32-image requests does (refused
beyond the queues, answered exactly, the health probe let through, memory
handed back) is measured and checked by `make overload` (bench/overload.py),
not here: it depends on the machine's speed and load.
"""

from __future__ import annotations

from export import configs
from export.description import PRIORITY_LEVELS, SOURCE_REPOSITORY
from export.models import served_models
from safety_checker_admin.probe import load_health_probe
from safety_checker_client import spec
from safety_checker_served import request_limits

health_probe = load_health_probe(SOURCE_REPOSITORY)

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
    limits_module = request_limits
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
