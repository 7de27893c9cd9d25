/* Blockwise absmax quantization with fused error feedback, and its inverse.
 *
 * lb_quantize reads x (fp32, bf16 or fp16) and the fp32 residual once per block,
 * writes the packed codes, the per-block steps and the new residual: one pass over
 * memory, the block itself staying in L1 between its two sweeps (absmax, then codes).
 * lb_dequantize unpacks and decodes into fp32, optionally adding into the output.
 * Grids, rounding order, the sign scale and the bit layout are those of
 * lowband/kernels/quant.py; the vector (AVX2) and portable paths compute the same
 * values, element by element, in the same operation order.
 */
#include <float.h>
#include <math.h>

#include "lb_common.h"

/* Kernels over at least this many values use streaming stores for their output (a decode's
 * 8 MiB of fp32, a quantize's 2 MiB of 8-bit codes: their lines would leave the caches anyway,
 * and a plain store first reads each line). */
#ifndef LB_STREAM_MIN
#define LB_STREAM_MIN (2 * 1024 * 1024)
#endif

/* elements ahead of the pass-1 sweep to prefetch (x and residual) */
#ifndef LB_PREFETCH
#define LB_PREFETCH 1024
#endif

typedef struct {
    const void *x;
    int dtype;
    float *res;
    float decay;
    int use_decay;
    int64_t n;
    int bits;
    int64_t block;
    int sign;
    int stochastic;
    uint32_t seedmix;
    uint8_t *codes;
    float *steps;
    float h;
    float top;
} qctx;

static inline float q_value(const qctx *c, int64_t i) {
    float v = lb_load1(c->x, c->dtype, i);
    if (c->res) v = c->use_decay ? v + c->res[i] * c->decay : v + c->res[i];
    return v;
}

/* Per-block scale: returns step, sets *inv. */
static inline float q_scale(const qctx *c, float amax, double sum, int64_t len, float *inv) {
    if (c->sign) {
        *inv = 0.0f;
        return ((float)sum / (float)len) * 2.0f;
    }
    *inv = amax > 0.0f ? c->h / amax : 0.0f;
    return amax / c->h;
}

/* Code of one element as a float (0 .. 2h), given the block's inv. */
static inline float q_code(const qctx *c, float v, float inv, int64_t i) {
    if (c->sign) return v >= 0.0f ? 1.0f : 0.0f;
    float t = v * inv + c->h;
    t = t + (c->stochastic ? lb_uniform((uint32_t)i, c->seedmix) : 0.5f);
    t = floorf(t);
    return fminf(fmaxf(t, 0.0f), c->top);
}

/* Blocks [b0, b1), element by element; the first element starts a byte. */
static int quant_blocks_scalar(const qctx *c, int64_t b0, int64_t b1, int64_t lo_el) {
    int bad = 0;
    const int bits = c->bits;
    uint8_t *out = c->codes + (lo_el * bits) / 8;
    uint32_t acc = 0;
    int nacc = 0;
    for (int64_t b = b0; b < b1; b++) {
        int64_t lo = b * c->block, hi = lo + c->block;
        if (lo < lo_el) lo = lo_el;
        if (hi > c->n) hi = c->n;
        float amax = 0.0f;
        double sum = 0.0;
        for (int64_t i = lo; i < hi; i++) {
            float v = q_value(c, i);
            if (!lb_finite(v)) bad = 1;
            float a = fabsf(v);
            amax = a > amax ? a : amax;
            sum += a;
        }
        float inv;
        float step = q_scale(c, amax, sum, hi - lo, &inv);
        c->steps[b] = step;
        for (int64_t i = lo; i < hi; i++) {
            float v = q_value(c, i);
            float u = q_code(c, v, inv, i);
            if (c->res) c->res[i] = v - (u - c->h) * step;
            uint32_t code = (uint32_t)u;
            if (bits == 8) {
                *out++ = (uint8_t)code;
                continue;
            }
            acc |= code << nacc;
            nacc += bits;
            if (nacc == 8) {
                *out++ = (uint8_t)acc;
                acc = 0;
                nacc = 0;
            }
        }
    }
    if (nacc) *out = (uint8_t)acc;
    return bad;
}

