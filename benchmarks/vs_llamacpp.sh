#!/usr/bin/env bash
# llama.cpp's llama-bench and this library's bench_cpu.py, alternating on the same machine (2 threads), each
# llama-bench run between two plain reads of 1 GiB. Needs the three GGUF files the README's commands make (the
# library's random 1.1B weights through its Hugging Face export and llama.cpp's converter) in the current folder.
#
#     LLAMA_CPP=../llama.cpp bash benchmarks/vs_llamacpp.sh [RUNS]   # prints llama-bench's and bench_cpu's JSON
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="${LLAMA_CPP:-../llama.cpp}/build/bin/llama-bench"
[ -x "$bench" ] || { echo "error: no llama-bench at $bench (set LLAMA_CPP to a built llama.cpp)" >&2; exit 2; }
for f in random-1.1b-bf16.gguf random-1.1b-q8_0.gguf random-1.1b-q4_0.gguf; do
  [ -f "$f" ] || { echo "error: $f not found here (see the README's llama.cpp commands)" >&2; exit 2; }
done
read_gb() {  # the faster of PyTorch's sum and the kernels' pool read, as bench_cpu.py measures it
  python -c "
import sys, time, torch; sys.path.insert(0, '$here/..'); from llama import qkernels
torch.set_num_threads(2); x = torch.ones(2**28); best = 0.0
for f in (x.sum, lambda: qkernels.read(x)):
    t = time.perf_counter(); f(); best = max(best, 2**30 / (time.perf_counter() - t))
print(round(best / 1e9, 1))"
}
for run in $(seq "${1:-2}"); do
  echo "{\"run\": $run, \"read_before_gb_s\": $(read_gb)}"
  "$bench" -m random-1.1b-bf16.gguf -m random-1.1b-q8_0.gguf -m random-1.1b-q4_0.gguf -p 256 -n 128 -t 2 -r 3 -o json
  echo "{\"run\": $run, \"read_after_gb_s\": $(read_gb)}"
  python "$here/bench_cpu.py" --threads 2 --rounds 3
done
