/* cblas_sgemm for the products of LLM decoding and prefill on x86-64 CPUs (AVX2 + FMA).
 *
 * Preloaded ahead of OpenBLAS into the server (llmservice/cli.py builds and preloads it; see
 * inference/backends/cpu_blas.py), it takes over the matrix products mlx's CPU backend asks for
 * while decoding and prefilling, and hands every other call to the next cblas_sgemm in the process
 * (OpenBLAS):
 *
 * - A few rows times a weight matrix (`x @ W.T`: row-major, A not transposed, B transposed, up to
 *   MAX_ROWS rows). OpenBLAS packs the whole weight matrix into its panel layout on every call,
 *   which for 1-16 rows costs more than the product: a SmolLM2-135M decode step at batch 8 spent
 *   64 ms in the layers' products, against 31.5 ms here (docs/benchmarks.md).
 * - Attention's per-head products at decode (`q @ k.T`, `p @ v`: one row against the cache),
 *   thousands per step, where OpenBLAS's per-call overhead dominates.
 * - A prefill's `x @ W.T` with up to PANEL_MAX_ROWS rows, through 6x16 register tiles over packed
 *   panels of W (below).
 *
 * The weight matrix is read once, straight from memory, in blocks of 3 rows that stay in L1 while
 * every row of A goes over them; large products are split by columns across a small pool of
 * threads (the caller plus LLM_SERVICE_SGEMM_THREADS - 1 helpers, default: online CPUs, at most 8),
 * in chunks claimed one at a time, so a helper that is not running never holds the caller up.
 * Helpers spin briefly after a product, since the next one often follows within microseconds,
 * then poll with sched_yield (giving the core to any thread that wants it) for about 1.6 ms, then
 * sleep on a futex.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
enum { MAX_ROWS = 16, PANEL_MAX_ROWS = 256, MAX_THREADS = 8 };
enum { NT_SKINNY, NN_SKINNY, NT_PANELS }; /* how a product is computed (struct job's kind) */
/* Products reading fewer weights than this stay on the calling thread (waking helpers costs more). */
static const size_t PARALLEL_MIN = (size_t)1 << 17;
/* Panel products (prefill) with fewer multiply-adds than this stay on the calling thread. */
static const size_t PANEL_PARALLEL_MIN = (size_t)1 << 21;
/* Helpers spin this many TSC cycles (about 100 us) for the next product before sleeping: a decode
 * step's products follow each other within that, so the helper rarely pays a futex wake-up; between
 * steps it sleeps. (2^15 cycles measured slower at 4-16 streams, docs/benchmarks.md.) */
static const uint64_t SPIN_CYCLES = (uint64_t)1 << 18;
/* Then they poll with sched_yield up to this many cycles (about 1.6 ms), as OpenBLAS's threads do: a
 * prefill's products are a millisecond or two apart (NumPy's attention and SwiGLU between them), and a
 * helper asleep on the futex joined each one late. Measured on a whole prefill of 4 prompts, panels
 * and this: 326 ms against OpenBLAS's 373; panels with the futex after 2^18 cycles: no faster than
 * OpenBLAS (docs/benchmarks.md). A batch-16 decode step: 107-116 ms against 124-129. */
static const uint64_t YIELD_CYCLES = (uint64_t)1 << 22;

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void put(float *c, float v, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * v : alpha * v + beta * *c;
}

static inline void put8(float *c, __m256 v, float alpha, float beta) {
    v = _mm256_mul_ps(v, _mm256_set1_ps(alpha));
    if (beta != 0.0f) v = _mm256_fmadd_ps(_mm256_loadu_ps(c), _mm256_set1_ps(beta), v);
    _mm256_storeu_ps(c, v);
}

static inline float dot_tail(const float *a, const float *b, int k, int K) {
    float s = 0.0f;
    for (; k < K; k++) s += a[k] * b[k];
    return s;
}

/* One register tile of the NT product: rows m..m+RM-1 of A against rows n..n+RN-1 of B (RN <= 3),
 * RM x RN accumulators of 8 lanes along k, so each loaded vector of A or B feeds several FMAs. */
