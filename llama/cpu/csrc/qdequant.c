/* The packed int8 and int4 weights as floats, for products of prefill size (qlinear.c's interface):
 * - qk_dequantize: rows of the weight into bfloat16 or float32, for a BLAS (the Python side calls it);
 * - qk_gemm_quantized: each weight row into floats as linear16.c's AVX2 GEMM asks for it (CPUs without AVX-512,
 *   where the integer kernels are not the fastest at these sizes). */

#include "qlinear.h"

typedef struct {
    int kind, isa, out_bf16;
    int64_t K, group, r0, r1;
    const uint8_t *w;
    const float *rscale;
    void *out;
} deq_t;

static inline void dequantize_body(const deq_t *d, int64_t lo, int64_t hi) {
    const int64_t K = d->K;
    for (int64_t n = lo; n < hi; n++) {
        const int64_t r = d->r0 + n, t = r / TILE;
        const int i = (int)(r % TILE);
        uint16_t *ob = (uint16_t *)d->out + n * K;
        float *of = (float *)d->out + n * K;
        if (d->kind == KIND_INT8) {
            const float s = d->rscale[r];
            for (int64_t c = 0; c < K / CHUNK; c++) {
                const int8_t *w = (const int8_t *)d->w + t * int8_tile_bytes(K) + c * TILE * CHUNK + i * CHUNK;
                if (d->out_bf16) for (int k = 0; k < CHUNK; k++) ob[c * CHUNK + k] = f32_to_bf16((float)w[k] * s);
                else for (int k = 0; k < CHUNK; k++) of[c * CHUNK + k] = (float)w[k] * s;
            }
            continue;
        }
        const int64_t group = d->group, ip = r % PANEL;
        const uint8_t *gp = d->w + (r / PANEL) * int4_panel_bytes(K, group);
        for (int64_t g = 0; g < K / group; g++, gp += int4_group_bytes(group)) {
            float s, z;
            int4_row_coeffs(gp, ip, &s, &z);
            for (int64_t q = 0; q < group / 8; q++)
                for (int k = 0; k < 8; k++) {
                    const uint8_t byte = gp[64 + 64 * q + 4 * ip + (k & 3)];
                    const float v = (float)(k < 4 ? byte & 15 : byte >> 4) * s + z;
                    const int64_t at = g * group + 8 * q + k;
                    if (d->out_bf16) ob[at] = f32_to_bf16(v);
                    else of[at] = v;
                }
        }
    }
}

#if QK_X86
__attribute__((target(AVX512))) static inline void put16(const deq_t *d, void *out, int64_t at, __m512 v) {
    if (d->out_bf16) store_bf16x16((uint16_t *)out + at, v);
    else _mm512_storeu_ps((float *)out + at, v);
}

__attribute__((target(AVX512))) static void dequantize_avx512(const deq_t *d, int64_t lo, int64_t hi) {
    const int64_t K = d->K;
    for (int64_t n = lo; n < hi; n++) {
        const int64_t r = d->r0 + n;
        if (d->kind == KIND_INT8) {
            const int64_t t = r / TILE;
            const __m512 s = _mm512_set1_ps(d->rscale[r]);
            const int8_t *w = (const int8_t *)d->w + t * int8_tile_bytes(K) + (r % TILE) * CHUNK;
            for (int64_t c = 0; c < K / CHUNK; c++, w += TILE * CHUNK)
                for (int q = 0; q < 4; q++) {
                    __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16 * q)));
                    put16(d, d->out, n * K + c * CHUNK + 16 * q, _mm512_mul_ps(_mm512_cvtepi32_ps(v), s));
                }
            continue;
        }
        const int64_t group = d->group;
        INT4_ROW_WALK(d->w + (r / PANEL) * int4_panel_bytes(K, group), r % PANEL, K, group, {
            const __m512 s = _mm512_set1_ps(sf), z = _mm512_set1_ps(zf);
            for (int i = 0; i < 2; i++)
                put16(d, d->out, n * K + at + 16 * i,
                      _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes[i])), s, z));
        });
    }
}

__attribute__((target(AVX2))) static void dequantize_avx2(const deq_t *d, int64_t lo, int64_t hi) {
    dequantize_body(d, lo, hi);
}

