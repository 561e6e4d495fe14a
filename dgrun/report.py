"""A bench's report in the forms people read: `report.md` (the table), `report.html` (table, plots, images).

`report.json` is the source of truth (written by `dgrun.bench`); everything here is derived from it, so a
report can be re-rendered from the JSON alone. Plots use matplotlib with the Agg backend, imported only
when a report is rendered, so `dgrun --help` and `dgrun check` stay light.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from dgrun.records import write_json, write_text
from dgrun.report_html import render_html
from dgrun.report_table import columns, row


def _describe_sweep(result: dict[str, Any]) -> str:
    sweep = result.get("sweep") or {}
    return ", ".join(f"{k}={v}" for k, v in sweep.items())


def markdown(report: dict[str, Any]) -> str:
    """The table and what a reader needs to trust it: settings, environment, failures, metric notes."""
    recipe = report["recipe"]
    env = report["environment"]
    shown = columns(report["variants"])
    lines = [
        f"# dgrun bench: {recipe['name']}",
        "",
        f"Status **{report['status']}** · started {report['started_at']} · device `{env['device']}` · "
        f"model `{recipe['model']['id']}` · {report['settings']['repeats']} timed repeats after "
        f"{report['settings']['warmup']} warmup pass(es) · recipe sha256 `{report['recipe_sha256'][:12]}`",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(shown))) + "|",
    ]
    for result in report["variants"]:
        cells = row(result)
        lines.append("| " + " | ".join(cells[c].replace("|", "\\|") for c in shown) + " |")
    lines.append("")
    notes = []
    for result in report["variants"]:
        steps = ", ".join(f"{s['step']} ({s['status']})" for s in result.get("plan") or []) or "no steps"
        sweep = _describe_sweep(result)
        detail = f"- **{result['name']}**: {steps}" + (f"; sweep {sweep}" if sweep else "")
        if result.get("error"):
            detail += f" — {result['status']}: {result['error'].splitlines()[0]}"
        adherence = result.get("adherence")
        if adherence and adherence.get("available"):
            scores = ", ".join(f"{k} {adherence[k]:.2f}" for k in ("colour", "shape", "background"))
            detail += f"; prompt adherence: {scores}"
        notes.append(detail)
    lines += ["## Variants", "", *notes, ""]
    metrics = report["metrics"]
    lpips = metrics["lpips"]
    lines += [
        "## Metrics",
        "",
        f"- PSNR: {metrics['psnr']}",
        f"- SSIM: {metrics['ssim']}",
        f"- LPIPS: {'computed' if lpips['available'] else 'absent (' + str(lpips['reason']) + ')'}",
        f"- Latency: {metrics['latency']}; speedup = {metrics['speedup']}; report.json also holds "
        "process CPU seconds per image (`latency.cpu_seconds_per_image`), steadier on a busy machine",
        "- Peak memory: CUDA max allocated on a GPU; on CPU the process's peak RSS while the variant ran",
        "",
        "## Environment",
        "",
        "| package | version |",
        "|---|---|",
        *(f"| {name} | {version} |" for name, version in env["versions"].items()),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def _measured(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report["variants"] if r.get("latency")]


def latency_plot(report: dict[str, Any]) -> bytes | None:
    """Median per-image latency per variant, whiskers from the fastest to the slowest timed image."""
    results = _measured(report)
    if not results:
        return None
    plt = _pyplot()
    names = [r["name"] for r in results]
    medians = [r["latency"]["median_seconds"] for r in results]
    lower = [m - r["latency"]["min_seconds"] for m, r in zip(medians, results, strict=True)]
    upper = [r["latency"]["max_seconds"] - m for m, r in zip(medians, results, strict=True)]
    colours = ["#7f7f7f" if r["role"] == "baseline" else "#1f77b4" for r in results]
    figure, axis = plt.subplots(figsize=(max(5.0, 0.75 * len(names) + 2), 3.6))
    axis.bar(names, medians, color=colours, yerr=[lower, upper], capsize=4)
    axis.set_ylabel("seconds per image (median, min–max)")
    axis.set_title("Latency per variant")
    axis.tick_params(axis="x", labelrotation=30)
    for label in axis.get_xticklabels():
        label.set_horizontalalignment("right")
    axis.grid(axis="y", alpha=0.3)
    return _png(figure)


def tradeoff_plot(report: dict[str, Any]) -> bytes | None:
    """Speedup against worst-image PSNR; identical variants sit on a marked ∞ line above the rest."""
    results = [r for r in _measured(report) if r.get("speedup") and r.get("fidelity")]
    if not results:
        return None
    plt = _pyplot()
    finite = [r["fidelity"]["psnr_min_db"] for r in results if r["fidelity"]["psnr_min_db"] is not None]
    top = (max(finite) if finite else 30.0) + 6.0
    figure, axis = plt.subplots(figsize=(6.0, 4.0))
    points = []
    for result in results:
        value = result["fidelity"]["psnr_min_db"]
        y = top if value is None or math.isinf(value) else value
        marker = "s" if result["role"] == "baseline" else "o"
        axis.scatter(result["speedup"], y, s=50, marker=marker, zorder=3)
        points.append((result["speedup"], y, result["name"]))
    # Neighbouring labels (identical variants share the ∞ line) alternate above and below their points.
    for number, (x, y, name) in enumerate(sorted(points)):
        offset = (6, 6 + 10 * (number % 2)) if number % 4 < 2 else (6, -12 - 10 * (number % 2))
        axis.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    axis.axhline(top, color="#999999", linestyle=":", linewidth=1)
    axis.axvline(1.0, color="#999999", linestyle="--", linewidth=1)
    axis.margins(x=0.2, y=0.18)
    if finite:
        ticks = [t for t in axis.get_yticks() if min(finite) - 3 < t < top - 2]
    else:
        axis.set_ylim(top - 5, top + 5)
        ticks = []
    axis.set_yticks([*ticks, top], [*(f"{t:g}" for t in ticks), "∞\nidentical"])
    axis.set_xlabel("speedup vs baseline (×)")
    axis.set_ylabel("PSNR vs baseline, worst image (dB)")
    axis.set_title("Speed against fidelity")
    axis.grid(alpha=0.3)
    return _png(figure)


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, report.md and the self-contained report.html, each written atomically."""
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
    plots = {"latency": latency_plot(report), "tradeoff": tradeoff_plot(report)}
    write_text(out_dir / "report.html", render_html(report, out_dir, plots))
