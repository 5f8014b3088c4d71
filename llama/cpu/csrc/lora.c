/* Many LoRA adapters inside the fused decoding step (decode.c): after a projection's base product, each row with
 * an adapter gets its low-rank term x·A·B added to its output columns (the adapter's scale folded into B).
 *
 * The factors are the banks of llama/model/lora_bank.py, read in place: per part of a projection (wq, wk, wv of
 * the fused wqkv; w1, w3 of w13) A is (in, slots, rank) and B (slots, rank, out), bfloat16. Each row names its
 * slot (-1: none). Rows are ordered by slot, so that each slot's factors are read from memory once per step
 * however many rows use them (what punica's BGMV gather does on a GPU), and only the slots in use are read.
 *
 * The arithmetic is the layers' path's (lora_bank.LoraBank.add in bfloat16): h = x·A summed in float32 and
 * rounded to bfloat16, t = h·B likewise, y = bf16(y + t). Each row's sums run in a fixed order whatever its
 * neighbours, so a row's result does not depend on which rows share the step (deterministic mode).
 *
 * Work is split between the pool's threads twice per projection: first (part, group of rows of one slot) for
 * x·A, then groups of COLS output columns for h·B. */

#include "common.h"

#define LORA_MAX_RANK 64
#define LORA_MAX_PARTS 3
#define GROUP 8   /* rows of one slot that share each read of A */
#define COLS 64   /* output columns per item of the second product */
#define ACHUNK 32 /* inputs of A widened to float32 at a time */

/* The structures the Python side fills (llama/model/fused_lora.py mirrors them with ctypes). */
typedef struct {
    const uint16_t *a;          /* (in, slots, rank) */
    const uint16_t *b;          /* (slots, rank, out), the scale folded in */
    int64_t in, out, first;     /* input features, output columns, first output column in the projection */
} qk_lora_part_t;

typedef struct {
    int64_t parts;              /* 0 (no adapter on this projection) to LORA_MAX_PARTS */
    qk_lora_part_t part[LORA_MAX_PARTS];
} qk_lora_proj_t;

struct qk_lora {
    int64_t rank, slots, n_layers;
    const int32_t *row_slot;    /* each row's slot, -1: none */
    const qk_lora_proj_t *projs; /* n_layers x LORA_PROJS, in the order of the enum in common.h */
};

#define INLINE static inline __attribute__((always_inline))

/* acc[k][0..R) = sum over i of x_k[i] * A[i][0..R) (a: row i at a + i * stride), for g rows. */
INLINE void xa_body(const uint16_t *const *xs, int64_t g, const uint16_t *a, int64_t stride, int64_t in, int64_t R,
                    float *acc) {
    float af[ACHUNK * LORA_MAX_RANK];
    for (int64_t k = 0; k < g * R; k++) acc[k] = 0.0f;
    for (int64_t i0 = 0; i0 < in; i0 += ACHUNK) {
        const int64_t n = in - i0 < ACHUNK ? in - i0 : ACHUNK;
        for (int64_t i = 0; i < n; i++)
            for (int64_t r = 0; r < R; r++) af[i * R + r] = bf16_to_f32(a[(i0 + i) * stride + r]);
        for (int64_t k = 0; k < g; k++) {
            float *h = acc + k * R;
            const uint16_t *x = xs[k] + i0;
            for (int64_t i = 0; i < n; i++) {
                const float v = bf16_to_f32(x[i]);
                for (int64_t r = 0; r < R; r++) h[r] += v * af[i * R + r];
            }
        }
    }
}

/* y_k[c] = bf16(y_k[c] + bf16(sum over r of h_k[r] * B[r][c])) for columns c0..c0+n (n <= COLS), g rows. */
INLINE void hb_body(const float *const *hs, uint16_t *const *ys, int64_t g, const uint16_t *b, int64_t out,
                    int64_t R, int64_t n) {
    float bf[COLS];
    for (int64_t k = 0; k < g; k++) {
        float t[COLS] = {0};
        const float *h = hs[k];
        for (int64_t r = 0; r < R; r++) {
            for (int64_t c = 0; c < n; c++) bf[c] = bf16_to_f32(b[r * out + c]);
            const float v = h[r];
            for (int64_t c = 0; c < n; c++) t[c] += v * bf[c];
        }
        uint16_t *y = ys[k];
        for (int64_t c = 0; c < n; c++) y[c] = f32_to_bf16(bf16_to_f32(y[c]) + bf16_to_f32(f32_to_bf16(t[c])));
    }
}

