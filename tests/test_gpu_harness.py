"""benchmarks/gpu/harness.py --cpu-dry: every code path of the GPU harness, on tiny models on the CPU.

One subprocess run (about 50 s on 2 cores) builds both tiny models, benches every case through dgrun's own
`Bench`, launches the 2-rank data-parallel run and writes the table; the tests read what it wrote.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "benchmarks" / "gpu" / "harness.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


harness = _harness()


def _table(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """The markdown table's rows by (model, case)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(header), line
        row = dict(zip(header, cells, strict=True))
        assert (row["model"], row["case"]) not in rows, f"two rows for {row['model']}/{row['case']}"
        rows[(row["model"], row["case"])] = row
    return rows


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--cpu-dry", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=out,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    table = out / "gpu-table.md"
    assert table.is_file(), log[-6000:]
    return {"out": out, "log": log, "rows": _table(table)}


def _speedup(row: dict[str, str]) -> float:
    return float(row["speedup"].removesuffix("x"))


def test_the_table_has_a_row_for_every_case_and_nothing_else(dry: dict[str, Any]) -> None:
    expected = {(model, "baseline") for model in harness.MODELS}
    expected |= {(model, case.name) for model in harness.MODELS for case in harness.cases_for(model)}
    expected.add((harness.SD, harness.DP_CASE))
    assert set(dry["rows"]) == expected
    for row in dry["rows"].values():
        assert row["status"].split(":")[0] in ("ok", "skipped", "failed", "no effect"), row
        assert not row["status"].startswith("failed"), row


def test_cases_that_need_a_gpu_are_skipped_with_the_reason(dry: dict[str, Any]) -> None:
    rows = dry["rows"]
    needs_cuda = [
        ("flux", "cuda-memory"),
        ("flux", "attn-cudnn"),
        ("flux", "attn-efficient"),
        ("flux", "quant-fp8"),
        ("flux", "cpu-offload"),
        ("flux", "group-offload-stream"),
        ("sd", "cuda-memory"),
        ("sd", "cpu-offload"),
        ("sd", "xformers"),
    ]
    for key in needs_cuda:
        status = rows[key]["status"]
        assert status.startswith("skipped: "), (key, status)
        assert any(word in status for word in ("CUDA", "accelerator")), (key, status)
    # Packages that may be missing, and cases that only mean something on a GPU: skipped, never failed.
    for key in [("flux", "attn-sage"), ("flux", "quant-nf4"), ("sd", "quant-nf4")]:
        assert rows[key]["status"].startswith("skipped: "), (key, rows[key]["status"])
    for model in harness.MODELS:
        for case in harness.cases_for(model):
            if case.dry_skip:
                assert rows[(model, case.name)]["status"] == f"skipped: --cpu-dry: {case.dry_skip}"


def test_cpu_capable_cases_run_with_a_finite_speedup_and_their_effect(dry: dict[str, Any]) -> None:
    rows = dry["rows"]
    must_run = [
        ("flux", "baseline"),
        ("flux", "fuse-qkv"),
        ("flux", "first-block-cache"),
        ("flux", "quant-int8"),
        ("flux", "compile-default"),
        ("flux", "fuse-qkv-compile"),
        ("sd", "baseline"),
        ("sd", "fuse-qkv"),
        ("sd", "deepcache"),
        ("sd", "compile-default"),
    ]
    for key in must_run:
        row = rows[key]
        assert row["status"] == "ok", (key, row["status"])
        assert math.isfinite(_speedup(row)) and _speedup(row) > 0, (key, row["speedup"])
        assert row["PSNR dB (worst)"] != "—", key
    assert rows[("flux", "baseline")]["speedup"] == "1.00x"
    assert rows[("flux", "baseline")]["PSNR dB (worst)"] == "identical"
    assert "cached" in rows[("flux", "first-block-cache")]["effect"]  # the effect summaries reach the table
    assert "compile:" in rows[("sd", "compile-default")]["effect"]