static inline __attribute__((always_inline)) void nt_tile(int PREFETCH, int RM, int RN, int K, float alpha,
                                                          const float *A, int lda, const float *B,
                                                          int ldb, float beta, float *C, int ldc) {
    const int K8 = K & ~7;
    __m256 acc[4][3];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (int k = 0; k < K8; k += 8) {
        __m256 w[3];
        for (int j = 0; j < RN; j++) w[j] = _mm256_loadu_ps(B + (size_t)j * ldb + k);
        if (PREFETCH && (k & 15) == 0) /* the next block's rows, while this one computes */
            for (int j = 0; j < 3; j++)
                _mm_prefetch((const char *)(B + (size_t)(3 + j) * ldb + k), _MM_HINT_T0);
        for (int i = 0; i < RM; i++) {
            const __m256 x = _mm256_loadu_ps(A + (size_t)i * lda + k);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm256_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++)
            put(C + (size_t)i * ldc + j,
                hsum(acc[i][j]) + dot_tail(A + (size_t)i * lda, B + (size_t)j * ldb, K8, K), alpha,
                beta);
}

#define NT_TILE(RM, RN)                                                                           \
    static void nt_tile_##RM##_##RN(int K, float alpha, const float *A, int lda, const float *B,   \
                                    int ldb, float beta, float *C, int ldc) {                     \
        nt_tile(0, RM, RN, K, alpha, A, lda, B, ldb, beta, C, ldc);                               \
    }                                                                                             \
    static void nt_tile_p_##RM##_##RN(int K, float alpha, const float *A, int lda,                \
                                      const float *B, int ldb, float beta, float *C, int ldc) {   \
        nt_tile(1, RM, RN, K, alpha, A, lda, B, ldb, beta, C, ldc);                               \
    }
NT_TILE(1, 1) NT_TILE(1, 2) NT_TILE(1, 3) NT_TILE(2, 1) NT_TILE(2, 2) NT_TILE(2, 3)
NT_TILE(3, 1) NT_TILE(3, 2) NT_TILE(3, 3) NT_TILE(4, 1) NT_TILE(4, 2) NT_TILE(4, 3)

typedef void (*tile_fn)(int, float, const float *, int, const float *, int, float, float *, int);
static const tile_fn nt_tiles[4][3] = {
    {nt_tile_1_1, nt_tile_1_2, nt_tile_1_3},
    {nt_tile_2_1, nt_tile_2_2, nt_tile_2_3},
    {nt_tile_3_1, nt_tile_3_2, nt_tile_3_3},
    {nt_tile_4_1, nt_tile_4_2, nt_tile_4_3},
};
static const tile_fn nt_tiles_prefetch[4][3] = {
    {nt_tile_p_1_1, nt_tile_p_1_2, nt_tile_p_1_3},
    {nt_tile_p_2_1, nt_tile_p_2_2, nt_tile_p_2_3},
    {nt_tile_p_3_1, nt_tile_p_3_2, nt_tile_p_3_3},
    {nt_tile_p_4_1, nt_tile_p_4_2, nt_tile_p_4_3},
};

/* C[m][n] = alpha * sum_k A[m][k] * B[n][k] + beta * C[m][n], for columns n in [n0, n1): each block
 * of 3 rows of B comes from memory once and serves every row of A from L1. */
static void nt_cols(int M, int n0, int n1, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    for (int n = n0; n < n1; n += 3) {
        const int rn = n1 - n < 3 ? n1 - n : 3;
        const int last = n + 3 >= n1; /* no next block to prefetch */
        for (int m = 0; m < M; m += 4) {
            const int rm = M - m < 4 ? M - m : 4;
            (m == 0 && !last ? nt_tiles_prefetch : nt_tiles)[rm - 1][rn - 1](
                K, alpha, A + (size_t)m * lda, lda, B + (size_t)n * ldb, ldb, beta,
                C + (size_t)m * ldc + n, ldc);
        }
    }
}

/* Rows m..m+RM-1 (RM <= 2) of the NN product for 32 columns from n: RM x 4 accumulators of 8 lanes
 * along n, A's entries broadcast. */
static inline __attribute__((always_inline)) void nn_block(int RM, int K, float alpha,
                                                           const float *A, int lda, const float *B,
                                                           int ldb, float beta, float *C, int ldc) {
    __m256 acc[2][4];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const float *b = B + (size_t)k * ldb;
        __m256 x[2];
        for (int i = 0; i < RM; i++) x[i] = _mm256_broadcast_ss(A + (size_t)i * lda + k);
        for (int j = 0; j < 4; j++) {
            const __m256 w = _mm256_loadu_ps(b + 8 * j);
            for (int i = 0; i < RM; i++) acc[i][j] = _mm256_fmadd_ps(x[i], w, acc[i][j]);
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < 4; j++) put8(C + (size_t)i * ldc + 8 * j, acc[i][j], alpha, beta);
}

