// Loads and stores of activation storage types, computing in f32: one kernel template serves
// f32 storage and bf16 storage (f32 accumulation either way).
#pragma once
#include "common.cuh"

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

typedef __nv_bfloat16 bf16;

// One templated kernel body, two entry points: `MURA_F32_BF16(name, (params), call);` defines
// `extern "C" __global__ void name_f32(params) { call; }` with `T` float and `name_bf16` with `T`
// bf16 (`params` and `call` write the activation type as `T`); MURA_F32_BF16_BOUNDED(threads,
// name, (params), call) adds `__launch_bounds__(threads)`. build.rs reads these lines as it reads
// kernels (build/kernel_sigs.rs): a launcher for each entry point and one generic over `T`. Each
// entry point is defined in a namespace of its own, where `T` is its type, and brought out by a
// using-declaration (the emulator's tables name it unqualified).
#define MURA_F32_BF16(name, params, call) MURA_STAMP_TWO_(, name, params, call)
#define MURA_F32_BF16_BOUNDED(threads, name, params, call) \
    MURA_STAMP_TWO_(__launch_bounds__(threads), name, params, call)
#define MURA_STAMP_TWO_(bounds, name, params, call)       \
    MURA_STAMP_ONE_(bounds, name##_f32, float, params, call); \
    MURA_STAMP_ONE_(bounds, name##_bf16, bf16, params, call)
#define MURA_STAMP_ONE_(bounds, entry, elem, params, call)      \
    namespace mura_stamp_##entry {                              \
    using T = elem;                                             \
    extern "C" __global__ void bounds entry params { call; }    \
    }                                                           \
    using mura_stamp_##entry::entry
