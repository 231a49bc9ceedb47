// Kernels that test the executors themselves (barriers, warp collectives, atomics, shared memory),
// not model ops. The emulator tests compare them with their CUDA semantics; the ones that plant a
// bug (bad masks, divergent barriers, out-of-bounds writes) run on the emulator only.
#include "mma.cuh"

// out: [gridDim.x * blockDim.x] i32. blockDim.x <= 256.
extern "C" __global__ void selftest_barrier_fwd_i32(int* out) {
    __shared__ int s[256];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = t * 7 + blockIdx.x;
    __syncthreads();
    const int v = s[(t + 1) % n];
    __syncthreads();
    s[t] = v * 2;
    __syncthreads();
    out[blockIdx.x * n + t] = s[n - 1 - t];
}

// out: [gridDim.x * blockDim.x, 8] i32. blockDim.x a multiple of 32.
extern "C" __global__ void selftest_shfl_fwd_i32(int* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    const int v = i * 3 + 1;
    int* o = out + i * 8;
    o[0] = __shfl_sync(FULL_MASK, v, 5);
    o[1] = __shfl_up_sync(FULL_MASK, v, 3);
    o[2] = __shfl_down_sync(FULL_MASK, v, 2, 16);
    o[3] = __shfl_xor_sync(FULL_MASK, v, 9);
    o[4] = (int)__ballot_sync(FULL_MASK, v % 7 < 3 && lane % 5 != 4);
    o[5] = __all_sync(FULL_MASK, v > 0) + 2 * __any_sync(FULL_MASK, lane == 31 && v % 4 == 0);
    o[6] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : -1;
    o[7] = (int)warp_sum((float)v);
}

// hist: [16] i32, fsum: [1] f32, imax: [1] i32, count: [1] u32, all zeroed; x: [n] i32 >= 0.
extern "C" __global__ void selftest_atomic_fwd_i32(int* hist, float* fsum, int* imax, unsigned* count,
                                                   const int* x, int n) {
    __shared__ int block_count;
    if (threadIdx.x == 0) block_count = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        atomicAdd(&hist[x[i] & 15], 1);
        atomicAdd(fsum, (float)(x[i] & 255));
        atomicMax(imax, x[i]);
        atomicAdd(&block_count, 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // add the block's count with a CAS loop
        unsigned old = *count, seen;
        do {
            seen = old;
            old = atomicCAS(count, seen, seen + (unsigned)block_count);
        } while (old != seen);
    }
}

// out: [gridDim.x * blockDim.x, 2] f32: what static and dynamic shared memory held before this
// block wrote them (the emulator poisons them with NaN before every block). blockDim.x <= 64;
// dynamic shared bytes = 4 * blockDim.x.
extern "C" __global__ void selftest_uninit_fwd_f32(float* out) {
    __shared__ float s[64];
    MURA_DYN_SHARED(float, d);
    const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    out[2 * i] = s[t];
    out[2 * i + 1] = d[t];
    __syncthreads();
    s[t] = 1.0f;
    d[t] = 2.0f;
}

// out: [gridDim.x * blockDim.x] f32: dynamic shared memory round trip, reversed within the block.
// Dynamic shared bytes = 4 * blockDim.x.
extern "C" __global__ void selftest_dynshared_fwd_f32(float* out) {
    MURA_DYN_SHARED(float, d);
    const int t = threadIdx.x, n = blockDim.x;
    d[t] = (float)(blockIdx.x * 1000 + t);
    __syncthreads();
    out[blockIdx.x * n + t] = d[n - 1 - t];
}

// out: [gridDim.x * blockDim.x, 16] f32, blockDim.x <= 256: each thread copies floats 0..3 of its
// row (group 1) and 4..7 (group 2) by cp.async into shared memory that holds -1, and writes what
// it reads there: column 8, copy 1 right after issuing; 9 and 10, copies 1 and 2 after
// wait_group 1 (all but the newest group); 11, copy 2 after wait_group 0. A GPU may show either
// value at 8 and 10; the emulator, which lands copies only when their group is waited for, -1.
extern "C" __global__ void selftest_cpasync_fwd_f32(float* out) {
    __shared__ __align__(16) float s[256 * 8];
    const int t = threadIdx.x;
    float* row = out + (long long)(blockIdx.x * blockDim.x + t) * 16;
    for (int j = 0; j < 8; j++) s[t * 8 + j] = -1.0f;
    cp_async_16(s + t * 8, row);
    cp_async_commit();
    row[8] = s[t * 8];
    cp_async_16(s + t * 8 + 4, row + 4);
    cp_async_commit();
    cp_async_wait_group<1>();
    row[9] = s[t * 8 + 3];
    row[10] = s[t * 8 + 4];
    cp_async_wait_group<0>();
    row[11] = s[t * 8 + 7];
}

