// The CUDA built-ins that kernels/*.cu use, for running them on the CPU emulator.
//
// build.rs compiles every kernels/*.cu with the host C++ compiler (C++20, -DMURA_EMU) with this
// header force-included. Each CUDA thread is a fiber; runtime.cpp schedules them one block at a
// time and checks barriers and warp collectives. Only what the kernels use is here.
//
// The kernels are also compiled with the host compiler's thread-sanitizer instrumentation (but
// not its runtime): every load and store through a pointer calls a __tsan_* hook that checks.cpp
// defines, which checks it against device and shared memory and feeds the profiler. Code here
// that must not be seen as the kernel's own accesses (a collective's operand block, an atomic's
// read-modify-write, the launch trampoline's parameter reads) is MURA_EMU_UNCHECKED: GCC and
// clang never inline such a function into an instrumented one, so it stays out of line and
// uninstrumented.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

// ---- qualifiers -------------------------------------------------------------------------------
// Static `__shared__` variables live in one linker section, so the runtime can poison it before
// every block (on a GPU, shared memory does not survive from one block to the next).
#define __global__
#define __device__ static inline
#define __host__
#define __forceinline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("mura_shared"), aligned(16)))

#define MURA_EMU_UNCHECKED __attribute__((no_sanitize("thread"), noinline))

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };

namespace mura_emu {

// Where a barrier or collective was called from, for error messages and divergence checks.
struct Site {
    const char* file;
    int line;
};

// The built-in variables, out of line and uninstrumented (see the memory checks in checks.cpp).
// `const`: each is fixed for the life of the fiber (the CUDA thread) that reads it.
uint3 thread_idx() __attribute__((const));
uint3 block_idx() __attribute__((const));
dim3 block_dim() __attribute__((const));
dim3 grid_dim() __attribute__((const));

void syncthreads(Site s);
void cp_async_issue(void* dst, const void* src);
void cp_async_commit();
void cp_async_wait(unsigned newest_pending);
// griddepcontrol.wait: from here on this thread's accesses are ordered after the previous kernel.
void pdl_wait();
unsigned char* dyn_shared();

// Warp collectives. `in`/`out` are this lane's operands; the runtime completes the collective
// when every lane of `mask` has arrived at the same call site, and fails the launch otherwise.
enum class Op : int {
    ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp, Mma, LdMatrix1, LdMatrix2,
    LdMatrix4, LdMatrix2Trans, LdMatrix4Trans
};
struct Lane {
    uint32_t in[12];
    uint32_t out[4];
    const void* ptr;
};
void warp_op(Op op, unsigned mask, Lane* lane, Site s);

template <class T>
MURA_EMU_UNCHECKED T shfl(Op op, unsigned mask, T v, int arg, int width, Site s) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    Lane l{};
    memcpy(l.in, &v, sizeof(T));
    l.in[2] = (uint32_t)arg;
    l.in[3] = (uint32_t)width;
    warp_op(op, mask, &l, s);
    T r;
    memcpy(&r, l.out, sizeof(T));
    return r;
}
MURA_EMU_UNCHECKED inline unsigned vote(Op op, unsigned mask, int pred, Site s) {
    Lane l{};
    l.in[0] = pred != 0;
    warp_op(op, mask, &l, s);
    return l.out[0];
}
}  // namespace mura_emu

#define threadIdx (mura_emu::thread_idx())
#define blockIdx (mura_emu::block_idx())
#define blockDim (mura_emu::block_dim())
#define gridDim (mura_emu::grid_dim())
static constexpr int warpSize = 32;

// Barriers and collectives are macros so that each call records its own file:line (a default
// argument of __builtin_LINE() in a function template reports one line for every call site).
#define MURA_SITE \
    mura_emu::Site { __FILE__, __LINE__ }

namespace mura_emu {
template <class T>
T shfl_idx(Site s, unsigned mask, T v, int src, int width = 32) {
    return shfl(Op::ShflIdx, mask, v, src, width, s);
}
template <class T>
T shfl_up(Site s, unsigned mask, T v, unsigned d, int width = 32) {
    return shfl(Op::ShflUp, mask, v, (int)d, width, s);
}
template <class T>
T shfl_down(Site s, unsigned mask, T v, unsigned d, int width = 32) {
    return shfl(Op::ShflDown, mask, v, (int)d, width, s);
}
template <class T>
T shfl_xor(Site s, unsigned mask, T v, int m, int width = 32) {
    return shfl(Op::ShflXor, mask, v, m, width, s);
}
MURA_EMU_UNCHECKED inline void syncwarp(Site s, unsigned mask = 0xffffffffu) {
    Lane l{};
    warp_op(Op::SyncWarp, mask, &l, s);
}
}  // namespace mura_emu

