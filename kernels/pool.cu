// Pooling: max pool 3x3/2 pad 1 (stem, with norm0 + relu0 fused into the read), avg pool 2x2/2
// (transitions, with the transition's BN + ReLU fused into the read) and the global average pool of
// the head, forward and backward. NHWC; one thread per output element in grid-stride loops (these
// ops move little data next to the convolutions).
#include "dtype.cuh"

// pre(x) of channel j: the BN + ReLU (bn_relu, a NaN passing) when scale is not null, else x.
template <class T>
__device__ __forceinline__ float pre_at(const T* p, const float* scale, const float* shift, int j) {
    const float v = ld(p);
    return scale ? bn_relu(v, scale[j], shift[j]) : v;
}

// The window of output (oy, ox) of a 3x3/2 pad-1 max pool of pre(x): rows [2oy-1, 2oy+1] clipped
// to [0, h). Returns the flat input pixel (iy * w + ix) holding the first maximum of channel j, or
// its first NaN: a NaN anywhere in the window is the maximum (as in PyTorch and the CPU reference).
template <class T>
__device__ int maxpool_argmax(const T* xi, int h, int w, int c, int j, int oy, int ox, const float* scale,
                              const float* shift) {
    float best = 0.0f;
    int at = -1;
    for (int iy = max(2 * oy - 1, 0); iy < min(2 * oy + 2, h); iy++)
        for (int ix = max(2 * ox - 1, 0); ix < min(2 * ox + 2, w); ix++) {
            const float v = pre_at(xi + (long long)(iy * w + ix) * c + j, scale, shift, j);
            if (at < 0 || v > best || (is_nan(v) && !is_nan(best))) {
                best = v;
                at = iy * w + ix;
            }
        }
    return at;
}

// y: [n, ho, wo, c] T, row stride y_rs = max pool of pre(x); x: [n, h, w, c] T; scale, shift: [c]
// f32 (pre = BN + ReLU, the stem's norm0 + relu0, never stored) or null (pre = identity).
// ho = (h - 1) / 2 + 1, same for wo.
template <class T>
__device__ void maxpool_fwd(T* y, int y_rs, const T* x, int n, int h, int w, int c, const float* scale,
                            const float* shift) {
    const int ho = (h - 1) / 2 + 1, wo = (w - 1) / 2 + 1;
    GRID_STRIDE32(i, n * ho * wo * c) {
        const unsigned r = i / c;
        const int j = (int)(i % c), ox = (int)(r % wo), oy = (int)(r / wo % ho), b = (int)(r / (wo * ho));
        const T* xi = x + (long long)b * h * w * c;
        const int at = maxpool_argmax(xi, h, w, c, j, oy, ox, scale, shift);
        st(y + (long long)r * y_rs + j, pre_at(xi + (long long)at * c + j, scale, shift, j));
    }
}

// dx: [n, h, w, c] T, overwritten: the gradient of pre(x) (the caller applies the BN + ReLU's
// backward): each output's gradient goes to its window's first maximum (gathered: each input
// sums the outputs whose maximum it is). x, scale, shift: the forward's; dy: [n, ho, wo, c] T,
// row stride dy_rs.
template <class T>
__device__ void maxpool_bwd(T* dx, const T* x, const T* dy, int dy_rs, int n, int h, int w, int c, const float* scale,
                            const float* shift) {
    const int ho = (h - 1) / 2 + 1, wo = (w - 1) / 2 + 1;
    GRID_STRIDE32(i, n * h * w * c) {
        const unsigned p = i / c;
        const int j = (int)(i % c), ix = (int)(p % w), iy = (int)(p / w % h), b = (int)(p / (w * h));
        const T* xi = x + (long long)b * h * w * c;
        float g = 0.0f;
        for (int oy = max((iy - 1) / 2, 0); oy <= min((iy + 1) / 2, ho - 1); oy++)
            for (int ox = max((ix - 1) / 2, 0); ox <= min((ix + 1) / 2, wo - 1); ox++)
                if (maxpool_argmax(xi, h, w, c, j, oy, ox, scale, shift) == iy * w + ix)
                    g += ld(dy + ((long long)(b * ho + oy) * wo + ox) * dy_rs + j);
        st(dx + i, g);
    }
}

