/* A decoding step's transformer layers in one call, for models whose every linear layer runs on this library's
 * own kernels (qlinear.c, linear16.c) in one process.
 *
 * At batch 1 the weights' stream is the step's real work, and the C kernels keep it near the memory bandwidth.
 * What PyTorch adds around them (norms, rotations, the cache writes, attention over a short context, the
 * residual adds, Python between them) costs 8-12 ms per token at the 1.1B shape on 2 cores, a quarter of an
 * int8 step. Here each layer is: RMSNorm, the fused wq/wk/wv product, rotary embedding of q and k, the new k
 * and v written into the cache row, attention over the row's positions 0..pos, wo, the residual add, RMSNorm,
 * the fused w1/w3 product, SiLU(gate) * up, w2, the residual add.
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
 * Vector code: the operators below are plain loops written in lanes of 16, compiled for AVX-512, AVX2 and
 * portable C, and chosen at run time. exp is a polynomial (Cephes' expf: about 1 ulp), so it vectorizes. */

#include "common.h"

int qk_linear(int kind, int isa, int threads, const void *x, int x_bf16, int64_t M, int64_t K, const void *w,
              const float *rscale, int64_t N, int64_t group, void *out, int out_bf16);
int qk_linear_bf16(int isa, int threads, const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                   uint16_t *out);

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
} qk_model_t;

/* --- the operators, written once, compiled for each instruction set ------------------------------------------ */

#define INLINE static inline __attribute__((always_inline))

INLINE float bf(uint16_t h) { return bf16_to_f32(h); }

/* e^x for x <= 88 (Cephes' expf): x = n ln2 + r, e^r by its polynomial, 2^n in the exponent bits. */
INLINE float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
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

/* out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w), one row of n (n a multiple of 16). */
INLINE void rmsnorm_body(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *out) {
    float acc[LANES] = {0};
    for (int64_t i = 0; i < n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const float v = bf(x[i + l]);
            acc[l] += v * v;
        }
    float ss = 0.0f;
    for (int l = 0; l < LANES; l++) ss += acc[l];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(bf(f32_to_bf16(bf(x[i]) * r)) * bf(w[i]));
}

/* x = bf16(x + y), n values. */
INLINE void add_body(uint16_t *x, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = f32_to_bf16(bf(x[i]) + bf(y[i]));
}

/* out = bf16(bf16(silu(gate)) * up) for the rows of gu (gate, up: `hidden` each). */
INLINE void silu_mul_body(const uint16_t *gu, int64_t rows, int64_t hidden, uint16_t *out) {
    for (int64_t m = 0; m < rows; m++) {
        const uint16_t *g = gu + m * 2 * hidden, *u = g + hidden;
        uint16_t *o = out + m * hidden;
        for (int64_t i = 0; i < hidden; i++) {
            const float v = bf(g[i]);
            o[i] = f32_to_bf16(bf(f32_to_bf16(v / (1.0f + exp_poly(-v)))) * bf(u[i]));
        }
    }
}

/* Rotate the interleaved pairs of n heads of size d in place (x bfloat16), by one position's table. */
INLINE void rope_body(uint16_t *x, int64_t heads, int64_t d, const float *table) {
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < d / 2; i++) {
            const float a = bf(x[h * d + 2 * i]), b = bf(x[h * d + 2 * i + 1]);
            const float c = table[2 * i], s = table[2 * i + 1];
            x[h * d + 2 * i] = f32_to_bf16(a * c - b * s);
            x[h * d + 2 * i + 1] = f32_to_bf16(a * s + b * c);
        }
}

/* n_rep query heads (q: n_rep x d, bfloat16) over one KV head's positions 0..len-1, position t at keys +
 * at[t] and values + at[t] (d values each). scores: n_rep x len floats of scratch. out: n_rep x d, bfloat16. */
INLINE void attend_body(const uint16_t *q, int64_t n_rep, int64_t d, const uint16_t *keys, const uint16_t *values,
                        const int64_t *at, int64_t len, float *scores, uint16_t *out) {
    const float scale = 1.0f / sqrtf((float)d);
    float qf[MAX_HEAD_DIM];
    for (int64_t r = 0; r < n_rep; r++) {
        for (int64_t i = 0; i < d; i++) qf[i] = bf(q[r * d + i]);
        float *s = scores + r * len;
        for (int64_t t = 0; t < len; t++) {
            const uint16_t *k = keys + at[t];
            float acc[LANES] = {0};
            for (int64_t i = 0; i < d; i += LANES)
                for (int l = 0; l < LANES; l++) acc[l] += qf[i + l] * bf(k[i + l]);
            float dot = 0.0f;
            for (int l = 0; l < LANES; l++) dot += acc[l];
            s[t] = dot * scale;
        }
        float top = s[0];
        for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
        float sum = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            s[t] = exp_poly(s[t] - top);
            sum += s[t];
        }
        float o[MAX_HEAD_DIM] = {0};
        for (int64_t t = 0; t < len; t++) {
            const uint16_t *v = values + at[t];
            const float p = s[t];
            for (int64_t i = 0; i < d; i++) o[i] += p * bf(v[i]);
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < d; i++) out[r * d + i] = f32_to_bf16(o[i] * inv);
    }
}

