/* Hand-written CPU kernels for four parts of the fused lattice step (cnn3d/fused.py): the
 * distant links' mix, the gated update, the whole functional expert, and the local expert's
 * weight gradient (its convolution itself stays oneDNN's).
 *
 * Built on first use by cnn3d/native.py with the system C compiler and loaded through ctypes;
 * without a compiler the step runs the same maths as torch ops. Each kernel is one pass over
 * the state forward and one back, where torch ops make one per neighbour or per expert (plus
 * zero-filled gradients and copies of strided views).
 *
 * Tensors are float32; outputs are contiguous [B, N, C] rows (N cells, C channels). Work is
 * split over the batch, one range of samples per thread, so scatters into a sample's own
 * gradient need no atomics. The threads are OpenMP's: this library links the process's
 * libgomp, which is torch's, so they are torch's intra-op threads, at the count the caller
 * passes (torch's own setting).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* glibc's libmvec (2.35 and newer on x86-64) has vector tanhf and expf: declared so, the loops below
 * call them 8 or 16 lanes at a time (its tanhf ran about 10x torch's own tanh on one AVX-512 core).
 * Without it they are scalar and slower than torch's ops, so the update and the functional expert
 * stay in torch ops there (cnn3d_vector_math tells the caller). */
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(CNN3D_NO_MVEC) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
#pragma omp declare simd notinbranch
extern float tanhf(float);
#pragma omp declare simd notinbranch
extern float expf(float);
#define VECTOR_MATH 1
#else
#define VECTOR_MATH 0
#endif

int cnn3d_vector_math(void) { return VECTOR_MATH; }

/* dot += sum_j x[j] * y[j] as a vector reduction, ending in a tree because the build allows sums to be
 * reassociated (without that, 16 dependent scalar adds) */
#define DOT(dot, x, y, n) \
    _Pragma("omp simd reduction(+ : dot)") for (int64_t j_ = 0; j_ < (n); j_++) dot += (x)[j_] * (y)[j_]

/* out[0:c] = sum_t w[t] * rows[t][0:c]. Sixteen channels at a time in a register (an accumulator
 * in memory would chain each row's adds through a store and a reload), the rest one by one. */
static inline void weighted_sum(float *restrict out, const float *const *restrict rows, const float *restrict w,
                                int64_t count, int64_t c) {
    int64_t j0 = 0;
    for (; j0 + 16 <= c; j0 += 16) {
        float acc[16] = {0.0f};
        for (int64_t t = 0; t < count; t++) {
            const float *restrict r = rows[t] + j0;
            const float wt = w[t];
#pragma omp simd
            for (int jj = 0; jj < 16; jj++) acc[jj] += wt * r[jj];
        }
        for (int jj = 0; jj < 16; jj++) out[j0 + jj] = acc[jj];
    }
    for (; j0 < c; j0++) {
        float sum = 0.0f;
        for (int64_t t = 0; t < count; t++) sum += w[t] * rows[t][j0];
        out[j0] = sum;
    }
}

#define MAX_TERMS 256 /* rows one weighted_sum may take: offsets, links or experts */

typedef void (*batch_fn)(const void *args, int64_t b0, int64_t b1, int thread);

/* Run fn over [0, batch) in contiguous chunks, one per OpenMP thread (torch's own pool: a second
 * pool of threads would fight torch's spinning workers for the cores). Returns the chunks used. */
static int parallel_over_batch(batch_fn fn, const void *args, int64_t batch, int threads) {
    if (threads < 1) threads = 1;
    if (threads > batch) threads = (int)batch;
    if (threads <= 1) {
        fn(args, 0, batch, 0);
        return 1;
    }
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), used = omp_get_num_threads();
        fn(args, batch * t / used, batch * (t + 1) / used, t);
    }
    return threads;
}

/* ------------------------------------------------------------------ link mix
 * out[b, n, :] = sum_l weights[l] * flat[b, links[n, l], :]
 * flat [B, N, C], links [N, L] (int64), weights [L], out [B, N, C].
 */
