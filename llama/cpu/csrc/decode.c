/* A decoding step's transformer layers in one call, for models whose every linear layer runs on this library's
 * own kernels (qlinear.c, linear16.c) in one process.
 *
 * At batch 1 the weights' stream is the step's real work, and the C kernels keep it near the memory bandwidth.
 * What PyTorch adds around them (norms, rotations, the cache writes, attention over a short context, the
 * residual adds, Python between them) costs 8-12 ms per token at the 1.1B shape on 2 cores, a quarter of an
 * int8 step. Here each layer is: RMSNorm, the fused wq/wk/wv product, rotary embedding of q and k, the new k
 * and v written into the cache row, attention over the row's positions 0..pos, wo, the residual add, RMSNorm,
 * the fused w1/w3 product, SiLU(gate) * up, w2, the residual add. Rows with a LoRA adapter get its term added
 * after each projection's base product (lora.c).
 *
 * The cache is paged (llama/model/kv_cache.py): each layer's keys and values are a pool of blocks of block_size
 * positions, (blocks, kv_heads, block_size, head_dim), and row r's position t lives in block
 * tables[r * max_blocks + t / block_size] at offset t % block_size (one head's positions are contiguous within a
 * block, so each head streams its own bytes only). A row at position -1 is idle: it writes into
 * the null block 0 and attends over that one position.
 *
 * It computes what llama/model/transformer.py computes, in the same dtypes: activations bfloat16 between operators (each
 * operator's float32 result rounded once, as PyTorch's bfloat16 operators do), norms, rotations, softmax and
 * attention sums in float32. The order of float additions differs from PyTorch's, so results agree to
 * bfloat16 rounding, not bit for bit. Each row attends over its own positions only, so a row's tokens never
 * depend on the other rows or on a window.
 *
 * Vector code: the operators (decode_ops.c) and the attention (attention.c) are plain loops written in lanes of
 * 16, compiled for AVX-512, AVX2 and portable C, and chosen at run time. exp is a polynomial (Cephes' expf: about
 * 1 ulp), so it vectorizes. decode.h holds the structures the Python side mirrors. */

#include "decode.h"

int qk_linear(int kind, int isa, int threads, const void *x, int x_bf16, int64_t M, int64_t K, const void *w,
              const float *rscale, int64_t N, int64_t group, void *out, int out_bf16);
int qk_linear_bf16(int isa, int threads, const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                   uint16_t *out);

static int linear(const qk_lin_t *l, int threads, const uint16_t *x, int64_t M, uint16_t *out) {
    if (l->kind == KIND_BF16) return qk_linear_bf16(l->isa, threads, x, M, l->k, (const uint16_t *)l->w, l->n, out);
    return qk_linear(l->kind, l->isa, threads, x, 1, M, l->k, l->w, l->rscale, l->n, l->group, out, 1);
}

/* The layers of one decoding step: x (M x dim, bfloat16) holds token m's embedding for cache row first + m at
 * position pos[m]; on return it holds the last layer's output (before the final norm). Each layer's new keys and
 * values are written into its cache. Returns 0, EINVAL (shapes or positions out of range), ENOMEM, or a
 * kernel's error. */
