// Batch-norm statistics for NHWC activations: per-channel mean and biased variance over the
// R = N*H*W rows. Two passes over x (mean, then squared deviations) for accuracy.
#include "common.cuh"

// mean: [C] f32 out; var: [C] f32 out (biased, divided by R); x: [R, C] f32 (R = N*H*W).
// Block (32, 16): threadIdx.x picks a channel of the block's 32-channel slice (coalesced reads),
// threadIdx.y strides over rows. Grid: (ceil(C / 32), 1, 1).
extern "C" __global__ void bn_stats_fwd_f32(float* __restrict__ mean, float* __restrict__ var,
                                            const float* __restrict__ x, int R, int C) {
    __shared__ float part[16][33];
    __shared__ float mu[32];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const bool valid = c < C;
    float s = 0.0f;
    if (valid)
        for (int r = threadIdx.y; r < R; r += blockDim.y) s += x[(long long)r * C + c];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0) {
        float t = 0.0f;
        for (int k = 0; k < (int)blockDim.y; k++) t += part[k][threadIdx.x];
        mu[threadIdx.x] = t / (float)R;
    }
    __syncthreads();
    const float m = mu[threadIdx.x];
    float q = 0.0f;
    if (valid)
        for (int r = threadIdx.y; r < R; r += blockDim.y) {
            const float d = x[(long long)r * C + c] - m;
            q += d * d;
        }
    part[threadIdx.y][threadIdx.x] = q;
    __syncthreads();
    if (threadIdx.y == 0 && valid) {
        float t = 0.0f;
        for (int k = 0; k < (int)blockDim.y; k++) t += part[k][threadIdx.x];
        mean[c] = m;
        var[c] = t / (float)R;
    }
}
