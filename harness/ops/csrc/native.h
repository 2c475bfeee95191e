/* Shared by the CPU kernels in this folder (`#include "native.h"`); harness/ops/native.py keys
 * its build cache on the kernel source and every header here.
 *
 * Built with REAL_BITS=32 (float) or 64 (double; the tests compare against fp64 references).
 * A task owns W consecutive channels, the vector lanes: every inner loop is `for j < W` over
 * contiguous memory, which gcc vectorises. */
#ifndef HARNESS_NATIVE_H
#define HARNESS_NATIVE_H
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if REAL_BITS == 64
#define REAL double
#else
#define REAL float
#endif
#ifndef W
#define W 16
#endif

#if defined(__AVX512F__) && REAL_BITS != 64 && W == 16
#include <immintrin.h>
#define TILE_SUMS 1
/* out[n] += sum_j v[n][j] for a 16 x 16 tile: four rounds of shuffle-and-add, then one permute,
 * instead of 16 separate horizontal sums (which cost the backward a third of its time). */
static inline void tile_sums_add(const float *v, float *out) {
    __m512 s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; i++) {
        const __m512 a = _mm512_load_ps(v + 32 * i), b = _mm512_load_ps(v + 32 * i + 16);
        s8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int i = 0; i < 4; i++)
        s4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(s8[2 * i], s8[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(s4[2 * i], s4[2 * i + 1]),
                              _mm512_unpackhi_ps(s4[2 * i], s4[2 * i + 1]));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s2[0], s2[1], 0x44), _mm512_shuffle_ps(s2[0], s2[1], 0xEE));
    /* Lane k now holds row 4 (k % 4) + k / 4; that permutation is its own inverse. */
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_permutexvar_ps(idx, r)));
}
#else
#define TILE_SUMS 0
#endif

#if defined(__GLIBC__) && defined(__x86_64__)
/* glibc's libmvec has vector exp/expf; math.h declares them only under -ffast-math, which we avoid
 * because gcc < 13 then links crtfastmath.o into the library and flushes subnormals process-wide. */
__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) double exp(double);
#endif

/* out[m] += sum_j tile[m][j] for the rows m < rows <= 16 of a [16][W] tile of per-lane values:
 * tile_sums_add for a full tile where AVX-512 is, else a plain loop. */
static inline void lane_sums_add(const REAL *tile, int rows, REAL *out) {
#if TILE_SUMS
    if (rows == 16) {
        tile_sums_add(tile, out);
        return;
    }
#endif
    for (int m = 0; m < rows; m++) {
        REAL s = 0;
        for (int j = 0; j < W; j++) s += tile[m * W + j];
        out[m] += s;
    }
}

/* exp in fp32 for the decay exponents delta A <= 0: 2^k * e^r with |r| <= ln2 / 2 and a degree-6
 * Taylor polynomial (relative error below 2e-7, about 2 ulp). Written so gcc vectorises it inline:
 * the forward took 5.3 ms with it against 6.2 ms with libmvec's expf, which handles the full range
 * (B 2, T 1024, D 512, N 16, one thread). Inputs are clamped to [-87, 89]: below, e^-87 (about
 * 1e-38) stands in for a subnormal or 0; above 88.4 the result is inf (a positive exponent only
 * arises from A > 0, which the models never build; the true value overflows from 88.72). */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : (x > 89.0f ? 89.0f : x);
    const float k = __builtin_roundf(x * 1.44269504f);
    const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f; /* ln2 split: hi has 16 bits */
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int i; } scale = {.i = ((int)k + 127) << 23};
    return p * scale.f;
}

#define EXP(x) (sizeof(REAL) == sizeof(float) ? (REAL)exp_nonpos((float)(x)) : (REAL)exp((double)(x)))

static inline REAL *alloc(size_t n) {
    REAL *p = aligned_alloc(64, ((n * sizeof(REAL) + 63) / 64) * 64);
    if (p) memset(p, 0, n * sizeof(REAL));
    return p;
}

/* Lanes j >= w of a partial last channel block hold zeros (an input of 0 keeps their state 0). */
static inline void load_lanes(REAL *dst, const REAL *src, int w) {
    if (w == W) memcpy(dst, src, W * sizeof(REAL)); /* the common case, a plain vector load */
    else for (int j = 0; j < W; j++) dst[j] = j < w ? src[j] : 0;
}

static inline void store_lanes(REAL *dst, const REAL *src, int w) {
    if (w == W) memcpy(dst, src, W * sizeof(REAL)); /* constant size: plain vector stores */
    else memcpy(dst, src, w * sizeof(REAL));
}

/* Transposed copy of rows [r0, r0 + w) of a (rows, N) matrix into [N][W] (zeros past w). */
static inline void load_rows_t(REAL *dst, const REAL *src, int r0, int w, int N) {
    for (int n = 0; n < N; n++)
        for (int j = 0; j < W; j++) dst[n * W + j] = j < w ? src[(long)(r0 + j) * N + n] : 0;
}

static inline void store_rows_t(REAL *dst, const REAL *src, int r0, int w, int N) {
    for (int n = 0; n < N; n++)
        for (int j = 0; j < w; j++) dst[(long)(r0 + j) * N + n] = src[n * W + j];
}

/* Exported entry points run their tasks on `threads` OpenMP threads, each taking one contiguous
 * range (my_range). Built with -fopenmp, this library links libgomp.so.1, the soname PyTorch's own libgomp
 * has, so the loader hands it the runtime torch already loaded and both share one thread pool
 * (with two pools, torch's idle threads spin on the cores these threads need). */
#ifdef _OPENMP
#include <omp.h>
#endif

static inline void my_range(int tasks, int *lo, int *hi, int *part) {
#ifdef _OPENMP
    const int n = omp_get_num_threads(), i = omp_get_thread_num();
#else
    const int n = 1, i = 0;
#endif
    *lo = (int)((long)tasks * i / n);
    *hi = (int)((long)tasks * (i + 1) / n);
    *part = i;
}

#endif
