"""The docs' benchmark figures come from the committed results of one full run, written by `python -m bench.figures`.

Nothing here measures: the committed results are read, the docs compared with
what the generator writes from them, and the generator's rules checked on
small made-up results.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import figures

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = json.loads((DOCS / "benchmarks-results.json").read_text())
# The acceptance keys of issue 22's summary line, each with its spread's key.
ACCEPTANCE = {
    "pipeline_vs_embedder": "pipeline_vs_embedder_spread",
    "pipeline_images_per_s_per_core": "pipeline_images_per_s_per_core_spread",
    "scan_vs_server": "scan_vs_server_spread",
    "triton_vs_ort_min": "triton_vs_ort_spread",
    "triton_int8_vs_ort_int8_min": "triton_int8_vs_ort_int8_spread",
    "cascade_speedup_vs_diffusers": "cascade_speedup_vs_diffusers_spread",
}


def test_the_docs_say_what_the_committed_results_hold():
    assert figures.main(["--check"]) == 0


def test_the_committed_results_are_one_full_run_with_its_date_and_machine():
    assert RESULTS["settings"]["model"] == "full-size ViT-L/14, random weights"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", RESULTS["date"])
    assert RESULTS["machine"]["cpu_flags"] and "load_average" in RESULTS["machine"]
    summary = RESULTS["summary"]
    for key, spread in ACCEPTANCE.items():
        assert summary[key] > 0 and summary[spread] >= 0, key
    # The scan against the served checker ran over at least five minutes of work.
    served = RESULTS["scan"]["served"]
    assert served["images"] / served["images_per_s"] >= 300


def test_the_page_types_no_rate_outside_the_generated_part():
    page = (DOCS / "benchmarks.md").read_text()
    outside = page[: page.index(figures.BEGIN)] + page[page.index(figures.END) :]
    typed = re.findall(r"\d[\d.,]*\s*(?:images/s|images per second|x diffusers)", outside)
    assert typed == []


def _results(**summary):
    return {
        "date": "2026-12-05 12:00 UTC",
        "machine": {
            "description": "a CPU, 2 cores (avx2), CPU only",
            "cpu_flags": ["avx2", "fma"],
            "python": "3.11",
            "torch": "2",
            "onnxruntime": "1",
            "triton": "2.51",
            "load_average": {"start": 0.5, "end": 2.0},
        },
        "settings": {"model": "tiny", "rounds": 2, "window_s": 15.0, "duration_s": 600.0},
        "rows": [
            {"name": "onnxruntime fp32, batch 1", "kind": "ort", "batch": 1, "images_per_s": 1.25, "spread": 0.1},
            {
                "name": "pipeline float",
                "kind": "pipeline",
                "path": "float",
                "batch": 1,
                "concurrency": 8,
                "images_per_s": 200.0,
                "images_per_s_per_core": 100.0,
                "spread": 0.05,
            },
        ],
        "summary": summary,
    }


@pytest.mark.parametrize(
    "value, spread, flags, said",
    [
        (0.96, 0.1, ["avx2"], "met"),
        (0.90, 0.1, ["avx2"], "missed, within the spread"),  # 0.90 * 1.1 >= 0.95
        (0.80, 0.1, ["avx2"], "missed"),
    ],
)
def test_a_goal_is_met_missed_or_missed_within_its_spread(value, spread, flags, said):
    goal = figures.Goal("scan_vs_server", 0.95, "the scan")
    assert figures.verdict(goal, {"scan_vs_server": value, "scan_vs_server_spread": spread}, flags) == said


def test_a_min_figure_takes_its_ratios_spread_and_a_flagged_goal_needs_the_flag():
    summary = {"triton_vs_ort_min": 0.9, "triton_vs_ort_spread": 0.1, "cascade_speedup_vs_diffusers": 1.8}
    assert figures.verdict(figures.Goal("triton_vs_ort_min", 0.95, ""), summary, []) == "missed, within the spread"
    cascade = figures.Goal("cascade_speedup_vs_diffusers", 2.5, "", "avx512_vnni")
    assert figures.verdict(cascade, summary, ["avx2"]).startswith("not applicable")
    assert figures.verdict(cascade, summary, ["avx512_vnni"]) == "missed"
    assert figures.verdict(figures.Goal("scan_vs_server", 0.95, ""), summary, []) == "not measured"


def test_the_rendered_part_holds_the_machine_the_goals_the_rows_and_the_headline():
    rendered = figures.render(_results(scan_vs_server=0.97, scan_vs_server_spread=0.02, ort_images_per_s=1.25))
    assert rendered.startswith(figures.BEGIN) and rendered.endswith(figures.END)
    assert "ended 2026-12-05 12:00 UTC" in rendered and "`avx2 fma`" in rendered
    assert "0.50 at the start and 2.00 at the end" in rendered
    assert "| `scan_vs_server` | the scan" not in rendered  # the goal's own words, not the test's
    assert re.search(r"\| `scan_vs_server` \|[^\n]*\| 0\.970 \| 2% \|[^\n]*\| >= 0\.95 \| met \|", rendered)
    assert "| onnxruntime fp32, batch 1 | - | 1 | 1.250 | 10% |" in rendered
    assert "| float | 1 | 200.0 | 100.0 (c=8) | 5% | - |" in rendered  # the pipeline row in its own table
    line = json.loads(rendered.split("```json\n")[1].split("\n```")[0])
    assert line == {"ort_images_per_s": 1.25, "scan_vs_server": 0.97, "scan_vs_server_spread": 0.02}


def test_rewrite_replaces_the_generated_part_only_and_needs_both_markers():
    page = f"before\n{figures.BEGIN}\nold figures\n{figures.END}\nafter\n"
    assert figures.rewrite(page, "NEW") == "before\nNEW\nafter\n"
    with pytest.raises(ValueError, match="no"):
        figures.rewrite("a page without markers", "NEW")


def test_check_fails_when_the_docs_and_the_results_disagree_and_from_copies_a_run(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("benchmarks.md", "benchmarks-results.json"):
        shutil.copyfile(DOCS / name, docs / name)
    assert figures.main(["--check", "--docs", str(docs)]) == 0
    run = tmp_path / "run"
    run.mkdir()
    changed = json.loads((DOCS / "benchmarks-results.json").read_text())
    changed["date"] = "2027-01-01 00:00 UTC"
    (run / "results.json").write_text(json.dumps(changed))
    (run / "perf_analyzer.csv").write_text("row,round\n")
    (docs / "benchmarks-results.json").write_text(json.dumps(changed))
    assert figures.main(["--check", "--docs", str(docs)]) == 1  # the page still shows the old date
    assert figures.main(["--from", str(run), "--docs", str(docs)]) == 0
    assert "ended 2027-01-01 00:00 UTC" in (docs / "benchmarks.md").read_text()
    assert (docs / "benchmarks-perf_analyzer.csv").read_text() == "row,round\n"
    assert (docs / figures.PLOT).read_bytes().startswith(b"\x89PNG")  # drawn from the results copied
    assert figures.main(["--check", "--docs", str(docs)]) == 0
