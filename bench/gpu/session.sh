#!/usr/bin/env bash
# Run ON the GPU machine, in one device call (a lease is short; a cold start costs minutes): carry
# [".whl", ".gpu"] made by bench/gpu/prepare.sh, command `bash bench/gpu/session.sh`, timeout 600.
# It installs the package from this tree, runs the CUDA tests and the GPU benchmarks, and copies the
# results (bench/results/*.json with device name and date, logs) to $OUT, which the device tool brings back.
# Each stage has its own time bound so one slow stage cannot eat the rest of the lease.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
log() { echo "== $(date -u +%H:%M:%S) $*"; }

log "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
log "build"; python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import fastchat_ft._native, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  || { echo "build failed"; exit 1; }

log "CUDA tests"
timeout 150 python3 -m pytest -q -x -m cuda tests/ 2>&1 | tee "$OUT/cuda_tests.log" | tail -15

log "kernels bench"
timeout 200 python3 bench/kernels.py --quick 2>&1 | tee "$OUT/kernels.log" | tail -40

log "vs HF Trainer (GPU mode, 1B)"
timeout 200 python3 bench/vs_hf_trainer.py --device cuda --models llama-1b --tokenizer .gpu/tokenizer --steps 10 \
  2>&1 | tee "$OUT/vs_hf_trainer.log" | tail -30

# the device tool brings back at most 8 files: the results travel as one archive (unpack into bench/results)
tar czf "$OUT/results.tgz" -C bench results
log "done"; ls "$OUT"
