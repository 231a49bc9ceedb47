// Adam over one flat parameter buffer, as torch.optim.Adam (not AdamW): weight decay is an L2
// term added to the gradient. The host computes, in double precision as PyTorch does, the
// complements 1 - beta (1 - 0.999 in f32 arithmetic is off by 5e-5) and the bias corrections
// for step t: bc1 = 1 - beta1^t, bc2 = 1 - beta2^t. ("fwd" only to follow the <op>_<fwd|bwd>_<dtype> rule.)
#include "common.cuh"

// p: [n] f32 params, updated; g: [n] f32 grads; m, v: [n] f32 moments, updated
extern "C" __global__ void adam_fwd_f32(float* __restrict__ p, const float* __restrict__ g,
                                        float* __restrict__ m, float* __restrict__ v, int n, float lr,
                                        float beta1, float one_minus_beta1, float beta2,
                                        float one_minus_beta2, float eps, float weight_decay, float bc1,
                                        float bc2) {
    const float step = lr / bc1, inv_sqrt_bc2 = rsqrtf(bc2);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float grad = g[i] + weight_decay * p[i];
        const float mi = beta1 * m[i] + one_minus_beta1 * grad;
        const float vi = beta2 * v[i] + one_minus_beta2 * grad * grad;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
    }
}