int qk_decode_layers(int threads, int isa, const qk_model_t *s, const qk_layer_t *layers, int64_t M, int64_t first,
                     const int64_t *pos, uint16_t *x) {
    const int64_t dim = s->dim, d = s->head_dim, H = s->n_heads, kv = s->n_kv_heads, hidden = s->hidden;
    if (M < 1 || first < 0 || first + M > s->rows || d < 2 || d > MAX_HEAD_DIM || d % LANES || dim % LANES ||
        kv < 1 || H % kv || s->block_size < 1 || s->block_size % LANES || PIECE % s->block_size ||
        s->max_blocks * s->block_size < s->max_seq)
        return EINVAL;
    for (int64_t m = 0; m < M; m++)
        if (pos[m] < -1 || pos[m] >= s->max_seq) return EINVAL;
    for (int64_t l = 0; l < s->n_layers; l++) {
        const qk_layer_t *L = layers + l;
        if (L->qkv.n != (H + 2 * kv) * d || L->qkv.k != dim || L->wo.n != dim || L->wo.k != H * d ||
            L->w13.n != 2 * hidden || L->w13.k != dim || L->w2.n != dim || L->w2.k != hidden)
            return EINVAL;
    }
    /* Each row's length, block table (its entries checked against the pool's size) and attention tasks. */
    row_t *rows = malloc((size_t)(M + 1) * sizeof(row_t));
    if (!rows) return ENOMEM;
    if (qk_attention_rows(s, M, first, pos, rows)) {
        free(rows);
        return EINVAL;
    }
    const ops_t *ops = qk_decode_ops(isa);
    const int64_t width = (H + 2 * kv) * d;
    const size_t halves = (size_t)(M * (dim + width + H * d + dim + 2 * hidden + hidden));
    uint16_t *mem = malloc(halves * 2 + (size_t)qk_attention_scratch(s, rows, M) * 4 + 64);
    if (!mem) {
        free(rows);
        return ENOMEM;
    }
    uint16_t *xn = mem, *qkv = xn + M * dim, *att = qkv + M * width, *o = att + M * H * d, *gu = o + M * dim;
    uint16_t *hb = gu + M * 2 * hidden;
    float *part = (float *)(((uintptr_t)(hb + M * hidden) + 63) & ~(uintptr_t)63);
    int rc = 0;
    for (int64_t l = 0; l < s->n_layers && !rc; l++) {
        const qk_layer_t *L = layers + l;
        for (int64_t m = 0; m < M; m++) ops->rmsnorm(x + m * dim, L->attn_norm, dim, s->eps, xn + m * dim);
        if ((rc = linear(&L->qkv, threads, xn, M, qkv))) break;
        if (s->lora && (rc = qk_lora_add(s->lora, l, LORA_QKV, threads, isa, xn, M, qkv, width))) break;
        for (int64_t m = 0; m < M; m++) {
            uint16_t *q = qkv + m * width, *k = q + H * d, *v = k + kv * d;
            const int64_t p = pos[m] < 0 ? 0 : pos[m];
            const float *table = s->rope + p * d;
            ops->rope(q, H, d, table);
            ops->rope(k, kv, d, table);
            qk_cache_write(s, L, rows[m].table, p, k, v);
        }
        qk_attention(threads, isa, s, L, rows, M, qkv, part, att);
        if ((rc = linear(&L->wo, threads, att, M, o))) break;
        if (s->lora && (rc = qk_lora_add(s->lora, l, LORA_WO, threads, isa, att, M, o, dim))) break;
        ops->add(x, o, M * dim);
        for (int64_t m = 0; m < M; m++) ops->rmsnorm(x + m * dim, L->ffn_norm, dim, s->eps, xn + m * dim);
        if ((rc = linear(&L->w13, threads, xn, M, gu))) break;
        if (s->lora && (rc = qk_lora_add(s->lora, l, LORA_W13, threads, isa, xn, M, gu, 2 * hidden))) break;
        ops->silu_mul(gu, M, hidden, hb);
        if ((rc = linear(&L->w2, threads, hb, M, o))) break;
        if (s->lora && (rc = qk_lora_add(s->lora, l, LORA_W2, threads, isa, hb, M, o, dim))) break;
        ops->add(x, o, M * dim);
    }
    free(mem);
    free(rows);
    return rc;
}

/* --- the interface's numbers and layouts, read and checked by the Python side at load ------------------------- */

#define SIZE(T) {"sizeof." #T, sizeof(T)}
#define FIELD(T, f) {#T "." #f, offsetof(T, f)}

const qk_const_t qk_decode_constants[] = {
    {"kind.bf16", KIND_BF16}, {"lanes", LANES}, {"max_head_dim", MAX_HEAD_DIM},
    SIZE(qk_lin_t), FIELD(qk_lin_t, kind), FIELD(qk_lin_t, isa), FIELD(qk_lin_t, n), FIELD(qk_lin_t, k),
    FIELD(qk_lin_t, group), FIELD(qk_lin_t, w), FIELD(qk_lin_t, rscale),
    SIZE(qk_layer_t), FIELD(qk_layer_t, qkv), FIELD(qk_layer_t, wo), FIELD(qk_layer_t, w13), FIELD(qk_layer_t, w2),
    FIELD(qk_layer_t, attn_norm), FIELD(qk_layer_t, ffn_norm), FIELD(qk_layer_t, k), FIELD(qk_layer_t, v),
    FIELD(qk_layer_t, k_scale), FIELD(qk_layer_t, v_scale),
    SIZE(qk_model_t), FIELD(qk_model_t, n_layers), FIELD(qk_model_t, dim), FIELD(qk_model_t, n_heads),
    FIELD(qk_model_t, n_kv_heads), FIELD(qk_model_t, head_dim), FIELD(qk_model_t, hidden),
    FIELD(qk_model_t, max_seq), FIELD(qk_model_t, rows), FIELD(qk_model_t, eps), FIELD(qk_model_t, rope),
    FIELD(qk_model_t, lora),
    {NULL, 0}};