/* One row of the packed weight as K floats, for the AVX2 GEMM (qk_gemm16_fill), 8 inputs per instruction: the
 * plain loop (byte by byte, a branch per nibble) cost about as much per weight as the GEMM's FMAs at 256 rows. */
__attribute__((target(AVX2))) static void fill_row_avx2(const void *ctx, int64_t r, float *out) {
    const deq_t *d = (const deq_t *)ctx;
    const int64_t K = d->K;
    if (d->kind == KIND_INT8) {
        const __m256 s = _mm256_set1_ps(d->rscale[r]);
        const int8_t *w = (const int8_t *)d->w + (r / TILE) * int8_tile_bytes(K) + (r % TILE) * CHUNK;
        for (int64_t c = 0; c < K / CHUNK; c++, w += TILE * CHUNK)
            for (int q = 0; q < CHUNK / 8; q++) {
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 8 * q)));
                _mm256_storeu_ps(out + c * CHUNK + 8 * q, _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
            }
        return;
    }
    const int64_t group = d->group;
    INT4_ROW_WALK(d->w + (r / PANEL) * int4_panel_bytes(K, group), r % PANEL, K, group, {
        const __m256 s = _mm256_set1_ps(sf), z = _mm256_set1_ps(zf);
        float *o = out + at;
        for (int i = 0; i < 2; i++) {
            const __m256 first = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes[i]));
            const __m256 second = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes[i], 8)));
            _mm256_storeu_ps(o + 16 * i, _mm256_fmadd_ps(first, s, z));
            _mm256_storeu_ps(o + 16 * i + 8, _mm256_fmadd_ps(second, s, z));
        }
    });
}
#endif

/* y (M x N, bfloat16) = x (M x K, bfloat16) @ W.T for prefill-sized products where the integer kernels are not
 * the fastest (AVX2): each panel of weight rows is dequantized into floats and met by linear16.c's
 * register-blocked GEMM (measured on a Zen 4 emulated as AVX2, 2 threads, 256 rows: faster than MKL's float32
 * GEMM on dequantized tiles). Returns 0 or EINVAL (a shape the kernels refuse, no AVX2), ENOMEM. */
int qk_gemm_quantized(int kind, int threads, const uint16_t *x, int64_t M, int64_t K, const void *w,
                      const float *rscale, int64_t N, int64_t group, uint16_t *out) {
    if (qk_check_shape(kind, K, group) || M < 1 || N < 1 || qk_best_isa() < ISA_AVX2) return EINVAL;
#if QK_X86
    deq_t d = {kind, ISA_AVX2, 0, K, kind == KIND_INT4 ? group : 0, 0, 0, (const uint8_t *)w, rscale, NULL};
    return qk_gemm16_fill(threads, x, M, K, N, fill_row_avx2, &d, out);
#else
    (void)threads, (void)x, (void)w, (void)rscale, (void)out;
    return EINVAL;
#endif
}

static void dequantize_part(const void *ctx, int64_t part, int64_t parts) {
    const deq_t *d = (const deq_t *)ctx;
    int64_t lo, hi;
    share(d->r1 - d->r0, part, parts, &lo, &hi);
    if (lo >= hi) return;
#if QK_X86
    if (d->isa == ISA_AVX512_VNNI) { dequantize_avx512(d, lo, hi); return; }
    if (d->isa == ISA_AVX2) { dequantize_avx2(d, lo, hi); return; }
#endif
    dequantize_body(d, lo, hi);
}

/* Rows [r0, r1) of the packed weight as floats into out ((r1 - r0) x K, bfloat16 or float32), for products of
 * prefill size through a BLAS. */
int qk_dequantize(int kind, int isa, int threads, const void *w, const float *rscale, int64_t K, int64_t group,
                  int64_t r0, int64_t r1, void *out, int out_bf16) {
    if (qk_check_shape(kind, K, group) || r0 < 0 || r1 < r0 || isa < 0 || isa > qk_best_isa()) return EINVAL;
    deq_t d = {kind, isa, out_bf16, K, kind == KIND_INT4 ? group : 0, r0, r1, (const uint8_t *)w, rscale, out};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > r1 - r0) parts = r1 - r0;
    pool_run(dequantize_part, &d, parts < 1 ? 1 : parts);
    return 0;
}
