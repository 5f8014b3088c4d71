#!/usr/bin/env bash
# One GPU lease, planned as one command: install what the GPU image lacks, check correctness on CUDA, then time
# every decode variant the GPU issue asks for. Logs and JSON go to $OUT (default ./gpu-out).
#
# Prepare on the dev machine (the GPU machine has no internet):
#   pip wheel --no-deps fairscale fire termcolor -w .whl && echo /.whl/ >> .git/info/exclude
# Then run it through the device tool with `.whl` carried:  bash scripts/gpu_session.sh
# Each step has its own time limit so that one slow step cannot eat the lease; a failing step does not stop
# the later ones. SHAPE (default 7B) and STEPS (default: all of them) narrow a run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu-out}
SHAPE=${SHAPE:-7B}
STEPS=${STEPS:-install tests decode eager quant}
mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=8

step() {  # step NAME SECONDS COMMAND...: run it, keep its output in $OUT/NAME.log, note its exit status
  local name=$1 limit=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" \
  >>"$OUT/gpu.txt" 2>&1
step install 120 pip install --no-deps --no-index .whl/*.whl
# fp32 parity with transformers on CUDA, compiled == eager, ragged prefill, clear device errors, int8/int4.
step tests 420 python -m pytest -q -x tests/test_cuda.py tests/test_parity.py tests/test_errors.py \
  tests/test_decode_step.py tests/test_quantize.py
# The default (compiled decode step, CUDA graphs) against eager and transformers' static-cache generate.
step decode 600 python benchmarks/bench_decode.py --device cuda --shape "$SHAPE" --batches 1,8 --hf_static \
  --vs_eager --pairs 5
# Eager alone at batch 1 and 8 (the reference did 28 and 307 tok/s at 7B), against transformers eager.
step eager 480 python benchmarks/bench_decode.py --device cuda --shape "$SHAPE" --batches 1,8 --compile no --hf \
  --pairs 3
# Weight-only int8/int4 against bfloat16, compiled decode.
step quant 480 python benchmarks/bench_decode.py --device cuda --shape "$SHAPE" --quantize int8,int4 --pairs 5
cat "$OUT/summary.txt"