/* C[m][n] = alpha * sum_k A[m][k] * B[k][n] + beta * C[m][n], for columns n in [n0, n1). */
static void nn_cols(int M, int n0, int n1, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    int n = n0;
    for (; n + 32 <= n1; n += 32) {
        int m = 0;
        for (; m + 2 <= M; m += 2)
            nn_block(2, K, alpha, A + (size_t)m * lda, lda, B + n, ldb, beta,
                     C + (size_t)m * ldc + n, ldc);
        if (m < M)
            nn_block(1, K, alpha, A + (size_t)m * lda, lda, B + n, ldb, beta,
                     C + (size_t)m * ldc + n, ldc);
    }
    for (; n + 8 <= n1; n += 8) {
        for (int m = 0; m < M; m++) {
            const float *a0 = A + (size_t)m * lda;
            __m256 c = _mm256_setzero_ps();
            for (int k = 0; k < K; k++)
                c = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + k),
                                    _mm256_loadu_ps(B + (size_t)k * ldb + n), c);
            put8(C + (size_t)m * ldc + n, c, alpha, beta);
        }
    }
    for (; n < n1; n++) {
        for (int m = 0; m < M; m++) {
            const float *a0 = A + (size_t)m * lda;
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += a0[k] * B[(size_t)k * ldb + n];
            put(C + (size_t)m * ldc + n, s, alpha, beta);
        }
    }
}


/* --- prefill-sized products: packed panels ------------------------------------------------------
 * `x @ W.T` with 17 to PANEL_MAX_ROWS rows (a prefill group) is compute-bound. OpenBLAS gets about
 * 110-125 GFLOP/s out of this machine's two cores there; the classic 6x16 register tile (12
 * accumulators, B's panel of 16 columns packed once per call and kept in L1/L2, A's entries
 * broadcast) gets about 78 per core. */

/* P[k * 16 + c] = W[c][k] for the `cols` (<= 16) rows of W at `W`; missing columns are zero. */
static void pack16(int cols, int K, const float *W, int ldb, float *P) {
    int k = 0;
    if (cols == 16)
        for (; k + 8 <= K; k += 8)
            for (int h = 0; h < 2; h++) { /* an 8x8 transpose of rows 8h..8h+7, columns k..k+7 */
                const float *w = W + (size_t)(8 * h) * ldb + k;
                const __m256 r0 = _mm256_loadu_ps(w), r1 = _mm256_loadu_ps(w + ldb),
                             r2 = _mm256_loadu_ps(w + 2 * (size_t)ldb),
                             r3 = _mm256_loadu_ps(w + 3 * (size_t)ldb),
                             r4 = _mm256_loadu_ps(w + 4 * (size_t)ldb),
                             r5 = _mm256_loadu_ps(w + 5 * (size_t)ldb),
                             r6 = _mm256_loadu_ps(w + 6 * (size_t)ldb),
                             r7 = _mm256_loadu_ps(w + 7 * (size_t)ldb);
                const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                             t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                             t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                             t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
                const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                             s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                             s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                             s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                float *p = P + (size_t)k * 16 + 8 * h;
                _mm256_store_ps(p, _mm256_permute2f128_ps(s0, s4, 0x20));
                _mm256_store_ps(p + 16, _mm256_permute2f128_ps(s1, s5, 0x20));
                _mm256_store_ps(p + 32, _mm256_permute2f128_ps(s2, s6, 0x20));
                _mm256_store_ps(p + 48, _mm256_permute2f128_ps(s3, s7, 0x20));
                _mm256_store_ps(p + 64, _mm256_permute2f128_ps(s0, s4, 0x31));
                _mm256_store_ps(p + 80, _mm256_permute2f128_ps(s1, s5, 0x31));
                _mm256_store_ps(p + 96, _mm256_permute2f128_ps(s2, s6, 0x31));
                _mm256_store_ps(p + 112, _mm256_permute2f128_ps(s3, s7, 0x31));
            }
    for (; k < K; k++)
        for (int c = 0; c < 16; c++) P[(size_t)k * 16 + c] = c < cols ? W[(size_t)c * ldb + k] : 0.0f;
}

/* Rows m..m+rm-1 (rm <= 6) of A against one packed panel, into `cols` (<= 16) columns of C. Rows
 * past rm repeat the last one: computed, never stored. Named accumulators, not an array: gcc keeps
 * an array of them in memory. */