typedef struct {
    void (*xa)(const uint16_t *const *, int64_t, const uint16_t *, int64_t, int64_t, int64_t, float *);
    void (*hb)(const float *const *, uint16_t *const *, int64_t, const uint16_t *, int64_t, int64_t, int64_t);
} lora_ops_t;

#define DEFINE_LORA_OPS(name, attr)                                                                              \
    attr static void xa_##name(const uint16_t *const *xs, int64_t g, const uint16_t *a, int64_t stride,          \
                               int64_t in, int64_t R, float *acc) {                                              \
        xa_body(xs, g, a, stride, in, R, acc);                                                                   \
    }                                                                                                            \
    attr static void hb_##name(const float *const *hs, uint16_t *const *ys, int64_t g, const uint16_t *b,        \
                               int64_t out, int64_t R, int64_t n) {                                              \
        hb_body(hs, ys, g, b, out, R, n);                                                                        \
    }                                                                                                            \
    static const lora_ops_t lora_ops_##name = {xa_##name, hb_##name};

DEFINE_LORA_OPS(scalar, )
#if QK_X86
DEFINE_LORA_OPS(avx2, __attribute__((target(AVX2))))

/* AVX-512: the same sums in the same order per row, 16 rank lanes (x·A) or 16 columns (h·B) per register, up to
 * GROUP rows' sums held in registers while each A or B line is loaded once. A rank that is not a multiple of 16
 * reads its last lanes masked (zeros). */

__attribute__((target(AVX512))) static inline __m512 widen16(const uint16_t *p, __mmask16 keep) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, p)), 16));
}

__attribute__((target(AVX512))) static inline __m512 round16(__m512 v) {  /* to bfloat16 and back (finite) */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

/* The bodies take the group size g as a constant (one copy each for g = 1..GROUP, see below), so that each row's
 * sums stay in registers. */
#define AVX512_INLINE __attribute__((target(AVX512), always_inline)) static inline

AVX512_INLINE void xa_rows(const uint16_t *const *xs, const int g, const uint16_t *a, int64_t stride, int64_t in,
                           int64_t R, float *acc) {
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
        const __mmask16 keep = R - r0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (R - r0)) - 1);
        __m512 h[GROUP];
        for (int k = 0; k < g; k++) h[k] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i++) {
            const __m512 av = widen16(a + i * stride + r0, keep);
            for (int k = 0; k < g; k++) h[k] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32(xs[k][i])), av, h[k]);
        }
        for (int k = 0; k < g; k++) _mm512_mask_storeu_ps(acc + k * R + r0, keep, h[k]);
    }
}

AVX512_INLINE void hb_rows(const float *const *hs, uint16_t *const *ys, const int g, const uint16_t *b, int64_t out,
                           int64_t R, int64_t n) {
    for (int64_t c0 = 0; c0 < n; c0 += 32) {
        const int64_t left = n - c0;
        const __mmask16 k0 = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __mmask16 k1 = left >= 32 ? (__mmask16)0xffff : (left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1));
        __m512 t0[GROUP], t1[GROUP];
        for (int k = 0; k < g; k++) t0[k] = t1[k] = _mm512_setzero_ps();
        for (int64_t r = 0; r < R; r++) {
            const __m512 b0 = widen16(b + r * out + c0, k0), b1 = widen16(b + r * out + c0 + 16, k1);
            for (int k = 0; k < g; k++) {
                const __m512 v = _mm512_set1_ps(hs[k][r]);
                t0[k] = _mm512_fmadd_ps(v, b0, t0[k]);
                t1[k] = _mm512_fmadd_ps(v, b1, t1[k]);
            }
        }
        for (int k = 0; k < g; k++) {
            uint16_t *y = ys[k] + c0;
            const __m512 y0 = _mm512_add_ps(widen16(y, k0), round16(t0[k]));
            const __m512 y1 = _mm512_add_ps(widen16(y + 16, k1), round16(t1[k]));
            if (left >= 32) {
                store_bf16x16(y, y0);
                store_bf16x16(y + 16, y1);
            } else {
                uint16_t tmp[32];
                store_bf16x16(tmp, y0);
                store_bf16x16(tmp + 16, y1);
                memcpy(y, tmp, (size_t)left * 2);
            }
        }
    }
}

