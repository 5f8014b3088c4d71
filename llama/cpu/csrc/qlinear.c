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
 * The weights are repacked once (qk_pack_int8, qk_pack_int4) so that each thread reads one sequential stream;
 * see "the weights' layouts" below. int8 codes are signed, -127..127 (packing turns -128 into -127: the kernels
 * negate codes), with one float32 scale per row. int4 codes are 0..15 with a bfloat16 scale and zero per group:
 * w = (code - 8) * scale + zero, so a group adds
 *     scale * sum(code * x) + (zero - 8 * scale) * sum(x).
 *
 * One binary serves every x86 CPU: each instruction set's kernel is compiled for it alone (GCC/Clang target
 * attributes) and chosen at run time; other CPUs get the portable C loops. The output rows are split between
 * threads from a small pool of its own (the caller's thread takes the first share), so no second OpenMP runtime
 * is loaded beside PyTorch's. Larger products (prefill) dequantize row tiles to 16- or 32-bit floats for a BLAS
 * (qk_dequantize), which the Python side calls.
 *
 * Plain C, no Python or PyTorch headers: llama/cpu/qkernels.py compiles it at first use and calls it through ctypes.
 */

#include "common.h"

#define BLOCK 32   /* inputs per activation scale */
#define CHUNK 64   /* inputs per int4 code chunk; K must be a multiple */

enum { KIND_INT8 = 8, KIND_INT4 = 4 };

const qk_const_t qk_qlinear_constants[] = {{"kind.int8", KIND_INT8}, {"kind.int4", KIND_INT4}, {"block", BLOCK},
                                           {"chunk", CHUNK}, {NULL, 0}};

/* --- the weights' layouts (qk_pack_int8, qk_pack_int4) --------------------------------------------------------
 * int8: rows in tiles of TILE (the last padded with zero rows), the tile's rows interleaved chunk by chunk, so that
 *   the rows computed together are read as one sequential stream (several streams a thread measured up to 2x
 *   slower here): chunk c of row i of a tile at c * 256 + i * 64 (64 bytes each); the row scales apart, float32.
 * int4: rows in panels of PANEL = 16 (the last padded with zero rows), transposed so that each output row is one
 *   lane of a 16-lane vector: the integer dot products, the scales and the zeros of 16 rows then take one
 *   instruction each, where a row-major layout needs one per row and a horizontal sum at the end (3x the
 *   instructions per weight, which made the int4 kernel compute-bound). Per group of `group` inputs, a panel
 *   holds the 16 rows' bfloat16 scales (32 bytes), their zeros (32 bytes), then group / 8 quads of 64 bytes:
 *   quad q holds, at byte 4i + j (row i, j < 4), input 8q + j of the group in the low nibble and input
 *   8q + 4 + j in the high one; so a quad's low nibbles are 16 rows x 4 inputs, what one `vpdpbusd` takes. */

static inline int64_t tiles_of(int64_t n) { return (n + TILE - 1) / TILE; }
static inline int64_t int8_tile_bytes(int64_t K) { return TILE * K; }

#define PANEL 16
static inline int64_t panels_of(int64_t n) { return (n + PANEL - 1) / PANEL; }
static inline int64_t int4_group_bytes(int64_t group) { return 64 + 8 * group; }
static inline int64_t int4_panel_bytes(int64_t K, int64_t group) { return K / group * int4_group_bytes(group); }

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
    int64_t N, K, group;          /* group: int4's group size */
    const uint8_t *w;             /* the packed tiles */
    const float *rscale;          /* int8: row scales (N) */
    const act_t *a;
    void *out;                    /* M x N */
} job_t;

static inline void store(const job_t *j, int64_t m, int64_t r, float v) {
    if (r >= j->N) return;  /* a padding row */
    if (j->out_bf16) ((uint16_t *)j->out)[m * j->N + r] = f32_to_bf16(v);
    else ((float *)j->out)[m * j->N + r] = v;
}

/* int4: 16 outputs of a panel, one per lane. */
static inline void store16(const job_t *j, int64_t m, int64_t r0, const float *v) {
    for (int i = 0; i < PANEL; i++) store(j, m, r0 + i, v[i]);
}

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

static inline int32_t four(const int8_t *x) {  /* 4 activation codes as one 32-bit lane */
    int32_t v;
    memcpy(&v, x, 4);
    return v;
}

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

