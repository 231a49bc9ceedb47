// Batch norm over NHWC activations (a channel slice of a wider buffer): statistics, coefficients,
// the fused apply, and the backward's reductions and per-element terms. Eps and momentum are
// PyTorch's (kernels/consts.cuh).
#include "bn_step.cuh"
#include "consts.cuh"
#include "dtype.cuh"

constexpr float EPS = (float)BN_EPS, MOMENTUM = (float)BN_MOMENTUM;
static_assert(EPS == 1e-5f && MOMENTUM == 0.1f, "PyTorch's BatchNorm defaults, rounded to f32 once");

// ---- Training and eval batch norm over a channel slice of an NHWC buffer -------------------------
// Statistics: rows are split into P chunks; each chunk's mean and sum of squared deviations
// (two passes, in cache) are merged with Chan's formula, so long columns neither lose precision
// nor serialise on one block.

// The first row of chunk p of R rows in P chunks: p * R / P, in 32 bits (the launcher checks
// that P * R fits in them: bn::chunks).
__device__ __forceinline__ int chunk_start(int p, int R, int P) {
    return (int)((unsigned)p * (unsigned)R / (unsigned)P);
}

// Channel c's mean and biased variance into mean, var: [C] f32 from part: [2, P, C] (chunk means
// and M2 over R rows, taken back with atomicExch, which leaves them zero), merged with Chan's
// formula in double.
__device__ __forceinline__ void bn_stats_merge(float* part, int R, int C, int P, float* mean, float* var, int c) {
    double n = 0.0, m = 0.0, m2 = 0.0;
    for (int p = 0; p < P; p++) {
        const double nb = (double)(chunk_start(p + 1, R, P) - chunk_start(p, R, P));
        const double mb = atomicExch(part + (long long)p * C + c, 0.0f);
        const double m2b = atomicExch(part + (long long)(P + p) * C + c, 0.0f);
        if (nb == 0.0) continue;
        const double tot = n + nb, delta = mb - m;
        m += delta * nb / tot;
        m2 += m2b + delta * delta * n * nb / tot;
        n = tot;
    }
    mean[c] = (float)m;
    var[c] = (float)(m2 / (double)R);
}

// part: [2, P, C] f32 scratch (chunk mean, then chunk M2, written with atomicExch, read back and
// zeroed by the launch's last block); x: [R, C] T, row stride rs. Chunk p is rows [p*R/P, (p+1)*R/P).
// The launch's last block (counted in step.done) merges the chunks into step.mean, step.var (biased
// variance; bn_stats_merge) and, when step.gamma is not null, finishes the coefficients of that BN
// (step: a CoefStep of C channels, kernels/bn_step.cuh). Block (32, 8); grid (ceil(C / 32), P);
// 2*8*33*4 dynamic shared bytes.
template <class T>
__device__ void bn_stats_part(float* part, const T* x, int R, int C, int rs, CoefStep step) {
    MURA_DYN_SHARED(float, red);  // [8][33], then mu: [32]
    float* mu = red + 8 * 33;
    const int c = blockIdx.x * 32 + threadIdx.x, P = gridDim.y, p = blockIdx.y;
    const int r0 = chunk_start(p, R, P), r1 = chunk_start(p + 1, R, P);
    const bool valid = c < C;
    float s = 0.0f;
    if (valid)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) s += ld(x + (long long)r * rs + c);
    red[threadIdx.y * 33 + threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0) {
        float t = 0.0f;
        for (int k = 0; k < 8; k++) t += red[k * 33 + threadIdx.x];
        mu[threadIdx.x] = r1 > r0 ? t / (float)(r1 - r0) : 0.0f;
    }
    __syncthreads();
    const float m = mu[threadIdx.x];
    float q = 0.0f;
    if (valid)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            const float d = ld(x + (long long)r * rs + c) - m;
            q += d * d;
        }
    __syncthreads();
    red[threadIdx.y * 33 + threadIdx.x] = q;
    __syncthreads();
    if (threadIdx.y == 0 && valid) {
        float t = 0.0f;
        for (int k = 0; k < 8; k++) t += red[k * 33 + threadIdx.x];
        atomicExch(part + (long long)p * C + c, m);
        atomicExch(part + (long long)(P + p) * C + c, t);
    }
    if (!last_block(step.done, gridDim.x * gridDim.y)) return;
    for (int ch = threadIdx.y * 32 + threadIdx.x; ch < C; ch += 32 * 8) {
        bn_stats_merge(part, R, C, P, step.mean, step.var, ch);
        if (step.gamma) bn_coef_channel(step, ch);
    }
}

