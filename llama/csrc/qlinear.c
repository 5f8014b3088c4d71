/* Quantized linear layers on the CPU: y = x @ W.T for int8 (one scale per output row) and int4 (a scale and a
 * zero per group of inputs) weights, at the sizes of decoding (a few rows of x at a time).
 *
 * Decoding reads every weight once per token, so the product runs at the speed the weights stream from memory,
 * if the arithmetic keeps up. Converting each weight to a float costs more instructions than the memory takes to
 * deliver it, so the activations are quantized instead: each row of x is cut into blocks of 32 inputs, each block
 * gets one float scale (its largest magnitude maps to 127), and the weights meet the 8-bit activations in integer
 * dot products (AVX-512 VNNI `vpdpbusd`, or AVX2's `vpmaddubsw` + `vpmaddwd`); each block's integer sum is scaled
 * once. The only approximation is the activations' rounding to 8 bits (at most half a step per input).
 *
 * The weights are repacked once (qk_pack_int8, qk_pack_int4) into tiles of 4 output rows that are read as one
 * sequential stream; see "the weights' layouts" below. int8 codes are signed, -127..127 (packing turns -128
 * into -127: the kernels negate codes), with one float32 scale per row. int4 codes are 0..15 with a bfloat16
 * scale and zero per group: w = (code - 8) * scale + zero, so a group adds
 *     scale * sum(code * x) + (zero - 8 * scale) * sum(x).
 *
 * One binary serves every x86 CPU: each instruction set's kernel is compiled for it alone (GCC/Clang target
 * attributes) and chosen at run time; other CPUs get the portable C loops. The output rows are split between
 * threads from a small pool of its own (the caller's thread takes the first share), so no second OpenMP runtime
 * is loaded beside PyTorch's. Larger products (prefill) dequantize row tiles to 16- or 32-bit floats for a BLAS
 * (qk_dequantize), which the Python side calls.
 *
 * Plain C, no Python or PyTorch headers: llama/qkernels.py compiles it at first use and calls it through ctypes.
 */

#include "common.h"

#define BLOCK 32   /* inputs per activation scale */
#define CHUNK 64   /* inputs per int4 code chunk; K must be a multiple */

enum { KIND_INT8 = 8, KIND_INT4 = 4 };

/* --- the weights' layouts (qk_pack_int8, qk_pack_int4) --------------------------------------------------------
 * Rows are stored in tiles of TILE (the last padded with zero rows), the tile's rows interleaved chunk by chunk,
 * so that the rows computed together are read as one sequential stream (several streams a thread measured up to
 * 2x slower here):
 *   int8: chunk c of row i of a tile at c * 256 + i * 64 (64 bytes each); the row scales apart, float32.
 *   int4: the tile's bfloat16 scales (TILE x G) and zeros (TILE x G), then chunk c of row i at c * 128 + i * 32
 *         (32 bytes: input 64c + t in the low nibble of byte t, 64c + 32 + t in the high one). */

static inline int64_t tiles_of(int64_t n) { return (n + TILE - 1) / TILE; }
static inline int64_t int8_tile_bytes(int64_t K) { return TILE * K; }
static inline int64_t int4_tile_bytes(int64_t K, int64_t G) { return 2 * TILE * G * 2 + TILE * K / 2; }
static inline int64_t int4_codes_at(int64_t G) { return 2 * TILE * G * 2; }

/* --- the activations, quantized once per call ---------------------------------------------------------------- */

typedef struct {
    int64_t M, K;
    int8_t *q;       /* M x K codes, -127..127 */
    uint8_t *absq;   /* M x K |codes| */
    uint64_t *neg;   /* M x K/64 bit masks: bit i of word j set where code 64j + i < 0 (AVX-512 only) */
    float *scale;    /* M x K/32 block scales */
    float *lanes;    /* M x K/64 x 16: block 2j's scale in lanes 0-7, block 2j+1's in lanes 8-15 */
    float *gsum;     /* M x K/group: sum over each int4 group of the dequantized activations */
    float *tmp;      /* K floats of scratch */
} act_t;

