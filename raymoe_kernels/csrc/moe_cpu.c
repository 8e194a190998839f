/* Mixture-of-Experts routing and routed-expert compute on CPU (raymoe_kernels.cpu builds and loads this).
 *
 * raymoe_moe_route: the noaux_tc router after its GEMM and sigmoid (raymoe.model.moe.Gate), per token:
 *   choice = scores + bias                                      bias only chooses, as in the checkpoint
 *   groups: the topk_group groups with the largest sum of their 2 best choices (n_group > 1)
 *   ids    = the top_k largest choices inside those groups     ties: the lower expert id
 *   w      = scores[ids] (/ their sum + 1e-20 when norm) * scale
 * One pass over a token's E scores instead of ~12 tensor ops (topk, masks, gathers) that each cost more
 * than the arithmetic at decode sizes. The ids come out in descending order of choice.
 *
 * raymoe_moe_experts: out[t] = sum over k of w[t,k] * expert_{ids[t,k]}(x[t]) for the experts hosted here
 * (`local` maps a global id to its stack index; == E: hosted elsewhere), SwiGLU experts stacked
 * input-dim-major: w13 [E, D, 2I] (gate | up), w2 [E, I, D], all fp32. Tokens are split over threads; a
 * thread groups its (token, k) pairs by expert and runs each expert as GEMMs over 4-row tiles. A row's
 * arithmetic does not depend on the other rows of its tile, the batch or the thread count, so a token gets
 * the same bits whatever it is batched with. Each token's terms (w * y, rounded) are added in ascending expert
 * order, no fused multiply-add, so with top-2 routing the partial sums of shards add up to the full sum bit for bit.
 *
 * GCC/Clang vector extensions (8 lanes), as mla_decode_cpu.c. Both return 0; -1 for an expert id outside
 * [-1, n_routed] (route: a bad shape); -2 when scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "vec8.h"

/* ---------------------------------------------------------------------------------------------- routing */

/* indices of the k largest v[0..n) into idx, in descending order (ties: the lower index first), by insertion
 * into a sorted list of k: one compare per element once the list is full; k <= n, val: scratch [k] */
static void top_k_desc(const float *v, int64_t n, int64_t k, int64_t *idx, float *val) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (m == k && !(v[i] > val[k - 1])) continue;
        int64_t j = m < k ? m : k - 1;  /* the slot it takes before shifting: the end, or the dropped last */
        while (j > 0 && v[i] > val[j - 1]) {
            val[j] = val[j - 1];
            idx[j] = idx[j - 1];
            j--;
        }
        val[j] = v[i];
        idx[j] = i;
        if (m < k) m++;
    }
}

int raymoe_moe_route(const float *scores, int64_t T, int64_t E, const float *bias, int64_t n_group,
                     int64_t topk_group, int64_t top_k, int norm, float scale, int64_t *ids, float *weights) {
    if (E < 1 || top_k < 1 || top_k > E || n_group < 1 || E % n_group != 0 || topk_group < 1 || topk_group > n_group ||
        top_k > topk_group * (E / n_group))
        return -1;
    const int64_t gsize = E / n_group;
    float *choice = (float *)malloc(sizeof(float) * (size_t)(2 * E + 2 * n_group + 2));
    int64_t *gidx = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n_group + 2));
    if (choice == NULL || gidx == NULL) {
        free(choice);
        free(gidx);
        return -2;
    }
    float *gscore = choice + E, *val = gscore + n_group;  /* val: top_k_desc's scratch */
    for (int64_t t = 0; t < T; t++) {
        const float *s = scores + t * E;
        for (int64_t e = 0; e < E; e++) choice[e] = s[e] + bias[e];
        if (n_group > 1) {
            for (int64_t g = 0; g < n_group; g++) {
                const float *c = choice + g * gsize;
                if (gsize <= 2) {
                    gscore[g] = gsize == 2 ? c[0] + c[1] : c[0];
                } else {
                    int64_t two[2];
                    top_k_desc(c, gsize, 2, two, val);
                    gscore[g] = c[two[0]] + c[two[1]];
                }
            }
            top_k_desc(gscore, n_group, topk_group, gidx, val);
            for (int64_t g = 0; g < n_group; g++) {
                int keep = 0;
                for (int64_t j = 0; j < topk_group; j++) keep |= gidx[j] == g;
                if (!keep)
                    for (int64_t e = g * gsize; e < (g + 1) * gsize; e++) choice[e] = -INFINITY;
            }
        }
        int64_t *id = ids + t * top_k;
        float *w = weights + t * top_k;
        top_k_desc(choice, E, top_k, id, val);
        float sum = 0.0f;
        for (int64_t j = 0; j < top_k; j++) {
            w[j] = s[id[j]];
            sum += w[j];
        }
        const float denom = sum + 1e-20f;
        for (int64_t j = 0; j < top_k; j++) w[j] = (norm ? w[j] / denom : w[j]) * scale;
    }
    free(choice);
    free(gidx);
    return 0;
}

