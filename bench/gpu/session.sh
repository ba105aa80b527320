#!/usr/bin/env bash
# Run ON the GPU machine, in one device call (a lease is short; a cold start costs minutes): carry
# [".whl", ".gpu"] made by bench/gpu/prepare.sh, command `bash bench/gpu/session.sh [stages]`, timeout 600.
# Stages (default "tests hf kernels"): tests = the CUDA tests; hf = bench/vs_hf_trainer.py GPU mode (llama-1b, or
# HF_MODELS); kernels = bench/kernels.py without torch.compile (KERNEL_ARGS to change); suite = the whole test suite
# on the GPU machine (the engine's end-to-end tests then train on CUDA). Each stage has its own time bound so one
# slow stage cannot eat the rest of the lease; logs and results (bench/results/*.json with device name and date)
# go to $OUT, which the device tool brings back (at most 8 files: results travel as one archive).
# More stages: hf_mask = the hf stage with FASTCHAT_FT_VARLEN=0 (the engine on transformers' document-mask attention
# instead of its default varlen flash attention), results in bench/results/gpu-document-mask/; profile =
# bench/gpu/profile_engine.py (engine vs PEFT + HF forward in one process under torch.profiler: GPU busy share and top
# kernels); hf8b = the hf stage for the Llama-8B shape (HF_TIMEOUT, default 400 s; not yet run on the multi-turn data).
# Seen on an H200 (2026-11-26): start + transfer ~30 s, wheels + build 30-45 s, tests 55 s, hf (1B, demo rows) 120-130 s (multi-turn: 158 s),
# kernels 65 s; a lease is 15 min of device time in all. Second lease, multi-turn data: `tests profile hf_varlen`
# (hf_varlen then = today's hf) took 370 s in one call, then `hf kernels` 255 s.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
STAGES=${*:-tests hf kernels}
exec > >(tee "$OUT/session.log") 2>&1
log() { echo "== $(date -u +%H:%M:%S) $*"; }
finish() { tar czf "$OUT/results.tgz" -C bench results; log "done"; ls -la "$OUT"; }
trap finish EXIT

log "machine; stages: $STAGES"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
log "build"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import importlib, torch
import fastchat_ft._native  # noqa: F401 (the native core built)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("triton", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "liger_kernel", "cut_cross_entropy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "unavailable:", type(exc).__name__, str(exc)[:120])
PY

# per-test time limits need pytest-timeout (in the GPU image); without it the stage bounds still hold
TIMEOUT_OPT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
XDIST_OPT=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")

for stage in $STAGES; do
  case $stage in
  tests)
    log "CUDA tests"
    timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="-ra" $TIMEOUT_OPT \
      tests/test_kernels_cuda_sweep.py tests/test_kernels_flce.py tests/test_kernels_rms_norm.py \
      tests/test_kernels_lora.py tests/test_kernels_swiglu.py tests/test_model_attention.py > "$OUT/cuda_tests.log" 2>&1
    tail -25 "$OUT/cuda_tests.log" ;;
  hf)
    log "vs HF Trainer (GPU mode: ${HF_MODELS:-llama-1b})"
    timeout "${HF_TIMEOUT:-240}" python3 bench/vs_hf_trainer.py --device cuda --models "${HF_MODELS:-llama-1b}" \
      --tokenizer .gpu/tokenizer ${HF_ARGS:-} > "$OUT/vs_hf_trainer.log" 2>&1
    echo "exit $?"; tail -30 "$OUT/vs_hf_trainer.log" ;;
  profile)
    log "engine step vs PEFT + HF forward, one process, under torch.profiler (bench/gpu/profile_engine.py)"
    timeout "${PROFILE_TIMEOUT:-150}" python3 bench/gpu/profile_engine.py --tokenizer .gpu/tokenizer \
      --out bench/results/profile_engine-gpu.json ${PROFILE_ARGS:-} > "$OUT/profile_engine.log" 2>&1
    echo "exit $?"; cat "$OUT/profile_engine.log" | grep -v Warning | tail -90 ;;
  hf_mask)
    log "vs HF Trainer, engine on transformers' document-mask attention (FASTCHAT_FT_VARLEN=0)"
    FASTCHAT_FT_VARLEN=0 timeout "${HF_TIMEOUT:-240}" python3 bench/vs_hf_trainer.py --device cuda --models llama-1b \
      --tokenizer .gpu/tokenizer --out bench/results/gpu-document-mask ${HF_ARGS:-} > "$OUT/vs_hf_trainer_mask.log" 2>&1
    echo "exit $?"; tail -16 "$OUT/vs_hf_trainer_mask.log" ;;
  hf8b)
    log "vs HF Trainer (GPU mode: llama-8b)"
    timeout "${HF_TIMEOUT:-400}" python3 bench/vs_hf_trainer.py --device cuda --models llama-8b --tokenizer .gpu/tokenizer \
      --out bench/results/h200-llama-8b ${HF_ARGS:-} > "$OUT/vs_hf_trainer_8b.log" 2>&1
    echo "exit $?"; tail -16 "$OUT/vs_hf_trainer_8b.log" ;;
  kernels)
    log "kernels bench"
    timeout "${KERNELS_TIMEOUT:-150}" python3 bench/kernels.py ${KERNEL_ARGS:---no-compile} > "$OUT/kernels.log" 2>&1
    echo "exit $?"; grep -E "^device|^(llama|qwen)|^RMSNorm|^LoRA|ours|base_matmul|wrote" "$OUT/kernels.log" | tail -60 ;;
  suite)
    log "whole test suite on the GPU machine"
    timeout "${SUITE_TIMEOUT:-150}" python3 -m pytest -q $XDIST_OPT -p no:cacheprovider -o addopts="-ra" $TIMEOUT_OPT \
      tests/ > "$OUT/suite.log" 2>&1
    tail -30 "$OUT/suite.log" ;;
  esac
done
