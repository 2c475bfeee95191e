/* Mamba-2 SSD on CPU: the fused forward and backward behind `scan.ssd_scan_native`.
 *
 * Compiled at first use by harness/ops/native.py, with REAL_BITS=32 (float) or 64 (double)
 * (the tests compare against the fp64 reference). Same recurrence as `scan.ssd_scan_ref`, per
 * sequence b and head h, with one scalar decay a_t = exp(dt_t A_h) per step:
 *     h_t = a_t h_{t-1} + dt_t x_t B_t^T  (P x N),       y_t = h_t C_t + D_h x_t
 * Layouts (row-major, contiguous): x, y (B, T, H, P); dt (B, T, H); A, D (H); Bm, Cm (B, T, N)
 * (one group shared by all heads); h (B, H, P, N).
 *
 * This runs the recurrence, 4 H P N FLOPs per token forward, not the chunked algorithm of
 * `scan.ssd_scan` (matmuls of chunk-length blocks, which win on GPUs): on the CPU the recurrence
 * is less work at small N and touches only an L1-sized state.
 *
 * Work is split into tasks of one sequence b, one head h and W consecutive head channels p,
 * shared out over OpenMP threads (my_range in native.h). Inside a task the W channels are the vector lanes
 * (contiguous in x and y) and the state is kept as h[N][W], so the update is
 * h[n][:] = a h[n][:] + B[n] (dt x[:]) and the output y[:] += C[n] h[n][:]: vector FMAs with
 * broadcast scalars, one exp per (t, task), and no horizontal sums in the forward.
 *
 * Backward: the forward keeps only the state at the start of every L-step block (`starts`,
 * B x K x H x P x N). For each block, last to first, the backward recomputes the block's states
 * into a buffer (L x N x W, sized to stay in L2), then runs the reverse recurrence
 *     g_t = dy_t C_t^T + a_{t+1} g_{t+1}                              (g_t = dL/dh_t)
 * and reads every gradient off (g_t, h_t, h_{t-1}). Sums over channels (dB, dC, d(dt), dA, dD)
 * are written per task or per thread and summed by the caller.
 */
#include "native.h"

static int fwd_tasks(int task_lo, int task_hi, int T, int H, int P, int N, int L, const REAL *x,
                     const REAL *dt, const REAL *A, const REAL *Bm, const REAL *Cm, const REAL *Dv,
                     const REAL *h0, REAL *y, REAL *hT, REAL *starts) {
    const int nblk = (P + W - 1) / W, K = (T + L - 1) / L;
    REAL *h = alloc((size_t)N * W);
    if (!h) return -1;
    for (int task = task_lo; task < task_hi; task++) {
        const int b = task / (H * nblk), hd = task / nblk % H, p0 = task % nblk * W;
        const int w = P - p0 < W ? P - p0 : W;
        const REAL Ah = A[hd], Dh = Dv[hd];
        const long state = ((long)b * H + hd) * P * N;
        load_rows_t(h, h0 + state, p0, w, N);
        for (int t = 0; t < T; t++) {
            if (starts && t % L == 0) store_rows_t(starts + (((long)b * K + t / L) * H + hd) * P * N, h, p0, w, N);
            const long o = (((long)b * T + t) * H + hd) * P + p0;
            const REAL d = dt[((long)b * T + t) * H + hd], a = EXP(d * Ah);
            REAL xt[W], dx[W], acc0[W], acc1[W];
            load_lanes(xt, x + o, w);
            for (int j = 0; j < W; j++) { dx[j] = d * xt[j]; acc0[j] = 0; acc1[j] = 0; }
            const REAL *bt = Bm + ((long)b * T + t) * N, *ct = Cm + ((long)b * T + t) * N;
            /* Two accumulators: one chain of N dependent FMAs would bound the loop by latency. */
            int n = 0;
            for (; n + 1 < N; n += 2) {
                const REAL b0 = bt[n], c0 = ct[n], b1 = bt[n + 1], c1 = ct[n + 1];
                REAL *h0n = h + n * W, *h1n = h0n + W;
#pragma omp simd
                for (int j = 0; j < W; j++) {
                    const REAL u = a * h0n[j] + b0 * dx[j], v = a * h1n[j] + b1 * dx[j];
                    h0n[j] = u;
                    h1n[j] = v;
                    acc0[j] += c0 * u;
                    acc1[j] += c1 * v;
                }
            }
            if (n < N) {
                const REAL b0 = bt[n], c0 = ct[n];
                REAL *h0n = h + n * W;
#pragma omp simd
                for (int j = 0; j < W; j++) {
                    const REAL u = a * h0n[j] + b0 * dx[j];
                    h0n[j] = u;
                    acc0[j] += c0 * u;
                }
            }
            for (int j = 0; j < W; j++) acc0[j] += acc1[j] + Dh * xt[j];
            store_lanes(y + o, acc0, w);
        }
        store_rows_t(hT + state, h, p0, w, N);
    }
    free(h);
    return 0;
}

