/* Tiled top-k by magnitude, and sparse scatter-accumulate.
 *
 * Top-k per tile without a sort: a 1024-bin histogram of the magnitude's top bits
 * finds the bin holding the k-th largest |v|; a quickselect over that bin's few
 * candidates (key = |v| bits << 16 | (tile - 1 - local), unique per element, the
 * reference's tie rule: larger |v| first, then the lower index) finds the exact
 * threshold; a last in-order sweep emits the selected positions, already ascending.
 * The tile (at most 64 Ki elements) stays in cache through all sweeps.
 */
#include <stdlib.h>

#include "lb_common.h"

#define LB_HBITS 10
#define LB_HSHIFT (31 - LB_HBITS)

typedef struct {
    const void *x;
    int dtype;
    float *res;
    float decay;
    int64_t n;
    int64_t k;
    int64_t tile;
    int32_t *idx_out;
    float *val_out;
} tctx;

/* The kth largest (k >= 1) of n distinct keys; reorders a. */
static uint64_t kth_largest(uint64_t *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        uint64_t x = a[lo], y = a[mid], z = a[hi];
        uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                uint64_t t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (target <= j)
            hi = j;
        else if (target >= i)
            lo = i;
        else
            return a[target];
    }
    return a[target];
}

#if LB_X86
LB_AVX2 static int tile_load_avx2(const tctx *c, int64_t lo, int64_t len, float *vals, uint32_t *keys, int64_t *done) {
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i worst = _mm256_setzero_si256();
    const __m256 dec = _mm256_set1_ps(c->decay);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        __m256 v = lb_load8(c->x, c->dtype, lo + i);
        if (c->res) {
            __m256 r = _mm256_loadu_ps(c->res + lo + i);
            if (c->decay != 1.0f) r = _mm256_mul_ps(r, dec);
            v = _mm256_add_ps(v, r);
            _mm256_storeu_ps(c->res + lo + i, v);
        }
        _mm256_storeu_ps(vals + i, v);
        __m256i key = _mm256_and_si256(_mm256_castps_si256(v), absmask);
        _mm256_storeu_si256((__m256i *)(keys + i), key);
        worst = _mm256_max_epu32(worst, key);
    }
    *done = i;
    const __m256i big = _mm256_set1_epi32(0x7F7FFFFF); /* largest finite magnitude */
    return _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(worst, big), big)) != -1;
}
#endif

/* Sweep 1: v into vals (and the residual), |v| bits into keys; returns nonzero on NaN/Inf. */
static int tile_load(const tctx *c, int64_t lo, int64_t len, float *vals, uint32_t *keys) {
    uint32_t worst = 0;
    int64_t i = 0;
#if LB_X86
    if (lb_has_avx2()) {
        int bad = tile_load_avx2(c, lo, len, vals, keys, &i);
        if (bad) worst = 0x7F800000u;
    }
#endif
    for (; i < len; i++) {
        float v = lb_load1(c->x, c->dtype, lo + i);
        if (c->res) {
            v = c->decay != 1.0f ? v + c->res[lo + i] * c->decay : v + c->res[lo + i];
            c->res[lo + i] = v;
        }
        vals[i] = v;
        uint32_t key = lb_f32_to_bits(v) & 0x7FFFFFFFu;
        keys[i] = key;
        worst = key > worst ? key : worst;
    }
    return worst >= 0x7F800000u;
}

#if LB_X86
/* Selected positions: keys >= kb, then the exact rule for key == kb. */
LB_AVX2 static int64_t tile_emit_avx2(const uint32_t *keys, const float *vals, int64_t len, uint32_t kb, int64_t ilim,
                                      int32_t *io, float *vo, int64_t *done) {
    const __m256i thr = _mm256_set1_epi32((int)kb - 1);
    int64_t j = 0, i = 0;
    for (; i + 8 <= len; i += 8) {
        __m256i key = _mm256_loadu_si256((const __m256i *)(keys + i));
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, thr)));
        while (m) {
            int b = __builtin_ctz(m);
            m &= m - 1;
            int64_t p = i + b;
            if (keys[p] > kb || p <= ilim) {
                io[j] = (int32_t)p;
                vo[j] = vals[p];
                j++;
            }
        }
    }
    *done = i;
    return j;
}
#endif