/* Plain loops that the compiler vectorizes for each instruction set it is compiled for. */
static inline void quantize_body(act_t *a, const void *x, int x_bf16, int64_t group) {
    const int64_t K = a->K, nb = K / BLOCK, groups = group ? K / group : 0;
    for (int64_t m = 0; m < a->M; m++) {
        float *v = a->tmp;
        if (x_bf16) {
            const uint16_t *xb = (const uint16_t *)x + m * K;
            for (int64_t k = 0; k < K; k++) {
                uint32_t u = (uint32_t)xb[k] << 16;
                memcpy(v + k, &u, 4);
            }
        } else {
            memcpy(v, (const float *)x + m * K, (size_t)K * 4);
        }
        int8_t *q = a->q + m * K;
        uint8_t *aq = a->absq + m * K;
        float *sc = a->scale + m * nb, *lanes = a->lanes + m * (K / CHUNK) * 16;
        float *gs = a->gsum + m * (groups ? groups : 1);
        for (int64_t g = 0; g < groups; g++) gs[g] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const float *vb = v + b * BLOCK;
            uint32_t bits = 0;  /* the largest magnitude, compared as integers (exact for finite floats) */
            for (int i = 0; i < BLOCK; i++) {
                uint32_t u;
                memcpy(&u, vb + i, 4);
                u &= 0x7fffffffu;
                bits = u > bits ? u : bits;
            }
            float amax;
            memcpy(&amax, &bits, 4);
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t sum = 0;
            for (int i = 0; i < BLOCK; i++) {
                float t = vb[i] * inv;
                int32_t c = (int32_t)(t + (t >= 0.0f ? 0.5f : -0.5f));  /* to nearest, halves away from zero */
                c = c > 127 ? 127 : (c < -127 ? -127 : c);
                q[b * BLOCK + i] = (int8_t)c;
                aq[b * BLOCK + i] = (uint8_t)(c < 0 ? -c : c);
                sum += c;
            }
            const float s = amax / 127.0f;
            sc[b] = s;
            for (int i = 0; i < 8; i++) lanes[(b / 2) * 16 + (b % 2) * 8 + i] = s;
            if (groups) gs[b * BLOCK / group] += s * (float)sum;
        }
    }
}

static void quantize_scalar(act_t *a, const void *x, int x_bf16, int64_t group) {
    quantize_body(a, x, x_bf16, group);
}

/* --- the kernels: tiles [t0, t1) of the output for activation row m --------------------------------------------- */

typedef struct {
    int kind, isa, out_bf16;
    int64_t N, K, group, gshift;  /* gshift: log2(group / 32), the activation blocks per group as a shift */
    const uint8_t *w;             /* the packed tiles */
    const float *rscale;          /* int8: row scales (tiles x TILE) */
    const act_t *a;
    void *out;                    /* M x N */
} job_t;

static inline void store(const job_t *j, int64_t m, int64_t r, float v) {
    if (r >= j->N) return;  /* a padding row */
    if (j->out_bf16) ((uint16_t *)j->out)[m * j->N + r] = f32_to_bf16(v);
    else ((float *)j->out)[m * j->N + r] = v;
}

/* int4: a tile row's group scales as floats, and its zero term sum over groups of (zero - 8 scale) * sum(x). */
static inline float int4_row_setup(const job_t *j, int64_t m, const uint8_t *tile, int i, float *sf) {
    const int64_t K = j->K, G = K / j->group;
    const uint16_t *s = (const uint16_t *)tile + i * G, *z = (const uint16_t *)tile + TILE * G + i * G;
    const float *gs = j->a->gsum + m * G;
    float zero_term = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        sf[g] = bf16_to_f32(s[g]);
        zero_term += (bf16_to_f32(z[g]) - 8.0f * sf[g]) * gs[g];
    }
    return zero_term;
}

