/* int4 linear layers (qlinear.c's interface): panels of PANEL output rows, one row per vector lane (qlinear.h's
 * layout), against the quantized activations, per instruction set. A group adds
 *     scale * sum(code * x) + (zero - 8 * scale) * sum(x),
 * the first from integer dot products of the 4-bit codes and the 8-bit activations, block by block. */

#include "qlinear.h"

#ifndef AVX2_ROWS
#define AVX2_ROWS 4  /* AVX2: rows of x from which the half panels take 4 rows at a time */
#endif

/* int4 panels [p0, p1) for activation row m. */
static void panels_scalar(const job_t *j, int64_t m, int64_t p0, int64_t p1) {
    const int64_t K = j->K, group = j->group, ng = K / group;
    const int8_t *xq = j->a->q + m * K;
    const float *sc = j->a->scale + m * (K / BLOCK), *gs = j->a->gsum + m * ng;
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *panel = j->w + p * int4_panel_bytes(K, group);
        float acc[PANEL];
        for (int i = 0; i < PANEL; i++) acc[i] = 0.0f;
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *gp = panel + g * int4_group_bytes(group);
            const uint16_t *s = (const uint16_t *)gp, *z = (const uint16_t *)(gp + 32);
            for (int i = 0; i < PANEL; i++) {
                const float sf = bf16_to_f32(s[i]);
                acc[i] += (bf16_to_f32(z[i]) - 8.0f * sf) * gs[g];
                for (int64_t b = 0; b < group / BLOCK; b++) {
                    const int8_t *x = xq + g * group + b * BLOCK;
                    int32_t d = 0;
                    for (int q = 0; q < 4; q++)
                        for (int k = 0; k < 4; k++) {
                            const uint8_t byte = gp[64 + (b * 4 + q) * 64 + 4 * i + k];
                            d += (int32_t)(byte & 15) * x[8 * q + k] + (int32_t)(byte >> 4) * x[8 * q + 4 + k];
                        }
                    acc[i] += (float)d * sf * sc[(g * group) / BLOCK + b];
                }
            }
        }
        store16(j, m, p * PANEL, acc);
    }
}

#if QK_X86
/* 8 bfloat16 values at p as floats. */
__attribute__((target(AVX2))) static inline __m256 bf16x8_avx2(const void *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* int4 panels [p0, p1) for activation row m: the two half panels (8 rows each) in two vectors of 8 lanes, in one
 * pass, so that the panel streams once and each activation broadcast serves both. A block's 16 products per 16-bit
 * lane (`vpmaddubsw` pairs, 8 quads) stay below 2^15: 16 x 15 x 127. */
__attribute__((target(AVX2))) static void panels_avx2(const job_t *j, int64_t m, int64_t p0, int64_t p1) {
    const int64_t K = j->K, group = j->group, ng = K / group;
    const int8_t *xq = j->a->q + m * K;
    const float *sc = j->a->scale + m * (K / BLOCK), *gs = j->a->gsum + m * ng;
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *gp = j->w + p * int4_panel_bytes(K, group);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; g++, gp += int4_group_bytes(group)) {
            const __m256 s0 = bf16x8_avx2(gp), s1 = bf16x8_avx2(gp + 16);
            const __m256 gsum = _mm256_set1_ps(gs[g]), eight = _mm256_set1_ps(8.0f);
            acc0 = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, s0, bf16x8_avx2(gp + 32)), gsum, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, s1, bf16x8_avx2(gp + 48)), gsum, acc1);
            for (int64_t b = 0; b < group / BLOCK; b++) {
                const int8_t *x = xq + g * group + b * BLOCK;
                const uint8_t *qp = gp + 64 + b * 256;
                __m256i d0 = _mm256_setzero_si256(), d1 = _mm256_setzero_si256();
                for (int q = 0; q < 4; q++) {
                    const __m256i xl = _mm256_set1_epi32(four(x + 8 * q)), xh = _mm256_set1_epi32(four(x + 8 * q + 4));
                    const __m256i v0 = _mm256_loadu_si256((const __m256i *)(qp + 64 * q));
                    const __m256i v1 = _mm256_loadu_si256((const __m256i *)(qp + 64 * q + 32));
                    d0 = _mm256_add_epi16(d0, _mm256_maddubs_epi16(_mm256_and_si256(v0, low), xl));
                    d1 = _mm256_add_epi16(d1, _mm256_maddubs_epi16(_mm256_and_si256(v1, low), xl));
                    const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
                    const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
                    d0 = _mm256_add_epi16(d0, _mm256_maddubs_epi16(h0, xh));
                    d1 = _mm256_add_epi16(d1, _mm256_maddubs_epi16(h1, xh));
                }
                const __m256 bs = _mm256_set1_ps(sc[(g * group) / BLOCK + b]);
                acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d0, ones)), _mm256_mul_ps(s0, bs), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d1, ones)), _mm256_mul_ps(s1, bs), acc1);
            }
        }
        float out[PANEL];
        _mm256_storeu_ps(out, acc0);
        _mm256_storeu_ps(out + 8, acc1);
        store16(j, m, p * PANEL, out);
    }
}

/* The compiler reassociates integer sums: left alone it computed a block's 32 products first, spilling most to
 * the stack, then added them as a tree. An empty asm that reads and writes v keeps each row's sum in a register. */
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))

/* Many activation rows (prefill): one half panel (8 rows, h = 0 or 1) against R rows of x m0.. (R <= 4), each
 * quad's codes unpacked once for all R (15 of the 16 vector registers: R integer and R float sums, the codes and
 * the mask). The half's 32 bytes of each quad line serve R rows, where panels_avx2 unpacks them per row. */
