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
 * This file is the interface: the shapes, the packing, the activations' quantization and the split of a product
 * between threads. The loops: qint8.c (int8 tiles), qint4.c (int4 panels), qgemm.c (int8 GEMM, prefill),
 * qdequant.c (weights as floats); qlinear.h the layouts they share.
 *
 * Plain C, no Python or PyTorch headers: llama/cpu/qkernels.py compiles it at first use and calls it through ctypes.
 */

#include "qlinear.h"

const qk_const_t qk_qlinear_constants[] = {{"kind.int8", KIND_INT8}, {"kind.int4", KIND_INT4}, {"block", BLOCK},
                                           {"chunk", CHUNK}, {NULL, 0}};

/* --- the activations, quantized once per call ---------------------------------------------------------------- */

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

#if QK_X86
__attribute__((target(AVX2))) static void quantize_avx2(act_t *a, const void *x, int x_bf16, int64_t group) {
    quantize_body(a, x, x_bf16, group);
}

__attribute__((target(AVX512))) static void quantize_avx512(act_t *a, const void *x, int x_bf16, int64_t group) {
    quantize_body(a, x, x_bf16, group);
    for (int64_t j = 0; j < a->M * (a->K / CHUNK); j++)
        a->neg[j] = _cvtmask64_u64(_mm512_movepi8_mask(_mm512_loadu_si512(a->q + j * CHUNK)));
}
#endif

/* --- a product split between threads ---------------------------------------------------------------------- */

typedef struct {
    const job_t *j;
    uint8_t *scratch;  /* gemm_scratch_bytes per part */
} gemm_t;

static void gemm_part(const void *ctx, int64_t part, int64_t parts) {
    const gemm_t *gm = (const gemm_t *)ctx;
    const job_t *j = gm->j;
    int64_t lo, hi;
    share(panels_of(j->N), part, parts, &lo, &hi);
    if (lo >= hi) return;
    qk_int8_gemm(j, gm->scratch + part * gemm_scratch_bytes(j->K), lo, hi);
}

/* int8: tiles [t0, t1) for every activation row: a few tiles at a time (about 32 KiB, in the core's L1 or L2
 * cache) meet all M rows, so that the weights stream from memory once whatever M. */
static void run_tiles(const job_t *j, int64_t t0, int64_t t1) {
    const int64_t step = j->a->M == 1 ? t1 - t0 : (32768 / int8_tile_bytes(j->K) > 1 ? 32768 / int8_tile_bytes(j->K) : 1);
    for (int64_t t = t0; t < t1; t += step) {
        const int64_t end = t + step < t1 ? t + step : t1;
        for (int64_t m = 0; m < j->a->M; m++) qk_int8_tiles(j, m, t, end);
    }
}

static void linear_part(const void *ctx, int64_t part, int64_t parts) {
    const job_t *j = (const job_t *)ctx;
    int64_t lo, hi;
    share(j->kind == KIND_INT8 ? tiles_of(j->N) : panels_of(j->N), part, parts, &lo, &hi);
    if (lo >= hi) return;
    if (j->kind == KIND_INT8) run_tiles(j, lo, hi);
    else qk_int4_panels(j, lo, hi);
}

/* --- the interface ------------------------------------------------------------------------------------------- */

int qk_check_shape(int kind, int64_t K, int64_t group) {
    if (kind != KIND_INT8 && kind != KIND_INT4) return EINVAL;
    if (K < CHUNK || K % CHUNK) return EINVAL;
    if (kind == KIND_INT4 && (group != 32 && group != 64 && group != 128 && group != 256)) return EINVAL;
    if (kind == KIND_INT4 && K % group) return EINVAL;
    return 0;
}

/* Bytes of the packed form of an N x K weight (int4: in groups of `group`); -1 for a shape the kernels refuse. */
int64_t qk_packed_bytes(int kind, int64_t N, int64_t K, int64_t group) {
    if (qk_check_shape(kind, K, group) || N < 1) return -1;
    return kind == KIND_INT8 ? tiles_of(N) * int8_tile_bytes(K) : panels_of(N) * int4_panel_bytes(K, group);
}

/* int8 (N x K, row-major) into tiles; the padding rows are zeros. A code of -128 (which this library's
 * quantizer never writes) becomes -127: the kernels negate codes. */
int qk_pack_int8(const int8_t *src, uint8_t *dst, int64_t N, int64_t K) {
    if (qk_check_shape(KIND_INT8, K, 0) || N < 1) return EINVAL;
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
    if (qk_check_shape(KIND_INT4, K, group) || N < 1) return EINVAL;
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
    if (qk_check_shape(kind, K, group) || M < 1 || N < 1 || isa < 0 || isa > qk_best_isa()) return EINVAL;
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
