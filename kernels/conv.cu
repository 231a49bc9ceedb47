// Convolution (no bias, square kernel, any stride and padding) in NHWC as a tiled implicit GEMM:
// a block of 256 threads computes one 64x64 output tile, staging 64x16 slices of both operands
// in shared memory (the im2col matrix is never stored); each thread owns 4x4 outputs.
// Activations are T (f32 or bf16), weights and accumulation f32. Weights are [k, k, ci, co].
//
// Dense blocks without copies: an input may be a channel prefix of a wider buffer (row stride
// x_rs >= c) and an output a channel slice of one (the pointer at its first channel, row stride
// y_rs). An optional per-channel BN + ReLU (scale, shift) is applied to the input as it is read;
// padding stays 0 (it pads the BN-ReLU output, as the CPU reference does).
#include "consts.cuh"
#include "dtype.cuh"

// Output tile TM x TN (GEMM M x N), reduction slice TK, shared rows of SROW floats (kernels/consts.cuh).
// Dynamic shared bytes of every conv launch: two [TK][SROW] f32 tiles, CONV_SMEM.
constexpr int TM = CONV_TILE, TN = CONV_TILE, TK = CONV_TK, SROW = CONV_SROW;
constexpr int CONV_SMEM = 2 * TK * SROW * 4;
static_assert(CONV_THREADS == (TM / 4) * (TN / 4), "each thread computes a 4x4 piece of the tile");

// The input as the forward reads it: x: [n, h, w, c] (row stride x_rs); the conv's output
// is [n, ho, wo, co].
template <class T>
struct ConvIn {
    const T* x;
    int x_rs, h, w, c, ho, wo, k, stride, pad;
    const float* scale;  // [c] or null
    const float* shift;  // [c] or null
};

// Element (pixel, (ky, kx, ci)) of the im2col matrix: pre(x) where the window reads, 0 in padding.
template <class T>
__device__ __forceinline__ float im2col_at(const ConvIn<T>& p, int pixel, int kidx) {
    const int ox = pixel % p.wo, t = pixel / p.wo, oy = t % p.ho, b = t / p.ho;
    const int ci = kidx % p.c, t2 = kidx / p.c, kx = t2 % p.k, ky = t2 / p.k;
    const int iy = oy * p.stride + ky - p.pad, ix = ox * p.stride + kx - p.pad;
    if (iy < 0 || ix < 0 || iy >= p.h || ix >= p.w) return 0.0f;
    float v = ld(p.x + ((long long)(b * p.h + iy) * p.w + ix) * p.x_rs + ci);
    if (p.scale) v = bn_relu(v, p.scale[ci], p.shift[ci]);
    return v;
}

// Forward GEMM: A(m = output pixel, k = (ky, kx, ci)) = im2col; B(k, n = co) = wt[k, n].
template <class T>
struct FwdProb {
    ConvIn<T> in;
    const float* wt;
    int co;
};
template <class T>
__device__ __forceinline__ float load_a(const FwdProb<T>& p, int m, int k) { return im2col_at(p.in, m, k); }
template <class T>
__device__ __forceinline__ float load_b(const FwdProb<T>& p, int k, int n) {
    return p.wt[(long long)k * p.co + n];
}

// Backward-data GEMM: A(m = input pixel, k = (ky, kx, o)) = the dy entry that tap reaches (0 when
// none: off the stride grid or outside); B(k, n = ci) = wt[ky, kx, ci, o].
template <class T>
struct DataProb {
    const T* dy;
    const float* wt;
    int dy_rs, h, w, ci, ho, wo, co, k, stride, pad;
};
template <class T>
__device__ __forceinline__ float load_a(const DataProb<T>& p, int m, int kidx) {
    const int ix = m % p.w, t = m / p.w, iy = t % p.h, b = t / p.h;
    const int o = kidx % p.co, t2 = kidx / p.co, kx = t2 % p.k, ky = t2 / p.k;
    const int ty = iy + p.pad - ky, tx = ix + p.pad - kx;
    if (ty < 0 || tx < 0 || ty % p.stride != 0 || tx % p.stride != 0) return 0.0f;
    const int oy = ty / p.stride, ox = tx / p.stride;
    if (oy >= p.ho || ox >= p.wo) return 0.0f;
    return ld(p.dy + ((long long)(b * p.ho + oy) * p.wo + ox) * p.dy_rs + o);
}
template <class T>
__device__ __forceinline__ float load_b(const DataProb<T>& p, int kidx, int n) {
    const int o = kidx % p.co, tap = kidx / p.co;
    return p.wt[((long long)tap * p.ci + n) * p.co + o];
}

