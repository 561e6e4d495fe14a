"""A search's report: report.json (everything), report.md (the trials table) and report.html (the table,
the Pareto front of speed against fidelity, and the images of the baseline, the best and the runner-up).

Like the bench report, it is derived from report.json alone and self-contained (images and the plot are
embedded), so it can be mailed around.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from dgrun.records import write_json, write_text

COLUMNS = (
    "trial",
    "status",
    "steps",
    "generate",
    "s/img",
    "img/s",
    "speedup",
    "PSNR min",
    "SSIM",
    "adherence",
    "why",
)


def _steps(trial: dict[str, Any]) -> str:
    items = trial.get("overrides", {}).get("optimize") or []
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(item)
        else:
            ((name, params),) = item.items()
            parts.append(
                name + ("(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")
            )
    return ", ".join(parts) or "(none)"


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def row(trial: dict[str, Any]) -> dict[str, str]:
    generate = trial.get("overrides", {}).get("generate") or {}
    psnr = "∞" if trial.get("identical") else _number(trial.get("psnr_min_db"), 2)
    why = trial.get("reason") or "; ".join(trial.get("violations") or [])
    return {
        "trial": str(trial.get("number", "")),
        "status": trial.get("status", ""),
        "steps": _steps(trial),
        "generate": ", ".join(f"{k}={v}" for k, v in generate.items()),
        "s/img": _number(trial.get("latency_s"), 4),
        "img/s": _number(trial.get("throughput"), 2),
        "speedup": f"{trial['speedup']:.2f}×" if trial.get("speedup") else "–",
        "PSNR min": psnr,
        "SSIM": _number(trial.get("ssim_mean"), 4),
        "adherence": _number(trial.get("adherence"), 3),
        "why": why,
    }


def markdown(report: dict[str, Any]) -> str:
    best = report.get("best")
    lines = [f"# dgrun tune: {report['recipe']['name']}", ""]
    baseline = report.get("baseline") or {}
    lines.append(f"Objective: {report['objective']}; constraints: {_constraints(report)}.")
    lines.append(f"Baseline: {_number(baseline.get('latency_s'), 4)} s/image.")
    if best:
        lines.append(
            f"Best: trial {best['number']} ({_steps(best)}); tuned recipe `{report['tuned_recipe']}`."
        )
    else:
        lines.append("No trial met every constraint; the nearest misses are listed below.")
    if report.get("shortfall"):
        lines.append(report["shortfall"] + ".")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for trial in report["trials"]:
        cells = row(trial)
        lines.append("| " + " | ".join(cells[c].replace("|", "/") for c in COLUMNS) + " |")
    if report.get("nearest_misses"):
        lines += ["", "Nearest misses:"]
        lines += [
            f"- trial {t['number']}: {'; '.join(t.get('violations') or [])}" for t in report["nearest_misses"]
        ]
    return "\n".join(lines) + "\n"


def _constraints(report: dict[str, Any]) -> str:
    items = [f"{k} {v}" for k, v in (report.get("constraints") or {}).items() if v is not None]
    return ", ".join(items) or "none"


def pareto_plot(report: dict[str, Any]) -> bytes | None:
    """Latency against worst PSNR for every measured trial; the Pareto front joined by a line."""
    measured = [
        t for t in report["trials"] if t.get("latency_s") and t.get("status") in ("feasible", "infeasible")
    ]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    def fidelity(trial: dict[str, Any]) -> float:
        return 60.0 if trial.get("identical") or trial.get("psnr_min_db") is None else trial["psnr_min_db"]

    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=100)
    for status, colour in (("feasible", "tab:green"), ("infeasible", "tab:red")):
        points = [t for t in measured if t["status"] == status]
        axes.scatter([t["latency_s"] for t in points], [fidelity(t) for t in points], c=colour, label=status)
        for t in points:
            axes.annotate(
                str(t["number"]),
                (t["latency_s"], fidelity(t)),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    front, best_psnr = [], -1.0
    for trial in sorted(measured, key=lambda t: t["latency_s"]):
        if fidelity(trial) > best_psnr:
            front.append(trial)
            best_psnr = fidelity(trial)
    axes.plot(
        [t["latency_s"] for t in front],
        [fidelity(t) for t in front],
        "k--",
        linewidth=1,
        label="Pareto front",
    )
    baseline = (report.get("baseline") or {}).get("latency_s")
    if baseline:
        axes.axvline(baseline, color="grey", linewidth=1, label="baseline")
    axes.set_xlabel("seconds per image (lower is faster)")
    axes.set_ylabel("worst PSNR vs baseline, dB (identical: 60)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def _images(out_dir: Path, run_dir: str | None, limit: int = 4) -> list[str]:
    if not run_dir:
        return []
    folder = out_dir / "trials" / run_dir
    return [base64.b64encode(p.read_bytes()).decode("ascii") for p in sorted(folder.glob("*.png"))[:limit]]


def render_html(report: dict[str, Any], out_dir: Path) -> str:
    escape = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>dgrun tune: {escape(report['recipe']['name'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}",
        "td,th{border:1px solid #ccc;padding:3px 6px}tr.feasible{background:#efe}",
        "tr.infeasible{background:#fee}tr.rejected,tr.pruned{color:#888}",
        "img{image-rendering:pixelated;width:128px;margin:2px}</style></head><body>",
        f"<h1>dgrun tune: {escape(report['recipe']['name'])}</h1>",
        f"<pre>{escape(markdown(report).split(chr(10) + chr(10) + '|')[0])}</pre>",
    ]
    plot = pareto_plot(report)
    if plot:
        encoded = base64.b64encode(plot).decode()
        parts.append(
            f"<h2>Speed against fidelity</h2><img style='width:700px' src='data:image/png;base64,{encoded}'>"
        )
    parts.append("<h2>Images</h2><table><tr><th>baseline</th><th>best</th><th>runner-up</th></tr><tr>")
    sources = [
        (report.get("baseline") or {}).get("run_dir"),
        (report.get("best") or {}).get("run_dir"),
        (report.get("runner_up") or {}).get("run_dir"),
    ]
    for run_dir in sources:
        cells = "".join(f"<img src='data:image/png;base64,{data}'>" for data in _images(out_dir, run_dir))
        parts.append(f"<td>{cells or '–'}</td>")
    parts.append(
        "</tr></table><h2>Trials</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>"
    )
    for trial in report["trials"]:
        cells = row(trial)
        parts.append(
            f"<tr class='{escape(trial.get('status', ''))}'>"
            + "".join(f"<td>{escape(cells[c])}</td>" for c in COLUMNS)
            + "</tr>"
        )
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
    write_text(out_dir / "report.html", render_html(report, out_dir))
