"""`report.html`: one self-contained page (no external files, fonts or scripts) that a user can mail around.

Images and plots are embedded as data URIs; large images are embedded as thumbnails (the full ones stay
in `variants/`). A few lines of script set `data-images-loaded` on <body> once every image has decoded,
which the report test reads from a headless browser.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any

from dgrun.report_table import columns, row

THUMBNAIL = 384  # px: larger images are embedded scaled down
DISPLAY = 160  # px: smallest on-screen size of a grid image (tiny models make 32 px images)

STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --bg: #f6f7f9; --accent: #2463eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; }
.meta { color: var(--muted); margin: 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e3f5e8; color: #17692e; }
.badge.bad { background: #fde7e7; color: #9b1c1c; }
.badge.warn { background: #fff3d6; color: #8a5a00; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px;
        overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 5px 7px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
table.results { font-size: 13px; }
table.results td:first-child { white-space: normal; min-width: 120px; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
thead th { font-size: 12px; color: var(--muted); font-weight: 600; background: #fafbfc; }
tr.baseline td { background: #f3f5f8; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots figure { margin: 0; flex: 1 1 480px; }
.plots img { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
table.grid th, table.grid td { text-align: center; vertical-align: top; white-space: normal; }
table.grid th.prompt { text-align: left; max-width: 220px; font-weight: 500; }
table.grid img { image-rendering: pixelated; border-radius: 4px; border: 1px solid var(--line);
                 background: #fff; }
.caption { font-size: 12px; color: var(--muted); margin-top: 2px; }
.missing { display: inline-block; padding: 20px 8px; color: var(--muted); }
ul.variants { padding-left: 18px; margin: 0; }
ul.variants li { margin: 4px 0; }
code { font-size: 12px; background: #eef1f5; padding: 1px 4px; border-radius: 3px; }
"""

SCRIPT = """
(function () {
  function check() {
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.every(function (i) { return i.complete && i.naturalWidth > 0; });
    document.body.setAttribute("data-images-count", String(images.length));
    document.body.setAttribute("data-images-loaded", loaded ? "true" : "false");
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _image_uri(path: Path) -> tuple[str, int, int] | None:
    """The image as a PNG data URI (a thumbnail when large) and its original width and height."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            picture = image.convert("RGB")
    except OSError:
        return None
    if max(width, height) > THUMBNAIL:
        picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")  # re-encoded without metadata: the page needs only the pixels
    return data_uri(buffer.getvalue()), width, height


def _status_badge(status: str) -> str:
    kind = "" if status == "complete" else ("warn" if status in ("interrupted", "running") else "bad")
    return f'<span class="badge {kind}">{escape(status)}</span>'


def _results_table(report: dict[str, Any]) -> str:
    shown = columns(report["variants"])
    head = "".join(f"<th>{escape(c)}</th>" for c in shown)
    rows = []
    for result in report["variants"]:
        cells = row(result)
        klass = ' class="baseline"' if result["role"] == "baseline" else ""
        tds = "".join(
            f"<td>{_status_badge(result['status']) if c == 'status' else escape(cells[c])}</td>"
            for c in shown
        )
        rows.append(f"<tr{klass}>{tds}</tr>")
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _fidelity_caption(image: dict[str, Any], role: str) -> str:
    fidelity = image.get("fidelity") or {}
    if role == "baseline":
        return "reference"
    if not fidelity.get("comparable"):
        return escape(fidelity.get("reason", "not compared"))
    if fidelity["identical"]:
        return "identical"
    return f"PSNR {fidelity['psnr_db']:.1f} dB<br>SSIM {fidelity['ssim']:.3f}"


