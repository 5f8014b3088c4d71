/* bfloat16 linear layers on the CPU at the sizes of decoding: y = x @ W.T for a few rows of x.
 *
 * A decoding step reads every weight once, so the product runs at the speed the weights stream from memory if
 * the arithmetic keeps up and the stream is sequential. The weight is repacked once (qk_pack_bf16) into tiles of
 * TILE output rows interleaved 32 inputs at a time, and AVX-512 BF16's `vdpbf16ps` multiplies 32 bfloat16
 * pairs into 16 float32 sums per instruction; the four rows of a tile share each load of x. Sums are float32,
 * the result is rounded once to bfloat16, as a BLAS's bfloat16 product does (the order of the additions differs).
 *
 * Layout: chunk c (inputs 32c..32c+31) of row i of tile t at element (t * K/32 * TILE + c * TILE + i) * 32; the
 * last tile's padding rows are zeros. The output rows are split between the pool's threads by tiles. */

#include "common.h"

#define CHUNK16 32  /* inputs per chunk: one 64-byte line of bfloat16 */

int64_t qk_packed_bf16_bytes(int64_t N, int64_t K) {
    if (N < 1 || K < CHUNK16 || K % CHUNK16) return -1;
    return (N + TILE - 1) / TILE * TILE * K * 2;
}

int qk_pack_bf16(const uint16_t *src, uint16_t *dst, int64_t N, int64_t K) {
    if (qk_packed_bf16_bytes(N, K) < 0) return EINVAL;
    memset(dst, 0, (size_t)qk_packed_bf16_bytes(N, K));
    const int64_t nc = K / CHUNK16;
    for (int64_t r = 0; r < N; r++)
        for (int64_t c = 0; c < nc; c++)
            memcpy(dst + ((r / TILE) * nc * TILE + c * TILE + r % TILE) * CHUNK16, src + r * K + c * CHUNK16,
                   CHUNK16 * 2);
    return 0;
}

typedef struct {
    int64_t M, N, K;
    const uint16_t *x, *w;  /* x: M x K; w: packed */
    uint16_t *out;          /* M x N */
} job16_t;

static void tiles16_scalar(const job16_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K, nc = K / CHUNK16;
    const uint16_t *x = j->x + m * K;
    for (int64_t t = t0; t < t1; t++)
        for (int i = 0; i < TILE; i++) {
            const int64_t r = t * TILE + i;
            if (r >= j->N) break;
            float acc = 0.0f;
            for (int64_t c = 0; c < nc; c++) {
                const uint16_t *w = j->w + ((t * nc + c) * TILE + i) * CHUNK16;
                for (int k = 0; k < CHUNK16; k++) acc += bf16_to_f32(w[k]) * bf16_to_f32(x[c * CHUNK16 + k]);
            }
            j->out[m * j->N + r] = f32_to_bf16(acc);
        }
}

#if QK_X86
__attribute__((target(AVX512BF16))) static void tiles16_avx512(const job16_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K, nc = K / CHUNK16;
    const uint16_t *x = j->x + m * K;
    for (int64_t t = t0; t < t1; t++) {
        const uint16_t *w = j->w + t * nc * TILE * CHUNK16;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (int64_t c = 0; c < nc; c++, w += TILE * CHUNK16) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + c * CHUNK16);
            a0 = _mm512_dpbf16_ps(a0, xv, (__m512bh)_mm512_loadu_si512(w));
            a1 = _mm512_dpbf16_ps(a1, xv, (__m512bh)_mm512_loadu_si512(w + CHUNK16));
            a2 = _mm512_dpbf16_ps(a2, xv, (__m512bh)_mm512_loadu_si512(w + 2 * CHUNK16));
            a3 = _mm512_dpbf16_ps(a3, xv, (__m512bh)_mm512_loadu_si512(w + 3 * CHUNK16));
        }
        const float v[TILE] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                               _mm512_reduce_add_ps(a3)};
        for (int i = 0; i < TILE && t * TILE + i < j->N; i++) j->out[m * j->N + t * TILE + i] = f32_to_bf16(v[i]);
    }
}


