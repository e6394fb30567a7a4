#!/usr/bin/env bash
# `medcot bench gpu` on a bare CUDA machine, from the repository root, with what scripts/gpu-wheels.sh prepared:
# the carried wheels go beside the image's own torch (never replacing it), the embedded tokenizer comes from
# .gpu-cache.tar.xz, and each seed recipe runs on its full random-weight shape, smallest first, within the budget.
#   device run:  scripts/gpu-bench.sh   (carry .whl and .gpu-cache.tar.xz; results land in $OUT/bench/gpu.json)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export MEDCOT_CACHE=/tmp/medcot-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$MEDCOT_CACHE" && tar -C "$MEDCOT_CACHE" -xJf .gpu-cache.tar.xz
# 8 minutes in all on the lent machine: about 1 for start-up and the install, recipes started within 5.5, and the
# last one (an 8B shape: build, 4-bit load, 4 steps, generation) allowed about 1.5 more.
export MEDCOT_BENCH_GPU_BUDGET_S=${MEDCOT_BENCH_GPU_BUDGET_S:-330}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m medcot_lib bench gpu --repeats 3 --out "${OUT:-results}/bench"