/* -------------------------------------------------------------------------------------- routed experts */

#define ROWS 4

/* y[r][0..N) = sum over d of x[r][d] * w[d][0..N), for the ROWS rows of x (stride ldx; y stride ldy); w [K, N]
 * row-major. Each output is one multiply-add chain over d in order, and which code path computes a column depends
 * only on N: a row's values never depend on the other rows. */
static void gemm_rows(const float *x, int64_t ldx, const float *w, int64_t K, int64_t N, float *y, int64_t ldy) {
    int64_t c = 0;
    for (; c + 16 <= N; c += 16) {
        v8f acc[ROWS][2];
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = splat8(0.0f);
        for (int64_t d = 0; d < K; d++) {
            const v8f w0 = load8(w + d * N + c), w1 = load8(w + d * N + c + 8);
            for (int r = 0; r < ROWS; r++) {
                const v8f xr = splat8(x[r * ldx + d]);
                acc[r][0] += xr * w0;
                acc[r][1] += xr * w1;
            }
        }
        for (int r = 0; r < ROWS; r++) {
            store8(y + r * ldy + c, acc[r][0]);
            store8(y + r * ldy + c + 8, acc[r][1]);
        }
    }
    for (; c + 8 <= N; c += 8) {
        v8f acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = splat8(0.0f);
        for (int64_t d = 0; d < K; d++) {
            const v8f w0 = load8(w + d * N + c);
            for (int r = 0; r < ROWS; r++) acc[r] += splat8(x[r * ldx + d]) * w0;
        }
        for (int r = 0; r < ROWS; r++) store8(y + r * ldy + c, acc[r]);
    }
    for (; c < N; c++)
        for (int r = 0; r < ROWS; r++) {
            float a = 0.0f;
            for (int64_t d = 0; d < K; d++) a += x[r * ldx + d] * w[d * N + c];
            y[r * ldy + c] = a;
        }
}

/* a[r][i] = silu(h[r][i]) * h[r][I + i] for ROWS rows of h [ROWS, 2I]; silu(g) = g * sigmoid(g), the sigmoid from
 * e = exp(-|g|) <= 1 (1 / (1 + e) for g >= 0, e / (1 + e) below): vectorised, where a scalar expf per element
 * cost ~40% of the kernel at the tiny model's sizes */
static inline float silu1(float g) {
    const float e = expf(-fabsf(g));
    return g * (g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e));
}

static void swiglu_rows(const float *h, int64_t I, float *a) {
    for (int r = 0; r < ROWS; r++) {
        const float *g = h + r * 2 * I, *u = g + I;
        float *o = a + r * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            const v8f gv = load8(g + i);
            const v8i neg = gv < splat8(0.0f);
            const v8f e = exp8(select8(neg, gv, -gv));  /* exp(-|g|) */
            const v8f sig = select8(neg, e, splat8(1.0f)) / (splat8(1.0f) + e);
            store8(o + i, gv * sig * load8(u + i));
        }
        for (; i < I; i++) o[i] = silu1(g[i]) * u[i];
    }
}

