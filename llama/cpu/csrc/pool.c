/* The kernels' thread pool, and the CPU's instruction sets. */

#include "common.h"

/* --- the thread pool ------------------------------------------------------------------------------------------
 * Workers wait for a new generation number; after a call they keep checking for about SPIN_NS (yielding the core
 * to anything else runnable), since a decoding step makes its next call within microseconds, then sleep on a
 * condition variable. The caller's thread runs share 0 and then waits for the others. */

#define SPIN_NS 200000

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t call;     /* one call at a time uses the pool */
    pthread_t threads[MAX_THREADS];
    int workers, sleepers;
    unsigned long first_seen[MAX_THREADS];  /* the generation each worker was started at */
    atomic_ulong generation;
    atomic_int pending;
    task_fn fn;
    const void *ctx;
    int64_t parts;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .call = PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *worker(void *arg) {
    const int64_t id = (int64_t)(intptr_t)arg;  /* runs share id (1 ..) */
    unsigned long seen = pool.first_seen[id - 1];  /* not read here: the caller may have moved it on already */
    for (;;) {
        unsigned long g;
        int64_t start = now_ns();
        while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if (now_ns() - start < SPIN_NS) {
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            pool.sleepers++;
            while ((g = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pool.sleepers--;
            pthread_mutex_unlock(&pool.mu);
            break;
        }
        seen = g;
        if (id < pool.parts) pool.fn(pool.ctx, id, pool.parts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void pool_reset_after_fork(void) {  /* a forked child has no workers: start over */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&pool.call, NULL);
    pool.workers = pool.sleepers = 0;
    atomic_store(&pool.pending, 0);
}

int pool_run(task_fn fn, const void *ctx, int64_t parts) {
    static int registered;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    if (parts <= 1) {
        fn(ctx, 0, 1);
        return 0;
    }
    pthread_mutex_lock(&pool.call);
    if (!registered) {
        pthread_atfork(NULL, NULL, pool_reset_after_fork);
        registered = 1;
    }
    while (pool.workers < parts - 1) {
        pool.first_seen[pool.workers] = atomic_load(&pool.generation);
        if (pthread_create(&pool.threads[pool.workers], NULL, worker, (void *)(intptr_t)(pool.workers + 1))) break;
        pool.workers++;
    }
    if (parts > pool.workers + 1) parts = pool.workers + 1;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.parts = parts;
    atomic_store(&pool.pending, pool.workers);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    if (pool.sleepers) pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(ctx, 0, parts);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) sched_yield();
    pthread_mutex_unlock(&pool.call);
    return 0;
}

/* --- what this CPU runs, and what this build has ------------------------------------------------------------
 * The CPU's features are read in one place, on the Python side (llama/cpu/__init__.py), which tells the library
 * once after loading it (qk_set_cpu); until then the kernels take the portable C loops only. This file reports
 * what the build was compiled for (the constants below) and refuses an instruction set it lacks. */

static atomic_int cpu_isa = ISA_SCALAR, cpu_bf16 = 0;

/* The highest instruction set the kernels may use (ISA_*), and whether AVX-512 BF16 (vdpbf16ps, linear16.c)
 * runs. Returns 0, or EINVAL for one this build does not have. */
int qk_set_cpu(int isa, int bf16) {
    if (isa < ISA_SCALAR || isa > (QK_X86 ? ISA_AVX512_VNNI : ISA_SCALAR) || (bf16 && !QK_X86)) return EINVAL;
    atomic_store(&cpu_isa, isa);
    atomic_store(&cpu_bf16, bf16 != 0);
    return 0;
}

int qk_best_isa(void) { return atomic_load(&cpu_isa); }

int qk_has_avx512_bf16(void) { return atomic_load(&cpu_bf16); }

const qk_const_t qk_pool_constants[] = {
    {"abi_version", QK_ABI_VERSION}, {"isa.scalar", ISA_SCALAR}, {"isa.avx2", ISA_AVX2},
    {"isa.avx512_vnni", ISA_AVX512_VNNI}, {"built.x86", QK_X86}, {"max_threads", MAX_THREADS}, {"tile", TILE},
    {NULL, 0}};

/* Constant i of every file's table (the Python side reads them all at load): its name, and its value in *value;
 * NULL past the last. */
const char *qk_constant(int64_t i, int64_t *value) {
    static const qk_const_t *const tables[] = {qk_pool_constants, qk_qlinear_constants, qk_linear16_constants,
                                               qk_decode_constants, qk_lora_constants};
    for (size_t t = 0; t < sizeof tables / sizeof tables[0]; t++)
        for (const qk_const_t *c = tables[t]; c->name; c++)
            if (i-- == 0) {
                *value = c->value;
                return c->name;
            }
    return NULL;
}

/* --- a plain streaming read, the yardstick of the benchmarks -------------------------------------------------
 * Every byte of a buffer read once, split between the pool's threads as the kernels split their weights, with
 * the widest loads this CPU has and no arithmetic to speak of (an XOR per load): the bandwidth a kernel that
 * streams its weights could reach at best. Returns the XOR of the buffer's 64-bit words. */

typedef struct {
    const uint64_t *p;
    int64_t words;
    uint64_t out[MAX_THREADS];
} read_t;

static inline uint64_t xor_words(const uint64_t *p, int64_t n) {
    uint64_t acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] ^= p[i + l];
    for (; i < n; i++) acc[0] ^= p[i];
    return acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

#if QK_X86
__attribute__((target(AVX512))) static uint64_t xor_words_avx512(const uint64_t *p, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 8));
        a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 16));
        a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 24));
    }
    uint64_t lanes[8];
    _mm512_storeu_si512(lanes, _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
    return xor_words(lanes, 8) ^ xor_words(p + i, n - i);
}

__attribute__((target(AVX2))) static uint64_t xor_words_avx2(const uint64_t *p, int64_t n) {
    return xor_words(p, n);
}
#endif

static void read_part(const void *ctx, int64_t part, int64_t parts) {
    read_t *r = (read_t *)ctx;
    int64_t lo, hi;
    share(r->words, part, parts, &lo, &hi);
#if QK_X86
    const int isa = qk_best_isa();
    if (isa == ISA_AVX512_VNNI) { r->out[part] = xor_words_avx512(r->p + lo, hi - lo); return; }
    if (isa == ISA_AVX2) { r->out[part] = xor_words_avx2(r->p + lo, hi - lo); return; }
#endif
    r->out[part] = xor_words(r->p + lo, hi - lo);
}

uint64_t qk_read(int threads, const void *p, int64_t bytes) {
    read_t r = {.p = (const uint64_t *)p, .words = bytes / 8};
    int64_t parts = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    memset(r.out, 0, sizeof r.out);
    pool_run(read_part, &r, parts);
    uint64_t x = 0;
    for (int64_t i = 0; i < parts; i++) x ^= r.out[i];
    return x;
}
