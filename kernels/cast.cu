// f32 -> bf16 conversion: the bf16 copy of the parameters that the tensor-core convolutions read,
// and of the input batch. Its CPU reference is half::bf16::from_f32 (round to nearest even).
#include "dtype.cuh"

// y: [n] bf16 = x: [n] f32 rounded to nearest even.
extern "C" __global__ void cast_fwd_bf16(bf16* __restrict__ y, const float* __restrict__ x, int n) {
    GRID_STRIDE(i, n) y[i] = __float2bfloat16(x[i]);
}
