/* What the quantized kernels' files share (qlinear.c the interface; qint8.c, qint4.c, qgemm.c, qdequant.c the
 * loops): the packed weights' layouts, the quantized activations, a call's job, and the small helpers that read
 * them. Plain C, no Python or PyTorch headers. */

#ifndef LLAMA_KERNELS_QLINEAR_H
#define LLAMA_KERNELS_QLINEAR_H

#include "common.h"

#define BLOCK 32   /* inputs per activation scale */
#define CHUNK 64   /* inputs per int4 code chunk; K must be a multiple */

enum { KIND_INT8 = 8, KIND_INT4 = 4 };

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

/* Row ip (< PANEL) of an int4 group at gp: its scale s, and its zero as the kernels add it, zero - 8 s. */
static inline void int4_row_coeffs(const uint8_t *gp, int64_t ip, float *s, float *z) {
    uint16_t sbits, zbits;
    memcpy(&sbits, gp + 2 * ip, 2);
    memcpy(&zbits, gp + 32 + 2 * ip, 2);
    *s = bf16_to_f32(sbits);
    *z = bf16_to_f32(zbits) - 8.0f * *s;
}

#if QK_X86
/* Row ip's 32 codes of the block of an int4 group whose quads start at qp (gp + 64 + b * 256), in input order:
 * codes[0] inputs 0-15, codes[1] inputs 16-31, one byte each. The row's 4 bytes in each of the block's 4 quads
 * hold inputs 8q..8q+3 (low nibbles) and 8q+4..8q+7 (high ones), so interleaving the two per quad gives input
 * order. SSE2 only: it inlines into the loops of every x86 target. */
static inline void int4_row_codes32(const uint8_t *qp, int64_t ip, __m128i codes[2]) {
    int32_t w4[4];
    for (int q = 0; q < 4; q++) memcpy(w4 + q, qp + 64 * q + 4 * ip, 4);
    const __m128i v = _mm_loadu_si128((const __m128i *)w4), low = _mm_set1_epi8(15);
    const __m128i l = _mm_and_si128(v, low), h = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    codes[0] = _mm_unpacklo_epi32(l, h);
    codes[1] = _mm_unpackhi_epi32(l, h);
}

/* Row ip of the int4 panel at pp (K inputs in groups of `group`), one block of 32 inputs at a time: the body (the
 * macro's last argument) sees the group's coefficients `sf`, `zf` (int4_row_coeffs), the block's 32 codes `codes`
 * (int4_row_codes32) and its first input `at`. A macro, so that the body's vectors compile in the target of the
 * function that uses it (the AVX-512 dequantizer, the AVX2 row fill). */
#define INT4_ROW_WALK(pp, ip, K, group, ...)                                                      \
    do {                                                                                          \
        const uint8_t *gp_ = (pp);                                                                \
        for (int64_t g_ = 0; g_ < (K) / (group); g_++, gp_ += int4_group_bytes(group)) {          \
            float sf, zf;                                                                         \
            int4_row_coeffs(gp_, (ip), &sf, &zf);                                                 \
            for (int64_t b_ = 0; b_ < (group) / BLOCK; b_++) {                                    \
                __m128i codes[2];                                                                 \
                int4_row_codes32(gp_ + 64 + b_ * 256, (ip), codes);                               \
                const int64_t at = g_ * (group) + b_ * BLOCK;                                     \
                __VA_ARGS__                                                                       \
            }                                                                                     \
        }                                                                                         \
    } while (0)
#endif

/* --- the activations, quantized once per call (qlinear.c) ---------------------------------------------------- */

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

static inline int32_t four(const int8_t *x) {  /* 4 activation codes as one 32-bit lane */
    int32_t v;
    memcpy(&v, x, 4);
    return v;
}

/* --- a product's job, and its outputs ----------------------------------------------------------------------- */

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

/* 16 outputs of a panel (int4's, or the int8 GEMM's), one per lane. */
static inline void store16(const job_t *j, int64_t m, int64_t r0, const float *v) {
    for (int i = 0; i < PANEL; i++) store(j, m, r0 + i, v[i]);
}

#if QK_X86
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
#endif

/* --- the loops each file gives the interface (qlinear.c) ------------------------------------------------------ */

/* 0 for a kind, K and group the kernels take, else EINVAL. */
QK_INTERNAL int qk_check_shape(int kind, int64_t K, int64_t group);

/* qint8.c: int8 tiles [t0, t1) of the output for activation row m, with the loop of j->isa. */
QK_INTERNAL void qk_int8_tiles(const job_t *j, int64_t m, int64_t t0, int64_t t1);

/* qint4.c: int4 panels [p0, p1) for every activation row, with the loop of j->isa. */
QK_INTERNAL void qk_int4_panels(const job_t *j, int64_t p0, int64_t p1);

/* qgemm.c: int8 from GEMM_ROWS rows of x up (AVX-512 VNNI): panels [p0, p1) for every activation row, each
 * transposed into scratch (gemm_scratch_bytes) first. */
#ifndef GEMM_ROWS
#define GEMM_ROWS 8  /* measured: the tiles are as fast at 8 rows for 2048 x 2048, 1.4x slower for 11264 x 2048 */
#endif
static inline int64_t gemm_scratch_bytes(int64_t K) { return K * PANEL + 2 * PANEL * 4; }
QK_INTERNAL void qk_int8_gemm(const job_t *j, uint8_t *scratch, int64_t p0, int64_t p1);

#endif
