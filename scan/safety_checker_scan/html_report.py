"""`safety-checker scan --html`: one self-contained page for a moderator.

Everything is inside the file (styles, a few lines of script, the histogram as
inline SVG, thumbnails as data URIs), so it can be mailed or archived and
opens offline. Flagged images are shown blurred; a click (or Enter on the
focused thumbnail) reveals one, a second click blurs it again. A file name
that is not UTF-8 shows its other bytes as U+FFFD: the page is always UTF-8.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageOps

from safety_checker_scan.report import replace_atomically, shown
from safety_checker_scan.tally import ScanResult, Tally, rate_text

THUMBNAIL_SIZE = 192  # px, the longer side
MAX_THUMBNAILS = 2000  # beyond this the page would grow past ~15 MB; the rest are listed by path
MAX_ERROR_LINES = 1000
BLUR_PX = 18
HISTOGRAM_BINS = 40
FONT_PX = 11  # the histogram's labels
LABEL_GAP_PX = 6  # the least room between two axis labels
THRESHOLD_LABEL = "threshold (score &gt; 0 flags)"


def thumbnail_uri(path: str, size: int = THUMBNAIL_SIZE) -> Optional[str]:
    """A JPEG thumbnail of an image file as a data: URI (None if the file cannot be read any more)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                image = image.convert("RGBA")
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image)
            image = image.convert("RGB")
            image.thumbnail((size, size), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except Exception:  # gone, moved or unreadable since it was checked: the page says so instead
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram(values: Sequence[float], bins: int = HISTOGRAM_BINS) -> Tuple[List[float], List[int]]:
    """Bin edges and counts of the finite values; bins are (a, b] with 0, the threshold, on an edge.

    A score of exactly 0 does not fire, and falls in the bar left of 0; every
    bar holds only flagged or only unflagged images.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [-0.1, 0.0, 0.1], [0, 0]
    low, high = min(min(finite), -0.01), max(max(finite), 0.01)
    width = (high - low) / bins
    first, end = math.ceil(low / width) - 1, math.ceil(high / width)
    edges = [k * width for k in range(first, end + 1)]
    counts = [0] * (end - first)
    for value in finite:
        counts[min(max(math.ceil(value / width) - 1 - first, 0), len(counts) - 1)] += 1
    return edges, counts


def label_width(text: str) -> float:
    """The most a label takes across: 0.62 em per character covers the digits, signs and letters of a sans-serif
    font (HTML entities count as one character)."""
    return len(html.unescape(text)) * FONT_PX * 0.62


def axis_labels(ticks: Sequence[Tuple[float, str]], low: float, high: float) -> List[Tuple[float, str]]:
    """The (x, text) of each tick label that fits, in the order given (most wanted first), centred on its x (kept
    within [low, high]); one that would come nearer another than their half-widths and a gap is left out."""
    placed: List[Tuple[float, str]] = []
    for x, text in ticks:
        half = label_width(text) / 2
        x = min(max(x, low + half), high - half)
        if all(abs(x - other) >= half + label_width(them) / 2 + LABEL_GAP_PX for other, them in placed):
            placed.append((x, text))
    return placed


def histogram_svg(values: Sequence[float]) -> str:
    edges, counts = histogram(values)
    width, height, left, bottom, top, right = 720, 240, 48, 34, 12, 12
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(counts) or 1
    low, high = edges[0], edges[-1]
    x = lambda v: left + (v - low) / (high - low) * plot_w
    parts = [
        f'<svg id="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of the highest concept score per image">'
    ]
    for i, count in enumerate(counts):
        if not count:
            continue
        bar_h = count / peak * plot_h
        colour = "#c62828" if edges[i] >= 0 else "#78909c"
        parts.append(
            f'<rect x="{x(edges[i]):.1f}" y="{top + plot_h - bar_h:.1f}" '
            f'width="{max(x(edges[i + 1]) - x(edges[i]) - 1, 1):.1f}" '
            f'height="{bar_h:.1f}" fill="{colour}"><title>{edges[i]:.3f} to {edges[i + 1]:.3f}: {count}</title></rect>'
        )
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>'
        f'<line x1="{x(0):.1f}" y1="{top - 4}" x2="{x(0):.1f}" y2="{top + plot_h}" stroke="#c62828" '
        'stroke-dasharray="4 3"/>'
    )
    if x(0) + 4 + label_width(THRESHOLD_LABEL) <= width:
        parts.append(f'<text x="{x(0) + 4:.1f}" y="{top + 10}" font-size="{FONT_PX}" fill="#c62828">')
    else:  # near the right edge: to the left of the line
        parts.append(f'<text x="{x(0) - 4:.1f}" y="{top + 10}" font-size="{FONT_PX}" fill="#c62828" text-anchor="end">')
    parts.append(
        f"{THRESHOLD_LABEL}</text>"
        f'<text x="{left - 6}" y="{top + 10}" font-size="{FONT_PX}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 6}" y="{top + plot_h}" font-size="{FONT_PX}" text-anchor="end">0</text>'
    )
    # The range's ends first, then 0 where it fits (the dashed line marks it anyway).
    ticks = [(x(value), f"{value:+.3f}") for value in (low, high, 0.0)]
    for tick_x, text in axis_labels(ticks, 0.0, width):
        parts.append(
            f'<text class="tick" x="{tick_x:.1f}" y="{height - bottom + 16}" font-size="{FONT_PX}" '
            f'text-anchor="middle">{text}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle">'
        "highest concept score of each image</text></svg>"
    )
    return "".join(parts)


STYLE = f"""
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 17px; margin: 28px 0 8px; }}
.muted {{ color: #666; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 16px; min-width: 110px; }}
.card b {{ display: block; font-size: 22px; }} .card.flagged b {{ color: #c62828; }}
table {{ border-collapse: collapse; background: #fff; }}
td, th {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.bar {{ display: inline-block; height: 10px; background: #c62828; }}
#grid {{ display: flex; flex-wrap: wrap; gap: 14px; }}
.thumb {{ margin: 0; width: {THUMBNAIL_SIZE + 12}px; background: #fff; border: 1px solid #ddd; border-radius: 6px;
  padding: 6px; }}
.thumb button {{ display: block; width: {THUMBNAIL_SIZE}px; height: {THUMBNAIL_SIZE}px; padding: 0; border: 0;
  background: #222; overflow: hidden; cursor: pointer; position: relative;
  display: flex; align-items: center; justify-content: center; }}
.thumb img {{ display: block; max-width: 100%; max-height: 100%; filter: blur({BLUR_PX}px);
  transform: scale(1.08); }}
.thumb.revealed img {{ filter: none; transform: none; }}
.thumb button::after {{ content: "click to reveal"; position: absolute; left: 0; right: 0; bottom: 8px;
  color: #fff; font-size: 12px; text-shadow: 0 0 3px #000; }}
.thumb.revealed button::after {{ content: ""; }}
.thumb figcaption {{ font-size: 12px; word-break: break-all; margin-top: 4px; }}
.missing {{ color: #fff; font-size: 12px; padding: 8px; display: block; }}
"""

SCRIPT = """
document.querySelectorAll('.thumb button').forEach(function (button) {
  button.addEventListener('click', function () {
    var figure = button.closest('.thumb');
    var shown = figure.classList.toggle('revealed');
    button.setAttribute('aria-pressed', shown ? 'true' : 'false');
  });
});
"""


def render(
    tally: Tally,
    result: ScanResult,
    *,
    urls: Sequence[str],
    mode: str,
    strictness: object,
    report: Optional[str],
) -> str:
    """The page as text: `tally` counts the whole scan (with --resume, the report's earlier answers too), `result`
    this run (its images/s are this run's answers over this run's time, never the earlier ones')."""
    esc = html.escape
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    files = tally.checked + tally.errors + tally.skipped
    title = f"Safety checker scan: {tally.flagged} flagged of {tally.checked} checked"
    cards = [
        ("files", files, ""),
        ("images checked", tally.checked, ""),
        ("flagged", tally.flagged, "flagged"),
        ("errors", tally.errors, "flagged" if tally.errors else ""),
        *([("skipped (not images)", tally.skipped, "")] if tally.skipped else []),
        ("images/s this run", rate_text(result), ""),
        *([("resumed: already done", result.already_done, "")] if result.already_done else []),
    ]
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="muted">{esc(now)} &middot; servers {esc(", ".join(urls))} &middot; input {esc(mode)} &middot; '
        f"strictness {esc('server default' if strictness is None else str(strictness))}"
        + (f" &middot; report {esc(report)}" if report else "")
        + "</p>",
        '<section id="summary"><h2>Summary</h2><div class="cards">',
    ]
    for label, value, css in cards:
        out.append(f'<div class="card {css}"><b>{esc(str(value))}</b>{esc(label)}</div>')
    out.append("</div>")
    run_note = f"This run checked {result.this_run} images in {result.seconds:.1f} s"
    if result.already_done:
        run_note += f"; {result.already_done} were already checked in the report"
    if result.interrupted:
        run_note += "; it was interrupted before the end"
    out.append(f'<p class="muted">{esc(run_note)}.</p></section>')

    out.append(
        '<section id="concepts"><h2>Flagged images per concept</h2><p class="muted">Special-care concepts never '
        "flag an image on their own and are not counted; each image's caption lists every concept that fired.</p>"
    )
    if tally.per_concept:
        peak = max(tally.per_concept.values())
        out.append("<table><tr><th>concept</th><th>flagged images</th><th></th></tr>")
        for name, count in sorted(tally.per_concept.items(), key=lambda kv: (-kv[1], kv[0])):
            out.append(
                f'<tr><td>{esc(name)}</td><td class="n">{count}</td>'
                f'<td><span class="bar" style="width:{max(2, round(160 * count / peak))}px"></span></td></tr>'
            )
        out.append("</table>")
    else:
        out.append("<p>No image was flagged.</p>")
    out.append("</section>")

    out.append('<section id="scores"><h2>Score histogram</h2>')
    out.append(histogram_svg(list(tally.top_scores)))
    out.append("</section>")

    out.append(f'<section id="flagged"><h2>Flagged images ({tally.flagged})</h2>')
    if tally.flagged_images:
        out.append('<p class="muted">Blurred: click an image to reveal it, click again to blur it.</p><div id="grid">')
        for index, entry in enumerate(tally.flagged_images[:MAX_THUMBNAILS]):
            uri = thumbnail_uri(entry.location)
            inner = (
                f'<img src="{uri}" alt="flagged image {index + 1}">'
                if uri
                else '<span class="missing">image no longer readable</span>'
            )
            concepts = ", ".join(entry.fired) or "-"
            out.append(
                f'<figure class="thumb" id="thumb-{index}"><button type="button" aria-pressed="false" '
                f'title="click to reveal">{inner}</button><figcaption>{esc(entry.path)}'
                + (f"<br>now at {esc(entry.location)}" if entry.location != entry.path else "")
                + f'<br><span class="muted">{esc(concepts)} &middot; score {entry.top_score:+.3f}</span>'
                "</figcaption></figure>"
            )
        out.append("</div>")
        rest = tally.flagged_images[MAX_THUMBNAILS:]
        if rest:
            out.append(f"<p>{len(rest)} more flagged images (no thumbnails):</p><ul>")
            out.extend(f"<li>{esc(entry.path)}</li>" for entry in rest)
            out.append("</ul>")
    else:
        out.append("<p>None.</p>")
    out.append("</section>")

    if tally.error_lines:
        out.append(
            f'<section id="errors"><h2>Errors ({tally.errors})</h2><details><summary>files not checked</summary><ul>'
        )
        for path, error in tally.error_lines[:MAX_ERROR_LINES]:
            out.append(f"<li><b>{esc(path)}</b>: {esc(error)}</li>")
        if len(tally.error_lines) > MAX_ERROR_LINES:
            out.append(f"<li>... and {len(tally.error_lines) - MAX_ERROR_LINES} more (see the report)</li>")
        out.append("</ul></details></section>")
    if tally.skipped_paths:
        out.append(
            f'<section id="skipped"><h2>Skipped ({tally.skipped})</h2><details><summary>files that are not images'
            "</summary><ul>"
        )
        out.extend(f"<li>{esc(path)}</li>" for path in tally.skipped_paths[:MAX_ERROR_LINES])
        if len(tally.skipped_paths) > MAX_ERROR_LINES:
            out.append(f"<li>... and {len(tally.skipped_paths) - MAX_ERROR_LINES} more (see the report)</li>")
        out.append("</ul></details></section>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return shown("\n".join(out) + "\n")


def write_page(path: str, tally: Tally, result: ScanResult, options, report: Optional[str] = None) -> str:
    """Render the page for a finished scan and write it atomically; returns the path."""
    text = render(
        tally,
        result,
        urls=options.urls,
        mode=options.mode,
        strictness=options.strictness,
        report=report,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomically(path, lambda handle: handle.write(text))
    return path
