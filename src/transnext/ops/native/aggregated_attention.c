/* Aggregated Attention forward on CPU: logits, position bias, softmax and aggregation of a few
 * queries at a time, in registers and a per-thread scratch row, never a (heads, N, Np) tensor.
 *
 * Compiled on first use by transnext.ops.native (one shared library per element type: -DREAL=float
 * or -DREAL=double) and called through ctypes. Each entry point splits its work items into one
 * contiguous range per thread of an OpenMP team: built with -fopenmp and linked against the OpenMP
 * runtime torch itself loaded, that team is torch's own intra-op threads (no second pool beside
 * them); built without OpenMP it runs its range on the calling thread. Portable C with GCC/Clang
 * vector extensions (32-byte vectors: AVX2 on x86, two NEON registers on arm64); no intrinsics,
 * no omp.h, no torch headers.
 *
 * Layouts (all contiguous; BH = batch * heads, P = pooled keys, PP = P rounded up to 2 vectors):
 *   qs     (BH, N, d)          scaled queries (q_hat + query_embedding) * temperature * length_scale
 *   kt     (BH, PP/(2VL), d, 2VL) normalised pooled keys in panels of 2 vectors of keys (one
 *                          sequential stream for the logits), zero-padded to PP keys
 *   vp     (BH, P, d)          pooled values
 *   kpad   (BH, H+2r, W+2r, d) normalised keys, zero border of r = window / 2
 *   vpad   (BH, H+2r, W+2r, d) values, zero border
 *   table  (U, h, W, Kw)       pooled-key bias with the x axis resolved (see transnext.ops.bias)
 *   yidx   (H, Kh, T) int64    slabs of table giving the bias of query row y, key row ky ...
 *   yw     (H, Kh, T)          ... and their weights (T = 1 gather, T = 2 bilinear resize)
 *   ltab   (h, N, L)           local-window bias, -inf on window slots outside the image
 *   extra  (BH, N, L)          learnable-token term q_hat . tokens + learnable bias
 *   out    (BH, N, d)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif

#define VBYTES 32
#define VL ((int)(VBYTES / sizeof(REAL)))
#define QT 4 /* queries per register tile */
#define MAX_LOCAL 64
#ifndef XBAND
#define XBAND 16 /* query columns per work item */
#endif

typedef REAL vec __attribute__((vector_size(VBYTES)));
#if defined(REAL_IS_DOUBLE)
typedef int64_t ivec __attribute__((vector_size(VBYTES)));
#else
typedef int32_t ivec __attribute__((vector_size(VBYTES)));
#endif

#define INLINE static inline __attribute__((always_inline))

#ifdef _OPENMP
/* Declared here rather than through omp.h: the runtime is torch's, whose headers need not be installed. */
int omp_get_thread_num(void);
int omp_get_num_threads(void);
#endif

/* One thread's share of an entry point: items [item0, item1), ``tid`` its index in the team. */
typedef int (*work_fn)(const void *ctx, int64_t item0, int64_t item1, int64_t tid);

/* Runs ``work`` over [item0, item1) in ``threads`` contiguous ranges (range t = items * t / n ..
 * items * (t + 1) / n of the team's n threads), on the OpenMP team where built with OpenMP, else
 * on the calling thread as one range. Returns 0 or the negative code of a failing range. */
static int run_split(work_fn work, const void *ctx, int64_t item0, int64_t item1, int64_t threads) {
    const int64_t items = item1 - item0;
    if (threads > items) threads = items;
#ifdef _OPENMP
    if (threads > 1) {
        int status = 0;
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
            const int rc = work(ctx, item0 + items * t / n, item0 + items * (t + 1) / n, t);
            if (rc != 0) {
#pragma omp atomic write
                status = rc;
            }
        }
        return status;
    }
#endif
    return items > 0 ? work(ctx, item0, item1, 0) : 0;
}

