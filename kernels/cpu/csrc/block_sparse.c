/*
 * Block-sparse x @ W^T on CPU, fp32, for lpl.kernels.cpu.
 *
 * Two entry points, both called through ctypes with the GIL released:
 *
 *   lpl_bs_matmul  out[M, N] = A[M, K] @ B^T (+ bias), B block-sparse (CSR over output block rows).
 *                  Serves the forward (A = x, B = W) and dX = dY W (A = dY, B = W^T in CSR form).
 *   lpl_bs_grad_values  dW[j] = dY[:, block row r]^T @ X[:, block col c] for every retained block j.
 *
 * Scheme (BLIS-like): threads take token tiles of MT rows from a shared counter. A tile of A is packed once into
 * 6-row panels [panel][k][6] (zero-padded, so edge blocks never read past A's true width), stays in L2 and is
 * reused by every output block row. B is pre-packed by the caller into 16-wide strips [entry][strip][kb][16] so the
 * 6x16 AVX2/FMA microkernel streams it contiguously from L1. Retained input blocks are read in place from the
 * packed A tile: nothing is gathered or copied per block row.
 */
#include <pthread.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LPL_HAVE_AVX2 1
#else
#define LPL_HAVE_AVX2 0
#endif

#define MR 6
#define NR 16

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static void* aligned_buffer(size_t n_floats) {
    void* p = NULL;
    size_t bytes = ((n_floats * sizeof(float) + 63) / 64) * 64;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    return p;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Fork-join: run fn(ctx, thread_id) on nthreads threads, the caller being thread 0.                          */

#define MAX_THREADS 256

typedef void (*task_fn)(void* ctx, int thread_id);
typedef struct { task_fn fn; void* ctx; int thread_id; } task_arg;

static int clamp_threads(int64_t requested, int64_t work_items) {
    int64_t n = min64(requested, work_items);
    return (int)max64(1, min64(n, MAX_THREADS));
}

#ifndef _OPENMP
static void* task_trampoline(void* p) {
    task_arg* t = (task_arg*)p;
    t->fn(t->ctx, t->thread_id);
    return NULL;
}
#endif

/* Every thread id in [0, nthreads) runs exactly once. Built with -fopenmp (where torch's own OpenMP runtime, GNU
 * libgomp, is loaded: ours resolves to it), the tasks run on torch's thread pool, whose threads wait spinning after
 * every torch op: new threads would contend with them for the cores (2-4x slower calls right after a torch op on 2
 * threads). Otherwise on new threads; ids whose thread could not be created run on the caller. */
static void run_parallel(task_fn fn, void* ctx, int nthreads) {
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            /* the runtime may give fewer threads than asked (nested in another region, thread limits) */
            for (int id = omp_get_thread_num(); id < nthreads; id += omp_get_num_threads()) fn(ctx, id);
        }
    } else {
        fn(ctx, 0);
    }
#else
    pthread_t threads[MAX_THREADS];
    task_arg args[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < nthreads; ++t) {
        args[t].fn = fn; args[t].ctx = ctx; args[t].thread_id = t;
        if (pthread_create(&threads[t], NULL, task_trampoline, &args[t]) != 0) break;
        started = t;
    }
    fn(ctx, 0);
    for (int t = started + 1; t < nthreads; ++t) fn(ctx, t);
    for (int t = 1; t <= started; ++t) pthread_join(threads[t], NULL);
#endif
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Microkernel: acc[6][16] = sum over k of a[k][0..5] (broadcast) * b[k][0..15], for kb steps.                 */

