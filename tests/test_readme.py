"""The README is the first hour's contract: short, the start first, and every link in the docs leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")


def test_the_readme_is_short_and_starts_with_the_quick_start():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines"
    first = "\n".join(lines[:40])
    for command in ("make serve", "make test", "make demo"):
        assert command in first, f"{command} is not in README.md's first 40 lines"


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z][-a-z]*):", (ROOT / "Makefile").read_text(), re.M))
    # In code: a line of a shell block, or `make target` in the text.
    named = set(re.findall(r"(?:^|`)make ([a-z][-a-z]*)", README.read_text(), re.M))
    assert named and named <= targets, f"README.md names make targets the Makefile lacks: {named - targets}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> Set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _documents() -> Iterator[Path]:
    yield README
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted(ROOT.glob("*/README.md"))


def _links() -> Iterator[Tuple[str, Path, str]]:
    for document in _documents():
        text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
        for target in LINK.findall(text):
            yield f"{document.relative_to(ROOT)} -> {target}", document, target


LINKS = list(_links())


@pytest.mark.parametrize("name, document, target", LINKS, ids=[name for name, _, _ in LINKS])
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(name, document, target):
    path, _, anchor = target.partition("#")
    destination = (document.parent / path).resolve() if path else document
    assert destination.exists(), f"{name}: no such file"
    if anchor and destination.suffix == ".md":
        assert anchor in _anchors(destination), f"{name}: no such heading"


def test_the_example_records_are_what_check_prints():
    """The README's and docs/client.md's example lines hold the fields `check` writes, in its order."""
    import json

    from safety_checker_client.client import ANSWER_FIELDS

    pixel_fields = [name for name in ANSWER_FIELDS if name != "view"]  # `view` is for image files sent --encoded
    for document in (README, ROOT / "docs" / "client.md"):
        lines = [line for line in document.read_text().splitlines() if line.startswith('{"path": ')]
        assert len(lines) == 2, document
        answered, failed = (json.loads(line.replace(", ...]", "]")) for line in lines)
        assert list(answered) == ["path", *pixel_fields, "error"], document
        assert answered["error"] is None and list(failed) == ["path", "error"] and failed["error"], document