#define MAX_LINKS MAX_TERMS

typedef struct {
    const float *flat, *weights, *grad_out;
    float *out, *grad_flat;
    double *grad_weights_partial; /* [threads, L] */
    const int64_t *links;
    int64_t batch, n, l, c;
} link_args;

static void link_forward_chunk(const void *p, int64_t b0, int64_t b1, int thread) {
    const link_args *a = (const link_args *)p;
    (void)thread;
    const int64_t n = a->n, l = a->l, c = a->c;
    for (int64_t b = b0; b < b1; b++) {
        const float *base = a->flat + b * n * c;
        for (int64_t i = 0; i < n; i++) {
            const float *rows[MAX_TERMS];
            for (int64_t s = 0; s < l; s++) rows[s] = base + a->links[i * l + s] * c;
            weighted_sum(a->out + (b * n + i) * c, rows, a->weights, l, c);
        }
    }
}

static void link_backward_chunk(const void *p, int64_t b0, int64_t b1, int thread) {
    const link_args *a = (const link_args *)p;
    const int64_t n = a->n, l = a->l, c = a->c;
    /* this thread's sums in a local array, written once at the end: the threads' rows of the partial
     * sums share cache lines, and adding into them in the loop made 2 threads slower than 1 */
    double local[MAX_LINKS] = {0.0};
    double *partial = a->grad_weights_partial ? local : NULL;
    if (a->grad_flat) memset(a->grad_flat + b0 * n * c, 0, (size_t)((b1 - b0) * n * c) * sizeof(float));
    for (int64_t b = b0; b < b1; b++) {
        const float *base = a->flat + b * n * c;
        float *grad_base = a->grad_flat ? a->grad_flat + b * n * c : NULL;
        for (int64_t i = 0; i < n; i++) {
            const float *restrict g = a->grad_out + (b * n + i) * c;
            for (int64_t s = 0; s < l; s++) {
                const int64_t partner = a->links[i * l + s] * c;
                if (partial) {
                    const float *restrict src = base + partner;
                    float dot = 0.0f;
                    DOT(dot, src, g, c);
                    partial[s] += dot;
                }
                if (grad_base) {
                    const float ws = a->weights[s];
                    float *restrict dst = grad_base + partner;
                    for (int64_t j = 0; j < c; j++) dst[j] += ws * g[j];
                }
            }
        }
    }
    if (partial)
        for (int64_t s = 0; s < l; s++) a->grad_weights_partial[(int64_t)thread * l + s] = local[s];
}

int cnn3d_link_forward(const float *flat, const float *weights, float *out, const int64_t *links, int64_t batch,
                       int64_t n, int64_t l, int64_t c, int threads) {
    if (l > MAX_LINKS) return -1;
    link_args a = {flat, weights, NULL, out, NULL, NULL, links, batch, n, l, c};
    return parallel_over_batch(link_forward_chunk, &a, batch, threads);
}

/* grad_weights_partial [threads, L] must come zeroed; the caller sums it over threads. Both
 * directions return -1 (nothing done) past MAX_LINKS links. */
int cnn3d_link_backward(const float *flat, const float *weights, const float *grad_out, float *grad_flat,
                        double *grad_weights_partial, const int64_t *links, int64_t batch, int64_t n, int64_t l,
                        int64_t c, int threads) {
    if (l > MAX_LINKS) return -1;
    link_args a = {flat, weights, grad_out, NULL, grad_flat, grad_weights_partial, links, batch, n, l, c};
    return parallel_over_batch(link_backward_chunk, &a, batch, threads);
}

/* ------------------------------------------------------------------ gated update
 * new[b, n, :] = rows + rate * (tanh(sum_e gates[e, b, n] * outs[e][b, n, :]) - rows)
 * rows and each of the E expert outputs [B, N, C], gates [E, B, N]. The forward also keeps
 * t = tanh(...) [B, N, C] for the backward, which needs nothing else of the sum.
 */
