/* Mamba-1 selective scan on CPU: the fused forward and backward behind `scan.selective_scan_native`.
 *
 * Compiled at first use by harness/ops/native.py, with REAL_BITS=32 (float) or 64 (double)
 * (the tests compare against the fp64 reference). Same recurrence as `scan.selective_scan_ref`:
 *     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,     y_t = C_t . h_t + D u_t
 * Layouts (row-major, contiguous): u, delta, y (B, T, D); A (D, N); Bm, Cm (B, T, N); h (B, D, N).
 *
 * Work is split into tasks of one sequence b and W consecutive channels, shared out over OpenMP
 * threads (end of file). Inside a task the W channels are the vector lanes, so every inner
 * loop is `for j < W` over contiguous memory and the states h[N][W] stay in L1. Decays differ per
 * (channel, state), so there is no matmul form: the cost is N exps and a few FMAs per (t, channel),
 * done once here instead of ~20 passes over (B, T, D, N) tensors in PyTorch.
 *
 * Backward: the forward keeps only the state at the start of every L-step block (`starts`, B x K
 * x D x N). For each block, last to first, the backward recomputes the block's states and decays
 * into a buffer (L x N x W, sized to stay in L2), then runs the reverse recurrence
 *     g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}                       (g_t = dL/dh_t)
 * and reads every gradient off (g_t, h_t, h_{t-1}). Reductions over channels (dB, dC) are written
 * per task and summed by the caller; dA is written per sequence and summed by the caller.
 */
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

/* exp in fp32 for the decay exponents delta A <= 0: 2^k * e^r with |r| <= ln2 / 2 and a degree-6
 * Taylor polynomial (relative error below 2e-7, about 2 ulp). Written so gcc vectorises it inline:
 * the forward took 5.3 ms with it against 6.2 ms with libmvec's expf, which handles the full range
 * (B 2, T 1024, D 512, N 16, one thread). Inputs are clamped to [-87, 88]: below, e^-87 (about
 * 1e-38) stands in for a subnormal or 0. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
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

static REAL *alloc(size_t n) {
    REAL *p = aligned_alloc(64, ((n * sizeof(REAL) + 63) / 64) * 64);
    if (p) memset(p, 0, n * sizeof(REAL));
    return p;
}

/* Lanes j >= w of a partial last channel block hold zeros: delta 0 keeps their state at 0. */
static void load_lanes(REAL *dst, const REAL *src, int w) {
    for (int j = 0; j < W; j++) dst[j] = j < w ? src[j] : 0;
}

/* Transposed copy (D, N) rows [d0, d0+w) -> [N][W]. */
static void load_dn(REAL *dst, const REAL *src, int d0, int w, int N) {
    for (int n = 0; n < N; n++)
        for (int j = 0; j < W; j++) dst[n * W + j] = j < w ? src[(long)(d0 + j) * N + n] : 0;
}

static void store_dn(REAL *dst, const REAL *src, int d0, int w, int N) {
    for (int n = 0; n < N; n++)
        for (int j = 0; j < w; j++) dst[(long)(d0 + j) * N + n] = src[n * W + j];
}

static int fwd_tasks(int task_lo, int task_hi, int T, int D, int N, int L, const REAL *u,
                     const REAL *delta, const REAL *A, const REAL *Bm, const REAL *Cm, const REAL *Dv,
                     const REAL *h0, REAL *y, REAL *hT, REAL *starts) {
    const int nblk = (D + W - 1) / W, K = (T + L - 1) / L;
    REAL *h = alloc((size_t)N * W), *At = alloc((size_t)N * W);
    if (!h || !At) { free(h); free(At); return -1; }
    for (int task = task_lo; task < task_hi; task++) {
        const int b = task / nblk, d0 = (task % nblk) * W, w = D - d0 < W ? D - d0 : W;
        load_dn(At, A, d0, w, N);
        load_dn(h, h0 + (long)b * D * N, d0, w, N);
        for (int t = 0; t < T; t++) {
            if (starts && t % L == 0) store_dn(starts + ((long)b * K + t / L) * D * N, h, d0, w, N);
            const long o = ((long)b * T + t) * D + d0;
            REAL dt[W], ut[W], du[W], acc[W];
            load_lanes(dt, delta + o, w);
            load_lanes(ut, u + o, w);
            for (int j = 0; j < W; j++) { du[j] = dt[j] * ut[j]; acc[j] = 0; }
            const REAL *bt = Bm + ((long)b * T + t) * N, *ct = Cm + ((long)b * T + t) * N;
            for (int n = 0; n < N; n++) {
                const REAL bn = bt[n], cn = ct[n];
                REAL *hn = h + n * W;
                const REAL *an = At + n * W;
#pragma omp simd
                for (int j = 0; j < W; j++) {
                    const REAL hv = EXP(dt[j] * an[j]) * hn[j] + du[j] * bn;
                    hn[j] = hv;
                    acc[j] += cn * hv;
                }
            }
            for (int j = 0; j < w; j++) y[o + j] = acc[j] + Dv[d0 + j] * ut[j];
        }
        store_dn(hT + (long)b * D * N, h, d0, w, N);
    }
    free(h); free(At);
    return 0;
}

