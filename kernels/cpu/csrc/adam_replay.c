/*
 * Linearised Adam replay on CPU for lpl.kernels.cpu.adam_replay (the math: lpl/order/linearized.py). Arithmetic in
 * float32; the large d-sized inputs may be float32 (read in place) or bfloat16 (widened exactly, tile by tile).
 *
 * One entry point, called through ctypes with the GIL released:
 *
 *   lpl_adam_replay  runs Adam for n orders at once on gradients linearised about a reference run:
 *                    g = pool_grads[s, order[s]] + V_s^T diag(lambda_s) V_s Delta_s (+ coupled weight decay),
 *                    Delta_{s+1} = Adam step of Delta_s on g (each order its own moments) + lr_s u_ref_s,
 *                    and returns Delta_L and <Delta_s, val_grads[s]> for s = 0..L.
 *
 * Why a kernel: the replay is memory bound. Torch needs about 15 passes over the [n, d] state per step (gather,
 * two skinny GEMMs, Adam, the reference update, the validation dot); here each step is one pass that reads and
 * writes Delta, m and v once. The coordinates are cut into tiles small enough that a tile of V_s and V_{s+1}
 * (k x TILE floats each) stays in L2 while the orders stream through it, four at a time so that each load of a
 * factor serves four orders: the rank-k product for step s and the projections Delta_{s+1} V_{s+1}^T needed by
 * step s + 1 are both taken in that pass. Threads own contiguous coordinate ranges; per step they exchange only
 * n x (k + 1) partial sums (double buffered, one barrier a step). About 2x faster than the torch path batched and
 * 1.5x for one order at the demo LM's size (benchmarks/linearized_replay_speed.py).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 1024 /* coordinates per tile: 512-2048 measured alike at the demo LM's size, 256 and below slower */
#define GROUP 4 /* orders that share each load of the curvature factors */
#define MAX_THREADS 256

typedef struct {
    /* the large inputs are float32 or bfloat16 (bit set in bf16_mask: BF16_*), widened tile by tile */
    const void* pool_grads;       /* [*, nb, d] */
    int64_t nb, d;
    const void* vectors;          /* [T, k, d] */
    const float* values;          /* [T, k] */
    int64_t k;
    const void* ref_updates;      /* [T, d] */
    const void* val_grads;        /* [T + 1, d] */
    const void* coupled_decay;    /* [T, d] or NULL: weight_decay * theta_s, added to the gradient (Adam, not W) */
    int bf16_mask;
    const float* decay_per_coord; /* [d] or NULL (then `decay` for every coordinate) */
    float decay;
    int decoupled;
    const float* lr;              /* [T] */
    double beta1, beta2, eps;
    const int64_t* orders;        /* [n, length] */
    int64_t n, length;
    float* delta;                 /* [n, d], zero on entry */
    float* exp_avg;               /* [n, d], zero on entry */
    float* exp_avg_sq;            /* [n, d], zero on entry */
    double* val_dots;             /* [n, length + 1] out */
    int nthreads;
    double* partials;             /* [2][nthreads][n][k + 1]: Delta V^T and <Delta, val_grad> per thread */
    float* scratch;               /* [nthreads][scratch_floats]: each thread's coefficients and widened tiles */
    pthread_barrier_t barrier;
    /* start gate: the threads run only once all of them exist (a barrier missing a thread would never open) */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int go;                       /* 0 wait, 1 run, -1 a thread could not start: return without running */
} replay_args;

typedef struct { replay_args* a; int thread_id; } thread_arg;

static double* partial_slot(const replay_args* a, int64_t buffer, int64_t thread, int64_t order) {
    return a->partials + ((buffer * a->nthreads + thread) * a->n + order) * (a->k + 1);
}

/* out[r] += <x, rows[r]> for r < nrows (rows `stride` floats apart). Four rows at a time: four independent
 * accumulators keep the FMA units busy (one accumulator waits on its own latency), and x is loaded once per four.
 * Vectorised without -ffast-math through the OpenMP simd reduction. */