#define MAX_EXPERTS 16   /* <= MAX_TERMS */
#define MAX_CHANNELS 512 /* the message rows on the stack */

typedef struct {
    const float *rows, *gates, *t, *grad_new;
    const float *const *outs;
    float *new_rows, *t_out, *grad_rows, *grad_gates;
    float *const *grad_outs;
    int64_t e, batch, n, c;
    float rate;
} update_args;

static void update_forward_chunk(const void *p, int64_t b0, int64_t b1, int thread) {
    const update_args *a = (const update_args *)p;
    (void)thread;
    const int64_t n = a->n, c = a->c;
    float message[MAX_CHANNELS];
    for (int64_t b = b0; b < b1; b++)
        for (int64_t i = 0; i < n; i++) {
            const int64_t at = (b * n + i) * c;
            const float *terms[MAX_EXPERTS];
            float w[MAX_EXPERTS];
            for (int64_t e = 0; e < a->e; e++) {
                w[e] = a->gates[(e * a->batch + b) * n + i];
                terms[e] = a->outs[e] + at;
            }
            weighted_sum(message, terms, w, a->e, c);
            const float *restrict rows = a->rows + at;
            float *restrict t = a->t_out + at, *restrict next = a->new_rows + at;
#pragma omp simd
            for (int64_t j = 0; j < c; j++) {
                t[j] = tanhf(message[j]);
                next[j] = rows[j] + a->rate * (t[j] - rows[j]);
            }
        }
}

static void update_backward_chunk(const void *p, int64_t b0, int64_t b1, int thread) {
    const update_args *a = (const update_args *)p;
    (void)thread;
    const int64_t n = a->n, c = a->c;
    float grad_message[MAX_CHANNELS];
    for (int64_t b = b0; b < b1; b++)
        for (int64_t i = 0; i < n; i++) {
            const int64_t at = (b * n + i) * c;
            const float *restrict g = a->grad_new + at, *restrict t = a->t + at;
            if (a->grad_rows)
                for (int64_t j = 0; j < c; j++) a->grad_rows[at + j] = (1.0f - a->rate) * g[j];
            for (int64_t j = 0; j < c; j++) grad_message[j] = a->rate * g[j] * (1.0f - t[j] * t[j]);
            for (int64_t e = 0; e < a->e; e++) {
                const int64_t gate_at = (e * a->batch + b) * n + i;
                if (a->grad_outs[e]) {
                    const float gate = a->gates[gate_at];
                    float *restrict dst = a->grad_outs[e] + at;
                    for (int64_t j = 0; j < c; j++) dst[j] = gate * grad_message[j];
                }
                if (a->grad_gates) {
                    const float *restrict out = a->outs[e] + at;
                    float dot = 0.0f;
                    DOT(dot, out, grad_message, c);
                    a->grad_gates[gate_at] = dot;
                }
            }
        }
}

/* Returns -1 (nothing done) past MAX_EXPERTS experts or MAX_CHANNELS channels. */
int cnn3d_update_forward(const float *rows, const float *gates, const float *const *outs, float *new_rows, float *t,
                         float rate, int64_t e, int64_t batch, int64_t n, int64_t c, int threads) {
    if (e > MAX_EXPERTS || c > MAX_CHANNELS) return -1;
    update_args a = {rows, gates, NULL, NULL, outs, new_rows, t, NULL, NULL, NULL, e, batch, n, c, rate};
    return parallel_over_batch(update_forward_chunk, &a, batch, threads);
}

/* grad_rows, grad_gates and any grad_outs[e] may be NULL (not wanted); the others are fully written. */
int cnn3d_update_backward(const float *gates, const float *const *outs, const float *t, const float *grad_new,
                          float *grad_rows, float *grad_gates, float *const *grad_outs, float rate, int64_t e,
                          int64_t batch, int64_t n, int64_t c, int threads) {
    if (e > MAX_EXPERTS || c > MAX_CHANNELS) return -1;
    update_args a = {NULL, gates, t, grad_new, outs, NULL, NULL, grad_rows, grad_gates, grad_outs, e, batch, n, c, rate};
    return parallel_over_batch(update_backward_chunk, &a, batch, threads);
}

