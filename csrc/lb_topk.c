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

/* The kth largest (k >= 1) of n distinct keys. Quickselect whose partition has no
 * data-dependent branch: each key is written to both ends of the other buffer and
 * only the write cursors move conditionally. a and tmp (n each) are both clobbered. */
static uint64_t kth_largest(uint64_t *a, int64_t n, int64_t k, uint64_t *tmp) {
    while (n > 16) {
        uint64_t x = a[0], y = a[n / 2], z = a[n - 1];
        uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t g = 0, l = n - 1;
        for (int64_t i = 0; i < n; i++) {
            uint64_t v = a[i];
            int gt = v > pivot;
            tmp[g] = v;
            tmp[l] = v;
            g += gt;
            l -= !gt;
        }
        /* tmp[0, g) > pivot >= tmp[g, n); the median of three distinct keys leaves both sides non-empty */
        uint64_t *t = a;
        if (k <= g) {
            a = tmp;
            n = g;
        } else {
            a = tmp + g;
            n -= g;
            k -= g;
        }
        tmp = t;
    }
    for (int64_t i = 1; i < n; i++) { /* insertion sort, descending */
        uint64_t v = a[i];
        int64_t j = i - 1;
        while (j >= 0 && a[j] < v) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = v;
    }
    return a[k - 1];
}

/* For each 8-bit mask, the positions of its set bits, packed to the front. */
static uint8_t lb_lut[256][8];

static void lut_init(void) {
    static int done = 0;
    if (done) return;
    for (int m = 0; m < 256; m++) {
        int j = 0;
        for (int b = 0; b < 8; b++)
            if (m & (1 << b)) lb_lut[m][j++] = (uint8_t)b;
        for (; j < 8; j++) lb_lut[m][j] = 0;
    }
    done = 1;
}

#if LB_X86
LB_AVX2 static int tile_load_avx2(const tctx *c, int64_t lo, int64_t len, float *vals, uint32_t *keys, uint32_t guess,
                                  int32_t *cidx, int64_t *nc_out, int64_t *done) {
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i thr = _mm256_set1_epi32((int)guess - 1);
    __m256i worst = _mm256_setzero_si256();
    const __m256 dec = _mm256_set1_ps(c->decay);
    int64_t i = 0, nc = 0;
    for (; i + 8 <= len; i += 8) {
        __m256 v = lb_load8(c->x, c->dtype, lo + i);
        if (c->res) {
            __m256 r = _mm256_loadu_ps(c->res + lo + i);
            if (c->decay != 1.0f) r = _mm256_mul_ps(r, dec);
            v = _mm256_add_ps(v, r);
            _mm256_storeu_ps(c->res + lo + i, v);
        }
        if (vals) _mm256_storeu_ps(vals + i, v);
        __m256i key = _mm256_and_si256(_mm256_castps_si256(v), absmask);
        _mm256_storeu_si256((__m256i *)(keys + i), key);
        worst = _mm256_max_epu32(worst, key);
        if (cidx) { /* fused first filter, against the previous tile's threshold */
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, thr)));
            __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)lb_lut[m]));
            _mm256_storeu_si256((__m256i *)(cidx + nc), _mm256_add_epi32(perm, _mm256_set1_epi32((int)i)));
            nc += __builtin_popcount(m);
        }
    }
    *done = i;
    *nc_out = nc;
    const __m256i big = _mm256_set1_epi32(0x7F7FFFFF); /* largest finite magnitude */
    return _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(worst, big), big)) != -1;
}
#endif

/* Sweep 1: v into vals (unless NULL: x itself holds v) and the residual, |v| bits
 * into keys; with cidx, also the positions whose key reaches guess (count in *nc).
 * Returns nonzero on NaN/Inf. */
static int tile_load(const tctx *c, int64_t lo, int64_t len, float *vals, uint32_t *keys, uint32_t guess, int32_t *cidx,
                     int64_t *nc) {
    uint32_t worst = 0;
    int64_t i = 0, n = 0;
#if LB_X86
    if (lb_has_avx2()) {
        if (tile_load_avx2(c, lo, len, vals, keys, guess, cidx, &n, &i)) worst = 0x7F800000u;
    }
#endif
    for (; i < len; i++) {
        float v = lb_load1(c->x, c->dtype, lo + i);
        if (c->res) {
            v = c->decay != 1.0f ? v + c->res[lo + i] * c->decay : v + c->res[lo + i];
            c->res[lo + i] = v;
        }
        if (vals) vals[i] = v;
        uint32_t key = lb_f32_to_bits(v) & 0x7FFFFFFFu;
        keys[i] = key;
        worst = key > worst ? key : worst;
        if (cidx) {
            cidx[n] = (int32_t)i;
            n += key >= guess;
        }
    }
    if (nc) *nc = n;
    return worst >= 0x7F800000u;
}