#define G_CASES(call) \
    switch (g) {     \
    case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; case 4: call(4); break; \
    case 5: call(5); break; case 6: call(6); break; case 7: call(7); break; default: call(8); break; }

__attribute__((target(AVX512))) static void xa_avx512v(const uint16_t *const *xs, int64_t g, const uint16_t *a,
                                                        int64_t stride, int64_t in, int64_t R, float *acc) {
#define XA(G) xa_rows(xs, G, a, stride, in, R, acc)
    G_CASES(XA)
#undef XA
}

__attribute__((target(AVX512))) static void hb_avx512v(const float *const *hs, uint16_t *const *ys, int64_t g,
                                                        const uint16_t *b, int64_t out, int64_t R, int64_t n) {
#define HB(G) hb_rows(hs, ys, G, b, out, R, n)
    G_CASES(HB)
#undef HB
}

static const lora_ops_t lora_ops_avx512 = {xa_avx512v, hb_avx512v};
#endif

static const lora_ops_t *lora_ops_for(int isa) { return QK_PICK_ISA(isa, lora_ops_scalar, lora_ops_avx2, lora_ops_avx512); }

typedef struct {
    const lora_ops_t *ops;
    const qk_lora_t *L;
    const qk_lora_proj_t *P;
    const uint16_t *x;
    uint16_t *y;
    int64_t width, n;      /* y's row length; rows with an adapter */
    const int64_t *order;  /* those rows, by slot */
    int64_t groups;        /* runs of at most GROUP rows of one slot in `order` */
    const int64_t *group_at; /* groups + 1 starts in `order` */
    float *h;              /* (parts, n, rank): x·A of each ordered row, rounded to bfloat16 */
    int64_t cols;          /* items of the second product: COLS-column pieces over all parts */
} lora_job_t;

static void xa_part(const void *ctx, int64_t part, int64_t parts) {
    const lora_job_t *j = (const lora_job_t *)ctx;
    const int64_t R = j->L->rank, S = j->L->slots;
    int64_t lo, hi;
    share(j->P->parts * j->groups, part, parts, &lo, &hi);
    for (int64_t item = lo; item < hi; item++) {
        const qk_lora_part_t *p = j->P->part + item / j->groups;
        const int64_t gi = item % j->groups, first = j->group_at[gi], g = j->group_at[gi + 1] - first;
        const int64_t slot = j->L->row_slot[j->order[first]];
        const uint16_t *xs[GROUP];
        for (int64_t k = 0; k < g; k++) xs[k] = j->x + j->order[first + k] * p->in;
        float *acc = j->h + ((item / j->groups) * j->n + first) * R;
        j->ops->xa(xs, g, p->a + slot * R, S * R, p->in, R, acc);
        for (int64_t k = 0; k < g * R; k++) acc[k] = bf16_to_f32(f32_to_bf16(acc[k]));
    }
}

static void hb_part(const void *ctx, int64_t part, int64_t parts) {
    const lora_job_t *j = (const lora_job_t *)ctx;
    const int64_t R = j->L->rank;
    int64_t lo, hi;
    share(j->cols, part, parts, &lo, &hi);
    for (int64_t item = lo; item < hi; item++) {
        int64_t p = 0, piece = item;  /* the part, and the piece within it */
        while (piece >= (j->P->part[p].out + COLS - 1) / COLS) piece -= (j->P->part[p++].out + COLS - 1) / COLS;
        const qk_lora_part_t *q = j->P->part + p;
        const int64_t c0 = piece * COLS;
        const int64_t n = q->out - c0 < COLS ? q->out - c0 : COLS;
        for (int64_t gi = 0; gi < j->groups; gi++) {
            const int64_t first = j->group_at[gi], g = j->group_at[gi + 1] - first;
            const int64_t slot = j->L->row_slot[j->order[first]];
            const float *hs[GROUP];
            uint16_t *ys[GROUP];
            for (int64_t k = 0; k < g; k++) {
                hs[k] = j->h + (p * j->n + first + k) * R;
                ys[k] = j->y + j->order[first + k] * j->width + q->first + c0;
            }
            j->ops->hb(hs, ys, g, q->b + slot * R * q->out + c0, q->out, R, n);
        }
    }
}