// Conversions, round to nearest even. b: [n] bf16 out; h: [n] f16 out; back: [n, 2] f32 out, the
// two converted back; x: [n] f32.
extern "C" __global__ void selftest_convert_fwd_f32(__nv_bfloat16* b, __half* h, float* back, const float* x,
                                                    int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        b[i] = __float2bfloat16(x[i]);
        h[i] = __float2half(x[i]);
        back[2 * i] = __bfloat162float(b[i]);
        back[2 * i + 1] = __half2float(h[i]);
    }
}

// Every ldmatrix form on a 32x8 tile of 16-bit values (four 8x8 matrices), tile[r][c] = 8r + c.
// out: [32 lanes, 13] u32: x1 (1 reg), x2 (2), x4 (4), x2.trans (2), x4.trans (4). Block (32).
extern "C" __global__ void selftest_ldmatrix_fwd_i32(unsigned* out) {
    __shared__ __align__(16) unsigned short tile[32][8];
    const int lane = threadIdx.x;
    for (int c = 0; c < 8; c++) tile[lane][c] = (unsigned short)(8 * lane + c);
    __syncwarp();
    unsigned* o = out + lane * 13;
    ldmatrix_x1(o, &tile[lane % 8][0]);
    ldmatrix_x2(o + 1, &tile[lane % 16][0]);
    ldmatrix_x4(o + 3, &tile[lane][0]);
    ldmatrix_x2_trans(o + 7, &tile[lane % 16][0]);
    ldmatrix_x4_trans(o + 9, &tile[lane][0]);
}

// Planted bugs, one per mode (0: none). out: [gridDim.x * blockDim.x] i32.
extern "C" __global__ void selftest_bug_fwd_i32(int* out, int mode) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    int v = i;
    if (mode == 1) v = __shfl_sync(1u << ((lane + 1) % 32), v, 0);  // caller not in its mask
    if (mode == 2) {                                                 // lanes at different shuffles
        if (lane & 1)
            v = __shfl_xor_sync(FULL_MASK, v, 1);
        else
            v = __shfl_xor_sync(FULL_MASK, v, 2);
    }
    if (mode == 3) {  // half the block at a barrier, the other half exits
        if (threadIdx.x < 16) __syncthreads();
    }
    if (mode == 4) {  // two different barriers
        if (threadIdx.x < 32)
            __syncthreads();
        else
            __syncthreads();
    }
    if (mode == 5 && lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);  // source lane outside the mask
    if (mode == 6) v = __shfl_xor_sync(FULL_MASK, v, 1);              // needs blockDim.x % 32 != 0
    out[i] = v;
}

__device__ __noinline__ float selftest_deep(int d) {
    volatile float pad[256];  // 1 KiB a frame
    pad[d % 256] = (float)d;
    return d > 0 ? selftest_deep(d - 1) + pad[d % 256] : 0.0f;
}

// out: [1] f32 = a recursion `depth` frames deep (1 KiB each): deep enough, it overflows an
// emulator fiber's stack into its guard page (emulator test only).
extern "C" __global__ void selftest_overflow_fwd_f32(float* out, int depth) {
    if (threadIdx.x == 0) out[0] = selftest_deep(depth);
}

// out: [n] f32; writes out[0 .. n + extra): extra > 0 is an out-of-bounds write for ASan to catch.
extern "C" __global__ void selftest_oob_fwd_f32(float* out, int n, int extra) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n + extra; i += gridDim.x * blockDim.x)
        out[i] = (float)i;
}

// ---- the emulator's checkers and profiler (tests/device/checks.rs, tests/device/profile.rs) ----------