/* ------------------------------------------------------------------ functional expert
 * The attention expert on rows of N cells. Per cell i, with read[i, k] its neighbour through
 * offset k (-1: none, past a zero border):
 *   logit[k] = leaky_relu(dst[i] + src[read[i, k]], 0.2) + bias[k]       (no neighbour: excluded)
 *   attn[k]  = softmax_k(logit)
 *   message  = sum_k attn[k] * value[read[i, k], :]
 *   out[i]   = sigmoid(gate[i, :]) * message
 * gate (C columns), dst and src (one column each) are consecutive columns of `score` rows of
 * `score_stride` floats; `value` rows are `value_stride` floats apart (both are column slices of
 * the step's one projection, read in place). The forward keeps attn [K, B, N] for the backward.
 */
#define MAX_OFFSETS MAX_TERMS

typedef struct {
    const float *score, *value, *bias, *attn, *grad_out;
    float *out, *attn_out, *grad_score, *grad_value;
    double *grad_bias_partial; /* [threads, K] */
    const int32_t *read, *readers, *read_t; /* read_t: read transposed, [K, N], "none" as N */
    float *scratch;                         /* [threads, functional_scratch(N, C, K)] */
    int64_t score_stride, value_stride, k, batch, n, c;
} functional_args;

/* floats of scratch each thread needs (the caller allocates threads x this) */
int64_t cnn3d_functional_scratch(int64_t n, int64_t c, int64_t k) { return 4 * (n + 1) + 2 * c + n * c + k * n; }
#define functional_scratch cnn3d_functional_scratch

/* The attention of one sample, vectorised over cells (one offset at a time, as torch would, but
 * on a sample that stays in cache): logits [K, N] -> softmax weights in place. dst, src [N + 1];
 * read_t [K, N] is `read` transposed with "no neighbour" as N (src[N] = 0), so the gather is
 * unconditional and vectorises. */
static void attention(const functional_args *a, const float *dst, const float *src, const int32_t *read_t,
                      float *restrict attn, int64_t b, float *restrict top, float *restrict total) {
    const int64_t n = a->n, kk = a->k;
    for (int64_t i = 0; i < n; i++) top[i] = -INFINITY, total[i] = 0.0f;
    for (int64_t k = 0; k < kk; k++) {
        float *restrict logit = attn + (k * a->batch + b) * n;
        const int32_t *restrict q = read_t + k * n;
        const float bias = a->bias[k];
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            const float pre = dst[i] + src[q[i]];
            const float x = q[i] == n ? -INFINITY : (pre > 0.0f ? pre : 0.2f * pre) + bias;
            logit[i] = x;
            top[i] = x > top[i] ? x : top[i];
        }
    }
    for (int64_t k = 0; k < kk; k++) {
        float *restrict w = attn + (k * a->batch + b) * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            w[i] = expf(w[i] - top[i]);
            total[i] += w[i];
        }
    }
    for (int64_t i = 0; i < n; i++) total[i] = 1.0f / total[i];
    for (int64_t k = 0; k < kk; k++) {
        float *restrict w = attn + (k * a->batch + b) * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) w[i] *= total[i];
    }
}

/* dst and src columns of one sample, contiguous, with src[n] = 0 (see attention) */
static void score_columns(const functional_args *a, const float *score, float *dst, float *src) {
    const int64_t n = a->n, ss = a->score_stride, c = a->c;
    for (int64_t i = 0; i < n; i++) dst[i] = score[i * ss + c], src[i] = score[i * ss + c + 1];
    dst[n] = src[n] = 0.0f;
}

