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
#ifndef GEMM16_ROWS
#define GEMM16_ROWS 16  /* AVX2: rows of x from which the GEMM below runs (measured: the tiles win at 8, it at 32) */
#endif
#define GEMM16_R 4
#define GP 24  /* AVX2's GEMM: weight rows per panel (below) */

const qk_const_t qk_linear16_constants[] = {{"chunk16", CHUNK16}, {NULL, 0}};

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
    int isa;                /* ISA_AVX512_VNNI: vdpbf16ps (where the CPU has it); ISA_AVX2; ISA_SCALAR */
    const uint16_t *x, *w;  /* x: M x K; w: packed */
    const float *xf;        /* AVX2: x as floats (widen16_avx2, or in order for the GEMM) */
    float *panels;          /* AVX2's GEMM: K x GP floats per part, then K floats of one row's scratch */
    uint16_t *out;          /* M x N */
    gemm_fill_t fill;       /* AVX2's GEMM over another weight format (qlinear.c): fill(ctx, row, K floats) */
    const void *fill_ctx;
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

/* AVX2 (no bfloat16 instructions): each weight turns into a float by a shift (even inputs) or a mask (odd ones) and
 * meets x in fused multiply-adds. x is converted once per call (qk_linear_bf16) into the same order: per chunk, the
 * even then the odd inputs of its first 16, then of its last 16 (xf, 32 floats a chunk). R rows of x (1 or 2) share
 * each tile's weights; 8 sums in flight keep the multiply-adds' latency hidden. */
__attribute__((target(AVX2))) static inline __attribute__((always_inline)) void tile16_avx2(
        const job16_t *j, const float *xf, int64_t m, int64_t t, const int R) {
    const int64_t K = j->K, nc = K / CHUNK16;
    const uint16_t *w = j->w + t * nc * TILE * CHUNK16;
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 a[TILE], b[TILE];  /* R = 1: a the even inputs' sums, b the odd ones'; R = 2: a, b the two rows' */
    for (int i = 0; i < TILE; i++) a[i] = b[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nc; c++, w += TILE * CHUNK16) {
        const float *x0 = xf + m * K + c * CHUNK16, *x1 = x0 + K;
        for (int i = 0; i < TILE; i++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + i * CHUNK16));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + i * CHUNK16 + 16));
            const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
            const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
            const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
            const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
            if (R == 1) {
                a[i] = _mm256_fmadd_ps(e0, _mm256_loadu_ps(x0), a[i]);
                b[i] = _mm256_fmadd_ps(o0, _mm256_loadu_ps(x0 + 8), b[i]);
                a[i] = _mm256_fmadd_ps(e1, _mm256_loadu_ps(x0 + 16), a[i]);
                b[i] = _mm256_fmadd_ps(o1, _mm256_loadu_ps(x0 + 24), b[i]);
            } else {
                a[i] = _mm256_fmadd_ps(e0, _mm256_loadu_ps(x0), a[i]);
                b[i] = _mm256_fmadd_ps(e0, _mm256_loadu_ps(x1), b[i]);
                a[i] = _mm256_fmadd_ps(o0, _mm256_loadu_ps(x0 + 8), a[i]);
                b[i] = _mm256_fmadd_ps(o0, _mm256_loadu_ps(x1 + 8), b[i]);
                a[i] = _mm256_fmadd_ps(e1, _mm256_loadu_ps(x0 + 16), a[i]);
                b[i] = _mm256_fmadd_ps(e1, _mm256_loadu_ps(x1 + 16), b[i]);
                a[i] = _mm256_fmadd_ps(o1, _mm256_loadu_ps(x0 + 24), a[i]);
                b[i] = _mm256_fmadd_ps(o1, _mm256_loadu_ps(x1 + 24), b[i]);
            }
        }
    }
    for (int i = 0; i < TILE && t * TILE + i < j->N; i++) {
        if (R == 1) {
            j->out[m * j->N + t * TILE + i] = f32_to_bf16(hsum256(_mm256_add_ps(a[i], b[i])));
        } else {
            j->out[m * j->N + t * TILE + i] = f32_to_bf16(hsum256(a[i]));
            j->out[(m + 1) * j->N + t * TILE + i] = f32_to_bf16(hsum256(b[i]));
        }
    }
}

__attribute__((target(AVX2))) static void tiles16_avx2(const job16_t *j, int64_t m, int64_t t0, int64_t t1, int R) {
    for (int64_t t = t0; t < t1; t++) {
        if (R == 2) tile16_avx2(j, j->xf, m, t, 2);
        else tile16_avx2(j, j->xf, m, t, 1);
    }
}

/* x (M x K bfloat16) as floats in tile16_avx2's order. */
__attribute__((target(AVX2))) static void widen16_avx2(const uint16_t *x, int64_t n, float *out) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t i = 0; i < n; i += 16) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x + i));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        _mm256_storeu_ps(out + i + 8, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
    }
}