#if LB_X86
LB_AVX2 static inline __m256 q_value8(const qctx *c, int64_t i) {
    __m256 v = lb_load8(c->x, c->dtype, i);
    if (c->res) {
        __m256 r = _mm256_loadu_ps(c->res + i);
        if (c->use_decay) r = _mm256_mul_ps(r, _mm256_set1_ps(c->decay));
        v = _mm256_add_ps(v, r);
    }
    return v;
}

/* Pack 32 codes (four vectors of 8 float codes) into bits * 4 bytes. */
/* stream: non-temporal stores (out 32-byte aligned for 8 bits, 16 for 4) */
LB_AVX2 static inline void q_pack32(int bits, __m256 f0, __m256 f1, __m256 f2, __m256 f3, uint8_t *out, int stream) {
    if (bits == 1) {
        __m256 half = _mm256_set1_ps(0.5f);
        uint32_t m = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(f0, half, _CMP_GT_OQ));
        m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(f1, half, _CMP_GT_OQ)) << 8;
        m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(f2, half, _CMP_GT_OQ)) << 16;
        m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(f3, half, _CMP_GT_OQ)) << 24;
        memcpy(out, &m, 4);
        return;
    }
    __m256i a = _mm256_cvttps_epi32(f0), b = _mm256_cvttps_epi32(f1);
    __m256i cc = _mm256_cvttps_epi32(f2), d = _mm256_cvttps_epi32(f3);
    if (bits == 8) {
        __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(cc, d);
        __m256i p = _mm256_packus_epi16(ab, cd);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        if (stream)
            _mm256_stream_si256((__m256i *)out, p);
        else
            _mm256_storeu_si256((__m256i *)out, p);
        return;
    }
    __m256i sh = bits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28) : _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    a = _mm256_sllv_epi32(a, sh);
    b = _mm256_sllv_epi32(b, sh);
    cc = _mm256_sllv_epi32(cc, sh);
    d = _mm256_sllv_epi32(d, sh);
    /* bit fields do not overlap, so horizontal sums are ORs */
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(cc, d));
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    if (bits == 4) {
        if (stream)
            _mm_stream_si128((__m128i *)out, r);
        else
            _mm_storeu_si128((__m128i *)out, r);
    } else {
        _mm_storel_epi64((__m128i *)out, _mm_packus_epi32(r, r));
    }
}

/* clamp: 0 only where the clamp to [0, top] cannot change a code (see quant_blocks_avx2) */
LB_AVX2 static inline __m256 q_code8(const qctx *c, __m256 v, __m256 inv, __m256 h, __m256 top, __m256i idx, __m256i seed,
                                     int clamp) {
    if (c->sign) return _mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ), _mm256_set1_ps(1.0f));
    __m256 t = _mm256_add_ps(_mm256_mul_ps(v, inv), h);
    t = _mm256_add_ps(t, c->stochastic ? lb_uniform8(idx, seed) : _mm256_set1_ps(0.5f));
    t = _mm256_floor_ps(t);
    return clamp ? _mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), top) : t;
}

/* Blocks [b0, b1) with block % 32 == 0: full 32-element groups in vectors, the
 * tail of the last (partial) block element by element.
 *
 * The absmax sweep takes the integer max of the |v| bit patterns: for non-negative floats
 * it orders as the float max does, and a NaN or Inf pattern is above every finite one, so
 * one compare per block finds non-finite input. The clamp of a deterministic code to
 * [0, 2h] is left out where it cannot change a code: with a finite inv = h / amax,
 * |v * inv| <= h (1 + 2^-24)^2, so floor(v * inv + h + 0.5) lies in [0, 2h]; it stays for
 * stochastic rounding and for an amax so small that inv overflows. */
