#!/usr/bin/env bash
# One run on a GPU machine: the CUDA tests, the GPU's floor (HBM bandwidth, GEMM rates) and the side-by-side
# benches of LlamaGen-B, VAR-d16 and NAR-B against the official loops on the same GPU, CUDA graphs included.
#
#   bash bench/gpu_check.sh REF OUT
#
# REF holds the official checkouts (REF/LlamaGen, REF/var_official, REF/NAR/NAR-images: their .py files suffice);
# OUT receives log.txt and the result JSONs (copy them to bench/results). Each stage has its own time limit and a
# failing stage does not stop the next: the log says which ones failed. STAGES="floor var" runs those alone.
set -u
REF=${1:?usage: bash bench/gpu_check.sh REF OUT}
OUT=${2:?usage: bash bench/gpu_check.sh REF OUT}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
LOG=$OUT/log.txt
PY=${PYTHON:-python3}
T0=$(date +%s)

STAGES=${STAGES:-tests floor llamagen var nar generate breakdown inductor}  # which stages run, in this order

stage() {  # stage NAME SECONDS COMMAND...: runs if STAGES names it
  local name=$1 limit=$2
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name rc=$? after $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cpu threads', torch.get_num_threads())"
  lscpu | grep 'Model name'; } >>"$LOG" 2>&1

stage tests "${T_TESTS:-120}" $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_cache.py \
  tests/test_dtype_auto.py tests/test_floor.py ${TEST_ARGS:-}
stage floor "${T_FLOOR:-60}" $PY -m varkit.cli bench floor --device cuda --out-dir "$OUT"
stage llamagen "${T_LLAMAGEN:-170}" $PY bench/side_by_side/llamagen.py --official "$REF/LlamaGen" --device cuda \
  --batch 1 8 --compile --repeats 2 --out-dir "$OUT" ${LLAMAGEN_ARGS:-}
stage var "${T_VAR:-120}" $PY bench/side_by_side/var.py --official "$REF/var_official" --device cuda --batch 1 8 \
  --dtype bfloat16 --compile --repeats 3 --out-dir "$OUT" ${VAR_ARGS:-}
stage nar "${T_NAR:-100}" $PY bench/side_by_side/nar.py --official "$REF/NAR/NAR-images" --device cuda --batch 1 8 \
  --dtype bfloat16 --compile both --skip-bundled --skip-raster --out-dir "$OUT" ${NAR_ARGS:-}
stage generate "${T_GEN:-40}" $PY -m varkit.cli generate --model digits --device cuda --compile --per-class 2 \
  --out /tmp/digits_cuda.png
stage breakdown "${T_BREAKDOWN:-200}" $PY bench/cuda_breakdown.py --out "$OUT/cuda_breakdown.json"
stage inductor "${T_INDUCTOR:-120}" $PY bench/side_by_side/llamagen.py --official "$REF/LlamaGen" --device cuda \
  --batch 1 --inductor --no-bf16 --greedy-batch 0 --name llamagen_side_by_side_cuda_inductor --out-dir "$OUT"
echo "== done after $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
