/* Tolerance figures of one stored-order piece in one pass (kernel.py `_fast_piece`).
 *
 * The piece is C-contiguous, seen as (outer, layers, inner) around its layer axis (layers = 1
 * without one). For every element, in the work dtype (float32 for inputs of 4 bytes or less,
 * float64 for float64) and in numpy's order of operations:
 *
 *     d = |a - b|,  allowance = |b| * rtol + atol,  headroom = d / allowance,  rel = d / |b|
 *
 * with rtol and atol rounded to the work dtype first (numpy 2 does that with Python floats).
 * Kept: the maxima of d, rel (0/0 ignored, as np.fmax does) and headroom, overall and per
 * layer, and where the largest headroom is first in canonical (layer first) C order. When any
 * headroom is not strictly below 1 (a failure, exactly at the allowance, NaN or inf) the
 * piece is not eligible and the caller compares the block again the careful way; so no rule
 * for NaN or inf lives here. Every figure is bit-identical to the numpy path: the same
 * IEEE operations on the same values (no FMA contraction, see setup.py), and maxima do not
 * depend on the order they are taken in.
 *
 * Casts (dtype policy `cast`) happen here too: float32 -> bfloat16 rounds to nearest even as
 * ml_dtypes does, float64 -> float32 as C (and numpy) do; others are refused (-1) and the
 * caller uses numpy.
 *
 * Plain C, no Python API: loaded with ctypes, which releases the GIL during the call.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#define CHUNK 512 /* elements converted and reduced at once: both sides stay in L1 */
#define SHORT_ROW 8 /* rows shorter than this take the scalar walk (measured: the vector walk wins from 8) */

/* How one side becomes a work value. */
enum conv { CV_REFUSED = 0, CV_F32, CV_BF16, CV_F16, CV_F32_TO_BF16, CV_F64_TO_F32, CV_F64 };

/* float -> bfloat16 -> float, rounding to nearest even; NaN stays a (quiet) NaN. The same
 * bits as ml_dtypes (Eigen's float_to_bfloat16_rtne). */
static inline float round_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    if (f != f) return bits_to_float((u & 0x80000000u) | 0x7fc00000u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return bits_to_float(u & 0xffff0000u);
}

static int conversion(int kind, int cast, int work64) {
    if (work64) {
        if (cast == K_NONE) return kind == K_FLOAT64 ? CV_F64 : CV_REFUSED;
        if (cast != K_FLOAT64) return CV_REFUSED;
        switch (kind) { /* widening is exact: convert straight to double */
        case K_FLOAT64: return CV_F64;
        case K_FLOAT32: return CV_F32;
        case K_BFLOAT16: return CV_BF16;
        case K_FLOAT16: return CV_F16;
        default: return CV_REFUSED;
        }
    }
    switch (cast) {
    case K_NONE:
    case K_FLOAT32:
        switch (kind) {
        case K_FLOAT32: return CV_F32;
        case K_BFLOAT16: return CV_BF16;
        case K_FLOAT16: return CV_F16;
        case K_FLOAT64: return cast == K_FLOAT32 ? CV_F64_TO_F32 : CV_REFUSED;
        default: return CV_REFUSED;
        }
    case K_BFLOAT16:
        return kind == K_BFLOAT16 ? CV_BF16 : kind == K_FLOAT32 ? CV_F32_TO_BF16 : CV_REFUSED;
    case K_FLOAT16:
        return kind == K_FLOAT16 ? CV_F16 : CV_REFUSED;
    default:
        return CV_REFUSED;
    }
}

/* Elements [start, start + n) of a side as float32 work values: the data itself when it is
 * float32 already, else converted into `buf`. */
static inline const float *view_f32(float *restrict buf, const void *data, int conv, int64_t start, int64_t n) {
    switch (conv) {
    case CV_F32:
        return (const float *)data + start;
    case CV_BF16: {
        const uint16_t *s = (const uint16_t *)data + start;
        for (int64_t i = 0; i < n; i++) buf[i] = bits_to_float((uint32_t)s[i] << 16);
        return buf;
    }
    case CV_F16: {
        const uint16_t *s = (const uint16_t *)data + start;
        for (int64_t i = 0; i < n; i++) buf[i] = half_to_float(s[i]);
        return buf;
    }
    case CV_F32_TO_BF16: {
        const float *s = (const float *)data + start;
        for (int64_t i = 0; i < n; i++) buf[i] = round_to_bf16(s[i]);
        return buf;
    }
    default: { /* CV_F64_TO_F32 */
        const double *s = (const double *)data + start;
        for (int64_t i = 0; i < n; i++) buf[i] = (float)s[i];
        return buf;
    }
    }
}

