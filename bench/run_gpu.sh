#!/usr/bin/env bash
# The benchmark's model zoo on a CUDA machine, from a checkout of this repository, in one call
# (2-3 minutes on an H200; --time-limit-min 5 starts no case after 5 minutes).
#
# Needs python with torch, torchvision, timm and transformers; neither this project installed
# (PYTHONPATH=handler:bench) nor the internet. pytorch-ood and BackPACK are used when
# importable. Where a `.whl/` folder of wheels sits in the checkout (pytorch-ood, BackPACK and
# their dependencies, e.g. `pip download --no-deps -d .whl pytorch-ood==0.4.0
# backpack-for-pytorch einops unfoldNd scipy`), the wheels whose distribution is not installed
# yet are installed from it first, offline; cases whose library still cannot be imported are
# listed as skipped, with the reason. One failing case is a row of the table, not the end of
# the run.
#
# Results: gpu-<device>.json, .md and .log in $OUT when OUT is set, else in bench/results/.
# Extra arguments go to `python -m gradnorm_bench` (e.g. --models resnet50 vit-b16).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD/handler:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"

if compgen -G ".whl/*.whl" >/dev/null; then
    for wheel in .whl/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
            continue  # keep the machine's own version
        fi
        "$PY" -m pip install -q --no-index --no-deps "$wheel" || echo "could not install $wheel"
    done
fi

"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' || exit 1
device=$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower())')

"$PY" -m gradnorm_bench --device cuda --warmup 2 --repeats 5 --case-budget-s 2 \
    --time-limit-min 5 --out "$out_dir/gpu-$device.json" "$@" 2>&1 | tee "$out_dir/gpu-$device.log"
exit "${PIPESTATUS[0]}"
