/* Keras' Adam update over all of a model's float32 tensors in one parallel pass.
 *
 * torch's fused AdamW kernel walks its tensors one at a time, at about 6.5 us of set-up each
 * here: for the seed's models (ten tensors, 67,786 values for model2) that is 90 us per step,
 * where one pass over the same values as a single tensor takes 21 us. Here the tensors are
 * one index space split evenly between the threads.
 *
 * Per value, in Keras 3's arithmetic (keras/src/optimizers/adam.py), decoupled weight decay
 * first (Keras' `weight_decay`, applied before the update):
 *   w <- w - w * (weight_decay * lr)
 *   m <- m + (g - m) * (1 - beta1)
 *   v <- v + (g * g - v) * (1 - beta2)
 *   w <- w - (m * alpha) / (sqrt(v) + epsilon),  alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
 * The caller computes alpha (in double precision) and passes it. Each tensor's parameter,
 * gradient, m and v share one memory layout (the caller checks), so walking them in memory
 * order pairs each weight with its own gradient and moments.
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>

#define PARALLEL_MIN 16384  /* fewer values than this in all run on one thread */

static void update_range(float *w, const float *g, float *m, float *v, int64_t begin,
                         int64_t end, float decay, float one_minus_beta1,
                         float one_minus_beta2, float alpha, float epsilon)
{
    #pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float weight = w[i];
        if (decay != 0.0f)
            weight -= weight * decay;
        const float grad = g[i];
        const float m_new = m[i] + (grad - m[i]) * one_minus_beta1;
        const float v_new = v[i] + (grad * grad - v[i]) * one_minus_beta2;
        m[i] = m_new;
        v[i] = v_new;
        w[i] = weight - (m_new * alpha) / (sqrtf(v_new) + epsilon);
    }
}

/* tensors: `count` tensors of sizes[k] values each; params[k], grads[k], ms[k], vs[k] point at
   tensor k's float32 data. decay = weight_decay * lr. The caller computes 1 - beta in double
   precision, as Keras does in Python: 1 - 0.999f in float32 would be off by 5e-5. */
void adam_update(int64_t count, float *const *params, const float *const *grads,
                 float *const *ms, float *const *vs, const int64_t *sizes, float decay,
                 float one_minus_beta1, float one_minus_beta2, float alpha, float epsilon,
                 int threads)
{
    int64_t total = 0;
    for (int64_t k = 0; k < count; k++)
        total += sizes[k];
    if (total < PARALLEL_MIN || threads < 2)
        threads = 1;
    #pragma omp parallel num_threads(threads)
    {
        /* this thread's share [first, last) of the concatenated index space */
        const int me = omp_get_thread_num(), team = omp_get_num_threads();
        const int64_t first = total * me / team, last = total * (me + 1) / team;
        int64_t start = 0;  /* index of tensor k's first value in the concatenation */
        for (int64_t k = 0; k < count && start < last; start += sizes[k], k++) {
            const int64_t begin = first > start ? first - start : 0;
            const int64_t end = last - start < sizes[k] ? last - start : sizes[k];
            if (begin < end)
                update_range(params[k], grads[k], ms[k], vs[k], begin, end, decay,
                             one_minus_beta1, one_minus_beta2, alpha, epsilon);
        }
    }
}