/* The int8 pool's attention (llama/model/kv_int8.py): as attend_body, position t's codes at keys + at[t] and
 * values + at[t], their scales at kscale[sat[t]] and vscale[sat[t]]; a score is (q . codes) * scale, a value
 * weight p * scale. Positions are the outer loop: each key and value is converted to float once and serves the
 * KV head's n_rep query heads (the conversion of 8-bit codes costs more than bfloat16's shift). Each dot product
 * and each weighted sum adds in attend_body's order. */
INLINE void attend8_body(const uint16_t *q, int64_t n_rep, int64_t d, const int8_t *keys, const uint16_t *kscale,
                         const int8_t *values, const uint16_t *vscale, const int64_t *at, const int64_t *sat,
                         int64_t len, float *scores, uint16_t *out) {
    const float scale = 1.0f / sqrtf((float)d);
    float qf[n_rep * d], o[n_rep * d], sums[n_rep], kf[MAX_HEAD_DIM];
    for (int64_t i = 0; i < n_rep * d; i++) {
        qf[i] = bf(q[i]);
        o[i] = 0.0f;
    }
    for (int64_t t = 0; t < len; t++) {
        const int8_t *k = keys + at[t];
        for (int64_t i = 0; i < d; i++) kf[i] = (float)k[i];
        const float ks = bf(kscale[sat[t]]);
        for (int64_t r = 0; r < n_rep; r++) {
            float acc[LANES] = {0};
            for (int64_t i = 0; i < d; i += LANES)
                for (int l = 0; l < LANES; l++) acc[l] += qf[r * d + i + l] * kf[i + l];
            float dot = 0.0f;
            for (int l = 0; l < LANES; l++) dot += acc[l];
            scores[r * len + t] = dot * ks * scale;
        }
    }
    for (int64_t r = 0; r < n_rep; r++) {
        float *s = scores + r * len, top = s[0], sum = 0.0f;
        for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < len; t++) {
            s[t] = exp_poly(s[t] - top);
            sum += s[t];
        }
        sums[r] = sum;
    }
    for (int64_t t = 0; t < len; t++) {
        const int8_t *v = values + at[t];
        for (int64_t i = 0; i < d; i++) kf[i] = (float)v[i];
        const float vs = bf(vscale[sat[t]]);
        for (int64_t r = 0; r < n_rep; r++) {
            const float p = scores[r * len + t] * vs;
            for (int64_t i = 0; i < d; i++) o[r * d + i] += p * kf[i];
        }
    }
    for (int64_t r = 0; r < n_rep; r++) {
        const float inv = 1.0f / sums[r];
        for (int64_t i = 0; i < d; i++) out[r * d + i] = f32_to_bf16(o[r * d + i] * inv);
    }
}

/* One head's d values (bfloat16) into int8 codes and a bfloat16 scale, as kv_int8.quantize does: s =
 * bf16(max|x| / 127), code = round-half-even(x / s) within +-127 (all codes 0 when s is 0). */
static void quantize_head(const uint16_t *x, int64_t d, int8_t *codes, uint16_t *scale) {
    float top = 0.0f;
    for (int64_t i = 0; i < d; i++) top = fabsf(bf(x[i])) > top ? fabsf(bf(x[i])) : top;
    *scale = f32_to_bf16(top / 127.0f);
    const float s = bf(*scale) == 0.0f ? 1.0f : bf(*scale);
    for (int64_t i = 0; i < d; i++) {
        float c = rintf(bf(x[i]) / s);
        codes[i] = (int8_t)(c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c));
    }
}

typedef struct {
    void (*rmsnorm)(const uint16_t *, const uint16_t *, int64_t, float, uint16_t *);
    void (*add)(uint16_t *, const uint16_t *, int64_t);
    void (*silu_mul)(const uint16_t *, int64_t, int64_t, uint16_t *);
    void (*rope)(uint16_t *, int64_t, int64_t, const float *);
    void (*attend)(const uint16_t *, int64_t, int64_t, const uint16_t *, const uint16_t *, const int64_t *, int64_t,
                   float *, uint16_t *);
    void (*attend8)(const uint16_t *, int64_t, int64_t, const int8_t *, const uint16_t *, const int8_t *,
                    const uint16_t *, const int64_t *, const int64_t *, int64_t, float *, uint16_t *);
} ops_t;

