// A small tensor-core GEMM: C = A * B^T with bf16 inputs and f32 accumulation, one 32x16 output
// tile per block of 4 warps, each warp one m16n8k16 mma per 16-wide k step. A proof of the
// machinery (cp.async, ldmatrix, mma.sync), not a fast GEMM.
#include "mma.cuh"

// c: [M, N] f32 out; a: [M, K] bf16 row-major; bt: [N, K] bf16 (B transposed, row-major).
// Block (128, 1, 1); grid (ceil(N / 16), ceil(M / 32), 1). Pointers 16-byte aligned.
extern "C" __global__ void __launch_bounds__(128) gemm_fwd_bf16(float* __restrict__ c,
                                                                const __nv_bfloat16* __restrict__ a,
                                                                const __nv_bfloat16* __restrict__ bt, int M,
                                                                int N, int K) {
    // Rows padded to 24 elements (48 bytes): every row start stays 16-byte aligned for ldmatrix.
    __shared__ __align__(16) __nv_bfloat16 as[32][24];
    __shared__ __align__(16) __nv_bfloat16 bs[16][24];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int m0 = blockIdx.y * 32, n0 = blockIdx.x * 16;
    const int wm = (warp / 2) * 16, wn = (warp % 2) * 8;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += 16) {
        // 96 chunks of 8 elements: 64 for the A tile, 32 for the B tile.
        if (tid < 96) {
            const bool is_a = tid < 64;
            const int chunk = is_a ? tid : tid - 64, r = chunk / 2, kk = (chunk % 2) * 8;
            const int row = (is_a ? m0 : n0) + r, rows = is_a ? M : N, k = k0 + kk;
            const __nv_bfloat16* src = (is_a ? a : bt) + (long long)row * K + k;
            __nv_bfloat16* dst = is_a ? &as[r][kk] : &bs[r][kk];
            if (row < rows && k + 8 <= K && K % 8 == 0) {
                cp_async_16(dst, src);
            } else {
                for (int j = 0; j < 8; j++)
                    dst[j] = (row < rows && k + j < K) ? src[j] : __float2bfloat16(0.0f);
            }
        }
        cp_async_wait_all();
        __syncthreads();
        unsigned af[4], bf[2];
        ldmatrix_x4(af, &as[wm + lane % 16][(lane / 16) * 8]);
        ldmatrix_x2(bf, &bs[wn + lane % 8][((lane / 8) % 2) * 8]);
        mma_m16n8k16_bf16(acc, af, bf, acc);
        __syncthreads();
    }
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; r++) {
        const int row = m0 + wm + g + (r / 2) * 8, col = n0 + wn + 2 * t + (r % 2);
        if (row < M && col < N) c[(long long)row * N + col] = acc[r];
    }
}
