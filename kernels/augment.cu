// Training-time augmentation on the device, the same arithmetic as the CPU's
// data::loader::augment_image: horizontal flip, rotation about the centre, bilinear resample with
// half-pixel centres (outside the source: black), ImageNet normalisation into 3 channels.
// The CPU walks each output row adding the source step once per pixel; so does this kernel (one
// thread per output row), with __fmul_rn / __fadd_rn so that no multiply-add is fused, for results
// identical to the CPU's bit for bit.
#include "dtype.cuh"

// out: [n, S, S, 3] T (S = out_size), normalised NHWC; src: [n, src_size, src_size] u8 store images;
// steps: [n, 4] f32 per image (dux, dvx, duy, dvy): the source step per output column and row, as the
// CPU computes them from the flip, angle and scale; norm: a0 a1 a2 b0 b1 b2 (out = val * a + b).
template <class T>
__device__ void augment(T* out, const unsigned char* src, const float* steps, int n, int src_size, int out_size,
                        float a0, float a1, float a2, float b0, float b1, float b2) {
    const int rows = n * out_size;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows; i += gridDim.x * blockDim.x) {
        const int img = i / out_size, y = i % out_size;
        const float dux = steps[img * 4], dvx = steps[img * 4 + 1];
        const float duy = steps[img * 4 + 2], dvy = steps[img * 4 + 3];
        const unsigned char* s = src + (long long)img * src_size * src_size;
        const float half_out = (float)out_size / 2.0f;
        const float c_src = __fadd_rn((float)src_size / 2.0f, -0.5f);
        const float lo = -0.5f, hi = __fadd_rn((float)src_size, -0.5f), last = (float)(src_size - 1);
        const float cy = __fadd_rn(__fadd_rn((float)y, 0.5f), -half_out);
        const float cx0 = __fadd_rn(0.5f, -half_out);
        float u = __fadd_rn(__fadd_rn(c_src, __fmul_rn(dux, cx0)), __fmul_rn(duy, cy));
        float v = __fadd_rn(__fadd_rn(c_src, __fmul_rn(dvx, cx0)), __fmul_rn(dvy, cy));
        T* o = out + (long long)i * out_size * 3;
        for (int x = 0; x < out_size; x++) {
            float val = 0.0f;
            if (u >= lo && u <= hi && v >= lo && v <= hi) {
                const float uc = fminf(fmaxf(u, 0.0f), last), vc = fminf(fmaxf(v, 0.0f), last);
                const int x0 = (int)uc, y0 = (int)vc;
                const float fx = __fadd_rn(uc, -(float)x0), fy = __fadd_rn(vc, -(float)y0);
                // The right and lower neighbours, or the pixel itself on the last column / row.
                const int p = y0 * src_size + x0;
                const int dx = x0 + 1 < src_size ? 1 : 0, dy = y0 + 1 < src_size ? src_size : 0;
                const float p00 = s[p], p01 = s[p + dx], p10 = s[p + dy], p11 = s[p + dy + dx];
                const float top = __fadd_rn(p00, __fmul_rn(__fadd_rn(p01, -p00), fx));
                const float bot = __fadd_rn(p10, __fmul_rn(__fadd_rn(p11, -p10), fx));
                val = __fadd_rn(top, __fmul_rn(__fadd_rn(bot, -top), fy));
            }
            st(o + x * 3, __fadd_rn(__fmul_rn(val, a0), b0));
            st(o + x * 3 + 1, __fadd_rn(__fmul_rn(val, a1), b1));
            st(o + x * 3 + 2, __fadd_rn(__fmul_rn(val, a2), b2));
            u = __fadd_rn(u, dux);
            v = __fadd_rn(v, dvx);
        }
    }
}

// The entry points, f32 and bf16 output (kernels/dtype.cuh): augment_fwd_f32 and augment_fwd_bf16.
// One thread per output row.
MURA_F32_BF16(augment_fwd,
              (T* __restrict__ out, const unsigned char* __restrict__ src, const float* __restrict__ steps, int n,
               int src_size, int out_size, float a0, float a1, float a2, float b0, float b1, float b2),
              augment<T>(out, src, steps, n, src_size, out_size, a0, a1, a2, b0, b1, b2));