/* --- AVX2, many rows (prefill): a GEMM over panels of GP weight rows ---------------------------------------------
 * Without bfloat16 instructions the tiles above spend a load of x per multiply-add. From GEMM16_ROWS rows of x up,
 * each thread instead converts one panel of GP = 24 weight rows at a time into floats, input-major (K x 24, in its
 * cache), and runs every row of x over it, GEMM16_R = 4 rows at a time: each input of a row is broadcast once and
 * meets three vectors of 8 weights, 12 sums in flight (the register blocking of the BLAS kernels), and each panel
 * load serves 4 rows (x, read once per panel, comes from the outer caches). */


/* Rows m0.. m0 + R - 1 (R = 1 or 4) of x against a panel; named sums (an array of them was kept in memory). */
__attribute__((target(AVX2))) static inline __attribute__((always_inline)) void gemm16_rows_avx2(
        const job16_t *j, const float *panel, int64_t n0, int64_t m0, const int R) {
    const int64_t K = j->K;
    const float *x = j->xf + m0 * K;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00, a20 = a00, a21 = a00,
           a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(panel + k * GP), b1 = _mm256_loadu_ps(panel + k * GP + 8),
                     b2 = _mm256_loadu_ps(panel + k * GP + 16);
        __m256 xv = _mm256_broadcast_ss(x + k);
        a00 = _mm256_fmadd_ps(xv, b0, a00), a01 = _mm256_fmadd_ps(xv, b1, a01), a02 = _mm256_fmadd_ps(xv, b2, a02);
        if (R == 4) {
            xv = _mm256_broadcast_ss(x + K + k);
            a10 = _mm256_fmadd_ps(xv, b0, a10), a11 = _mm256_fmadd_ps(xv, b1, a11), a12 = _mm256_fmadd_ps(xv, b2, a12);
            xv = _mm256_broadcast_ss(x + 2 * K + k);
            a20 = _mm256_fmadd_ps(xv, b0, a20), a21 = _mm256_fmadd_ps(xv, b1, a21), a22 = _mm256_fmadd_ps(xv, b2, a22);
            xv = _mm256_broadcast_ss(x + 3 * K + k);
            a30 = _mm256_fmadd_ps(xv, b0, a30), a31 = _mm256_fmadd_ps(xv, b1, a31), a32 = _mm256_fmadd_ps(xv, b2, a32);
        }
    }
    float v[4][GP];
    _mm256_storeu_ps(v[0], a00), _mm256_storeu_ps(v[0] + 8, a01), _mm256_storeu_ps(v[0] + 16, a02);
    _mm256_storeu_ps(v[1], a10), _mm256_storeu_ps(v[1] + 8, a11), _mm256_storeu_ps(v[1] + 16, a12);
    _mm256_storeu_ps(v[2], a20), _mm256_storeu_ps(v[2] + 8, a21), _mm256_storeu_ps(v[2] + 16, a22);
    _mm256_storeu_ps(v[3], a30), _mm256_storeu_ps(v[3] + 8, a31), _mm256_storeu_ps(v[3] + 16, a32);
    for (int r = 0; r < R; r++)
        for (int i = 0; i < GP && n0 + i < j->N; i++) j->out[(m0 + r) * j->N + n0 + i] = f32_to_bf16(v[r][i]);
}

__attribute__((target(AVX2))) static void gemm16_avx2(const job16_t *j, float *panel, int64_t p0, int64_t p1) {
    const int64_t K = j->K, nc = K / CHUNK16, M = j->M;
    for (int64_t p = p0; p < p1; p++) {
        if (j->fill) {  /* another format: each row dequantized into the scratch after the panel, then placed */
            float *row = panel + K * GP;
            for (int i = 0; i < GP; i++) {
                const int64_t r = p * GP + i;
                if (r < j->N) j->fill(j->fill_ctx, r, row);
                for (int64_t k = 0; k < K; k++) panel[k * GP + i] = r < j->N ? row[k] : 0.0f;
            }
            int64_t m = 0;
            for (; m + GEMM16_R <= M; m += GEMM16_R) gemm16_rows_avx2(j, panel, p * GP, m, GEMM16_R);
            for (; m < M; m++) gemm16_rows_avx2(j, panel, p * GP, m, 1);
            continue;
        }
        const uint16_t *rows[GP];  /* weight row GP p + i; past the last tile: NULL, zeros */
        for (int i = 0; i < GP; i++) {
            const int64_t r = p * GP + i, t = r / TILE;
            rows[i] = t * TILE < j->N ? j->w + (t * nc * TILE + r % TILE) * CHUNK16 : NULL;
        }
        for (int64_t c = 0; c < nc; c++)
            for (int k = 0; k < CHUNK16; k++) {
                float *dst = panel + (c * CHUNK16 + k) * GP;
                for (int i = 0; i < GP; i++) dst[i] = rows[i] ? bf16_to_f32(rows[i][c * TILE * CHUNK16 + k]) : 0.0f;
            }
        int64_t m = 0;
        for (; m + GEMM16_R <= M; m += GEMM16_R) gemm16_rows_avx2(j, panel, p * GP, m, GEMM16_R);
        for (; m < M; m++) gemm16_rows_avx2(j, panel, p * GP, m, 1);
    }
}

