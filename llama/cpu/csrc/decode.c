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
    const qk_lora_t *lora;  /* LoRA adapters' factors and each row's slot (lora.c); NULL: no row has one */
} qk_model_t;

/* --- the operators, written once, compiled for each instruction set ------------------------------------------ */

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

/* The sum and the maximum of 16 floats, as trees of vector operations (a float reduction is only vectorized so). */
INLINE float hsum_body(float *acc) {
    for (int l = 0; l < 8; l++) acc[l] += acc[l + 8];
    for (int l = 0; l < 4; l++) acc[l] += acc[l + 4];
    for (int l = 0; l < 2; l++) acc[l] += acc[l + 2];
    return acc[0] + acc[1];
}

INLINE float hmax_body(const float *x) {
    float m[LANES / 2];
    for (int l = 0; l < 8; l++) m[l] = x[l] > x[l + 8] ? x[l] : x[l + 8];
    for (int l = 0; l < 4; l++) m[l] = m[l] > m[l + 4] ? m[l] : m[l + 4];
    for (int l = 0; l < 2; l++) m[l] = m[l] > m[l + 2] ? m[l] : m[l + 2];
    return m[0] > m[1] ? m[0] : m[1];
}

/* s[t] = scale * (q . k_t) for the n <= 16 keys k (n x d floats); s[n..15] = -infinity. */
INLINE void dots_body(const float *q, const float *k, int64_t n, int64_t d, float scale, float *s) {
    for (int64_t t = 0; t < LANES; t++) {
        float acc[LANES] = {0};
        for (int64_t i = 0; t < n && i < d; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += q[i + l] * k[t * d + i + l];
        s[t] = t < n ? hsum_body(acc) * scale : -INFINITY;
    }
}

#if QK_X86
/* dots_body in AVX-512: the 16 dot products' vectors are summed together by a transposing tree of adds. */
__attribute__((target(AVX512))) static inline void dots_avx512(const float *q, const float *k, int64_t n, int64_t d,
                                                              float scale, float *s) {
    __m512 v[LANES], w[8], x[4], y[2];
    for (int64_t t = 0; t < LANES; t++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; t < n && i < d; i += LANES)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + t * d + i), acc);
        v[t] = acc;
    }
    for (int i = 0; i < 8; i++)  /* per 128 bits: v[2i]'s lanes 0+2, v[2i+1]'s 0+2, v[2i]'s 1+3, v[2i+1]'s 1+3 */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128 bits: the sums of v[4i], v[4i+1], v[4i+2], v[4i+3] */
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)  /* the 128-bit parts added pairwise, then again */
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __mmask16 live = (__mmask16)((1u << n) - 1u);
    const __m512 scaled = _mm512_mul_ps(sums, _mm512_set1_ps(scale));
    _mm512_storeu_ps(s, _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), scaled));
}
#endif

/* o (n_rep x d) += sum_t p[r * 16 + t] v_t over the n <= 16 values v (n x d floats), t in order. */
INLINE void mix_body(const float *p, int64_t n_rep, const float *v, int64_t n, int64_t d, float *o) {
    for (int64_t r = 0; r < n_rep; r++)
        for (int64_t t = 0; t < n; t++) {
            const float w = p[r * LANES + t];
            for (int64_t i = 0; i < d; i += LANES)
                for (int l = 0; l < LANES; l++) o[r * d + i + l] += w * v[t * d + i + l];
        }
}

#if QK_X86
/* mix_body in AVX-512, each head's sums held in registers over the 16 values (the same order of additions). */
__attribute__((target(AVX512))) static inline void mix_avx512(const float *p, int64_t n_rep, const float *v, int64_t n,
                                                             int64_t d, float *o) {
    for (int64_t r = 0; r < n_rep; r++) {
        float *out = o + r * d;
        int64_t i = 0;
        for (; i + 4 * LANES <= d; i += 4 * LANES) {
            __m512 a0 = _mm512_loadu_ps(out + i), a1 = _mm512_loadu_ps(out + i + 16);
            __m512 a2 = _mm512_loadu_ps(out + i + 32), a3 = _mm512_loadu_ps(out + i + 48);
            for (int64_t t = 0; t < n; t++) {
                const __m512 w = _mm512_set1_ps(p[r * LANES + t]);
                const float *x = v + t * d + i;
                a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x), a0);
                a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16), a1);
                a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 32), a2);
                a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 48), a3);
            }
            _mm512_storeu_ps(out + i, a0), _mm512_storeu_ps(out + i + 16, a1);
            _mm512_storeu_ps(out + i + 32, a2), _mm512_storeu_ps(out + i + 48, a3);
        }
        for (; i < d; i += LANES) {
            __m512 a = _mm512_loadu_ps(out + i);
            for (int64_t t = 0; t < n; t++)
                a = _mm512_fmadd_ps(_mm512_set1_ps(p[r * LANES + t]), _mm512_loadu_ps(v + t * d + i), a);
            _mm512_storeu_ps(out + i, a);
        }
    }
}
#endif