// scale, shift: [C] f32 out: scale = gamma / sqrt(var + eps), shift = beta - mean * scale.
// gamma, beta, mean, var: [C] f32. run_mean, run_var: [C] f32 running statistics, updated with
// momentum 0.1 from this batch (var times unbias = R / (R - 1)), or null (eval). When sums is not
// null, the statistics of the last P channels are not in mean, var yet: sums: [2, P] f32 holds
// their sum and sum of squares over R rows, as a producing convolution's epilogue accumulated
// them (kernels/conv_tc.cu); they are turned into mean = s / R and var = max(ss / R - mean^2, 0)
// (in double), stored into mean, var, and zeroed, ready for the next epilogue. One thread a
// channel.
extern "C" __global__ void bn_coeffs_fwd_f32(float* __restrict__ scale, float* __restrict__ shift,
                                             const float* __restrict__ gamma, const float* __restrict__ beta,
                                             float* __restrict__ mean, float* __restrict__ var, float* run_mean,
                                             float* run_var, float unbias, int C, float* __restrict__ sums, int R,
                                             int P) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) {
        const int j = c - (C - P);
        if (sums && j >= 0) {
            bn_stats_from_sums(sums[j], sums[P + j], R, mean, var, c);
            sums[j] = 0.0f;
            sums[P + j] = 0.0f;
        }
        const CoefStep step{gamma, beta, mean, var, run_mean, run_var, unbias, C, scale, shift, nullptr};
        bn_coef_channel(step, c);
    }
}

// y = x * scale + shift (then ReLU when relu != 0). y: [R, C] T, row stride y_rs; x: [R, C] T,
// row stride x_rs; scale, shift: [C] f32. Grid-stride over R*C.
template <class T>
__device__ void bn_apply(T* y, int y_rs, const T* x, int x_rs, int R, int C, const float* scale,
                       const float* shift, int relu) {
    GRID_STRIDE32(i, R * C) {
        const int r = (int)(i / C), c = (int)(i % C);
        const float xv = ld(x + (long long)r * x_rs + c);
        const float v = relu ? bn_relu(xv, scale[c], shift[c]) : xv * scale[c] + shift[c];
        st(y + (long long)r * y_rs + c, v);
    }
}

// The gradient of the BN output after the optional ReLU mask: 0 where the forward clipped.
__device__ __forceinline__ float bn_dz(float x, float d, float s, float t, int relu) {
    return relu && x * s + t <= 0.0f ? 0.0f : d;
}

// Channel c's merge of part: [2, P, C] (sum dz, sum dz * (x - mean) per chunk of the R rows, taken
// back with atomicExch, which leaves them zero) into m, in double. scale, mean: [C] f32.
__device__ __forceinline__ void bn_bwd_merge(float* part, int R, int C, int P, const float* scale,
                                             const float* mean, const BwdMerge& m, int c) {
    double sdz = 0.0, sdx = 0.0;
    for (int p = 0; p < P; p++) {
        sdz += atomicExch(part + (long long)p * C + c, 0.0f);
        sdx += atomicExch(part + (long long)(P + p) * C + c, 0.0f);
    }
    bn_bwd_channel(m, C, R, scale, mean, sdz, sdx, c);
}

// A BN backward's reductions: partial sums over chunk p of the rows into part: [2, P, C] f32 scratch
// (sum dz, then sum dz * (x - mean); written with atomicExch), which the launch's last block (counted
// in m.done) merges into m (bn_bwd_merge). x: [R, C] T (row stride x_rs); dy: [R, C] T (row stride
// dy_rs); scale, shift, mean: [C] f32. Block (32, 8); grid (ceil(C / 32), P); 8*33*4 dynamic shared
// bytes.
template <class T>
__device__ void bn_bwd_part(float* part, const T* x, int x_rs, const T* dy, int dy_rs, int R, int C,
                            const float* scale, const float* shift, const float* mean, int relu, BwdMerge m) {
    MURA_DYN_SHARED(float, red);  // [8][33]
    const int c = blockIdx.x * 32 + threadIdx.x, P = gridDim.y, p = blockIdx.y;
    const int r0 = chunk_start(p, R, P), r1 = chunk_start(p + 1, R, P);
    const bool valid = c < C;
    float s0 = 0.0f, s1 = 0.0f;
    if (valid) {
        const float s = scale[c], t = shift[c], m = mean[c];
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            const float xv = ld(x + (long long)r * x_rs + c);
            const float d = bn_dz(xv, ld(dy + (long long)r * dy_rs + c), s, t, relu);
            s0 += d;
            s1 += d * (xv - m);
        }
    }
    red[threadIdx.y * 33 + threadIdx.x] = s0;
    __syncthreads();
    float t0 = 0.0f;
    if (threadIdx.y == 0)
        for (int k = 0; k < 8; k++) t0 += red[k * 33 + threadIdx.x];
    __syncthreads();
    red[threadIdx.y * 33 + threadIdx.x] = s1;
    __syncthreads();
    if (threadIdx.y == 0 && valid) {
        float t1 = 0.0f;
        for (int k = 0; k < 8; k++) t1 += red[k * 33 + threadIdx.x];
        atomicExch(part + (long long)p * C + c, t0);
        atomicExch(part + (long long)(P + p) * C + c, t1);
    }
    if (!last_block(m.done, gridDim.x * gridDim.y)) return;
    for (int ch = threadIdx.y * 32 + threadIdx.x; ch < C; ch += 32 * 8)
        bn_bwd_merge(part, R, C, P, scale, mean, m, ch);
}