static void tiles_scalar(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K, G = j->group ? K / j->group : 1;
    const int8_t *xq = j->a->q + m * K;
    const float *sc = j->a->scale + m * (K / BLOCK);
    float sf[G];
    for (int64_t t = t0; t < t1; t++) {
        for (int i = 0; i < TILE; i++) {
            float acc = 0.0f;
            if (j->kind == KIND_INT8) {
                const int8_t *w = (const int8_t *)j->w + t * int8_tile_bytes(K) + i * CHUNK;
                for (int64_t b = 0; b < K / BLOCK; b++) {
                    const int8_t *wb = w + (b / 2) * TILE * CHUNK + (b % 2) * BLOCK;
                    int32_t d = 0;
                    for (int k = 0; k < BLOCK; k++) d += (int32_t)wb[k] * xq[b * BLOCK + k];
                    acc += (float)d * sc[b];
                }
                acc *= j->rscale[t * TILE + i];
            } else {
                const uint8_t *tile = j->w + t * int4_tile_bytes(K, G);
                acc = int4_row_setup(j, m, tile, i, sf);
                for (int64_t c = 0; c < K / CHUNK; c++) {
                    const uint8_t *p = tile + int4_codes_at(G) + c * TILE * 32 + i * 32;
                    int32_t lo = 0, hi = 0;
                    for (int k = 0; k < 32; k++) {
                        lo += (int32_t)(p[k] & 15) * xq[c * CHUNK + k];
                        hi += (int32_t)(p[k] >> 4) * xq[c * CHUNK + 32 + k];
                    }
                    acc += (float)lo * sc[2 * c] * sf[(2 * c) >> j->gshift] +
                           (float)hi * sc[2 * c + 1] * sf[(2 * c + 1) >> j->gshift];
                }
            }
            store(j, m, t * TILE + i, acc);
        }
    }
}

#if QK_X86

__attribute__((target(AVX2))) static void quantize_avx2(act_t *a, const void *x, int x_bf16, int64_t group) {
    quantize_body(a, x, x_bf16, group);
}

__attribute__((target(AVX512))) static void quantize_avx512(act_t *a, const void *x, int x_bf16, int64_t group) {
    quantize_body(a, x, x_bf16, group);
    for (int64_t j = 0; j < a->M * (a->K / CHUNK); j++)
        a->neg[j] = _cvtmask64_u64(_mm512_movepi8_mask(_mm512_loadu_si512(a->q + j * CHUNK)));
}

__attribute__((target(AVX2))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One 32-input block of int8 weights against the activations: 8 lanes of integer sums. */
__attribute__((target(AVX2))) static inline __m256 dot8_avx2(const int8_t *w, __m256i x, __m256i ax, __m256i ones) {
    __m256i q = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, q), ones));
}

/* One 32-input block of int4 codes (unsigned) against the activations. */
__attribute__((target(AVX2))) static inline __m256 dot4_avx2(__m256i codes, __m256i x, __m256i ones) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), ones));
}

__attribute__((target(AVX2))) static void tiles_avx2(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K, G = j->group ? K / j->group : 1, nc = K / CHUNK;
    const int8_t *xq = j->a->q + m * K;
    const uint8_t *xa = j->a->absq + m * K;
    const float *sc = j->a->scale + m * (K / BLOCK);
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
    float sf[TILE * G], zt[TILE];
    for (int64_t t = t0; t < t1; t++) {
        __m256 acc[TILE];
        for (int i = 0; i < TILE; i++) acc[i] = _mm256_setzero_ps();
        if (j->kind == KIND_INT8) {
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
        } else {
            const uint8_t *tile = j->w + t * int4_tile_bytes(K, G);
            for (int i = 0; i < TILE; i++) zt[i] = int4_row_setup(j, m, tile, i, sf + i * G);
            for (int64_t c = 0; c < nc; c++) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + c * CHUNK));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + c * CHUNK + 32));
                const __m256 s0 = _mm256_broadcast_ss(sc + 2 * c), s1 = _mm256_broadcast_ss(sc + 2 * c + 1);
                const int64_t g0 = (2 * c) >> j->gshift, g1 = (2 * c + 1) >> j->gshift;
                for (int i = 0; i < TILE; i++) {
                    const uint8_t *p = tile + int4_codes_at(G) + c * TILE * 32 + i * 32;
                    const __m256i bytes = _mm256_loadu_si256((const __m256i *)p);
                    const __m256i lo = _mm256_and_si256(bytes, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
                    const __m256 d0 = _mm256_mul_ps(dot4_avx2(lo, x0, ones), s0);
                    const __m256 d1 = _mm256_mul_ps(dot4_avx2(hi, x1, ones), s1);
                    acc[i] = _mm256_fmadd_ps(d0, _mm256_broadcast_ss(sf + i * G + g0), acc[i]);
                    acc[i] = _mm256_fmadd_ps(d1, _mm256_broadcast_ss(sf + i * G + g1), acc[i]);
                }
            }
            for (int i = 0; i < TILE; i++) store(j, m, t * TILE + i, hsum256(acc[i]) + zt[i]);
        }
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

