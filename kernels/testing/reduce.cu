// Sum of a vector: a block reduction (warp shuffles + shared memory + __syncthreads) whose
// per-block result is added atomically into the output, which must be zeroed first.
#include "common.cuh"

// out: [1] f32, accumulated into (zero it before launch); x: [n] f32. blockDim.x a multiple of 32.
extern "C" __global__ void sum_fwd_f32(float* __restrict__ out, const float* __restrict__ x, int n) {
    __shared__ float scratch[32];
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    v = block_sum(v, scratch);
    if (threadIdx.x == 0) atomicAdd(out, v);
}