static void functional_forward_chunk(const void *p, int64_t b0, int64_t b1, int thread) {
    const functional_args *a = (const functional_args *)p;
    const int64_t n = a->n, c = a->c, kk = a->k, ss = a->score_stride, vs = a->value_stride;
    float *dst = a->scratch + (int64_t)thread * functional_scratch(n, c, kk);
    float *src = dst + n + 1, *top = src + n + 1, *total = top + n + 1, *message = total + n + 1;
    for (int64_t b = b0; b < b1; b++) {
        const float *score = a->score + b * n * ss, *value = a->value + b * n * vs;
        score_columns(a, score, dst, src);
        attention(a, dst, src, a->read_t, a->attn_out, b, top, total);
        for (int64_t i = 0; i < n; i++) {
            const float *rows[MAX_TERMS];
            float w[MAX_TERMS];
            int64_t count = 0;
            for (int64_t k = 0; k < kk; k++) {
                const int32_t q = a->read[i * kk + k];
                if (q < 0) continue;
                w[count] = a->attn_out[(k * a->batch + b) * n + i];
                rows[count++] = value + (int64_t)q * vs;
            }
            weighted_sum(message, rows, w, count, c);
            const float *restrict gate = score + i * ss;
            float *restrict out = a->out + (b * n + i) * c;
#pragma omp simd
            for (int64_t j = 0; j < c; j++) out[j] = message[j] / (1.0f + expf(-gate[j]));
        }
    }
}

static void functional_backward_chunk(const void *p, int64_t b0, int64_t b1, int thread) {
    const functional_args *a = (const functional_args *)p;
    const int64_t n = a->n, c = a->c, kk = a->k, ss = a->score_stride, vs = a->value_stride, gs = c + 2;
    /* this thread's scratch, reused for each of its samples (so it stays in cache): the dst and src
     * columns, two per-cell sums, one row of sigmoids and one of message, the message's gradient
     * [N, C] and the logits' [K, N] */
    float *dst = a->scratch + (int64_t)thread * functional_scratch(n, c, kk);
    float *src = dst + n + 1, *mean = src + n + 1, *grad_dst = mean + n + 1, *sig = grad_dst + n + 1;
    float *message = sig + c, *gm_base = message + c, *grad_pre = gm_base + n * c;
    double bias_sum[MAX_OFFSETS] = {0.0};
    for (int64_t b = b0; b < b1; b++) {
        const float *score = a->score + b * n * ss, *value = a->value + b * n * vs;
        float *grad_score = a->grad_score + b * n * gs;
        score_columns(a, score, dst, src);
        /* per cell: the message again (cheaper than keeping it), its gradient, the gate's, and
         * d loss / d attn (into grad_pre) from one read of each neighbour's value */
        for (int64_t i = 0; i < n; i++) {
            const float *restrict gate = score + i * ss, *restrict g = a->grad_out + (b * n + i) * c;
            float *restrict grad_gate = grad_score + i * gs, *restrict gm = gm_base + i * c;
#pragma omp simd
            for (int64_t j = 0; j < c; j++) {
                sig[j] = 1.0f / (1.0f + expf(-gate[j]));
                gm[j] = g[j] * sig[j];
            }
            const float *rows[MAX_TERMS];
            float w[MAX_TERMS];
            int64_t count = 0;
            for (int64_t k = 0; k < kk; k++) {
                const int32_t q = a->read[i * kk + k];
                float dot = 0.0f;
                if (q >= 0) {
                    const float *restrict v = value + (int64_t)q * vs;
                    DOT(dot, v, gm, c);
                    w[count] = a->attn[(k * a->batch + b) * n + i];
                    rows[count++] = v;
                }
                grad_pre[k * n + i] = dot;
            }
            weighted_sum(message, rows, w, count, c);
            for (int64_t j = 0; j < c; j++) grad_gate[j] = g[j] * message[j] * sig[j] * (1.0f - sig[j]);
        }
        /* over cells, one offset at a time: softmax and leaky_relu backward */
        for (int64_t i = 0; i < n; i++) mean[i] = 0.0f, grad_dst[i] = 0.0f;
        for (int64_t k = 0; k < kk; k++) {
            const float *restrict w = a->attn + (k * a->batch + b) * n, *restrict ga = grad_pre + k * n;
#pragma omp simd
            for (int64_t i = 0; i < n; i++) mean[i] += w[i] * ga[i];
        }
        for (int64_t k = 0; k < kk; k++) {
            const float *restrict w = a->attn + (k * a->batch + b) * n;
            float *restrict gp = grad_pre + k * n;
            const int32_t *restrict q = a->read_t + k * n;
            float bias = 0.0f;
#pragma omp simd reduction(+ : bias)
            for (int64_t i = 0; i < n; i++) {
                const float grad_logit = w[i] * (gp[i] - mean[i]); /* 0 where there is no neighbour (w = 0) */
                const float pre = dst[i] + src[q[i]];
                const float grad_pre = pre > 0.0f ? grad_logit : 0.2f * grad_logit;
                gp[i] = grad_pre;
                grad_dst[i] += grad_pre;
                bias += grad_logit;
            }
            bias_sum[k] += bias;
        }
        /* per cell: what its readers send back to its value and its src column */
        for (int64_t i = 0; i < n; i++) {
            const float *rows[MAX_TERMS];
            float w[MAX_TERMS];
            int64_t count = 0;
            float grad_src = 0.0f;
            for (int64_t k = 0; k < kk; k++) {
                const int32_t r = a->readers[i * kk + k];
                if (r < 0) continue;
                w[count] = a->attn[(k * a->batch + b) * n + r];
                rows[count++] = gm_base + (int64_t)r * c;
                grad_src += grad_pre[k * n + r];
            }
            weighted_sum(a->grad_value + (b * n + i) * c, rows, w, count, c);
            grad_score[i * gs + c] = grad_dst[i];
            grad_score[i * gs + c + 1] = grad_src;
        }
    }
    for (int64_t k = 0; k < kk; k++) a->grad_bias_partial[(int64_t)thread * kk + k] = bias_sum[k];
}

