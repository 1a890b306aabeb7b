"""Every count of cases the docs state is the count of the test data it describes, taken from that data (imported,
collected or read from the committed results), never typed in here: a suite that grows or shrinks fails this
test until its docs say so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List

import pytest
from conftest import ROOT

# A number followed, within two words, by a noun that counts cases: what a claim below must account for.
COUNT = re.compile(r"\b(\d[\d,]*) (?:[\w-]+ ){0,2}(?:kinds|cases|bad requests)\b")


def _bad_requests() -> int:
    import test_bad_input

    return len({kind for kind, *_ in test_bad_input.BAD_REQUESTS})


def _adversarial_cases() -> int:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_adversarial.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = re.search(r"^(\d+) tests? collected", result.stdout, re.M)
    assert result.returncode == 0 and found, result.stdout[-2000:] + result.stderr[-2000:]
    return int(found.group(1))


def _benchmark_cascade_images() -> int:
    return json.loads((ROOT / "docs" / "benchmarks-results.json").read_text())["settings"]["cascade_images"]


@dataclass(frozen=True)
class Claim:
    """A phrase of the docs holding a count (its first group), and what the count must be."""

    pattern: str
    actual: Callable[[], int]
    source: str


CLAIMS = [
    Claim(r"(\d[\d,]*) kinds of bad request", _bad_requests, "tests/test_bad_input.py's BAD_REQUESTS"),
    Claim(r"(\d[\d,]*) hostile cases", _adversarial_cases, "the tests collected from tests/test_adversarial.py"),
    Claim(
        r"the benchmark's (\d[\d,]*) photographs",
        _benchmark_cascade_images,
        "cascade_images in docs/benchmarks-results.json",
    ),
]


def documents() -> Dict[str, str]:
    """README.md, docs/*.md and each folder's README.md, each with its white space collapsed (a phrase may break
    across lines)."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("*/README.md"))]
    return {str(path.relative_to(ROOT)): " ".join(path.read_text().split()) for path in paths}


def stated(pattern: str) -> List[tuple]:
    """(document, count) for every place the docs make a claim."""
    return [
        (name, int(match.group(1).replace(",", "")))
        for name, text in documents().items()
        for match in re.finditer(pattern, text)
    ]


@pytest.mark.parametrize("claim", CLAIMS, ids=[claim.pattern for claim in CLAIMS])
def test_every_count_the_docs_state_is_the_count_of_its_data(claim):
    places = stated(claim.pattern)
    assert places, f"no document says {claim.pattern!r} any more: reword or remove the claim here"
    actual = claim.actual()
    wrong = [(name, count) for name, count in places if count != actual]
    assert wrong == [], f"{claim.source} holds {actual}, the docs say otherwise"


def test_every_count_of_cases_in_the_docs_is_checked_here():
    unchecked = []
    for name, text in documents().items():
        claimed = [match.span() for claim in CLAIMS for match in re.finditer(claim.pattern, text)]
        for match in COUNT.finditer(text):
            if not any(start <= match.start() and match.end() <= end for start, end in claimed):
                unchecked.append((name, match.group(0)))
    assert unchecked == [], "counts of cases the docs state that no claim here checks: add a Claim for each"


def test_a_wrong_count_is_caught(monkeypatch):
    """The check itself can fail: the docs' own number, one off."""
    claim = CLAIMS[0]
    monkeypatch.setattr(sys.modules[__name__], "documents", lambda: {"doc.md": "sends 51 kinds of bad request"})
    with pytest.raises(AssertionError, match="the docs say otherwise"):
        test_every_count_the_docs_state_is_the_count_of_its_data(Claim(claim.pattern, lambda: 52, claim.source))