/* Per-thread scratch, sized for one tile. */
typedef struct {
    float *vals;      /* v of the tile */
    uint32_t *keys;   /* |v| bits */
    uint64_t *cand;   /* composite keys of candidates */
    uint64_t *tmp;    /* quickselect's second buffer */
    int32_t *cidx;    /* candidate positions (+8 slack for vector stores) */
    uint32_t *hist;
    int32_t *sel_i;   /* selected positions of one tile (k + 8) */
    float *sel_v;
    uint32_t guess;   /* threshold tried first: from the previous tile */
    int have_guess;
} scratch;

#if LB_X86
LB_AVX2 static int64_t filter_avx2(const uint32_t *keys, int64_t len, uint32_t t, int32_t *cidx, int64_t *done) {
    const __m256i thr = _mm256_set1_epi32((int)t - 1);
    int64_t nc = 0, i = 0;
    for (; i + 8 <= len; i += 8) {
        __m256i key = _mm256_loadu_si256((const __m256i *)(keys + i));
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, thr)));
        __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)lb_lut[m]));
        _mm256_storeu_si256((__m256i *)(cidx + nc), _mm256_add_epi32(perm, _mm256_set1_epi32((int)i)));
        nc += __builtin_popcount(m);
    }
    *done = i;
    return nc;
}

/* The selected positions and values, in order, into sel_i/sel_v. */
LB_AVX2 static int64_t emit_avx2(const uint32_t *keys, const float *vals, int64_t len, uint32_t kb, int64_t ilim,
                                 int32_t *sel_i, float *sel_v, int64_t *done) {
    const __m256i gt = _mm256_set1_epi32((int)kb);
    const __m256i lim = _mm256_set1_epi32((int)(ilim + 1));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t j = 0, i = 0;
    for (; i + 8 <= len; i += 8) {
        __m256i key = _mm256_loadu_si256((const __m256i *)(keys + i));
        __m256i pos = _mm256_add_epi32(_mm256_set1_epi32((int)i), lane);
        __m256i sel = _mm256_or_si256(_mm256_cmpgt_epi32(key, gt),
                                      _mm256_and_si256(_mm256_cmpeq_epi32(key, gt), _mm256_cmpgt_epi32(lim, pos)));
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(sel));
        __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)lb_lut[m]));
        _mm256_storeu_si256((__m256i *)(sel_i + j), _mm256_permutevar8x32_epi32(pos, perm));
        _mm256_storeu_ps(sel_v + j, _mm256_permutevar8x32_ps(_mm256_loadu_ps(vals + i), perm));
        j += __builtin_popcount(m);
    }
    *done = i;
    return j;
}
#endif

/* Positions i with keys[i] >= t into s->cidx; returns their count. */
static int64_t filter(const uint32_t *keys, int64_t len, uint32_t t, int32_t *cidx) {
    int64_t nc = 0, i = 0;
#if LB_X86
    if (lb_has_avx2()) nc = filter_avx2(keys, len, t, cidx, &i);
#endif
    for (; i < len; i++) {
        cidx[nc] = (int32_t)i;
        nc += keys[i] >= t;
    }
    return nc;
}

static void make_composite(const scratch *s, int64_t nc, uint64_t last) {
    for (int64_t j = 0; j < nc; j++) {
        uint32_t i = (uint32_t)s->cidx[j];
        s->cand[j] = ((uint64_t)s->keys[i] << 16) | (last - i);
    }
}

/* The m-th largest composite key of a tile, exactly: a histogram of the top bits
 * finds the bin holding it, a quickselect among that bin's elements finishes. */
static uint64_t histogram_threshold(scratch *s, int64_t len, int64_t m, uint64_t last) {
    memset(s->hist, 0, sizeof(uint32_t) << LB_HBITS);
    for (int64_t i = 0; i < len; i++) s->hist[s->keys[i] >> LB_HSHIFT]++;
    int64_t above = 0;
    int bin = (1 << LB_HBITS) - 1;
    for (; bin > 0; bin--) {
        if (above + s->hist[bin] >= m) break;
        above += s->hist[bin];
    }
    int64_t nc = 0;
    for (int64_t i = 0; i < len; i++) {
        if ((int)(s->keys[i] >> LB_HSHIFT) == bin) s->cand[nc++] = ((uint64_t)s->keys[i] << 16) | (last - (uint64_t)i);
    }
    return kth_largest(s->cand, nc, m - above, s->tmp);
}

/* A magnitude that, with high probability, a few times m elements reach: from
 * the keys of every 16th element. */
static uint32_t sampled_threshold(scratch *s, int64_t len, int64_t m) {
    const int64_t stride = 16;
    int64_t ns = 0;
    for (int64_t i = 0; i < len; i += stride, ns++) s->cand[ns] = ((uint64_t)s->keys[i] << 16) | (uint64_t)ns;
    int64_t r = 2 * ((m + stride - 1) / stride) + 4;
    if (r > ns) r = ns;
    return (uint32_t)(kth_largest(s->cand, ns, r, s->tmp) >> 16);
}

/* The m-th largest composite key. Every element whose key reaches a threshold t
 * becomes a candidate; with at least m of them the m largest are among them, so a
 * quickselect over the few candidates is exact. t comes from the previous tile
 * (which usually has the same distribution), else from a sample, else the
 * histogram decides. */
