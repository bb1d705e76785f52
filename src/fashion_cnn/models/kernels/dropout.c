/* Inverted dropout in one pass, its keep-mask recomputed from a seed instead of stored.
 *
 * As PyTorch ops a dropout draws random words, compares them, converts the comparison to the
 * input's dtype and multiplies twice (the mask, then 1/(1-rate)), and its backward pass
 * multiplies twice more by a saved mask: at Keras' batch of 32 that was a fifth of a seed
 * model2 training step. Here the mask is a counter-based hash of (seed, element index), so
 * forward and backward each read the input once and write the output once, and nothing is
 * kept between them but the 64-bit seed (drawn from torch's generator, so checkpoints that
 * save its state resume with the same masks).
 *
 * The mask: element e (its index in memory order) is kept when lane e % 4 of
 * word(e / 4) is at least `threshold` (= round(rate * 65536)), where
 *   word(i) = splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15)
 * and lane l is bits [16 l, 16 l + 16) of the word. splitmix64 is the output function of
 * Java's SplittableRandom (Steele, Lea and Flood, 2014); each element depends only on its own
 * index, so the result is the same for any number of threads.
 *
 * out[e] = x[e] * (keep(e) ? scale : 0), for float32 and for bfloat16 (computed in float32
 * and rounded to nearest-even, as PyTorch's bfloat16 multiply does); as in PyTorch's dropout a
 * NaN stays NaN even where it is dropped. x and out may be the same.
 */

#include <stdint.h>
#include <string.h>

#include "simd.h"

#define BLOCK 64            /* elements per parallel work item: 16 words of 4 lanes */
#define PARALLEL_MIN 32768  /* fewer elements than this run on one thread */

typedef uint64_t vword __attribute__((vector_size(BLOCK / 4 * sizeof(uint64_t))));

/* The 16-bit lanes of the BLOCK / 4 words that cover elements [e0, e0 + BLOCK), e0 a multiple
   of BLOCK: lanes[t] is element e0 + t's (little-endian: lane l of word q is lanes[4 q + l]).
   Written on vectors of words so that the compiler keeps the hash in SIMD registers. */
static inline void block_lanes(uint64_t seed, int64_t e0, uint16_t lanes[BLOCK])
{
    vword z;
    const uint64_t first = (uint64_t)e0 / 4 + 1;
    for (int q = 0; q < BLOCK / 4; q++)
        z[q] = seed + (first + (uint64_t)q) * MASK_GOLDEN;
    MASK_MIX(z);  /* splitmix64's output function (simd.h) */
    memcpy(lanes, &z, sizeof z);
}

static inline uint16_t to_bfloat16(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u)      /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7FFFu + ((bits >> 16) & 1u);        /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

static inline float from_bfloat16(uint16_t value)
{
    const uint32_t bits = (uint32_t)value << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* x and out hold n float32 values, or n bfloat16 values (as uint16) where bfloat16 is 1 */
void dropout(const void *x, void *out, int64_t n, int bfloat16, uint64_t seed,
             uint32_t threshold, float scale, int threads)
{
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t e0 = blk * BLOCK;
        const int64_t count = n - e0 < BLOCK ? n - e0 : BLOCK;
        uint16_t lanes[BLOCK];
        block_lanes(seed, e0, lanes);
        if (bfloat16) {
            const uint16_t *xs = (const uint16_t *)x + e0;
            uint16_t *os = (uint16_t *)out + e0;
            for (int64_t t = 0; t < count; t++)
                os[t] = to_bfloat16(from_bfloat16(xs[t])
                                    * (lanes[t] >= threshold ? scale : 0.0f));
        } else {
            const float *xs = (const float *)x + e0;
            float *os = (float *)out + e0;
            for (int64_t t = 0; t < count; t++)
                os[t] = xs[t] * (lanes[t] >= threshold ? scale : 0.0f);
        }
    }
}
