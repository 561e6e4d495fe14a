"""How far an optimized image is from the baseline's, and how fast and large a variant ran.

Fidelity is measured on the 8-bit RGB pixels that were written, so it judges what a user gets: PSNR,
SSIM (our own, with the Gaussian window of Wang et al. 2004, so no scikit-image is needed), the largest
channel difference, and LPIPS where the `lpips` package and its weights are available here. Nothing here
imports torch except LPIPS, which needs it anyway.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PIXEL_MAX = 255.0
SHAPES_MODELS = ("dgrun:default", "dgrun:default-dit")


def as_pixels(image: Any) -> np.ndarray:
    """An image (PIL, or an array already in 0–255) as a float64 (H, W, 3) array."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB; `inf` for identical pixels."""
    mse = float(np.mean((reference - image) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(PIXEL_MAX**2 / mse)


def _gaussian(size: int, sigma: float) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur(channel: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filter of a 2-D array (rows, then columns)."""
    size = len(kernel)
    rows = np.lib.stride_tricks.sliding_window_view(channel, size, axis=1) @ kernel
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=0) @ kernel


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean structural similarity over the channels, Gaussian-weighted (σ 1.5, 11×11, valid region).

    Images smaller than the window use a window as large as the image (an odd size), so tiny test images
    still get a meaningful value.
    """
    size = min(SSIM_WINDOW, *reference.shape[:2])
    size -= (size + 1) % 2
    kernel = _gaussian(size, SSIM_SIGMA * size / SSIM_WINDOW)
    c1, c2 = (SSIM_K1 * PIXEL_MAX) ** 2, (SSIM_K2 * PIXEL_MAX) ** 2
    scores = []
    for channel in range(reference.shape[2]):
        x, y = reference[..., channel], image[..., channel]
        mu_x, mu_y = _blur(x, kernel), _blur(y, kernel)
        var_x = _blur(x * x, kernel) - mu_x**2
        var_y = _blur(y * y, kernel) - mu_y**2
        cov = _blur(x * y, kernel) - mu_x * mu_y
        numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        scores.append(float(np.mean(numerator / denominator)))
    return float(np.mean(scores))


@lru_cache(maxsize=1)
def lpips_status() -> tuple[Any, str | None]:
    """The LPIPS network, or None and why it is absent (package missing, weights not available offline)."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed"
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            network = lpips.LPIPS(net="alex", verbose=False)
    except Exception as exc:  # e.g. backbone weights that cannot be downloaded here
        return None, f"lpips could not load its network: {type(exc).__name__}: {exc}"
    return network.eval(), None


def lpips_distance(reference: np.ndarray, image: np.ndarray) -> float | None:
    network, _ = lpips_status()
    if network is None:
        return None
    if np.array_equal(reference, image):
        return 0.0
    import torch

    def tensor(pixels: np.ndarray) -> Any:
        return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None].float()

    with torch.no_grad():
        return float(network(tensor(reference), tensor(image)).item())


def compare(reference: Any, image: Any, with_lpips: bool = True) -> dict[str, Any]:
    """Fidelity of `image` against `reference`. PSNR is None when the pixels are identical (infinite)."""
    ref, img = as_pixels(reference), as_pixels(image)
    if ref.shape != img.shape:
        return {"comparable": False, "reason": f"size {img.shape[1]}×{img.shape[0]} ≠ baseline's"}
    value = psnr(ref, img)
    identical = math.isinf(value)
    return {
        "comparable": True,
        "identical": identical,
        "psnr_db": None if identical else round(value, 4),
        "ssim": 1.0 if identical else round(ssim(ref, img), 6),
        "max_abs_diff": int(np.max(np.abs(ref - img))),
        "lpips": lpips_distance(ref, img) if with_lpips else None,
    }


def fidelity_summary(images: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Worst and mean fidelity over a variant's images (PSNR None = all identical)."""
    compared = [i["fidelity"] for i in images if i.get("fidelity", {}).get("comparable")]
    if not compared:
        return None
    finite = [c["psnr_db"] for c in compared if c["psnr_db"] is not None]
    lpips_values = [c["lpips"] for c in compared if c.get("lpips") is not None]
    return {
        "images": len(compared),
        "identical": all(c["identical"] for c in compared),
        "psnr_min_db": min(finite) if finite else None,
        "psnr_mean_db": round(statistics.fmean(finite), 4) if len(finite) == len(compared) else None,
        "ssim_min": min(c["ssim"] for c in compared),
        "ssim_mean": round(statistics.fmean(c["ssim"] for c in compared), 6),
        "max_abs_diff": max(c["max_abs_diff"] for c in compared),
        "lpips_mean": round(statistics.fmean(lpips_values), 6) if lpips_values else None,
    }


def latency_summary(
    calls: Sequence[Sequence[tuple[int, float]]], cpu_seconds: Sequence[float] = ()
) -> dict[str, Any] | None:
    """Per-image latency over the timed repeats (each call's time shared by its images), and images/s.

    Process CPU time per image is kept beside wall time: on a busy machine it moves far less.
    """
    per_image = [seconds / count for repeat in calls for count, seconds in repeat for _ in range(count)]
    if not per_image:
        return None
    total_images = sum(count for repeat in calls for count, _ in repeat)
    total_seconds = sum(seconds for repeat in calls for _, seconds in repeat)
    return {
        "median_seconds": round(statistics.median(per_image), 6),
        "min_seconds": round(min(per_image), 6),
        "max_seconds": round(max(per_image), 6),
        "mean_seconds": round(statistics.fmean(per_image), 6),
        "images_per_second": round(total_images / total_seconds, 4) if total_seconds > 0 else None,
        "cpu_seconds_per_image": round(sum(cpu_seconds) / total_images, 6) if cpu_seconds else None,
    }


def adherence(model_id: str, pairs: Sequence[tuple[str, Any]]) -> dict[str, Any] | None:
    """Prompt adherence from the shapes evaluator, for the models trained on its shapes (`dgrun:default*`)."""
    if model_id not in SHAPES_MODELS:
        return None
    try:
        from dgrun.models.shapes import score
    except ImportError as exc:
        return {"available": False, "reason": f"the shapes evaluator is not importable: {exc}"}
    try:
        return {"available": True, **score(pairs)}
    except ValueError as exc:
        return {"available": False, "reason": str(exc)}


@dataclass
class PeakMemory:
    """Peak memory while a variant runs: CUDA max allocated on a GPU, else RSS sampled in a thread.

    `ru_maxrss` cannot be used per variant (it is the whole process's peak), so RSS is read from
    /proc/self/statm every few milliseconds; elsewhere the process peak is reported and says so.
    """

    device_kind: str
    interval: float = 0.005
    start_bytes: int | None = None
    peak_bytes: int | None = None
    kind: str = "unavailable"
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device_kind == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.kind, self.start_bytes = "cuda_max_allocated", int(torch.cuda.memory_allocated())
        elif _rss() is not None:
            self.kind = "peak_rss"
            self.start_bytes = self.peak_bytes = _rss()
            self._thread = threading.Thread(target=self._sample, name="dgrun-rss", daemon=True)
            self._thread.start()
        else:
            self.kind = "process_peak_rss"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            value = _rss()
            if value is not None and value > (self.peak_bytes or 0):
                self.peak_bytes = value

    def __exit__(self, *exc: object) -> None:
        if self.device_kind == "cuda":
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            value = _rss()
            if value is not None and value > (self.peak_bytes or 0):
                self.peak_bytes = value
        else:
            with contextlib.suppress(ImportError):
                import resource

                scale = 1 if sys.platform == "darwin" else 1024
                self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def record(self) -> dict[str, Any]:
        grown = None
        if self.peak_bytes is not None and self.start_bytes is not None:
            grown = self.peak_bytes - self.start_bytes
        return {"kind": self.kind, "bytes": self.peak_bytes, "start_bytes": self.start_bytes, "grown": grown}


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