// dx (+)= scale * (dz - a - (x - mean) * b) in training, scale * dz in eval. dx: [R, C] T, row
// stride dx_rs, overwritten (accumulate = 0) or added to (a dense block's shared gradient buffer);
// x, dy as in bn_bwd_part; coef: [2, C] from bn_bwd_merge (unused in eval). Grid-stride over R*C.
template <class T>
__device__ void bn_bwd_dx(T* dx, int dx_rs, int accumulate, const T* x, int x_rs, const T* dy, int dy_rs,
                          int R, int C, const float* scale, const float* shift, const float* mean,
                          const float* coef, int relu, int train) {
    GRID_STRIDE32(i, R * C) {
        const int r = (int)(i / C), c = (int)(i % C);
        const float xv = ld(x + (long long)r * x_rs + c);
        const float d = bn_dz(xv, ld(dy + (long long)r * dy_rs + c), scale[c], shift[c], relu);
        const float g = train ? scale[c] * (d - coef[c] - (xv - mean[c]) * coef[C + c]) : scale[c] * d;
        T* out = dx + (long long)r * dx_rs + c;
        st(out, accumulate ? ld(out) + g : g);
    }
}

// dx += alpha + beta * x: the deferred BN-backward terms (bn_bwd_merge; bn_step_last in
// kernels/conv_tc.cu), once a channel's gradient has every consumer's. dx: [R, C] T (row stride
// dx_rs); x: [R, C] T (row stride x_rs), the channel's stored (pre-BN) values; alpha, beta: [C]
// f32. Grid-stride over R*C.
template <class T>
__device__ void bn_grad_fix(T* dx, int dx_rs, const T* x, int x_rs, int R, int C, const float* alpha,
                            const float* beta) {
    GRID_STRIDE32(i, R * C) {
        const int r = (int)(i / C), c = (int)(i % C);
        T* out = dx + (long long)r * dx_rs + c;
        st(out, ld(out) + alpha[c] + beta[c] * ld(x + (long long)r * x_rs + c));
    }
}

// The entry points, f32 and bf16 storage (kernels/dtype.cuh): bn_<step>_f32 and bn_<step>_bf16.
MURA_F32_BF16(bn_stats_part_fwd,
              (float* part, const T* __restrict__ x, int R, int C, int rs, const float* __restrict__ gamma,
               const float* __restrict__ beta, float* mean, float* var, float* run_mean, float* run_var,
               float unbias, float* scale, float* shift, unsigned* done),
              bn_stats_part<T>(part, x, R, C, rs,
                               CoefStep{gamma, beta, mean, var, run_mean, run_var, unbias, C, scale, shift, done}));
MURA_F32_BF16(bn_apply_fwd,
              (T* __restrict__ y, int y_rs, const T* __restrict__ x, int x_rs, int R, int C,
               const float* __restrict__ scale, const float* __restrict__ shift, int relu),
              bn_apply<T>(y, y_rs, x, x_rs, R, C, scale, shift, relu));
MURA_F32_BF16(bn_bwd_part,
              (float* part, const T* __restrict__ x, int x_rs, const T* __restrict__ dy, int dy_rs, int R, int C,
               const float* __restrict__ scale, const float* __restrict__ shift, const float* __restrict__ mean,
               int relu, float* coef, float* dgamma, float* dbeta, const float* __restrict__ var, float* alpha,
               float* beta, unsigned* done),
              bn_bwd_part<T>(part, x, x_rs, dy, dy_rs, R, C, scale, shift, mean, relu,
                             BwdMerge{coef, dgamma, dbeta, var, alpha, beta, done}));
MURA_F32_BF16(bn_bwd_dx,
              (T* dx, int dx_rs, int accumulate, const T* __restrict__ x, int x_rs, const T* __restrict__ dy,
               int dy_rs, int R, int C, const float* __restrict__ scale, const float* __restrict__ shift,
               const float* __restrict__ mean, const float* __restrict__ coef, int relu, int train),
              bn_bwd_dx<T>(dx, dx_rs, accumulate, x, x_rs, dy, dy_rs, R, C, scale, shift, mean, coef, relu, train));
MURA_F32_BF16(bn_grad_fix_bwd,
              (T* dx, int dx_rs, const T* __restrict__ x, int x_rs, int R, int C, const float* __restrict__ alpha,
               const float* __restrict__ beta),
              bn_grad_fix<T>(dx, dx_rs, x, x_rs, R, C, alpha, beta));
