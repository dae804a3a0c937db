/* Fingerprint of one piece in one pass: the position-keyed digest and float64 statistics.
 *
 * The same rules as fingerprint.py's numpy path (`_digest`, `_piece_acc`), element for
 * element: digest = sum(mix64(bits + (base + offset) * G)) mod 2**64 with mix64 the splitmix64
 * finalizer, `bits` the element's little-endian bit pattern zero-extended; statistics over the
 * finite elements, in float64. numpy needs about twenty passes over memory for this; here a
 * piece is read once (plus once more from cache for the centred sum of squares).
 *
 * Plain C, no Python API: loaded with ctypes, which releases the GIL during the call.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#define G 0x9E3779B97F4A7C15ULL
#define C1 0xBF58476D1CE4E5B9ULL
#define C2 0x94D049BB133111EBULL
#define LANES 8

static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= C1;
    z ^= z >> 27;
    z *= C2;
    z ^= z >> 31;
    return z;
}

static inline uint64_t load_bits(const char *p, int kind) {
    switch (kind) {
    case K_FLOAT32: { uint32_t u; memcpy(&u, p, 4); return u; }
    case K_FLOAT64: { uint64_t u; memcpy(&u, p, 8); return u; }
    default: { uint16_t u; memcpy(&u, p, 2); return u; }
    }
}

static inline double to_double(uint64_t bits, int kind) {
    switch (kind) {
    case K_FLOAT32: { uint32_t u = (uint32_t)bits; float f; memcpy(&f, &u, 4); return f; }
    case K_FLOAT64: { double d; memcpy(&d, &bits, 8); return d; }
    case K_BFLOAT16: { uint32_t u = (uint32_t)bits << 16; float f; memcpy(&f, &u, 4); return f; }
    default: return half_to_float((uint16_t)bits);
    }
}

/* Sums of one run of a row, all elements finite: lanes keep the order fixed (and let the
 * compiler use vector registers without reassociating anything). */
typedef struct {
    double sum[LANES], sabs[LANES], ssq[LANES], mn[LANES], mx[LANES];
    uint64_t dig[LANES];
} lanes_t;

/* The contiguous loop of a row in GCC vector extensions (plain C, no intrinsics; clang has
 * them too): 8 elements per step in one vector of 8, lane k taking element j + k exactly as
 * LANE_STEP does, so the sums are the same to the bit. Returns how far it got (a multiple of
 * 8); the row's tail goes through LANE_STEP. */
typedef uint16_t vu16x8 __attribute__((vector_size(16)));
typedef uint32_t vu32x8 __attribute__((vector_size(32)));
typedef float vf32x8 __attribute__((vector_size(32)));
typedef uint64_t vu64x8 __attribute__((vector_size(64)));
typedef int64_t vi64x8 __attribute__((vector_size(64)));
typedef double vf64x8 __attribute__((vector_size(64)));

#define BITS_F32(raw) __builtin_convertvector((raw), vu64x8)
#define DBL_F32(raw) __builtin_convertvector((vf32x8)(raw), vf64x8)
#define BITS_BF16(raw) __builtin_convertvector((raw), vu64x8)
#define DBL_BF16(raw) __builtin_convertvector((vf32x8)(__builtin_convertvector((raw), vu32x8) << 16), vf64x8)
#define BITS_F64(raw) (raw)
#define DBL_F64(raw) ((vf64x8)(raw))

