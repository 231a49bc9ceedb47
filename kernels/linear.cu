// The head's single-logit linear layer, forward and backward (f32: O(n*c) work).
#include "common.cuh"

// logits: [n] f32 = feat · wt + bias; feat: [n, c] f32; wt: [c] f32; bias: [1] f32.
// Grid (n), block 256 (a multiple of 32).
extern "C" __global__ void linear_fwd_f32(float* __restrict__ logits, const float* __restrict__ feat,
                                          const float* __restrict__ wt, const float* __restrict__ bias, int c) {
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += feat[(long long)b * c + j] * wt[j];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) logits[b] = s + bias[0];
}

// dfeat: [n, c] f32 out = dlogits[b] * wt; dw: [c] f32 and db: [1] f32 added to (dw += dlogitsᵀ feat,
// db += sum dlogits); feat: [n, c] f32; wt: [c] f32; dlogits: [n] f32. One thread per channel.
extern "C" __global__ void linear_bwd_f32(float* __restrict__ dfeat, float* __restrict__ dw, float* __restrict__ db,
                                          const float* __restrict__ feat, const float* __restrict__ wt,
                                          const float* __restrict__ dlogits, int n, int c) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < c) {
        float s = 0.0f;
        for (int b = 0; b < n; b++) {
            s += dlogits[b] * feat[(long long)b * c + j];
            dfeat[(long long)b * c + j] = dlogits[b] * wt[j];
        }
        dw[j] += s;
        if (j == 0) {
            float t = 0.0f;
            for (int b = 0; b < n; b++) t += dlogits[b];
            db[0] += t;
        }
    }
}