/* int4_row_setup, 16 groups at a time. */
__attribute__((target(AVX512))) static inline float int4_row_avx512(const job_t *j, int64_t m, const uint8_t *tile,
                                                                    int i, float *sf) {
    const int64_t G = j->K / j->group;
    const uint16_t *s = (const uint16_t *)tile + i * G, *z = (const uint16_t *)tile + TILE * G + i * G;
    const float *gs = j->a->gsum + m * G;
    __m512 zt = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) {
        const __m512 sg = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + g))), 16));
        const __m512 zg = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(z + g))), 16));
        _mm512_storeu_ps(sf + g, sg);
        zt = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sg, zg), _mm512_loadu_ps(gs + g), zt);
    }
    float tail = 0.0f;
    for (; g < G; g++) {
        sf[g] = bf16_to_f32(s[g]);
        tail += (bf16_to_f32(z[g]) - 8.0f * sf[g]) * gs[g];
    }
    return _mm512_reduce_add_ps(zt) + tail;
}

/* 64 int4 codes in input order from the 32 bytes at p: the low nibbles in bytes 0-31, the high ones in 32-63. */
__attribute__((target(AVX512))) static inline __m512i codes64(const uint8_t *p, __m512i shift, __m512i low) {
    __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_and_si512(_mm512_srlv_epi16(b, shift), low);
}

/* The group scale of chunk c's lanes for one row: one group's (groups of 64 or more), or two (groups of 32). */
__attribute__((target(AVX512))) static inline __m512 chunk_scale(const float *sf, int64_t c, int64_t gshift,
                                                                 __m512i pick) {
    if (gshift) return _mm512_set1_ps(sf[(2 * c) >> gshift]);
    __m128 two = _mm_castpd_ps(_mm_load_sd((const double *)(sf + 2 * c)));
    return _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(two));
}

__attribute__((target(AVX512))) static void int4_avx512(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
    const int64_t K = j->K, nc = K / CHUNK, G = K / j->group, gshift = j->gshift;
    const int8_t *xq = j->a->q + m * K;
    const float *lanes = j->a->lanes + m * nc * 16;
    const __m512i zero = _mm512_setzero_si512(), low = _mm512_set1_epi8(15);
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    const __m512i pick = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(1), 1);
    float sf[TILE * G];
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = j->w + t * int4_tile_bytes(K, G), *p = tile + int4_codes_at(G);
        const float z0 = int4_row_avx512(j, m, tile, 0, sf), z1 = int4_row_avx512(j, m, tile, 1, sf + G);
        const float z2 = int4_row_avx512(j, m, tile, 2, sf + 2 * G), z3 = int4_row_avx512(j, m, tile, 3, sf + 3 * G);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (int64_t c = 0; c < nc; c++, p += TILE * 32) {
            const __m512i x = _mm512_loadu_si512(xq + c * CHUNK);
            const __m512 l = _mm512_loadu_ps(lanes + c * 16);
            const __m512i d0 = _mm512_dpbusd_epi32(zero, codes64(p, shift, low), x);
            const __m512i d1 = _mm512_dpbusd_epi32(zero, codes64(p + 32, shift, low), x);
            const __m512i d2 = _mm512_dpbusd_epi32(zero, codes64(p + 64, shift, low), x);
            const __m512i d3 = _mm512_dpbusd_epi32(zero, codes64(p + 96, shift, low), x);
            const __m512 s0 = chunk_scale(sf, c, gshift, pick), s1 = chunk_scale(sf + G, c, gshift, pick);
            const __m512 s2 = chunk_scale(sf + 2 * G, c, gshift, pick), s3 = chunk_scale(sf + 3 * G, c, gshift, pick);
            acc0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d0), l), s0, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d1), l), s1, acc1);
            acc2 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d2), l), s2, acc2);
            acc3 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d3), l), s3, acc3);
        }
        store(j, m, t * TILE, _mm512_reduce_add_ps(acc0) + z0);
        store(j, m, t * TILE + 1, _mm512_reduce_add_ps(acc1) + z1);
        store(j, m, t * TILE + 2, _mm512_reduce_add_ps(acc2) + z2);
        store(j, m, t * TILE + 3, _mm512_reduce_add_ps(acc3) + z3);
    }
}