static void panel_tile(int rm, int cols, int K, float alpha, const float *A, int lda,
                       const float *P, float beta, float *C, int ldc) {
    const float *a0 = A, *a1 = A + (size_t)(rm > 1 ? 1 : rm - 1) * lda,
                *a2 = A + (size_t)(rm > 2 ? 2 : rm - 1) * lda,
                *a3 = A + (size_t)(rm > 3 ? 3 : rm - 1) * lda,
                *a4 = A + (size_t)(rm > 4 ? 4 : rm - 1) * lda,
                *a5 = A + (size_t)(rm > 5 ? 5 : rm - 1) * lda;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int k = 0; k < K; k++) {
        const __m256 b0 = _mm256_load_ps(P + (size_t)k * 16);
        const __m256 b1 = _mm256_load_ps(P + (size_t)k * 16 + 8);
        __m256 x = _mm256_broadcast_ss(a0 + k);
        c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a1 + k);
        c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a2 + k);
        c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a3 + k);
        c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
        x = _mm256_broadcast_ss(a4 + k);
        c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
        x = _mm256_broadcast_ss(a5 + k);
        c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    float t[6][16];
    _mm256_storeu_ps(t[0], c00), _mm256_storeu_ps(t[0] + 8, c01);
    _mm256_storeu_ps(t[1], c10), _mm256_storeu_ps(t[1] + 8, c11);
    _mm256_storeu_ps(t[2], c20), _mm256_storeu_ps(t[2] + 8, c21);
    _mm256_storeu_ps(t[3], c30), _mm256_storeu_ps(t[3] + 8, c31);
    _mm256_storeu_ps(t[4], c40), _mm256_storeu_ps(t[4] + 8, c41);
    _mm256_storeu_ps(t[5], c50), _mm256_storeu_ps(t[5] + 8, c51);
    for (int r = 0; r < rm; r++)
        for (int j = 0; j < cols; j++) put(C + (size_t)r * ldc + j, t[r][j], alpha, beta);
}

/* Each thread's packed panel (K x 16 floats, 64-byte aligned), grown as needed, kept. */
static __thread float *panel_buffer;
static __thread size_t panel_capacity;

static float *panel_space(int K) {
    const size_t need = (size_t)K * 16;
    if (need > panel_capacity) {
        free(panel_buffer);
        panel_buffer = aligned_alloc(64, (need * sizeof(float) + 63) & ~(size_t)63);
        panel_capacity = panel_buffer ? need : 0;
    }
    return panel_buffer;
}

/* C[m][n] = alpha * sum_k A[m][k] * B[n][k] + beta * C[m][n] for columns n in [n0, n1), panel by
 * panel; returns 0 when no panel buffer could be allocated (the caller then computes it otherwise). */
static int nt_panels(int M, int n0, int n1, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc) {
    float *P = panel_space(K);
    if (!P) return 0;
    for (int n = n0; n < n1; n += 16) {
        const int cols = n1 - n < 16 ? n1 - n : 16;
        pack16(cols, K, B + (size_t)n * ldb, ldb, P);
        for (int m = 0; m < M; m += 6)
            panel_tile(M - m < 6 ? M - m : 6, cols, K, alpha, A + (size_t)m * lda, lda, P, beta,
                       C + (size_t)m * ldc + n, ldc);
    }
    return 1;
}

/* --- the thread pool ----------------------------------------------------------------------- */
/* A product is cut into chunks of columns that the caller and the helpers claim one at a time, so a
 * helper that is asleep or preempted (two cores shared with mlx's own thread, Python and the HTTP
 * loop) never holds the caller up: the caller takes whatever is left and only waits for chunks a
 * helper has already started. */

struct job {
    int kind, M, N, K, lda, ldb, ldc, chunks;
    float alpha, beta;
    const float *A, *B;
    float *C;
};

static struct job job;
static int nthreads = 1;
static _Atomic unsigned generation; /* bumped per product: what sleeping helpers wait on */
/* (chunk count << 32) | next chunk to claim; the count is 0 while no product is open. A claim is
 * judged from the value it took alone, never from `job`, which may already be the next product's. */
static _Atomic uint64_t ticket;
static _Atomic int finished_chunks, sleepers;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static sgemm_fn next_sgemm;

