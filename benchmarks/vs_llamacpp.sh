#!/usr/bin/env bash
# llama.cpp's llama-bench and this library's bench_cpu.py, alternating on the same machine (2 threads), each
# llama-bench run between two plain reads of 1 GiB. Needs the three GGUF files the README's commands make (the
# library's random 1.1B weights through its Hugging Face export and llama.cpp's converter) in the current folder.
#
#
#     LLAMA_CPP=../llama.cpp bash benchmarks/vs_llamacpp.sh [RUNS] [ISA]   # prints llama-bench's and bench_cpu's JSON
#
# ISA is the CPU level both sides run at: `native` (default: each as built for this CPU) or `avx2`: the library
# emulated as an AVX2-only CPU (PyTorch, oneDNN, MKL and fbgemm capped at AVX2, and so the library's own kernels,
# which follow ATEN_CPU_CAPABILITY: llama.cpu), beside a llama.cpp built for AVX2 alone (README, "Against
# llama.cpp": -DGGML_NATIVE=OFF -DGGML_AVX2=ON, AVX-512 and AMX off). Any x86 machine with AVX-512 can so measure
# the AVX2 column; LLAMA_CPP must point at the build for that level (its llama-bench reports its CPU features).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
isa="${2:-native}"
case "$isa" in
  native) emulate=() ;;
  avx2) emulate=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
                 FBGEMM_ENABLE_INSTRUCTIONS=AVX2) ;;
  *) echo "error: ISA must be native or avx2, not '$isa'" >&2; exit 2 ;;
esac
bench="${LLAMA_CPP:-../llama.cpp}/build/bin/llama-bench"
[ -x "$bench" ] || { echo "error: no llama-bench at $bench (set LLAMA_CPP to a built llama.cpp)" >&2; exit 2; }
for f in random-1.1b-bf16.gguf random-1.1b-q8_0.gguf random-1.1b-q4_0.gguf; do
  [ -f "$f" ] || { echo "error: $f not found here (see the README's llama.cpp commands)" >&2; exit 2; }
done
read_gb() {  # the faster of PyTorch's sum and the kernels' pool read, as bench_cpu.py measures it
  env "${emulate[@]}" python -c "
import sys, time, torch; sys.path.insert(0, '$here/..'); from llama import qkernels
torch.set_num_threads(2); x = torch.ones(2**28); best = 0.0
for f in (x.sum, lambda: qkernels.read(x)):
    t = time.perf_counter(); f(); best = max(best, 2**30 / (time.perf_counter() - t))
print(round(best / 1e9, 1))"
}
for run in $(seq "${1:-2}"); do
  echo "{\"run\": $run, \"isa\": \"$isa\", \"read_before_gb_s\": $(read_gb)}"
  "$bench" -m random-1.1b-bf16.gguf -m random-1.1b-q8_0.gguf -m random-1.1b-q4_0.gguf -p 256 -n 128 -t 2 -r 3 -o json
  echo "{\"run\": $run, \"read_after_gb_s\": $(read_gb)}"
  env "${emulate[@]}" python "$here/bench_cpu.py" --threads 2 --rounds 3
done