// Backward-weight GEMM: A(m = (ky, kx, ci), k = output pixel) = im2col transposed;
// B(k, n = o) = dy[pixel, o].
template <class T>
struct WeightProb {
    ConvIn<T> in;
    const T* dy;
    int dy_rs;
};
template <class T>
__device__ __forceinline__ float load_a(const WeightProb<T>& p, int m, int k) { return im2col_at(p.in, k, m); }
template <class T>
__device__ __forceinline__ float load_b(const WeightProb<T>& p, int k, int n) {
    return ld(p.dy + (long long)k * p.dy_rs + n);
}

// acc[i][j] += sum over k in [k_lo, k_hi) of A(m0 + ty + 16i, k) B(k, n0 + tx + 16j) for the
// block's tile (rows < M, columns < N; others read as 0). A_M_FAST / B_N_FAST: which index is
// contiguous in memory, so that neighbouring threads load neighbouring addresses.
template <bool A_M_FAST, bool B_N_FAST, class P>
__device__ void igemm_tile(const P& p, int M, int N, int m0, int n0, int k_lo, int k_hi, float acc[4][4]) {
    MURA_DYN_SHARED(float, smem);
    float* as = smem;              // [TK][SROW]: as[kk * SROW + mm]
    float* bs = smem + TK * SROW;  // [TK][SROW]: bs[kk * SROW + nn]
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    for (int k0 = k_lo; k0 < k_hi; k0 += TK) {
        for (int e = tid; e < TM * TK; e += CONV_THREADS) {
            const int mm = A_M_FAST ? e % TM : e / TK, kk = A_M_FAST ? e / TM : e % TK;
            const int m = m0 + mm, k = k0 + kk;
            as[kk * SROW + mm] = (m < M && k < k_hi) ? load_a(p, m, k) : 0.0f;
        }
        for (int e = tid; e < TN * TK; e += CONV_THREADS) {
            const int nn = B_N_FAST ? e % TN : e / TK, kk = B_N_FAST ? e / TN : e % TK;
            const int n = n0 + nn, k = k0 + kk;
            bs[kk * SROW + nn] = (n < N && k < k_hi) ? load_b(p, k, n) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < TK; kk++) {
            float av[4], bv[4];
            for (int i = 0; i < 4; i++) av[i] = as[kk * SROW + ty + 16 * i];
            for (int j = 0; j < 4; j++) bv[j] = bs[kk * SROW + tx + 16 * j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
}

// y: [n, ho, wo, co] T, row stride y_rs (a channel slice); x: [n, h, w, c] T, row stride x_rs (a
// channel prefix); wt: [k, k, c, co] f32; scale, shift: [c] f32 or both null (fused BN + ReLU on x).
// Grid (ceil(n*ho*wo / 64), ceil(co / 64)), block 256, CONV_SMEM dynamic shared bytes.
template <class T>
__device__ void conv_fwd(T* y, int y_rs, const T* x, int x_rs, const float* wt, const float* scale,
                         const float* shift, int n, int h, int w, int c, int co, int k, int stride, int pad) {
    const int ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
    const FwdProb<T> p{{x, x_rs, h, w, c, ho, wo, k, stride, pad, scale, shift}, wt, co};
    const int M = n * ho * wo, m0 = blockIdx.x * TM, n0 = blockIdx.y * TN;
    float acc[4][4] = {};
    igemm_tile<false, true>(p, M, co, m0, n0, 0, k * k * c, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            const int m = m0 + ty + 16 * i, o = n0 + tx + 16 * j;
            if (m < M && o < co) st(y + (long long)m * y_rs + o, acc[i][j]);
        }
}

// dx: [n, h, w, ci] T, row stride dx_rs, overwritten (accumulate = 0) or added to; dy: [n, ho, wo, co]
// T, row stride dy_rs; wt: [k, k, ci, co] f32. Grid (ceil(n*h*w / 64), ceil(ci / 64)), block 256,
// CONV_SMEM dynamic shared bytes.
template <class T>
__device__ void conv_bwd_data(T* dx, int dx_rs, int accumulate, const T* dy, int dy_rs, const float* wt,
                              int n, int h, int w, int ci, int co, int k, int stride, int pad) {
    const int ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
    const DataProb<T> p{dy, wt, dy_rs, h, w, ci, ho, wo, co, k, stride, pad};
    const int M = n * h * w, m0 = blockIdx.x * TM, n0 = blockIdx.y * TN;
    float acc[4][4] = {};
    igemm_tile<false, false>(p, M, ci, m0, n0, 0, k * k * co, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            const int m = m0 + ty + 16 * i, c = n0 + tx + 16 * j;
            if (m < M && c < ci) {
                T* out = dx + (long long)m * dx_rs + c;
                st(out, accumulate ? ld(out) + acc[i][j] : acc[i][j]);
            }
        }
}

// dw: [k, k, c, co] f32, added to atomically: the output pixels are split over gridDim.z chunks of
// split_len (a multiple of 16); x, scale, shift as in the forward; dy: [n, ho, wo, co] T, row stride
// dy_rs. Grid (ceil(k*k*c / 64), ceil(co / 64), ceil(n*ho*wo / split_len)), block 256, CONV_SMEM bytes.
template <class T>
__device__ void conv_bwd_weight(float* dw, const T* x, int x_rs, const float* scale, const float* shift,
                                const T* dy, int dy_rs, int n, int h, int w, int c, int co, int k, int stride,
                                int pad, int split_len) {
    const int ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
    const WeightProb<T> p{{x, x_rs, h, w, c, ho, wo, k, stride, pad, scale, shift}, dy, dy_rs};
    const int M = k * k * c, pixels = n * ho * wo, m0 = blockIdx.x * TM, n0 = blockIdx.y * TN;
    const int k_lo = blockIdx.z * split_len, k_hi = min(pixels, k_lo + split_len);
    float acc[4][4] = {};
    igemm_tile<true, true>(p, M, co, m0, n0, k_lo, k_hi, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            const int m = m0 + ty + 16 * i, o = n0 + tx + 16 * j;
            if (m < M && o < co && k_lo < k_hi) atomicAdd(dw + (long long)m * co + o, acc[i][j]);
        }
}

// The entry points, f32 and bf16 storage (kernels/dtype.cuh): conv_<pass>_f32 and conv_<pass>_bf16.
MURA_F32_BF16_BOUNDED(CONV_THREADS, conv_fwd,
                      (T* __restrict__ y, int y_rs, const T* __restrict__ x, int x_rs, const float* __restrict__ wt,
                       const float* scale, const float* shift, int n, int h, int w, int c, int co, int k, int stride,
                       int pad),
                      conv_fwd<T>(y, y_rs, x, x_rs, wt, scale, shift, n, h, w, c, co, k, stride, pad));
MURA_F32_BF16_BOUNDED(CONV_THREADS, conv_bwd_data,
                      (T* dx, int dx_rs, int accumulate, const T* __restrict__ dy, int dy_rs,
                       const float* __restrict__ wt, int n, int h, int w, int ci, int co, int k, int stride, int pad),
                      conv_bwd_data<T>(dx, dx_rs, accumulate, dy, dy_rs, wt, n, h, w, ci, co, k, stride, pad));
MURA_F32_BF16_BOUNDED(CONV_THREADS, conv_bwd_weight,
                      (float* dw, const T* __restrict__ x, int x_rs, const float* scale, const float* shift,
                       const T* __restrict__ dy, int dy_rs, int n, int h, int w, int c, int co, int k, int stride,
                       int pad, int split_len),
                      conv_bwd_weight<T>(dw, x, x_rs, scale, shift, dy, dy_rs, n, h, w, c, co, k, stride, pad,
                                         split_len));