#if LPL_HAVE_AVX2
/* Kept as a macro-like inline body over local registers: the compiler keeps the 12 accumulators in ymm0-11. */
static inline void micro_6x16(int64_t kb, const float* restrict a, const float* restrict b,
                              __m256* c0, __m256* c1, __m256* c2, __m256* c3, __m256* c4, __m256* c5,
                              __m256* d0, __m256* d1, __m256* d2, __m256* d3, __m256* d4, __m256* d5) {
    __m256 x0 = *c0, x1 = *c1, x2 = *c2, x3 = *c3, x4 = *c4, x5 = *c5;
    __m256 y0 = *d0, y1 = *d1, y2 = *d2, y3 = *d3, y4 = *d4, y5 = *d5;
#pragma GCC unroll 4
    for (int64_t k = 0; k < kb; ++k) {
        const __m256 b0 = _mm256_load_ps(b + k * NR);
        const __m256 b1 = _mm256_load_ps(b + k * NR + 8);
        __m256 av;
        av = _mm256_broadcast_ss(a + k * MR + 0); x0 = _mm256_fmadd_ps(av, b0, x0); y0 = _mm256_fmadd_ps(av, b1, y0);
        av = _mm256_broadcast_ss(a + k * MR + 1); x1 = _mm256_fmadd_ps(av, b0, x1); y1 = _mm256_fmadd_ps(av, b1, y1);
        av = _mm256_broadcast_ss(a + k * MR + 2); x2 = _mm256_fmadd_ps(av, b0, x2); y2 = _mm256_fmadd_ps(av, b1, y2);
        av = _mm256_broadcast_ss(a + k * MR + 3); x3 = _mm256_fmadd_ps(av, b0, x3); y3 = _mm256_fmadd_ps(av, b1, y3);
        av = _mm256_broadcast_ss(a + k * MR + 4); x4 = _mm256_fmadd_ps(av, b0, x4); y4 = _mm256_fmadd_ps(av, b1, y4);
        av = _mm256_broadcast_ss(a + k * MR + 5); x5 = _mm256_fmadd_ps(av, b0, x5); y5 = _mm256_fmadd_ps(av, b1, y5);
    }
    *c0 = x0; *c1 = x1; *c2 = x2; *c3 = x3; *c4 = x4; *c5 = x5;
    *d0 = y0; *d1 = y1; *d2 = y2; *d3 = y3; *d4 = y4; *d5 = y5;
}
#endif

/* ------------------------------------------------------------------------------------------------------------ */
/* Sparse matmul over output block rows.                                                                       */

typedef struct {
    const float* a; int64_t M, K, a_sm, a_sk;          /* A [M, K], strided */
    const float* bpack;                                 /* [nnz][S][kb][16] */
    const int64_t* ptr; const int64_t* in_blk; int64_t R;
    int64_t kb, nb, S;                                  /* input block width, output block width, strips */
    float* out; int64_t N, out_sm;                      /* out [M, N], unit stride along N */
    const float* bias;                                  /* [N] or NULL */
    int64_t MT, Kp, chunk;                              /* token tile, padded K, entries per L1 chunk */
    int64_t ntiles;
    int64_t next_tile;                                  /* shared work counter */
    int failed;
} matmul_job;

static void pack_a_tile(const matmul_job* j, int64_t m0, float* apack) {
    const int64_t panels = j->MT / MR;
    for (int64_t p = 0; p < panels; ++p) {
        float* dst = apack + p * j->Kp * MR;
        for (int64_t i = 0; i < MR; ++i) {
            const int64_t m = m0 + p * MR + i;
            if (m < j->M) {
                const float* src = j->a + m * j->a_sm;
                if (j->a_sk == 1) {
                    for (int64_t k = 0; k < j->K; ++k) dst[k * MR + i] = src[k];
                } else {
                    for (int64_t k = 0; k < j->K; ++k) dst[k * MR + i] = src[k * j->a_sk];
                }
                for (int64_t k = j->K; k < j->Kp; ++k) dst[k * MR + i] = 0.0f;
            } else {
                for (int64_t k = 0; k < j->Kp; ++k) dst[k * MR + i] = 0.0f;
            }
        }
    }
}

