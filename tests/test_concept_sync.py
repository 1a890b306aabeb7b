"""How a concepts command confirms a change with the server, on a fake server and a fake clock: requests counted.

tests/test_concepts.py runs the commands against a real tritonserver.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import List, Union

import numpy as np
import pytest
from fake_clock import FakeClock

from safety_checker_admin.concept_store import ConceptCommandError
from safety_checker_admin.concept_sync import POLL_INTERVAL_S, check_server, wait_for_version
from safety_checker_client.errors import CheckError
from safety_checker_served import concept_set

PATH = Path("repository/safety_checker_postprocess/1/custom_concepts.json")


class FakeServer:
    """A client whose server answers with the next of `versions` (the last one from then on)."""

    url = "127.0.0.1:8001"

    def __init__(self, versions: List[Union[int, Exception]], width: int = 16) -> None:
        self.versions, self.width, self.requests = list(versions), width, 0

    def check_batch(self, pixels: np.ndarray) -> list:
        self.requests += 1
        version = self.versions.pop(0) if len(self.versions) > 1 else self.versions[0]
        if isinstance(version, Exception):
            raise version
        return [SimpleNamespace(concept_set_version=version, image_embeds=np.zeros(self.width, np.float32))]


def wait(server: FakeServer, version: int, timeout_s: float, clock: FakeClock) -> None:
    wait_for_version(server, version, timeout_s, PATH, monotonic=clock.monotonic, sleep=clock.sleep)


def test_the_wait_ends_at_the_first_answer_with_the_new_version():
    server, clock = FakeServer([1, 1, 1, 2]), FakeClock()
    wait(server, 2, 30.0, clock)
    assert server.requests == 4 and clock.sleeps == [POLL_INTERVAL_S] * 3
    server, clock = FakeServer([3]), FakeClock()  # a newer set than the one written: served already
    wait(server, 2, 30.0, clock)
    assert server.requests == 1 and clock.sleeps == []


def test_the_wait_gives_up_after_its_timeout_saying_what_the_server_answered():
    server, clock = FakeServer([1]), FakeClock()
    with pytest.raises(ConceptCommandError, match=r"wrote version 2 to .*, but after 2 s the server at 127\.0\.0\.1"):
        wait(server, 2, 2.0, clock)
    # Asked at 0, 0.25, ... 2.0 s: the last answer is the one the message reports.
    assert server.requests == int(2.0 / POLL_INTERVAL_S) + 1 and clock.now == 2.0
    server, clock = FakeServer([CheckError("connection refused", "unavailable")]), FakeClock()
    with pytest.raises(ConceptCommandError, match="did not answer"):
        wait(server, 2, 1.0, clock)
    assert server.requests == int(1.0 / POLL_INTERVAL_S) + 1
    server, clock = FakeServer([1, CheckError("restarting", "unavailable"), 1]), FakeClock()
    with pytest.raises(ConceptCommandError, match="still serves version 1"):
        wait(server, 2, 1.0, clock)


def test_a_server_that_evidently_serves_another_set_is_refused():
    current = concept_set.empty(16, version=4)
    check_server(FakeServer([4]), current, PATH)
    check_server(FakeServer([3]), current, PATH)  # not yet reloaded: the wait after the write sees to it
    with pytest.raises(ConceptCommandError, match="image embeddings of width 8, but .* has embedding_dim 16"):
        check_server(FakeServer([4], width=8), current, PATH)
    with pytest.raises(ConceptCommandError, match="serves concept set version 5, newer than"):
        check_server(FakeServer([5]), current, PATH)
    with pytest.raises(ConceptCommandError, match="cannot reach the server"):
        check_server(FakeServer([CheckError("connection refused", "unavailable")]), current, PATH)
