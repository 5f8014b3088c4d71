/* int8 linear layers at decoding sizes (qlinear.c's interface): the tiles of TILE output rows (qlinear.h's
 * layout) against the quantized activations, one activation row at a time, per instruction set: plain C, AVX2
 * (`vpmaddubsw` + `vpmaddwd` on |x| and the weights signed by x), AVX-512 VNNI (`vpdpbusd`). */

#include "qlinear.h"

static void tiles_scalar(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K;
    const int8_t *xq = j->a->q + m * K;
    const float *sc = j->a->scale + m * (K / BLOCK);
    for (int64_t t = t0; t < t1; t++)
        for (int i = 0; i < TILE; i++) {
            float acc = 0.0f;
            const int8_t *w = (const int8_t *)j->w + t * int8_tile_bytes(K) + i * CHUNK;
            for (int64_t b = 0; b < K / BLOCK; b++) {
                const int8_t *wb = w + (b / 2) * TILE * CHUNK + (b % 2) * BLOCK;
                int32_t d = 0;
                for (int k = 0; k < BLOCK; k++) d += (int32_t)wb[k] * xq[b * BLOCK + k];
                acc += (float)d * sc[b];
            }
            store(j, m, t * TILE + i, acc * j->rscale[t * TILE + i]);
        }
}

#if QK_X86
/* One 32-input block of int8 weights against the activations: 8 lanes of integer sums. */
__attribute__((target(AVX2))) static inline __m256 dot8_avx2(const int8_t *w, __m256i x, __m256i ax, __m256i ones) {
    __m256i q = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, q), ones));
}

__attribute__((target(AVX2))) static void tiles_avx2(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K, nc = K / CHUNK;
    const int8_t *xq = j->a->q + m * K;
    const uint8_t *xa = j->a->absq + m * K;
    const float *sc = j->a->scale + m * (K / BLOCK);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t t = t0; t < t1; t++) {
        __m256 acc[TILE];
        for (int i = 0; i < TILE; i++) acc[i] = _mm256_setzero_ps();
        const int8_t *w = (const int8_t *)j->w + t * int8_tile_bytes(K);
        for (int64_t c = 0; c < nc; c++) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + c * CHUNK));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + c * CHUNK + 32));
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(xa + c * CHUNK));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(xa + c * CHUNK + 32));
            const __m256 s0 = _mm256_broadcast_ss(sc + 2 * c), s1 = _mm256_broadcast_ss(sc + 2 * c + 1);
            const int8_t *wc = w + c * TILE * CHUNK;
            for (int i = 0; i < TILE; i++) {
                acc[i] = _mm256_fmadd_ps(dot8_avx2(wc + i * CHUNK, x0, a0, ones), s0, acc[i]);
                acc[i] = _mm256_fmadd_ps(dot8_avx2(wc + i * CHUNK + 32, x1, a1, ones), s1, acc[i]);
            }
        }
        for (int i = 0; i < TILE; i++) store(j, m, t * TILE + i, hsum256(acc[i]) * j->rscale[t * TILE + i]);
    }
}

__attribute__((target(AVX512))) static void int8_avx512(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K, nc = K / CHUNK;
    const uint8_t *xa = j->a->absq + m * K;
    const uint64_t *neg = j->a->neg + m * nc;
    const float *lanes = j->a->lanes + m * nc * 16;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t t = t0; t < t1; t++) {
        const int8_t *w = (const int8_t *)j->w + t * int8_tile_bytes(K);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (int64_t c = 0; c < nc; c++, w += TILE * CHUNK) {
            const __m512i ax = _mm512_loadu_si512(xa + c * CHUNK);
            const __mmask64 k = _cvtu64_mask64(neg[c]);
            const __m512 s = _mm512_loadu_ps(lanes + c * 16);
            __m512i q0 = _mm512_loadu_si512(w), q1 = _mm512_loadu_si512(w + 64);
            __m512i q2 = _mm512_loadu_si512(w + 128), q3 = _mm512_loadu_si512(w + 192);
            q0 = _mm512_mask_sub_epi8(q0, k, zero, q0);  /* the weights take the activations' signs */
            q1 = _mm512_mask_sub_epi8(q1, k, zero, q1);
            q2 = _mm512_mask_sub_epi8(q2, k, zero, q2);
            q3 = _mm512_mask_sub_epi8(q3, k, zero, q3);
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, q0)), s, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, q1)), s, acc1);
            acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, q2)), s, acc2);
            acc3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, q3)), s, acc3);
        }
        const float *rs = j->rscale + t * TILE;
        store(j, m, t * TILE, _mm512_reduce_add_ps(acc0) * rs[0]);
        store(j, m, t * TILE + 1, _mm512_reduce_add_ps(acc1) * rs[1]);
        store(j, m, t * TILE + 2, _mm512_reduce_add_ps(acc2) * rs[2]);
        store(j, m, t * TILE + 3, _mm512_reduce_add_ps(acc3) * rs[3]);
    }
}
#endif

void qk_int8_tiles(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
#if QK_X86
    if (j->isa == ISA_AVX512_VNNI) {
        int8_avx512(j, m, t0, t1);
        return;
    }
    if (j->isa == ISA_AVX2) {
        tiles_avx2(j, m, t0, t1);
        return;
    }
#endif
    tiles_scalar(j, m, t0, t1);
}