INLINE vec vload(const REAL *p) { vec v; memcpy(&v, p, sizeof v); return v; }
INLINE void vstore(REAL *p, vec v) { memcpy(p, &v, sizeof v); }
#if defined(REAL_IS_DOUBLE)
INLINE vec vsplat(REAL x) { return (vec){x, x, x, x}; }
#else
INLINE vec vsplat(REAL x) { return (vec){x, x, x, x, x, x, x, x}; }
#endif
INLINE vec vselect(ivec mask, vec a, vec b) { return (vec)((mask & (ivec)a) | (~mask & (ivec)b)); }
INLINE vec vmax(vec a, vec b) { return vselect(a > b, a, b); }

/* exp(x) for x <= 0 (softmax after the max is subtracted); exactly 0 below the normal range, so
 * -inf (masked window slots) gives 0 as in the reference. */
INLINE vec vexp_nonpositive(vec x) {
#if defined(REAL_IS_DOUBLE)
    vec r;
    for (int i = 0; i < VL; i++) r[i] = exp(x[i]);
    return r;
#else
    const ivec tiny = x < vsplat(-87.0f);
    x = vmax(x, vsplat(-87.0f));
    /* x = n ln2 + f, |f| <= ln2 / 2; n by round-to-nearest through the 1.5 * 2^23 shifter. */
    const vec shifter = vsplat(12582912.0f);
    vec n = x * vsplat(1.44269504088896341f) + shifter;
    n = n - shifter;
    vec f = x - n * vsplat(0.693359375f);
    f = f - n * vsplat(-2.12194440e-4f);
    /* Cephes expf polynomial on [-ln2/2, ln2/2] (relative error ~1e-7). */
    vec p = vsplat(1.9875691500e-4f);
    p = p * f + vsplat(1.3981999507e-3f);
    p = p * f + vsplat(8.3334519073e-3f);
    p = p * f + vsplat(4.1665795894e-2f);
    p = p * f + vsplat(1.6666665459e-1f);
    p = p * f + vsplat(5.0000001201e-1f);
    p = p * (f * f) + f + vsplat(1.0f);
    ivec e = __builtin_convertvector(n, ivec);
    vec scale = (vec)((e + 127) << 23);
    return vselect(tiny, vsplat(0.0f), p * scale);
#endif
}

/* logits[qi][j] = q_qi . key j for QT queries and all PP keys, one panel of two vectors of keys at a time. */
INLINE void tile_logits(const REAL *const q[QT], const REAL *kt, int64_t d, int64_t PP, REAL *lg, int64_t ld) {
    for (int64_t j = 0; j < PP; j += 2 * VL) {
        vec acc[QT][2];
        for (int qi = 0; qi < QT; qi++) acc[qi][0] = acc[qi][1] = vsplat(0);
        for (int64_t c = 0; c < d; c++) {
            const vec k0 = vload(kt + j * d + c * 2 * VL), k1 = vload(kt + j * d + c * 2 * VL + VL);
            for (int qi = 0; qi < QT; qi++) {
                const vec s = vsplat(q[qi][c]);
                acc[qi][0] += s * k0;
                acc[qi][1] += s * k1;
            }
        }
        for (int qi = 0; qi < QT; qi++) {
            vstore(lg + qi * ld + j, acc[qi][0]);
            vstore(lg + qi * ld + j + VL, acc[qi][1]);
        }
    }
}

/* acc[qi] = sum_j e[qi][j] vp[j] for QT queries; DV vectors per value row (d = DV * VL). */
INLINE void tile_aggregate(const REAL *e, int64_t ld, const REAL *vp, int64_t P, const int DV, REAL *res) {
    vec acc[QT][8];
    for (int qi = 0; qi < QT; qi++)
        for (int t = 0; t < DV; t++) acc[qi][t] = vsplat(0);
    for (int64_t j = 0; j < P; j++) {
        vec v[8];
        for (int t = 0; t < DV; t++) v[t] = vload(vp + j * DV * VL + t * VL);
        for (int qi = 0; qi < QT; qi++) {
            const vec s = vsplat(e[qi * ld + j]);
            for (int t = 0; t < DV; t++) acc[qi][t] += s * v[t];
        }
    }
    for (int qi = 0; qi < QT; qi++)
        for (int t = 0; t < DV; t++) vstore(res + (qi * DV + t) * VL, acc[qi][t]);
}