def test_data_parallel_run_with_two_ranks(dry: dict[str, Any]) -> None:
    row = dry["rows"][("sd", harness.DP_CASE)]
    assert row["status"] == "ok", row
    assert "2/2 images by ranks [0, 1], world_size 2" in row["effect"]
    record = json.loads((dry["out"] / "dp-run.json").read_text(encoding="utf-8"))
    assert record["world_size"] == 2


def test_raw_reports_and_results_are_written(dry: dict[str, Any]) -> None:
    out = dry["out"]
    for model in harness.MODELS:
        report = json.loads((out / f"report-{model}.json").read_text(encoding="utf-8"))
        assert report["kind"] == "dgrun-bench"
        assert report["variants"][0]["name"] == "baseline"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["dry"] is True
    assert {(r["model"], r["case"]) for r in results["rows"]} == set(dry["rows"])
    assert "[flux] done in" in dry["log"] and "[sd] done in" in dry["log"]
    assert not (out / "work").exists()  # models and bench runs live in a temp dir, removed at the end


# ---------------------------------------------------------------------------- statuses the dry run never hits
def _result(status: str = "complete", plan: list[dict[str, Any]] | None = None, **extra: Any) -> dict:
    return {"name": "x", "role": "variant", "status": status, "plan": plan or [], **extra}


@pytest.mark.parametrize(
    ("result", "expected", "kind"),
    [
        (_result("failed", error="RuntimeError: boom\nmore"), "failed: RuntimeError: boom", "failed"),
        (_result("not run"), "skipped: not started", "skipped"),
        (_result("interrupted"), "skipped: interrupted", "skipped"),
        (_result("unavailable", error="quantize: no bitsandbytes"), "skipped: quantize: no", "skipped"),
        (
            _result(plan=[{"step": "compile", "status": "fell back", "detail": "fell back to eager: x"}]),
            "failed: compile: fell back to eager",
            "failed",
        ),
        (
            _result(
                plan=[{"step": "attention_backend", "status": "fell back", "detail": "fell back to a (b)"}]
            ),
            "ok: attention_backend fell back to a",
            "ok",
        ),
        (
            _result(plan=[{"step": "tf32", "status": "no effect", "detail": "CPU"}]),
            "no effect: tf32",
            "no effect",
        ),
        (_result(plan=[{"step": "fuse_qkv", "status": "applied", "detail": None}]), "ok", "ok"),
    ],
)
def test_row_status(result: dict[str, Any], expected: str, kind: str) -> None:
    status, got_kind = harness.row_status(result)
    assert status.startswith(expected)
    assert got_kind == kind


def test_table_cells_escape_pipes_and_effects_tolerate_their_absence() -> None:
    rows = [harness._row("flux", "a|b", "ok", "ok", effect="x | y")]
    text = harness.table_markdown(rows)
    assert "a\\|b" in text and "x \\| y" in text
    assert harness.effects(_result(plan=[{"step": "fuse_qkv", "status": "applied"}])) == "—"
    assert harness.effects(_result(plan=[{"step": "s", "effect": {"summary": "did it"}}])) == "s: did it"


def test_a_model_that_cannot_be_built_gives_failed_rows_and_the_table_is_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*_: Any) -> float:
        raise RuntimeError("out of memory\ndetails")

    monkeypatch.setattr(harness, "build_model", no_model)
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--cpu-dry", "--out", str(out), "--work", str(work), "--only", "sd/fuse-qkv,data-parallel-2"]
    assert harness.Harness(harness.parse_args(args)).run() == 0
    rows = _table(out / "gpu-table.md")
    assert set(rows) == {("sd", "baseline"), ("sd", "fuse-qkv"), ("sd", harness.DP_CASE)}
    assert {r["status"] for r in rows.values()} == {"failed: harness: RuntimeError: out of memory"}