static void compute(int kind, int M, int n0, int n1, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    if (kind == NN_SKINNY)
        nn_cols(M, n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else if (kind == NT_SKINNY || !nt_panels(M, n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc))
        nt_cols(M, n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static void run_chunk(const struct job *j, int chunk) {
    /* Column ranges aligned to 32 so that every chunk but the last runs full vector blocks. */
    const int blocks = (j->N + 31) / 32;
    const int n0 = (int)((long)blocks * chunk / j->chunks) * 32;
    int n1 = (int)((long)blocks * (chunk + 1) / j->chunks) * 32;
    if (n1 > j->N) n1 = j->N;
    if (n0 >= n1) return;
    compute(j->kind, j->M, n0, n1, j->K, j->alpha, j->A, j->lda, j->B, j->ldb, j->beta, j->C, j->ldc);
}

/* Claim and run chunks until none is left. The job's fields are read only after a claim succeeds:
 * the caller publishes them before opening the ticket, and waits for every claimed chunk. */
static void take_chunks(void) {
    for (;;) {
        const uint64_t t = atomic_fetch_add(&ticket, 1);
        if ((uint32_t)t >= (uint32_t)(t >> 32)) return; /* none left, or no product open */
        run_chunk(&job, (int)(uint32_t)t);
        atomic_fetch_add(&finished_chunks, 1);
    }
}

static long futex(_Atomic unsigned *addr, int op, unsigned val) {
    return syscall(SYS_futex, (unsigned *)addr, op, val, NULL, NULL, 0);
}

static void *helper(void *arg) {
    (void)arg;
    unsigned seen = 0;
    for (;;) {
        unsigned now;
        const uint64_t start = __rdtsc();
        while ((now = atomic_load(&generation)) == seen) {
            const uint64_t spun = __rdtsc() - start;
            if (spun < SPIN_CYCLES) {
                _mm_pause();
                continue;
            }
            if (spun < YIELD_CYCLES) { /* a core another thread wants is given up, not held */
                sched_yield();
                continue;
            }
            atomic_fetch_add(&sleepers, 1);
            futex(&generation, FUTEX_WAIT_PRIVATE, seen);
            atomic_fetch_sub(&sleepers, 1);
        }
        seen = now;
        take_chunks();
    }
    return NULL;
}

static void init(void) {
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    const char *env = getenv("LLM_SERVICE_SGEMM_THREADS");
    if (env && *env) n = strtol(env, NULL, 10);
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    for (long i = 1; i < n; i++) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, helper, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        nthreads = (int)i + 1;
    }
}

/* Which cblas_sgemm calls this file computes itself (the rest go to the next BLAS in the process). */
int llm_sgemm_handles(int order, int transA, int transB, int M) {
    return order == RowMajor && transA == NoTrans &&
           ((transB == Trans && M <= PANEL_MAX_ROWS) || (transB == NoTrans && M <= MAX_ROWS));
}

int llm_sgemm_threads(void) {
    pthread_once(&once, init);
    return nthreads;
}

/* Only when no other cblas_sgemm is loaded behind this one (the server always preloads OpenBLAS
 * after it): correct and slow, for whatever shape. */
static void reference_sgemm(int order, int transA, int transB, int M, int N, int K, float alpha,
                            const float *A, int lda, const float *B, int ldb, float beta, float *C,
                            int ldc) {
    if (order != RowMajor) { /* column-major C is row-major C^T = op(B)^T op(A)^T */
        reference_sgemm(RowMajor, transB, transA, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
        return;
    }
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++)
                s += (double)(transA == NoTrans ? A[(size_t)m * lda + k] : A[(size_t)k * lda + m]) *
                     (transB == NoTrans ? B[(size_t)k * ldb + n] : B[(size_t)n * ldb + k]);
            put(C + (size_t)m * ldc + n, (float)s, alpha, beta);
        }
}

void cblas_sgemm(int order, int transA, int transB, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    pthread_once(&once, init);
    if (M <= 0 || N <= 0) return;
    if (!llm_sgemm_handles(order, transA, transB, M)) {
        if (next_sgemm)
            next_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        else
            reference_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    const int kind = transB == NoTrans ? NN_SKINNY : M <= MAX_ROWS ? NT_SKINNY : NT_PANELS;
    struct job j = {kind, M, N, K, lda, ldb, ldc, 1, alpha, beta, A, B, C};
    const int blocks = (N + 31) / 32;
    const int chunks = 4 * nthreads < blocks ? 4 * nthreads : blocks;
    const int big = kind == NT_PANELS ? (size_t)M * N * K >= PANEL_PARALLEL_MIN
                                      : (size_t)N * K >= PARALLEL_MIN;
    /* One caller at a time uses the pool; another thread (a second mlx stream) computes alone. */
    if (nthreads > 1 && chunks > 1 && big &&
        pthread_mutex_trylock(&pool_lock) == 0) {
        j.chunks = chunks;
        job = j;
        atomic_store(&finished_chunks, 0);
        atomic_store(&ticket, (uint64_t)chunks << 32); /* opens it: claims from here see `job` */
        atomic_fetch_add(&generation, 1);
        if (atomic_load(&sleepers) > 0) futex(&generation, FUTEX_WAKE_PRIVATE, INT_MAX);
        take_chunks();
        while (atomic_load(&finished_chunks) < chunks) _mm_pause();
        atomic_store(&ticket, 0);
        pthread_mutex_unlock(&pool_lock);
        return;
    }
    compute(kind, M, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
