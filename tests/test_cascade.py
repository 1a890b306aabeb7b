"""`python -m export --cascade`: the int8 embedder answers first, fp32 wherever int8 could decide otherwise.

Judged by diffusers' own forward() in fp32 on the parity set, crafted margins
around every rounding boundary and the special-care cascade included.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

import numpy as np
import pytest
import torch
from conftest import exported, run_export, serving
from reference import diffusers_forward

from safety_checker_client import spec
from safety_checker_client.client import CheckError, SafetyCheckerClient
from safety_checker_served import scoring


@pytest.fixture(scope="module")
def cascade_repository(parity_set, tmp_path_factory):
    target = tmp_path_factory.mktemp("cascade")
    result = run_export(parity_set.checker_dir, target, "--cascade")
    assert result.returncode == 0, result.stderr
    assert "int8/fp32 cascade" in result.stdout
    return target


@pytest.fixture(scope="module")
def cascade_server(cascade_repository):
    yield from serving(cascade_repository)


@pytest.fixture(scope="module")
def bound(cascade_repository) -> float:
    report = json.loads((cascade_repository / spec.INT8_EMBEDDER_MODEL / "1" / "quantization.json").read_text())
    assert report["cosine_bound"] == report["safety_factor"] * report["max_embedding_distance"] > 0
    config = (cascade_repository / spec.CASCADE_MODEL / "config.pbtxt").read_text()
    assert f'string_value: "{report["cosine_bound"]!r}"' in config
    return report["cosine_bound"]


@pytest.fixture(scope="module")
def expected(parity_set, reference_checker):
    return diffusers_forward(reference_checker, torch.from_numpy(parity_set.pixels))


def answers(server, pixels, **kwargs):
    with SafetyCheckerClient(server.grpc_url) as client:
        return client.check_batch(pixels, **kwargs)


def cascade_counts(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=30).read().decode()
    prefix = "safety_checker_cascade_images_total{"
    return {
        line.split('embedder="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


@pytest.mark.server
def test_cascade_decides_as_diffusers_fp32(cascade_server, parity_set, expected, bound):
    before = cascade_counts(cascade_server)
    results = answers(cascade_server, parity_set.pixels)
    flagged, concept, special = expected
    np.testing.assert_array_equal([r.flagged for r in results], flagged)  # every decision, crafted ones included
    exact = np.array([r.exact_scores for r in results])
    got_concept = np.array([r.concept_scores for r in results])
    got_special = np.array([r.special_scores for r in results])
    np.testing.assert_allclose(got_concept[exact], concept[exact], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_special[exact], special[exact], rtol=0, atol=1e-6)
    # Answered from int8: every score within the bound (and one rounding step) of fp32's.
    assert np.all(np.abs(got_concept[~exact] - concept[~exact]) <= bound + 0.001 + 1e-6)
    assert np.all(np.abs(got_special[~exact] - special[~exact]) <= bound + 0.001 + 1e-6)
    # The crafted inputs sit within 0.0006 of a boundary: none can be answered from int8.
    assert exact[parity_set.crafted_offset :].all()
    assert (~exact).sum() >= 10, "the set must exercise answers from int8 too"
    after = cascade_counts(cascade_server)
    assert after["fp32"] - before.get("fp32", 0) == exact.sum()
    assert after["int8"] - before.get("int8", 0) == (~exact).sum()


@pytest.mark.server
def test_cascade_follows_strictness_and_the_uint8_ensemble(cascade_server, server, parity_set):
    pixels = parity_set.pixels[:48]
    for strictness in ("strong", -0.02):
        cascaded = answers(cascade_server, pixels, strictness=strictness)
        plain = answers(server, pixels, strictness=strictness)
        assert [r.flagged for r in cascaded] == [r.flagged for r in plain]
        assert {r.strictness_adjustment for r in cascaded} == {r.strictness_adjustment for r in plain}
    with SafetyCheckerClient(cascade_server.grpc_url, uint8=True) as client:
        from fixtures.photos import photos

        pictures = list(photos().values())
        via_uint8 = client.check(pictures)
    with SafetyCheckerClient(server.grpc_url) as client:
        via_pixels = client.check(pictures)
    assert [r.flagged for r in via_uint8] == [r.flagged for r in via_pixels]


@pytest.mark.server
def test_cascade_refuses_non_finite_pixels(cascade_server, parity_set):
    pixels = parity_set.pixels[:3].copy()
    pixels[1, 0, 0, 0] = np.nan
    with pytest.raises(CheckError, match="non-finite"):
        answers(cascade_server, pixels)
    assert len(answers(cascade_server, parity_set.pixels[:3])) == 3


def test_plain_repositories_say_whether_their_answers_are_exact(server, parity_set):
    assert all(r.exact_scores for r in answers(server, parity_set.pixels[:32]))


def _random_rows(rng, n, k, s, c):
    thresholds = [rng.uniform(0.15, 0.25, size) for size in (k, s, c)]
    cosines = [t + rng.uniform(-0.12, 0.12, (n, len(t))) for t in thresholds]
    return cosines, thresholds


@pytest.mark.parametrize("bound", [0.0005, 0.003, 0.02])
def test_a_certain_decision_survives_any_cosines_within_the_bound(bound):
    """The rule behind exact_scores: where `certain` says so, moving every cosine by up to the bound (to its
    extremes too) changes no decision, built-in, special-care or custom, whatever the strictness."""
    rng = np.random.default_rng(int(bound * 1e6))
    n = 4000
    (concept, special, custom), (concept_t, special_t, custom_t) = _random_rows(rng, n, 17, 3, 2)
    strictness = rng.choice([0.0, 0.015, -0.0175], n)
    sure = scoring.certain(
        concept, special, concept_t, special_t, 0.01, strictness, custom, custom_t, np.full(n, bound)
    )
    assert 0 < sure.sum() < n  # the set has both kinds

    def decisions(concept, special, custom):
        scores = scoring.score_all(concept, special, concept_t, special_t, 0.01, strictness, custom, custom_t)
        return scores.flagged, scores.special_scores > 0, scores.concept_scores > 0, scores.custom_scores > 0

    reference = decisions(concept, special, custom)
    for trial in range(6):
        shifts = [rng.choice([-bound, bound], x.shape) if trial < 2 else rng.uniform(-bound, bound, x.shape)
                  for x in (concept, special, custom)]  # fmt: skip
        moved = decisions(*(x + d for x, d in zip((concept, special, custom), shifts)))
        for a, b in zip(reference, moved):
            assert np.array_equal(a[sure], b[sure])


def test_a_bound_of_zero_is_always_certain():
    rng = np.random.default_rng(3)
    (concept, special, custom), (concept_t, special_t, custom_t) = _random_rows(rng, 50, 17, 3, 0)
    sure = scoring.certain(concept, special, concept_t, special_t, 0.01, 0.0, custom, custom_t, np.zeros(50))
    assert sure.all()


@pytest.mark.slow
def test_switching_a_repository_between_cascade_and_plain_leaves_no_stale_model(parity_set, tmp_path):
    target = tmp_path / "repository"
    assert run_export(parity_set.checker_dir, target, "--cascade").returncode == 0
    assert (target / spec.CASCADE_MODEL).is_dir() and (target / spec.INT8_EMBEDDER_MODEL).is_dir()
    exported(parity_set.checker_dir, target)
    assert not (target / spec.CASCADE_MODEL).exists() and not (target / spec.INT8_EMBEDDER_MODEL).exists()


@pytest.mark.server
def test_a_forced_copy_sends_exactly_the_chosen_images_to_fp32(
    cascade_server, cascade_repository, parity_set, tmp_path
):
    """bench/cascade.py: the bound it picks for k of N images makes exactly those k fall back, through the served
    cascade (each image alone, as the bounds were found)."""
    from bench import cascade

    pixels = parity_set.pixels[:10]
    critical = cascade.critical_bounds(cascade_server.grpc_url, spec.INT8_EMBEDDER_MODEL, pixels)
    assert np.all((critical > 0) & (critical < cascade.UNCERTAIN_BOUND))
    repository = tmp_path / "repository"
    shutil.copytree(cascade_repository, repository, copy_function=os.link)
    forced = {k: cascade.bound_for(critical, k) for k in (1, 3)}
    for k, bound in forced.items():
        cascade.add_copy(repository, f"forced_{k}", bound)
    # The source keeps its own bound: the copy's config was written anew, not through the hard link.
    assert f'"{spec.CASCADE_MODEL}"' in (cascade_repository / spec.CASCADE_MODEL / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="between 1 and 9"):
        cascade.bound_for(critical, 10)

    forced_server = serving(repository)
    server = next(forced_server)
    try:
        for k, bound in forced.items():
            with SafetyCheckerClient(server.grpc_url, model_name=f"forced_{k}") as client:
                exact = [client.check_batch(pixels[i : i + 1])[0].exact_scores for i in range(len(pixels))]
            assert sum(exact) == k
            np.testing.assert_array_equal(exact, critical < bound)
    finally:
        next(forced_server, None)
