/* Small per-token layers on CPU (raymoe_kernels.cpu builds and loads this).
 *
 * raymoe_rms_norm: out[t] = (x[t] * 1/sqrt(mean(x[t]^2) + eps)) * w, fp32, rows of x and out strided (a slice of
 * a wider projection is read in place). The operations and roundings of raymoe.model.layers.RMSNorm on fp32
 * (HF's DeepseekV3RMSNorm): the mean is a sum of squares (8 lanes, then across them) divided by the width, so it
 * can differ from torch's reduction by an ulp, as the torch path's own GEMV mean does from HF's. One call per
 * norm where torch runs five small kernels (decode runs 4 norms per layer).
 *
 * raymoe_argmax: per row of x [B, V] (row stride ld), the first index of its maximum, NaN counting as the
 * maximum (as torch's max/argmax): greedy sampling. torch's max-with-index kernel is scalar (~1 ns per element:
 * ~120 us for 64 rows of a 2k vocabulary, every decode step); this is a vectorised max, then a scan for it.
 *
 * raymoe_rope: rotate, in place, the R-wide rope parts of two token-major tensors (the queries' [T, H, R] and the
 * key's [T, 1, R], any strides) by the rotation rows of each token's position: out = x[evens|odds] * [cos|cos] +
 * x[odds|evens] * [-sin|sin], raymoe.model.layers.RotaryEmbedding.rotate's formula over its precomputed table, with
 * the same roundings (products rounded, then added: no fused multiply-add), so the bits are the same. One call
 * instead of a cat and five kernels per layer.
 *
 * GCC/Clang vector extensions (8 lanes), as mla_decode_cpu.c. Return 0 (rope: -1 for a position outside the table).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

int raymoe_rms_norm(const float *x, int64_t T, int64_t D, int64_t ldx, const float *w, float eps, float *out,
                    int64_t ldo) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * ldx;
        float *o = out + t * ldo;
        v8f acc = splat8(0.0f);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            const v8f v = load8(xr + d);
            acc += v * v;
        }
        float ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; d < D; d++) ss += xr[d] * xr[d];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        d = 0;
        for (; d + 8 <= D; d += 8) store8(o + d, (load8(xr + d) * splat8(inv)) * load8(w + d));
        for (; d < D; d++) o[d] = (xr[d] * inv) * w[d];
    }
    return 0;
}

int raymoe_argmax(const float *x, int64_t B, int64_t V, int64_t ld, int64_t *out) {
    const v8i step = (v8i){8, 8, 8, 8, 8, 8, 8, 8};
    for (int64_t b = 0; b < B; b++) {
        const float *row = x + b * ld;
        /* one pass: per lane the largest value and its first index (strict >), and whether a NaN was seen; four
         * independent accumulators, so the compare-and-select chains overlap instead of waiting on each other */
        v8f m[4];
        v8i mi[4], idx[4], nan = (v8i){0, 0, 0, 0, 0, 0, 0, 0};
        for (int a = 0; a < 4; a++) {
            m[a] = splat8(-INFINITY);
            idx[a] = mi[a] = (v8i){0, 1, 2, 3, 4, 5, 6, 7} + (8 * a);
        }
        int64_t i = 0;
        for (; i + 32 <= V; i += 32)
            for (int a = 0; a < 4; a++) {
                const v8f v = load8(row + i + 8 * a);
                const v8i gt = v > m[a];
                nan |= v != v;
                m[a] = select8(gt, v, m[a]);
                mi[a] = (idx[a] & gt) | (mi[a] & ~gt);
                idx[a] += step * 4;
            }
        for (; i + 8 <= V; i += 8) {  /* whole lanes left: accumulator 0, its index moved to i */
            const v8f v = load8(row + i);
            const v8i cur = (v8i){0, 1, 2, 3, 4, 5, 6, 7} + (int32_t)i;
            const v8i gt = v > m[0];
            nan |= v != v;
            m[0] = select8(gt, v, m[0]);
            mi[0] = (cur & gt) | (mi[0] & ~gt);
        }
        float mx = -INFINITY;
        int64_t best = V;  /* no index yet */
        int has_nan = 0;
        for (int j = 0; j < 8; j++) has_nan |= nan[j] != 0;
        if (i > 0)
            for (int a = 0; a < 4; a++)
                for (int j = 0; j < 8; j++)
                    if (mi[a][j] < i && (m[a][j] > mx || (m[a][j] == mx && mi[a][j] < best))) {
                        mx = m[a][j];
                        best = mi[a][j];
                    }
        for (; i < V; i++) {
            has_nan |= row[i] != row[i];
            if (row[i] > mx || best == V) {
                mx = row[i];
                best = i;
            }
        }
        if (has_nan) {  /* NaN is the maximum: the first one */
            best = 0;
            while (row[best] == row[best]) best++;
        }
        out[b] = best;
    }
    return 0;
}

/* x[t, h, :] for h < H, rows of R values: x + t * st + h * sh */
static void rope_rows(float *x, int64_t T, int64_t H, int64_t st, int64_t sh, int64_t R, const int64_t *pos,
                      const float *cos2, const float *sin2, float *a, float *b) {
    const int64_t half = R / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos2 + pos[t] * R, *s = sin2 + pos[t] * R;
        for (int64_t h = 0; h < H; h++) {
            float *row = x + t * st + h * sh;
            for (int64_t i = 0; i < half; i++) {
                a[i] = row[2 * i] * c[i];  /* evens | odds, times cos */
                a[half + i] = row[2 * i + 1] * c[half + i];
                b[i] = row[2 * i + 1] * s[i];  /* odds | evens, times -sin | sin */
                b[half + i] = row[2 * i] * s[half + i];
            }
            __asm__ __volatile__("" ::: "memory");  /* the products are rounded before they are added */
            for (int64_t i = 0; i < R; i++) row[i] = a[i] + b[i];
        }
    }
}

int raymoe_rope(float *q, int64_t T, int64_t H, int64_t q_st, int64_t q_sh, float *k, int64_t k_st, int64_t R,
                const int64_t *pos, int64_t num_pos, const float *cos2, const float *sin2) {
    for (int64_t t = 0; t < T; t++)
        if (pos[t] < 0 || pos[t] >= num_pos) return -1;
    float a[512], b[512];
    if (R > 512 || R % 2) return -1;
    rope_rows(q, T, H, q_st, q_sh, R, pos, cos2, sin2, a, b);
    if (k != NULL) rope_rows(k, T, 1, k_st, 0, R, pos, cos2, sin2, a, b);
    return 0;
}
