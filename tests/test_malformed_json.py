"""Malformed JSON gets what docs/robustness.md says, case by case (finding 6).

Triton parses an inference request's JSON before any model sees it and answers
a body it cannot parse with 500 and its parser's message. That cannot be
changed in the served models, so it is documented: this test reads the table
in docs/robustness.md and sends every body in it, so the page and the server
never drift apart. After each, a good request is still answered.
"""

from __future__ import annotations

import re
from typing import List, Tuple

import pytest
from conftest import ROOT
from raw_requests import send_http_body
from test_bad_input import assert_still_serving

from safety_checker_client import spec

PAGE = ROOT / "docs" / "robustness.md"
SPECIAL = {"(empty)": b"", "(the bytes ff fe)": b"\xff\xfe"}


def documented() -> List[Tuple[bytes, int, str]]:
    text = PAGE.read_text()
    table = text[text.index("<!-- malformed-json:start -->") : text.index("<!-- malformed-json:end -->")]
    rows = []
    for line in table.splitlines():
        match = re.fullmatch(r"\| (.+) \| (\d{3}) \| `(.+)` \|", line)
        if not match:
            continue
        body, status, message = match.groups()
        data = SPECIAL[body] if body in SPECIAL else body.strip("`").encode()
        rows.append((data, int(status), message))
    return rows


def test_the_page_documents_the_cases():
    rows = documented()
    assert len(rows) >= 15
    assert {status for _, status, _ in rows} == {400, 500}


@pytest.mark.parametrize(
    "body, status, message", documented(), ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else None
)
def test_malformed_json_gets_what_the_page_says(server, body, status, message):
    got, text = send_http_body(
        server.http_url, f"/v2/models/{spec.ENSEMBLE_MODEL}/infer", body, {"Content-Type": "application/json"}
    )
    assert (got, text[: len(message)]) == (status, message), text
    assert_still_serving(server, "http")