#define VEC_BODY(VRAW, BITS, DBL)                                                               \
    {                                                                                           \
        vf64x8 s, a, q, mn, mx;                                                                 \
        vu64x8 dg, off, stride;                                                                 \
        vi64x8 bad, absmask;                                                                    \
        for (int k = 0; k < LANES; k++) {                                                       \
            s[k] = sum[k]; a[k] = sabs[k]; q[k] = ssq[k];                                       \
            mn[k] = mnv[k]; mx[k] = mxv[k]; dg[k] = dig[k]; bad[k] = 0;                         \
            off[k] = (uint64_t)(idx0 + (uint64_t)k * (uint64_t)es) * G;                         \
            stride[k] = (uint64_t)LANES * (uint64_t)es * G;                                     \
            absmask[k] = 0x7fffffffffffffffLL;                                                  \
        }                                                                                       \
        int64_t j = 0;                                                                          \
        for (; j + LANES <= n; j += LANES) {                                                    \
            VRAW raw;                                                                           \
            memcpy(&raw, v + j, sizeof raw);                                                    \
            vu64x8 z = BITS(raw) + off;                                                         \
            off += stride;                                                                      \
            z ^= z >> 30;                                                                       \
            z *= C1;                                                                            \
            z ^= z >> 27;                                                                       \
            z *= C2;                                                                            \
            z ^= z >> 31;                                                                       \
            dg += z;                                                                            \
            vf64x8 y = DBL(raw);                                                                \
            bad |= ~((y - y) == 0.0);                                                           \
            s += y;                                                                             \
            a += (vf64x8)((vi64x8)y & absmask);                                                 \
            q += y * y;                                                                         \
            vi64x8 lt = y < mn, gt = y > mx;                                                    \
            mn = (vf64x8)(((vi64x8)y & lt) | ((vi64x8)mn & ~lt));                               \
            mx = (vf64x8)(((vi64x8)y & gt) | ((vi64x8)mx & ~gt));                               \
        }                                                                                       \
        for (int k = 0; k < LANES; k++) {                                                       \
            sum[k] = s[k]; sabs[k] = a[k]; ssq[k] = q[k];                                       \
            mnv[k] = mn[k]; mxv[k] = mx[k]; dig[k] = dg[k];                                     \
            badv[k] |= bad[k] != 0;                                                             \
        }                                                                                       \
        return j;                                                                               \
    }

#define VEC_ARGS(T) double *restrict sum, double *restrict sabs, double *restrict ssq, double *restrict mnv, \
    double *restrict mxv, uint64_t *restrict dig, int *restrict badv, const T *restrict v, int64_t n, uint64_t idx0, int64_t es
static inline int64_t vec_f32(VEC_ARGS(uint32_t)) VEC_BODY(vu32x8, BITS_F32, DBL_F32)
static inline int64_t vec_bf16(VEC_ARGS(uint16_t)) VEC_BODY(vu16x8, BITS_BF16, DBL_BF16)
static inline int64_t vec_f64(VEC_ARGS(uint64_t)) VEC_BODY(vu64x8, BITS_F64, DBL_F64)
static inline int64_t vec_f16(VEC_ARGS(uint16_t)) { (void)sum; (void)sabs; (void)ssq; (void)mnv; (void)mxv; (void)dig; (void)badv; (void)v; (void)n; (void)idx0; (void)es; return 0; }

/* One row of `n` elements, `bs` bytes apart, flat indices idx0 + j * es. Returns 0 when a
 * non-finite element was seen (the caller then takes the careful path for the piece). The
 * accumulators live in locals for the loop (so they stay in registers) and the contiguous
 * case has its own loop (so it can use vector loads). */
#define LANE_STEP(KIND, B, K)                                                                         \
    {                                                                                           \
        uint64_t b_ = (B);                                                                      \
        dig[K] += mix64(b_ + (uint64_t)(idx0 + (j + K) * es) * G);                              \
        double y = to_double(b_, KIND);                                                         \
        bad[K] |= !(y - y == 0.0);                                                              \
        sum[K] += y;                                                                            \
        sabs[K] += fabs(y);                                                                     \
        ssq[K] += y * y;                                                                        \
        mn[K] = y < mn[K] ? y : mn[K];                                                          \
        mx[K] = y > mx[K] ? y : mx[K];                                                          \
    }