LB_AVX2 static int quant_blocks_avx2(const qctx *c, int64_t b0, int64_t b1, int stream) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 h = _mm256_set1_ps(c->h), top = _mm256_set1_ps(c->top);
    const __m256i seed = _mm256_set1_epi32((int)c->seedmix);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int bits = c->bits;
    int bad = 0;
    for (int64_t b = b0; b < b1; b++) {
        int64_t lo = b * c->block, hi = lo + c->block;
        if (hi > c->n) hi = c->n;
        int64_t vend = lo + ((hi - lo) & ~(int64_t)31);
        __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
        __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
            /* one core keeps more lines in flight when told the stream ahead */
            if (LB_PREFETCH && c->dtype == LB_F32) _mm_prefetch((const char *)((const float *)c->x + i + LB_PREFETCH), _MM_HINT_T0);
            if (LB_PREFETCH && c->res) _mm_prefetch((const char *)(c->res + i + LB_PREFETCH), _MM_HINT_T0);
            __m256 a0 = _mm256_and_ps(q_value8(c, i), absmask);
            __m256 a1 = _mm256_and_ps(q_value8(c, i + 8), absmask);
            m0 = _mm256_max_epi32(m0, _mm256_castps_si256(a0));
            m1 = _mm256_max_epi32(m1, _mm256_castps_si256(a1));
            if (c->sign) { /* the mean |v| in double: the sign scale lands within an ulp or two of torch's */
                s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(a0)));
                s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(a0, 1)));
                s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(a1)));
                s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(a1, 1)));
            }
        }
        int32_t lm[8];
        double ls[4];
        _mm256_storeu_si256((__m256i *)lm, _mm256_max_epi32(m0, m1));
        _mm256_storeu_pd(ls, _mm256_add_pd(s0, s1));
        int32_t top_bits = 0;
        double sum = (ls[0] + ls[1]) + (ls[2] + ls[3]);
        for (int j = 0; j < 8; j++) top_bits = lm[j] > top_bits ? lm[j] : top_bits;
        if (top_bits > 0x7F7FFFFF) bad = 1; /* above FLT_MAX's pattern: Inf or NaN */
        float amax;
        memcpy(&amax, &top_bits, sizeof amax);
        for (; i < hi; i++) {
            float v = q_value(c, i);
            if (!lb_finite(v)) bad = 1;
            float a = fabsf(v);
            amax = a > amax ? a : amax;
            sum += a;
        }
        float invs;
        float steps = q_scale(c, amax, sum, hi - lo, &invs);
        c->steps[b] = steps;
        const __m256 inv = _mm256_set1_ps(invs), step = _mm256_set1_ps(steps);
        const int clamp = c->stochastic || !(invs <= FLT_MAX);
        uint8_t *out = c->codes + (lo * bits) / 8;
        for (i = lo; i < vend; i += 32) {
            __m256 f[4];
            for (int j = 0; j < 4; j++) {
                __m256 v = q_value8(c, i + 8 * j);
                __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)(i + 8 * j)), lane);
                f[j] = q_code8(c, v, inv, h, top, idx, seed, clamp);
                if (c->res) _mm256_storeu_ps(c->res + i + 8 * j, _mm256_sub_ps(v, _mm256_mul_ps(_mm256_sub_ps(f[j], h), step)));
            }
            q_pack32(bits, f[0], f[1], f[2], f[3], out, stream);
            out += 4 * bits;
        }
        if (vend < hi) {
            /* the data's last few elements: start a byte, pad the final one */
            uint32_t acc = 0;
            int nacc = 0;
            for (i = vend; i < hi; i++) {
                float v = q_value(c, i);
                float u = q_code(c, v, invs, i);
                if (c->res) c->res[i] = v - (u - c->h) * steps;
                uint32_t code = (uint32_t)u;
                if (bits == 8) {
                    *out++ = (uint8_t)code;
                    continue;
                }
                acc |= code << nacc;
                nacc += bits;
                if (nacc == 8) {
                    *out++ = (uint8_t)acc;
                    acc = 0;
                    nacc = 0;
                }
            }
            if (nacc) *out = (uint8_t)acc;
        }
    }
    if (stream) _mm_sfence();
    return bad;
}
#endif

