/* A one-channel convolution, 2x2 max pool and ReLU in one pass, and its weight gradient.
 *
 * The seed's networks open with Conv2D(1 -> C, k x k, 'valid') + ReLU + MaxPooling2D(2).
 * Run as three library calls, that block writes and reads the full-resolution convolution
 * output several times (for model1 at batch 128: 128 x 32 x 26 x 26 floats, 11 MB, written by
 * the convolution, read by the pool, and in the backward pass a gradient of the same size
 * zero-filled, scattered into and read again), while its arithmetic is tiny (9 multiply-adds
 * per output value). Here every pooled value is computed from its (k+1) x (k+1) input window in
 * registers; only the pooled output (4x smaller) and one byte per pooled value (which of the
 * four positions won) are written. The backward pass needs only the weight and bias gradients
 * (the network's input needs none).
 *
 * Layouts (row-major, C order):
 *   x      (n, h, w)          input images, float32
 *   weight (k*k, c)           tap-major: weight[(a*k + b)*c + ch] is tap (a, b) of channel ch
 *   bias   (c)
 *   out    (n, ph, pw, c)     = channels_last storage of an (n, c, ph, pw) tensor, float32,
 *                             or bfloat16 (as uint16, rounded to nearest-even) where bf16 is 1:
 *                             under bf16 autocast the next layer reads bfloat16, and writing it
 *                             here saves a cast that reads and writes the whole output again
 *                             (grad_out, in the backward pass, has the same dtype as out)
 *   winner (n, ph, pw, c)     uint8: 2*dy + dx of the window position that won the max
 *                             (first in row-major order on ties, as max_pool2d), 255 where the
 *                             ReLU zeroed the value; may be NULL (inference)
 * with ph = (h - k + 1) / 2 and pw = (w - k + 1) / 2 (floor: an odd last row/column of the
 * convolution output is dropped, as MaxPooling2D with 'valid' padding does).
 *
 * c must be a multiple of LANES: the channels are processed in blocks of LANES as GCC/Clang
 * vectors (one register: simd.h), and a window's four positions are summed in four such
 * vectors across the taps.
 *
 * Parallel over images with OpenMP; the library shares torch's OpenMP runtime (same soname).
 */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* One image of the forward pass. Always inlined, so that where the caller passes a constant
   k (3, the seed's kernels) the compiler unrolls the tap loops and keeps the taps in
   registers. */
static inline __attribute__((always_inline)) void
forward_image(const float *restrict x, const float *restrict weight, const float *restrict bias,
              void *restrict out, int bf16, uint8_t *restrict winner, int64_t img, int64_t h,
              int64_t w, int64_t k, int64_t c)
{
    const int64_t ph = (h - k + 1) / 2, pw = (w - k + 1) / 2;
    {
        const float *xi = x + img * h * w;
        for (int64_t c0 = 0; c0 < c; c0 += LANES) {
            const vfloat shift = load(bias + c0);
            for (int64_t i = 0; i < ph; i++) {
                for (int64_t j = 0; j < pw; j++) {
                    /* the window's four positions, row-major: (0,0) (0,1) (1,0) (1,1) */
                    vfloat z0 = shift, z1 = shift, z2 = shift, z3 = shift;
                    for (int64_t a = 0; a < k; a++) {
                        const float *xr = xi + (2 * i + a) * w + 2 * j;
                        const float *wr = weight + a * k * c + c0;
                        for (int64_t b = 0; b < k; b++) {
                            const vfloat tap = load(wr + b * c);
                            z0 += xr[b] * tap;
                            z1 += xr[b + 1] * tap;
                            z2 += xr[b + w] * tap;
                            z3 += xr[b + w + 1] * tap;
                        }
                    }
                    /* max, the first position winning ties; a NaN wins, and keeps winning,
                       as in max_pool2d */
                    vfloat best = z0;
                    vint arg = (vint){0};
                    const vfloat zs[3] = {z1, z2, z3};
                    for (int q = 1; q < 4; q++) {
                        const vfloat v = zs[q - 1];
                        const vint wins = (v > best) | ((v != v) & (best == best));
                        best = pick(wins, v, best);
                        arg = (arg & ~wins) | (wins & q);
                    }
                    const vint active = best > 0.0f;
                    const int64_t base = ((img * ph + i) * pw + j) * c + c0;
                    /* ReLU; a NaN passes through it, as torch.relu lets it */
                    const vfloat result = (vfloat)((vint)best & (active | (best != best)));
                    store_any(out, base, bf16, result);
                    if (winner) {
                        const vint code = (arg & active) | (NO_WINNER & ~active);
                        for (int l = 0; l < LANES; l++)
                            winner[base + l] = (uint8_t)code[l];
                    }
                }
            }
        }
    }
}

void conv1_pool_relu_forward(const float *restrict x, const float *restrict weight,
                             const float *restrict bias, void *restrict out, int bf16,
                             uint8_t *restrict winner, int64_t n, int64_t h, int64_t w,
                             int64_t k, int64_t c, int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t img = 0; img < n; img++) {
        if (k == 3)
            forward_image(x, weight, bias, out, bf16, winner, img, h, w, 3, c);
        else
            forward_image(x, weight, bias, out, bf16, winner, img, h, w, k, c);
    }
}

