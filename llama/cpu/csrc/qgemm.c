/* int8 products of many rows (prefill) on AVX-512 VNNI (qlinear.c's interface): a GEMM over panels of 16
 * output rows.
 *
 * From GEMM_ROWS rows of x up, int8's tiles (one row's inputs per vector, summed across lanes at the end) would
 * spend more instructions per weight than the products need. Each thread instead transposes one panel of 16
 * output rows at a time into int4's layout, unsigned: K/4 quads of 16 rows x 4 inputs, code + 128 (so that
 * `vpdpbusd` takes it as its unsigned operand), and runs every row of x over it, GEMM_R rows at a time: each weight
 * vector loaded meets GEMM_R rows, and each block's integer sums are scaled once per row. A row then adds
 *     scale * (sum over blocks of s_b * sum(code' * x) - 128 * sum over blocks of s_b * sum(x)).
 * int4's panels are that layout already: its kernel (qint4.c) takes 4 rows at a time at every size.
 * Measured on a Zen 4 core: the inner loop 195 G multiply-adds/s, oneDNN's bfloat16 GEMM 110. */

#include "qlinear.h"

#define GEMM_R 4

#if QK_X86
/* Panel p (int8 tiles 4p..4p+3; those past the last are absent: zero codes, scale 0) into codes (K/4 x 64 bytes)
 * and its 16 row scales; each chunk of 64 inputs is a 16 x 16 transpose of 4-byte quads (in shuffles: gathers
 * were 20% slower at 16 rows). */
__attribute__((target(AVX512))) static void unpack_panel_avx512(const job_t *j, int64_t p, uint8_t *codes,
                                                                float *scale) {
    const int64_t K = j->K, tiles = tiles_of(j->N);
    const __mmask16 live = (__mmask16)(j->N - p * PANEL >= PANEL ? 0xffff : (1u << (j->N - p * PANEL)) - 1);
    _mm512_storeu_ps(scale, _mm512_maskz_loadu_ps(live, j->rscale + p * PANEL));
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t c = 0; c < K / CHUNK; c++) {
        __m512i r[PANEL], t[PANEL];  /* r[i]: row i's 16 quads; then u, column 4L + j in 128-bit lane L of u[4i + j] */
        for (int i = 0; i < PANEL; i++) {
            const int64_t tile = p * (PANEL / TILE) + i / TILE;
            r[i] = tile < tiles ? _mm512_xor_si512(flip, _mm512_loadu_si512(j->w + tile * int8_tile_bytes(K) +
                                                                              c * TILE * CHUNK + (i % TILE) * CHUNK))
                                : flip;
        }
        for (int i = 0; i < PANEL; i += 2) {
            t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < PANEL; i += 4) {
            r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
            r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
            r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
            r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        uint8_t *out = codes + c * PANEL * 64;
        for (int q = 0; q < 4; q++) {  /* lanes L of r[q], r[4 + q], r[8 + q], r[12 + q] make column 4L + q */
            const __m512i v0 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x44), v1 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xee);
            const __m512i w0 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x44);
            const __m512i w1 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xee);
            _mm512_storeu_si512(out + q * 64, _mm512_shuffle_i32x4(v0, w0, 0x88));
            _mm512_storeu_si512(out + (4 + q) * 64, _mm512_shuffle_i32x4(v0, w0, 0xdd));
            _mm512_storeu_si512(out + (8 + q) * 64, _mm512_shuffle_i32x4(v1, w1, 0x88));
            _mm512_storeu_si512(out + (12 + q) * 64, _mm512_shuffle_i32x4(v1, w1, 0xdd));
        }
    }
}

/* Rows m0..m0+R-1 of x against the unpacked panel p. */
__attribute__((target(AVX512))) static inline __attribute__((always_inline)) void gemm_rows_avx512(
        const job_t *j, const uint8_t *codes, const float *scale, int64_t p, int64_t m0, const int R) {
    const act_t *a = j->a;
    const int64_t K = j->K, nb = K / BLOCK;
    __m512 acc[GEMM_R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {
        __m512i d[GEMM_R];
        for (int r = 0; r < R; r++) d[r] = _mm512_setzero_si512();
        for (int q = 0; q < BLOCK / 4; q++) {
            const __m512i w = _mm512_loadu_si512(codes + (k0 / 4 + q) * 64);
            for (int r = 0; r < R; r++)
                d[r] = _mm512_dpbusd_epi32(d[r], w, _mm512_set1_epi32(four(a->q + (m0 + r) * K + k0 + 4 * q)));
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_set1_ps(a->scale[(m0 + r) * nb + k0 / BLOCK]),
                                     acc[r]);
    }
    const __m512 sv = _mm512_loadu_ps(scale);
    for (int r = 0; r < R; r++)  /* a->gsum: the row's sum over blocks of s_b * sum(x) (one group of K) */
        store16_avx512(j, m0 + r, p * PANEL,
                       _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(-128.0f), _mm512_set1_ps(a->gsum[m0 + r]), acc[r]),
                                     sv));
}

__attribute__((target(AVX512))) static void gemm_avx512(const job_t *j, uint8_t *scratch, int64_t p0, int64_t p1) {
    const int64_t M = j->a->M;
    uint8_t *codes = scratch;
    float *scale = (float *)(scratch + j->K * PANEL);
    for (int64_t p = p0; p < p1; p++) {
        unpack_panel_avx512(j, p, codes, scale);
        int64_t m = 0;
        for (; m + GEMM_R <= M; m += GEMM_R) gemm_rows_avx512(j, codes, scale, p, m, GEMM_R);
        for (; m < M; m++) gemm_rows_avx512(j, codes, scale, p, m, 1);
    }
}
#endif

void qk_int8_gemm(const job_t *j, uint8_t *scratch, int64_t p0, int64_t p1) {
#if QK_X86
    gemm_avx512(j, scratch, p0, p1);
#else
    (void)j, (void)scratch, (void)p0, (void)p1;
#endif
}