static int bwd_tasks(int task_lo, int task_hi, int part, int Bsz, int T, int H, int P, int N, int L,
                     const REAL *x, const REAL *dt, const REAL *A, const REAL *Bm, const REAL *Cm,
                     const REAL *Dv, const REAL *starts, const REAL *gy, const REAL *gh, REAL *gx,
                     REAL *gdt_part, REAL *gA_part, REAL *gB_part, REAL *gC_part, REAL *gD_part, REAL *gh0) {
    const int nblk = (P + W - 1) / W, K = (T + L - 1) / L;
    const size_t nw = (size_t)N * W;
    REAL *g = alloc(nw), *hs = alloc(nw), *hbuf = alloc((size_t)L * nw), *abuf = alloc(L);
    REAL *pB = alloc(16 * W), *pC = alloc(16 * W), *pdt = alloc((size_t)L * W);
    if (!g || !hs || !hbuf || !abuf || !pB || !pC || !pdt) {
        free(g); free(hs); free(hbuf); free(abuf); free(pB); free(pC); free(pdt);
        return -1;
    }
    for (int task = task_lo; task < task_hi; task++) {
        const int b = task / (H * nblk), hd = task / nblk % H, p0 = task % nblk * W;
        const int w = P - p0 < W ? P - p0 : W;
        const REAL Ah = A[hd], Dh = Dv[hd];
        const long state = ((long)b * H + hd) * P * N;
        REAL gDv[W] = {0}, gAv[W] = {0};
        if (gh) load_rows_t(g, gh + state, p0, w, N);
        else memset(g, 0, nw * sizeof(REAL));
        REAL *gBp = gB_part + ((long)part * Bsz + b) * T * N, *gCp = gC_part + ((long)part * Bsz + b) * T * N;
        REAL *gdtp = gdt_part + (long)task * T; /* (B, H, nblk, T): task order */
        memset(gdtp, 0, (size_t)T * sizeof(REAL));
        for (int k = K - 1; k >= 0; k--) {
            const int s = k * L, len = T - s < L ? T - s : L;
            load_rows_t(hs, starts + (((long)b * K + k) * H + hd) * P * N, p0, w, N);
            /* Recompute the block's decays and states. */
            for (int tt = 0; tt < len; tt++) {
                const long o = (((long)b * T + s + tt) * H + hd) * P + p0;
                const REAL d = dt[((long)b * T + s + tt) * H + hd], a = EXP(d * Ah);
                REAL dx[W];
                load_lanes(dx, x + o, w);
                for (int j = 0; j < W; j++) dx[j] *= d;
                abuf[tt] = a;
                const REAL *bt = Bm + ((long)b * T + s + tt) * N;
                const REAL *hp = tt ? hbuf + (size_t)(tt - 1) * nw : hs;
                REAL *hc = hbuf + (size_t)tt * nw;
                for (int n = 0; n < N; n++) {
                    const REAL bn = bt[n];
#pragma omp simd
                    for (int j = 0; j < W; j++) hc[n * W + j] = a * hp[n * W + j] + bn * dx[j];
                }
            }
            /* Reverse recurrence over the block. */
            for (int tt = len - 1; tt >= 0; tt--) {
                const int t = s + tt;
                const long o = (((long)b * T + t) * H + hd) * P + p0;
                const REAL d = dt[((long)b * T + t) * H + hd], a = abuf[tt];
                REAL xt[W], dx[W], gyv[W], gdx[W], ghp[W];
                load_lanes(xt, x + o, w);
                load_lanes(gyv, gy + o, w);
                for (int j = 0; j < W; j++) { dx[j] = d * xt[j]; gdx[j] = 0; ghp[j] = 0; }
                const REAL *bt = Bm + ((long)b * T + t) * N, *ct = Cm + ((long)b * T + t) * N;
                const REAL *hp = tt ? hbuf + (size_t)(tt - 1) * nw : hs;
                const REAL *hc = hbuf + (size_t)tt * nw;
                for (int n0 = 0; n0 < N; n0 += 16) {
                    const int nn = N - n0 < 16 ? N - n0 : 16;
                    for (int n = n0; n < n0 + nn; n++) {
                        const REAL bn = bt[n], cn = ct[n];
                        REAL *gn = g + n * W, *pb = pB + (n - n0) * W, *pc = pC + (n - n0) * W;
#pragma omp simd
                        for (int j = 0; j < W; j++) {
                            const REAL gv = gn[j] + cn * gyv[j];
                            pc[j] = hc[n * W + j] * gyv[j];
                            pb[j] = gv * dx[j];
                            gdx[j] += gv * bn;
                            ghp[j] += gv * hp[n * W + j];
                            gn[j] = gv * a;
                        }
                    }
                    /* dB_t and dC_t: sums over this task's channels (the lanes). */
                    lane_sums_add(pB, nn, gBp + (long)t * N + n0);
                    lane_sums_add(pC, nn, gCp + (long)t * N + n0);
                }
                /* d(dt) = sum_p x (sum_n g B) + A a sum_{p,n} g h_{t-1}: its lane terms go to row tt
                 * of pdt, summed over lanes below; dA += dt a sum g h_{t-1}. */
                REAL *pd = pdt + (size_t)tt * W, gxv[W];
                for (int j = 0; j < W; j++) {
                    pd[j] = xt[j] * gdx[j] + Ah * a * ghp[j];
                    gAv[j] += d * a * ghp[j];
                    gDv[j] += gyv[j] * xt[j];
                    gxv[j] = d * gdx[j] + Dh * gyv[j];
                }
                store_lanes(gx + o, gxv, w);
            }
            for (int t0 = 0; t0 < len; t0 += 16) {
                const int nt = len - t0 < 16 ? len - t0 : 16;
                lane_sums_add(pdt + (size_t)t0 * W, nt, gdtp + s + t0);
            }
        }
        store_rows_t(gh0 + state, g, p0, w, N);
        REAL gD = 0, gA = 0;
        for (int j = 0; j < W; j++) { gD += gDv[j]; gA += gAv[j]; }
        gA_part[task] = gA;
        gD_part[task] = gD;
    }
    free(g); free(hs); free(hbuf); free(abuf); free(pB); free(pC); free(pdt);
    return 0;
}

