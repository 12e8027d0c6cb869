/* Compiled CPU kernels of the mHC / output-contraction ops, fp32 (kernels/native_build.py compiles this file
 * with the machine's C compiler and loads it with ctypes; kernels/native_ops.py wraps it in autograd).
 *
 * One pass over a token's state does everything that is per token: the stream RMS, the gated logits,
 * the sigmoids, the Sinkhorn iterations (and in backward their reverse), the weighted stream sum u, the
 * residual mix, and their gradients. The two projections (x @ W^T and the weight gradient) stay with the
 * caller's BLAS. The math is kernels/reference.py's (and fast_cpu.py's backward); the per-token work that
 * torch would run as ~300 small ops per call (each below torch's parallel grain size) is one loop here.
 *
 * Layout: T tokens, n streams, h hidden, K = n*h; x [T, K] stream-major (x_i = x[t, i*h:(i+1)*h]);
 * logit columns M = [pre n | post n (has_post) | res n*n (has_res)], res row-major (i, j).
 * Tokens go in blocks of LANES: the small per-token math (Sinkhorn, sigmoids) runs on [.., LANES] arrays,
 * token-innermost, so the compiler vectorises it across tokens; the x-sized work runs per token over h.
 * Every per-token sum has a fixed order (dot products use 8 fixed partial sums) and there is no FMA contraction
 * (-ffp-contract=off), so a token's results do not depend on the vector width or the block it falls in.
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#else
#define THREAD_NUM() 0
#endif

/* Tokens per block = the floats of one hardware vector register (a wider generic vector is lowered through
 * memory and runs several times slower): native_build.py adds -mavx2 where the CPU has it. */
#ifndef LANES
#if defined(__AVX2__)
#define LANES 8
#else
#define LANES 4
#endif
#endif

typedef int64_t i64;
/* LANES tokens' values of one quantity; arithmetic is elementwise (GCC / Clang vector extension), lowered to
 * whatever vector width the target has. */
typedef float vf __attribute__((vector_size(4 * LANES)));

/* ------------------------------------------------------------------------------------------ helpers */

static inline vf splat(float a) {
    vf v;
    for (int l = 0; l < LANES; l++) v[l] = a;
    return v;
}

