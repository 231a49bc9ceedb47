// ReLU, elementwise, one templated body per pass for f32 and bf16 storage (the MURA_F32_BF16 stamp
// of kernels/dtype.cuh). Grid-stride loops: any grid covers any n.
#include "dtype.cuh"

// y: [n] T out; x: [n] T
template <class T>
__device__ void relu_fwd(T* y, const T* x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = fmaxf(ld(x + i), 0.0f);
        st(y + i, v);
    }
}

// 0 of p's element type.
__device__ __forceinline__ float zero_of(const float*) { return 0.0f; }
__device__ __forceinline__ bf16 zero_of(const bf16*) { return __float2bfloat16(0.0f); }

// dx: [n] T out; dy: [n] T; y: [n] T, the forward output (dx = dy where y > 0, copied: no round
// trip through f32)
template <class T>
__device__ void relu_bwd(T* dx, const T* dy, const T* y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dx[i] = ld(y + i) > 0.0f ? dy[i] : zero_of(dy);
}

MURA_F32_BF16(relu_fwd, (T* __restrict__ y, const T* __restrict__ x, int n), relu_fwd<T>(y, x, n));
MURA_F32_BF16(relu_bwd, (T* __restrict__ dx, const T* __restrict__ dy, const T* __restrict__ y, int n),
              relu_bwd<T>(dx, dy, y, n));