static void add_dots(const float* restrict x, const float* restrict rows, int64_t stride, int64_t nrows, int64_t n,
                     double* restrict out) {
    int64_t r = 0;
    for (; r + 4 <= nrows; r += 4) {
        const float *r0 = rows + r * stride, *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t j = 0; j < n; ++j) {
            a0 += x[j] * r0[j];
            a1 += x[j] * r1[j];
            a2 += x[j] * r2[j];
            a3 += x[j] * r3[j];
        }
        out[r] += a0;
        out[r + 1] += a1;
        out[r + 2] += a2;
        out[r + 3] += a3;
    }
    for (; r < nrows; ++r) {
        const float* row = rows + r * stride;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) acc += x[j] * row[j];
        out[r] += acc;
    }
}

/* y[j] += sum_r c[r] rows[r][j] for r < nrows: four rows per pass over y */
static void add_combination(float* restrict y, const float* restrict c, const float* restrict rows, int64_t stride,
                            int64_t nrows, int64_t n) {
    int64_t r = 0;
    for (; r + 4 <= nrows; r += 4) {
        const float *r0 = rows + r * stride, *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
        const float c0 = c[r], c1 = c[r + 1], c2 = c[r + 2], c3 = c[r + 3];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] += c0 * r0[j] + c1 * r1[j] + c2 * r2[j] + c3 * r3[j];
    }
    for (; r < nrows; ++r) {
        const float* row = rows + r * stride;
        const float c0 = c[r];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) y[j] += c0 * row[j];
    }
}

/* The same for four orders at once (y_q += sum_r c_q[r] rows[r], c_q = c + q * ldc): each row element loaded from
 * L2 serves four orders, which quarters the traffic of the curvature factors, the replay's bottleneck. */
static void add_combination4(float* restrict y0, float* restrict y1, float* restrict y2, float* restrict y3,
                             const float* restrict c, int64_t ldc, const float* restrict rows, int64_t stride,
                             int64_t nrows, int64_t n) {
    int64_t r = 0;
    for (; r + 2 <= nrows; r += 2) {
        const float *r0 = rows + r * stride, *r1 = r0 + stride;
        const float c00 = c[r], c01 = c[r + 1], c10 = c[ldc + r], c11 = c[ldc + r + 1];
        const float c20 = c[2 * ldc + r], c21 = c[2 * ldc + r + 1], c30 = c[3 * ldc + r], c31 = c[3 * ldc + r + 1];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            const float v0 = r0[j], v1 = r1[j];
            y0[j] += c00 * v0 + c01 * v1;
            y1[j] += c10 * v0 + c11 * v1;
            y2[j] += c20 * v0 + c21 * v1;
            y3[j] += c30 * v0 + c31 * v1;
        }
    }
    for (; r < nrows; ++r) {
        const float* r0 = rows + r * stride;
        const float c00 = c[r], c10 = c[ldc + r], c20 = c[2 * ldc + r], c30 = c[3 * ldc + r];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            const float v0 = r0[j];
            y0[j] += c00 * v0;
            y1[j] += c10 * v0;
            y2[j] += c20 * v0;
            y3[j] += c30 * v0;
        }
    }
}