/* Write a 6x16 tile to out rows m0.., columns n0..: first chunk starts from bias (or 0), later chunks add. */
static void store_tile(const matmul_job* j, const float tile[MR][NR], int64_t m0, int64_t n0, int64_t mv,
                       int64_t nv, int first) {
    for (int64_t i = 0; i < mv; ++i) {
        float* row = j->out + (m0 + i) * j->out_sm + n0;
        if (first) {
            if (j->bias) for (int64_t n = 0; n < nv; ++n) row[n] = tile[i][n] + j->bias[n0 + n];
            else for (int64_t n = 0; n < nv; ++n) row[n] = tile[i][n];
        } else {
            for (int64_t n = 0; n < nv; ++n) row[n] += tile[i][n];
        }
    }
}

static void compute_tile(const matmul_job* j, const float* apack, int64_t m0) {
    const int64_t panels = j->MT / MR;
    const int64_t mvalid = min64(j->MT, j->M - m0);
    const int64_t kb = j->kb;
    for (int64_t r = 0; r < j->R; ++r) {
        const int64_t n_row0 = r * j->nb;
        const int64_t n_row_valid = min64(j->nb, j->N - n_row0);
        const int64_t e_begin = j->ptr[r], e_end = j->ptr[r + 1];
        for (int64_t s = 0; s < j->S; ++s) {
            const int64_t n0 = n_row0 + s * NR;
            const int64_t nv = min64(NR, n_row_valid - s * NR);
            if (nv <= 0) break;
            if (e_begin == e_end) {  /* empty block row: bias or zeros */
                float zero[MR][NR];
                memset(zero, 0, sizeof(zero));
                for (int64_t p = 0; p * MR < mvalid; ++p)
                    store_tile(j, (const float(*)[NR])zero, m0 + p * MR, n0, min64(MR, mvalid - p * MR), nv, 1);
                continue;
            }
            for (int64_t c0 = e_begin; c0 < e_end; c0 += j->chunk) {
                const int64_t c1 = min64(e_end, c0 + j->chunk);
                const int first = (c0 == e_begin);
                for (int64_t p = 0; p < panels; ++p) {
                    const int64_t mv = min64(MR, mvalid - p * MR);
                    if (mv <= 0) break;
                    const float* apanel = apack + p * j->Kp * MR;
                    float tile[MR][NR] __attribute__((aligned(64)));
#if LPL_HAVE_AVX2
                    __m256 x0 = _mm256_setzero_ps(), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0;
                    __m256 y0 = x0, y1 = x0, y2 = x0, y3 = x0, y4 = x0, y5 = x0;
                    for (int64_t e = c0; e < c1; ++e) {
                        const float* ap = apanel + j->in_blk[e] * kb * MR;
                        const float* bp = j->bpack + (e * j->S + s) * kb * NR;
                        micro_6x16(kb, ap, bp, &x0, &x1, &x2, &x3, &x4, &x5, &y0, &y1, &y2, &y3, &y4, &y5);
                    }
                    if (mv == MR && nv == NR) {
                        float* o = j->out + (m0 + p * MR) * j->out_sm + n0;
                        const int64_t sm = j->out_sm;
                        __m256 acc[MR][2] = {{x0, y0}, {x1, y1}, {x2, y2}, {x3, y3}, {x4, y4}, {x5, y5}};
                        if (first) {
                            __m256 b0 = _mm256_setzero_ps(), b1 = b0;
                            if (j->bias) { b0 = _mm256_loadu_ps(j->bias + n0); b1 = _mm256_loadu_ps(j->bias + n0 + 8); }
                            for (int i = 0; i < MR; ++i) {
                                _mm256_storeu_ps(o + i * sm, _mm256_add_ps(acc[i][0], b0));
                                _mm256_storeu_ps(o + i * sm + 8, _mm256_add_ps(acc[i][1], b1));
                            }
                        } else {
                            for (int i = 0; i < MR; ++i) {
                                _mm256_storeu_ps(o + i * sm, _mm256_add_ps(acc[i][0], _mm256_loadu_ps(o + i * sm)));
                                _mm256_storeu_ps(o + i * sm + 8,
                                                 _mm256_add_ps(acc[i][1], _mm256_loadu_ps(o + i * sm + 8)));
                            }
                        }
                        continue;
                    }
                    _mm256_store_ps(tile[0], x0); _mm256_store_ps(tile[0] + 8, y0);
                    _mm256_store_ps(tile[1], x1); _mm256_store_ps(tile[1] + 8, y1);
                    _mm256_store_ps(tile[2], x2); _mm256_store_ps(tile[2] + 8, y2);
                    _mm256_store_ps(tile[3], x3); _mm256_store_ps(tile[3] + 8, y3);
                    _mm256_store_ps(tile[4], x4); _mm256_store_ps(tile[4] + 8, y4);
                    _mm256_store_ps(tile[5], x5); _mm256_store_ps(tile[5] + 8, y5);
#else
                    memset(tile, 0, sizeof(tile));
                    for (int64_t e = c0; e < c1; ++e) {
                        const float* ap = apanel + j->in_blk[e] * kb * MR;
                        const float* bp = j->bpack + (e * j->S + s) * kb * NR;
                        for (int64_t k = 0; k < kb; ++k)
                            for (int i = 0; i < MR; ++i)
                                for (int n = 0; n < NR; ++n) tile[i][n] += ap[k * MR + i] * bp[k * NR + n];
                    }
#endif
                    store_tile(j, (const float(*)[NR])tile, m0 + p * MR, n0, mv, nv, first);
                }
            }
        }
    }
}