/* -1 (nothing done) past MAX_OFFSETS offsets. */
int cnn3d_functional_forward(const float *score, int64_t score_stride, const float *value, int64_t value_stride,
                             const float *bias, const int32_t *read, const int32_t *read_t, float *scratch,
                             float *out, float *attn, int64_t k, int64_t batch, int64_t n, int64_t c, int threads) {
    if (k > MAX_OFFSETS) return -1;
    functional_args a = {score, value, bias, NULL, NULL, out, attn, NULL, NULL, NULL,
                         read, NULL, read_t, scratch, score_stride, value_stride, k, batch, n, c};
    return parallel_over_batch(functional_forward_chunk, &a, batch, threads);
}

/* grad_score [B, N, C+2] (gate, dst, src), grad_value [B, N, C] and grad_bias_partial [threads, K]
 * (the caller sums it) are fully written. */
int cnn3d_functional_backward(const float *score, int64_t score_stride, const float *value, int64_t value_stride,
                              const float *attn, const float *grad_out, const int32_t *read,
                              const int32_t *readers, const int32_t *read_t, float *scratch, float *grad_score,
                              float *grad_value, double *grad_bias_partial, int64_t k, int64_t batch, int64_t n,
                              int64_t c, int threads) {
    if (k > MAX_OFFSETS) return -1;
    functional_args a = {score, value, NULL, attn, grad_out, NULL, NULL, grad_score, grad_value, grad_bias_partial,
                         read, readers, read_t, scratch, score_stride, value_stride, k, batch, n, c};
    return parallel_over_batch(functional_backward_chunk, &a, batch, threads);
}