// y: [n] f32 = x: [n] f32, one element per thread (a perfectly coalesced copy).
extern "C" __global__ void selftest_copy_fwd_f32(float* __restrict__ y, const float* __restrict__ x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

// y: [n] f32 = x[i * stride] (x: [n * stride] f32): strided loads, coalesced stores.
extern "C" __global__ void selftest_strided_fwd_f32(float* __restrict__ y, const float* __restrict__ x, int stride,
                                                    int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[(long long)i * stride];
}

// y: [n, n] f32 = x^T (x: [n, n] f32, n a multiple of 32) through a 32x32 shared tile whose rows
// are 32 + pad floats apart (pad 0: the column reads are 32-way bank conflicts; pad 1: none).
// Block (32, 32), grid (n / 32, n / 32).
extern "C" __global__ void selftest_transpose_fwd_f32(float* __restrict__ y, const float* __restrict__ x, int n,
                                                      int pad) {
    __shared__ float tile[32 * 33];
    const int tx = threadIdx.x, ty = threadIdx.y, rs = 32 + pad;
    tile[ty * rs + tx] = x[(long long)(blockIdx.y * 32 + ty) * n + blockIdx.x * 32 + tx];
    __syncthreads();
    y[(long long)(blockIdx.x * 32 + ty) * n + blockIdx.y * 32 + tx] = tile[tx * rs + ty];
}

// One warp: each thread t stores shared word t * st (st = 32: all in one bank, a 32-way
// conflict; 33: conflict-free) and loads word t * ld (ld = 0: one word, a broadcast), then
// stores and loads 8-byte word t (two conflict-free half-warp phases) and copies in[t] through
// 16-byte word t to out[t] (four quarter-warp phases). out, in: [32] float4; vw: [32] f32.
extern "C" __global__ void selftest_banks_fwd_f32(float4* out, float* vw, const float4* in, int st, int ld) {
    __shared__ __align__(16) float s[32 * 33];
    const int t = threadIdx.x;
    s[t * st % (32 * 33)] = (float)t;
    __syncthreads();
    const float v = s[t * ld % (32 * 33)];
    __syncthreads();
    double* s8 = reinterpret_cast<double*>(s);
    s8[t] = (double)v;
    __syncthreads();
    vw[t] = (float)s8[t];
    __syncthreads();
    float4* s16 = reinterpret_cast<float4*>(s);
    s16[t] = in[t];
    __syncthreads();
    out[t] = s16[t];
}

// Planted races and misuses for the checkers, one per mode (0: none), on a 64-thread block (two
// warps), t = threadIdx.x. out: [gridDim.x * 64] i32, zeroed by the caller. Shared memory: 1-8
// plant hazards between threads of a block (3, 4 and 6 are not hazards: a __syncwarp or a
// shuffle orders accesses within a warp, and atomics never race with atomics); global memory:
// 10-14 between blocks (10 is not a race: atomics only); 20-22 misaligned or misplaced accesses.
extern "C" __global__ void selftest_hazard_fwd_i32(int* out, int mode) {
    __shared__ __align__(16) int s[64 + 8];
    const int t = threadIdx.x, b = blockIdx.x, i = b * 64 + t;
    int v = 0;
    s[t] = t;
    if (mode != 1 && mode != 2 && mode != 3 && mode != 4) __syncthreads();
    switch (mode) {
    case 1: v = s[(t + 32) % 64]; break;  // read-after-write across warps, no barrier
    case 2: v = s[t ^ 1]; break;          // ... within a warp, no __syncwarp
    case 3: __syncwarp(); v = s[t ^ 1]; break;
    case 4: v = __shfl_xor_sync(FULL_MASK, t, 1); v = s[t ^ 1] + v; break;
    case 5: v = s[(t + 32) % 64]; s[t] = 0; break;  // write-after-read across warps
    case 6: atomicAdd(&s[64], 1); break;            // (s[64] is never written plainly)
    case 7: if (t == 0) s[65] = 5; else atomicAdd(&s[65], 1); break;  // plain write vs atomics
    case 8: s[66] = 1; break;                                          // write-after-write
    case 10: atomicAdd(&out[0], 1); break;
    case 11: if (t == 0) out[0] = b; break;                            // blocks store one word
    case 12: if (t == 0) { if (b == 0) out[0] = 7; else out[i] = out[0]; } break;  // block 1 reads it
    case 13: if (t == 0) { if (b == 0) out[1] = out[0]; else out[0] = 7; } break;  // ... then stores it
    case 14: if (t == 0) { if (b == 0) out[0] = 7; else atomicAdd(&out[0], 1); } break;
    case 20: v = *reinterpret_cast<const int*>(reinterpret_cast<const char*>(out) + 2); break;
    case 21: v = *reinterpret_cast<const int*>(reinterpret_cast<const char*>(s) + 2); break;
    case 22: {  // an ldmatrix row 2 bytes off its 16-byte alignment
        unsigned r[1];
        ldmatrix_x1(r, reinterpret_cast<const char*>(s) + 16 * (t % 4) + 2);
        v = (int)r[0];
        break;
    }
    default: break;
    }
    if (mode < 10 || mode >= 20) out[i] = v;
}