/* y (M x width, bfloat16) += each row's adapter term for projection `proj` of layer `layer`, x (M x in) being the
 * projection's input. Returns 0, EINVAL (a shape or slot out of range) or ENOMEM. */
int qk_lora_add(const qk_lora_t *L, int64_t layer, int proj, int threads, int isa, const uint16_t *x, int64_t M,
                uint16_t *y, int64_t width) {
    if (!L || layer < 0 || layer >= L->n_layers || proj < 0 || proj >= LORA_PROJS || L->rank < 1 ||
        L->rank > LORA_MAX_RANK || L->slots < 1)
        return EINVAL;
    const qk_lora_proj_t *P = L->projs + layer * LORA_PROJS + proj;
    if (P->parts < 0 || P->parts > LORA_MAX_PARTS) return EINVAL;
    for (int64_t p = 0; p < P->parts; p++) {
        const qk_lora_part_t *q = P->part + p;
        if (!q->a || !q->b || q->in < 1 || q->in != P->part[0].in || q->out < 1 || q->first < 0 ||
            q->first + q->out > width)
            return EINVAL;
    }
    int64_t n = 0;
    for (int64_t m = 0; m < M; m++) {
        if (L->row_slot[m] < -1 || L->row_slot[m] >= L->slots) return EINVAL;
        n += L->row_slot[m] >= 0;
    }
    if (!n || !P->parts) return 0;
    int64_t cols = 0;
    for (int64_t p = 0; p < P->parts; p++) cols += (P->part[p].out + COLS - 1) / COLS;
    /* one block: order (n), group starts (n + 1), h (parts x n x rank floats) */
    int64_t *order = malloc((size_t)(2 * n + 1) * sizeof(int64_t) + (size_t)(P->parts * n * L->rank) * sizeof(float));
    if (!order) return ENOMEM;
    int64_t *group_at = order + n, groups = 0, k = 0;
    for (int64_t s = 0; s < L->slots; s++) {  /* a counting pass per slot: M is small */
        int64_t run = 0;
        for (int64_t m = 0; m < M; m++)
            if (L->row_slot[m] == s) {
                if (run % GROUP == 0) group_at[groups++] = k;
                order[k++] = m;
                run++;
            }
    }
    group_at[groups] = k;
    lora_job_t j = {.ops = lora_ops_for(isa), .L = L, .P = P, .x = x, .y = y, .width = width, .n = n,
                    .order = order, .groups = groups, .group_at = group_at, .h = (float *)(group_at + n + 1),
                    .cols = cols};
    const int64_t t = threads < 1 ? 1 : threads;
    pool_run(xa_part, &j, t < P->parts * groups ? t : P->parts * groups);
    pool_run(hb_part, &j, t < cols ? t : cols);
    free(order);
    return 0;
}

/* --- the interface's numbers and layouts, read and checked by the Python side at load ------------------------- */

#define SIZE(T) {"sizeof." #T, sizeof(T)}
#define FIELD(T, f) {#T "." #f, offsetof(T, f)}

const qk_const_t qk_lora_constants[] = {
    {"lora.max_rank", LORA_MAX_RANK}, {"lora.max_parts", LORA_MAX_PARTS}, {"lora.projs", LORA_PROJS},
    SIZE(qk_lora_part_t), FIELD(qk_lora_part_t, a), FIELD(qk_lora_part_t, b), FIELD(qk_lora_part_t, in),
    FIELD(qk_lora_part_t, out), FIELD(qk_lora_part_t, first),
    SIZE(qk_lora_proj_t), FIELD(qk_lora_proj_t, parts), FIELD(qk_lora_proj_t, part),
    SIZE(qk_lora_t), FIELD(qk_lora_t, rank), FIELD(qk_lora_t, slots), FIELD(qk_lora_t, n_layers),
    FIELD(qk_lora_t, row_slot), FIELD(qk_lora_t, projs),
    {NULL, 0}};
