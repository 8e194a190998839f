/* 8-lane float vectors through GCC/Clang vector extensions, shared by raymoe_kernels' CPU kernels: AVX2/AVX-512
 * registers on x86, NEON pairs on arm64, whatever -march the build targets. Loads and stores go through memcpy
 * (no alignment assumed). */
#ifndef RAYMOE_VEC8_H
#define RAYMOE_VEC8_H

#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* lanes of a where mask (all ones), else b */
static inline v8f select8(v8i mask, v8f a, v8f b) {
    v8i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const v8i r = (ai & mask) | (bi & ~mask);
    v8f out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* exp(x) for x <= 0, 8 lanes: Cephes' range reduction x = n ln2 + r and degree-6 polynomial, ~1 ulp; exactly 0
 * below -87. */
static inline v8f exp8(v8f x) {
    const v8f lo = splat8(-87.0f);
    const v8i under = x < lo;
    x = select8(under, lo, x);
    v8f n = x * splat8(1.44269504088896341f) + splat8(0.5f);
    v8i ni = __builtin_convertvector(n, v8i);  /* truncation; fix up to floor for negative n */
    ni += (__builtin_convertvector(ni, v8f) > n);  /* comparisons give -1 where true */
    n = __builtin_convertvector(ni, v8f);
    v8f r = x - n * splat8(0.693359375f);
    r = r + n * splat8(2.12194440e-4f);
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + splat8(1.3981999507e-3f);
    p = p * r + splat8(8.3334519073e-3f);
    p = p * r + splat8(4.1665795894e-2f);
    p = p * r + splat8(1.6666665459e-1f);
    p = p * r + splat8(5.0000001201e-1f);
    const v8f y = p * (r * r) + r + splat8(1.0f);
    v8i bits = (ni + 127) << 23;
    v8f scale;
    memcpy(&scale, &bits, sizeof scale);
    const v8f res = y * scale;
    return select8(under, splat8(0.0f), res);
}

#endif