/* One image's weight and bias gradients, written to acc ((k*k + 1) * c floats); inlined as
   forward_image is. */
static inline __attribute__((always_inline)) void
backward_image(const float *restrict x, const void *restrict grad_out, int bf16,
               const uint8_t *restrict winner, float *restrict acc, int64_t img, int64_t h,
               int64_t w, int64_t k, int64_t c)
{
    const int64_t ph = (h - k + 1) / 2, pw = (w - k + 1) / 2;
    const int64_t taps = k * k;
    const float *xi = x + img * h * w;
    for (int64_t c0 = 0; c0 < c; c0 += LANES) {
        /* this block of channels' tap gradients, in registers where k is a constant */
        vfloat db = (vfloat){0}, dws[taps];
        for (int64_t t = 0; t < taps; t++)
            dws[t] = (vfloat){0};
        for (int64_t i = 0; i < ph; i++) {
            for (int64_t j = 0; j < pw; j++) {
                const int64_t base = ((img * ph + i) * pw + j) * c + c0;
                const vfloat grad = load_any(grad_out, base, bf16);
                vint code;
                for (int l = 0; l < LANES; l++)
                    code[l] = winner[base + l];
                /* the gradient routed to each window position */
                const vfloat g0 = (vfloat)((vint)grad & (code == 0));
                const vfloat g1 = (vfloat)((vint)grad & (code == 1));
                const vfloat g2 = (vfloat)((vint)grad & (code == 2));
                const vfloat g3 = (vfloat)((vint)grad & (code == 3));
                db += (g0 + g1) + (g2 + g3);
                for (int64_t a = 0; a < k; a++) {
                    const float *xr = xi + (2 * i + a) * w + 2 * j;
                    for (int64_t b = 0; b < k; b++)
                        dws[a * k + b] += xr[b] * g0 + xr[b + 1] * g1
                                          + (xr[b + w] * g2 + xr[b + w + 1] * g3);
                }
            }
        }
        for (int64_t t = 0; t < taps; t++)
            store(acc + t * c + c0, dws[t]);
        store(acc + taps * c + c0, db);
    }
}

/* grad_weight (k*k, c) and grad_bias (c) are overwritten. grad_out is laid out as `out`.
   Deterministic: each thread sums its own images (a fixed share under the static schedule) in
   its own slot, and the slots are added in thread order at the end. */
void conv1_pool_relu_backward(const float *restrict x, const void *restrict grad_out, int bf16,
                              const uint8_t *restrict winner, float *restrict grad_weight,
                              float *restrict grad_bias, int64_t n, int64_t h, int64_t w,
                              int64_t k, int64_t c, int threads)
{
    const int64_t taps = k * k;
    const int64_t size = (taps + 1) * c;  /* the weight taps, then the bias */
    if (threads < 1)
        threads = 1;
    double *slots = calloc((size_t)(threads * size), sizeof(double));
    #pragma omp parallel num_threads(threads)
    {
        double *mine = slots + omp_get_thread_num() * size;
        /* one image's sums in float (at most 4*ph*pw terms each), then added to `mine` in
           double, so that rounding does not grow with the batch */
        float *acc = malloc(sizeof(float) * (size_t)size);
        #pragma omp for schedule(static)
        for (int64_t img = 0; img < n; img++) {
            if (k == 3)
                backward_image(x, grad_out, bf16, winner, acc, img, h, w, 3, c);
            else
                backward_image(x, grad_out, bf16, winner, acc, img, h, w, k, c);
            for (int64_t t = 0; t < size; t++)
                mine[t] += acc[t];
        }
        free(acc);
    }
    for (int64_t t = 0; t < size; t++) {
        double sum = 0.0;
        for (int s = 0; s < threads; s++)
            sum += slots[s * size + t];
        if (t < taps * c)
            grad_weight[t] = (float)sum;
        else
            grad_bias[t - taps * c] = (float)sum;
    }
    free(slots);
}
