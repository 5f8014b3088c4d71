/* The fused decoding step's attention (decode.c) over the paged cache (llama/model/kv_cache.py): the new keys and
 * values written into each row's blocks (bfloat16, or int8 codes with a scale per head and position), and each row
 * attending over its positions 0..pos. The loops are plain C in lanes of 16, compiled for AVX-512 (with its own
 * dot products and sums), AVX2 and portable C, and chosen at run time; the work is split over the pool's threads
 * by (row, KV head, piece of PIECE positions), whose partial results are merged in order. */

#include "decode.h"

/* The maximum of 16 floats, as a tree of vector operations. */
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

typedef void (*attend_fn)(const uint16_t *, int64_t, int64_t, int64_t, const void *, const void *, const uint16_t *,
                          const uint16_t *, int64_t, const int64_t *, int64_t, int64_t, float *, float *, float *);

#define DEFINE_ATTEND(name, attr, dots, mix)                                                                    \
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
    }

DEFINE_ATTEND(scalar, , plain_dots_scalar, plain_mix_scalar)
#if QK_X86
DEFINE_ATTEND(avx2, __attribute__((target(AVX2))), plain_dots_avx2, plain_mix_avx2)
DEFINE_ATTEND(avx512, __attribute__((target(AVX512))), dots_avx512, mix_avx512)
#endif

/* --- split over the pool's threads by (row, KV head, piece of PIECE positions) --------------------------------- */

typedef struct {
    attend_fn attend;
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
            a->attend(a->qkv + m * width + h * n_rep * d, n_rep, d, bs, (const int8_t *)L->k + head,
                      (const int8_t *)L->v + head, L->k_scale + h * bs, L->v_scale + h * bs, kv * bs * d, row->table,
                      c * PIECE, end, o, o + n_rep * d, o + n_rep * (d + 1));
        else
            a->attend(a->qkv + m * width + h * n_rep * d, n_rep, d, bs, L->k + head, L->v + head, NULL, NULL,
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

int qk_attention_rows(const qk_model_t *s, int64_t M, int64_t first, const int64_t *pos, row_t *rows) {
    static const int64_t null_table[1] = {0};
    rows[0].start = 0;
    for (int64_t m = 0; m < M; m++) {
        const int64_t *table = s->tables + (first + m) * s->max_blocks;
        rows[m].len = pos[m] < 0 ? 1 : pos[m] + 1;
        rows[m].table = pos[m] < 0 ? null_table : table;
        rows[m + 1].start = rows[m].start + s->n_kv_heads * pieces(rows[m].len);
        for (int64_t b = 0; pos[m] >= 0 && b <= pos[m] / s->block_size; b++)
            if (table[b] < 0 || table[b] >= s->blocks) return EINVAL;
    }
    return 0;
}

int64_t qk_attention_scratch(const qk_model_t *s, const row_t *rows, int64_t M) {
    return rows[M].start * (s->n_heads / s->n_kv_heads) * (s->head_dim + 2);
}

void qk_attention(int threads, int isa, const qk_model_t *s, const qk_layer_t *L, const row_t *rows, int64_t M,
                  const uint16_t *qkv, float *part, uint16_t *out) {
    att_t a = {.attend = *QK_PICK_ISA(isa, attend_scalar, attend_avx2, attend_avx512), .model = s, .layer = L,
               .M = M, .items = rows[M].start, .rows = rows, .qkv = qkv, .part = part};
    int64_t parts = threads < 1 ? 1 : threads;
    if (parts > a.items) parts = a.items;
    pool_run(attend_part, &a, parts);
    for (int64_t m = 0; m < M; m++) merge_row(&a, m, out + m * s->n_heads * s->head_dim);
}

/* --- the cache's writes ---------------------------------------------------------------------------------------- */

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

void qk_cache_write(const qk_model_t *s, const qk_layer_t *L, const int64_t *table, int64_t p, const uint16_t *k,
                    const uint16_t *v) {
    const int64_t d = s->head_dim, kv = s->n_kv_heads, bs = s->block_size;
    const int64_t slot = (table[p / bs] * kv * bs + p % bs) * d;
    if (L->k_scale) {  /* an int8 pool: each head's key and value quantized as they are stored */
        for (int64_t h = 0; h < kv; h++) {
            const int64_t at_scale = slot / d + h * bs;
            quantize_head(k + h * d, d, (int8_t *)L->k + slot + h * bs * d, L->k_scale + at_scale);
            quantize_head(v + h * d, d, (int8_t *)L->v + slot + h * bs * d, L->v_scale + at_scale);
        }
        return;
    }
    for (int64_t h = 0; h < kv; h++) {
        memcpy(L->k + slot + h * bs * d, k + h * d, (size_t)d * 2);
        memcpy(L->v + slot + h * bs * d, v + h * d, (size_t)d * 2);
    }
}