#endif /* QK_X86 */

static void run_rows(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
#if QK_X86
    if (j->isa == ISA_AVX512_VNNI) {
        if (j->kind == KIND_INT8) int8_avx512(j, m, t0, t1);
        else int4_avx512(j, m, t0, t1);
        return;
    }
    if (j->isa == ISA_AVX2) {
        tiles_avx2(j, m, t0, t1);
        return;
    }
#endif
    tiles_scalar(j, m, t0, t1);
}

/* Tiles [t0, t1) for every activation row: a few tiles at a time (about 32 KiB, in the core's L1 or L2 cache)
 * meet all M rows, so that the weights stream from memory once whatever M. */
static void run_tiles(const job_t *j, int64_t t0, int64_t t1) {
    const int64_t K = j->K, bytes = j->kind == KIND_INT8 ? int8_tile_bytes(K) : int4_tile_bytes(K, K / j->group);
    const int64_t step = j->a->M == 1 ? t1 - t0 : (32768 / bytes > 1 ? 32768 / bytes : 1);
    for (int64_t t = t0; t < t1; t += step) {
        const int64_t end = t + step < t1 ? t + step : t1;
        for (int64_t m = 0; m < j->a->M; m++) run_rows(j, m, t, end);
    }
}

static void linear_part(const void *ctx, int64_t part, int64_t parts) {
    const job_t *j = (const job_t *)ctx;
    int64_t t0, t1;
    share(tiles_of(j->N), part, parts, &t0, &t1);
    if (t0 < t1) run_tiles(j, t0, t1);
}

/* --- the interface ------------------------------------------------------------------------------------------- */

static int check_shape(int kind, int64_t K, int64_t group) {
    if (kind != KIND_INT8 && kind != KIND_INT4) return EINVAL;
    if (K < CHUNK || K % CHUNK) return EINVAL;
    if (kind == KIND_INT4 && (group != 32 && group != 64 && group != 128 && group != 256)) return EINVAL;
    if (kind == KIND_INT4 && K % group) return EINVAL;
    return 0;
}

/* Bytes of the packed form of an N x K weight (int4: in groups of `group`); -1 for a shape the kernels refuse. */
int64_t qk_packed_bytes(int kind, int64_t N, int64_t K, int64_t group) {
    if (check_shape(kind, K, group) || N < 1) return -1;
    return tiles_of(N) * (kind == KIND_INT8 ? int8_tile_bytes(K) : int4_tile_bytes(K, K / group));
}

/* int8 (N x K, row-major) into tiles; the padding rows are zeros. A code of -128 (which this library's
 * quantizer never writes) becomes -127: the kernels negate codes. */
int qk_pack_int8(const int8_t *src, uint8_t *dst, int64_t N, int64_t K) {
    if (check_shape(KIND_INT8, K, 0) || N < 1) return EINVAL;
    memset(dst, 0, (size_t)qk_packed_bytes(KIND_INT8, N, K, 0));
    for (int64_t r = 0; r < N; r++)
        for (int64_t c = 0; c < K / CHUNK; c++) {
            int8_t *d = (int8_t *)dst + (r / TILE) * int8_tile_bytes(K) + c * TILE * CHUNK + (r % TILE) * CHUNK;
            for (int k = 0; k < CHUNK; k++) {
                const int8_t v = src[r * K + c * CHUNK + k];
                d[k] = v == -128 ? -127 : v;
            }
        }
    return 0;
}