static inline const double *view_f64(double *restrict buf, const void *data, int conv, int64_t start, int64_t n) {
    switch (conv) {
    case CV_F64:
        return (const double *)data + start;
    case CV_F32: {
        const float *s = (const float *)data + start;
        for (int64_t i = 0; i < n; i++) buf[i] = s[i];
        return buf;
    }
    case CV_BF16: {
        const uint16_t *s = (const uint16_t *)data + start;
        for (int64_t i = 0; i < n; i++) buf[i] = bits_to_float((uint32_t)s[i] << 16);
        return buf;
    }
    default: { /* CV_F16 */
        const uint16_t *s = (const uint16_t *)data + start;
        for (int64_t i = 0; i < n; i++) buf[i] = half_to_float(s[i]);
        return buf;
    }
    }
}

/* The maxima of one run of `n` elements; returns 0 when some headroom is not < 1 (or NaN).
 * GCC vector extensions (plain C, no intrinsics): 32 bytes at a time, split in two on a CPU
 * without AVX. A max does not depend on the order it is taken in, so lanes change nothing.
 * `vmax(v, m)` is `v > m ? v : m`: a NaN in v leaves m (rel 0/0 ignored, as np.fmax does).
 * rel starts at -1: "no rel seen" (every rel that is not NaN is >= 0). */
typedef float vf32 __attribute__((vector_size(32)));
typedef int32_t vi32 __attribute__((vector_size(32)));
typedef double vf64 __attribute__((vector_size(32)));
typedef int64_t vi64 __attribute__((vector_size(32)));

#define RUN_BODY(T, VF, VI, ABS_MASK)                                                            \
    {                                                                                            \
        enum { W = 32 / sizeof(T) };                                                             \
        VF vma, vmr, vmh, vrtol, vatol, one;                                                     \
        VI bad, absmask;                                                                         \
        for (int k = 0; k < W; k++) {                                                            \
            vma[k] = 0; vmr[k] = -1; vmh[k] = 0; vrtol[k] = rtol; vatol[k] = atol; one[k] = 1;   \
            bad[k] = 0; absmask[k] = ABS_MASK;                                                   \
        }                                                                                        \
        int64_t j = 0;                                                                           \
        for (; j + W <= n; j += W) {                                                             \
            VF xv, yv;                                                                           \
            memcpy(&xv, x + j, sizeof xv);                                                       \
            memcpy(&yv, y + j, sizeof yv);                                                       \
            VF d = (VF)((VI)(xv - yv) & absmask), ay = (VF)((VI)yv & absmask);                   \
            VF allow = ay * vrtol;                                                               \
            allow = allow + vatol;                                                               \
            VF r = d / allow, rel = d / ay;                                                      \
            bad |= ~(r < one);                                                                   \
            VI k1 = d > vma, k2 = rel > vmr, k3 = r > vmh;                                       \
            vma = (VF)(((VI)d & k1) | ((VI)vma & ~k1));                                          \
            vmr = (VF)(((VI)rel & k2) | ((VI)vmr & ~k2));                                        \
            vmh = (VF)(((VI)r & k3) | ((VI)vmh & ~k3));                                          \
        }                                                                                        \
        int any_bad = 0;                                                                         \
        T ma = 0, mr = -1, mh = 0;                                                               \
        for (int k = 0; k < W; k++) {                                                            \
            any_bad |= bad[k] != 0;                                                              \
            ma = vma[k] > ma ? vma[k] : ma;                                                      \
            mr = vmr[k] > mr ? vmr[k] : mr;                                                      \
            mh = vmh[k] > mh ? vmh[k] : mh;                                                      \
        }                                                                                        \
        for (; j < n; j++) {                                                                     \
            T xv = x[j], yv = y[j];                                                              \
            T d = fabs_(xv - yv), ay = fabs_(yv);                                                \
            T allow = ay * rtol;                                                                 \
            allow = allow + atol;                                                                \
            T r = d / allow, rel = d / ay;                                                       \
            any_bad |= !(r < (T)1);                                                              \
            ma = d > ma ? d : ma;                                                                \
            mr = rel > mr ? rel : mr;                                                            \
            mh = r > mh ? r : mh;                                                                \
        }                                                                                        \
        *o_abs = ma > *o_abs ? ma : *o_abs;                                                      \
        *o_rel = mr > *o_rel ? mr : *o_rel;                                                      \
        *o_head = mh > *o_head ? mh : *o_head;                                                   \
        return !any_bad;                                                                         \
    }

/* First j in the run whose headroom equals `head` (recomputed the same way). */
#define FIND_BODY(T)                                                                             \
    {                                                                                            \
        for (int64_t j = 0; j < n; j++) {                                                        \
            T d = fabs_(x[j] - y[j]), ay = fabs_(y[j]);                                          \
            T allow = ay * rtol;                                                                 \
            allow = allow + atol;                                                                \
            if (d / allow == head) return j;                                                     \
        }                                                                                        \
        return 0;                                                                                \
    }

