"""The bench table's columns and cells, shared by the live table, report.md and report.html."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    "variant",
    "status",
    "load s",
    "apply s",
    "first call s",
    "median s/img",
    "min–max s/img",
    "img/s",
    "speedup",
    "peak mem",
    "PSNR dB (min)",
    "SSIM (mean)",
    "LPIPS",
)


ADHERENCE = "adherence"


def columns(results: list[dict[str, Any]]) -> tuple[str, ...]:
    """The table's columns; prompt adherence only where some variant could be scored (dgrun:default)."""
    scored = any((r.get("adherence") or {}).get("available") for r in results)
    return (*COLUMNS, ADHERENCE) if scored else COLUMNS


def plain_seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def memory(record: dict[str, Any] | None) -> str:
    if not record or record.get("bytes") is None:
        return "–"
    return f"{record['bytes'] / 2**20:,.0f} MiB"


def psnr_text(fidelity: dict[str, Any] | None) -> str:
    if not fidelity:
        return "–"
    if fidelity["identical"]:
        return "∞ (identical)"
    return "∞" if fidelity["psnr_min_db"] is None else f"{fidelity['psnr_min_db']:.2f}"


def row(result: dict[str, Any]) -> dict[str, str]:
    """One variant's table cells, shared by the live table, report.md and report.html."""
    timings, latency, fidelity = result.get("timings") or {}, result.get("latency"), result.get("fidelity")
    name = result["name"] + (" (recipe)" if result["role"] == "recipe" else "")
    lpips = fidelity.get("lpips_mean") if fidelity else None
    adherence = result.get("adherence") or {}
    return {
        "variant": name,
        "status": result["status"],
        "load s": plain_seconds(timings.get("load_seconds")),
        "apply s": plain_seconds(timings.get("apply_seconds")),
        "first call s": plain_seconds(timings.get("first_call_seconds")),
        "median s/img": plain_seconds(latency["median_seconds"]) if latency else "–",
        "min–max s/img": (f"{latency['min_seconds']:.3f}–{latency['max_seconds']:.3f}" if latency else "–"),
        "img/s": f"{latency['images_per_second']:.2f}" if latency and latency["images_per_second"] else "–",
        "speedup": f"{result['speedup']:.2f}×" if result.get("speedup") else "–",
        "peak mem": memory(result.get("peak_memory")),
        "PSNR dB (min)": psnr_text(fidelity),
        "SSIM (mean)": f"{fidelity['ssim_mean']:.4f}" if fidelity else "–",
        "LPIPS": f"{lpips:.4f}" if lpips is not None else "–",
        ADHERENCE: f"{adherence['all']:.2f}" if adherence.get("available") else "–",
    }