/* Softmax numerators of one query in place over its row of n logits (n a multiple of VL; padding
 * holds -inf). Returns 1 / sum. Two accumulators hide the latency of the max and sum chains. */
static REAL softmax_numerators(REAL *lg, int64_t n) {
    vec m0 = vsplat(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j + 2 * VL <= n; j += 2 * VL) {
        m0 = vmax(m0, vload(lg + j));
        m1 = vmax(m1, vload(lg + j + VL));
    }
    for (; j < n; j += VL) m0 = vmax(m0, vload(lg + j));
    m0 = vmax(m0, m1);
    REAL mx = m0[0];
    for (int i = 1; i < VL; i++) mx = m0[i] > mx ? m0[i] : mx;
    const vec mv = vsplat(mx);
    vec s0 = vsplat(0), s1 = s0;
    for (j = 0; j + 2 * VL <= n; j += 2 * VL) {
        const vec e0 = vexp_nonpositive(vload(lg + j) - mv), e1 = vexp_nonpositive(vload(lg + j + VL) - mv);
        vstore(lg + j, e0);
        vstore(lg + j + VL, e1);
        s0 += e0;
        s1 += e1;
    }
    for (; j < n; j += VL) {
        const vec e = vexp_nonpositive(vload(lg + j) - mv);
        vstore(lg + j, e);
        s0 += e;
    }
    s0 += s1;
    REAL sum = 0;
    for (int i = 0; i < VL; i++) sum += s0[i];
    return (REAL)1 / sum;
}

/* Dot product of two rows of DV vectors. */
INLINE REAL vdot(const REAL *a, const REAL *b, const int DV) {
    vec acc = vload(a) * vload(b);
    for (int t = 1; t < DV; t++) acc += vload(a + t * VL) * vload(b + t * VL);
    REAL s = 0;
    for (int i = 0; i < VL; i++) s += acc[i];
    return s;
}

/* One layer's problem: inputs (layouts above) and sizes. */
typedef struct {
    const REAL *qs, *kt, *vp, *kpad, *vpad, *table, *yw, *ltab, *extra;
    const int64_t *yidx;
    int64_t table_su, table_sh, h, H, W, P, PP, Kh, Kw, T, window;
} Problem;

/* Probabilities of the QT queries of a tile (grid row y, columns from x0, the last one repeated past
 * x_end) into rows of ``lg`` ([pooled PP | local LP], ld = PP + LP): logits, bias read from its
 * factors, window logits, softmax. q / xs receive the tile's query rows and columns. With
 * ``normalise`` the rows hold probabilities, else softmax numerators and inv the 1 / sums. */
INLINE void tile_softmax(const Problem *pb, int64_t bh, int64_t y, int64_t x0, int64_t x_end, const REAL *q[QT],
                         int64_t xs[QT], REAL *lg, int64_t ld, REAL inv[QT], int normalise, const int DV) {
    const int64_t d = DV * VL, r = pb->window / 2, L = pb->window * pb->window, N = pb->H * pb->W;
    const int64_t Wp = pb->W + 2 * r, PP = pb->PP, Kw = pb->Kw, head = bh % pb->h, T = pb->T;
    const REAL *kpad_bh = pb->kpad + bh * (pb->H + 2 * r) * Wp * d;
    for (int qi = 0; qi < QT; qi++) {
        xs[qi] = x0 + qi < x_end ? x0 + qi : x_end - 1; /* a short last tile repeats its last query */
        q[qi] = pb->qs + (bh * N + y * pb->W + xs[qi]) * d;
    }
    tile_logits(q, pb->kt + bh * d * PP, d, PP, lg, ld);
    for (int qi = 0; qi < QT; qi++) {
        REAL *row = lg + qi * ld;
        const int64_t n = y * pb->W + xs[qi];
        for (int64_t ky = 0; ky < pb->Kh; ky++) {
            REAL *dst = row + ky * Kw;
            for (int64_t t = 0; t < T; t++) {
                const REAL w = pb->yw[(y * pb->Kh + ky) * T + t];
                const REAL *src = pb->table + pb->yidx[(y * pb->Kh + ky) * T + t] * pb->table_su + head * pb->table_sh +
                                  xs[qi] * Kw;
                for (int64_t kx = 0; kx < Kw; kx++) dst[kx] += w * src[kx];
            }
        }
        for (int64_t j = pb->P; j < PP; j++) row[j] = -INFINITY;
        const REAL *lt = pb->ltab + (head * N + n) * L;
        for (int64_t o = 0; o < L; o++) {
            const REAL *kr = kpad_bh + ((y + o / pb->window) * Wp + xs[qi] + o % pb->window) * d;
            row[PP + o] = vdot(q[qi], kr, DV) + lt[o];
        }
        for (int64_t o = L; o < ld - PP; o++) row[PP + o] = -INFINITY;
        inv[qi] = softmax_numerators(row, ld);
        if (normalise) {
            const vec iv = vsplat(inv[qi]);
            for (int64_t j = 0; j < ld; j += VL) vstore(row + j, vload(row + j) * iv);
        }
    }
}