/* out_q[r] += <x_q, rows[r]> for four orders q: two rows x four orders = eight independent accumulators */
static void add_dots4(const float* restrict x0, const float* restrict x1, const float* restrict x2,
                      const float* restrict x3, const float* restrict rows, int64_t stride, int64_t nrows, int64_t n,
                      double* out0, double* out1, double* out2, double* out3) {
    int64_t r = 0;
    for (; r + 2 <= nrows; r += 2) {
        const float *r0 = rows + r * stride, *r1 = r0 + stride;
        float a00 = 0.0f, a01 = 0.0f, a10 = 0.0f, a11 = 0.0f, a20 = 0.0f, a21 = 0.0f, a30 = 0.0f, a31 = 0.0f;
#pragma omp simd reduction(+ : a00, a01, a10, a11, a20, a21, a30, a31)
        for (int64_t j = 0; j < n; ++j) {
            const float v0 = r0[j], v1 = r1[j];
            a00 += x0[j] * v0;
            a01 += x0[j] * v1;
            a10 += x1[j] * v0;
            a11 += x1[j] * v1;
            a20 += x2[j] * v0;
            a21 += x2[j] * v1;
            a30 += x3[j] * v0;
            a31 += x3[j] * v1;
        }
        out0[r] += a00, out0[r + 1] += a01, out1[r] += a10, out1[r + 1] += a11;
        out2[r] += a20, out2[r + 1] += a21, out3[r] += a30, out3[r + 1] += a31;
    }
    for (; r < nrows; ++r) {
        const float* r0 = rows + r * stride;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t j = 0; j < n; ++j) {
            const float v0 = r0[j];
            a0 += x0[j] * v0;
            a1 += x1[j] * v0;
            a2 += x2[j] * v0;
            a3 += x3[j] * v0;
        }
        out0[r] += a0, out1[r] += a1, out2[r] += a2, out3[r] += a3;
    }
}

/* bits of bf16_mask, in the order of lpl.kernels.cpu.adam_replay.NARROW_INPUTS */
enum { BF16_POOL = 1, BF16_VECTORS = 2, BF16_REF = 4, BF16_VAL = 8, BF16_COUPLED = 16 };

/* dst[j] = src[offset + j] as float32, from float32 or bfloat16 (the top half of a float32: exact) */
static void widen(float* restrict dst, const void* src, int bf16, int64_t offset, int64_t n) {
    if (!bf16) {
        memcpy(dst, (const float*)src + offset, sizeof(float) * (size_t)n);
        return;
    }
    const uint16_t* restrict half = (const uint16_t*)src + offset;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        union { uint32_t bits; float value; } cast;
        cast.bits = (uint32_t)half[j] << 16;
        dst[j] = cast.value;
    }
}

/* rows[r][0..n) for r < nrows (rows `stride` elements apart from `offset`) as float32: in place when the input
 * is float32 (returns a pointer into it, rows `stride` apart), else widened into dst (rows TILE apart), four rows
 * per pass so that four memory streams are in flight. *row_stride receives the stride of what is returned. */
static const float* tile_rows(float* restrict dst, const void* src, int bf16, int64_t offset, int64_t stride,
                              int64_t nrows, int64_t n, int64_t* row_stride) {
    if (!bf16) {
        *row_stride = stride;
        return (const float*)src + offset;
    }
    const uint16_t* base = (const uint16_t*)src + offset;
    int64_t r = 0;
    for (; r + 4 <= nrows; r += 4) {
        const uint16_t *h0 = base + r * stride, *h1 = h0 + stride, *h2 = h1 + stride, *h3 = h2 + stride;
        float *d0 = dst + r * TILE, *d1 = d0 + TILE, *d2 = d1 + TILE, *d3 = d2 + TILE;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            union { uint32_t bits; float value; } c0, c1, c2, c3;
            c0.bits = (uint32_t)h0[j] << 16, c1.bits = (uint32_t)h1[j] << 16;
            c2.bits = (uint32_t)h2[j] << 16, c3.bits = (uint32_t)h3[j] << 16;
            d0[j] = c0.value, d1[j] = c1.value, d2[j] = c2.value, d3[j] = c3.value;
        }
    }
    for (; r < nrows; ++r) widen(dst + r * TILE, src, 1, offset + r * stride, n);
    *row_stride = TILE;
    return dst;
}

/* per thread: coefficients [n k], gradient tiles [GROUP][TILE], and for bfloat16 inputs their widened V_s and
 * V_{s+1} tiles [k][TILE] each and the reference update, next validation gradient and coupled decay tiles */
static int64_t scratch_floats(const replay_args* a) { return a->n * a->k + (GROUP + 2 * a->k + 3) * TILE; }