#define fabs_ fabsf
MULTIVERSION static int run_f32(const float *restrict x, const float *restrict y, int64_t n, float rtol, float atol,
                                float *o_abs, float *o_rel, float *o_head) RUN_BODY(float, vf32, vi32, 0x7fffffff)
static int64_t find_f32(const float *x, const float *y, int64_t n, float rtol, float atol, float head) FIND_BODY(float)
#undef fabs_
#define fabs_ fabs
MULTIVERSION static int run_f64(const double *restrict x, const double *restrict y, int64_t n, double rtol, double atol,
                                double *o_abs, double *o_rel, double *o_head) RUN_BODY(double, vf64, vi64, 0x7fffffffffffffffLL)
static int64_t find_f64(const double *x, const double *y, int64_t n, double rtol, double atol, double head) FIND_BODY(double)
#undef fabs_

/* The walk over (outer, layers, inner) in stored order, run by run. The largest headroom
 * and its earliest canonical position (layer, outer, inner) are kept; a run is searched for
 * its position only when its maximum could beat the one held. Per-layer figures are folded
 * straight into the caller's float64 arrays (float -> double is exact and keeps order). */
#define WALK_BODY(T, VIEW, RUN, FIND)                                                            \
    {                                                                                            \
        T buf_a[CHUNK], buf_b[CHUNK];                                                            \
        T best = -1, tabs = 0, trel = -1;                                                        \
        int64_t bo = 0, bl = 0, bi = 0;                                                          \
        for (int64_t o = 0; o < outer; o++)                                                      \
            for (int64_t l = 0; l < layers; l++) {                                               \
                int64_t row = (o * layers + l) * inner;                                          \
                T labs = 0, lrel = -1, lhead = 0;                                                \
                for (int64_t i0 = 0; i0 < inner; i0 += CHUNK) {                                  \
                    int64_t n = inner - i0 < CHUNK ? inner - i0 : CHUNK;                         \
                    const T *x = VIEW(buf_a, a, ca, row + i0, n);                                \
                    const T *y = VIEW(buf_b, b, cb, row + i0, n);                                \
                    T cabs = 0, crel = -1, chead = 0;                                            \
                    if (!RUN(x, y, n, rtol, atol, &cabs, &crel, &chead)) return 0;               \
                    labs = cabs > labs ? cabs : labs;                                            \
                    lrel = crel > lrel ? crel : lrel;                                            \
                    lhead = chead > lhead ? chead : lhead;                                       \
                    if (chead > best || (chead == best && (l < bl || (l == bl && o < bo)))) {    \
                        int64_t j = FIND(x, y, n, rtol, atol, chead);                            \
                        best = chead;                                                            \
                        bo = o; bl = l; bi = i0 + j;                                             \
                    }                                                                            \
                }                                                                                \
                if (layer_abs) {                                                                 \
                    if ((double)labs > layer_abs[l]) layer_abs[l] = labs;                        \
                    if (lrel >= 0 && (double)lrel > layer_rel[l]) layer_rel[l] = lrel;           \
                    if ((double)lhead > layer_head[l]) layer_head[l] = lhead;                    \
                }                                                                                \
                tabs = labs > tabs ? labs : tabs;                                                \
                trel = lrel > trel ? lrel : trel;                                                \
            }                                                                                    \
        out[0] = tabs;                                                                           \
        out[1] = trel >= 0 ? (double)trel : NAN;                                                 \
        out[2] = best < 0 ? 0 : best; /* an empty piece */                                       \
        *where = (bo * layers + bl) * inner + bi;                                                \
        return 1;                                                                                \
    }

/* The same walk when rows are short (a layer axis near the end: inner is small). Calling
 * the vector loop per row would cost more than the row; one scalar loop over each outer
 * index's layers * inner contiguous elements instead. Only with a layer axis. */
