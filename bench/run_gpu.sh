#!/usr/bin/env bash
# gradnorm-bench on a CUDA machine, from a checkout of this repository.
#
# Needs python with torch and torchvision; the project itself need not be installed
# (PYTHONPATH=handler), nor the internet. pytorch-ood and BackPACK are used when importable,
# otherwise their cases are listed as skipped, with the reason.
# Models: resnet18 (32x32), mlp, transformer and resnet50 (224x224), batch 64, both methods.
# Takes a few minutes on an H100. Extra arguments go to gradnorm-bench (e.g. --models resnet50).
#
# Results: $OUT/gpu-<device>.json and .md when OUT is set, else bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/handler${PYTHONPATH:+:$PYTHONPATH}"
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"

device=$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower())')
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

"$PY" -m torchserve_gradnorm.cli.bench --device cuda --warmup 1 --repeats 5 \
    --out "$out_dir/gpu-$device.json" "$@" 2>&1 | tee "$out_dir/gpu-$device.log"
