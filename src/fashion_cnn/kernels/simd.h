/* Sixteen-lane vectors (one AVX-512 register, two AVX2 ones) as GCC/Clang vector types, and
 * the float32 <-> bfloat16 conversions the kernels share. Included by conv1_pool.c and
 * max_pool.c.
 */

#ifndef FASHION_CNN_SIMD_H
#define FASHION_CNN_SIMD_H

#include <stdint.h>
#include <string.h>

#define LANES 16
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

/* where mask (all ones or all zeros per lane): a, else b */
static inline vfloat pick(vint mask, vfloat a, vfloat b)
{
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

#endif