/* Forward over the work items [item0, item1) (item = bh * bands + band: a band of XBAND query
 * columns of one image and head, all rows). Going down a band, consecutive rows use nearly the
 * same bias slabs, so the band's slabs, the pooled keys and values stay in the core's L2 cache. */
INLINE void forward_items(const Problem *pb, REAL *out, int64_t item0, int64_t item1, REAL *lg, const int DV) {
    const int64_t d = DV * VL, r = pb->window / 2, L = pb->window * pb->window, W = pb->W, N = pb->H * W;
    const int64_t Wp = W + 2 * r, LP = (L + VL - 1) / VL * VL, ld = pb->PP + LP;
    const int64_t bands = (W + XBAND - 1) / XBAND;
    REAL res[QT * 8 * VL];
    for (int64_t item = item0; item < item1; item++) {
        const int64_t bh = item / bands, band = item % bands;
        const REAL *vp_bh = pb->vp + bh * pb->P * d, *vpad_bh = pb->vpad + bh * (pb->H + 2 * r) * Wp * d;
        const int64_t x_end = (band + 1) * XBAND < W ? (band + 1) * XBAND : W;
        for (int64_t y = 0; y < pb->H; y++)
            for (int64_t x0 = band * XBAND; x0 < x_end; x0 += QT) {
                const REAL *q[QT];
                int64_t xs[QT];
                REAL inv[QT];
                tile_softmax(pb, bh, y, x0, x_end, q, xs, lg, ld, inv, 0, DV);
                tile_aggregate(lg, ld, vp_bh, pb->P, DV, res);
                for (int qi = 0; qi < QT && x0 + qi < x_end; qi++) {
                    const int64_t n = y * W + xs[qi];
                    const REAL *loc = lg + qi * ld + pb->PP, *ex = pb->extra + (bh * N + n) * L;
                    const vec iv = vsplat(inv[qi]);
                    vec o_[8];
                    for (int t = 0; t < DV; t++) o_[t] = vload(res + (qi * DV + t) * VL) * iv;
                    for (int64_t o = 0; o < L; o++) {
                        const vec w = vsplat(loc[o] * inv[qi] + ex[o]);
                        const REAL *vr = vpad_bh + ((y + o / pb->window) * Wp + xs[qi] + o % pb->window) * d;
                        for (int t = 0; t < DV; t++) o_[t] += w * vload(vr + t * VL);
                    }
                    for (int t = 0; t < DV; t++) vstore(out + (bh * N + n) * d + t * VL, o_[t]);
                }
            }
    }
}

/* acc[j] += sum_qi coef[qi][j] * rows[qi] for j < P (acc rows of DV vectors): the key / value
 * gradients of a tile. */