static int bwd_tasks(int task_lo, int task_hi, int part, int Bsz, int T, int D, int N, int L,
                     const REAL *u, const REAL *delta, const REAL *A, const REAL *Bm, const REAL *Cm,
                     const REAL *Dv, const REAL *starts, const REAL *gy, const REAL *gh, REAL *gu,
                     REAL *gdelta, REAL *gA_part, REAL *gB_part, REAL *gC_part, REAL *gD_part, REAL *gh0) {
    const int nblk = (D + W - 1) / W, K = (T + L - 1) / L;
    const size_t nw = (size_t)N * W;
    REAL *At = alloc(nw), *g = alloc(nw), *hs = alloc(nw), *gA = alloc(nw);
    REAL *hbuf = alloc((size_t)L * nw), *abuf = alloc((size_t)L * nw), *pB = alloc(16 * W), *pC = alloc(16 * W);
    if (!At || !g || !hs || !gA || !hbuf || !abuf || !pB || !pC) {
        free(At); free(g); free(hs); free(gA); free(hbuf); free(abuf); free(pB); free(pC);
        return -1;
    }
    for (int task = task_lo; task < task_hi; task++) {
        const int b = task / nblk, blk = task % nblk, d0 = blk * W, w = D - d0 < W ? D - d0 : W;
        REAL dv[W], gDv[W] = {0};
        load_lanes(dv, Dv + d0, w);
        load_dn(At, A, d0, w, N);
        memset(gA, 0, nw * sizeof(REAL));
        if (gh) load_dn(g, gh + (long)b * D * N, d0, w, N);
        else memset(g, 0, nw * sizeof(REAL));
        REAL *gBp = gB_part + ((long)part * Bsz + b) * T * N, *gCp = gC_part + ((long)part * Bsz + b) * T * N;
        for (int k = K - 1; k >= 0; k--) {
            const int s = k * L, len = T - s < L ? T - s : L;
            load_dn(hs, starts + ((long)b * K + k) * D * N, d0, w, N);
            /* Recompute the block's decays and states. */
            for (int tt = 0; tt < len; tt++) {
                const long o = ((long)b * T + s + tt) * D + d0;
                REAL dt[W], ut[W], du[W];
                load_lanes(dt, delta + o, w);
                load_lanes(ut, u + o, w);
                for (int j = 0; j < W; j++) du[j] = dt[j] * ut[j];
                const REAL *bt = Bm + ((long)b * T + s + tt) * N;
                const REAL *hp = tt ? hbuf + (size_t)(tt - 1) * nw : hs;
                REAL *hc = hbuf + (size_t)tt * nw, *ac = abuf + (size_t)tt * nw;
                for (int n = 0; n < N; n++) {
                    const REAL bn = bt[n];
#pragma omp simd
                    for (int j = 0; j < W; j++) {
                        const REAL a = EXP(dt[j] * At[n * W + j]);
                        ac[n * W + j] = a;
                        hc[n * W + j] = a * hp[n * W + j] + du[j] * bn;
                    }
                }
            }
            /* Reverse recurrence over the block. */
            for (int tt = len - 1; tt >= 0; tt--) {
                const int t = s + tt;
                const long o = ((long)b * T + t) * D + d0;
                REAL dt[W], ut[W], du[W], gyv[W], gdu[W], gdd[W];
                load_lanes(dt, delta + o, w);
                load_lanes(ut, u + o, w);
                load_lanes(gyv, gy + o, w);
                for (int j = 0; j < W; j++) { du[j] = dt[j] * ut[j]; gdu[j] = 0; gdd[j] = 0; }
                const REAL *bt = Bm + ((long)b * T + t) * N, *ct = Cm + ((long)b * T + t) * N;
                const REAL *hp = tt ? hbuf + (size_t)(tt - 1) * nw : hs;
                const REAL *hc = hbuf + (size_t)tt * nw, *ac = abuf + (size_t)tt * nw;
                for (int n0 = 0; n0 < N; n0 += 16) {
                    const int nn = N - n0 < 16 ? N - n0 : 16;
                    for (int n = n0; n < n0 + nn; n++) {
                        const REAL bn = bt[n], cn = ct[n];
                        REAL *gn = g + n * W, *gAn = gA + n * W, *pb = pB + (n - n0) * W, *pc = pC + (n - n0) * W;
                        const REAL *an = At + n * W;
#pragma omp simd
                        for (int j = 0; j < W; j++) {
                            const REAL gv = gn[j] + cn * gyv[j];
                            const REAL a = ac[n * W + j];
                            const REAL wv = gv * a * hp[n * W + j]; /* dL/d(delta A) */
                            pc[j] = hc[n * W + j] * gyv[j];
                            pb[j] = gv * du[j];
                            gdu[j] += gv * bn;
                            gdd[j] += wv * an[j];
                            gAn[j] += wv * dt[j];
                            gn[j] = gv * a;
                        }
                    }
                    /* dB_t and dC_t: sums over this task's channels (the lanes). */
                    if (TILE_SUMS && nn == 16) {
#if TILE_SUMS
                        tile_sums_add(pB, gBp + (long)t * N + n0);
                        tile_sums_add(pC, gCp + (long)t * N + n0);
#endif
                    } else {
                        for (int m = 0; m < nn; m++) {
                            REAL sb = 0, sc = 0;
                            for (int j = 0; j < W; j++) { sb += pB[m * W + j]; sc += pC[m * W + j]; }
                            gBp[(long)t * N + n0 + m] += sb;
                            gCp[(long)t * N + n0 + m] += sc;
                        }
                    }
                }
                for (int j = 0; j < w; j++) {
                    gu[o + j] = gdu[j] * dt[j] + dv[j] * gyv[j];
                    gdelta[o + j] = gdd[j] + gdu[j] * ut[j];
                }
                for (int j = 0; j < W; j++) gDv[j] += gyv[j] * ut[j];
            }
        }
        store_dn(gA_part + (long)b * D * N, gA, d0, w, N);
        store_dn(gh0 + (long)b * D * N, g, d0, w, N);
        for (int j = 0; j < w; j++) gD_part[(long)b * D + d0 + j] = gDv[j];
    }
    free(At); free(g); free(hs); free(gA); free(hbuf); free(abuf); free(pB); free(pC);
    return 0;
}