// y: [n, h/2, w/2, c] T, row stride y_rs = mean of each 2x2 window of pre(x); x: [n, h, w, c] T,
// row stride x_rs; scale, shift: [c] f32 (pre = BN + ReLU) or null (pre = identity).
template <class T>
__device__ void avgpool_fwd(T* y, int y_rs, const T* x, int x_rs, int n, int h, int w, int c,
                            const float* scale, const float* shift) {
    const int ho = h / 2, wo = w / 2;
    GRID_STRIDE32(i, n * ho * wo * c) {
        const unsigned r = i / c;
        const int j = (int)(i % c), ox = (int)(r % wo), oy = (int)(r / wo % ho), b = (int)(r / (wo * ho));
        const long long p = ((long long)b * h + 2 * oy) * w + 2 * ox;
        const long long taps[4] = {p, p + 1, p + w, p + w + 1};
        float s = 0.0f;
        for (int t = 0; t < 4; t++) {
            float v = ld(x + taps[t] * x_rs + j);
            if (scale) v = bn_relu(v, scale[j], shift[j]);
            s += v;
        }
        st(y + (long long)r * y_rs + j, s * 0.25f);
    }
}

// dx: [n, h, w, c] T, overwritten (pixels the floor drops get 0); dy: [n, h/2, w/2, c] T, row
// stride dy_rs. (The backward of the BN + ReLU is the caller's: this is the pool alone.)
template <class T>
__device__ void avgpool_bwd(T* dx, const T* dy, int dy_rs, int n, int h, int w, int c) {
    const int ho = h / 2, wo = w / 2;
    GRID_STRIDE32(i, n * h * w * c) {
        const unsigned p = i / c;
        const int j = (int)(i % c), ix = (int)(p % w), iy = (int)(p / w % h), b = (int)(p / (w * h));
        float g = 0.0f;
        if (iy / 2 < ho && ix / 2 < wo) g = 0.25f * ld(dy + ((long long)(b * ho + iy / 2) * wo + ix / 2) * dy_rs + j);
        st(dx + i, g);
    }
}

// feat: [n, c] f32 = mean over the hw pixels of x: [n, hw, c] T.
template <class T>
__device__ void gap_fwd(float* feat, const T* x, int n, int hw, int c) {
    GRID_STRIDE32(i, n * c) {
        const int j = (int)(i % c), b = (int)(i / c);
        float s = 0.0f;
        for (int p = 0; p < hw; p++) s += ld(x + ((long long)b * hw + p) * c + j);
        feat[i] = s / (float)hw;
    }
}

// dx: [n, hw, c] T, overwritten = dfeat / hw broadcast; dfeat: [n, c] f32.
template <class T>
__device__ void gap_bwd(T* dx, const float* dfeat, int n, int hw, int c) {
    GRID_STRIDE32(i, n * hw * c) {
        const unsigned b = i / c / hw;
        const int j = (int)(i % c);
        st(dx + i, dfeat[(long long)b * c + j] / (float)hw);
    }
}

// The entry points, f32 and bf16 storage (kernels/dtype.cuh): <pool>_f32 and <pool>_bf16.
MURA_F32_BF16(maxpool_fwd,
              (T* __restrict__ y, int y_rs, const T* __restrict__ x, int n, int h, int w, int c, const float* scale,
               const float* shift),
              maxpool_fwd<T>(y, y_rs, x, n, h, w, c, scale, shift));
MURA_F32_BF16(maxpool_bwd,
              (T* __restrict__ dx, const T* __restrict__ x, const T* __restrict__ dy, int dy_rs, int n, int h, int w,
               int c, const float* scale, const float* shift),
              maxpool_bwd<T>(dx, x, dy, dy_rs, n, h, w, c, scale, shift));
MURA_F32_BF16(avgpool_fwd,
              (T* __restrict__ y, int y_rs, const T* __restrict__ x, int x_rs, int n, int h, int w, int c,
               const float* scale, const float* shift),
              avgpool_fwd<T>(y, y_rs, x, x_rs, n, h, w, c, scale, shift));
MURA_F32_BF16(avgpool_bwd, (T* __restrict__ dx, const T* __restrict__ dy, int dy_rs, int n, int h, int w, int c),
              avgpool_bwd<T>(dx, dy, dy_rs, n, h, w, c));
MURA_F32_BF16(gap_fwd, (float* __restrict__ feat, const T* __restrict__ x, int n, int hw, int c),
              gap_fwd<T>(feat, x, n, hw, c));
MURA_F32_BF16(gap_bwd, (T* __restrict__ dx, const float* __restrict__ dfeat, int n, int hw, int c),
              gap_bwd<T>(dx, dfeat, n, hw, c));