/* Units of 8 blocks per dynamically scheduled chunk: about 64 Ki elements. */
static int64_t lb_chunk_units(int64_t block) {
    int64_t u = 65536 / (8 * block);
    return u < 1 ? 1 : u;
}

int lb_quantize(const void *x, int dtype, float *res, float decay, int64_t n, int bits, int64_t block, int sign,
                int stochastic, uint32_t seedmix, uint8_t *codes, float *steps, int nthreads) {
    if (!(bits == 1 || bits == 2 || bits == 4 || bits == 8) || block < 1 || (sign && bits != 1) || n < 0)
        return LB_BADARG;
    if (n == 0) return LB_OK;
    qctx c = {x, dtype, res, decay, decay != 1.0f, n, bits, block, sign, stochastic, seedmix, codes, steps,
              bits == 8 ? 127.0f : bits == 4 ? 7.0f : bits == 2 ? 1.5f : 0.5f, 0.0f};
    c.top = 2.0f * c.h;
    int64_t nb = (n + block - 1) / block;
    int64_t units = (nb + 7) / 8; /* 8 blocks always end on a byte boundary */
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > units) nt = (int)units;
    if (n < 65536) nt = 1;
    int vec = 0;
#if LB_X86
    vec = lb_has_avx2() && block % 32 == 0;
#endif
    int bad = 0;
    /* A large output is written past the caches (its lines are then not read before being
     * written, as in lb_dequantize): 8- and 4-bit codes from an aligned start, whose every
     * 32-element group then starts 32 (8-bit) or 16 (4-bit) bytes aligned. */
    int stream = (bits == 8 || bits == 4) && n >= LB_STREAM_MIN && ((uintptr_t)codes & 31u) == 0;
    /* Chunks of about 64 Ki elements (a multiple of 8 blocks, so each starts a byte),
     * handed out dynamically: on a busy machine a descheduled thread holds up no one. */
    int64_t per = lb_chunk_units(block);
    int64_t chunks = (units + per - 1) / per;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(| : bad)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int64_t b0 = ch * per * 8, b1 = (ch + 1) * per * 8 < nb ? (ch + 1) * per * 8 : nb;
        {
#if LB_X86
            if (vec)
                bad |= quant_blocks_avx2(&c, b0, b1, stream);
            else
#endif
                bad |= quant_blocks_scalar(&c, b0, b1, b0 * block);
        }
    }
    (void)vec;
    return bad ? LB_NONFINITE : LB_OK;
}


static void dequant_scalar(const uint8_t *codes, const float *steps, int64_t lo, int64_t hi, int bits, int64_t block,
                           float h, float *out, int accumulate) {
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t i = lo; i < hi; i++) {
        uint32_t code = bits == 8 ? codes[i] : (codes[(i * bits) >> 3] >> ((i * bits) & 7)) & mask;
        float dec = ((float)code - h) * steps[i / block];
        out[i] = accumulate ? out[i] + dec : dec;
    }
}