/* int4 codes as checkpoints store them (N x K/2 bytes, input 2i in the high nibble of byte i, 2i + 1 in the low
 * one) with bfloat16 scales and zeros (N x K/group) into tiles; the padding rows are zeros. */
int qk_pack_int4(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, uint8_t *dst, int64_t N,
                 int64_t K, int64_t group) {
    if (check_shape(KIND_INT4, K, group) || N < 1) return EINVAL;
    const int64_t G = K / group, tb = int4_tile_bytes(K, G);
    memset(dst, 0, (size_t)qk_packed_bytes(KIND_INT4, N, K, group));
    for (int64_t r = 0; r < N; r++) {
        const uint8_t *s = codes + r * (K / 2);
        uint8_t *tile = dst + (r / TILE) * tb;
        const int i = (int)(r % TILE);
        for (int64_t c = 0; c < K / CHUNK; c++)
            for (int t = 0; t < 32; t++) {
                const int64_t lo = c * CHUNK + t, hi = lo + 32;
                const uint8_t clo = (s[lo / 2] >> ((lo % 2) ? 0 : 4)) & 15;
                const uint8_t chi = (s[hi / 2] >> ((hi % 2) ? 0 : 4)) & 15;
                tile[int4_codes_at(G) + c * TILE * 32 + i * 32 + t] = (uint8_t)(clo | (chi << 4));
            }
        memcpy(tile + i * G * 2, scales + r * G, (size_t)G * 2);
        memcpy(tile + TILE * G * 2 + i * G * 2, zeros + r * G, (size_t)G * 2);
    }
    return 0;
}

/* y (M x N) = x (M x K) @ W.T from the packed weight. x and y bfloat16 (flags set) or float32; rscale: int8's
 * float32 row scales (one per row, N). Returns 0, or EINVAL (a shape the kernels refuse, an instruction set this
 * CPU lacks), ENOMEM. */
int qk_linear(int kind, int isa, int threads, const void *x, int x_bf16, int64_t M, int64_t K, const void *w,
              const float *rscale, int64_t N, int64_t group, void *out, int out_bf16) {
    if (check_shape(kind, K, group) || M < 1 || N < 1 || isa < 0 || isa > qk_best_isa()) return EINVAL;
    const int64_t G = kind == KIND_INT4 ? K / group : 1, nc = K / CHUNK, nb = K / BLOCK;
    const size_t bytes = (size_t)(M * nc * 8 + M * nb * 4 + M * nc * 64 + M * G * 4 + K * 4 + M * K * 2 + 64);
    char *mem = malloc(bytes);
    if (!mem) return ENOMEM;
    act_t a = {.M = M, .K = K};
    a.neg = (uint64_t *)mem;
    a.scale = (float *)(a.neg + M * nc);
    a.lanes = a.scale + M * nb;
    a.gsum = a.lanes + M * nc * 16;
    a.tmp = a.gsum + M * G;
    a.q = (int8_t *)(a.tmp + K);
    a.absq = (uint8_t *)(a.q + M * K);
    const int64_t g = kind == KIND_INT4 ? group : 0;
#if QK_X86
    if (isa == ISA_AVX512_VNNI) quantize_avx512(&a, x, x_bf16, g);
    else if (isa == ISA_AVX2) quantize_avx2(&a, x, x_bf16, g);
    else
#endif
        quantize_scalar(&a, x, x_bf16, g);
    int64_t gshift = 0;
    while (g && (BLOCK << gshift) < g) gshift++;
    job_t j = {.kind = kind, .isa = isa, .out_bf16 = out_bf16, .N = N, .K = K, .group = g, .gshift = gshift,
               .w = (const uint8_t *)w, .rscale = rscale, .a = &a, .out = out};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > tiles_of(N)) parts = tiles_of(N);
    pool_run(linear_part, &j, parts);
    free(mem);
    return 0;
}

typedef struct {
    int kind, isa, out_bf16;
    int64_t K, group, r0, r1;
    const uint8_t *w;
    const float *rscale;
    void *out;
} deq_t;

