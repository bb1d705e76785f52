/* Vectors of LANES floats as GCC/Clang vector types, and the float32 <-> bfloat16 conversions
 * and dropout mask the kernels share. Included by conv1_pool.c, max_pool.c and dropout.c.
 *
 * LANES is one register of the target: 16 where the compiler targets AVX-512 (-march=native on
 * such a CPU), 8 elsewhere (one AVX2 register). Sixteen lanes on AVX2 take two registers each,
 * and the first block's accumulators then spill (benchmarks/RESULTS.md, "fused kernels on an
 * AVX2 CPU"). The results do not depend on LANES: every value is computed lane by lane, and
 * the dropout mask of an element depends only on its index.
 */

#ifndef FASHION_CNN_SIMD_H
#define FASHION_CNN_SIMD_H

#include <stdint.h>
#include <string.h>

#ifndef LANES  /* -DLANES=N builds another width (tests/test_kernels.py compares them) */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#endif
#define NO_WINNER 255  /* winner code: the ReLU zeroed the pooled value, no gradient */

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t vhalf __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef uint8_t vbyte __attribute__((vector_size(LANES * sizeof(uint8_t))));

static inline vfloat load(const float *p)
{
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

/* float32 -> bfloat16, rounded to nearest-even as PyTorch rounds; a NaN stays a (quiet) NaN */
static inline vhalf to_bf16(vfloat v)
{
    const vuint bits = (vuint)v;
    const vuint nan = (vuint)(v != v);
    const vuint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const vuint quiet = (bits >> 16) | 0x40u;
    return __builtin_convertvector((rounded & ~nan) | (quiet & nan), vhalf);
}

static inline vfloat from_bf16(vhalf half)
{
    return (vfloat)(__builtin_convertvector(half, vuint) << 16);
}

static inline void store_bf16(uint16_t *p, vfloat v)
{
    const vhalf half = to_bf16(v);
    memcpy(p, &half, sizeof half);
}

static inline vfloat load_bf16(const uint16_t *p)
{
    vhalf half;
    memcpy(&half, p, sizeof half);
    return from_bf16(half);
}

/* LANES values at base + offset of a float32 tensor, or of a bfloat16 one where bf16 is 1 */
static inline vfloat load_any(const void *base, int64_t offset, int bf16)
{
    return bf16 ? load_bf16((const uint16_t *)base + offset) : load((const float *)base + offset);
}

static inline void store_any(void *base, int64_t offset, int bf16, vfloat v)
{
    if (bf16)
        store_bf16((uint16_t *)base + offset, v);
    else
        store((float *)base + offset, v);
}

/* where mask (all ones or all zeros per lane): a, else b */
static inline vfloat pick(vint mask, vfloat a, vfloat b)
{
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

/* The dropout mask (dropout.c has its definition): element e is kept by lane e % 4 of
   word(e / 4) = splitmix64(seed + (e / 4 + 1) * MASK_GOLDEN), splitmix64's output function
   being MASK_MIX on a vector of 64-bit words (any width: dropout.c mixes 16 words at a time,
   the fused kernels LANES / 4). */
#define MASK_GOLDEN 0x9E3779B97F4A7C15ULL
#define MASK_MIX(z)                                    \
    do {                                               \
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;   \
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;   \
        z = z ^ (z >> 31);                             \
    } while (0)

/* LANES / 4 words of 64 bits: the hash words that cover LANES elements */
typedef uint64_t vwords __attribute__((vector_size(LANES / 4 * sizeof(uint64_t))));

/* The mask lanes of the LANES elements [first, first + LANES), first a multiple of 4 */
static inline vhalf dropout_lanes(uint64_t seed, int64_t first)
{
    const uint64_t i = (uint64_t)first / 4 + 1;
    vwords z;
    for (int q = 0; q < LANES / 4; q++)
        z[q] = seed + (i + (uint64_t)q) * MASK_GOLDEN;
    MASK_MIX(z);
    vhalf lanes;
    memcpy(&lanes, &z, sizeof lanes);  /* little-endian: lane l of word q is element 4q + l */
    return lanes;
}

/* The inverted-dropout factor of those elements: `scale` where the lane is at least
   keep_threshold, else 0 */
static inline vfloat dropout_factor(uint64_t seed, int64_t first, uint32_t keep_threshold,
                                    float scale)
{
    const vint keep = __builtin_convertvector(dropout_lanes(seed, first), vint)
                      >= (int32_t)keep_threshold;
    return pick(keep, (vfloat){0} + scale, (vfloat){0});
}

#endif