#define SHORT_WALK_BODY(T, VIEW)                                                                 \
    {                                                                                            \
        T buf_a[CHUNK], buf_b[CHUNK];                                                            \
        T best = -1, tabs = 0, trel = -1;                                                        \
        int64_t bo = 0, bl = 0, bi = 0, span = layers * inner;                                   \
        for (int64_t o = 0; o < outer; o++)                                                      \
            for (int64_t s0 = 0; s0 < span; s0 += CHUNK) {                                       \
                int64_t n = span - s0 < CHUNK ? span - s0 : CHUNK;                               \
                const T *x = VIEW(buf_a, a, ca, o * span + s0, n);                               \
                const T *y = VIEW(buf_b, b, cb, o * span + s0, n);                               \
                int64_t l = s0 / inner, i = s0 % inner;                                          \
                for (int64_t j = 0; j < n; j++) {                                                \
                    T d = fabs_(x[j] - y[j]), ay = fabs_(y[j]);                                  \
                    T allow = ay * rtol;                                                         \
                    allow = allow + atol;                                                        \
                    T r = d / allow, rel = d / ay;                                               \
                    if (!(r < (T)1)) return 0;                                                   \
                    if ((double)d > layer_abs[l]) layer_abs[l] = d;                              \
                    if ((double)rel > layer_rel[l]) layer_rel[l] = rel; /* NaN: no */            \
                    if ((double)r > layer_head[l]) layer_head[l] = r;                            \
                    tabs = d > tabs ? d : tabs;                                                  \
                    trel = rel > trel ? rel : trel;                                              \
                    if (r > best || (r == best && (l < bl || (l == bl && (o < bo || (o == bo && i < bi)))))) { \
                        best = r;                                                                \
                        bo = o; bl = l; bi = i;                                                  \
                    }                                                                            \
                    if (++i == inner) {                                                          \
                        i = 0;                                                                   \
                        l++;                                                                     \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        out[0] = tabs;                                                                           \
        out[1] = trel >= 0 ? (double)trel : NAN;                                                 \
        out[2] = best < 0 ? 0 : best;                                                            \
        *where = (bo * layers + bl) * inner + bi;                                                \
        return 1;                                                                                \
    }

#define fabs_ fabsf
static int short_walk_f32(const void *a, int ca, const void *b, int cb, int64_t outer, int64_t layers, int64_t inner,
                          float rtol, float atol, double *layer_abs, double *layer_rel, double *layer_head,
                          double *out, int64_t *where) SHORT_WALK_BODY(float, view_f32)
#undef fabs_
#define fabs_ fabs
static int short_walk_f64(const void *a, int ca, const void *b, int cb, int64_t outer, int64_t layers, int64_t inner,
                          double rtol, double atol, double *layer_abs, double *layer_rel, double *layer_head,
                          double *out, int64_t *where) SHORT_WALK_BODY(double, view_f64)
#undef fabs_

MULTIVERSION static int walk_f32(const void *a, int ca, const void *b, int cb, int64_t outer, int64_t layers, int64_t inner,
                    float rtol, float atol, double *layer_abs, double *layer_rel, double *layer_head,
                    double *out, int64_t *where) WALK_BODY(float, view_f32, run_f32, find_f32)

MULTIVERSION static int walk_f64(const void *a, int ca, const void *b, int cb, int64_t outer, int64_t layers, int64_t inner,
                    double rtol, double atol, double *layer_abs, double *layer_rel, double *layer_head,
                    double *out, int64_t *where) WALK_BODY(double, view_f64, run_f64, find_f64)

/* One piece. a, b: C-contiguous, outer * layers * inner elements of kinds kind_a, kind_b;
 * cast: the kind both are converted to first, or -1. layer_abs/rel/head: the caller's
 * per-layer maxima for this piece's `layers` layers (float64, updated in place), or NULL
 * without a layer axis. out: max |a - b|, max rel (NaN when every rel was 0/0), max
 * headroom; *where: the stored-order flat index (in the piece) of the largest headroom
 * earliest in canonical order. Returns 1 when every headroom is < 1 (out and *where are
 * set), 0 when some is not (the layer arrays may then be partly updated: the caller throws
 * them away), -1 for arguments it does not take (nothing touched). */
int ckpt_compare_piece(const void *a, int kind_a, const void *b, int kind_b, int cast, int64_t outer, int64_t layers,
                       int64_t inner, double rtol, double atol, double *layer_abs, double *layer_rel,
                       double *layer_head, double *out, int64_t *where) {
    if (outer < 0 || layers < 0 || inner < 0) return -1;
    if (cast == K_NONE && kind_a != kind_b) return -1;
    int work64 = cast == K_FLOAT64 || (cast == K_NONE && kind_a == K_FLOAT64);
    int ca = conversion(kind_a, cast, work64), cb = conversion(kind_b, cast, work64);
    if (ca == CV_REFUSED || cb == CV_REFUSED) return -1;
    if (layer_abs && (!layer_rel || !layer_head)) return -1;
    if (layer_abs && inner < SHORT_ROW) {
        if (work64)
            return short_walk_f64(a, ca, b, cb, outer, layers, inner, rtol, atol, layer_abs, layer_rel, layer_head, out, where);
        return short_walk_f32(a, ca, b, cb, outer, layers, inner, (float)rtol, (float)atol, layer_abs, layer_rel,
                              layer_head, out, where);
    }
    if (work64)
        return walk_f64(a, ca, b, cb, outer, layers, inner, rtol, atol, layer_abs, layer_rel, layer_head, out, where);
    return walk_f32(a, ca, b, cb, outer, layers, inner, (float)rtol, (float)atol, layer_abs, layer_rel, layer_head,
                    out, where);
}