/* The exported entry points run the tasks on `threads` OpenMP threads, each taking one contiguous
 * range. Built with -fopenmp, this library links libgomp.so.1, the soname PyTorch's own libgomp
 * has, so the loader hands it the runtime torch already loaded and both share one thread pool
 * (with two pools, torch's idle threads spin on the cores these threads need). */
#ifdef _OPENMP
#include <omp.h>
#endif

static void my_range(int tasks, int *lo, int *hi, int *part) {
#ifdef _OPENMP
    const int n = omp_get_num_threads(), i = omp_get_thread_num();
#else
    const int n = 1, i = 0;
#endif
    *lo = (int)((long)tasks * i / n);
    *hi = (int)((long)tasks * (i + 1) / n);
    *part = i;
}

/* Returns 0, or -1 when a thread could not allocate its buffers. `starts` (B, K, D, N) may be
 * NULL (no backward wanted). */
int scan_fwd(int threads, int Bsz, int T, int D, int N, int L, const REAL *u, const REAL *delta,
             const REAL *A, const REAL *Bm, const REAL *Cm, const REAL *Dv, const REAL *h0, REAL *y,
             REAL *hT, REAL *starts) {
    const int tasks = Bsz * ((D + W - 1) / W);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int lo, hi, part;
        my_range(tasks, &lo, &hi, &part);
        failed |= fwd_tasks(lo, hi, T, D, N, L, u, delta, A, Bm, Cm, Dv, h0, y, hT, starts) != 0;
    }
    return failed ? -1 : 0;
}

/* gh may be NULL (no gradient on the final state). Outputs: gu, gdelta (B, T, D) and gh0 (B, D, N);
 * gA_part (B, D, N) and gD_part (B, D), summed over B by the caller. gB_part and gC_part
 * (threads, B, T, N) start zeroed: each thread adds its channels' share into its own slice, and
 * the caller sums the slices. */
int scan_bwd(int threads, int Bsz, int T, int D, int N, int L, const REAL *u, const REAL *delta,
             const REAL *A, const REAL *Bm, const REAL *Cm, const REAL *Dv, const REAL *starts,
             const REAL *gy, const REAL *gh, REAL *gu, REAL *gdelta, REAL *gA_part, REAL *gB_part,
             REAL *gC_part, REAL *gD_part, REAL *gh0) {
    const int tasks = Bsz * ((D + W - 1) / W);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int lo, hi, part;
        my_range(tasks, &lo, &hi, &part);
        failed |= bwd_tasks(lo, hi, part, Bsz, T, D, N, L, u, delta, A, Bm, Cm, Dv, starts, gy, gh, gu,
                            gdelta, gA_part, gB_part, gC_part, gD_part, gh0) != 0;
    }
    return failed ? -1 : 0;
}