static inline float dot(const float *restrict a, const float *restrict b, i64 len) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    i64 j = 0;
    for (; j + 8 <= len; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
    for (; j < len; j++) acc[0] += a[j] * b[j];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static inline void axpy(float *restrict y, float a, const float *restrict x, i64 len) {
    for (i64 j = 0; j < len; j++) y[j] += a * x[j];
}

static inline void scale_to(float *restrict y, float a, const float *restrict x, i64 len) {
    for (i64 j = 0; j < len; j++) y[j] = a * x[j];
}

static inline vf vsigmoid(vf v) {
    vf s;
    for (int l = 0; l < LANES; l++) s[l] = 1.0f / (1.0f + expf(-v[l]));
    return s;
}

/* 64-byte aligned scratch of `count` vf values (NULL when out of memory). */
static vf *alloc_lanes(i64 count) {
    void *p = NULL;
    return posix_memalign(&p, 64, sizeof(vf) * (size_t)(count > 0 ? count : 1)) == 0 ? (vf *)p : NULL;
}

/* ------------------------------------------------------------------------------------------ Sinkhorn on lanes
 * [n, n] arrays of vf are row-major (i, j); [n] divisor arrays are indexed by the step's axis. */

/* z logits -> sm = softmax over j (the reference's last axis). */
static void sk_softmax(const vf *z, i64 n, vf *restrict sm) {
    for (i64 i = 0; i < n; i++) {
        const vf *zi = z + i * n;
        vf mx = zi[0], sum = splat(0.f);
        for (i64 j = 1; j < n; j++)
            for (int l = 0; l < LANES; l++) mx[l] = zi[j][l] > mx[l] ? zi[j][l] : mx[l];
        for (i64 j = 0; j < n; j++) {
            vf e;
            for (int l = 0; l < LANES; l++) e[l] = expf(zi[j][l] - mx[l]);
            sm[i * n + j] = e;
            sum += e;
        }
        for (i64 j = 0; j < n; j++) sm[i * n + j] /= sum;
    }
}

/* One normalisation step y = q / c, c = sum(q) + eps along the step's axis: even steps k divide columns (sum
 * over i), odd steps rows (sum over j); c [n] receives the divisors. */
static void sk_step(const vf *restrict q, vf *restrict y, vf *restrict c, i64 n, i64 k, vf eps) {
    i64 si = k % 2 == 0 ? n : 1, sa = k % 2 == 0 ? 1 : n; /* strides along the summed axis / the other axis */
    for (i64 a = 0; a < n; a++) {
        vf s = q[a * sa];
        for (i64 b = 1; b < n; b++) s += q[a * sa + b * si];
        s += eps;
        c[a] = s;
        for (i64 b = 0; b < n; b++) y[a * sa + b * si] = q[a * sa + b * si] / s;
    }
}

/* z [n, n] -> sm (softmax) and the 2*iters-1 steps. With history, ys[k] / cs[k] keep every step's output and
 * divisors (ys[last] is h_res); without, the steps alternate between out and tmp and h_res lands in out. */
static void sk_forward(const vf *z, i64 n, i64 iters, float eps, vf *restrict sm, vf *restrict p0, vf *ys,
                       vf *cs, vf *out, vf *tmp) {
    i64 nn = n * n, steps = 2 * iters - 1;
    vf e = splat(eps);
    sk_softmax(z, n, sm);
    for (i64 m = 0; m < nn; m++) p0[m] = sm[m] + e;
    const vf *q = p0;
    for (i64 k = 0; k < steps; k++) {
        vf *y = ys ? ys + k * nn : ((steps - 1 - k) % 2 == 0 ? out : tmp); /* the last step writes out */
        sk_step(q, y, ys ? cs + k * n : tmp + nn, n, k, e);
        q = y;
    }
    if (ys) memcpy(out, ys + (steps - 1) * nn, sizeof(vf) * nn);
}

/* g [n, n] = d(loss)/d(h_res) -> dz [n, n] = d(loss)/d(logits), walking the steps backwards:
 * y = q / c along an axis has dq = (g - sum(g * y)) / c along it; then the softmax's backward. */
static void sk_backward(vf *restrict g, const vf *sm, const vf *ys, const vf *cs, i64 n, i64 iters,
                        vf *restrict dz) {
    i64 nn = n * n;
    for (i64 k = 2 * iters - 2; k >= 0; k--) {
        const vf *y = ys + k * nn, *c = cs + k * n;
        i64 si = k % 2 == 0 ? n : 1, sa = k % 2 == 0 ? 1 : n;
        for (i64 a = 0; a < n; a++) {
            vf s = splat(0.f);
            for (i64 b = 0; b < n; b++) s += g[a * sa + b * si] * y[a * sa + b * si];
            for (i64 b = 0; b < n; b++) g[a * sa + b * si] = (g[a * sa + b * si] - s) / c[a];
        }
    }
    for (i64 i = 0; i < n; i++) {
        vf s = splat(0.f);
        for (i64 j = 0; j < n; j++) s += g[i * n + j] * sm[i * n + j];
        for (i64 j = 0; j < n; j++) dz[i * n + j] = sm[i * n + j] * (g[i * n + j] - s);
    }
}

/* ------------------------------------------------------------------------------------------ shared block steps */

typedef struct {
    i64 T, n, h, K, M, has_post, has_res, iters;
    float eps;
} dims_t;

static dims_t make_dims(i64 T, i64 n, i64 h, i64 has_post, i64 has_res, i64 iters, float eps) {
    dims_t d = {T, n, h, n * h, n + (has_post ? n : 0) + (has_res ? n * n : 0), has_post, has_res, iters, eps};
    return d;
}

/* Gated logits of tokens t0..t0+nb-1 into z [M] (lanes past nb get 0): z = (mix * r) * gate + bias. */
static void block_logits(const dims_t *d, i64 t0, i64 nb, const float *mix, vf r, const float *gate,
                         const float *bias, vf *z) {
    for (i64 m = 0; m < d->M; m++)
        for (int l = 0; l < LANES; l++) z[m][l] = l < nb ? (mix[(t0 + l) * d->M + m] * r[l]) * gate[m] + bias[m] : 0.f;
}

/* Sigmoids of the pre (and post) logits: sp [n] = sigmoid(z_pre), sq [n] = sigmoid(z_post). */
static void block_sigmoids(const dims_t *d, const vf *z, vf *sp, vf *sq) {
    for (i64 i = 0; i < d->n; i++) sp[i] = vsigmoid(z[i]);
    if (d->has_post)
        for (i64 i = 0; i < d->n; i++) sq[i] = vsigmoid(z[d->n + i]);
}

/* ------------------------------------------------------------------------------------------ threads
 * Built with -fopenmp where the compiler has it: the library then shares the process's OpenMP runtime
 * (libgomp.so.1, the one torch loaded), so a call runs on torch's own intra-op threads, which wait
 * for work right after torch's ops; a thread pool of its own would compete with them for the cores.
 * Each thread takes whole token blocks (static schedule); a token's results do not depend on the split. */

#define MIN_BLOCKS_PER_THREAD 16 /* fewer, and starting the team costs more than the thread's share */

/* All of torch's threads, or one: a team of another size would make libgomp end and later restart pool
 * threads around every call. */
static int team(i64 threads, i64 blocks) {
    return threads > 1 && blocks >= threads * MIN_BLOCKS_PER_THREAD ? (int)threads : 1;
}

/* Scratch for `nt` threads of `per` vectors each (per rounded up to whole 64-byte lines), or NULL. */
static vf *alloc_team(i64 *per, int nt) {
    *per += (64 / sizeof(vf)) - 1 - (*per + (64 / sizeof(vf)) - 1) % (64 / sizeof(vf));
    return alloc_lanes(*per * nt);
}

/* ------------------------------------------------------------------------------------------ forward */

/* x [T, K], mix [T, M] = x @ W^T, gate [M], bias [M] ->
 *   rsq [T] = rsqrt(mean(x^2) + eps); u [T, h] = sum_i (sigmoid(z_pre_i) + eps) x_i;
 *   post [T, n] = 2 sigmoid(z_post) (has_post; may be NULL); hres [T, n, n] = Sinkhorn(z_res) (has_res; may be
 *   NULL); rmix [T, K], rmix_k = sum_j hres[j, k] x_j (has_res; may be NULL). Up to `threads` threads.
 * Returns 0, or 1 when out of memory. */
int dsv4_mhc_fwd(i64 T, i64 n, i64 h, i64 has_post, i64 has_res, i64 iters, float eps, const float *x,
                 const float *mix, const float *gate, const float *bias, float *rsq, float *u, float *post,
                 float *hres, float *rmix, i64 threads) {
    dims_t d = make_dims(T, n, h, has_post, has_res, iters, eps);
    i64 nn = n * n, blocks = (T + LANES - 1) / LANES;
    int nt = team(threads, blocks);
    i64 per = d.M + 2 * n + 4 * nn + n;
    vf *all = alloc_team(&per, nt);
    if (!all) return 1;
#pragma omp parallel num_threads(nt)
    {
    vf *z = all + THREAD_NUM() * per, *sp = z + d.M, *sq = sp + n, *sm = sq + n, *p0 = sm + nn, *p = p0 + nn;
    vf *tmp = p + nn;
#pragma omp for schedule(static)
    for (i64 b = 0; b < blocks; b++) {
        i64 t0 = b * LANES, nb = T - t0 < LANES ? T - t0 : LANES;
        vf r = splat(0.f);
        for (i64 l = 0; l < nb; l++) {
            const float *xt = x + (t0 + l) * d.K;
            r[l] = 1.0f / sqrtf(dot(xt, xt, d.K) * (1.0f / (float)d.K) + eps);
            rsq[t0 + l] = r[l];
        }
        block_logits(&d, t0, nb, mix, r, gate, bias, z);
        block_sigmoids(&d, z, sp, sq);
        if (has_res) sk_forward(z + 2 * n, n, iters, eps, sm, p0, NULL, NULL, p, tmp);
        for (i64 l = 0; l < nb; l++) {
            i64 t = t0 + l;
            const float *xt = x + t * d.K;
            float *ut = u + t * h;
            scale_to(ut, sp[0][l] + eps, xt, h);
            for (i64 i = 1; i < n; i++) axpy(ut, sp[i][l] + eps, xt + i * h, h);
            if (post)
                for (i64 i = 0; i < n; i++) post[t * n + i] = 2.0f * sq[i][l];
            if (hres)
                for (i64 e = 0; e < nn; e++) hres[t * nn + e] = p[e][l];
            if (rmix)
                for (i64 k = 0; k < n; k++) {
                    float *rk = rmix + t * d.K + k * h;
                    scale_to(rk, p[k][l], xt, h);
                    for (i64 j = 1; j < n; j++) axpy(rk, p[j * n + k][l], xt + j * h, h);
                }
        }
    }
    }
    free(all);
    return 0;
}

/* ------------------------------------------------------------------------------------------ backward */

/* Backward of dsv4_mhc_fwd from the saved x, mix, rsq and the output grads du [T, h], gpost [T, n] (or NULL:
 * zero), and for the res part either g3 [T, K] (grad of rmix) or gres [T, n, n] (grad of hres) ->
 *   dx [T, K]: every x-gradient but the projection's (the caller adds dmix @ W);
 *   dmix [T, M] = dz * gate * r (the projection's output grad), dzm [T, M] = dz * mix * r (sums to the gate
 *   grads), dz [T, M] (sums to the bias grad). Up to `threads` threads. Returns 0, or 1 when out of memory. */
int dsv4_mhc_bwd(i64 T, i64 n, i64 h, i64 has_post, i64 has_res, i64 iters, float eps, const float *x,
                 const float *mix, const float *rsq, const float *gate, const float *bias, const float *du,
                 const float *gpost, const float *g3, const float *gres, float *dx, float *dmix, float *dzm,
                 float *dz, i64 threads) {
    dims_t d = make_dims(T, n, h, has_post, has_res, iters, eps);
    i64 nn = n * n, steps = 2 * iters - 1, blocks = (T + LANES - 1) / LANES;
    int nt = team(threads, blocks);
    i64 per = 2 * d.M + 3 * n + 4 * nn + (has_res ? steps * (nn + n) : 0);
    vf *all = alloc_team(&per, nt);
    if (!all) return 1;
#pragma omp parallel num_threads(nt)
    {
    vf *z = all + THREAD_NUM() * per, *dzl = z + d.M, *sp = dzl + d.M, *sq = sp + n, *gp = sq + n, *sm = gp + n;
    vf *p0 = sm + nn, *p = p0 + nn, *g = p + nn, *ys = g + nn, *cs = ys + steps * nn;
#pragma omp for schedule(static)
    for (i64 b = 0; b < blocks; b++) {
        i64 t0 = b * LANES, nb = T - t0 < LANES ? T - t0 : LANES;
        vf r = splat(0.f);
        for (i64 l = 0; l < nb; l++) r[l] = rsq[t0 + l];
        block_logits(&d, t0, nb, mix, r, gate, bias, z);
        block_sigmoids(&d, z, sp, sq);
        for (i64 i = 0; i < n; i++) gp[i] = splat(0.f);
        if (has_res) {
            sk_forward(z + 2 * n, n, iters, eps, sm, p0, ys, cs, p, NULL);
            for (i64 e = 0; e < nn; e++) g[e] = splat(0.f);
        }
        for (i64 l = 0; l < nb; l++) { /* the x-sized work of one token */
            i64 t = t0 + l;
            const float *xt = x + t * d.K, *dut = du + t * h;
            float *dxt = dx + t * d.K;
            for (i64 i = 0; i < n; i++) {
                gp[i][l] = dot(xt + i * h, dut, h);
                scale_to(dxt + i * h, sp[i][l] + eps, dut, h);
            }
            if (has_res && g3) {
                const float *g3t = g3 + t * d.K;
                for (i64 j = 0; j < n; j++)
                    for (i64 k = 0; k < n; k++) {
                        g[j * n + k][l] = dot(xt + j * h, g3t + k * h, h);
                        axpy(dxt + j * h, p[j * n + k][l], g3t + k * h, h);
                    }
            } else if (has_res && gres) {
                for (i64 e = 0; e < nn; e++) g[e][l] = gres[t * nn + e];
            }
        }
        for (i64 i = 0; i < n; i++) dzl[i] = (gp[i] * (1.0f - sp[i])) * sp[i];
        if (has_post)
            for (i64 i = 0; i < n; i++) {
                vf gq = splat(0.f);
                for (i64 l = 0; gpost && l < nb; l++) gq[l] = gpost[(t0 + l) * n + i] * 2.0f;
                dzl[n + i] = (gq * (1.0f - sq[i])) * sq[i];
            }
        if (has_res) sk_backward(g, sm, ys, cs, n, iters, dzl + 2 * n);
        for (i64 l = 0; l < nb; l++) {
            i64 t = t0 + l;
            float coef = 0.f;
            for (i64 m = 0; m < d.M; m++) {
                float dzv = dzl[m][l], mx = mix[t * d.M + m], dm = dzv * gate[m];
                dmix[t * d.M + m] = dm * r[l];
                dzm[t * d.M + m] = (dzv * mx) * r[l];
                dz[t * d.M + m] = dzv;
                coef += dm * mx;
            }
            coef = (coef * (r[l] * r[l] * r[l])) * (-1.0f / (float)d.K);
            axpy(dx + t * d.K, coef, x + t * d.K, d.K);
        }
    }
    }
    free(all);
    return 0;
}

/* Backward of x' = r + h_post (x) f for g [T, K], f [T, h], post [T, n] ->
 * df [T, h] = sum_k post_k g_k, dpost [T, n] = <g_k, f>. Up to `threads` threads. */
void dsv4_mhc_post_bwd(i64 T, i64 n, i64 h, const float *g, const float *f, const float *post, float *restrict df,
                       float *restrict dpost, i64 threads) {
#pragma omp parallel for schedule(static) num_threads(team(threads, (T + LANES - 1) / LANES))
    for (i64 t = 0; t < T; t++) {
        const float *gt = g + t * n * h, *ft = f + t * h;
        float *dft = df + t * h;
        scale_to(dft, post[t * n], gt, h);
        for (i64 k = 1; k < n; k++) axpy(dft, post[t * n + k], gt + k * h, h);
        for (i64 k = 0; k < n; k++) dpost[t * n + k] = dot(gt + k * h, ft, h);
    }
}