#define ROW_BODY(KIND, T, VEC)                                                                     \
    {                                                                                           \
        double sum[LANES], sabs[LANES], ssq[LANES], mn[LANES], mx[LANES];                       \
        uint64_t dig[LANES];                                                                    \
        int bad[LANES];                                                                         \
        for (int k = 0; k < LANES; k++) {                                                       \
            sum[k] = L->sum[k]; sabs[k] = L->sabs[k]; ssq[k] = L->ssq[k];                       \
            mn[k] = L->mn[k]; mx[k] = L->mx[k]; dig[k] = L->dig[k]; bad[k] = 0;                 \
        }                                                                                       \
        int64_t j = 0;                                                                          \
        if (bs == (int64_t)sizeof(T)) {                                                         \
            const T *restrict v = (const T *)row;                                               \
            j = VEC(sum, sabs, ssq, mn, mx, dig, bad, v, n, idx0, es);                          \
            for (; j + LANES <= n; j += LANES)                                                  \
                for (int k = 0; k < LANES; k++) LANE_STEP(KIND, (uint64_t)v[j + k], k)                \
        } else {                                                                                \
            for (; j + LANES <= n; j += LANES)                                                  \
                for (int k = 0; k < LANES; k++) LANE_STEP(KIND, load_bits(row + (j + k) * bs, KIND), k) \
        }                                                                                       \
        for (; j < n; j++) {                                                                    \
            const int k = 0;                                                                    \
            LANE_STEP(KIND, load_bits(row + j * bs, KIND), k)                                        \
        }                                                                                       \
        int finite = 1;                                                                         \
        for (int k = 0; k < LANES; k++) {                                                       \
            L->sum[k] = sum[k]; L->sabs[k] = sabs[k]; L->ssq[k] = ssq[k];                       \
            L->mn[k] = mn[k]; L->mx[k] = mx[k]; L->dig[k] = dig[k]; finite &= !bad[k];          \
        }                                                                                       \
        return finite;                                                                          \
    }

MULTIVERSION static int row_f32(lanes_t *restrict L, const char *row, int64_t n, int64_t bs, uint64_t idx0, int64_t es) ROW_BODY(K_FLOAT32, uint32_t, vec_f32)
MULTIVERSION static int row_f64(lanes_t *restrict L, const char *row, int64_t n, int64_t bs, uint64_t idx0, int64_t es) ROW_BODY(K_FLOAT64, uint64_t, vec_f64)
MULTIVERSION static int row_bf16(lanes_t *restrict L, const char *row, int64_t n, int64_t bs, uint64_t idx0, int64_t es) ROW_BODY(K_BFLOAT16, uint16_t, vec_bf16)
MULTIVERSION static int row_f16(lanes_t *restrict L, const char *row, int64_t n, int64_t bs, uint64_t idx0, int64_t es) ROW_BODY(K_FLOAT16, uint16_t, vec_f16)

MULTIVERSION static double centred_row(const char *row, int kind, int64_t n, int64_t bs, double mean, int all_finite) {
    double acc[LANES] = {0};
    int64_t j = 0;
    if (all_finite && kind == K_FLOAT32 && bs == 4) {
        const float *f = (const float *)row;
        for (; j + LANES <= n; j += LANES)
            for (int k = 0; k < LANES; k++) {
                double d = (double)f[j + k] - mean;
                acc[k] += d * d;
            }
    }
    for (; j < n; j++) {
        double y = to_double(load_bits(row + j * bs, kind), kind);
        if (y - y == 0.0) {
            double d = y - mean;
            acc[0] += d * d;
        }
    }
    double s = 0.0;
    for (int k = 0; k < LANES; k++) s += acc[k];
    return s;
}

/* Walk the rows (last axis) of an N-d strided piece in C order. */
typedef struct {
    int ndim;
    const int64_t *shape, *bstrides, *estrides;
    int64_t coord[32];
} walk_t;

static int walk_next(walk_t *w) {
    for (int d = w->ndim - 2; d >= 0; d--) {
        if (++w->coord[d] < w->shape[d]) return 1;
        w->coord[d] = 0;
    }
    return 0;
}

static void walk_row(const walk_t *w, const char *data, uint64_t base, const char **row, uint64_t *idx) {
    const char *p = data;
    uint64_t i = base;
    for (int d = 0; d < w->ndim - 1; d++) {
        p += w->coord[d] * w->bstrides[d];
        i += (uint64_t)(w->coord[d] * w->estrides[d]);
    }
    *row = p;
    *idx = i;
}

/* out_f: sum, min, max, sum_abs, sumsq, m2 over finite elements; out_i: nan, posinf, neginf,
 * finite count; *digest. Returns 0, or -1 for arguments it does not take. */