__attribute__((target(AVX2))) static inline __attribute__((always_inline)) void half_rows_avx2(
        const job_t *j, int64_t p, int h, int64_t m0, const int R) {
    const act_t *a = j->a;
    const int64_t K = j->K, group = j->group, ng = K / group, nb = K / BLOCK;
    const uint8_t *gp = j->w + p * int4_panel_bytes(K, group);
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++, gp += int4_group_bytes(group)) {
        const __m256 s = bf16x8_avx2(gp + 16 * h);
        const __m256 zz = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, bf16x8_avx2(gp + 32 + 16 * h));
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(zz, _mm256_set1_ps(a->gsum[(m0 + r) * ng + g]), acc[r]);
        for (int64_t b = 0; b < group / BLOCK; b++) {
            const uint8_t *qp = gp + 64 + b * 256 + 32 * h;
            const int64_t k0 = g * group + b * BLOCK;
            __m256i d[4];
            for (int r = 0; r < R; r++) d[r] = _mm256_setzero_si256();
            for (int q = 0; q < 4; q++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qp + 64 * q));
                const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (int r = 0; r < R; r++) {
                    const int8_t *x = a->q + (m0 + r) * K + k0 + 8 * q;
                    d[r] = _mm256_add_epi16(d[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(four(x))));
                    d[r] = _mm256_add_epi16(d[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four(x + 4))));
                    KEEP_IN_REGISTER(d[r]);
                }
            }
            for (int r = 0; r < R; r++) {
                const __m256 bs = _mm256_mul_ps(s, _mm256_set1_ps(a->scale[(m0 + r) * nb + k0 / BLOCK]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d[r], ones)), bs, acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float out[8];
        _mm256_storeu_ps(out, acc[r]);
        for (int i = 0; i < 8; i++) store(j, m0 + r, p * PANEL + 8 * h + i, out[i]);
    }
}

/* Panels [p0, p1) against every activation row, 4 rows at a time. */
__attribute__((target(AVX2))) static void panels_rows_avx2(const job_t *j, int64_t p0, int64_t p1) {
    const int64_t M = j->a->M;
    for (int64_t p = p0; p < p1; p++)
        for (int h = 0; h < 2; h++) {
            int64_t m = 0;
            for (; m + 4 <= M; m += 4) half_rows_avx2(j, p, h, m, 4);
            if (M - m == 3) half_rows_avx2(j, p, h, m, 3);
            if (M - m == 2) half_rows_avx2(j, p, h, m, 2);
            if (M - m == 1) half_rows_avx2(j, p, h, m, 1);
        }
}

/* 16 bfloat16 values at p as floats. */
__attribute__((target(AVX512))) static inline __m512 bf16x16(const void *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* One int4 panel against R activation rows m0.. (R = 1 or 4: each quad's codes are unpacked once for all R). */
__attribute__((target(AVX512))) static inline __attribute__((always_inline)) void panel_avx512(
        const job_t *j, int64_t p, int64_t m0, const int R) {
    const int64_t K = j->K, group = j->group, ng = K / group, nb = K / BLOCK;
    const uint8_t *gp = j->w + p * int4_panel_bytes(K, group);
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++, gp += int4_group_bytes(group)) {
        const __m512 sv = bf16x16(gp), zz = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sv, bf16x16(gp + 32));
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(zz, _mm512_set1_ps(j->a->gsum[(m0 + r) * ng + g]), acc[r]);
        for (int64_t b = 0; b < group / BLOCK; b++) {
            const uint8_t *qp = gp + 64 + b * 256;
            const int64_t k0 = g * group + b * BLOCK;
            __m512i d0[4], d1[4];
            for (int r = 0; r < R; r++) d0[r] = d1[r] = _mm512_setzero_si512();
            for (int q = 0; q < 4; q++) {
                const __m512i v = _mm512_loadu_si512(qp + 64 * q);
                const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for (int r = 0; r < R; r++) {
                    const int8_t *x = j->a->q + (m0 + r) * K + k0 + 8 * q;
                    d0[r] = _mm512_dpbusd_epi32(d0[r], lo, _mm512_set1_epi32(four(x)));
                    d1[r] = _mm512_dpbusd_epi32(d1[r], hi, _mm512_set1_epi32(four(x + 4)));
                }
            }
            for (int r = 0; r < R; r++) {
                const __m512 s = _mm512_mul_ps(sv, _mm512_set1_ps(j->a->scale[(m0 + r) * nb + k0 / BLOCK]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0[r], d1[r])), s, acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) store16_avx512(j, m0 + r, p * PANEL, acc[r]);
}

__attribute__((target(AVX512))) static void panels_avx512(const job_t *j, int64_t p0, int64_t p1) {
    const int64_t M = j->a->M;
    for (int64_t p = p0; p < p1; p++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) panel_avx512(j, p, m, 4);
        for (; m < M; m++) panel_avx512(j, p, m, 1);
    }
}

#endif

/* Panels [p0, p1), each meeting every activation row while it is in the core's cache. */
void qk_int4_panels(const job_t *j, int64_t p0, int64_t p1) {
#if QK_X86
    if (j->isa == ISA_AVX512_VNNI) {
        panels_avx512(j, p0, p1);
        return;
    }
    if (j->isa == ISA_AVX2 && j->a->M >= AVX2_ROWS) {
        panels_rows_avx2(j, p0, p1);
        return;
    }
#endif
    for (int64_t p = p0; p < p1; p++)
        for (int64_t m = 0; m < j->a->M; m++) {
#if QK_X86
            if (j->isa == ISA_AVX2) {
                panels_avx2(j, m, p, p + 1);
                continue;
            }
#endif
            panels_scalar(j, m, p, p + 1);
        }
}
