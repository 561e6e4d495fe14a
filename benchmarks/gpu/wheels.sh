#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels the GPU machine lacks into .whl/ at the repository
# root (ignored by git), for benchmarks/gpu/run.sh there: CPython 3.12, manylinux x86_64, no dependencies
# resolved (each one is named here), torch never. Then dgrun's own wheel and its two plugins', built from
# this checkout. Idempotent: a wheel already there at the pinned version is kept, another version of the
# same package is removed (two versions of one package stop `pip install`), and so is any wheel this
# script does not name; the project wheels are rebuilt.
#
# bitsandbytes ships kernels for every CUDA and ROCm release (43 MB); its wheel is slimmed here to the
# CPU library and the CUDA releases in BNB_CUDA (default 130 132: the GPU machine's torch is cu130), so the
# whole set (~30 MB) plus the repository fit the 64 MiB the device tool carries.
#
#   bash benchmarks/gpu/wheels.sh
#   WITH_BITSANDBYTES=0 bash benchmarks/gpu/wheels.sh   # without bitsandbytes
#   BNB_CUDA="128 130" bash benchmarks/gpu/wheels.sh    # other CUDA releases of bitsandbytes' kernels
#   PYTHON=python3 bash benchmarks/gpu/wheels.sh        # another python with pip (default: .venv's)
#   PY_VERSION=3.11 WHEEL_DIR=/tmp/whl bash benchmarks/gpu/wheels.sh   # for another python (run.sh tests)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${WHEEL_DIR:-.whl}
pyver=${PY_VERSION:-3.12}
abi=cp${pyver/./}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
mkdir -p "$dest"

# What the GPU image lacks (it has torch, transformers, accelerate, huggingface-hub, safetensors, numpy,
# pillow, matplotlib, pluggy, typer, rich, regex, requests, filelock, zipp, ninja, pyyaml, packaging).
# Versions: the ones this project's venv tests with (torchao 0.18 loads its kernels on torch >= 2.11).
packages=(
    diffusers==0.42.1
    importlib-metadata==8.7.1   # diffusers imports it; 10.x also needs lazy-importer
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0   # pydantic needs >= 4.16
    ruamel.yaml==0.19.1
    DeepCache==0.1.1
    torchao==0.18.0
    optimum-quanto==0.2.7
    cache-dit==1.5.3
)
if [ "${WITH_BITSANDBYTES:-1}" = 1 ]; then
    packages+=(bitsandbytes==0.50.2)
fi
bnb_cuda=${BNB_CUDA:-130 132}

# Wheel file names spell a project name with underscores (and sometimes other case): compare normalised.
norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

for spec in "${packages[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    want=$(norm "$name")
    have=""
    for file in "$dest"/*.whl; do
        [ -e "$file" ] || continue
        base=$(basename "$file")
        if [ "$(norm "${base%%-*}")" = "$want" ]; then
            rest=${base#*-}
            if [ "${rest%%-*}" = "$version" ]; then
                have=$file
            else
                echo "removing $base (not $version)"
                rm -f "$file"
            fi
        fi
    done
    if [ -n "$have" ]; then
        echo "have $(basename "$have")"
        continue
    fi
    "$python" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        -d "$dest" "$spec"
    echo "got $spec"
done

# Drop wheels this script does not name (e.g. bitsandbytes after WITH_BITSANDBYTES=0).
wanted=" dgrun dgrun_deepcache dgrun_cache_dit "
for spec in "${packages[@]}"; do wanted+="$(norm "${spec%%==*}") "; done
for file in "$dest"/*.whl; do
    [ -e "$file" ] || continue
    base=$(basename "$file")
    case "$wanted" in
        *" $(norm "${base%%-*}") "*) ;;
        *) echo "removing $base (not in the set)"; rm -f "$file" ;;
    esac
done

# Slim bitsandbytes to the CPU library and the CUDA releases wanted (RECORD lines of dropped files go too).
for file in "$dest"/bitsandbytes-*.whl; do
    [ -e "$file" ] || continue
    BNB_CUDA="$bnb_cuda" "$python" - "$file" <<'PY'
import os, re, sys, zipfile

path = sys.argv[1]
keep = {f"libbitsandbytes_cuda{v}.so" for v in os.environ["BNB_CUDA"].split()}
native = re.compile(r"libbitsandbytes_(cuda|rocm|xpu)\w*\.so$")
with zipfile.ZipFile(path) as source:
    names = source.namelist()
    dropped = {n for n in names if native.search(n) and os.path.basename(n) not in keep}
    if not dropped:
        sys.exit(0)
    slim = path + ".slim"
    with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename in dropped:
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
            target.writestr(info, data)
os.replace(slim, path)
print(f"slimmed {os.path.basename(path)}: kept {', '.join(sorted(keep))}, dropped {len(dropped)} libraries")
PY
done

# This checkout's dgrun and the plugins the harness uses, rebuilt every time (the source changes).
rm -f "$dest"/dgrun-*.whl "$dest"/dgrun_*.whl
sources=(. plugins/dgrun-deepcache plugins/dgrun-cache-dit)
made=()  # setuptools' build/ folders this run creates, removed after it
for source in "${sources[@]}"; do [ -e "$source/build" ] || made+=("$source/build"); done
"$python" -m pip wheel --quiet --no-deps -w "$dest" "${sources[@]}"
for folder in "${made[@]}"; do rm -rf "$folder"; done
ls -l "$dest"
echo "total: $(du -ch "$dest"/*.whl | tail -n1 | cut -f1) in $(ls "$dest"/*.whl | wc -l) wheels"
if [ "$(du -cb "$dest"/*.whl | tail -n1 | cut -f1)" -gt $((48 * 1024 * 1024)) ]; then
    echo "note: over 48 MiB; with the repository (~13 MiB) the device tool's 64 MiB may not carry it" >&2
fi