INLINE void tile_rank_update(const REAL *coef, int64_t ld, const REAL *const rows[QT], REAL *acc, int64_t P,
                             const int DV) {
    vec rv[QT][8];
    for (int qi = 0; qi < QT; qi++)
        for (int t = 0; t < DV; t++) rv[qi][t] = vload(rows[qi] + t * VL);
    for (int64_t j = 0; j < P; j++) {
        REAL *a = acc + j * DV * VL;
        vec s[8];
        for (int t = 0; t < DV; t++) s[t] = vload(a + t * VL);
        for (int qi = 0; qi < QT; qi++) {
            const vec c = vsplat(coef[qi * ld + j]);
            for (int t = 0; t < DV; t++) s[t] += c * rv[qi][t];
        }
        for (int t = 0; t < DV; t++) vstore(a + t * VL, s[t]);
    }
}

/* Backward over whole (image, head) items [item0, item1): every gradient of the op's prepared
 * inputs. Probabilities are recomputed per tile exactly as in the forward. Outputs indexed by bh
 * are written by the thread owning that bh only; ``dtable`` is this thread's own buffer (heads are
 * shared across images), summed by the caller. dkpad / dvpad / dtable may be NULL (not wanted). */
INLINE void backward_items(const Problem *pb, const REAL *g, const REAL *vt, const REAL *kp, REAL *dqs, REAL *dw,
                           REAL *dloc, REAL *dkp, REAL *dvp, REAL *dkpad, REAL *dvpad, REAL *dtable, int64_t item0,
                           int64_t item1, REAL *lg, REAL *dp, const int DV) {
    const int64_t d = DV * VL, r = pb->window / 2, L = pb->window * pb->window, W = pb->W, N = pb->H * W;
    const int64_t Wp = W + 2 * r, LP = (L + VL - 1) / VL * VL, PP = pb->PP, ld = PP + LP, Kw = pb->Kw, T = pb->T;
    const int64_t bands = (W + XBAND - 1) / XBAND, pad_bh = (pb->H + 2 * r) * Wp * d;
    REAL res[QT * 8 * VL];
    for (int64_t bh = item0; bh < item1; bh++) {
        const int64_t head = bh % pb->h;
        const REAL *kpad_bh = pb->kpad + bh * pad_bh, *vpad_bh = pb->vpad + bh * pad_bh;
        for (int64_t band = 0; band < bands; band++) {
            const int64_t x_end = (band + 1) * XBAND < W ? (band + 1) * XBAND : W;
            for (int64_t y = 0; y < pb->H; y++)
                for (int64_t x0 = band * XBAND; x0 < x_end; x0 += QT) {
                    const REAL *q[QT], *gq[QT];
                    int64_t xs[QT];
                    REAL inv[QT];
                    const int valid = x_end - x0 < QT ? (int)(x_end - x0) : QT;
                    tile_softmax(pb, bh, y, x0, x_end, q, xs, lg, ld, inv, 1, DV);
                    for (int qi = 0; qi < QT; qi++) gq[qi] = g + (bh * N + y * W + xs[qi]) * d;
                    /* d(loss)/d(probabilities): pooled by the logits kernel over the values' panels. */
                    tile_logits(gq, vt + bh * d * PP, d, PP, dp, ld);
                    for (int qi = 0; qi < QT; qi++) {
                        REAL *prow = lg + qi * ld, *drow = dp + qi * ld;
                        const int64_t n = y * W + xs[qi];
                        for (int64_t o = 0; o < L; o++) {
                            const REAL *vr = vpad_bh + ((y + o / pb->window) * Wp + xs[qi] + o % pb->window) * d;
                            drow[PP + o] = vdot(gq[qi], vr, DV);
                        }
                        for (int64_t o = L; o < LP; o++) drow[PP + o] = 0;
                        if (qi < valid)
                            for (int64_t o = 0; o < L; o++) dw[(bh * N + n) * L + o] = drow[PP + o];
                        /* Softmax backward: dl = p * (dp - sum(p * dp)); padded keys have p = 0. */
                        vec acc = vsplat(0);
                        for (int64_t j = 0; j < ld; j += VL) acc += vload(prow + j) * vload(drow + j);
                        REAL sdot = 0;
                        for (int i = 0; i < VL; i++) sdot += acc[i];
                        const vec sv = vsplat(sdot);
                        for (int64_t j = 0; j < ld; j += VL) vstore(drow + j, vload(prow + j) * (vload(drow + j) - sv));
                        if (qi >= valid) { /* a repeated query contributes nothing */
                            memset(prow, 0, sizeof(REAL) * (size_t)ld);
                            memset(drow, 0, sizeof(REAL) * (size_t)ld);
                            continue;
                        }
                        for (int64_t o = 0; o < L; o++) dloc[(bh * N + n) * L + o] = drow[PP + o];
                        if (dtable != NULL)
                            for (int64_t ky = 0; ky < pb->Kh; ky++)
                                for (int64_t t = 0; t < T; t++) {
                                    const REAL w = pb->yw[(y * pb->Kh + ky) * T + t];
                                    REAL *dst = dtable + pb->yidx[(y * pb->Kh + ky) * T + t] * pb->table_su +
                                                head * pb->table_sh + xs[qi] * Kw;
                                    const REAL *src = drow + ky * Kw;
                                    for (int64_t kx = 0; kx < Kw; kx++) dst[kx] += w * src[kx];
                                }
                    }
                    /* Query gradient: pooled keys by the aggregation kernel, window keys one by one. */
                    tile_aggregate(dp, ld, kp + bh * pb->P * d, pb->P, DV, res);
                    for (int qi = 0; qi < valid; qi++) {
                        const int64_t n = y * W + xs[qi];
                        const REAL *dl = dp + qi * ld + PP, *pl = lg + qi * ld + PP, *ex = pb->extra + (bh * N + n) * L;
                        vec o_[8];
                        for (int t = 0; t < DV; t++) o_[t] = vload(res + (qi * DV + t) * VL);
                        for (int64_t o = 0; o < L; o++) {
                            const int64_t off = ((y + o / pb->window) * Wp + xs[qi] + o % pb->window) * d;
                            const vec c = vsplat(dl[o]), wv = vsplat(pl[o] + ex[o]);
                            for (int t = 0; t < DV; t++) {
                                o_[t] += c * vload(kpad_bh + off + t * VL);
                                if (dkpad != NULL) {
                                    REAL *a = dkpad + bh * pad_bh + off + t * VL;
                                    vstore(a, vload(a) + c * vload(q[qi] + t * VL));
                                }
                                if (dvpad != NULL) {
                                    REAL *a = dvpad + bh * pad_bh + off + t * VL;
                                    vstore(a, vload(a) + wv * vload(gq[qi] + t * VL));
                                }
                            }
                        }
                        for (int t = 0; t < DV; t++) vstore(dqs + (bh * N + n) * d + t * VL, o_[t]);
                    }
                    /* Pooled key and value gradients: rank-QT updates (rows of repeated queries are zero). */
                    tile_rank_update(dp, ld, q, dkp + bh * pb->P * d, pb->P, DV);
                    tile_rank_update(lg, ld, gq, dvp + bh * pb->P * d, pb->P, DV);
                }
        }
    }
}

