/* Mamba-1 selective scan on CPU: the fused forward and backward behind `scan.selective_scan_native`.
 *
 * Compiled at first use by harness/ops/native.py, with REAL_BITS=32 (float) or 64 (double)
 * (the tests compare against the fp64 reference). Same recurrence as `scan.selective_scan_ref`:
 *     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,     y_t = C_t . h_t + D u_t
 * Layouts (row-major, contiguous): u, delta, y (B, T, D); A (D, N); Bm, Cm (B, T, N); h (B, D, N).
 *
 * Work is split into tasks of one sequence b and W consecutive channels, shared out over OpenMP
 * threads (my_range in native.h). Inside a task the W channels are the vector lanes, so every inner
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
#include "native.h"

static int fwd_tasks(int task_lo, int task_hi, int T, int D, int N, int L, const REAL *u,
                     const REAL *delta, const REAL *A, const REAL *Bm, const REAL *Cm, const REAL *Dv,
                     const REAL *h0, REAL *y, REAL *hT, REAL *starts) {
    const int nblk = (D + W - 1) / W, K = (T + L - 1) / L;
    REAL *h = alloc((size_t)N * W), *At = alloc((size_t)N * W);
    if (!h || !At) { free(h); free(At); return -1; }
    for (int task = task_lo; task < task_hi; task++) {
        const int b = task / nblk, d0 = (task % nblk) * W, w = D - d0 < W ? D - d0 : W;
        load_rows_t(At, A, d0, w, N);
        load_rows_t(h, h0 + (long)b * D * N, d0, w, N);
        for (int t = 0; t < T; t++) {
            if (starts && t % L == 0) store_rows_t(starts + ((long)b * K + t / L) * D * N, h, d0, w, N);
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
        store_rows_t(hT + (long)b * D * N, h, d0, w, N);
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
        load_rows_t(At, A, d0, w, N);
        memset(gA, 0, nw * sizeof(REAL));
        if (gh) load_rows_t(g, gh + (long)b * D * N, d0, w, N);
        else memset(g, 0, nw * sizeof(REAL));
        REAL *gBp = gB_part + ((long)part * Bsz + b) * T * N, *gCp = gC_part + ((long)part * Bsz + b) * T * N;
        for (int k = K - 1; k >= 0; k--) {
            const int s = k * L, len = T - s < L ? T - s : L;
            load_rows_t(hs, starts + ((long)b * K + k) * D * N, d0, w, N);
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
                    lane_sums_add(pB, nn, gBp + (long)t * N + n0);
                    lane_sums_add(pC, nn, gCp + (long)t * N + n0);
                }
                for (int j = 0; j < w; j++) {
                    gu[o + j] = gdu[j] * dt[j] + dv[j] * gyv[j];
                    gdelta[o + j] = gdd[j] + gdu[j] * ut[j];
                }
                for (int j = 0; j < W; j++) gDv[j] += gyv[j] * ut[j];
            }
        }
        store_rows_t(gA_part + (long)b * D * N, gA, d0, w, N);
        store_rows_t(gh0 + (long)b * D * N, g, d0, w, N);
        for (int j = 0; j < w; j++) gD_part[(long)b * D + d0 + j] = gDv[j];
    }
    free(At); free(g); free(hs); free(gA); free(hbuf); free(abuf); free(pB); free(pC);
    return 0;
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