/* ------------------------------------------------------------------ stencil weight gradient
 * grad_w[k, o, i] = sum_b sum_p g[b, p, o] * x[b, p + off_k - pad, i] for the 27 offsets k = (kz * 3 + ky) * 3 + kx
 * of a 3x3x3 convolution, stride 1. g [B, D, H, W, Co] and x [B, Dx, Hx, Wx, Ci] are channels-last rows; with
 * pad = 1, x has the output's size and reads past its border are zeros (skipped); with pad = 0, x is the
 * circularly padded source (D + 2, ...). oneDNN's weight gradient ran at a third of its forward's rate on these
 * shapes; here each offset and block of four output channels keeps its 4 x 16 sums in registers over every
 * position of the thread's samples, so the loop is loads and FMAs only.
 * partial [threads, 27, Co, Ci] (zeroed here, then summed into): the caller sums the threads' rows.
 */
typedef struct {
    const float *g, *x;
    float *partial;
    int64_t d, h, w, co, ci, pad;
} wgrad_args;

#define WG_O 4  /* output channels per register block */
#define WG_I 16 /* input channels per register block */

static void wgrad_block(const wgrad_args *a, int64_t b0, int64_t b1, int kz, int ky, int kx, int64_t o0, int64_t i0,
                        float *restrict out) {
    const int64_t d = a->d, h = a->h, w = a->w, co = a->co, ci = a->ci, pad = a->pad;
    const int64_t dx = d + 2 - 2 * pad, hx = h + 2 - 2 * pad, wx = w + 2 - 2 * pad;
    /* output positions whose source lies inside x */
    const int64_t z_lo = pad - kz > 0 ? pad - kz : 0, z_hi = dx - kz + pad < d ? dx - kz + pad : d;
    const int64_t y_lo = pad - ky > 0 ? pad - ky : 0, y_hi = hx - ky + pad < h ? hx - ky + pad : h;
    const int64_t x_lo = pad - kx > 0 ? pad - kx : 0, x_hi = wx - kx + pad < w ? wx - kx + pad : w;
    float acc[WG_O][WG_I];
    for (int oo = 0; oo < WG_O; oo++)
        for (int ii = 0; ii < WG_I; ii++) acc[oo][ii] = out[(o0 + oo) * ci + i0 + ii];
    for (int64_t b = b0; b < b1; b++)
        for (int64_t z = z_lo; z < z_hi; z++)
            for (int64_t y = y_lo; y < y_hi; y++) {
                const float *restrict grow = a->g + (((b * d + z) * h + y) * w) * co + o0;
                const float *restrict xrow =
                    a->x + (((b * dx + z + kz - pad) * hx + y + ky - pad) * wx + kx - pad) * ci + i0;
                for (int64_t p = x_lo; p < x_hi; p++) {
                    const float *restrict gv = grow + p * co;
                    const float *restrict xv = xrow + p * ci;
                    for (int oo = 0; oo < WG_O; oo++) {
                        const float gs = gv[oo];
#pragma omp simd
                        for (int ii = 0; ii < WG_I; ii++) acc[oo][ii] += gs * xv[ii];
                    }
                }
            }
    for (int oo = 0; oo < WG_O; oo++)
        for (int ii = 0; ii < WG_I; ii++) out[(o0 + oo) * ci + i0 + ii] = acc[oo][ii];
}

#if defined(__AVX512F__)
/* The same block, 8 output channels x 16 input channels, as 512-bit registers: a build tuned for a
 * CPU that prefers 256-bit vectors (gcc's znver tunings) compiles wgrad_block to 8 ymm sums, which
 * runs at half the FMA rate of an AVX-512 core, where oneDNN's own weight gradient uses zmm and was
 * twice as fast as that. Blocks of 16 output channels (8 for what is left): the independent sums
 * cover the FMA latency, and each position loads 16 inputs once for 16 broadcast gradients. Per sum,
 * the adds come in the same order as in wgrad_block. */
