/* Shared helpers of the lowband native kernels: element loads, the rounding hash,
 * CPU feature dispatch and thread partitioning.
 *
 * The kernels are plain C11 + OpenMP with no torch or Python headers; Python loads
 * the library with ctypes (lowband/kernels/_clib.py). Every kernel reproduces the
 * torch reference of its op (lowband/kernels/quant.py, topk.py, ...) bit for bit: the build uses
 * -ffp-contract=off so no multiply-add is fused, and the vector paths use the same
 * operation order as the scalar ones.
 */
#ifndef LB_COMMON_H
#define LB_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define LB_TID() omp_get_thread_num()
#else
#define LB_TID() 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#define LB_X86 1
#include <immintrin.h>
#define LB_AVX2 __attribute__((target("avx2,f16c")))
#else
#define LB_X86 0
#endif

/* Element types of an input tensor (x); everything else is fp32. */
enum { LB_F32 = 0, LB_BF16 = 1, LB_F16 = 2 };

/* Status codes returned to Python. */
enum {
    LB_OK = 0,
    LB_NONFINITE = 1,    /* NaN or Inf in the input */
    LB_BADARG = 2,       /* sizes or widths the kernel does not accept */
    LB_BADSTREAM = 3,    /* malformed varint stream */
    LB_OUTOFRANGE = 4,   /* a position at or above the limit */
    LB_NOMEM = 5,
};

static inline float lb_bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t lb_f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* IEEE half -> float, exact (subnormals, infinities and NaN included). */
static inline float lb_half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t out;
    if (exp == 0x1Fu) {
        out = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        out = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        out = sign;
    } else {
        /* subnormal half: normalise into a float */
        uint32_t e = 113u;
        while (!(man & 0x400u)) {
            man <<= 1;
            e--;
        }
        out = sign | (e << 23) | ((man & 0x3FFu) << 13);
    }
    return lb_bits_to_f32(out);
}

static inline float lb_load1(const void *x, int dtype, int64_t i) {
    if (dtype == LB_F32) return ((const float *)x)[i];
    if (dtype == LB_BF16) return lb_bits_to_f32((uint32_t)((const uint16_t *)x)[i] << 16);
    return lb_half_to_f32(((const uint16_t *)x)[i]);
}

/* Counter-based uniform in [0, 1): the reference's uniform_hash (lowbias32). */
static inline float lb_uniform(uint32_t index, uint32_t seedmix) {
    uint32_t h = index + seedmix;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return (float)(h >> 8) * 0x1p-24f;
}

static inline int lb_finite(float v) {
    return (lb_f32_to_bits(v) & 0x7F800000u) != 0x7F800000u;
}

int lb_has_avx2(void);

/* Split [0, units) into nt nearly equal parts; part t is [*lo, *hi). */
static inline void lb_split(int64_t units, int nt, int t, int64_t *lo, int64_t *hi) {
    int64_t q = units / nt, r = units % nt;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r ? 1 : 0);
}

#if LB_X86
/* 8 elements of x from index i, as fp32 (exact conversion). */
LB_AVX2 static inline __m256 lb_load8(const void *x, int dtype, int64_t i) {
    if (dtype == LB_F32) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    if (dtype == LB_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

LB_AVX2 static inline __m256i lb_uniform_bits8(__m256i idx, __m256i seedmix) {
    __m256i h = _mm256_add_epi32(idx, seedmix);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7FEB352D));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x846CA68Bu));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    return _mm256_srli_epi32(h, 8);
}

LB_AVX2 static inline __m256 lb_uniform8(__m256i idx, __m256i seedmix) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(lb_uniform_bits8(idx, seedmix)), _mm256_set1_ps(0x1p-24f));
}
#endif

#endif