int raymoe_moe_experts(const float *x, int64_t T, int64_t D, const int64_t *ids, const float *w, int64_t K,
                       const int64_t *local, int64_t n_routed, const float *w13, const float *w2, int64_t E,
                       int64_t I, float *out, int num_threads) {
    for (int64_t p = 0; p < T * K; p++)
        if (ids[p] < -1 || ids[p] > n_routed) return -1;
    memset(out, 0, sizeof(float) * (size_t)(T * D));
    if (T == 0) return 0;
    /* a thread per ~4M multiply-adds at most: below that the fork/join and the split batch cost more than a
     * second thread saves (64 tokens of the tiny model: 94 us on 2 threads, 70-78 us on one; measured 2026-11) */
    const double work = (double)T * (double)K * (double)D * (double)I * 3.0;
    int nt = num_threads < 1 ? 1 : num_threads;
    if (nt > work / 4e6) nt = work / 4e6 < 1.0 ? 1 : (int)(work / 4e6);
    if (nt > T) nt = (int)T;
    int status = 0;
#pragma omp parallel num_threads(nt) reduction(| : status)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        const int64_t t0 = T * tid / nth, t1 = T * (tid + 1) / nth, n = (t1 - t0) * K;
        /* this thread's pairs grouped by expert (counting sort, stable: ascending token within an expert),
         * then per tile: xs [ROWS, D] gathered rows, h [ROWS, 2I], a [ROWS, I], y [ROWS, D] */
        int64_t *count = (int64_t *)calloc((size_t)(E + 1), sizeof(int64_t));
        int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
        float *xs = (float *)malloc(sizeof(float) * (size_t)(ROWS * (2 * D + 3 * I)));
        if (count == NULL || order == NULL || xs == NULL) {
            status |= 2;
        } else {
            float *h = xs + ROWS * D, *a = h + ROWS * 2 * I, *y = a + ROWS * I;
            for (int64_t p = t0 * K; p < t1 * K; p++) {
                const int64_t e = ids[p] < 0 ? E : local[ids[p]];
                count[e < 0 || e > E ? E : e]++;
            }
            int64_t *start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(E + 2));
            if (start == NULL) {
                status |= 2;
            } else {
                start[0] = 0;
                for (int64_t e = 0; e <= E; e++) start[e + 1] = start[e] + count[e];
                memcpy(count, start, sizeof(int64_t) * (size_t)(E + 1));  /* count: next free slot per expert */
                for (int64_t p = t0 * K; p < t1 * K; p++) {
                    int64_t e = ids[p] < 0 ? E : local[ids[p]];
                    if (e < 0 || e > E) e = E;
                    order[count[e]++] = p;
                }
                for (int64_t e = 0; e < E; e++) {
                    const float *we13 = w13 + e * D * 2 * I, *we2 = w2 + e * I * D;
                    for (int64_t i = start[e]; i < start[e + 1]; i += ROWS) {
                        const int64_t rows = start[e + 1] - i < ROWS ? start[e + 1] - i : ROWS;
                        for (int64_t r = 0; r < ROWS; r++) {
                            if (r < rows)
                                memcpy(xs + r * D, x + (order[i + r] / K) * D, sizeof(float) * (size_t)D);
                            else
                                memset(xs + r * D, 0, sizeof(float) * (size_t)D);
                        }
                        gemm_rows(xs, D, we13, D, 2 * I, h, 2 * I);
                        swiglu_rows(h, I, a);
                        gemm_rows(a, I, we2, I, D, y, D);
                        for (int64_t r = 0; r < rows; r++) {  /* y *= w, rounded, then added (below) */
                            const float wp = w[order[i + r]];
                            for (int64_t d = 0; d < D; d++) y[r * D + d] *= wp;
                        }
                        /* no fused multiply-add across this line: out[t] must be the plain fp32 sum of its rounded
                         * terms, so that the partial sums of shards hosting disjoint experts add up to it */
                        __asm__ __volatile__("" ::: "memory");
                        for (int64_t r = 0; r < rows; r++) {
                            float *o = out + (order[i + r] / K) * D;
                            for (int64_t d = 0; d < D; d++) o[d] += y[r * D + d];
                        }
                    }
                }
                free(start);
            }
        }
        free(count);
        free(order);
        free(xs);
    }
    return status ? -2 : 0;
}