#define WG_O_WIDE 16
static inline __attribute__((always_inline)) void wgrad_block_wide(const wgrad_args *a, int64_t b, int kz, int ky,
                                                                   int kx, int64_t o0, int64_t i0, float *restrict out,
                                                                   const int nout) {
    const int64_t d = a->d, h = a->h, w = a->w, co = a->co, ci = a->ci, pad = a->pad;
    const int64_t dx = d + 2 - 2 * pad, hx = h + 2 - 2 * pad, wx = w + 2 - 2 * pad;
    const int64_t z_lo = pad - kz > 0 ? pad - kz : 0, z_hi = dx - kz + pad < d ? dx - kz + pad : d;
    const int64_t y_lo = pad - ky > 0 ? pad - ky : 0, y_hi = hx - ky + pad < h ? hx - ky + pad : h;
    const int64_t x_lo = pad - kx > 0 ? pad - kx : 0, x_hi = wx - kx + pad < w ? wx - kx + pad : w;
    __m512 acc[WG_O_WIDE];
    for (int oo = 0; oo < nout; oo++) acc[oo] = _mm512_loadu_ps(out + (o0 + oo) * ci + i0);
    for (int64_t z = z_lo; z < z_hi; z++)
        for (int64_t y = y_lo; y < y_hi; y++) {
            const float *restrict grow = a->g + (((b * d + z) * h + y) * w) * co + o0;
            const float *restrict xrow = a->x + (((b * dx + z + kz - pad) * hx + y + ky - pad) * wx + kx - pad) * ci + i0;
            for (int64_t p = x_lo; p < x_hi; p++) {
                const __m512 xv = _mm512_loadu_ps(xrow + p * ci);
                const float *restrict gv = grow + p * co;
                for (int oo = 0; oo < nout; oo++) acc[oo] = _mm512_fmadd_ps(_mm512_set1_ps(gv[oo]), xv, acc[oo]);
            }
        }
    for (int oo = 0; oo < nout; oo++) _mm512_storeu_ps(out + (o0 + oo) * ci + i0, acc[oo]);
}
#endif

static void wgrad_chunk(const void *p, int64_t b0, int64_t b1, int thread) {
    const wgrad_args *a = (const wgrad_args *)p;
    const int64_t co = a->co, ci = a->ci;
    float *part = a->partial + (int64_t)thread * 27 * co * ci;
    memset(part, 0, (size_t)(27 * co * ci) * sizeof(float));
    /* one sample at a time: its rows of g and x stay in cache over the 27 x (Co / 4) passes */
    for (int64_t b = b0; b < b1; b++)
        for (int k = 0; k < 27; k++) {
            float *out = part + (int64_t)k * co * ci;
            int64_t o0 = 0;
#if defined(__AVX512F__)
            for (; o0 + 16 <= co; o0 += 16)
                for (int64_t i0 = 0; i0 < ci; i0 += WG_I) wgrad_block_wide(a, b, k / 9, (k / 3) % 3, k % 3, o0, i0, out, 16);
            for (; o0 + 8 <= co; o0 += 8)
                for (int64_t i0 = 0; i0 < ci; i0 += WG_I) wgrad_block_wide(a, b, k / 9, (k / 3) % 3, k % 3, o0, i0, out, 8);
#endif
            for (; o0 < co; o0 += WG_O)
                for (int64_t i0 = 0; i0 < ci; i0 += WG_I) wgrad_block(a, b, b + 1, k / 9, (k / 3) % 3, k % 3, o0, i0, out);
        }
}

/* Returns -1 (nothing done) unless Co is a multiple of 4 and Ci of 16; the caller uses torch's then. */
int cnn3d_stencil_weight_grad(const float *g, const float *x, float *partial, int64_t batch, int64_t d, int64_t h,
                              int64_t w, int64_t co, int64_t ci, int64_t pad, int threads) {
    if (co % WG_O || ci % WG_I) return -1;
    wgrad_args a = {g, x, partial, d, h, w, co, ci, pad};
    return parallel_over_batch(wgrad_chunk, &a, batch, threads);
}