/* Four rows of x against each tile: sixteen sums, each weight load serving four rows (batched decoding). */
__attribute__((target(AVX512BF16))) static void tiles16x4_avx512(const job16_t *j, int64_t m, int64_t t0,
                                                                  int64_t t1) {
    const int64_t K = j->K, nc = K / CHUNK16;
    const uint16_t *x = j->x + m * K;
    for (int64_t t = t0; t < t1; t++) {
        const uint16_t *w = j->w + t * nc * TILE * CHUNK16;
        __m512 a[4][TILE];
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < TILE; i++) a[r][i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < nc; c++, w += TILE * CHUNK16) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + CHUNK16),
                           w2 = (__m512bh)_mm512_loadu_si512(w + 2 * CHUNK16),
                           w3 = (__m512bh)_mm512_loadu_si512(w + 3 * CHUNK16);
            for (int r = 0; r < 4; r++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + c * CHUNK16);
                a[r][0] = _mm512_dpbf16_ps(a[r][0], xv, w0);
                a[r][1] = _mm512_dpbf16_ps(a[r][1], xv, w1);
                a[r][2] = _mm512_dpbf16_ps(a[r][2], xv, w2);
                a[r][3] = _mm512_dpbf16_ps(a[r][3], xv, w3);
            }
        }
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < TILE && t * TILE + i < j->N; i++)
                j->out[(m + r) * j->N + t * TILE + i] = f32_to_bf16(_mm512_reduce_add_ps(a[r][i]));
    }
}
#endif

static void linear16_part(const void *ctx, int64_t part, int64_t parts) {
    const job16_t *j = (const job16_t *)ctx;
    int64_t t0, t1;
    share((j->N + TILE - 1) / TILE, part, parts, &t0, &t1);
    /* A few tiles at a time (about 32 KiB) meet every row of x, so the weight streams from memory once. */
    const int64_t step = j->M == 1 ? t1 - t0 : (8192 / j->K > 1 ? 8192 / j->K : 1);
    for (int64_t t = t0; t < t1; t += step) {
        const int64_t end = t + step < t1 ? t + step : t1;
        for (int64_t m = 0; m < j->M; m++) {
#if QK_X86
            if (qk_has_avx512_bf16() && m + 4 <= j->M) { tiles16x4_avx512(j, m, t, end); m += 3; continue; }
            if (qk_has_avx512_bf16()) { tiles16_avx512(j, m, t, end); continue; }
#endif
            tiles16_scalar(j, m, t, end);
        }
    }
}

/* y (M x N, bfloat16) = x (M x K, bfloat16) @ W.T from qk_pack_bf16's layout. Returns 0 or EINVAL. */
int qk_linear_bf16(int threads, const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                   uint16_t *out) {
    if (M < 1 || qk_packed_bf16_bytes(N, K) < 0) return EINVAL;
    job16_t j = {.M = M, .N = N, .K = K, .x = x, .w = w, .out = out};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > (N + TILE - 1) / TILE) parts = (N + TILE - 1) / TILE;
    pool_run(linear16_part, &j, parts);
    return 0;
}

typedef struct {
    int64_t K, r0, r1;
    const uint16_t *w;
    uint16_t *out;
} untile_t;

static void untile_part(const void *ctx, int64_t part, int64_t parts) {
    const untile_t *u = (const untile_t *)ctx;
    const int64_t nc = u->K / CHUNK16;
    int64_t lo, hi;
    share(u->r1 - u->r0, part, parts, &lo, &hi);
    for (int64_t n = lo; n < hi; n++) {
        const int64_t r = u->r0 + n;
        const uint16_t *src = u->w + ((r / TILE) * nc * TILE + r % TILE) * CHUNK16;
        for (int64_t c = 0; c < nc; c++) memcpy(u->out + n * u->K + c * CHUNK16, src + c * TILE * CHUNK16, CHUNK16 * 2);
    }
}

/* Rows [r0, r1) of the packed weight, row-major, into out ((r1 - r0) x K): prefill-sized products go through a
 * BLAS a block of rows at a time. */
int qk_untile_bf16(int threads, const uint16_t *w, int64_t K, int64_t r0, int64_t r1, uint16_t *out) {
    if (K < CHUNK16 || K % CHUNK16 || r0 < 0 || r1 < r0) return EINVAL;
    untile_t u = {K, r0, r1, w, out};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > r1 - r0) parts = r1 - r0;
    pool_run(untile_part, &u, parts < 1 ? 1 : parts);
    return 0;
}