#define DEFINE_OPS(name, attr)                                                                                  \
    attr static void rmsnorm_##name(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *o) {  \
        rmsnorm_body(x, w, n, eps, o);                                                                          \
    }                                                                                                           \
    attr static void add_##name(uint16_t *x, const uint16_t *y, int64_t n) { add_body(x, y, n); }              \
    attr static void silu_mul_##name(const uint16_t *gu, int64_t rows, int64_t hidden, uint16_t *o) {           \
        silu_mul_body(gu, rows, hidden, o);                                                                     \
    }                                                                                                           \
    attr static void rope_##name(uint16_t *x, int64_t heads, int64_t d, const float *t) {                       \
        rope_body(x, heads, d, t);                                                                              \
    }                                                                                                           \
    attr static void attend_##name(const uint16_t *q, int64_t n_rep, int64_t d, const uint16_t *k,              \
                                   const uint16_t *v, const int64_t *at, int64_t len, float *s, uint16_t *o) {   \
        attend_body(q, n_rep, d, k, v, at, len, s, o);                                                          \
    }                                                                                                           \
    attr static void attend8_##name(const uint16_t *q, int64_t n_rep, int64_t d, const int8_t *k,               \
                                    const uint16_t *ks, const int8_t *v, const uint16_t *vs, const int64_t *at,  \
                                    const int64_t *sat, int64_t len, float *s, uint16_t *o) {                    \
        attend8_body(q, n_rep, d, k, ks, v, vs, at, sat, len, s, o);                                            \
    }                                                                                                           \
    static const ops_t ops_##name = {rmsnorm_##name, add_##name, silu_mul_##name, rope_##name, attend_##name,   \
                                     attend8_##name};

DEFINE_OPS(scalar, )
#if QK_X86
DEFINE_OPS(avx2, __attribute__((target(AVX2))))
DEFINE_OPS(avx512, __attribute__((target(AVX512))))
#endif

static const ops_t *ops_for(int isa) {
#if QK_X86
    if (isa >= ISA_AVX512_VNNI) return &ops_avx512;
    if (isa == ISA_AVX2) return &ops_avx2;
#endif
    (void)isa;
    return &ops_scalar;
}

/* --- attention, split over the pool's threads by (row, KV head) ------------------------------------------- */

typedef struct {
    const ops_t *ops;
    const qk_model_t *model;
    const qk_layer_t *layer;
    int64_t M, first, max_len;
    const int64_t *pos;
    const int64_t *at;    /* M x max_len: each row's positions' offsets into the pool (head 0; head h: + h * bs * d) */
    const int64_t *sat;   /* int8 pool: the same positions' offsets into the scales (head h: + h * bs) */
    const uint16_t *qkv;  /* M x (n_heads + 2 kv_heads) x head_dim, q already rotated */
    uint16_t *out;        /* M x n_heads x head_dim */
    float *scores;        /* M x n_heads x max_len */
} att_t;