/* 16 bfloat16 values at p as floats. */
__attribute__((target(AVX512))) static inline __m512 bf16x16(const void *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 outputs of a panel (one per lane) for activation row m. */
__attribute__((target(AVX512))) static inline void store16_avx512(const job_t *j, int64_t m, int64_t r0, __m512 v) {
    if (r0 + PANEL > j->N) {
        float out[PANEL];
        _mm512_storeu_ps(out, v);
        store16(j, m, r0, out);
    } else if (j->out_bf16) {
        store_bf16x16((uint16_t *)j->out + m * j->N + r0, v);
    } else {
        _mm512_storeu_ps((float *)j->out + m * j->N + r0, v);
    }
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

#endif /* QK_X86 */

/* --- int8 products of many rows (prefill): a GEMM over panels of 16 output rows ----------------------------------
 * From GEMM_ROWS rows of x up, int8's tiles (one row's inputs per vector, summed across lanes at the end) would
 * spend more instructions per weight than the products need. Each thread instead transposes one panel of 16
 * output rows at a time into int4's layout, unsigned: K/4 quads of 16 rows x 4 inputs, code + 128 (so that
 * `vpdpbusd` takes it as its unsigned operand), and runs every row of x over it, GEMM_R rows at a time: each weight
 * vector loaded meets GEMM_R rows, and each block's integer sums are scaled once per row. A row then adds
 *     scale * (sum over blocks of s_b * sum(code' * x) - 128 * sum over blocks of s_b * sum(x)).
 * int4's panels are that layout already: its kernel above takes 4 rows at a time at every size.
 * Measured on a Zen 4 core: the inner loop 195 G multiply-adds/s, oneDNN's bfloat16 GEMM 110. */

#ifndef GEMM_ROWS
#define GEMM_ROWS 8  /* measured: the tiles are as fast at 8 rows for 2048 x 2048, 1.4x slower for 11264 x 2048 */
#endif
#define GEMM_R 4

static inline int64_t gemm_scratch_bytes(int64_t K) { return K * PANEL + 2 * PANEL * 4; }

typedef struct {
    const job_t *j;
    uint8_t *scratch;  /* gemm_scratch_bytes per part */
} gemm_t;

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

static void gemm_part(const void *ctx, int64_t part, int64_t parts) {
    const gemm_t *gm = (const gemm_t *)ctx;
    const job_t *j = gm->j;
    int64_t lo, hi;
    share(panels_of(j->N), part, parts, &lo, &hi);
    if (lo >= hi) return;
#if QK_X86
    gemm_avx512(j, gm->scratch + part * gemm_scratch_bytes(j->K), lo, hi);
#endif
}

static void run_rows(const job_t *j, int64_t m, int64_t t0, int64_t t1) {
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

/* int8: tiles [t0, t1) for every activation row: a few tiles at a time (about 32 KiB, in the core's L1 or L2
 * cache) meet all M rows, so that the weights stream from memory once whatever M. */
static void run_tiles(const job_t *j, int64_t t0, int64_t t1) {
    const int64_t step = j->a->M == 1 ? t1 - t0 : (32768 / int8_tile_bytes(j->K) > 1 ? 32768 / int8_tile_bytes(j->K) : 1);
    for (int64_t t = t0; t < t1; t += step) {
        const int64_t end = t + step < t1 ? t + step : t1;
        for (int64_t m = 0; m < j->a->M; m++) run_rows(j, m, t, end);
    }
}

/* int4: panels [p0, p1), each meeting every activation row while it is in the core's cache. */
static void run_panels(const job_t *j, int64_t p0, int64_t p1) {
#if QK_X86
    if (j->isa == ISA_AVX512_VNNI) {
        panels_avx512(j, p0, p1);
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

static void linear_part(const void *ctx, int64_t part, int64_t parts) {
    const job_t *j = (const job_t *)ctx;
    int64_t lo, hi;
    share(j->kind == KIND_INT8 ? tiles_of(j->N) : panels_of(j->N), part, parts, &lo, &hi);
    if (lo >= hi) return;
    if (j->kind == KIND_INT8) run_tiles(j, lo, hi);
    else run_panels(j, lo, hi);
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
    return kind == KIND_INT8 ? tiles_of(N) * int8_tile_bytes(K) : panels_of(N) * int4_panel_bytes(K, group);
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
    const int64_t ng = K / group;
    memset(dst, 0, (size_t)qk_packed_bytes(KIND_INT4, N, K, group));
    for (int64_t r = 0; r < N; r++) {
        const uint8_t *src = codes + r * (K / 2);
        const int i = (int)(r % PANEL);
        uint8_t *panel = dst + (r / PANEL) * int4_panel_bytes(K, group);
        for (int64_t g = 0; g < ng; g++) {
            uint8_t *gp = panel + g * int4_group_bytes(group);
            memcpy(gp + 2 * i, scales + r * ng + g, 2);
            memcpy(gp + 32 + 2 * i, zeros + r * ng + g, 2);
            for (int64_t q = 0; q < group / 8; q++)
                for (int k = 0; k < 4; k++) {
                    const int64_t lo = g * group + 8 * q + k, hi = lo + 4;
                    const uint8_t clo = (src[lo / 2] >> ((lo % 2) ? 0 : 4)) & 15;
                    const uint8_t chi = (src[hi / 2] >> ((hi % 2) ? 0 : 4)) & 15;
                    gp[64 + 64 * q + 4 * i + k] = (uint8_t)(clo | (chi << 4));
                }
        }
    }
    return 0;
}

/* The activations are quantized on every thread from QUANTIZE_SHARED_ROWS rows, on the caller's below: a second
 * round of the pool cost more than it saved there (int4 2048 x 2048, 2 threads: 35-65 us more at 2-7 rows, even
 * at 32, 5% less at 256). */
#define QUANTIZE_SHARED_ROWS 64

typedef struct {
    const act_t *a;
    const void *x;
    int x_bf16, isa;
    int64_t group;
} quant_t;

/* Rows of x [lo, hi) of part `part` quantized, with that part's own scratch. */
static void quantize_part(const void *ctx, int64_t part, int64_t parts) {
    const quant_t *qt = (const quant_t *)ctx;
    const act_t *a = qt->a;
    int64_t lo, hi;
    share(a->M, part, parts, &lo, &hi);
    if (lo >= hi) return;
    const int64_t K = a->K, nc = K / CHUNK, nb = K / BLOCK, G = qt->group ? K / qt->group : 1;
    act_t v = {.M = hi - lo, .K = K, .q = a->q + lo * K, .absq = a->absq + lo * K, .neg = a->neg + lo * nc,
               .scale = a->scale + lo * nb, .lanes = a->lanes + lo * nc * 16, .gsum = a->gsum + lo * G,
               .tmp = a->tmp + part * K};
    const char *x = (const char *)qt->x + lo * K * (qt->x_bf16 ? 2 : 4);
#if QK_X86
    if (qt->isa == ISA_AVX512_VNNI) { quantize_avx512(&v, x, qt->x_bf16, qt->group); return; }
    if (qt->isa == ISA_AVX2) { quantize_avx2(&v, x, qt->x_bf16, qt->group); return; }
#endif
    quantize_scalar(&v, x, qt->x_bf16, qt->group);
}

/* y (M x N) = x (M x K) @ W.T from the packed weight. x and y bfloat16 (flags set) or float32; rscale: int8's
 * float32 row scales (one per row, N). Returns 0, or EINVAL (a shape the kernels refuse, an instruction set this
 * CPU lacks), ENOMEM. */
int qk_linear(int kind, int isa, int threads, const void *x, int x_bf16, int64_t M, int64_t K, const void *w,
              const float *rscale, int64_t N, int64_t group, void *out, int out_bf16) {
    if (check_shape(kind, K, group) || M < 1 || N < 1 || isa < 0 || isa > qk_best_isa()) return EINVAL;
    const int gemm = QK_X86 && kind == KIND_INT8 && isa == ISA_AVX512_VNNI && M >= GEMM_ROWS;
    /* the activations' sums per group: int4's groups; for int8's GEMM, one group of K */
    const int64_t g = kind == KIND_INT4 ? group : (gemm ? K : 0), G = g ? K / g : 1;
    const int64_t nc = K / CHUNK, nb = K / BLOCK, units = kind == KIND_INT8 && !gemm ? tiles_of(N) : panels_of(N);
    int64_t parts = threads < 1 ? 1 : threads;
    const int64_t qparts = M < QUANTIZE_SHARED_ROWS ? 1 : parts;
    if (parts > units) parts = units;
    const size_t scratch = gemm ? (size_t)(parts * gemm_scratch_bytes(K)) : 0;
    const size_t bytes = (size_t)(M * nc * 8 + M * nb * 4 + M * nc * 64 + M * G * 4 + qparts * K * 4 + M * K * 2 + 64)
                         + scratch;
    char *mem = malloc(bytes);
    if (!mem) return ENOMEM;
    act_t a = {.M = M, .K = K};
    a.neg = (uint64_t *)mem;
    a.scale = (float *)(a.neg + M * nc);
    a.lanes = a.scale + M * nb;
    a.gsum = a.lanes + M * nc * 16;
    a.tmp = a.gsum + M * G;
    a.q = (int8_t *)(a.tmp + qparts * K);
    a.absq = (uint8_t *)(a.q + M * K);
    quant_t qt = {.a = &a, .x = x, .x_bf16 = x_bf16, .isa = isa, .group = g};
    pool_run(quantize_part, &qt, qparts);
    job_t j = {.kind = kind, .isa = isa, .out_bf16 = out_bf16, .N = N, .K = K, .group = kind == KIND_INT4 ? group : 0,
               .w = (const uint8_t *)w, .rscale = rscale, .a = &a, .out = out};
    if (gemm) {
        gemm_t gm = {.j = &j, .scratch = (uint8_t *)(a.absq + M * K + 64)};
        pool_run(gemm_part, &gm, parts);
    } else {
        pool_run(linear_part, &j, parts);
    }
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
        const int64_t group = d->group, p = r / PANEL;
        const int ip = (int)(r % PANEL);
        const uint8_t *gp = d->w + p * int4_panel_bytes(K, group);
        for (int64_t g = 0; g < K / group; g++, gp += int4_group_bytes(group)) {
            uint16_t sbits, zbits;
            memcpy(&sbits, gp + 2 * ip, 2);
            memcpy(&zbits, gp + 32 + 2 * ip, 2);
            const float s = bf16_to_f32(sbits), z = bf16_to_f32(zbits) - 8.0f * s;
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
    const __m128i low = _mm_set1_epi8(15);
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
        /* int4: a block of 32 inputs is the row's 4 bytes in each of 4 quads; its low nibbles are inputs 8q..8q+3
         * and its high ones 8q+4..8q+7, so interleaving the two per quad puts the 32 codes in input order. */
        const int64_t group = d->group, ip = r % PANEL;
        const uint8_t *gp = d->w + (r / PANEL) * int4_panel_bytes(K, group);
        for (int64_t g = 0; g < K / group; g++, gp += int4_group_bytes(group)) {
            uint16_t sbits, zbits;
            memcpy(&sbits, gp + 2 * ip, 2);
            memcpy(&zbits, gp + 32 + 2 * ip, 2);
            const float sf = bf16_to_f32(sbits);
            const __m512 s = _mm512_set1_ps(sf), z = _mm512_set1_ps(bf16_to_f32(zbits) - 8.0f * sf);
            for (int64_t b = 0; b < group / BLOCK; b++) {
                const uint8_t *qp = gp + 64 + b * 256 + 4 * ip;
                int32_t w4[4];
                for (int q = 0; q < 4; q++) memcpy(w4 + q, qp + 64 * q, 4);
                const __m128i v = _mm_loadu_si128((const __m128i *)w4);
                const __m128i l = _mm_and_si128(v, low), h = _mm_and_si128(_mm_srli_epi16(v, 4), low);
                const int64_t at = n * K + g * group + b * BLOCK;
                const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi32(l, h)));
                const __m512 second = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi32(l, h)));
                put16(d, d->out, at, _mm512_fmadd_ps(first, s, z));
                put16(d, d->out, at + 16, _mm512_fmadd_ps(second, s, z));
            }
        }
    }
}

__attribute__((target(AVX2))) static void dequantize_avx2(const deq_t *d, int64_t lo, int64_t hi) {
    dequantize_body(d, lo, hi);
}
#endif

/* One row of the packed weight as K floats, for the AVX2 GEMM (qk_gemm16_fill): the plain loop, compiled for AVX2. */
#if QK_X86
__attribute__((target(AVX2))) static void fill_row_avx2(const void *ctx, int64_t row, float *out) {
    deq_t d = *(const deq_t *)ctx;
    d.r0 = row, d.r1 = row + 1, d.out = out, d.out_bf16 = 0;
    dequantize_body(&d, 0, 1);
}
#endif

/* y (M x N, bfloat16) = x (M x K, bfloat16) @ W.T for prefill-sized products where the integer kernels are not
 * the fastest (AVX2): each panel of weight rows is dequantized into floats and met by linear16.c's
 * register-blocked GEMM (measured on a Zen 4 emulated as AVX2, 2 threads, 256 rows: faster than MKL's float32
 * GEMM on dequantized tiles). Returns 0 or EINVAL (a shape the kernels refuse, no AVX2), ENOMEM. */
int qk_gemm_quantized(int kind, int threads, const uint16_t *x, int64_t M, int64_t K, const void *w,
                      const float *rscale, int64_t N, int64_t group, uint16_t *out) {
    if (check_shape(kind, K, group) || M < 1 || N < 1 || qk_best_isa() < ISA_AVX2) return EINVAL;
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
    if (check_shape(kind, K, group) || r0 < 0 || r1 < r0 || isa < 0 || isa > qk_best_isa()) return EINVAL;
    deq_t d = {kind, isa, out_bf16, K, kind == KIND_INT4 ? group : 0, r0, r1, (const uint8_t *)w, rscale, out};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > r1 - r0) parts = r1 - r0;
    pool_run(dequantize_part, &d, parts < 1 ? 1 : parts);
    return 0;
}