static int check(int64_t d, int64_t P, int64_t PP, int64_t Kh, int64_t Kw, int64_t window) {
    return d % VL == 0 && d / VL <= 8 && PP % (2 * VL) == 0 && PP >= P && window * window <= MAX_LOCAL && Kh * Kw == P;
}

/* constant vector counts let the compiler keep the tiles in registers */
#define DISPATCH_DV(CALL)                 \
    switch (d / VL) {                     \
    case 3: CALL(3); break;               \
    case 4: CALL(4); break;               \
    case 6: CALL(6); break;               \
    case 8: CALL(8); break;               \
    default: CALL((int)(d / VL)); break;  \
    }

/* Entry points (one symbol per element type). ``table`` is addressed as
 * table[u * table_su + head * table_sh + x * Kw + kx]. They return 0, or a negative code for
 * arguments they do not take (the caller checks them first; this is a last guard). */
typedef struct {
    Problem pb;
    REAL *out;
    int64_t d;
} ForwardJob;

static int forward_range(const void *ctx, int64_t item0, int64_t item1, int64_t tid) {
    (void)tid;
    const ForwardJob *job = (const ForwardJob *)ctx;
    const int64_t d = job->d, LP = (job->pb.window * job->pb.window + VL - 1) / VL * VL;
    REAL *lg = (REAL *)malloc(sizeof(REAL) * (size_t)(QT * (job->pb.PP + LP)));
    if (lg == NULL) return -2;
#define FWD(DV_) forward_items(&job->pb, job->out, item0, item1, lg, DV_)
    DISPATCH_DV(FWD)
#undef FWD
    free(lg);
    return 0;
}

