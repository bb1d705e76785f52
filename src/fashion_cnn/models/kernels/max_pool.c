/* 2x2 max pooling (stride 2, 'valid'), optionally followed by a ReLU and by inverted dropout,
 * in one pass each way.
 *
 * As PyTorch ops, the pooling of a channels_last tensor writes int64 indices (8 bytes per
 * pooled value), its backward pass zero-fills the whole input-sized gradient and then
 * scatters into it, and a ReLU and a dropout after it each read and write the pooled tensor
 * again, forward and backward. Here the forward pass reads each window once and writes the
 * pooled value and one byte (which window position won); the backward pass writes every
 * input-gradient value exactly once. Forward + backward, bfloat16, two threads, measured
 * alternately in one process: fastnet's first pool (256 x 16 x 28 x 28) 1.6 ms against
 * 2.6 ms as PyTorch ops; seed model1's second (128 x 64 x 11 x 11, then the ReLU) 0.32
 * against 0.47 ms.
 *
 * Layouts (row-major, C order), channels_last storage of (n, c, h, w) tensors:
 *   x         (n, h, w, c)    input, float32, or bfloat16 (as uint16) where bf16 is 1
 *   out       (n, ph, pw, c)  ph = h / 2, pw = w / 2 (floor: an odd last row or column is
 *                             dropped, as MaxPooling2D with 'valid' padding does)
 *   winner    (n, ph, pw, c)  uint8: 2*dy + dx of the window position that won the max: the
 *                             first in row-major order on ties, the last NaN if any (as
 *                             max_pool2d); NO_WINNER where the ReLU zeroed the value. May be
 *                             NULL (inference).
 *   grad_out  like out, grad_in like x (same dtype as x).
 * c must be a multiple of LANES (the channels go in blocks of LANES, one vector each).
 *
 * Values and gradients are those of max_pool2d, then relu, then kernels.dropout on the
 * channels_last pooled tensor (its mask by each pooled value's index in memory order, see
 * dropout_lanes in simd.h), so fusing changes nothing in training: the max of bfloat16
 * values is one of them, and the dropout multiply (where `dropout` is 1) rounds as dropout.c
 * does.
 *
 * Parallel with OpenMP (the library shares torch's OpenMP runtime).
 */

#include <stdint.h>
#include <string.h>

#include "simd.h"

#define PARALLEL_MIN 16384  /* fewer pooled values than this run on one thread */

/* the inverted dropout applied after the pool (and ReLU) */
typedef struct {
    int on;                  /* 0: no dropout */
    uint64_t seed;
    uint32_t keep_threshold; /* keep an element whose lane is at least this */
    float scale;             /* 1 / (1 - rate) */
} dropout_t;

/* a float vector rounded to bfloat16 and back (what a bfloat16 multiply gives) */
static inline vfloat round_bf16(vfloat v) { return from_bf16(to_bf16(v)); }

/* pooled pixel p (index into n * ph * pw), channels [c0, c0 + LANES) */
static inline __attribute__((always_inline)) void
forward_block(const void *x, void *out, uint8_t *winner, int64_t p, int64_t c0, int64_t h,
              int64_t w, int64_t c, int bf16, int relu, const dropout_t *d)
{
    const int64_t ph = h / 2, pw = w / 2;
    const int64_t img = p / (ph * pw), i = p / pw % ph, j = p % pw;
    const int64_t top = ((img * h + 2 * i) * w + 2 * j) * c + c0;  /* window position (0, 0) */
    const int64_t at[4] = {top, top + c, top + w * c, top + w * c + c};
    vfloat best = load_any(x, at[0], bf16);
    vint arg = (vint){0};
    for (int q = 1; q < 4; q++) {
        const vfloat v = load_any(x, at[q], bf16);
        const vint take = (v > best) | (v != v);  /* as max_pool2d: a later NaN takes over */
        best = pick(take, v, best);
        arg = (arg & ~take) | (take & q);
    }
    if (relu) {
        const vint pass = (best > 0.0f) | (best != best);  /* relu(NaN) is NaN */
        best = pick(pass, best, (vfloat){0});
        arg = (arg & pass) | (NO_WINNER & ~pass);
    }
    if (d->on)  /* rounded once, by the store, as dropout.c */
        best *= dropout_factor(d->seed, p * c + c0, d->keep_threshold, d->scale);
    store_any(out, p * c + c0, bf16, best);  /* bfloat16: exact unless the dropout scaled */
    if (winner) {
        const vbyte code = __builtin_convertvector(arg, vbyte);
        memcpy(winner + p * c + c0, &code, sizeof code);
    }
}