/* Channels per task: the caller sizes the per-task outputs with it. */
int ssd_lanes(void) { return W; }

/* Returns 0, or -1 when a thread could not allocate its buffers. `starts` (B, K, H, P, N) may be
 * NULL (no backward wanted). */
int ssd_fwd(int threads, int Bsz, int T, int H, int P, int N, int L, const REAL *x, const REAL *dt,
            const REAL *A, const REAL *Bm, const REAL *Cm, const REAL *Dv, const REAL *h0, REAL *y,
            REAL *hT, REAL *starts) {
    const int tasks = Bsz * H * ((P + W - 1) / W);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int lo, hi, part;
        my_range(tasks, &lo, &hi, &part);
        failed |= fwd_tasks(lo, hi, T, H, P, N, L, x, dt, A, Bm, Cm, Dv, h0, y, hT, starts) != 0;
    }
    return failed ? -1 : 0;
}

/* gh may be NULL (no gradient on the final state). Outputs: gx (B, T, H, P) and gh0 (B, H, P, N);
 * per task (B, H, P / W blocks, summed over the blocks by the caller) gdt_part (B, H, blocks, T),
 * gA_part and gD_part (B, H, blocks). gB_part and gC_part (threads, B, T, N) start zeroed: each
 * thread adds its heads' and channels' share into its own slice, and the caller sums the slices. */
int ssd_bwd(int threads, int Bsz, int T, int H, int P, int N, int L, const REAL *x, const REAL *dt,
            const REAL *A, const REAL *Bm, const REAL *Cm, const REAL *Dv, const REAL *starts,
            const REAL *gy, const REAL *gh, REAL *gx, REAL *gdt_part, REAL *gA_part, REAL *gB_part,
            REAL *gC_part, REAL *gD_part, REAL *gh0) {
    const int tasks = Bsz * H * ((P + W - 1) / W);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int lo, hi, part;
        my_range(tasks, &lo, &hi, &part);
        failed |= bwd_tasks(lo, hi, part, Bsz, T, H, P, N, L, x, dt, A, Bm, Cm, Dv, starts, gy, gh, gx,
                            gdt_part, gA_part, gB_part, gC_part, gD_part, gh0) != 0;
    }
    return failed ? -1 : 0;
}