#if LB_X86
/* Blocks [b0, b1) with block % 8 == 0: 8 codes per step from bits bytes. */
LB_AVX2 static void dequant_avx2(const uint8_t *codes, const float *steps, int64_t n, int64_t b0, int64_t b1, int bits,
                                 int64_t block, float hs, float *out, int accumulate, int stream) {
    const __m256 h = _mm256_set1_ps(hs);
    const __m256i mask = _mm256_set1_epi32((int)((1u << bits) - 1u));
    const __m256i sh = bits == 4   ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                       : bits == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)
                                   : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t b = b0; b < b1; b++) {
        int64_t lo = b * block, hi = lo + block;
        if (hi > n) hi = n;
        const __m256 st = _mm256_set1_ps(steps[b]);
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            __m256i u;
            if (bits == 8) {
                u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
            } else {
                const uint8_t *q = codes + (i * bits) / 8;
                uint32_t w = bits == 4 ? (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24
                             : bits == 2 ? (uint32_t)q[0] | (uint32_t)q[1] << 8
                                         : (uint32_t)q[0];
                u = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), mask);
            }
            __m256 dec = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(u), h), st);
            if (accumulate) dec = _mm256_add_ps(_mm256_loadu_ps(out + i), dec);
            if (stream)
                _mm256_stream_ps(out + i, dec);
            else
                _mm256_storeu_ps(out + i, dec);
        }
        if (i < hi) dequant_scalar(codes, steps, i, hi, bits, block, hs, out, accumulate);
    }
    if (stream) _mm_sfence();
}
#endif

int lb_dequantize(const uint8_t *codes, const float *steps, int64_t n, int bits, int64_t block, float *out,
                  int accumulate, int nthreads) {
    if (!(bits == 1 || bits == 2 || bits == 4 || bits == 8) || block < 1 || n < 0) return LB_BADARG;
    if (n == 0) return LB_OK;
    const float h = bits == 8 ? 127.0f : bits == 4 ? 7.0f : bits == 2 ? 1.5f : 0.5f;
    int64_t nb = (n + block - 1) / block;
    int64_t units = (nb + 7) / 8;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > units) nt = (int)units;
    if (n < 65536) nt = 1;
    int vec = 0;
#if LB_X86
    vec = lb_has_avx2() && block % 8 == 0;
#endif
    /* A large overwrite goes past the caches with streaming stores: the output's lines are
     * then not read before they are written (a plain store reads each line first, a third of
     * the memory traffic of an 8-bit decode). Same values, only the store differs. Every
     * block then starts 32-byte aligned (block % 8 == 0 and an aligned out). */
    int stream = !accumulate && n >= LB_STREAM_MIN && ((uintptr_t)out & 31u) == 0;
    int64_t per = lb_chunk_units(block);
    int64_t chunks = (units + per - 1) / per;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int64_t b0 = ch * per * 8, b1 = (ch + 1) * per * 8 < nb ? (ch + 1) * per * 8 : nb;
        {
#if LB_X86
            if (vec)
                dequant_avx2(codes, steps, n, b0, b1, bits, block, h, out, accumulate, stream);
            else
#endif
            {
                int64_t hi = b1 * block < n ? b1 * block : n;
                dequant_scalar(codes, steps, b0 * block, hi, bits, block, h, out, accumulate);
            }
        }
    }
    (void)vec;
    return LB_OK;
}

/* Largest code among n codes of `bits` (8 or 4; packed LSB first, as lb_pack_bits), so a
 * decoder can refuse codes off its grid in one read of the packed bytes. -1 for bad args. */
int lb_max_code(const uint8_t *codes, int64_t n, int bits, int nthreads) {
    if (n < 0 || (bits != 8 && bits != 4)) return -1;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (n < (1 << 20)) nt = 1;
    int64_t nbytes = bits == 8 ? n : n / 2; /* whole bytes; a 4-bit tail nibble below */
    int top = 0;
    if (bits == 8) {
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : top)
        for (int64_t i = 0; i < nbytes; i++) top = codes[i] > top ? codes[i] : top;
    } else {
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : top)
        for (int64_t i = 0; i < nbytes; i++) {
            int lo = codes[i] & 0x0F, hi = codes[i] >> 4;
            int m = lo > hi ? lo : hi;
            top = m > top ? m : top;
        }
        if (n % 2) {
            int lo = codes[nbytes] & 0x0F;
            top = lo > top ? lo : top;
        }
    }
    return top;
}