int ckpt_fingerprint_piece(const char *data, int kind, int ndim, const int64_t *shape, const int64_t *bstrides,
                           const int64_t *estrides, uint64_t base, double *out_f, int64_t *out_i, uint64_t *digest) {
    static const int64_t one = 1, zero = 0;
    if (ndim < 0 || ndim > 32 || kind < 0 || kind > 3) return -1;
    if (ndim == 0) {
        shape = &one;
        bstrides = estrides = &zero;
        ndim = 1;
    }
    for (int d = 0; d < ndim; d++)
        if (shape[d] <= 0) {
            memset(out_f, 0, 6 * sizeof(double));
            memset(out_i, 0, 4 * sizeof(int64_t));
            *digest = 0;
            return 0;
        }
    walk_t w = {ndim, shape, bstrides, estrides, {0}};
    int64_t n = shape[ndim - 1], bs = bstrides[ndim - 1], es = estrides[ndim - 1];

    lanes_t L;
    for (int k = 0; k < LANES; k++) {
        L.sum[k] = L.sabs[k] = L.ssq[k] = 0.0;
        L.mn[k] = INFINITY;
        L.mx[k] = -INFINITY;
        L.dig[k] = 0;
    }
    int all_finite = 1;
    do {
        const char *row;
        uint64_t idx0;
        walk_row(&w, data, base, &row, &idx0);
        switch (kind) {
        case K_FLOAT32: all_finite &= row_f32(&L, row, n, bs, idx0, es); break;
        case K_FLOAT64: all_finite &= row_f64(&L, row, n, bs, idx0, es); break;
        case K_BFLOAT16: all_finite &= row_bf16(&L, row, n, bs, idx0, es); break;
        default: all_finite &= row_f16(&L, row, n, bs, idx0, es); break;
        }
    } while (walk_next(&w));

    uint64_t dig = 0;
    for (int k = 0; k < LANES; k++) dig += L.dig[k];
    *digest = dig;
    int64_t nan = 0, posinf = 0, neginf = 0, total = 0;
    double sum = 0, sabs = 0, ssq = 0, mn = INFINITY, mx = -INFINITY;
    if (all_finite) {
        for (int k = 0; k < LANES; k++) {
            sum += L.sum[k];
            sabs += L.sabs[k];
            ssq += L.ssq[k];
            mn = L.mn[k] < mn ? L.mn[k] : mn;
            mx = L.mx[k] > mx ? L.mx[k] : mx;
        }
    }
    /* Element count, and with a NaN or inf in the piece the careful sums over finite ones. */
    memset(w.coord, 0, sizeof(w.coord));
    do {
        const char *row;
        uint64_t idx0;
        walk_row(&w, data, base, &row, &idx0);
        total += n;
        if (all_finite) continue;
        for (int64_t j = 0; j < n; j++) {
            double y = to_double(load_bits(row + j * bs, kind), kind);
            if (isnan(y)) nan++;
            else if (y == INFINITY) posinf++;
            else if (y == -INFINITY) neginf++;
            else {
                sum += y;
                sabs += fabs(y);
                ssq += y * y;
                mn = y < mn ? y : mn;
                mx = y > mx ? y : mx;
            }
        }
    } while (walk_next(&w));
    int64_t finite = total - nan - posinf - neginf;
    double m2 = 0.0;
    if (finite) {
        double mean = sum / (double)finite;
        memset(w.coord, 0, sizeof(w.coord));
        do {
            const char *row;
            uint64_t idx0;
            walk_row(&w, data, base, &row, &idx0);
            m2 += centred_row(row, kind, n, bs, mean, all_finite);
        } while (walk_next(&w));
    }
    out_f[0] = sum;
    out_f[1] = mn;
    out_f[2] = mx;
    out_f[3] = sabs;
    out_f[4] = ssq;
    out_f[5] = m2;
    out_i[0] = nan;
    out_i[1] = posinf;
    out_i[2] = neginf;
    out_i[3] = finite;
    return 0;
}

/* The calling convention of this library's functions (both C files). `_native.py` loads the
 * library only when it expects the same number: bump both when a signature or a rule changes. */
int ckpt_kernel_abi(void) { return 2; }