static void attend_part(const void *ctx, int64_t part, int64_t parts) {
    const att_t *a = (const att_t *)ctx;
    const qk_model_t *s = a->model;
    const int64_t d = s->head_dim, kv = s->n_kv_heads, n_rep = s->n_heads / kv, width = (s->n_heads + 2 * kv) * d;
    int64_t lo, hi;
    share(a->M * kv, part, parts, &lo, &hi);
    for (int64_t item = lo; item < hi; item++) {
        const int64_t m = item / kv, h = item % kv, len = a->pos[m] < 0 ? 1 : a->pos[m] + 1;
        const int64_t head = h * s->block_size * d;
        if (a->layer->k_scale) {
            a->ops->attend8(a->qkv + m * width + h * n_rep * d, n_rep, d, (const int8_t *)a->layer->k + head,
                            a->layer->k_scale + h * s->block_size, (const int8_t *)a->layer->v + head,
                            a->layer->v_scale + h * s->block_size, a->at + m * a->max_len, a->sat + m * a->max_len,
                            len, a->scores + item * n_rep * a->max_len, a->out + (m * s->n_heads + h * n_rep) * d);
            continue;
        }
        a->ops->attend(a->qkv + m * width + h * n_rep * d, n_rep, d, a->layer->k + head, a->layer->v + head,
                       a->at + m * a->max_len, len, a->scores + item * n_rep * a->max_len,
                       a->out + (m * s->n_heads + h * n_rep) * d);
    }
}

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
        kv < 1 || H % kv || s->block_size < 1 || s->max_blocks * s->block_size < s->max_seq)
        return EINVAL;
    int64_t max_len = 1;
    for (int64_t m = 0; m < M; m++) {
        if (pos[m] < -1 || pos[m] >= s->max_seq) return EINVAL;
        max_len = pos[m] + 1 > max_len ? pos[m] + 1 : max_len;
    }
    /* Each row's positions' offsets into the pool, from its block table (checked against the pool's size). */
    int64_t *at = malloc((size_t)(2 * M * max_len) * sizeof(int64_t)), *sat = at + M * max_len;
    if (!at) return ENOMEM;
    const int64_t bs = s->block_size;
    for (int64_t m = 0; m < M; m++) {
        const int64_t *table = s->tables + (first + m) * s->max_blocks;
        for (int64_t t = 0; t <= pos[m] || t == 0; t++) {
            const int64_t block = pos[m] < 0 ? 0 : table[t / bs];
            if (block < 0 || block >= s->blocks) {
                free(at);
                return EINVAL;
            }
            sat[m * max_len + t] = block * kv * bs + t % bs;
            at[m * max_len + t] = sat[m * max_len + t] * d;
        }
    }
    for (int64_t l = 0; l < s->n_layers; l++) {
        const qk_layer_t *L = layers + l;
        if (L->qkv.n != (H + 2 * kv) * d || L->qkv.k != dim || L->wo.n != dim || L->wo.k != H * d ||
            L->w13.n != 2 * hidden || L->w13.k != dim || L->w2.n != dim || L->w2.k != hidden)
            return EINVAL;
    }
    const ops_t *ops = ops_for(isa);
    const int64_t width = (H + 2 * kv) * d;
    const size_t halves = (size_t)(M * (dim + width + H * d + dim + 2 * hidden + hidden));
    uint16_t *mem = malloc(halves * 2 + (size_t)(M * H * max_len) * 4 + 64);
    if (!mem) {
        free(at);
        return ENOMEM;
    }
    uint16_t *xn = mem, *qkv = xn + M * dim, *att = qkv + M * width, *o = att + M * H * d, *gu = o + M * dim;
    uint16_t *hb = gu + M * 2 * hidden;
    float *scores = (float *)(((uintptr_t)(hb + M * hidden) + 63) & ~(uintptr_t)63);
    int rc = 0;
    for (int64_t l = 0; l < s->n_layers && !rc; l++) {
        const qk_layer_t *L = layers + l;
        for (int64_t m = 0; m < M; m++) ops->rmsnorm(x + m * dim, L->attn_norm, dim, s->eps, xn + m * dim);
        if ((rc = linear(&L->qkv, threads, xn, M, qkv))) break;
        for (int64_t m = 0; m < M; m++) {
            uint16_t *q = qkv + m * width, *k = q + H * d, *v = k + kv * d;
            const int64_t p = pos[m] < 0 ? 0 : pos[m];
            const float *table = s->rope + p * d;
            ops->rope(q, H, d, table);
            ops->rope(k, kv, d, table);
            const int64_t slot = at[m * max_len + p];
            if (L->k_scale) {  /* an int8 pool: each head's key and value quantized as they are stored */
                for (int64_t h = 0; h < kv; h++) {
                    const int64_t at_scale = sat[m * max_len + p] + h * bs;
                    quantize_head(k + h * d, d, (int8_t *)L->k + slot + h * bs * d, L->k_scale + at_scale);
                    quantize_head(v + h * d, d, (int8_t *)L->v + slot + h * bs * d, L->v_scale + at_scale);
                }
                continue;
            }
            for (int64_t h = 0; h < kv; h++) {
                memcpy(L->k + slot + h * bs * d, k + h * d, (size_t)d * 2);
                memcpy(L->v + slot + h * bs * d, v + h * d, (size_t)d * 2);
            }
        }
        att_t a = {.ops = ops, .model = s, .layer = L, .M = M, .first = first, .max_len = max_len, .pos = pos,
                   .at = at, .sat = sat, .qkv = qkv, .out = att, .scores = scores};
        int64_t parts = threads < 1 ? 1 : threads;
        if (parts > M * kv) parts = M * kv;
        pool_run(attend_part, &a, parts);
        if ((rc = linear(&L->wo, threads, att, M, o))) break;
        ops->add(x, o, M * dim);
        for (int64_t m = 0; m < M; m++) ops->rmsnorm(x + m * dim, L->ffn_norm, dim, s->eps, xn + m * dim);
        if ((rc = linear(&L->w13, threads, xn, M, gu))) break;
        ops->silu_mul(gu, M, hidden, hb);
        if ((rc = linear(&L->w2, threads, hb, M, o))) break;
        ops->add(x, o, M * dim);
    }
    free(mem);
    free(at);
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
    {NULL, 0}};