def _grid(report: dict[str, Any], out_dir: Path) -> str:
    """Rows = prompts (each image of a prompt), columns = baseline, recipe and variants."""
    results = report["variants"]
    keys: dict[tuple[int, int], dict[str, Any]] = {}
    for result in results:
        for image in result.get("images") or []:
            keys.setdefault((image["prompt_index"], image["image_index"]), image)
    if not keys:
        return '<p class="meta">No images were generated.</p>'
    head = '<th class="prompt">prompt</th>' + "".join(f"<th>{escape(r['name'])}</th>" for r in results)
    body = []
    for key in sorted(keys):
        first = keys[key]
        label = f"{escape(first['prompt'])}<div class='caption'>seed {first['seed']}</div>"
        cells = [f'<th class="prompt">{label}</th>']
        for result in results:
            image = next(
                (i for i in result.get("images") or [] if (i["prompt_index"], i["image_index"]) == key), None
            )
            embedded = _image_uri(out_dir / image["path"]) if image else None
            if image is None or embedded is None:
                cells.append(f'<td><span class="missing">{escape(result["status"])}</span></td>')
                continue
            uri, width, height = embedded
            display = DISPLAY if len(results) <= 5 else DISPLAY * 4 // 5
            scale = max(1, display // max(width, height))
            shown_w, shown_h = min(width * scale, THUMBNAIL), min(height * scale, THUMBNAIL)
            alt = f"{result['name']}: {first['prompt']}"
            cells.append(
                f'<td><img src="{uri}" width="{shown_w}" height="{shown_h}" alt="{escape(alt)}">'
                f'<div class="caption">{_fidelity_caption(image, result["role"])}</div></td>'
            )
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _variant_notes(report: dict[str, Any]) -> str:
    items = []
    for result in report["variants"]:
        steps = ", ".join(
            f"<code>{escape(s['step'])}</code> {escape(s['status'])}"
            + (f" ({escape(str(s['detail']))})" if s.get("detail") else "")
            for s in result.get("plan") or []
        )
        text = f"<b>{escape(result['name'])}</b> — {steps or 'no optimization steps'}"
        if result.get("sweep"):
            text += " · sweep " + ", ".join(
                f"<code>{escape(k)}={escape(str(v))}</code>" for k, v in result["sweep"].items()
            )
        if result.get("description"):
            text += f" · {escape(result['description'])}"
        if result.get("error"):
            text += f" · <span class='badge bad'>{escape(result['error'].splitlines()[0])}</span>"
        adherence = result.get("adherence")
        if adherence and adherence.get("available"):
            text += f" · prompt adherence {adherence['all']:.2f}"
        items.append(f"<li>{text}</li>")
    return f'<ul class="variants">{"".join(items)}</ul>'


def _meta_line(report: dict[str, Any]) -> str:
    recipe, settings = report["recipe"], report["settings"]
    parts = [
        f"model <code>{escape(recipe['model']['id'])}</code>",
        f"device <code>{escape(report['environment']['device'])}</code>",
        f"{settings['repeats']} timed repeat(s) after {settings['warmup']} warmup pass(es)",
        f"started {escape(report['started_at'])}",
        f"recipe sha256 <code>{escape(report['recipe_sha256'][:12])}</code>",
    ]
    return " · ".join(parts)


def render_html(report: dict[str, Any], out_dir: Path, plots: dict[str, bytes | None]) -> str:
    recipe, env = report["recipe"], report["environment"]
    lpips = report["metrics"]["lpips"]
    figures = []
    captions = {
        "latency": "Median seconds per image over the timed repeats; whiskers span the fastest and slowest.",
        "tradeoff": "Speedup against the worst image's PSNR; variants identical to the baseline sit on ∞.",
    }
    for name, png in plots.items():
        if png:
            figures.append(
                f'<figure><img src="{data_uri(png)}" alt="{escape(name)} plot">'
                f"<figcaption>{escape(captions.get(name, ''))}</figcaption></figure>"
            )
    versions = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in env["versions"].items()
    )
    lpips_note = "computed" if lpips["available"] else f"absent: {lpips['reason']}"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dgrun bench: {escape(recipe["name"])}</title>
<style>{STYLE}</style>
</head>
<body data-images-loaded="pending">
<main>
<h1>dgrun bench · {escape(recipe["name"])} {_status_badge(report["status"])}</h1>
<p class="meta">{_meta_line(report)}</p>
<h2>Results</h2>
<div class="card">{_results_table(report)}
<p class="meta">Speedup = baseline median ÷ variant median. PSNR and SSIM compare each image with the
baseline's (worst PSNR, mean SSIM). LPIPS {escape(lpips_note)}. Peak memory: CUDA max allocated on a GPU,
peak RSS while the variant ran on CPU.</p></div>
<h2>Plots</h2>
<div class="plots card">{"".join(figures) or '<p class="meta">Nothing was timed.</p>'}</div>
<h2>Images</h2>
<div class="card">{_grid(report, out_dir)}</div>
<h2>Variants</h2>
<div class="card">{_variant_notes(report)}</div>
<h2>Environment</h2>
<div class="card"><table><thead><tr><th>package</th><th>version</th></tr></thead>
<tbody>{versions}</tbody></table></div>
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""
