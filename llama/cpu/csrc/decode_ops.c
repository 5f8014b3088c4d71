/* The operators of a token's layer in the fused decoding step (decode.c), written once as plain loops in lanes
 * of 16 and compiled for AVX-512, AVX2 and portable C (one table each, chosen at run time): RMSNorm, the residual
 * add, SiLU(gate) * up, and the rotary embedding. Each rounds its float32 result to bfloat16 once, as PyTorch's
 * bfloat16 operators do. */

#include "decode.h"

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
    static const ops_t ops_##name = {rmsnorm_##name, add_##name, silu_mul_##name, rope_##name};

DEFINE_OPS(scalar, )
#if QK_X86
DEFINE_OPS(avx2, __attribute__((target(AVX2))))
DEFINE_OPS(avx512, __attribute__((target(AVX512))))
#endif

const ops_t *qk_decode_ops(int isa) { return QK_PICK_ISA(isa, ops_scalar, ops_avx2, ops_avx512); }
