// A BN's per-channel steps done by the last block of the launch that sums their inputs, shared by
// kernels/bn.cu and kernels/conv_tc.cu (docs/architecture.md, "The launch plan").
#pragma once
#include "common.cuh"
#include "consts.cuh"

// The BN whose coefficients a launch finishes: C channels. gamma, beta: [C] f32; mean, var: [C] f32
// batch statistics (or running ones, in eval); run_mean, run_var: [C] f32 running statistics,
// updated with momentum 0.1 (var times unbias), or null (eval); scale, shift: [C] f32 out;
// done: one unsigned, zero, left zero (the launch's count of finished blocks), or null: no such BN.
struct CoefStep {
    const float* gamma;
    const float* beta;
    float* mean;
    float* var;
    float* run_mean;
    float* run_var;
    float unbias;
    int C;
    float* scale;
    float* shift;
    unsigned* done;
};

// Channel c's batch statistics from its sums over R rows: mean = s / R and the biased variance
// max(ss / R - mean^2, 0), in double, into mean, var: [C] f32.
__device__ __forceinline__ void bn_stats_from_sums(double s, double ss, int R, float* mean, float* var, int c) {
    const double m = s / R, v = ss / R - m * m;
    mean[c] = (float)m;
    var[c] = (float)(v > 0.0 ? v : 0.0);
}

// Where a BN backward's reductions go once merged: coef: [2, C] f32 out (a = mean of dz, b = mean of
// dz * (x - mean) / (var + eps)); dgamma, dbeta: [C] f32, added to; var: [C] f32. With alpha not null
// (alpha, beta: [C] f32), the input gradient's per-channel terms scale * (-a - (x - mean) * b) =
// alpha + beta * x are added to alpha, beta instead (deferred) and coef is not written. done: one unsigned, zero, left zero.
struct BwdMerge {
    float* coef;
    float* dgamma;
    float* dbeta;
    const float* var;
    float* alpha;
    float* beta;
    unsigned* done;
};

// Channel c's BN backward step (of C channels) from its reductions over R rows, sdz = sum dz and
// sdx = sum dz * (x - mean), into m, in double: dgamma += sdx / sqrt(var + eps), dbeta += sdz, then
// the coefficients or, deferred, the terms with scale: [C] f32 as the factor; mean: [C] f32.
__device__ __forceinline__ void bn_bwd_channel(const BwdMerge& m, int C, int R, const float* scale,
                                               const float* mean, double sdz, double sdx, int c) {
    const double is = 1.0 / sqrt((double)(m.var[c] + (float)BN_EPS));
    m.dgamma[c] += (float)(sdx * is);
    m.dbeta[c] += (float)sdz;
    const double a = sdz / R, b = sdx * is * is / R;
    if (m.alpha) {
        const double s = scale[c];
        m.alpha[c] += (float)(-s * (a - mean[c] * b));
        m.beta[c] += (float)(-s * b);
    } else {
        m.coef[c] = (float)a;
        m.coef[C + c] = (float)b;
    }
}

// Channel c's coefficients: scale = gamma / sqrt(var + eps), shift = beta - mean * scale, and the
// running statistics' update.
__device__ __forceinline__ void bn_coef_channel(const CoefStep& s, int c) {
    const float eps = (float)BN_EPS, momentum = (float)BN_MOMENTUM;
    const float mean = s.mean[c], var = s.var[c];
    const float k = s.gamma[c] / sqrtf(var + eps);
    s.scale[c] = k;
    s.shift[c] = s.beta[c] - mean * k;
    if (s.run_mean) {
        const float keep = 1.0f - momentum;
        s.run_mean[c] = keep * s.run_mean[c] + momentum * mean;
        s.run_var[c] = keep * s.run_var[c] + momentum * var * s.unbias;
    }
}

// Whether this block is the last of the launch's `blocks` that get here, counted in done (one
// unsigned, zero, reset to zero by that block). Every thread of each of those blocks must call it
// (a split-K convolution: the blocks that finish a tile), after its share of device-scope
// atomics on the sums the last block then takes back with atomicExch: they are fenced before the
// count (CUDA Programming Guide, "Memory Fence Functions"). The flag lives in the first word of the
// dynamic shared memory, free after the barrier here.
__device__ __forceinline__ bool last_block(unsigned* done, unsigned blocks) {
    MURA_DYN_SHARED(int, last);
    __threadfence();
    __syncthreads();
    const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    if (tid == 0) {
        *last = atomicAdd(done, 1u) == blocks - 1;
        if (*last) atomicExch(done, 0u);
    }
    __syncthreads();
    const bool is_last = *last;
    if (is_last) __threadfence();
    return is_last;
}
