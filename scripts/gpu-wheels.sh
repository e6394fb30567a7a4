#!/usr/bin/env bash
# Wheels a bare CUDA image lacks for `medcot bench gpu`, at the locked versions, for Python 3.12 on x86-64 Linux,
# into .whl/, plus the embedded tokenizer into .gpu-cache.tar.xz (no weights: random: models need only the tokenizer).
# Both are git-ignored.
# The image this was written for (the lent H200 machine) has torch 2.11 with CUDA, peft, accelerate, pandas, pyarrow,
# matplotlib, tabulate, huggingface_hub 1.33 and tokenizers 0.23.2 (both within transformers 5.23's ranges), but no
# trl, bitsandbytes, datasets or pydantic, and transformers 5.17. About 59 MiB: one device call carries at most 64 MiB.
#   scripts/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(trl bitsandbytes datasets transformers peft pydantic pydantic_core annotated-types typing-inspection dill
          multiprocess)
pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -iE "^${name//[-_]/[-_]}==" requirements/lock-cpu.txt) || { echo "no pin for $name in the lock" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
# The embedded model's tokenizer (and config, so medcot treats the cache entry as built), without its 0.5 GB of weights.
PY=${PY:-.venv/bin/python}
source=$($PY -c "from medcot_lib import models; print(models.embedded_checkpoint(models.DEFAULT_MODEL))")
staging=$(mktemp -d)
mkdir -p "$staging/models/$(basename "$source")"
cp "$source"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$staging/models/$(basename "$source")"/
# xz: the 3.5 MB tokenizer in ~0.7 MB, so wheels, cache and the checkout stay under the 64 MiB one call carries.
tar -C "$staging" -cJf .gpu-cache.tar.xz models && rm -rf "$staging"
du -cb .whl .gpu-cache.tar.xz | tail -1 | awk '{printf "carried: %.1f MiB (plus the checkout)\n", $1 / 2^20}'

