/* What the fused decoding step's files share (decode.c the step; decode_ops.c the per-token operators;
 * attention.c the paged attention): the structures the Python side fills, the numbers it checks, and the few
 * float helpers they all use. Plain C, no Python or PyTorch headers. */

#ifndef LLAMA_KERNELS_DECODE_H
#define LLAMA_KERNELS_DECODE_H

#include "common.h"

#define KIND_BF16 16
#define LANES 16
#define MAX_HEAD_DIM 256

/* The structures the Python side fills (llama/model/fused_decode.py mirrors them with ctypes). */
typedef struct {
    int32_t kind, isa;      /* 16: bfloat16 (linear16.c); 8 or 4: int8 or int4 (qlinear.c); with instruction set isa */
    int64_t n, k, group;    /* output and input features; int4's group size */
    const void *w;          /* the packed weight */
    const float *rscale;    /* int8: the row scales */
} qk_lin_t;

typedef struct {
    qk_lin_t qkv, wo, w13, w2;
    const uint16_t *attn_norm, *ffn_norm;  /* bfloat16 norm weights (dim) */
    uint16_t *k, *v;                       /* the layer's pool: (blocks, kv_heads, block_size, head_dim), bfloat16 */
    uint16_t *k_scale, *v_scale;           /* NULL; or an int8 pool (llama/model/kv_int8.py): k and v hold int8
                                              codes, these their bfloat16 scales (blocks, kv_heads, block_size) */
} qk_layer_t;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, max_seq, rows;
    float eps;
    const float *rope;      /* (max_seq, head_dim / 2, 2): cos and sin of each position's angles */
    int64_t block_size, max_blocks, blocks;
    const int64_t *tables;  /* (rows, max_blocks): each row's block table */
    const qk_lora_t *lora;  /* LoRA adapters' factors and each row's slot (lora.c); NULL: no row has one */
} qk_model_t;

#define INLINE static inline __attribute__((always_inline))

INLINE float bf(uint16_t h) { return bf16_to_f32(h); }

/* e^x for x <= 88 (Cephes' expf): x = n ln2 + r, e^r by its polynomial, 2^n in the exponent bits. n is rounded
 * by adding and taking away 1.5 * 2^23 (a call of floorf would keep the loops that use this from vectorizing). */
INLINE float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* The sum of 16 floats, as a tree of vector operations (a float reduction is only vectorized so). */
INLINE float hsum_body(float *acc) {
    for (int l = 0; l < 8; l++) acc[l] += acc[l + 8];
    for (int l = 0; l < 4; l++) acc[l] += acc[l + 4];
    for (int l = 0; l < 2; l++) acc[l] += acc[l + 2];
    return acc[0] + acc[1];
}

/* --- decode_ops.c: the operators of a token's layer, one table per instruction set ----------------------------- */

typedef struct {
    void (*rmsnorm)(const uint16_t *, const uint16_t *, int64_t, float, uint16_t *);
    void (*add)(uint16_t *, const uint16_t *, int64_t);
    void (*silu_mul)(const uint16_t *, int64_t, int64_t, uint16_t *);
    void (*rope)(uint16_t *, int64_t, int64_t, const float *);
} ops_t;

QK_INTERNAL const ops_t *qk_decode_ops(int isa);

/* --- attention.c: the paged cache's writes and the attention over it ------------------------------------------- */

/* Positions of a row that one task attends over (a multiple of the block size). A long row's pieces run on all
 * threads and their partial results are merged in order, so a row's arithmetic depends on its own length only:
 * not on the batch, the other rows or the thread count. */
#define PIECE 1024

typedef struct {
    int64_t len, start;    /* positions the row attends over; its first task */
    const int64_t *table;  /* its block table (an idle row: the null block's) */
} row_t;

/* rows (M + 1) for the rows first.. at positions pos: each row's length, block table and first task (rows[M].start:
 * the tasks of all). Returns 0, or EINVAL for a block table entry outside the pool. */
QK_INTERNAL int qk_attention_rows(const qk_model_t *s, int64_t M, int64_t first, const int64_t *pos, row_t *rows);

/* Floats of scratch qk_attention takes for the tasks of rows. */
QK_INTERNAL int64_t qk_attention_scratch(const qk_model_t *s, const row_t *rows, int64_t M);

/* Row m's new key and value (k, v: kv_heads x head_dim, bfloat16) into layer L's pool at position p of its table. */
QK_INTERNAL void qk_cache_write(const qk_model_t *s, const qk_layer_t *L, const int64_t *table, int64_t p,
                                const uint16_t *k, const uint16_t *v);

/* Each row's attention (out: M x n_heads x head_dim, bfloat16) over its cache in layer L, from qkv (M x (n_heads
 * + 2 kv_heads) x head_dim, q rotated), split over the pool's threads; part: qk_attention_scratch floats. */
QK_INTERNAL void qk_attention(int threads, int isa, const qk_model_t *s, const qk_layer_t *L, const row_t *rows,
                              int64_t M, const uint16_t *qkv, float *part, uint16_t *out);

#endif