static void matmul_worker(void* ctx, int thread_id) {
    (void)thread_id;
    matmul_job* j = (matmul_job*)ctx;
    float* apack = (float*)aligned_buffer((size_t)(j->MT * j->Kp));
    if (!apack) { __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED); return; }
    for (;;) {
        const int64_t t = __atomic_fetch_add(&j->next_tile, 1, __ATOMIC_RELAXED);
        if (t >= j->ntiles) break;
        const int64_t m0 = t * j->MT;
        pack_a_tile(j, m0, apack);
        compute_tile(j, apack, m0);
    }
    free(apack);
}

/* Token tile: 192 rows amortise each B strip chunk over 32 microkernel calls (measured better than sizing the tile
 * to L2 when K is large: the A panels stream well from L3), but give every thread at least one tile. */
static int64_t choose_tile(int64_t M, int64_t nthreads) {
    const int64_t per_thread = ceil_div(ceil_div(M, nthreads), MR) * MR;
    return max64(MR, min64(192, per_thread));
}

int lpl_bs_matmul(const float* a, int64_t M, int64_t K, int64_t a_sm, int64_t a_sk, const float* bpack,
                  const int64_t* ptr, const int64_t* in_blk, int64_t R, int64_t kb, int64_t nb, float* out,
                  int64_t N, int64_t out_sm, const float* bias, int64_t kc, int64_t mt, int nthreads) {
    matmul_job j;
    memset(&j, 0, sizeof(j));
    j.a = a; j.M = M; j.K = K; j.a_sm = a_sm; j.a_sk = a_sk;
    j.bpack = bpack; j.ptr = ptr; j.in_blk = in_blk; j.R = R;
    j.kb = kb; j.nb = nb; j.S = ceil_div(nb, NR);
    j.out = out; j.N = N; j.out_sm = out_sm; j.bias = bias;
    j.Kp = ceil_div(K, kb) * kb;
    j.chunk = max64(1, kc / kb);
    j.MT = mt > 0 ? ceil_div(mt, MR) * MR : choose_tile(M, nthreads);
    j.ntiles = ceil_div(M, j.MT);
    if (M == 0 || N == 0) return 0;
    run_parallel(matmul_worker, &j, clamp_threads(nthreads, j.ntiles));
    return j.failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* dW at retained blocks: dW[j][i][k] = sum_m dy[m, r*br + i] * x[m, c*bc + k].                              */

typedef struct {
    const float* dy; int64_t M, N, dy_sm, dy_sn;
    const float* x; int64_t K, x_sm, x_sk;
    const int64_t* ptr; const int64_t* col; int64_t R, nnz;
    int64_t br, bc;
    float* out;                 /* [nnz][br][bc]: thread 0 accumulates here, others in private buffers */
    float** partial;            /* per-thread [nnz][br][bc] for thread_id >= 1 */
    int64_t MT, Kp, Ip;         /* token tile, x row pitch in the pack, br padded to MR */
    int64_t ntiles;
    int nthreads;
    int failed;
} grad_values_job;

static void grad_values_worker(void* ctx, int thread_id) {
    grad_values_job* j = (grad_values_job*)ctx;
    const int64_t MT = j->MT, Kp = j->Kp, br = j->br, bc = j->bc;
    const int64_t ipanels = j->Ip / MR;
    const int64_t strips = ceil_div(bc, NR);
    float* acc_out = thread_id == 0 ? j->out : j->partial[thread_id];
    float* xpack = (float*)aligned_buffer((size_t)(MT * Kp));
    float* dypack = (float*)aligned_buffer((size_t)(MT * j->Ip));
    if (!xpack || !dypack) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        free(xpack); free(dypack);
        return;
    }
    /* Tiles are dealt to threads statically (not from a shared counter): each partial sum then covers the same
     * tokens in every call, so dW is bitwise reproducible for a given thread count, as dense matmul is. */
    const int64_t per = ceil_div(j->ntiles, j->nthreads);
    for (int64_t t = thread_id * per; t < min64(j->ntiles, (thread_id + 1) * per); ++t) {
        const int64_t m0 = t * MT;
        const int64_t mv = min64(MT, j->M - m0);
        /* x tile, row-major [MT][Kp], zero past K so ragged edge blocks read zeros */
        for (int64_t m = 0; m < MT; ++m) {
            float* dst = xpack + m * Kp;
            if (m < mv) {
                const float* src = j->x + (m0 + m) * j->x_sm;
                if (j->x_sk == 1) memcpy(dst, src, (size_t)j->K * sizeof(float));
                else for (int64_t k = 0; k < j->K; ++k) dst[k] = src[k * j->x_sk];
                for (int64_t k = j->K; k < Kp; ++k) dst[k] = 0.0f;
            } else {
                memset(dst, 0, (size_t)Kp * sizeof(float));
            }
        }
        for (int64_t r = 0; r < j->R; ++r) {
            const int64_t e_begin = j->ptr[r], e_end = j->ptr[r + 1];
            if (e_begin == e_end) continue;
            /* dy slice of this block row as panels [ipanel][m][6], zero past N and past the tile */
            for (int64_t ip = 0; ip < ipanels; ++ip) {
                float* dst = dypack + ip * MT * MR;
                for (int64_t m = 0; m < MT; ++m) {
                    for (int64_t i = 0; i < MR; ++i) {
                        const int64_t n = r * br + ip * MR + i;
                        const int inside = m < mv && ip * MR + i < br && n < j->N;
                        dst[m * MR + i] = inside ? j->dy[(m0 + m) * j->dy_sm + n * j->dy_sn] : 0.0f;
                    }
                }
            }
            for (int64_t e = e_begin; e < e_end; ++e) {
                const int64_t c = j->col[e];
                float* blk = acc_out + e * br * bc;
                for (int64_t ip = 0; ip < ipanels; ++ip) {
                    const float* ap = dypack + ip * MT * MR;
                    const int64_t iv = min64(MR, br - ip * MR);
                    for (int64_t s = 0; s < strips; ++s) {
                        const int64_t k0 = c * bc + s * NR;
                        const int64_t kv = min64(NR, bc - s * NR);
                        float tile[MR][NR] __attribute__((aligned(64)));
#if LPL_HAVE_AVX2
                        __m256 x0 = _mm256_setzero_ps(), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0;
                        __m256 y0 = x0, y1 = x0, y2 = x0, y3 = x0, y4 = x0, y5 = x0;
                        const float* bp = xpack + k0;
                        for (int64_t m = 0; m < MT; ++m) {
                            const __m256 b0 = _mm256_loadu_ps(bp + m * Kp);
                            const __m256 b1 = _mm256_loadu_ps(bp + m * Kp + 8);
                            const float* a6 = ap + m * MR;
                            __m256 av;
                            av = _mm256_broadcast_ss(a6 + 0); x0 = _mm256_fmadd_ps(av, b0, x0); y0 = _mm256_fmadd_ps(av, b1, y0);
                            av = _mm256_broadcast_ss(a6 + 1); x1 = _mm256_fmadd_ps(av, b0, x1); y1 = _mm256_fmadd_ps(av, b1, y1);
                            av = _mm256_broadcast_ss(a6 + 2); x2 = _mm256_fmadd_ps(av, b0, x2); y2 = _mm256_fmadd_ps(av, b1, y2);
                            av = _mm256_broadcast_ss(a6 + 3); x3 = _mm256_fmadd_ps(av, b0, x3); y3 = _mm256_fmadd_ps(av, b1, y3);
                            av = _mm256_broadcast_ss(a6 + 4); x4 = _mm256_fmadd_ps(av, b0, x4); y4 = _mm256_fmadd_ps(av, b1, y4);
                            av = _mm256_broadcast_ss(a6 + 5); x5 = _mm256_fmadd_ps(av, b0, x5); y5 = _mm256_fmadd_ps(av, b1, y5);
                        }
                        _mm256_store_ps(tile[0], x0); _mm256_store_ps(tile[0] + 8, y0);
                        _mm256_store_ps(tile[1], x1); _mm256_store_ps(tile[1] + 8, y1);
                        _mm256_store_ps(tile[2], x2); _mm256_store_ps(tile[2] + 8, y2);
                        _mm256_store_ps(tile[3], x3); _mm256_store_ps(tile[3] + 8, y3);
                        _mm256_store_ps(tile[4], x4); _mm256_store_ps(tile[4] + 8, y4);
                        _mm256_store_ps(tile[5], x5); _mm256_store_ps(tile[5] + 8, y5);
#else
                        memset(tile, 0, sizeof(tile));
                        for (int64_t m = 0; m < MT; ++m)
                            for (int i = 0; i < MR; ++i)
                                for (int n = 0; n < NR; ++n) tile[i][n] += ap[m * MR + i] * xpack[m * Kp + k0 + n];
#endif
                        for (int64_t i = 0; i < iv; ++i) {
                            float* row = blk + (ip * MR + i) * bc + s * NR;
                            for (int64_t k = 0; k < kv; ++k) row[k] += tile[i][k];
                        }
                    }
                }
            }
        }
    }
    free(xpack);
    free(dypack);
}

