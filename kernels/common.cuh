// Helpers shared by every kernel file. Kernels see the same source under nvcc, NVRTC and the CPU
// emulator (build.rs compiles them with -DMURA_EMU and src/gpu/emu/cuda_emu.h force-included).
#pragma once

#ifndef MURA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// Dynamic shared memory: `MURA_DYN_SHARED(float, smem);` in place of
// `extern __shared__ float smem[];`, which the emulator cannot map with a plain macro.
#ifdef MURA_EMU
#define MURA_DYN_SHARED(T, name) MURA_EMU_DYN_SHARED(T, name)
#else
#define MURA_DYN_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

#define FULL_MASK 0xffffffffu

// for (i = this thread; i < total; i += every thread of the grid): any grid covers any total.
#define GRID_STRIDE(i, total)                                                                  \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)(total); \
         i += (long long)gridDim.x * blockDim.x)

// The fused BN + ReLU of every kernel that applies one as it reads: v * scale + shift, then 0
// where that is <= 0, with the CPU reference's NaN rule (src/ops/mod.rs, BnRelu::at): a NaN passes
// through, as in PyTorch, where fmaxf(., 0) would turn it into 0 and a diverged run would look
// healthy one layer later.
__device__ __forceinline__ float bn_relu(float v, float scale, float shift) {
    const float y = v * scale + shift;
    return y <= 0.0f ? 0.0f : y;
}

// Whether v is a NaN (no fast-math here: NaN is the one value unequal to itself).
__device__ __forceinline__ bool is_nan(float v) { return v != v; }

// GRID_STRIDE counted in 32 bits, for per-element loops that divide the index (a row and a channel
// from it): the GPU has no divider, and a 64-bit division is a software routine several times a
// 32-bit one's. The launcher checks that total is at most 2^31 - 1 (gpu::ops::elementwise), so
// i + the grid's threads never wraps.
#define GRID_STRIDE32(i, total)                                                                   \
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < (unsigned)(total); \
         i += gridDim.x * blockDim.x)

// Sum of `v` over the 32 lanes of a full warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

// Sum of `v` over the whole block (blockDim a multiple of 32, at most 1024 threads); every thread
// gets the result. scratch: [32] f32 in shared memory. Contains two __syncthreads, so every
// thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nwarps = (blockDim.x * blockDim.y * blockDim.z) / 32;
    v = warp_sum(v);
    if (tid % 32 == 0) scratch[tid / 32] = v;
    __syncthreads();
    float t = tid % 32 < nwarps ? scratch[tid % 32] : 0.0f;
    t = warp_sum(t);
    __syncthreads();  // scratch may be reused right after
    return t;
}

// Programmatic dependent launch (sm_90; src/gpu/mod.rs `Launch::pdl`): a kernel launched with it
// may start while the kernel before it in the stream still runs. pdl_wait()
// (griddepcontrol.wait) returns once that kernel has completed and its writes are visible; before
// it, a thread may only compute and touch memory the previous kernel neither writes nor reads
// (the emulator's racecheck fails the launch otherwise, naming both kernels).
// pdl_launch_dependents() (griddepcontrol.launch_dependents) lets the next kernel start once
// every block of this one has called it or exited; called only after pdl_wait(), so that no
// kernel older than this one's predecessor is still running when the next one starts. Both are
// no-ops on older architectures and in kernels launched without the attribute.
__device__ __forceinline__ void pdl_wait() {
#ifdef MURA_EMU
    mura_emu::pdl_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if !defined(MURA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