static uint64_t tile_threshold(scratch *s, int64_t len, int64_t m, uint64_t last, int64_t prefiltered) {
    if (len >= 1024 && 8 * m <= len) {
        for (int attempt = 0; attempt < 2; attempt++) {
            int64_t nc;
            if (attempt == 0 && prefiltered >= 0) {
                nc = prefiltered; /* the load sweep already filtered against the guess */
            } else {
                if (attempt == 1 || !s->have_guess) s->guess = sampled_threshold(s, len, m);
                nc = filter(s->keys, len, s->guess, s->cidx);
            }
            if (nc >= m && nc <= 8 * m + 64) {
                make_composite(s, nc, last);
                uint64_t kth = kth_largest(s->cand, nc, m, s->tmp);
                /* next tile: 7/8 of this one's threshold magnitude keeps about 2m candidates for Gaussian-like data */
                s->guess = lb_f32_to_bits(lb_bits_to_f32((uint32_t)(kth >> 16)) * 0.875f);
                s->have_guess = 1;
                return kth;
            }
            if (attempt == 0 && !s->have_guess) break;
            s->have_guess = 0;
        }
    }
    return histogram_threshold(s, len, m, last);
}

static void topk_tile(const tctx *c, int64_t t, scratch *s, int *bad) {
    int64_t lo = t * c->tile;
    int64_t len = c->n - lo < c->tile ? c->n - lo : c->tile;
    int64_t m = c->k < len ? c->k : len;
    int64_t per = c->k < c->tile ? c->k : c->tile;
    int32_t *io = c->idx_out + t * per;
    float *vo = c->val_out + t * per;
    /* fp32 input without a residual: x already holds v, no copy */
    int direct = c->dtype == LB_F32 && !c->res;
    const float *vals = direct ? (const float *)c->x + lo : s->vals;
    int fuse = s->have_guess && len >= 1024 && 8 * m <= len && m < len;
    int64_t pre = -1;
    if (tile_load(c, lo, len, direct ? NULL : s->vals, s->keys, s->guess, fuse ? s->cidx : NULL, fuse ? &pre : NULL))
        *bad = 1;
    if (m == len) {
        for (int64_t i = 0; i < len; i++) {
            io[i] = (int32_t)i;
            vo[i] = vals[i];
        }
        return;
    }
    const uint64_t last = (uint64_t)(c->tile - 1);
    uint64_t kth = tile_threshold(s, len, m, last, pre);
    uint32_t kb = (uint32_t)(kth >> 16);
    int64_t ilim = (int64_t)last - (int64_t)(kth & 0xFFFFu);
    int64_t j = 0, i = 0;
#if LB_X86
    if (lb_has_avx2()) j = emit_avx2(s->keys, vals, len, kb, ilim, s->sel_i, s->sel_v, &i);
#endif
    for (; i < len; i++) {
        s->sel_i[j] = (int32_t)i;
        s->sel_v[j] = vals[i];
        j += s->keys[i] > kb || (s->keys[i] == kb && i <= ilim);
    }
    memcpy(io, s->sel_i, sizeof(int32_t) * (size_t)m);
    memcpy(vo, s->sel_v, sizeof(float) * (size_t)m);
}

int lb_topk_tiles(const void *x, int dtype, float *res, float decay, int64_t n, int64_t k, int64_t tile,
                  int32_t *idx_out, float *val_out, int nthreads) {
    if (tile < 1 || tile > 65536 || k < 0 || n < 0) return LB_BADARG;
    if (n == 0) return LB_OK;
    lut_init();
    tctx c = {x, dtype, res, decay, n, k, tile, idx_out, val_out};
    int64_t ntiles = (n + tile - 1) / tile;
    int64_t kk = k < tile ? k : tile;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > ntiles) nt = (int)ntiles;
    if (n < 65536) nt = 1;
    int bad = 0, nomem = 0;
#pragma omp parallel num_threads(nt) reduction(| : bad, nomem)
    {
        size_t tl = (size_t)tile + 8;
        scratch s = {malloc(4 * tl), malloc(4 * tl), malloc(8 * tl), malloc(8 * tl), malloc(4 * tl),
                     malloc(sizeof(uint32_t) << LB_HBITS), malloc(4 * ((size_t)kk + 8)), malloc(4 * ((size_t)kk + 8)),
                     0, 0};
        int ok = s.vals && s.keys && s.cand && s.tmp && s.cidx && s.hist && s.sel_i && s.sel_v;
        if (!ok) nomem = 1;
        /* dynamic: on a busy machine a descheduled thread holds up no one */
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < ntiles; t++) {
            if (!ok) continue;
            if (k > 0) {
                topk_tile(&c, t, &s, &bad);
            } else { /* nothing selected, but the residual still takes v */
                int64_t lo = t * tile, len = n - lo < tile ? n - lo : tile;
                bad |= tile_load(&c, lo, len, NULL, s.keys, 0, NULL, NULL);
            }
        }
        free(s.vals);
        free(s.keys);
        free(s.cand);
        free(s.tmp);
        free(s.cidx);
        free(s.hist);
        free(s.sel_i);
        free(s.sel_v);
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