typedef void (*dots_fn)(const float *, const float *, int64_t, int64_t, float, float *);
typedef void (*mix_fn)(const float *, int64_t, const float *, int64_t, int64_t, float *);

/* n_rep query heads (q: n_rep x d, bfloat16) over one KV head's positions lo..hi-1 of a row (lo a multiple of
 * bs, bs of 16): position t's key at keys + table[t / bs] * stride + (t % bs) * d, its value likewise; bfloat16,
 * or with kscale (an int8 pool) int8 codes whose scales are at kscale + table[t / bs] * (stride / d) + t % bs
 * (vscale likewise), dequantized in float32 as each 16 positions are read. One pass
 * over the positions, 16 at a time, their keys and values read once for all n_rep heads, with a running maximum
 * (the softmax's rescaling when it grows): the cost is the positions held, and no scratch grows with them.
 * Writes the piece's partial result: o (n_rep x d) = sum_t e^(s_t - top) v_t, top[r] = max_t s_t,
 * sum[r] = sum_t e^(s_t - top), for the scores s_t = q_r . k_t / sqrt(d). */
INLINE void load16(const void *x, const uint16_t *scale, int64_t at, int64_t n, int64_t d, float *f) {
    if (!scale) {
        const uint16_t *h = (const uint16_t *)x + at;
        for (int64_t i = 0; i < n * d; i++) f[i] = bf(h[i]);
        return;
    }
    const int8_t *c = (const int8_t *)x + at;
    for (int64_t t = 0; t < n; t++) {
        const float sc = bf(scale[t]);
        for (int64_t i = 0; i < d; i++) f[t * d + i] = (float)c[t * d + i] * sc;
    }
}

INLINE void attend_body(const uint16_t *q, int64_t n_rep, int64_t d, int64_t bs, const void *keys,
                        const void *values, const uint16_t *kscale, const uint16_t *vscale, int64_t stride,
                        const int64_t *table, int64_t lo, int64_t hi, float *o, float *top, float *sum,
                        dots_fn dots, mix_fn mix) {
    const float scale = 1.0f / sqrtf((float)d);
    float qf[n_rep * d], s[n_rep * LANES], f[LANES * MAX_HEAD_DIM];  /* (VLAs: at most n_heads * head_dim) */
    for (int64_t i = 0; i < n_rep * d; i++) qf[i] = bf(q[i]);
    for (int64_t i = 0; i < n_rep * d; i++) o[i] = 0.0f;
    for (int64_t r = 0; r < n_rep; r++) top[r] = -INFINITY, sum[r] = 0.0f;
    for (int64_t t0 = lo; t0 < hi; t0 += LANES) {
        const int64_t n = hi - t0 < LANES ? hi - t0 : LANES, at = table[t0 / bs] * stride + (t0 % bs) * d;
        const int64_t sat = at / d;  /* the scales' offset (an int8 pool) */
        load16(keys, kscale ? kscale + sat : NULL, at, n, d, f);
        for (int64_t r = 0; r < n_rep; r++) dots(qf + r * d, f, n, d, scale, s + r * LANES);
        for (int64_t r = 0; r < n_rep; r++) {
            float *sr = s + r * LANES, *orow = o + r * d;
            const float m = hmax_body(sr);
            if (m > top[r]) {  /* a new maximum: what was summed so far is rescaled to it */
                const float c = top[r] == -INFINITY ? 0.0f : exp_poly(top[r] - m);
                sum[r] *= c;
                for (int64_t i = 0; i < d; i++) orow[i] *= c;
                top[r] = m;
            }
            float p[LANES];
            for (int l = 0; l < LANES; l++) sr[l] = p[l] = sr[l] == -INFINITY ? 0.0f : exp_poly(sr[l] - top[r]);
            sum[r] += hsum_body(p);
        }
        load16(values, vscale ? vscale + sat : NULL, at, n, d, f);
        mix(s, n_rep, f, n, d, o);
    }
}

