#!/usr/bin/env bash
# The one prepared command for the GPU machine (no network; python3 is 3.12 with torch+CUDA,
# transformers, accelerate, ...): a venv that sees python3's packages, the wheels from .whl/ installed
# into it without dependencies (so torch is never replaced), then the harness under `timeout 480`.
# Results go to $OUT/gpu when $OUT is set (the device tool's output folder), else outputs/gpu-harness.
#
#   bash benchmarks/gpu/wheels.sh               # first, on a machine that reaches PyPI
#   bash benchmarks/gpu/run.sh                  # then on the GPU machine, from the repository root
#   bash benchmarks/gpu/run.sh --only 'compile*'    # arguments go to harness.py
#
# Knobs: PYTHON3 (default python3), WHEEL_DIR (default .whl), DGRUN_GPU_VENV (default /tmp/dgrun-gpu-venv),
# HARNESS_TIMEOUT (default 480 seconds).
set -uo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON3:-python3}
wheels=${WHEEL_DIR:-.whl}
venv=${DGRUN_GPU_VENV:-/tmp/dgrun-gpu-venv}
limit=${HARNESS_TIMEOUT:-480}

if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "run.sh: no wheels in $wheels/. Run 'bash benchmarks/gpu/wheels.sh' on a machine that reaches PyPI" >&2
    echo "run.sh: first, then bring $wheels/ along (device tool: carry [\".whl\"])." >&2
    exit 2
fi
if ! compgen -G "$wheels/dgrun-*.whl" >/dev/null; then
    echo "run.sh: $wheels/ has no dgrun wheel; rerun benchmarks/gpu/wheels.sh" >&2
    exit 2
fi

started=$(date +%s)
# --without-pip: the image's python may lack ensurepip; the outer pip installs with --target below.
rm -rf "$venv"
"$python" -m venv --system-site-packages --without-pip "$venv" || exit 2
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# python3 may itself live in a venv (the GPU image's does): a venv made from it sees the base
# interpreter's packages, not that venv's, so its site-packages are added by a .pth file (after ours).
"$python" -c 'import site, sys; print("\n".join(site.getsitepackages()))' >"$site/zz-outer-site.pth"
"$python" -m pip install --quiet --no-index --no-deps --no-cache-dir --disable-pip-version-check \
    --upgrade --target "$site" "$wheels"/*.whl || {
    echo "run.sh: installing the wheels from $wheels/ failed" >&2
    exit 2
}
"$venv/bin/python" - <<'PY' || exit 2
import importlib.metadata as metadata

import torch

found = []
for name in ("torch", "diffusers", "transformers", "pydantic", "dgrun", "torchao", "optimum-quanto", "bitsandbytes"):
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} -")
print(f"run.sh: {', '.join(found)}; torch CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
PY
echo "run.sh: venv ready in $(($(date +%s) - started)) s"

out=${OUT:+$OUT/gpu}
out=${out:-outputs/gpu-harness}
mkdir -p "$out"
PYTHONUNBUFFERED=1 timeout -k 20 "$limit" "$venv/bin/python" benchmarks/gpu/harness.py --out "$out" "$@" 2>&1 |
    tee "$out/harness.log"
status=${PIPESTATUS[0]}
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "run.sh: the harness ran past ${limit} s and was stopped; $out/gpu-table.md has what finished" >&2
fi
echo "run.sh: harness exit $status after $(($(date +%s) - started)) s; table: $out/gpu-table.md"
exit "$status"
