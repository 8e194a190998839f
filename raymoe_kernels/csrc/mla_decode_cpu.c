/* Absorbed MLA decode over the paged latent cache, on CPU (raymoe_kernels.cpu builds and loads this).
 *
 * One query token per sequence, H heads sharing one latent context (MQA in latent space):
 *   s[h, t] = scale * (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t])      t < seq_len, read through the block table
 *   p[h, :] = softmax(s[h, :])                                        fp32
 *   out[h]  = sum_t p[h, t] * c_kv[t]                                 fp32
 * The math of PagedMLAAttention's torch path, reading the pages in place (no gathered copy of the context):
 * per sequence a pass of scores in 4-token x 2-head tiles, a softmax, and a pass of the weighted sum in
 * 4-head x 16-channel register tiles, instead of gather + two batched GEMMs (whose per-matrix overhead
 * dominates at 4-16 heads) + softmax. Sequences are split over OpenMP threads: the process's libgomp, i.e.
 * torch's own (same soname), so the kernel shares torch's thread pool.
 *
 * A sequence's blocks are scattered over the cache, which breaks the hardware prefetcher's streams at every block
 * boundary; in an engine the pages come from DRAM (each layer's are evicted by the other layers' by the next
 * step), so the next block is prefetched while one is scored: ~10% faster in the engine (64 sequences, ~200
 * tokens, the variants alternated call by call in one process; measured 2026-11).
 *
 * Cache rows are C + R values, fp32 or bf16 (`cache_bf16`); queries and output are fp32. GCC/Clang vector
 * extensions (8 lanes) keep it portable: AVX2/AVX-512 on x86, NEON pairs on arm64.
 * Returns 0; -1 when a block id is outside [0, num_blocks) or a length outside [0, max_blocks * bs];
 * -2 when scratch memory cannot be allocated.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

static inline float exp1(float x) {
    const v8f r = exp8(splat8(x));
    return r[0];
}

static inline float dot(const float *a, const float *b, int64_t n) {
    v8f acc = splat8(0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* r[j] = sum of the lanes of v[j], j < 8: a transpose-and-add tree (7 adds, 14 shuffles for 8 sums). */