typedef struct {
    void (*rmsnorm)(const uint16_t *, const uint16_t *, int64_t, float, uint16_t *);
    void (*add)(uint16_t *, const uint16_t *, int64_t);
    void (*silu_mul)(const uint16_t *, int64_t, int64_t, uint16_t *);
    void (*rope)(uint16_t *, int64_t, int64_t, const float *);
    void (*attend)(const uint16_t *, int64_t, int64_t, int64_t, const void *, const void *, const uint16_t *,
                   const uint16_t *, int64_t, const int64_t *, int64_t, int64_t, float *, float *, float *);
} ops_t;

#define DEFINE_OPS(name, attr, dots, mix)                                                                       \
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
    attr __attribute__((unused)) static void plain_dots_##name(const float *q, const float *k, int64_t n,     \
                                                               int64_t d, float scale, float *s) {             \
        dots_body(q, k, n, d, scale, s);                                                                        \
    }                                                                                                           \
    attr __attribute__((unused)) static void plain_mix_##name(const float *p, int64_t n_rep, const float *v,     \
                                                              int64_t n, int64_t d, float *o) {                \
        mix_body(p, n_rep, v, n, d, o);                                                                         \
    }                                                                                                           \
    attr static void attend_##name(const uint16_t *q, int64_t n_rep, int64_t d, int64_t bs, const void *k,      \
                                   const void *v, const uint16_t *ks, const uint16_t *vs, int64_t stride,       \
                                   const int64_t *table, int64_t lo, int64_t hi, float *o, float *top,          \
                                   float *sum) {                                                                \
        attend_body(q, n_rep, d, bs, k, v, ks, vs, stride, table, lo, hi, o, top, sum, dots, mix);              \
    }                                                                                                           \
    static const ops_t ops_##name = {rmsnorm_##name, add_##name, silu_mul_##name, rope_##name, attend_##name};

DEFINE_OPS(scalar, , plain_dots_scalar, plain_mix_scalar)
#if QK_X86
DEFINE_OPS(avx2, __attribute__((target(AVX2))), plain_dots_avx2, plain_mix_avx2)
DEFINE_OPS(avx512, __attribute__((target(AVX512))), dots_avx512, mix_avx512)
#endif

static const ops_t *ops_for(int isa) { return QK_PICK_ISA(isa, ops_scalar, ops_avx2, ops_avx512); }

/* --- attention, split over the pool's threads by (row, KV head, piece of PIECE positions) --------------------- */

/* Positions of a row that one task attends over (a multiple of the block size). A long row's pieces run on all
 * threads and their partial results are merged in order, so a row's arithmetic depends on its own length only:
 * not on the batch, the other rows or the thread count. */
#define PIECE 1024

typedef struct {
    int64_t len, start;    /* positions the row attends over; its first task (it has kv * pieces(len)) */
    const int64_t *table;  /* its block table (an idle row: the null block's) */
} row_t;

typedef struct {
    const ops_t *ops;
    const qk_model_t *model;
    const qk_layer_t *layer;
    int64_t M, items;
    const row_t *rows;      /* M + 1 (the last: start = items) */
    const uint16_t *qkv;    /* M x (n_heads + 2 kv_heads) x head_dim, q already rotated */
    float *part;            /* per task: o (n_rep x d), top (n_rep), sum (n_rep) */
} att_t;

static int64_t pieces(int64_t len) { return (len + PIECE - 1) / PIECE; }

static void attend_part(const void *ctx, int64_t part, int64_t parts) {
    const att_t *a = (const att_t *)ctx;
    const qk_model_t *s = a->model;
    const int64_t d = s->head_dim, kv = s->n_kv_heads, n_rep = s->n_heads / kv, width = (s->n_heads + 2 * kv) * d;
    const int64_t bs = s->block_size, each = n_rep * (d + 2);
    int64_t lo, hi, m = 0;
    share(a->items, part, parts, &lo, &hi);
    for (int64_t item = lo; item < hi; item++) {
        while (item >= a->rows[m + 1].start) m++;
        const row_t *row = a->rows + m;
        const int64_t n = pieces(row->len), h = (item - row->start) / n, c = (item - row->start) % n;
        const int64_t head = h * bs * d, end = (c + 1) * PIECE < row->len ? (c + 1) * PIECE : row->len;
        const qk_layer_t *L = a->layer;
        float *o = a->part + item * each;
        if (L->k_scale)  /* an int8 pool: one-byte codes, and the scales at h * bs */
            a->ops->attend(a->qkv + m * width + h * n_rep * d, n_rep, d, bs, (const int8_t *)L->k + head,
                           (const int8_t *)L->v + head, L->k_scale + h * bs, L->v_scale + h * bs, kv * bs * d,
                           row->table, c * PIECE, end, o, o + n_rep * d, o + n_rep * (d + 1));
        else
            a->ops->attend(a->qkv + m * width + h * n_rep * d, n_rep, d, bs, L->k + head, L->v + head, NULL, NULL,
                           kv * bs * d, row->table, c * PIECE, end, o, o + n_rep * d, o + n_rep * (d + 1));
    }
}

