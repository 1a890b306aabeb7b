"""The served Python code runs on the NGC 24.10 Python backend's Python 3.10, not only on this 3.11.

`make lint` runs vermin over it (3.10 as the minimum); these tests pin the one
behaviour that static check cannot see: date forms that Python 3.11's
fromisoformat accepts and 3.10's refuses, which would let the CLI (3.11) write
a concept file that the server (3.10) refuses to load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from safety_checker_served import concept_set


@pytest.mark.parametrize("text", ["2026-11-28", "2026-11-28T07:23:38+00:00", "2026-11-28T07:23:38.123456"])
def test_the_forms_python_writes_are_accepted(text):
    assert concept_set._iso_date(text)


@pytest.mark.parametrize(
    "text", ["20261128", "2026-W48-1", "2026-11-28T07:23:38Z", "2026-11-28T07:23", "2026-02-30", "2026-11-28 07:23:38"]
)
def test_forms_only_python_3_11_reads_are_refused(text):
    assert not concept_set._iso_date(text)


def test_vermin_finds_nothing_newer_than_3_10():
    served = [
        str(ROOT / "model_repository"),  # the model.py files and the health probe
        str(ROOT / "served" / "safety_checker_served"),
        *(
            str(ROOT / "client" / "safety_checker_client" / name)
            for name in ("spec.py", "preprocess.py", "strictness.py")
        ),
    ]
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("vermin")),
            "--no-tips",
            "--violations",
            "--target=3.10-",
            "--eval-annotations",
            *served,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