/* x (M x K bfloat16) as floats, in order. */
__attribute__((target(AVX2))) static void widen_avx2(const uint16_t *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i))), 16)));
}
#endif

static void gemm16_part(const void *ctx, int64_t part, int64_t parts) {
    const job16_t *j = (const job16_t *)ctx;
    int64_t p0, p1;
    share((j->N + GP - 1) / GP, part, parts, &p0, &p1);
    if (p0 >= p1) return;
#if QK_X86
    gemm16_avx2(j, j->panels + part * j->K * (GP + 1), p0, p1);
#endif
}

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
            if (j->isa == ISA_AVX512_VNNI && m + 4 <= j->M) { tiles16x4_avx512(j, m, t, end); m += 3; continue; }
            if (j->isa == ISA_AVX512_VNNI) { tiles16_avx512(j, m, t, end); continue; }
            if (j->isa == ISA_AVX2 && m + 2 <= j->M) { tiles16_avx2(j, m, t, end, 2); m += 1; continue; }
            if (j->isa == ISA_AVX2) { tiles16_avx2(j, m, t, end, 1); continue; }
#endif
            tiles16_scalar(j, m, t, end);
        }
    }
}

/* The loop qk_linear_bf16 runs for instruction set `isa` (at most): ISA_AVX512_VNNI where the CPU has AVX-512
 * BF16, ISA_AVX2 where it has AVX2 and FMA, else ISA_SCALAR. */
int qk_bf16_isa(int isa) {
    if (isa >= ISA_AVX512_VNNI && qk_has_avx512_bf16()) return ISA_AVX512_VNNI;
    const int best = qk_best_isa();
    return isa >= ISA_AVX2 && best >= ISA_AVX2 ? ISA_AVX2 : ISA_SCALAR;
}

/* y (M x N, bfloat16) = x (M x K, bfloat16) @ W.T from qk_pack_bf16's layout, with the loop of qk_bf16_isa(isa).
 * Returns 0, EINVAL or ENOMEM. */
int qk_linear_bf16(int isa, int threads, const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                   uint16_t *out) {
    if (M < 1 || qk_packed_bf16_bytes(N, K) < 0) return EINVAL;
    job16_t j = {.M = M, .N = N, .K = K, .isa = qk_bf16_isa(isa), .x = x, .w = w, .out = out};
    float *xf = NULL;
    const int gemm = j.isa == ISA_AVX2 && M >= GEMM16_ROWS;
    int64_t parts = threads < 1 ? 1 : threads;
    const int64_t units = gemm ? (N + GP - 1) / GP : (N + TILE - 1) / TILE;
    if (parts > units) parts = units;
#if QK_X86
    if (j.isa == ISA_AVX2) {
        if (!(xf = malloc((size_t)(M * K + (gemm ? parts * K * (GP + 1) : 0)) * 4))) return ENOMEM;
        if (gemm) widen_avx2(x, M * K, xf);
        else widen16_avx2(x, M * K, xf);
        j.xf = xf;
        j.panels = xf + M * K;
    }
#endif
    pool_run(gemm ? gemm16_part : linear16_part, &j, parts);
    free(xf);
    return 0;
}

/* y (M x N, bfloat16) = x (M x K, bfloat16) @ W.T for a weight of another format, through the AVX2 GEMM above:
 * fill(ctx, r, out) writes row r of W as K floats (qlinear.c dequantizes its codes so). For prefill-sized
 * products on CPUs without AVX-512: the panels' register-blocked FMAs outrun a float32 BLAS on dequantized tiles.
 * Returns 0, EINVAL or ENOMEM. */
int qk_gemm16_fill(int threads, const uint16_t *x, int64_t M, int64_t K, int64_t N, gemm_fill_t fill,
                   const void *ctx, uint16_t *out) {
    if (M < 1 || N < 1 || K < 1 || !fill) return EINVAL;
#if QK_X86
    if (qk_best_isa() < ISA_AVX2) return EINVAL;
    job16_t j = {.M = M, .N = N, .K = K, .isa = ISA_AVX2, .x = x, .out = out, .fill = fill, .fill_ctx = ctx};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > (N + GP - 1) / GP) parts = (N + GP - 1) / GP;
    float *xf = malloc((size_t)(M * K + parts * K * (GP + 1)) * 4);
    if (!xf) return ENOMEM;
    widen_avx2(x, M * K, xf);
    j.xf = xf;
    j.panels = xf + M * K;
    pool_run(gemm16_part, &j, parts);
    free(xf);
    return 0;
#else
    (void)threads, (void)x, (void)ctx, (void)out;
    return EINVAL;
#endif
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