typedef struct { float* out; float** partial; int64_t total; int nthreads; } reduce_job;

static void reduce_worker(void* ctx, int thread_id) {
    reduce_job* j = (reduce_job*)ctx;
    const int64_t per = ceil_div(j->total, j->nthreads);
    const int64_t lo = thread_id * per, hi = min64(j->total, lo + per);
    for (int t = 1; t < j->nthreads; ++t) {
        const float* src = j->partial[t];
        for (int64_t i = lo; i < hi; ++i) j->out[i] += src[i];
    }
}

/* out must be zero-initialised by the caller. */
int lpl_bs_grad_values(const float* dy, int64_t M, int64_t N, int64_t dy_sm, int64_t dy_sn, const float* x,
                       int64_t K, int64_t x_sm, int64_t x_sk, const int64_t* ptr, const int64_t* col, int64_t R,
                       int64_t nnz, int64_t br, int64_t bc, float* out, int64_t mt, int nthreads) {
    grad_values_job j;
    memset(&j, 0, sizeof(j));
    j.dy = dy; j.M = M; j.N = N; j.dy_sm = dy_sm; j.dy_sn = dy_sn;
    j.x = x; j.K = K; j.x_sm = x_sm; j.x_sk = x_sk;
    j.ptr = ptr; j.col = col; j.R = R; j.nnz = nnz; j.br = br; j.bc = bc; j.out = out;
    /* pad the row pitch so a 16-wide strip of the last block column never reads past the row */
    j.Kp = ceil_div(K, bc) * bc + NR;
    j.Ip = ceil_div(br, MR) * MR;
    if (M == 0 || nnz == 0) return 0;
    /* Token tiles of at most 256 rows (or mt), as many as a multiple of the threads: the static deal below gives
     * every thread the same rows (a partial last tile costs a full one: its padding is computed too). */
    int64_t ntiles = ceil_div(M, mt > 0 ? mt : 256);
    const int nt = clamp_threads(nthreads, ntiles);
    if (mt <= 0) ntiles = ceil_div(ntiles, nt) * nt;
    j.MT = mt > 0 ? mt : ceil_div(M, ntiles);
    j.ntiles = ceil_div(M, j.MT);
    j.nthreads = nt;
    float* partial[MAX_THREADS];
    memset(partial, 0, sizeof(partial));
    const int64_t total = nnz * br * bc;
    for (int t = 1; t < nt; ++t) {
        partial[t] = (float*)aligned_buffer((size_t)total);
        if (!partial[t]) { for (int u = 1; u < t; ++u) free(partial[u]); return -1; }
        memset(partial[t], 0, (size_t)total * sizeof(float));
    }
    j.partial = partial;
    run_parallel(grad_values_worker, &j, nt);
    if (nt > 1 && !j.failed) {
        reduce_job rj = {out, partial, total, nt};
        run_parallel(reduce_worker, &rj, nt);
    }
    for (int t = 1; t < nt; ++t) free(partial[t]);
    return j.failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* B packing: dst[e][s][k][16] = src block perm[e] at (k, s*16 + n), zero past nb. Strides in floats.          */

typedef struct {
    const float* src; const int64_t* perm; int64_t nnz, block_stride, kb, nb, sk, sn; float* dst; int nthreads;
} pack_job;

static void pack_worker(void* ctx, int thread_id) {
    const pack_job* j = (const pack_job*)ctx;
    const int64_t S = ceil_div(j->nb, NR);
    const int64_t per = ceil_div(j->nnz, j->nthreads);
    const int64_t lo = thread_id * per, hi = min64(j->nnz, lo + per);
    for (int64_t e = lo; e < hi; ++e) {
        const float* blk = j->src + (j->perm ? j->perm[e] : e) * j->block_stride;
        float* out = j->dst + e * S * j->kb * NR;
        for (int64_t s = 0; s < S; ++s) {
            const int64_t nv = min64(NR, j->nb - s * NR);
            for (int64_t k = 0; k < j->kb; ++k) {
                float* d = out + (s * j->kb + k) * NR;
                const float* row = blk + k * j->sk + s * NR * j->sn;
                int64_t n = 0;
                for (; n < nv; ++n) d[n] = row[n * j->sn];
                for (; n < NR; ++n) d[n] = 0.0f;
            }
        }
    }
}

void lpl_pack_b(const float* src, const int64_t* perm, int64_t nnz, int64_t block_stride, int64_t kb, int64_t nb,
                int64_t sk, int64_t sn, float* dst, int nthreads) {
    if (nnz == 0) return;
    const int nt = clamp_threads(nthreads, nnz);
    pack_job j = {src, perm, nnz, block_stride, kb, nb, sk, sn, dst, nt};
    run_parallel(pack_worker, &j, nt);
}

int lpl_has_avx2(void) { return LPL_HAVE_AVX2; }
