// Loads and stores of activation storage types, computing in f32: one kernel template serves
// f32 storage and bf16 storage (f32 accumulation either way).
#pragma once
#include "common.cuh"

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

typedef __nv_bfloat16 bf16;
