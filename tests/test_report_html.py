"""report.html as a person sees it: rendered by headless Chromium, not blank, every image decoded.

Chromium is Debian's `chromium` package; without it these tests are skipped, except under CI (`CI=true`),
where a missing browser is a failure. The report is built from a synthetic bench result, so the page is
tested without running any model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dgrun.metrics import compare, fidelity_summary
from dgrun.report import write_reports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a yellow triangle"]


def _image(seed: int, noise: float) -> Image.Image:
    """A 32×32 picture: a smooth gradient (the same for every seed's variants) plus some noise."""
    y, x = np.mgrid[0:32, 0:32]
    base = np.stack([x * 8, y * 8, np.full_like(x, 40 * seed + 60)], axis=-1).astype(np.float64)
    rng = np.random.default_rng(seed + int(noise * 1000))
    pixels = np.clip(base + rng.normal(0, noise, base.shape) if noise else base, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def synthetic_report(out: Path) -> dict[str, Any]:
    """A finished bench of three entries over three prompts, with real image files and real metrics."""
    variants = []
    for position, (name, role, noise, median) in enumerate(
        [
            ("baseline", "baseline", 0.0, 0.20),
            ("fast", "recipe", 4.0, 0.12),
            ("faster", "variant", 12.0, 0.08),
        ]
    ):
        images = []
        for index, prompt in enumerate(PROMPTS):
            path = out / "variants" / name / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture = _image(index, noise)
            picture.save(path)
            fidelity = compare(_image(index, 0.0), picture, with_lpips=False)
            images.append(
                {
                    "file": path.name,
                    "path": f"variants/{name}/{path.name}",
                    "prompt_index": index,
                    "image_index": 0,
                    "prompt": prompt,
                    "seed": index,
                    "sha256": "0" * 64,
                    "fidelity": fidelity,
                }
            )
        variants.append(
            {
                "name": name,
                "role": role,
                "description": None,
                "sweep": {"cache.interval": position} if role == "variant" else None,
                "status": "complete",
                "error": None,
                "run_dir": f"variants/{name}",
                "plan": []
                if role == "baseline"
                else [{"step": "deepcache", "status": "applied", "detail": None}],
                "timings": {"load_seconds": 0.5, "apply_seconds": 0.01, "first_call_seconds": 1.5},
                "calls": [[[3, median * 3]]],
                "latency": {
                    "median_seconds": median,
                    "min_seconds": median * 0.9,
                    "max_seconds": median * 1.2,
                    "mean_seconds": median,
                    "images_per_second": 1 / median,
                },
                "speedup": round(0.20 / median, 4),
                "peak_memory": {"kind": "peak_rss", "bytes": 400 * 2**20, "start_bytes": 0, "grown": 0},
                "images": images,
                "fidelity": fidelity_summary(images),
                "adherence": None,
            }
        )
    return {
        "kind": "dgrun-bench",
        "schema": 1,
        "status": "complete",
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:01:00+00:00",
        "recipe": {"name": "synthetic", "model": {"id": "dgrun:tiny-sd"}},
        "recipe_sha256": "f" * 64,
        "settings": {"repeats": 3, "warmup": 1},
        "environment": {"versions": {"python": "3.11", "torch": "2.13.0"}, "device": "cpu", "plugins": []},
        "metrics": {
            "psnr": "dB",
            "ssim": "Gaussian",
            "lpips": {"available": False, "reason": "the lpips package is not installed"},
            "latency": "per image",
            "speedup": "baseline / variant",
        },
        "variants": variants,
    }


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_reports(synthetic_report(out), out)
    return out


def test_report_html_is_one_self_contained_file(report_dir):
    page = (report_dir / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 3 * 3 + 2  # grid + latency plot + speed/fidelity plot
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "<link" not in page and "http://" not in page and "https://" not in page
    assert "∞" in page and "PSNR" in page and "data-images-loaded" in page


def _chromium(tmp_path: Path, url: str, *mode: str) -> tuple[str, str]:
    """Run headless Chromium; (stdout, stderr). Output goes through files, not pipes: a helper process
    that outlives the browser would otherwise hold a pipe open and stall the test for half a minute."""
    out, log = tmp_path / "chromium.out", tmp_path / "chromium.log"
    with open(out, "w") as stdout, open(log, "w") as stderr:
        subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1400,2000",
                "--virtual-time-budget=5000",
                *mode,
                url,
            ],
            stdout=stdout,
            stderr=stderr,
            timeout=120,
        )
    return out.read_text(errors="replace"), log.read_text(errors="replace")


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must install Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def test_report_renders_in_chromium_with_every_image_loaded(chromium, report_dir, tmp_path):
    url = (report_dir / "report.html").as_uri()
    shot = tmp_path / "report.png"
    _, log = _chromium(tmp_path, url, f"--screenshot={shot}")
    assert shot.is_file(), log[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    assert pixels.shape[:2] == (2000, 1400)
    assert pixels.std() > 10, "the screenshot is blank"
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 500, "the screenshot is nearly uniform"

    dom, _ = _chromium(tmp_path, url, "--dump-dom")
    assert 'data-images-count="11"' in dom, dom[:500]
    assert 'data-images-loaded="true"' in dom


def test_the_loaded_check_notices_a_broken_image(chromium, tmp_path):
    from dgrun.report_html import SCRIPT

    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><body data-images-loaded="pending">'
        '<img src="data:image/png;base64,bm90IGEgcG5n"><script>' + SCRIPT + "</script></body>"
    )
    dom, _ = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert 'data-images-loaded="false"' in dom


def test_help_and_check_import_neither_torch_nor_matplotlib(tmp_path):
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    code = (
        "import sys\n"
        "from dgrun.cli import main\n"
        "for args in (['--help'], ['check', sys.argv[1]], ['bench', '--help'], ['reproduce', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), (args, exit.code)\n"
        "heavy = sorted(m for m in ('torch', 'matplotlib', 'diffusers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