static void replay_range(replay_args* a, int thread_id, int64_t begin, int64_t end) {
    const int64_t d = a->d, k = a->k, n = a->n;
    float* coeff = a->scratch + thread_id * scratch_floats(a);
    float* grad[GROUP];
    for (int q = 0; q < GROUP; ++q) grad[q] = coeff + n * k + q * TILE;
    float* vs_tile = grad[GROUP - 1] + TILE;  /* widened V_s tile [k][TILE] */
    float* vn_tile = vs_tile + k * TILE;      /* widened V_{s+1} tile */
    float* ref_tile = vn_tile + k * TILE;
    float* val_tile = ref_tile + TILE;
    float* cd_tile = val_tile + TILE;
    const int mask = a->bf16_mask;
    for (int64_t s = 0; s < a->length; ++s) {
        const int64_t current = s & 1, next = current ^ 1;
        /* this step's curvature coefficients lambda_r <Delta_s, v_r>, summed over the threads' ranges */
        for (int64_t i = 0; i < n; ++i) {
            for (int64_t r = 0; r < k; ++r) {
                double total = 0.0;
                for (int t = 0; t < a->nthreads; ++t) total += partial_slot(a, current, t, i)[r];
                coeff[i * k + r] = (float)(total * a->values[s * k + r]);
            }
            if (thread_id == 0) {
                double total = 0.0;
                for (int t = 0; t < a->nthreads; ++t) total += partial_slot(a, current, t, i)[k];
                a->val_dots[i * (a->length + 1) + s] = total;
            }
        }
        for (int64_t i = 0; i < n; ++i) memset(partial_slot(a, next, thread_id, i), 0, sizeof(double) * (size_t)(k + 1));

        const float lr = a->lr[s];
        const double bc1 = 1.0 - pow(a->beta1, (double)(s + 1)), bc2 = 1.0 - pow(a->beta2, (double)(s + 1));
        const float step_size = (float)(lr / bc1), inv_bc2_sqrt = (float)(1.0 / sqrt(bc2));
        const float b2 = (float)a->beta2, eps = (float)a->eps;
        const float one_minus_b1 = (float)(1.0 - a->beta1), one_minus_b2 = (float)(1.0 - a->beta2);
        const int have_next = s + 1 < a->length;  /* V_{s+1} is read only by a step that runs */
        const int coupled = a->coupled_decay != NULL;

        for (int64_t j0 = begin; j0 < end; j0 += TILE) {
            const int64_t w = (end - j0 < TILE) ? end - j0 : TILE;
            /* this tile of the step's shared rows (float32 read in place, bfloat16 widened once for all orders) */
            int64_t vs_stride, vn_stride = 0, unused;
            const float* vs = tile_rows(vs_tile, a->vectors, mask & BF16_VECTORS, s * k * d + j0, d, k, w, &vs_stride);
            const float* vn = have_next ? tile_rows(vn_tile, a->vectors, mask & BF16_VECTORS, (s + 1) * k * d + j0, d,
                                                    k, w, &vn_stride) : NULL;
            const float* ref = tile_rows(ref_tile, a->ref_updates, mask & BF16_REF, s * d + j0, 0, 1, w, &unused);
            const float* val_next = tile_rows(val_tile, a->val_grads, mask & BF16_VAL, (s + 1) * d + j0, 0, 1, w,
                                              &unused);
            const float* cd = coupled ? tile_rows(cd_tile, a->coupled_decay, mask & BF16_COUPLED, s * d + j0, 0, 1, w,
                                                  &unused) : NULL;
            for (int64_t i0 = 0; i0 < n; i0 += GROUP) {
                const int64_t group = n - i0 < GROUP ? n - i0 : GROUP;
                for (int64_t q = 0; q < group; ++q) {
                    const int64_t batch = a->orders[(i0 + q) * a->length + s];
                    widen(grad[q], a->pool_grads, mask & BF16_POOL, (s * a->nb + batch) * d + j0, w);
                }
                if (group == GROUP) {
                    add_combination4(grad[0], grad[1], grad[2], grad[3], coeff + i0 * k, k, vs, vs_stride, k, w);
                } else {
                    for (int64_t q = 0; q < group; ++q) add_combination(grad[q], coeff + (i0 + q) * k, vs, vs_stride, k, w);
                }
                for (int64_t q = 0; q < group; ++q) {
                    const int64_t i = i0 + q;
                    float* restrict g = grad[q];
                    float* restrict delta = a->delta + i * d + j0;
                    float* restrict m = a->exp_avg + i * d + j0;
                    float* restrict v = a->exp_avg_sq + i * d + j0;
                    if (coupled) {  /* Adam adds weight_decay * (theta_s + Delta_s) to the gradient */
                        if (a->decay_per_coord) {
                            const float* restrict wd = a->decay_per_coord + j0;
#pragma omp simd
                            for (int64_t j = 0; j < w; ++j) g[j] += cd[j] + wd[j] * delta[j];
                        } else {
#pragma omp simd
                            for (int64_t j = 0; j < w; ++j) g[j] += cd[j] + a->decay * delta[j];
                        }
                    } else if (a->decoupled && a->decay_per_coord) {  /* AdamW shrinks the parameter first */
                        const float* restrict wd = a->decay_per_coord + j0;
#pragma omp simd
                        for (int64_t j = 0; j < w; ++j) delta[j] *= 1.0f - lr * wd[j];
                    } else if (a->decoupled && a->decay != 0.0f) {
                        const float shrink = 1.0f - lr * a->decay;
#pragma omp simd
                        for (int64_t j = 0; j < w; ++j) delta[j] *= shrink;
                    }
#pragma omp simd
                    for (int64_t j = 0; j < w; ++j) {
                        const float mj = m[j] + one_minus_b1 * (g[j] - m[j]);
                        const float vj = b2 * v[j] + one_minus_b2 * g[j] * g[j];
                        m[j] = mj;
                        v[j] = vj;
                        delta[j] = delta[j] - step_size * mj / (sqrtf(vj) * inv_bc2_sqrt + eps) + lr * ref[j];
                    }
                }
                /* the projections step s + 1 needs, and the validation dot, of the new Delta */
                if (group == GROUP) {
                    const float* x[GROUP];
                    double* out[GROUP];
                    for (int64_t q = 0; q < GROUP; ++q) {
                        x[q] = a->delta + (i0 + q) * d + j0;
                        out[q] = partial_slot(a, next, thread_id, i0 + q);
                    }
                    if (have_next) add_dots4(x[0], x[1], x[2], x[3], vn, vn_stride, k, w, out[0], out[1], out[2], out[3]);
                    add_dots4(x[0], x[1], x[2], x[3], val_next, 0, 1, w, out[0] + k, out[1] + k, out[2] + k,
                              out[3] + k);
                } else {
                    for (int64_t q = 0; q < group; ++q) {
                        const float* x = a->delta + (i0 + q) * d + j0;
                        double* out = partial_slot(a, next, thread_id, i0 + q);
                        if (have_next) add_dots(x, vn, vn_stride, k, w, out);
                        add_dots(x, val_next, 0, 1, w, out + k);
                    }
                }
            }
        }
        pthread_barrier_wait(&a->barrier);
    }
    if (thread_id == 0) {  /* <Delta_L, val_grads[L]> */
        const int64_t last = a->length & 1;
        for (int64_t i = 0; i < n; ++i) {
            double total = 0.0;
            for (int t = 0; t < a->nthreads; ++t) total += partial_slot(a, last, t, i)[k];
            a->val_dots[i * (a->length + 1) + a->length] = total;
        }
    }
}