static inline void dequantize_body(const deq_t *d, int64_t lo, int64_t hi) {
    const int64_t K = d->K, G = d->kind == KIND_INT4 ? K / d->group : 1;
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
        const uint8_t *tile = d->w + t * int4_tile_bytes(K, G);
        const uint16_t *sc = (const uint16_t *)tile + i * G, *zr = (const uint16_t *)tile + TILE * G + i * G;
        for (int64_t k0 = 0; k0 < K; k0 += BLOCK) {  /* one block: 32 codes of one nibble, one group */
            const uint8_t *bytes = tile + int4_codes_at(G) + (k0 / CHUNK) * TILE * 32 + i * 32;
            const int shift = (k0 % CHUNK) ? 4 : 0;
            const float s = bf16_to_f32(sc[k0 / d->group]), z = bf16_to_f32(zr[k0 / d->group]) - 8.0f * s;
            if (d->out_bf16)
                for (int k = 0; k < BLOCK; k++) ob[k0 + k] = f32_to_bf16((float)((bytes[k] >> shift) & 15) * s + z);
            else
                for (int k = 0; k < BLOCK; k++) of[k0 + k] = (float)((bytes[k] >> shift) & 15) * s + z;
        }
    }
}

#if QK_X86
__attribute__((target(AVX512))) static inline void put16(const deq_t *d, void *out, int64_t at, __m512 v) {
    if (d->out_bf16) store_bf16x16((uint16_t *)out + at, v);
    else _mm512_storeu_ps((float *)out + at, v);
}

__attribute__((target(AVX512))) static void dequantize_avx512(const deq_t *d, int64_t lo, int64_t hi) {
    const int64_t K = d->K, G = d->kind == KIND_INT4 ? K / d->group : 1;
    const __m512i low = _mm512_set1_epi8(15);
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    for (int64_t n = lo; n < hi; n++) {
        const int64_t r = d->r0 + n, t = r / TILE;
        const int i = (int)(r % TILE);
        if (d->kind == KIND_INT8) {
            const __m512 s = _mm512_set1_ps(d->rscale[r]);
            const int8_t *w = (const int8_t *)d->w + t * int8_tile_bytes(K) + i * CHUNK;
            for (int64_t c = 0; c < K / CHUNK; c++, w += TILE * CHUNK)
                for (int q = 0; q < 4; q++) {
                    __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16 * q)));
                    put16(d, d->out, n * K + c * CHUNK + 16 * q, _mm512_mul_ps(_mm512_cvtepi32_ps(v), s));
                }
            continue;
        }
        const uint8_t *tile = d->w + t * int4_tile_bytes(K, G), *p = tile + int4_codes_at(G) + i * 32;
        const uint16_t *sc = (const uint16_t *)tile + i * G, *zr = (const uint16_t *)tile + TILE * G + i * G;
        for (int64_t c = 0; c < K / CHUNK; c++, p += TILE * 32) {
            __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
            uint8_t codes[64];
            _mm512_storeu_si512(codes, _mm512_and_si512(_mm512_srlv_epi16(b, shift), low));
            for (int q = 0; q < 4; q++) {
                const int64_t k = c * CHUNK + 16 * q, g = k / d->group;
                const float sg = bf16_to_f32(sc[g]);
                const __m512 s = _mm512_set1_ps(sg), z = _mm512_set1_ps(bf16_to_f32(zr[g]) - 8.0f * sg);
                __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16 * q))));
                put16(d, d->out, n * K + k, _mm512_fmadd_ps(v, s, z));
            }
        }
    }
}

__attribute__((target(AVX2))) static void dequantize_avx2(const deq_t *d, int64_t lo, int64_t hi) {
    dequantize_body(d, lo, hi);
}
#endif

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
    if (check_shape(kind, K, group) || r0 < 0 || r1 < r0 || isa < 0 || isa > qk_best_isa()) return EINVAL;
    deq_t d = {kind, isa, out_bf16, K, kind == KIND_INT4 ? group : 0, r0, r1, (const uint8_t *)w, rscale, out};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > r1 - r0) parts = r1 - r0;
    pool_run(dequantize_part, &d, parts < 1 ? 1 : parts);
    return 0;
}