/* Items [item0, item1) over ``threads`` threads (see run_split). */
int transnext_aggregated_attention_forward(
    const REAL *qs, const REAL *kt, const REAL *vp, const REAL *kpad, const REAL *vpad, const REAL *table,
    const int64_t *yidx, const REAL *yw, const REAL *ltab, const REAL *extra, REAL *out, int64_t table_su,
    int64_t table_sh, int64_t h, int64_t H, int64_t W, int64_t d, int64_t P, int64_t PP, int64_t Kh, int64_t Kw,
    int64_t T, int64_t window, int64_t item0, int64_t item1, int64_t threads) {
    if (!check(d, P, PP, Kh, Kw, window)) return -1;
    const ForwardJob job = {{qs, kt, vp, kpad, vpad, table, yw, ltab, extra, yidx, table_su, table_sh, h, H, W, P, PP, Kh,
                             Kw, T, window}, out, d};
    return run_split(forward_range, &job, item0, item1, threads);
}

typedef struct {
    Problem pb;
    const REAL *g, *vt, *kp;
    REAL *dqs, *dw, *dloc, *dkp, *dvp, *dkpad, *dvpad, *dtable;
    int64_t dtable_stride, d;
} BackwardJob;

static int backward_range(const void *ctx, int64_t item0, int64_t item1, int64_t tid) {
    const BackwardJob *job = (const BackwardJob *)ctx;
    const int64_t d = job->d, PP = job->pb.PP, LP = (job->pb.window * job->pb.window + VL - 1) / VL * VL;
    REAL *dtable = job->dtable != NULL ? job->dtable + tid * job->dtable_stride : NULL;
    REAL *lg = (REAL *)malloc(sizeof(REAL) * (size_t)(2 * QT * (PP + LP)));
    if (lg == NULL) return -2;
#define BWD(DV_) backward_items(&job->pb, job->g, job->vt, job->kp, job->dqs, job->dw, job->dloc, job->dkp, job->dvp, \
                                job->dkpad, job->dvpad, dtable, item0, item1, lg, lg + QT * (PP + LP), DV_)
    DISPATCH_DV(BWD)
#undef BWD
    free(lg);
    return 0;
}

/* Backward; items are whole (image, head) pairs (bh), over ``threads`` threads (see run_split).
 * vt: the pooled values in the panel layout of kt; kp: the normalised pooled keys (BH, P, d).
 * Outputs dqs (BH, N, d), dw and dloc (BH, N, L: the gradients of the window weights and of the
 * window logits), dkp / dvp (BH, P, d), dkpad / dvpad (layout of kpad; may be NULL) are
 * accumulated into (all zeroed by the caller, except dqs, dw and dloc which are written). Heads
 * are shared by the images of a batch, so the table gradient is accumulated per thread: thread t
 * of the team into dtable + t * dtable_stride (layout of table; room for ``threads`` of them,
 * zeroed, summed by the caller), or not at all where dtable is NULL. */