static void range_of(const replay_args* a, int thread_id, int64_t* begin, int64_t* end) {
    /* contiguous ranges, multiples of 16 coordinates so threads never share a cache line */
    const int64_t units = (a->d + 15) / 16;
    const int64_t per = units / a->nthreads, extra = units % a->nthreads;
    const int64_t first = thread_id * per + (thread_id < extra ? thread_id : extra);
    const int64_t count = per + (thread_id < extra ? 1 : 0);
    *begin = first * 16 < a->d ? first * 16 : a->d;
    *end = (first + count) * 16 < a->d ? (first + count) * 16 : a->d;
}

static void* thread_main(void* p) {
    thread_arg* t = (thread_arg*)p;
    pthread_mutex_lock(&t->a->lock);
    while (t->a->go == 0) pthread_cond_wait(&t->a->cond, &t->a->lock);
    const int run = t->a->go > 0;
    pthread_mutex_unlock(&t->a->lock);
    if (!run) return NULL;
    int64_t begin, end;
    range_of(t->a, t->thread_id, &begin, &end);
    replay_range(t->a, t->thread_id, begin, end);
    return NULL;
}

int lpl_adam_replay(const void* pool_grads, int64_t nb, int64_t d, const void* vectors, const float* values,
                    int64_t k, const void* ref_updates, const void* val_grads,
                    const void* coupled_decay, int bf16_mask, const float* decay_per_coord, float decay, int decoupled,
                    const float* lr, double beta1, double beta2, double eps, const int64_t* orders, int64_t n,
                    int64_t length, float* delta, float* exp_avg, float* exp_avg_sq, double* val_dots,
                    int nthreads) {
    replay_args a;
    memset(&a, 0, sizeof a);
    a.pool_grads = pool_grads; a.nb = nb; a.d = d; a.vectors = vectors; a.values = values; a.k = k;
    a.ref_updates = ref_updates; a.val_grads = val_grads; a.coupled_decay = coupled_decay;
    a.bf16_mask = bf16_mask;
    a.decay_per_coord = decay_per_coord; a.decay = decay; a.decoupled = decoupled; a.lr = lr; a.beta1 = beta1;
    a.beta2 = beta2; a.eps = eps; a.orders = orders; a.n = n; a.length = length; a.delta = delta;
    a.exp_avg = exp_avg; a.exp_avg_sq = exp_avg_sq; a.val_dots = val_dots;
    int64_t usable = (d + TILE - 1) / TILE;
    if (usable > nthreads) usable = nthreads;
    if (usable > MAX_THREADS) usable = MAX_THREADS;
    a.nthreads = usable < 1 ? 1 : (int)usable;
    a.partials = (double*)calloc((size_t)(2 * a.nthreads * n * (k + 1)), sizeof(double));
    a.scratch = (float*)malloc(sizeof(float) * (size_t)(a.nthreads * scratch_floats(&a)));
    if (!a.partials || !a.scratch) {
        free(a.partials);
        free(a.scratch);
        return 1;
    }
    if (pthread_barrier_init(&a.barrier, NULL, (unsigned)a.nthreads) != 0) {
        free(a.partials);
        free(a.scratch);
        return 2;
    }
    pthread_mutex_init(&a.lock, NULL);
    pthread_cond_init(&a.cond, NULL);
    pthread_t threads[MAX_THREADS];
    thread_arg args[MAX_THREADS];
    int started = 1;
    for (int t = 1; t < a.nthreads; ++t) {
        args[t].a = &a;
        args[t].thread_id = t;
        if (pthread_create(&threads[t], NULL, thread_main, &args[t]) != 0) break;
        started++;
    }
    const int status = started == a.nthreads ? 0 : 3;
    pthread_mutex_lock(&a.lock);
    a.go = status == 0 ? 1 : -1;
    pthread_cond_broadcast(&a.cond);
    pthread_mutex_unlock(&a.lock);
    if (status == 0) {
        args[0].a = &a;
        args[0].thread_id = 0;
        thread_main(&args[0]);
    }
    for (int t = 1; t < started; ++t) pthread_join(threads[t], NULL);
    pthread_barrier_destroy(&a.barrier);
    pthread_cond_destroy(&a.cond);
    pthread_mutex_destroy(&a.lock);
    free(a.partials);
    free(a.scratch);
    return status;
}
