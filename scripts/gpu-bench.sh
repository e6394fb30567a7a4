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
# About 9.5 minutes on the lent machine: start-up and the install about 1, recipes started within 4.5 (the budget), the
# last one (an 8B shape: build, 4-bit load, 4 steps, generation) allowed about 2 more, and the rest spare. A recipe's
# figures are printed as it finishes, so a run cut short still leaves them in the log.
export MEDCOT_BENCH_GPU_BUDGET_S=${MEDCOT_BENCH_GPU_BUDGET_S:-270} PYTHONUNBUFFERED=1
out=${OUT:-results}/bench
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import importlib.metadata as m
for n in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "huggingface_hub",
          "tokenizers", "pyarrow", "regex", "fsspec", "flash_attn", "unsloth", "vllm"):
    try: print(n, m.version(n))
    except m.PackageNotFoundError: print(n, "absent")'
  python3 -m medcot_lib bench gpu --repeats 3 --out "$out"
} 2>&1 | tee "$out/gpu-bench.log"