int transnext_aggregated_attention_backward(
    const REAL *qs, const REAL *kt, const REAL *vp, const REAL *kpad, const REAL *vpad, const REAL *table,
    const int64_t *yidx, const REAL *yw, const REAL *ltab, const REAL *extra, const REAL *g, const REAL *vt,
    const REAL *kp, REAL *dqs, REAL *dw, REAL *dloc, REAL *dkp, REAL *dvp, REAL *dkpad, REAL *dvpad, REAL *dtable,
    int64_t dtable_stride, int64_t table_su, int64_t table_sh, int64_t h, int64_t H, int64_t W, int64_t d, int64_t P,
    int64_t PP, int64_t Kh, int64_t Kw, int64_t T, int64_t window, int64_t item0, int64_t item1, int64_t threads) {
    if (!check(d, P, PP, Kh, Kw, window)) return -1;
    const BackwardJob job = {{qs, kt, vp, kpad, vpad, table, yw, ltab, extra, yidx, table_su, table_sh, h, H, W, P, PP, Kh,
                              Kw, T, window}, g, vt, kp, dqs, dw, dloc, dkp, dvp, dkpad, dvpad, dtable, dtable_stride, d};
    return run_split(backward_range, &job, item0, item1, threads);
}

/* The pooled-key bias with the x axis resolved (the ``table`` above) from the bias MLP evaluated on
 * unique pairs, given transposed and padded: mlpt (h, Ux, UyP), UyP = Uy rounded up to VL.
 * out[u, head, x, kx] = sum_t wx[x, kx, t] * mlpt[head, ix[x, kx, t], u] for the items [item0, item1)
 * (item = head * UyP / VL + block: VL unique rows u at a time). Along u the taps are the same, so one
 * entry's indices and weights are read once for VL rows and its products are vector FMAs; the VL
 * results go to VL rows of the output, each written sequentially. */
typedef struct {
    const REAL *mlpt, *wx;
    const int64_t *ix;
    REAL *out;
    int64_t h, Uy, UyP, Ux, W, Kw, T;
} BiasJob;

static int bias_range(const void *ctx, int64_t item0, int64_t item1, int64_t tid) {
    (void)tid;
    const BiasJob *job = (const BiasJob *)ctx;
    const REAL *mlpt = job->mlpt, *wx = job->wx;
    const int64_t *ix = job->ix;
    REAL *out = job->out;
    const int64_t h = job->h, Uy = job->Uy, UyP = job->UyP, Ux = job->Ux, Kw = job->Kw, T = job->T;
    const int64_t E = job->W * Kw, blocks = UyP / VL, su = h * E;
    for (int64_t item = item0; item < item1; item++) {
        const int64_t head = item / blocks, u0 = (item % blocks) * VL;
        const int64_t nu = Uy - u0 < VL ? Uy - u0 : VL;
        const REAL *src = mlpt + head * Ux * UyP + u0;
        REAL *dst = out + (u0 * h + head) * E;
        for (int64_t e = 0; e < E; e++) {
            const int64_t *i = ix + e * T;
            const REAL *w = wx + e * T;
            vec acc = vsplat(w[0]) * vload(src + i[0] * UyP);
            for (int64_t t = 1; t < T; t++) acc += vsplat(w[t]) * vload(src + i[t] * UyP);
            for (int64_t k = 0; k < nu; k++) dst[k * su + e] = acc[k];
        }
    }
    return 0;
}

int transnext_bias_table(const REAL *mlpt, const int64_t *ix, const REAL *wx, REAL *out, int64_t h, int64_t Uy,
                         int64_t UyP, int64_t Ux, int64_t W, int64_t Kw, int64_t T, int64_t item0, int64_t item1,
                         int64_t threads) {
    const BiasJob job = {mlpt, wx, ix, out, h, Uy, UyP, Ux, W, Kw, T};
    return run_split(bias_range, &job, item0, item1, threads);
}

int transnext_native_vector_length(void) { return VL; }

/* 1 where the entry points run their ranges on an OpenMP team, 0 where on the calling thread only. */
int transnext_native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Checked by the loader before any other entry point is called: a library built from another
 * revision of this file (other argument lists) or for the other element type is rebuilt, never
 * called. Bump TRANSNEXT_NATIVE_ABI (and ABI_VERSION in __init__.py) when a prototype changes. */
#define TRANSNEXT_NATIVE_ABI 2
int transnext_native_abi_version(void) { return TRANSNEXT_NATIVE_ABI; }
int transnext_native_real_size(void) { return (int)sizeof(REAL); }