void max_pool2_forward(const void *x, void *out, uint8_t *winner, int64_t n, int64_t h,
                       int64_t w, int64_t c, int bf16, int relu, int dropout, uint64_t seed,
                       uint32_t keep_threshold, float scale, int threads)
{
    const dropout_t d = {dropout, seed, keep_threshold, scale};
    const int64_t pixels = n * (h / 2) * (w / 2);
    #pragma omp parallel for num_threads(threads) schedule(static) \
        if (pixels * c >= PARALLEL_MIN)
    for (int64_t p = 0; p < pixels; p++)
        for (int64_t c0 = 0; c0 < c; c0 += LANES)
            forward_block(x, out, winner, p, c0, h, w, c, bf16, relu, &d);
}

/* the four input-gradient vectors under pooled pixel p (window row i, column j), channels
   [c0, c0 + LANES) */
static inline __attribute__((always_inline)) void
backward_block(const void *grad_out, const uint8_t *winner, void *grad_in, int64_t p,
               int64_t c0, int64_t img, int64_t i, int64_t j, int64_t h, int64_t w, int64_t c,
               int bf16, const dropout_t *d)
{
    vfloat grad = load_any(grad_out, p * c + c0, bf16);
    if (d->on) {
        grad *= dropout_factor(d->seed, p * c + c0, d->keep_threshold, d->scale);
        if (bf16)
            grad = round_bf16(grad);  /* as dropout.c's bfloat16 backward pass */
    }
    vbyte code_bytes;
    memcpy(&code_bytes, winner + p * c + c0, sizeof code_bytes);
    const vint code = __builtin_convertvector(code_bytes, vint);
    for (int q = 0; q < 4; q++) {
        const int64_t offset = ((img * h + 2 * i + q / 2) * w + 2 * j + q % 2) * c + c0;
        store_any(grad_in, offset, bf16, (vfloat)((vint)grad & (code == q)));
    }
}

/* grad_in = d(loss)/d(x): the pooled gradient (times the dropout factor) at each window's
   winner, zero everywhere else, including an odd last row or column */
void max_pool2_backward(const void *grad_out, const uint8_t *winner, void *grad_in, int64_t n,
                        int64_t h, int64_t w, int64_t c, int bf16, int dropout, uint64_t seed,
                        uint32_t keep_threshold, float scale, int threads)
{
    const dropout_t d = {dropout, seed, keep_threshold, scale};
    const int64_t ph = h / 2, pw = w / 2;
    const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    char *const base = grad_in;
    /* parallel over pooled rows: each writes the input rows under it in full (two, and the
       odd last row of its image after the last pooled row) */
    #pragma omp parallel for num_threads(threads) schedule(static) \
        if (n * h * w * c >= PARALLEL_MIN)
    for (int64_t r = 0; r < n * ph; r++) {
        const int64_t img = r / ph, i = r % ph;
        for (int64_t j = 0; j < pw; j++)
            for (int64_t c0 = 0; c0 < c; c0 += LANES)
                backward_block(grad_out, winner, grad_in, r * pw + j, c0, img, i, j, h, w, c,
                               bf16, &d);
        if (w % 2)  /* the odd last column of both rows */
            for (int64_t y = 2 * i; y < 2 * i + 2; y++)
                memset(base + (size_t)(((img * h + y) * w + w - 1) * c) * size, 0,
                       (size_t)c * size);
        if (h % 2 && i == ph - 1)  /* the odd last row */
            memset(base + (size_t)((img * h + h - 1) * w * c) * size, 0,
                   (size_t)(w * c) * size);
    }
}