#define __syncthreads() mura_emu::syncthreads(MURA_SITE)
#define __syncwarp(...) mura_emu::syncwarp(MURA_SITE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) mura_emu::shfl_idx(MURA_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) mura_emu::shfl_up(MURA_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) mura_emu::shfl_down(MURA_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) mura_emu::shfl_xor(MURA_SITE, __VA_ARGS__)
#define __ballot_sync(mask, p) mura_emu::vote(mura_emu::Op::Ballot, mask, p, MURA_SITE)
#define __any_sync(mask, p) (int)mura_emu::vote(mura_emu::Op::Any, mask, p, MURA_SITE)
#define __all_sync(mask, p) (int)mura_emu::vote(mura_emu::Op::All, mask, p, MURA_SITE)
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- atomics: fibers never preempt each other, so a plain read-modify-write is atomic ---------
// Each first tells the checkers and the profiler (checks.cpp) about its access, as an atomic.
namespace mura_emu {
void atomic_access(const void* p, unsigned bytes, const void* pc);
}
#define MURA_EMU_ATOMIC(name, expr)                                         \
    template <class T>                                                      \
    MURA_EMU_UNCHECKED T name(T* p, T v) {                                  \
        mura_emu::atomic_access(p, sizeof(T), __builtin_return_address(0)); \
        T old = *p;                                                         \
        *p = expr;                                                          \
        return old;                                                         \
    }
MURA_EMU_ATOMIC(atomicAdd, old + v)
MURA_EMU_ATOMIC(atomicMax, old > v ? old : v)
MURA_EMU_ATOMIC(atomicMin, old < v ? old : v)
MURA_EMU_ATOMIC(atomicExch, v)
#undef MURA_EMU_ATOMIC
template <class T>
MURA_EMU_UNCHECKED T atomicCAS(T* p, T cmp, T v) {
    mura_emu::atomic_access(p, sizeof(T), __builtin_return_address(0));
    T old = *p;
    if (old == cmp) *p = v;
    return old;
}

// ---- math --------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }  // never fused into an FMA
inline float __fadd_rn(float a, float b) { return a + b; }
inline int min(int a, int b) { return a < b ? a : b; }  // CUDA's integer min / max
inline int max(int a, int b) { return a > b ? a : b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline unsigned __float_as_uint(float x) {
    unsigned u;
    memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}
inline int __float_as_int(float x) { return (int)__float_as_uint(x); }
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }

// ---- bf16 and half: storage types with the CUDA conversion functions ---------------------------
struct __nv_bfloat16 {
    uint16_t x;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {  // (aligned as CUDA's)
    __nv_bfloat16 x, y;
};
struct __half {
    uint16_t x;
};
struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
typedef __nv_bfloat16 nv_bfloat16;

inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, NaN stays NaN
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.x << 16); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}

inline __half __float2half(float f) {  // round to nearest even
    uint32_t u = __float_as_uint(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{(uint16_t)(sign | 0x7e00u)};  // NaN
    if (a >= 0x477ff000u) return __half{(uint16_t)(sign | 0x7c00u)};  // overflow -> inf
    if (a < 0x38800000u) {  // subnormal half (or zero)
        float m = __uint_as_float(a) * 16777216.0f;  // scale by 2^24: half subnormal units
        return __half{(uint16_t)(sign | (uint16_t)nearbyintf(m))};
    }
    uint32_t e = (a >> 23) - 112;  // rebias 127 -> 15
    uint32_t mant = a & 0x7fffffu;
    uint32_t h = (e << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return __half{(uint16_t)(sign | h)};
}
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) {
    uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
    uint32_t e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
    if (e == 0) return (sign ? -1.f : 1.f) * (float)m * 5.9604644775390625e-8f;  // 2^-24
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}

// ---- dynamic shared memory (see MURA_DYN_SHARED in kernels/common.cuh) ------------------------
#define MURA_EMU_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(mura_emu::dyn_shared())

// ---- the launch table that build.rs generates for every kernel ---------------------------------
#include <utility>
namespace mura_emu {
struct Kernel {
    const char* name;
    void (*entry)(void** params);  // calls the kernel with *(T_i*)params[i]
    int arity;
    const int* param_sizes;  // sizeof(T_i) for each parameter: what a graph node copies
};
template <class... A>
constexpr int arity(void (*)(A...)) {
    return (int)sizeof...(A);
}
template <class... A>
struct ParamSizes {
    static constexpr int v[] = {(int)sizeof(A)..., 0};  // the 0 keeps a 0-ary kernel's array legal
};
template <class... A>
constexpr const int* param_sizes(void (*)(A...)) {
    return ParamSizes<A...>::v;
}
template <class... A, size_t... I>
__attribute__((no_sanitize("thread"))) void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(p[I])...);
}
template <auto F>
MURA_EMU_UNCHECKED void trampoline(void** p) {  // (the parameter block is not device memory)
    call(F, p, std::make_index_sequence<arity(F)>{});
}
}  // namespace mura_emu
