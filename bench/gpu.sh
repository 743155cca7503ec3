#!/usr/bin/env bash
# Every GPU check and bench of the project, in one run on one lent GPU, one log.
#
#   bash bench/gpu.sh [LOG]            # LOG defaults to $OUT/gpu.log on the device tool, else gpu.log
#   ONLY="cuda-tests moe-layer-8b" bash bench/gpu.sh    # some steps only
#
# On a lent machine (see ../shared/gpu/README.md): fetch the missing wheels here first
# (../shared/gpu/fetch-wheels), carry ".whl", and run `bash bench/gpu.sh`; the script installs them.
# Every step has its own time limit (765 s at most in all: pick steps with ONLY= to fit a budget; the one H200 run so far, without the last
# two steps and the train.py test, took 286 s), so a step that hangs or fails costs only its own slot. Figures go to docs/benchmarks.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-${OUT:-.}/gpu.log}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OPENMOE_NO_TQDM=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 1; }
else
  export PYTHONPATH=$PWD
fi
t0=$(date +%s)
step() {  # step NAME SECONDS CMD...: run with a time limit, log the output and how it ended
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY machine " != *" $name "* ]]; then return; fi
  echo -e "\n===== $name (limit ${limit}s; at $(( $(date +%s) - t0 ))s) =====" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|^\s*$" | tee -a "$LOG"
  echo "----- $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}
: > "$LOG"
step machine 20 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; \
  $PY -c 'import torch, transformers, triton; print(torch.__version__, torch.version.cuda, transformers.__version__, triton.__version__)'; git log --oneline -1"
# correctness on CUDA: no host sync in a training step (sync debug mode), kernels, compiled == eager
step cuda-tests 150 $PY -m pytest -q -p no:cacheprovider tests/moe/test_no_sync.py tests/moe/test_kernels.py \
  tests/moe/test_dispatch.py "tests/test_compile.py::test_cuda_fullgraph_training_equals_eager" \
  "tests/test_compile.py::test_train_py_compile_key_gives_the_eager_losses"
# where the layer's time goes (eager and compiled), 8B widths
step profile-8b 30 $PY bench/profile_layer.py --preset 8b --policy t5x --compile --top 12
# MoE layer fwd+bwd vs HF Mixtral grouped_mm and a dense MLP of equal active FLOPs
step moe-layer-8b 75 $PY bench/moe_layer.py --device cuda --preset 8b --dtypes bfloat16 --impls grouped_mm \
  --compile --iters 5 --max-seconds 55
step moe-layer-base 50 $PY bench/moe_layer.py --device cuda --preset base --dtypes bfloat16 --impls grouped_mm \
  --compile --iters 5 --max-seconds 40
# training step: 6 layers at 8B widths, seq 2048 (MFU against the measured peak)
step train-step-8b 95 $PY bench/train_step.py --preset 8b --policies t5x --compile --no-mixtral --iters 3 \
  --max-seconds 85
# training step at base widths (the first GPU run's 22% MFU), eager and compiled
step train-step-base 60 $PY bench/train_step.py --preset base --seq 2048 --batch 8 --policies t5x --compile \
  --no-mixtral --iters 3 --max-seconds 50
# decode: eager vs static cache vs compiled step (CUDA graphs), batch 1 and 8, first call vs steady
step decode 120 $PY bench/decode.py --device cuda --configs base,8b --modes eager,compiled --batches 1,8 \
  --new-tokens 32 --no-mixtral
# serving: 16 requests in turn vs at once through `openmoe.serve --continuous-batching`, random 8B bf16
# (needs the serving extra's wheels: fastapi, uvicorn, openai; most of the limit is saving and loading 18.6 GB)
step serve 120 $PY bench/serve.py --device cuda --config 8b --batching on --requests 16 --max-tokens 32
# LoRA fine-tuning step at 8B widths (docs/finetune-8b.md)
step finetune-8b 45 $PY bench/finetune.py --gpu-8b
# EP exchange over NCCL: plain vs chunked overlap vs hierarchical (4 GPUs as 2 "nodes" x 2, which
# on one NVLink node shows the cost of the extra stage, not an inter-node gain); needs a GPU per rank
step a2a 120 bash -c "n=\$(nvidia-smi -L | wc -l); if [ \$n -lt 2 ]; then echo \"a2a: \$n GPU(s), needs >= 2: skipped\"; exit 0; fi; \
  r=2; [ \$n -ge 4 ] && r=2,4; $PY bench/distributed.py --exchange --ranks \$r --tokens 8192 --hidden 2048 \
  --intermediate 4096 --experts 16 --steps 5"
echo -e "\n===== done in $(( $(date +%s) - t0 ))s =====" | tee -a "$LOG"
