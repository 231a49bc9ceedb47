// ReLU, elementwise. Grid-stride loops: any grid covers any n.
#include "common.cuh"

// y: [n] f32 out; x: [n] f32
extern "C" __global__ void relu_fwd_f32(float* __restrict__ y, const float* __restrict__ x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        y[i] = fmaxf(x[i], 0.0f);
}

// dx: [n] f32 out; dy: [n] f32; y: [n] f32, the forward output (dx = dy where y > 0)
extern "C" __global__ void relu_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy,
                                        const float* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

// y: [n] bf16 out; x: [n] bf16
extern "C" __global__ void relu_fwd_bf16(__nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                                         int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        y[i] = __float2bfloat16(fmaxf(__bfloat162float(x[i]), 0.0f));
}

// dx: [n] bf16 out; dy: [n] bf16; y: [n] bf16, the forward output
extern "C" __global__ void relu_bwd_bf16(__nv_bfloat16* __restrict__ dx, const __nv_bfloat16* __restrict__ dy,
                                         const __nv_bfloat16* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dx[i] = __bfloat162float(y[i]) > 0.0f ? dy[i] : __float2bfloat16(0.0f);
}
