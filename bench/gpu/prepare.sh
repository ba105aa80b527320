#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU lease: gathers what the bare GPU machine lacks into two ignored
# folders that the lease carries: .whl/ (wheels for Python 3.12 that its image does not hold) and
# .gpu/tokenizer/ (the default model's tokenizer, for the random-weight Llama models of the GPU bench).
# Then one device call runs bench/gpu/session.sh (see its header). Nothing here is needed on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl .gpu/tokenizer
# datasets (+ dill, multiprocess): the HF Trainer baseline's data pipeline; liger-kernel and cut-cross-entropy:
# baselines of bench/kernels.py; bitsandbytes: the QLoRA path's CUDA tests. The GPU image has the rest.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl datasets dill multiprocess liger-kernel cut-cross-entropy bitsandbytes
# the default model's tokenizer files (converted once by `fastchat-ft train` / the tests on this machine)
"${PYTHON:-.venv/bin/python}" - <<'PY'
import shutil
from pathlib import Path
from fastchat_ft.model.default_model import default_model_dir
from fastchat_ft.model.tiny import TOKENIZER_FILES
src = default_model_dir()
for name in TOKENIZER_FILES:
    if (src / name).is_file():
        shutil.copy2(src / name, Path(".gpu/tokenizer") / name)
print("tokenizer from", src)
PY
du -sh .whl .gpu
echo 'device run: carry [".whl", ".gpu"], command: bash bench/gpu/session.sh'