static inline v8f reduce8x8(const v8f *v) {
    v8f z[4], w[2];
    for (int j = 0; j < 4; j++)
        z[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(v[2 * j], v[2 * j + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int j = 0; j < 2; j++)
        w[j] = __builtin_shufflevector(z[2 * j], z[2 * j + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(z[2 * j], z[2 * j + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    /* w[0] = [v0 v1 v2 v3 | v0 v1 v2 v3] partial sums (low / high lanes), w[1] the same for v4..v7 */
    return __builtin_shufflevector(w[0], w[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(w[0], w[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* Scores of 4 consecutive rows k (stride D) against 2 query rows q, q + D:
 * s0[0..3] for q, s1[0..3] for q + D. 8 independent accumulators: each k chunk is loaded once for both
 * queries, each q chunk once for the 4 rows, and the 8 lane sums come out of one reduction tree. */
static inline void scores_4x2(const float *q, const float *k, int64_t D, float *s0, float *s1) {
    v8f acc[8];
    for (int j = 0; j < 8; j++) acc[j] = splat8(0.0f);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        const v8f qa = load8(q + d), qb = load8(q + D + d);
        for (int j = 0; j < 4; j++) {
            const v8f kv = load8(k + j * D + d);
            acc[j] += qa * kv;
            acc[4 + j] += qb * kv;
        }
    }
    const v8f r = reduce8x8(acc);
    for (int j = 0; j < 4; j++) {
        float a = r[j], b = r[4 + j];
        for (int64_t e = d; e < D; e++) {
            a += q[e] * k[j * D + e];
            b += q[D + e] * k[j * D + e];
        }
        s0[j] = a;
        s1[j] = b;
    }
}

/* o[h][c0 .. c0+16) += sum over rows t of p[h][t] * k[t][c0 .. c0+16), for 4 heads h (rows of p: stride
 * p_stride, of o: stride C): 8 accumulators held in registers over all n rows. */
static inline void pv_4x16(const float *p, int64_t p_stride, const float *k, int64_t D, int64_t n, float *o,
                           int64_t C, int64_t c0) {
    v8f acc[8];
    for (int h = 0; h < 4; h++) {
        acc[2 * h] = load8(o + h * C + c0);
        acc[2 * h + 1] = load8(o + h * C + c0 + 8);
    }
    for (int64_t t = 0; t < n; t++) {
        const v8f k0 = load8(k + t * D + c0), k1 = load8(k + t * D + c0 + 8);
        for (int h = 0; h < 4; h++) {
            const v8f ph = splat8(p[h * p_stride + t]);
            acc[2 * h] += ph * k0;
            acc[2 * h + 1] += ph * k1;
        }
    }
    for (int h = 0; h < 4; h++) {
        store8(o + h * C + c0, acc[2 * h]);
        store8(o + h * C + c0 + 8, acc[2 * h + 1]);
    }
}

/* o[0:n] += p * k[0:n] */
static inline void axpy(float *o, float p, const float *k, int64_t n) {
    const v8f pv = splat8(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(o + i, load8(o + i) + pv * load8(k + i));
    for (; i < n; i++) o[i] += p * k[i];
}

/* The first n rows of block `blk`: a pointer into the fp32 cache, or `scratch` filled from the bf16 one. */
static inline const float *block_rows(const void *pages, int cache_bf16, int32_t blk, int64_t bs, int64_t D,
                                      int64_t n, float *scratch) {
    if (!cache_bf16) return (const float *)pages + (int64_t)blk * bs * D;
    const uint16_t *src = (const uint16_t *)pages + (int64_t)blk * bs * D;
    for (int64_t i = 0; i < n * D; i++) {
        const uint32_t u = ((uint32_t)src[i]) << 16;
        memcpy(&scratch[i], &u, sizeof(float));
    }
    return scratch;
}

static void softmax_row(float *s, int64_t n) {
    float mx = s[0];
    int64_t t = 0;
    if (n >= 8) {  /* 8 running maxima: a scalar max chain waits on every compare */
        v8f m = load8(s);
        for (t = 8; t + 8 <= n; t += 8) {
            const v8f v = load8(s + t);
            m = select8(v > m, v, m);
        }
        for (int j = 0; j < 8; j++) mx = m[j] > mx ? m[j] : mx;
    }
    for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    v8f acc = splat8(0.0f);
    t = 0;
    for (; t + 8 <= n; t += 8) {
        const v8f e = exp8(load8(s + t) - splat8(mx));
        store8(s + t, e);
        acc += e;
    }
    float sum = hsum8(acc);
    for (; t < n; t++) {
        s[t] = exp1(s[t] - mx);
        sum += s[t];
    }
    const float inv = 1.0f / sum;
    for (t = 0; t < n; t++) s[t] *= inv;
}

/* Validate lengths and block ids before any thread reads the cache: 0, or -1. */
static int check_tables(const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens, int64_t B,
                        int64_t num_blocks, int64_t bs) {
    for (int64_t b = 0; b < B; b++) {
        const int64_t len = seq_lens[b];
        if (len < 0 || len > max_blocks * bs) return -1;
        for (int64_t j = 0; j < (len + bs - 1) / bs; j++) {
            const int32_t blk = block_tables[b * max_blocks + j];
            if (blk < 0 || blk >= num_blocks) return -1;
        }
    }
    return 0;
}

/* One sequence: q [H, D] query rows (q_lat | q_pe), len context tokens through `table` -> o [H, C]. 0, or -2 when
 * scratch memory cannot be allocated. */
static int attend_seq(const float *q, const void *pages, int cache_bf16, int64_t bs, const int32_t *table, int64_t len,
                      float *o, int64_t H, int64_t C, int64_t R, float scale) {
    const int64_t D = C + R;
    if (len == 0) {  /* nothing to attend to: zeros, as the reference */
        memset(o, 0, sizeof(float) * (size_t)(H * C));
        return 0;
    }
    /* scratch: scores [H, len], one bf16 block as fp32 [bs, D] */
    float *scores = (float *)malloc(sizeof(float) * (size_t)(H * len + (cache_bf16 ? bs * D : 0)));
    if (scores == NULL) return -2;
    float *rows = scores + H * len;
    for (int64_t t0 = 0; t0 < len; t0 += bs) {  /* scores, a block at a time */
        const int64_t n = len - t0 < bs ? len - t0 : bs;
        const float *blk = block_rows(pages, cache_bf16, table[t0 / bs], bs, D, n, rows);
        if (t0 + bs < len) {  /* ask for the next block's rows while this one is scored (see the header) */
            const int64_t nn = len - t0 - bs < bs ? len - t0 - bs : bs, esz = cache_bf16 ? 2 : 4;
            const char *next = (const char *)pages + (int64_t)table[t0 / bs + 1] * bs * D * esz;
            for (int64_t off = 0; off < nn * D * esz; off += 64) __builtin_prefetch(next + off);
        }
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
            int64_t h = 0;
            for (; h + 2 <= H; h += 2) scores_4x2(q + h * D, blk + i * D, D, scores + h * len + t0 + i,
                                                  scores + (h + 1) * len + t0 + i);
            for (; h < H; h++)
                for (int64_t j = 0; j < 4; j++) scores[h * len + t0 + i + j] = dot(q + h * D, blk + (i + j) * D, D);
        }
        for (; i < n; i++)
            for (int64_t h = 0; h < H; h++) scores[h * len + t0 + i] = dot(q + h * D, blk + i * D, D);
    }
    for (int64_t h = 0; h < H; h++) {
        float *s = scores + h * len;
        for (int64_t t = 0; t < len; t++) s[t] *= scale;
        softmax_row(s, len);
    }
    memset(o, 0, sizeof(float) * (size_t)(H * C));
    for (int64_t t0 = 0; t0 < len; t0 += bs) {  /* probability-weighted sum of the latents */
        const int64_t n = len - t0 < bs ? len - t0 : bs;
        const float *blk = block_rows(pages, cache_bf16, table[t0 / bs], bs, D, n, rows);
        int64_t h = 0;
        for (; h + 4 <= H; h += 4) {
            int64_t c = 0;
            for (; c + 16 <= C; c += 16) pv_4x16(scores + h * len + t0, len, blk, D, n, o + h * C, C, c);
            if (c < C)
                for (int64_t t = 0; t < n; t++)
                    for (int64_t hh = h; hh < h + 4; hh++)
                        for (int64_t cc = c; cc < C; cc++) o[hh * C + cc] += scores[hh * len + t0 + t] * blk[t * D + cc];
        }
        for (; h < H; h++)
            for (int64_t t = 0; t < n; t++) axpy(o + h * C, scores[h * len + t0 + t], blk + t * D, C);
    }
    free(scores);
    return 0;
}

int raymoe_mla_decode(const float *q_lat, int64_t q_lat_sb, int64_t q_lat_sh,
                      const float *q_pe, int64_t q_pe_sb, int64_t q_pe_sh,
                      const void *pages, int cache_bf16, int64_t num_blocks, int64_t bs,
                      const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                      float *out, int64_t B, int64_t H, int64_t C, int64_t R, float scale, int num_threads) {
    const int64_t D = C + R;
    int status = 0;
    if (check_tables(block_tables, max_blocks, seq_lens, B, num_blocks, bs)) return -1;
#pragma omp parallel num_threads(num_threads) reduction(| : status)
    {
        float *q = (float *)malloc(sizeof(float) * (size_t)(H * D));  /* this thread's query rows */
        if (q == NULL) status |= 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (q == NULL) continue;
            for (int64_t h = 0; h < H; h++) {
                memcpy(q + h * D, q_lat + b * q_lat_sb + h * q_lat_sh, sizeof(float) * (size_t)C);
                memcpy(q + h * D + C, q_pe + b * q_pe_sb + h * q_pe_sh, sizeof(float) * (size_t)R);
            }
            status |= attend_seq(q, pages, cache_bf16, bs, block_tables + b * max_blocks, seq_lens[b], out + b * H * C,
                                 H, C, R, scale) != 0;
        }
        free(q);
    }
    return status ? -2 : 0;
}

/* fp32 -> bf16, round to nearest even (torch's conversion); NaN stays a quiet NaN */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* r[j] = dot(a, w + j * ldw, n) for j < 8: 8 accumulators and one reduction tree */
static inline void dots8(const float *a, const float *w, int64_t ldw, int64_t n, float *r) {
    v8f acc[8];
    for (int j = 0; j < 8; j++) acc[j] = splat8(0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const v8f av = load8(a + i);
        for (int j = 0; j < 8; j++) acc[j] += av * load8(w + j * ldw + i);
    }
    const v8f s = reduce8x8(acc);
    for (int j = 0; j < 8; j++) {
        float x = s[j];
        for (int64_t e = i; e < n; e++) x += a[e] * w[j * ldw + e];
        r[j] = x;
    }
}

/* The whole absorbed decode of one MLA layer, one new token per sequence (the engine's decode-only step):
 *   cache[slots[b]] = c_kv[b] | k_pe[b]                           (fp32, or bf16 rounded to nearest even)
 *   q_lat[b, h]     = q_nope[b, h] . W_uk[h]                       W_uk[h] = wkv[h, :Dn, :]   [Dn, C]
 *   o_lat[b]        = the attention of raymoe_mla_decode (q_lat | q_pe against the cache)
 *   out[b, h, :]    = W_uv[h] . o_lat[b, h]                        W_uv[h] = wkv[h, Dn:, :]   [Dv, C]
 * with wkv the kv_b_proj weight [H, Dn + Dv, C] (row-major), out [B, H * Dv] (o_proj's input). What PagedMLAAttention
 * runs as a cat, an index_copy, two batched GEMMs with their transposes and the attention kernel: one call instead
 * of ~12 torch ops per layer. The absorb loops heads outside sequences, so a head's weights stay in cache for the
 * batch (K2: 256 KiB per head). Returns 0; -1 for a bad slot, block id or length; -2 without scratch memory. */
int raymoe_mla_decode_step(const float *q_nope, int64_t qn_sb, int64_t qn_sh, const float *q_pe, int64_t qp_sb,
                           int64_t qp_sh, const float *c_kv, int64_t ckv_sb, const float *k_pe, int64_t kpe_sb,
                           const int64_t *slots, const float *wkv, void *pages, int cache_bf16, int64_t num_blocks,
                           int64_t bs, const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                           float *out, int64_t B, int64_t H, int64_t C, int64_t R, int64_t Dn, int64_t Dv, float scale,
                           int num_threads) {
    const int64_t D = C + R;
    if (check_tables(block_tables, max_blocks, seq_lens, B, num_blocks, bs)) return -1;
    for (int64_t b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= num_blocks * bs) return -1;
    for (int64_t b = 0; b < B; b++) {  /* the new latents first: every sequence attends to its own */
        if (cache_bf16) {
            uint16_t *row = (uint16_t *)pages + slots[b] * D;
            for (int64_t c = 0; c < C; c++) row[c] = to_bf16(c_kv[b * ckv_sb + c]);
            for (int64_t r = 0; r < R; r++) row[C + r] = to_bf16(k_pe[b * kpe_sb + r]);
        } else {
            float *row = (float *)pages + slots[b] * D;
            memcpy(row, c_kv + b * ckv_sb, sizeof(float) * (size_t)C);
            memcpy(row + C, k_pe + b * kpe_sb, sizeof(float) * (size_t)R);
        }
    }
    /* q [B, H, D]: q_lat | q_pe, the attention's query rows; o_lat [B, H, C] */
    float *q = (float *)malloc(sizeof(float) * (size_t)(B * H * (D + C)));
    if (q == NULL) return -2;
    float *o_lat = q + B * H * D;
    int status = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : status)
    {
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < H; h++)  /* absorb: heads outside, so W_uk[h] is reused across the batch */
            for (int64_t b = 0; b < B; b++) {
                const float *w = wkv + h * (Dn + Dv) * C, *qn = q_nope + b * qn_sb + h * qn_sh;
                float *ql = q + (b * H + h) * D;
                int64_t c = 0;
                for (; c + 16 <= C; c += 16) {
                    v8f a0 = splat8(0.0f), a1 = splat8(0.0f);
                    for (int64_t d = 0; d < Dn; d++) {
                        const v8f x = splat8(qn[d]);
                        a0 += x * load8(w + d * C + c);
                        a1 += x * load8(w + d * C + c + 8);
                    }
                    store8(ql + c, a0);
                    store8(ql + c + 8, a1);
                }
                for (; c < C; c++) {
                    float a = 0.0f;
                    for (int64_t d = 0; d < Dn; d++) a += qn[d] * w[d * C + c];
                    ql[c] = a;
                }
                memcpy(ql + C, q_pe + b * qp_sb + h * qp_sh, sizeof(float) * (size_t)R);
            }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++)
            status |= attend_seq(q + b * H * D, pages, cache_bf16, bs, block_tables + b * max_blocks, seq_lens[b],
                                 o_lat + b * H * C, H, C, R, scale) != 0;
#pragma omp for schedule(static) collapse(2)
        for (int64_t h = 0; h < H; h++)  /* unabsorb: out[b, h, j] = W_uv[h][j] . o_lat[b, h] */
            for (int64_t b = 0; b < B; b++) {
                const float *w = wkv + (h * (Dn + Dv) + Dn) * C, *ol = o_lat + (b * H + h) * C;
                float *o = out + (b * H + h) * Dv;
                int64_t j = 0;
                for (; j + 8 <= Dv; j += 8) dots8(ol, w + j * C, C, C, o + j);
                for (; j < Dv; j++) o[j] = dot(ol, w + j * C, C);
            }
    }
    free(q);
    return status ? -2 : 0;
}
