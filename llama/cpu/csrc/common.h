/* What the kernels share: includes, the instruction sets, bfloat16 conversions and the thread pool (pool.c).
 * Plain C, no Python or PyTorch headers. */

#ifndef LLAMA_KERNELS_COMMON_H
#define LLAMA_KERNELS_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if (defined(__x86_64__) || defined(__i386__)) && !defined(QK_PORTABLE)  /* -DQK_PORTABLE: as on ARM (tests) */
#define QK_X86 1
#include <immintrin.h>
#else
#define QK_X86 0
#endif

#define TILE 4     /* output rows stored interleaved and computed together */
#define QK_INTERNAL __attribute__((visibility("hidden")))  /* a function one source file gives another */
#define MAX_THREADS 64

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };

/* The table of loops for an instruction set: AVX-512 from VNNI up, AVX2, else plain C (non-x86: plain C only). */
#if QK_X86
#define QK_PICK_ISA(isa, scalar, avx2, avx512) \
    ((isa) >= ISA_AVX512_VNNI ? &(avx512) : (isa) == ISA_AVX2 ? &(avx2) : &(scalar))
#else
#define QK_PICK_ISA(isa, scalar, avx2, avx512) ((void)(isa), &(scalar))
#endif

/* The version of the interface llama/cpu/qkernels.py and llama/model/fused_decode.py call: raise it with any
 * change to a function's arguments or a structure the Python side mirrors. */
#define QK_ABI_VERSION 5

/* A constant the Python side reads at load (qk_constant, pool.c) and checks against its own: a {NULL, 0}-ended
 * table per source file, so each number is written once, beside the code that uses it. */
typedef struct {
    const char *name;
    int64_t value;
} qk_const_t;

extern const qk_const_t qk_pool_constants[], qk_qlinear_constants[], qk_linear16_constants[], qk_decode_constants[];
extern const qk_const_t qk_lora_constants[];

/* LoRA adapters inside the fused step (lora.c): a layer's projections, in this order, and the term's entry. */
enum { LORA_QKV = 0, LORA_WO = 1, LORA_W13 = 2, LORA_W2 = 3, LORA_PROJS = 4 };
typedef struct qk_lora qk_lora_t;
int qk_lora_add(const qk_lora_t *lora, int64_t layer, int proj, int threads, int isa, const uint16_t *x, int64_t M,
                uint16_t *y, int64_t width);

/* --- numbers ------------------------------------------------------------------------------------------------ */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if QK_X86
#define AVX2 "avx2,fma"
#define AVX512 "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define AVX512BF16 "avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma"

/* 16 floats to bfloat16 (round to nearest even; finite values), stored at out. */
__attribute__((target(AVX512))) static inline void store_bf16x16(uint16_t *out, __m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

/* The sum of 8 floats (the AVX2 kernels' dot products end here). */
__attribute__((target(AVX2))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* The pool (pool.c): fn(ctx, part, parts) for part 0..parts-1, the caller's thread running part 0. */
typedef void (*task_fn)(const void *ctx, int64_t part, int64_t parts);
int pool_run(task_fn fn, const void *ctx, int64_t parts);

/* Share `part` of `parts` of n items, in whole items. */
static inline void share(int64_t n, int64_t part, int64_t parts, int64_t *lo, int64_t *hi) {
    *lo = n * part / parts;
    *hi = n * (part + 1) / parts;
}

/* The AVX2 bfloat16 GEMM (linear16.c) over weights of another format: fill(ctx, row, out) writes one weight row
 * as K floats. */
typedef void (*gemm_fill_t)(const void *ctx, int64_t row, float *out);
int qk_gemm16_fill(int threads, const uint16_t *x, int64_t M, int64_t K, int64_t N, gemm_fill_t fill,
                   const void *ctx, uint16_t *out);

/* What this CPU runs, as the Python side decided it (qk_set_cpu, pool.c): the kernels never pick above it. */
int qk_best_isa(void);
int qk_has_avx512_bf16(void);

#endif