static void topk_tile(const tctx *c, int64_t t, float *vals, uint32_t *keys, uint64_t *cand, uint32_t *hist, int *bad) {
    int64_t lo = t * c->tile;
    int64_t len = c->n - lo < c->tile ? c->n - lo : c->tile;
    int64_t m = c->k < len ? c->k : len;
    int32_t *io = c->idx_out + t * (c->k < c->tile ? c->k : c->tile);
    float *vo = c->val_out + t * (c->k < c->tile ? c->k : c->tile);
    if (tile_load(c, lo, len, vals, keys)) *bad = 1;
    if (m == len) {
        for (int64_t i = 0; i < len; i++) {
            io[i] = (int32_t)i;
            vo[i] = vals[i];
        }
        return;
    }
    memset(hist, 0, sizeof(uint32_t) << LB_HBITS);
    for (int64_t i = 0; i < len; i++) hist[keys[i] >> LB_HSHIFT]++;
    int64_t above = 0;
    int bin = (1 << LB_HBITS) - 1;
    for (; bin > 0; bin--) {
        if (above + hist[bin] >= m) break;
        above += hist[bin];
    }
    int64_t nc = 0;
    const uint64_t last = (uint64_t)(c->tile - 1);
    for (int64_t i = 0; i < len; i++) {
        if ((int)(keys[i] >> LB_HSHIFT) == bin) cand[nc++] = ((uint64_t)keys[i] << 16) | (last - (uint64_t)i);
    }
    uint64_t kth = kth_largest(cand, nc, m - above);
    uint32_t kb = (uint32_t)(kth >> 16);
    int64_t ilim = (int64_t)last - (int64_t)(kth & 0xFFFFu);
    int64_t j = 0, i = 0;
#if LB_X86
    if (lb_has_avx2()) j = tile_emit_avx2(keys, vals, len, kb, ilim, io, vo, &i);
#endif
    for (; i < len; i++) {
        if (keys[i] > kb || (keys[i] == kb && i <= ilim)) {
            io[j] = (int32_t)i;
            vo[j] = vals[i];
            j++;
        }
    }
}

int lb_topk_tiles(const void *x, int dtype, float *res, float decay, int64_t n, int64_t k, int64_t tile,
                  int32_t *idx_out, float *val_out, int nthreads) {
    if (tile < 1 || tile > 65536 || k < 0 || n < 0) return LB_BADARG;
    if (n == 0) return LB_OK;
    tctx c = {x, dtype, res, decay, n, k, tile, idx_out, val_out};
    int64_t ntiles = (n + tile - 1) / tile;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > ntiles) nt = (int)ntiles;
    if (n < 65536) nt = 1;
    int bad = 0, nomem = 0;
#pragma omp parallel num_threads(nt) reduction(| : bad, nomem)
    {
        int64_t t0, t1;
        lb_split(ntiles, nt, LB_TID(), &t0, &t1);
        float *vals = malloc(sizeof(float) * (size_t)tile);
        uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)tile);
        uint64_t *cand = malloc(sizeof(uint64_t) * (size_t)tile);
        uint32_t *hist = malloc(sizeof(uint32_t) << LB_HBITS);
        if (!vals || !keys || !cand || !hist) {
            nomem = 1;
        } else if (k == 0) {
            /* nothing selected, but the residual still takes v */
            for (int64_t t = t0; t < t1; t++) {
                int64_t lo = t * tile, len = n - lo < tile ? n - lo : tile;
                bad |= tile_load(&c, lo, len, vals, keys);
            }
        } else {
            for (int64_t t = t0; t < t1; t++) topk_tile(&c, t, vals, keys, cand, hist, &bad);
        }
        free(vals);
        free(keys);
        free(cand);
        free(hist);
    }
    if (nomem) return LB_NOMEM;
    return bad ? LB_NONFINITE : LB_OK;
}

/* out[idx[l][j]] += val[l][j], list after list (the order of the fp32 sums is the
 * reference's); each thread owns a slice of out, so no two threads touch one value.
 * Every index is checked before anything is written. */
int lb_scatter_accumulate(float *out, int64_t n, int nlists, const void *const *idx, const int *idx64,
                          const float *const *vals, const int64_t *counts, int nthreads) {
    for (int l = 0; l < nlists; l++) {
        for (int64_t j = 0; j < counts[l]; j++) {
            int64_t p = idx64[l] ? ((const int64_t *)idx[l])[j] : ((const int32_t *)idx[l])[j];
            if (p < 0 || p >= n) return LB_OUTOFRANGE;
        }
    }
    int64_t total = 0;
    for (int l = 0; l < nlists; l++) total += counts[l];
    int nt = nthreads < 1 ? 1 : nthreads;
    if (total < 65536) nt = 1;
#pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        lb_split(n, nt, LB_TID(), &lo, &hi);
        for (int l = 0; l < nlists; l++) {
            const float *v = vals[l];
            if (idx64[l]) {
                const int64_t *ix = idx[l];
                for (int64_t j = 0; j < counts[l]; j++)
                    if (ix[j] >= lo && ix[j] < hi) out[ix[j]] += v[j];
            } else {
                const int32_t *ix = idx[l];
                for (int64_t j = 0; j < counts[l]; j++)
                    if (ix[j] >= lo && ix[j] < hi) out[ix[j]] += v[j];
            }
        }
    }
    return LB_OK;
}