/* Row m's attention output (n_heads x d, bfloat16) from its tasks' partial results, merged piece by piece in order. */
static void merge_row(const att_t *a, int64_t m, uint16_t *out) {
    const qk_model_t *s = a->model;
    const int64_t d = s->head_dim, kv = s->n_kv_heads, n_rep = s->n_heads / kv, n = pieces(a->rows[m].len);
    const int64_t each = n_rep * (d + 2);
    for (int64_t h = 0; h < kv; h++)
        for (int64_t r = 0; r < n_rep; r++) {
            const float *first = a->part + (a->rows[m].start + h * n) * each;
            float top = -INFINITY, sum = 0.0f, acc[MAX_HEAD_DIM] = {0};
            for (int64_t c = 0; c < n; c++) {
                const float t = first[c * each + n_rep * d + r];
                top = t > top ? t : top;
            }
            for (int64_t c = 0; c < n; c++) {
                const float *o = first + c * each, w = exp_poly(o[n_rep * d + r] - top);  /* 1 for the top piece */
                sum += w * o[n_rep * (d + 1) + r];
                for (int64_t i = 0; i < d; i++) acc[i] += w * o[r * d + i];
            }
            const float inv = 1.0f / sum;
            for (int64_t i = 0; i < d; i++) out[(h * n_rep + r) * d + i] = f32_to_bf16(acc[i] * inv);
        }
}

/* One head's key or value (d bfloat16) as kv_int8.quantize stores it: s = bf16(max|x| / 127), codes
 * round(x / s) (ties to even) clamped to +-127; an all-zero vector gets codes 0. */
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
    const int64_t bs = s->block_size, n_rep = H / kv;
    for (int64_t m = 0; m < M; m++)
        if (pos[m] < -1 || pos[m] >= s->max_seq) return EINVAL;
    for (int64_t l = 0; l < s->n_layers; l++) {
        const qk_layer_t *L = layers + l;
        if (L->qkv.n != (H + 2 * kv) * d || L->qkv.k != dim || L->wo.n != dim || L->wo.k != H * d ||
            L->w13.n != 2 * hidden || L->w13.k != dim || L->w2.n != dim || L->w2.k != hidden)
            return EINVAL;
    }
    /* Each row's length, block table (its entries checked against the pool's size) and tasks. */
    static const int64_t null_table[1] = {0};
    row_t *rows = malloc((size_t)(M + 1) * sizeof(row_t));
    if (!rows) return ENOMEM;
    rows[0].start = 0;
    for (int64_t m = 0; m < M; m++) {
        const int64_t *table = s->tables + (first + m) * s->max_blocks;
        rows[m].len = pos[m] < 0 ? 1 : pos[m] + 1;
        rows[m].table = pos[m] < 0 ? null_table : table;
        rows[m + 1].start = rows[m].start + kv * pieces(rows[m].len);
        for (int64_t b = 0; pos[m] >= 0 && b <= pos[m] / bs; b++)
            if (table[b] < 0 || table[b] >= s->blocks) {
                free(rows);
                return EINVAL;
            }
    }
    const ops_t *ops = ops_for(isa);
    const int64_t width = (H + 2 * kv) * d, items = rows[M].start;
    const size_t halves = (size_t)(M * (dim + width + H * d + dim + 2 * hidden + hidden));
    uint16_t *mem = malloc(halves * 2 + (size_t)(items * n_rep * (d + 2)) * 4 + 64);
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
            const int64_t slot = (rows[m].table[p / bs] * kv * bs + p % bs) * d;
            if (L->k_scale) {  /* an int8 pool: each head's key and value quantized as they are stored */
                for (int64_t h = 0; h < kv; h++) {
                    const int64_t at_scale = slot / d + h * bs;
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
        att_t a = {.ops = ops, .model = s, .layer = L, .M = M, .items = items, .rows = rows, .qkv = qkv,
                   .part = part};
        int64_t parts = threads < 1 ? 1 : threads;
        if (parts > items) parts = items;
        pool_run(attend_part, &a, parts);
        for (int64_t m = 0; m < M; m++) merge_row(&a, m, att + m * H * d);
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
