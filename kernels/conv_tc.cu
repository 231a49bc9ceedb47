// Tensor-core implicit-GEMM convolutions for DenseNet's dense layers: 1x1/1 pad 0 and 3x3/1 pad 1,
// NHWC, bf16 activations and weights, f32 accumulation (mma.sync m16n8k16 through kernels/mma.cuh);
// and, on the same tile engine, the forward and weight gradient of any other window (convkxk_*, at
// the end: the stem's 7x7/2 pad 3 on 3 channels).
// The BN + ReLU in front of each convolution is applied while its input tile is loaded (forward and
// weight gradient) and its ReLU mask recomputed from the pre-BN input in the data gradient's
// epilogue, so the BN-ReLU output is never stored. Inputs may be channel prefixes (row stride rs),
// outputs channel slices; any sizes (not multiples of the tiles).
//
// The three GEMMs (P = n*h*w pixels, T = k*k taps, C = input channels, O = output channels):
//   forward        y[P, O]      = im2col(pre(x))[P, T*C] . w[T*C, O]       A k-contiguous, B n-contiguous
//   backward-data  dx[P, C]     = im2col'(dy)[P, T*O]   . w'[T*O, C]       A k-contiguous, B k-contiguous
//                  (im2col' reads the flipped taps; w'((t, o), c) = w[t, c, o])
//   backward-wt    dw[T*C, O]  += im2col(pre(x))^T[T*C, P] . dy[P, O]      A m-contiguous, B n-contiguous
// Each operand tile is staged in shared memory in its memory order ([outer][inner + 8] bf16, rows
// 16-byte aligned and 80/272-byte strided so ldmatrix is conflict-free) and read with ldmatrix or
// ldmatrix.trans. K advances in slices of BK = 32 through shared-memory stages (2; 3 for the data
// gradients): the raw operand chunks (weights, dy: no transform) go by cp.async straight into a
// later stage, the transformed or irregular ones (BN + ReLU, padding, sizes not multiples of 8)
// through registers, loaded before the current stage's mmas and stored after them, so global
// latency overlaps the tensor cores (see tc_tile).
//
// Tile shapes (per block; BK = 32), chosen for DenseNet's O = 128 bottleneck and O = 32 growth:
//   T128: 128x128, 8 warps as 2x4, warp tile 64x32 (4x4 mma tiles, 64 f32 accumulators/thread).
//         Per K-slice: 128*128*32*2 = 1.05 MFLOP for (128+128)*32*2 = 16 KB of operands from
//         global/L2 (64 FLOP/B); shared stages * (A + B) * 2 B: 37.9 KB forward (2 stages),
//         61.4 KB backward-data (3 stages, both operands k-contiguous and by cp.async), 34.8 KB
//         backward-weight (2). 123-128 registers (__launch_bounds__(WIDE_THREADS, 2)) -> 2 blocks (16
//         warps) per SM on sm_80/sm_90, <= 123 KB shared (sm_86/89 fit one 61 KB block).
//         Used by: 1x1 forward (N = O = 128, K = C = 64..1k+), 1x1 backward-data (N = C, K = 128:
//         only 4 K-slices, so prologue/epilogue weigh), 3x3 backward-data (N = C = 128,
//         K = 9*32), 1x1 backward-weight (M = C, N = 128, K = pixels, split).
//   T32:  128x32, 4 warps as 4x1, warp tile 32x32 (2x4 mma tiles, 32 accumulators/thread).
//         Per K-slice: 128*32*32*2 = 262 KFLOP for (128+32)*32*2 = 10 KB (26 FLOP/B: N = 32 caps
//         the reuse of A); shared 25.6 KB forward, 22.5 KB backward-weight; 121-127 registers ->
//         4 blocks (16 warps) per SM. Used by the 3x3 forward (N = O = 32, K = 9*128 = 36
//         K-slices) and 3x3 backward-weight (M = 9*C, N = 32, K = pixels, split).
// Split-K (gridDim.z chunks of split_len pixels, a multiple of BK) for both weight gradients, whose
// K = n*h*w is huge and M*N small; f32 partial sums are added with atomicAdd
// (src/gpu/ops/conv_tc.rs aims at a full wave of the device's SMs, chunks of >= 512 pixels unless
// the grid would not reach one block per SM). The
// forwards split K = k*k*c the same way when their grid is too small to fill the GPU
// (DenseNet-169's blocks 3 and 4 at batch 64: 98 and 25 row tiles for 132 SMs;
// src/gpu/ops/conv_tc.rs aims at 2 (T128) or 4 (T32) blocks per SM of the device, chunks of >= 4
// K-slices, shorter only where the grid would not reach one block per SM), and so do the data
// gradients, into an f32 workspace: the last block of each tile to add its partial sums takes them
// back and runs the epilogue (split_fixup), so a split costs no launch of its own.
// To tune on the GPU: BM 64 vs 128 for the 3x3 forward at 7x7/14x14 (few pixels per image);
// stages per kernel (the data gradients' 3 against 2 and 4; the forwards' weights by cp.async
// would gain from more only if their BN operand's register loads were not the wait); the per-chunk division
// kidx / c of the im2col operands (a running (tap, channel) counter would do); bf16x2 epilogue
// stores; swizzled shared rows instead of +8 padding; 64x128 tiles for the 1x1 backward-data.
#include "bn_step.cuh"
#include "consts.cuh"
#include "mma.cuh"

typedef __nv_bfloat16 bf16;

// The K-slice, stages and block tiles live in kernels/consts.cuh (the Rust launchers size grids and
// shared memory from the same values). The data gradients' operands (dy, weights) both go by
// cp.async: TC_BWD_DATA_STAGES = 3 stages = 61,440 bytes a block (the CUDA driver opts in beyond
// 48 KiB); the other kernels keep TC_STAGES = 2 (their BN + ReLU operand goes through registers,
// which more stages would not help).
constexpr int BK = TC_BK;
// A tile's template arguments <BM, BN, WM, WN>, and its threads (one warp per WM x WN).
#define WIDE TC_WIDE_BM, TC_WIDE_BN, TC_WIDE_WM, TC_WIDE_WN
#define NARROW TC_NARROW_BM, TC_NARROW_BN, TC_NARROW_WM, TC_NARROW_WN
#define ANY TC_ANY_BM, TC_ANY_BN, TC_ANY_WM, TC_ANY_WN
constexpr int WIDE_THREADS = TC_WIDE_WM * TC_WIDE_WN * 32;
constexpr int NARROW_THREADS = TC_NARROW_WM * TC_NARROW_WN * 32;
constexpr int ANY_THREADS = TC_ANY_WM * TC_ANY_WN * 32;

// Loop unrolling for nvcc (the emulator's C++ compiler does not know the pragma).
#ifdef MURA_EMU
#define UNROLL
#else
#define UNROLL _Pragma("unroll")
#endif

// 8 bf16 (16 bytes): the unit of every operand load.
struct __align__(16) Chunk {
    unsigned u[4];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15) == 0; }

__device__ __forceinline__ float bnrelu(float v, const float* scale, const float* shift, int c) {
    return scale ? bn_relu(v, scale[c], shift[c]) : v;
}

// An im2col operand over x: [n, h, w, c] (row stride rs), tap window KS x KS with pad KS/2 and
// stride 1, optional BN + ReLU (scale, shift: [c] f32); flip: taps mirrored (backward-data's dy).
// Element (pixel p, kidx = (tap, ci)).
struct Gather {
    const bf16* x;
    const float* scale;
    const float* shift;
    int rs, n, h, w, c, ks, flip;
    bool vec;  // 16-byte loads possible: x aligned, rs and c multiples of 8
};

__device__ __forceinline__ Gather make_gather(const bf16* x, int rs, int n, int h, int w, int c, int ks,
                                              const float* scale, const float* shift, int flip) {
    return Gather{x, scale, shift, rs, n, h, w, c, ks, flip, aligned16(x) && rs % 8 == 0 && c % 8 == 0};
}

// An output pixel (an operand row) decomposed once: its index p (-1 past the end) and
// yx = oy << 16 | ox. The stagers keep the rows that stay fixed across K-slices, so the divisions
// run once per tile.
struct Pix {
    int p, yx;
};

__device__ __forceinline__ Pix pix_of(const Gather& g, int p) {
    if (p >= g.n * g.h * g.w) return Pix{-1, 0};
    if (g.ks == 1) return Pix{p, 0};
    const int t = p / g.w;
    return Pix{p, (t % g.h) << 16 | (p - t * g.w)};
}

// The source pixel of output pixel q through tap `tap` (< ks*ks), or -1 in the padding.
__device__ __forceinline__ long long gather_src(const Gather& g, Pix q, int tap) {
    if (q.p < 0) return -1;
    if (g.ks == 1) return q.p;
    int ky = tap / g.ks, kx = tap % g.ks;
    if (g.flip) ky = g.ks - 1 - ky, kx = g.ks - 1 - kx;
    const int dy = ky - g.ks / 2, dx = kx - g.ks / 2, iy = (q.yx >> 16) + dy, ix = (q.yx & 0xffff) + dx;
    if (iy < 0 || ix < 0 || iy >= g.h || ix >= g.w) return -1;
    return (long long)q.p + dy * g.w + dx;
}

// The source pixel of output pixel p through tap `tap`, or -1 in the padding (or past the end).
__device__ __forceinline__ long long gather_pixel(const Gather& g, int p, int tap) {
    return tap >= g.ks * g.ks ? -1 : gather_src(g, pix_of(g, p), tap);
}

__device__ __forceinline__ float gather_at(const Gather& g, int p, int kidx) {
    const long long src = gather_pixel(g, p, kidx / g.c);
    if (src < 0) return 0.0f;
    const int ci = kidx % g.c;
    return bnrelu(__bfloat162float(g.x[src * g.rs + ci]), g.scale, g.shift, ci);
}

// A (tapped) dense operand: element (r, kidx = (tap, j)) = p[(tap * rows + r) * ld + j] for r < rows,
// j < cols, tap < taps. Plain matrices have taps = 1.
struct Dense {
    const bf16* p;
    int rows, cols, ld, taps;
    bool vec;
};

__device__ __forceinline__ Dense make_dense(const bf16* p, int rows, int cols, int ld, int taps) {
    return Dense{p, rows, cols, ld, taps, aligned16(p) && ld % 8 == 0 && cols % 8 == 0};
}

__device__ __forceinline__ float dense_at(const Dense& d, int r, int kidx) {
    const int tap = kidx / d.cols, j = kidx % d.cols;
    if (r >= d.rows || tap >= d.taps) return 0.0f;
    return __bfloat162float(d.p[((long long)tap * d.rows + r) * d.ld + j]);
}

// An im2col operand of any square window, stride and padding (the stem: 7x7/2 pad 3 on 3 channels):
// x: [n, h, w, c] (row stride rs), output grid ho x wo, optional BN + ReLU. Always loaded element
// by element (the stem's 3 channels make no 16-byte chunks). Element (output pixel p, kidx =
// (ky, kx, ci)); 0 in the padding, past the last pixel and past k*k*c.
struct Strided {
    const bf16* x;
    const float* scale;
    const float* shift;
    int rs, n, h, w, c, ks, stride, pad, ho, wo;
};

__device__ __forceinline__ Strided make_strided(const bf16* x, int rs, int n, int h, int w, int c, int ks, int stride,
                                                int pad, const float* scale, const float* shift) {
    return Strided{x, scale, shift, rs, n, h, w, c, ks, stride, pad, (h + 2 * pad - ks) / stride + 1,
                   (w + 2 * pad - ks) / stride + 1};
}

__device__ __forceinline__ float strided_at(const Strided& g, int p, int kidx) {
    if (p >= g.n * g.ho * g.wo || kidx >= g.ks * g.ks * g.c) return 0.0f;
    const int ox = p % g.wo, t = p / g.wo, oy = t % g.ho, b = t / g.ho;
    const int ci = kidx % g.c, tap = kidx / g.c, ky = tap / g.ks, kx = tap % g.ks;
    const int iy = oy * g.stride + ky - g.pad, ix = ox * g.stride + kx - g.pad;
    if (iy < 0 || ix < 0 || iy >= g.h || ix >= g.w) return 0.0f;
    return bnrelu(__bfloat162float(g.x[((long long)(b * g.h + iy) * g.w + ix) * g.rs + ci]), g.scale, g.shift, ci);
}

// Where the 8 elements (outer, inner .. inner + 7) come from (inner % 8 == 0): returns 0 (all
// zero), 1 (*src: 8 contiguous bf16, 16-byte aligned, BN channel *ch of the first) or 2 (element
// by element). Gather: outer = pixel q, inner = kidx; Dense: outer = row q.p, inner = kidx.
__device__ __forceinline__ int chunk_src(const Gather& g, Pix q, int kidx, const bf16** src, int* ch) {
    const int tap = kidx / g.c;
    if (tap >= g.ks * g.ks) return 0;
    if (!g.vec) return 2;
    const long long s = gather_src(g, q, tap);
    if (s < 0) return 0;
    *ch = kidx % g.c;
    *src = g.x + s * g.rs + *ch;
    return 1;
}
__device__ __forceinline__ Pix pix_of(const Dense&, int r) { return Pix{r, 0}; }
__device__ __forceinline__ int chunk_src(const Dense& d, Pix q, int kidx, const bf16** src, int* ch) {
    const int tap = kidx / d.cols, r = q.p;
    if (r >= d.rows || tap >= d.taps) return 0;
    if (!d.vec) return 2;
    *ch = 0;
    *src = d.p + ((long long)tap * d.rows + r) * d.ld + kidx % d.cols;
    return 1;
}
__device__ __forceinline__ float elem_at(const Gather& g, int outer, int inner) { return gather_at(g, outer, inner); }
__device__ __forceinline__ Pix pix_of(const Strided&, int p) { return Pix{p, 0}; }
__device__ __forceinline__ int chunk_src(const Strided& g, Pix, int kidx, const bf16**, int*) {
    return kidx >= g.ks * g.ks * g.c ? 0 : 2;
}
__device__ __forceinline__ float elem_at(const Strided& g, int outer, int inner) { return strided_at(g, outer, inner); }
__device__ __forceinline__ const float* op_scale(const Strided& g) { return g.scale; }
__device__ __forceinline__ const float* op_shift(const Strided& g) { return g.shift; }
__device__ __forceinline__ float elem_at(const Dense& d, int outer, int inner) { return dense_at(d, outer, inner); }
__device__ __forceinline__ const float* op_scale(const Gather& g) { return g.scale; }
__device__ __forceinline__ const float* op_scale(const Dense&) { return nullptr; }
__device__ __forceinline__ const float* op_shift(const Gather& g) { return g.shift; }
__device__ __forceinline__ const float* op_shift(const Dense&) { return nullptr; }

// Two floats rounded to bf16 (nearest even) in one register, `lo` in the low half.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
#ifdef MURA_EMU
    unsigned u;
    memcpy(&u, &v, 4);
    return u;
#else
    return *reinterpret_cast<unsigned*>(&v);
#endif
}
__device__ __forceinline__ float lo_of(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi_of(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

// One operand's share of a [OUTER][INNER] stage tile, 8-element chunks spread over THREADS threads.
// `fetch` starts the loads of the stage at (o0, i0) (outer coordinates >= o_hi read as 0): raw
// aligned chunks by cp.async into `dst`, the others into registers, which `commit` stores.
template <int OUTER, int INNER, int THREADS>
struct Stager {
    static constexpr int CHUNKS = OUTER * INNER / 8, CPT = (CHUNKS + THREADS - 1) / THREADS, ROW = INNER + 8;
    Chunk v[CPT];
    unsigned in_regs = 0;  // (set by every stage_fetch before its stage_commit)
    Pix rows[CPT];  // the chunks' outer coordinates, when they are the same for every K-slice
};

// Decomposes the outer coordinates o0 + ... of this thread's chunks once (for stage_fetch<true>).
template <int OUTER, int INNER, int THREADS, class Op>
__device__ __forceinline__ void stage_rows(Stager<OUTER, INNER, THREADS>& s, const Op& op, int o0) {
    typedef Stager<OUTER, INNER, THREADS> S;
UNROLL
    for (int c = 0; c < S::CPT; c++) s.rows[c] = pix_of(op, o0 + (threadIdx.x + c * THREADS) / (INNER / 8));
}

template <bool FIXED_ROWS, int OUTER, int INNER, int THREADS, class Op>
__device__ __forceinline__ void stage_fetch(Stager<OUTER, INNER, THREADS>& s, const Op& op, int o0, int i0, int o_hi,
                                            bf16* dst) {
    typedef Stager<OUTER, INNER, THREADS> S;
    const float* scale = op_scale(op);
    const float* shift = op_shift(op);
    s.in_regs = 0;
UNROLL
    for (int c = 0; c < S::CPT; c++) {
        const int e = threadIdx.x + c * THREADS;
        if (S::CHUNKS % THREADS != 0 && e >= S::CHUNKS) break;
        const int oo = e / (INNER / 8), ii = (e % (INNER / 8)) * 8, outer = o0 + oo, inner = i0 + ii;
        const bf16* src = nullptr;
        int ch = 0;
        const int how = outer < o_hi ? chunk_src(op, FIXED_ROWS ? s.rows[c] : pix_of(op, outer), inner, &src, &ch) : 0;
        if (how == 1 && !scale) {
            cp_async_16(dst + oo * S::ROW + ii, src);
            continue;
        }
        s.in_regs |= 1u << c;
        if (how == 0) {
            s.v[c] = Chunk{{0u, 0u, 0u, 0u}};
        } else if (how == 1) {
            const Chunk raw = *reinterpret_cast<const Chunk*>(src);
UNROLL
            for (int j = 0; j < 4; j++) {
                const float a = bnrelu(lo_of(raw.u[j]), scale, shift, ch + 2 * j);
                const float b = bnrelu(hi_of(raw.u[j]), scale, shift, ch + 2 * j + 1);
                s.v[c].u[j] = pack2(a, b);
            }
        } else {
UNROLL
            for (int j = 0; j < 4; j++)
                s.v[c].u[j] = pack2(elem_at(op, outer, inner + 2 * j), elem_at(op, outer, inner + 2 * j + 1));
        }
    }
}

template <int OUTER, int INNER, int THREADS>
__device__ __forceinline__ void stage_commit(const Stager<OUTER, INNER, THREADS>& s, bf16* dst) {
    typedef Stager<OUTER, INNER, THREADS> S;
UNROLL
    for (int c = 0; c < S::CPT; c++) {
        if (!(s.in_regs & (1u << c))) continue;
        const int e = threadIdx.x + c * THREADS;
        const int oo = e / (INNER / 8), ii = (e % (INNER / 8)) * 8;
        *reinterpret_cast<Chunk*>(dst + oo * S::ROW + ii) = s.v[c];
    }
}

// The block tile engine: acc += A[m0 .. m0+BM, k_lo .. k_hi] . B[k_lo .. k_hi, n0 .. n0+BN] with
// WM x WN warps, through STAGES shared-memory stages. A_KC: A's inner (contiguous) index is k
// (outer m), else m (outer k); B_KC: B's inner index is k (outer n), else n (outer k). CACHE_A
// (with A_KC): decompose A's rows once per tile instead of once per K-slice (a few registers
// more). Shared memory: Smem<...>::BYTES.
//
// Pipeline: K-slice kt + STAGES - 1 is loaded while slice kt is multiplied, into the stage slice
// kt - 1 used. Its raw chunks go by cp.async, one commit group per slice, waited for STAGES - 1
// slices later (cp.async.wait_group STAGES - 2), so with STAGES > 2 their global latency spans
// several slices' mmas; its transformed chunks (BN + ReLU, padding, odd sizes) are loaded into
// registers before the mmas and stored after them. One barrier per slice: after it, slice kt's
// stage is complete (every thread waited for its own copies) and every thread is done with slice
// kt - 1's, which the loads issued next overwrite.
template <int BM, int BN, int WM, int WN>
struct Tile {
    static constexpr int THREADS = WM * WN * 32, WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NT = WTN / 8;
};

template <int BM, int BN, bool A_KC, bool B_KC, int STAGES = 2>
struct Smem {
    static constexpr int A_ELEMS = A_KC ? BM * (BK + 8) : BK * (BM + 8);
    static constexpr int B_ELEMS = B_KC ? BN * (BK + 8) : BK * (BN + 8);
    static constexpr int BYTES = STAGES * (A_ELEMS + B_ELEMS) * 2;
};

template <int BM, int BN, int WM, int WN, bool A_KC, bool B_KC, bool CACHE_A, int STAGES, class OA, class OB>
__device__ __forceinline__ void tc_tile(const OA& a, const OB& b, int m0, int n0, int k_lo, int k_hi,
                                        float acc[Tile<BM, BN, WM, WN>::MT][Tile<BM, BN, WM, WN>::NT][4]) {
    static_assert(STAGES >= 2, "the pipeline needs two stages at least");
    typedef Tile<BM, BN, WM, WN> TL;
    typedef Smem<BM, BN, A_KC, B_KC, STAGES> SM;
    constexpr int AO = A_KC ? BM : BK, AI = A_KC ? BK : BM, BO = B_KC ? BN : BK, BI = B_KC ? BK : BN;
    MURA_DYN_SHARED(bf16, smem);
    bf16* const as = smem;                        // STAGES stages of SM::A_ELEMS
    bf16* const bs = smem + STAGES * SM::A_ELEMS;  // STAGES stages of SM::B_ELEMS
    Stager<AO, AI, TL::THREADS> sa;
    Stager<BO, BI, TL::THREADS> sb;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp / WN) * TL::WTM, wn = (warp % WN) * TL::WTN;
    const int big = 0x7fffffff;
    // Stage coordinates of K-slice k0: (outer origin, inner origin, outer bound).
#define A_AT(k0) (A_KC ? m0 : (k0)), (A_KC ? (k0) : m0), (A_KC ? big : k_hi)
#define B_AT(k0) (B_KC ? n0 : (k0)), (B_KC ? (k0) : n0), (B_KC ? big : k_hi)
    const int nk = (k_hi - k_lo + BK - 1) / BK;
    if (CACHE_A) stage_rows(sa, a, m0);  // (B is never a Gather: its rows cost nothing to recompute)
    // Prologue: slices 0 .. STAGES - 2 into stages 0 .. STAGES - 2, a commit group each.
UNROLL
    for (int st = 0; st < STAGES - 1; st++) {
        if (st < nk) {
            const int k0 = k_lo + st * BK;
            stage_fetch<CACHE_A>(sa, a, A_AT(k0), as + st * SM::A_ELEMS);
            stage_fetch<false>(sb, b, B_AT(k0), bs + st * SM::B_ELEMS);
            stage_commit(sa, as + st * SM::A_ELEMS);
            stage_commit(sb, bs + st * SM::B_ELEMS);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_async_wait_group<STAGES - 2>();  // this thread's copies of slice kt have landed
        __syncthreads();
        const int ld = kt + STAGES - 1;  // the slice loaded now, into slice kt - 1's stage
        const bool more = ld < nk;
        bf16* const a_ld = as + (ld % STAGES) * SM::A_ELEMS;
        bf16* const b_ld = bs + (ld % STAGES) * SM::B_ELEMS;
        if (more) {
            const int k1 = k_lo + ld * BK;
            stage_fetch<CACHE_A>(sa, a, A_AT(k1), a_ld);
            stage_fetch<false>(sb, b, B_AT(k1), b_ld);
        }
        cp_async_commit();  // (empty past the last slice: the group count stays one per slice)
        const bf16* A = as + (kt % STAGES) * SM::A_ELEMS;
        const bf16* B = bs + (kt % STAGES) * SM::B_ELEMS;
UNROLL
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[TL::MT][4], bfr[TL::NT][2];
UNROLL
            for (int mt = 0; mt < TL::MT; mt++) {
                const int r = wm + mt * 16;
                if (A_KC)
                    ldmatrix_x4(af[mt], A + (r + lane % 16) * (BK + 8) + kk + (lane / 16) * 8);
                else
                    ldmatrix_x4_trans(af[mt],
                                      A + (kk + (lane / 16) * 8 + lane % 8) * (BM + 8) + r + ((lane / 8) % 2) * 8);
            }
UNROLL
            for (int nt = 0; nt < TL::NT; nt += 2) {
                const int c = wn + nt * 8, j = lane / 8;
                unsigned r4[4];
                if (B_KC)
                    ldmatrix_x4(r4, B + (c + (j / 2) * 8 + lane % 8) * (BK + 8) + kk + (j % 2) * 8);
                else
                    ldmatrix_x4_trans(r4, B + (kk + (j % 2) * 8 + lane % 8) * (BN + 8) + c + (j / 2) * 8);
                bfr[nt][0] = r4[0], bfr[nt][1] = r4[1], bfr[nt + 1][0] = r4[2], bfr[nt + 1][1] = r4[3];
            }
UNROLL
            for (int mt = 0; mt < TL::MT; mt++)
UNROLL
                for (int nt = 0; nt < TL::NT; nt++) mma_m16n8k16_bf16(acc[mt][nt], af[mt], bfr[nt], acc[mt][nt]);
        }
        if (more) {
            stage_commit(sa, a_ld);
            stage_commit(sb, b_ld);
        }
    }
    cp_async_wait_group<0>();  // (only empty groups are left)
#undef A_AT
#undef B_AT
}

// Output coordinates of accumulator acc[mt][nt][r] of this thread: (row, column) in the block tile.
template <int BM, int BN, int WM, int WN>
__device__ __forceinline__ void acc_coords(int mt, int nt, int r, int* row, int* col) {
    typedef Tile<BM, BN, WM, WN> TL;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    *row = (warp / WN) * TL::WTM + mt * 16 + lane / 4 + (r / 2) * 8;
    *col = (warp % WN) * TL::WTN + nt * 8 + 2 * (lane % 4) + r % 2;
}

// A split-K block's partial sums: dst[(m0 + row) * ncols + n0 + col] += acc for the tile's outputs
// inside [0, nrows) x [0, ncols) (dst: [nrows, ncols] f32).
template <int BM, int BN, int WM, int WN>
__device__ __forceinline__ void add_tile(const float acc[Tile<BM, BN, WM, WN>::MT][Tile<BM, BN, WM, WN>::NT][4],
                                         float* dst, int m0, int n0, int nrows, int ncols) {
    typedef Tile<BM, BN, WM, WN> TL;
UNROLL
    for (int mt = 0; mt < TL::MT; mt++)
UNROLL
        for (int nt = 0; nt < TL::NT; nt++)
UNROLL
            for (int r = 0; r < 4; r++) {
                int row, col;
                acc_coords<BM, BN, WM, WN>(mt, nt, r, &row, &col);
                row += m0, col += n0;
                if (row < nrows && col < ncols) atomicAdd(dst + (long long)row * ncols + col, acc[mt][nt][r]);
            }
}

// Split-K's fix-up, in the kernel itself: this block's partial tile is added to ws: [nrows, ncols]
// f32 (zero), and the block that adds the last of the tile's gridDim.z partials (counted in tiles:
// [gridDim.x * gridDim.y] unsigned, zero) takes the tile's sums back into acc, leaving ws and its
// counter zero again. Returns true in that block only, which then runs the tile's epilogue as an
// unsplit block would. The partials are device-scope atomics, fenced before the count (CUDA
// Programming Guide, "Memory Fence Functions"), so the last block sees all of them.
template <int BM, int BN, int WM, int WN>
__device__ __forceinline__ bool split_fixup(float acc[Tile<BM, BN, WM, WN>::MT][Tile<BM, BN, WM, WN>::NT][4],
                                            float* ws, unsigned* tiles, int m0, int n0, int nrows, int ncols) {
    typedef Tile<BM, BN, WM, WN> TL;
    // The block's flag in the first word of the stages' shared memory, which the barrier below
    // frees (the tile's mmas are done with it).
    MURA_DYN_SHARED(int, last);
    add_tile<BM, BN, WM, WN>(acc, ws, m0, n0, nrows, ncols);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* count = tiles + blockIdx.y * gridDim.x + blockIdx.x;
        *last = atomicAdd(count, 1u) == gridDim.z - 1;
        if (*last) atomicExch(count, 0u);
    }
    __syncthreads();
    if (!*last) return false;
    __threadfence();
UNROLL
    for (int mt = 0; mt < TL::MT; mt++)
UNROLL
        for (int nt = 0; nt < TL::NT; nt++)
UNROLL
            for (int r = 0; r < 4; r++) {
                int row, col;
                acc_coords<BM, BN, WM, WN>(mt, nt, r, &row, &col);
                row += m0, col += n0;
                const bool in = row < nrows && col < ncols;
                acc[mt][nt][r] = in ? atomicExch(ws + (long long)row * ncols + col, 0.0f) : 0.0f;
            }
    return true;
}

// Per-column sums of a warp's outputs in one 8-column mma tile: s[j][q] is this thread's sum over
// its rows of moment q of the tile's column 2*(lane%4) + j, which is column col0 + that of dst:
// [2, ld] f32; the warp's sums are added for columns < ncols. The whole warp must call it.
__device__ __forceinline__ void add_column_sums(float s[2][2], float* dst, int ld, int col0, int ncols) {
    const int lane = threadIdx.x % 32;
UNROLL
    for (int j = 0; j < 2; j++)
UNROLL
        for (int q = 0; q < 2; q++) {
            float v = s[j][q];
            v += __shfl_xor_sync(FULL_MASK, v, 4);
            v += __shfl_xor_sync(FULL_MASK, v, 8);
            v += __shfl_xor_sync(FULL_MASK, v, 16);
            const int col = col0 + 2 * lane + j;
            if (lane < 4 && col < ncols) atomicAdd(dst + q * ld + col, v);
        }
}

// The BN that reads a forward's output next, whose coefficients the forward's last block finishes
// (a launch of its own, bn_coeffs_fwd_f32 in kernels/bn.cu, did it before): a CoefStep
// (kernels/bn_step.cuh) of C channels, the last co of which are the forward's output, their batch
// statistics in the sums the epilogues added up; the first C - co final in mean, var; the last co
// written here from the sums (mean = s / R, var = max(ss / R - mean^2, 0), in double).

// The forward's CoefStep, by the launch's last block to finish its epilogue (counted in step.done,
// as bn_step_last counts), taking the sums: [2, co] back with atomicExch, leaving them zero for the
// next epilogue. The same arithmetic as bn_coeffs_fwd_f32 (the same operations in the same order).
__device__ __noinline__ void coef_step_last(float* sums, int co, int R, CoefStep step) {
    // (Split-K: only the block that finishes a tile gets here, one per tile.)
    if (!last_block(step.done, gridDim.x * gridDim.y)) return;
    for (int c = threadIdx.x; c < step.C; c += blockDim.x) {
        const int j = c - (step.C - co);
        if (j >= 0)
            bn_stats_from_sums(atomicExch(sums + j, 0.0f), atomicExch(sums + co + j, 0.0f), R, step.mean,
                               step.var, c);
        bn_coef_channel(step, c);
    }
}

// y: [M, co] bf16 (row stride y_rs) = a[M, K] . wt[K, co] (a: the im2col operand of a forward);
// when stats is not null (stats: [2, co] f32), the per-channel sum and sum of squares of the
// stored y are added to it (the batch statistics of the BN that will read these channels).
// Split-K (ws not null, when M * co is too small a grid to fill the GPU): block z takes the K
// range [z * split_len, ...), and the last block of each tile finishes it (split_fixup; ws:
// [M, co] f32 and tiles: [gridDim.x * gridDim.y] unsigned, zero and left so). ws null: gridDim.z
// is 1. With step.done not null (and stats), the launch also finishes the coefficients of the BN
// that reads y next (coef_step_last).
template <int BM, int BN, int WM, int WN, bool CACHE_A, class OA>
__device__ __forceinline__ void tc_fwd(const OA& a, int M, int K, bf16* y, int y_rs, const bf16* wt, int co,
                                       float* stats, const CoefStep& step, float* ws, unsigned* tiles,
                                       int split_len) {
    typedef Tile<BM, BN, WM, WN> TL;
    const Dense b = make_dense(wt, K, co, co, 1);
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int k_lo = blockIdx.z * split_len, k_hi = min(K, k_lo + split_len);
    float acc[TL::MT][TL::NT][4] = {};
    tc_tile<BM, BN, WM, WN, true, false, CACHE_A, TC_STAGES>(a, b, m0, n0, k_lo, k_hi, acc);
    if (ws && !split_fixup<BM, BN, WM, WN>(acc, ws, tiles, m0, n0, M, co)) return;
UNROLL
    for (int nt = 0; nt < TL::NT; nt++) {
        float sums[2][2] = {};
UNROLL
        for (int mt = 0; mt < TL::MT; mt++)
UNROLL
            for (int r = 0; r < 4; r++) {
                int row, col;
                acc_coords<BM, BN, WM, WN>(mt, nt, r, &row, &col);
                row += m0, col += n0;
                if (row >= M || col >= co) continue;
                const bf16 v = __float2bfloat16(acc[mt][nt][r]);
                y[(long long)row * y_rs + col] = v;
                const float f = __bfloat162float(v);
                sums[r % 2][0] += f;
                sums[r % 2][1] += f * f;
            }
        if (stats) add_column_sums(sums, stats, co, n0 + (threadIdx.x / 32 % WN) * TL::WTN + nt * 8, co);
    }
    if (step.done) coef_step_last(stats, co, M, step);
}

// y: [n, h, w, co] bf16 (row stride y_rs) = conv_KS(pre(x), wt) (KS = 1 or 3, stride 1, pad KS/2).
template <int BM, int BN, int WM, int WN, int KS>
__device__ __forceinline__ void conv_tc_fwd(bf16* y, int y_rs, const bf16* x, int x_rs, const bf16* wt,
                                            const float* scale, const float* shift, int n, int h, int w, int c,
                                            int co, float* stats, const CoefStep& step, float* ws,
                                            unsigned* tiles, int split_len) {
    const Gather a = make_gather(x, x_rs, n, h, w, c, KS, scale, shift, 0);
    tc_fwd<BM, BN, WM, WN, true>(a, n * h * w, KS * KS * c, y, y_rs, wt, co, stats, step, ws, tiles, split_len);
}

// A BN backward's per-channel step, finished by a data-gradient launch that summed its
// reductions red: [2, ci] f32 = (sum g, sum g * x) over its R = n*h*w rows (g: the masked gradient
// of the BN's output, x its input): dgamma += sum g * (x - mean) / sqrt(var + eps), dbeta += sum g,
// where sum g * (x - mean) = sum g * x - mean * sum g; then, with a = sum g / R and
// b = sum g * (x - mean) / (var + eps) / R, either coef: [2, ci] = (a, b), which bn_bwd_dx (kernels/bn.cu)
// applies, or (alpha not null: deferred, post = the BN's scale) alpha += -post * (a - mean * b),
// beta += -post * b, which bn_grad_fix applies. mean, var: [ci] f32; dgamma, dbeta, alpha, beta: [ci]
// f32. The launch's last block to finish its epilogue (counted in done: one unsigned, zero, left
// zero; the reductions are device-scope atomics, fenced before the count, as in split_fixup) does it,
// taking red back with atomicExch, so that red is zero again for the next epilogue. In double, as the
// launches of their own that it replaces did (the same operations in the same order).
__device__ __noinline__ void bn_step_last(float* red, int ci, int R, const float* post, float* coef, float* alpha,
                                          float* beta, float* dgamma, float* dbeta, const float* mean,
                                          const float* var, unsigned* done) {
    if (!last_block(done, gridDim.x * gridDim.y)) return;
    const BwdMerge m{coef, dgamma, dbeta, var, alpha, beta, done};
    for (int c = threadIdx.x; c < ci; c += blockDim.x) {
        const double sdz = atomicExch(red + c, 0.0f);
        const double sdx = (double)atomicExch(red + ci + c, 0.0f) - (double)mean[c] * sdz;
        bn_bwd_channel(m, ci, R, post, mean, sdz, sdx, c);
    }
}

// dx: [n, h, w, ci] bf16 (row stride dx_rs) = post * g, overwritten or added to, where
// g = bf16(mask * (d conv_KS / d input)(dy)) is the gradient of the BN + ReLU's output: mask =
// [x * scale + shift > 0] when scale is not null (x: the pre-BN input, row stride x_rs), else 1;
// post: [ci] f32 per-channel factors, or null for 1. When red is not null (and scale is), the
// per-channel sums of g and of g * x are added to red: [2, ci] f32 (the reductions of that BN's
// backward; with post = the BN's scale and accumulate, dx receives the BN backward's per-element
// term and the rest, affine in x per channel, can be added later). With done not null (and red),
// the launch also finishes that BN backward's per-channel step (bn_step_last). Split-K as in tc_fwd
// (ws: [n*h*w, ci] f32, the reduction over k*k*co in chunks of split_len).
template <int BM, int BN, int WM, int WN, int KS>
__device__ __forceinline__ void conv_tc_bwd_data(bf16* dx, int dx_rs, int accumulate, const bf16* dy, int dy_rs,
                                                 const bf16* wt, const bf16* x, int x_rs, const float* scale,
                                                 const float* shift, int n, int h, int w, int ci, int co,
                                                 float* red, const float* post, float* coef, float* alpha,
                                                 float* beta, float* dgamma, float* dbeta, const float* mean,
                                                 const float* var, unsigned* done, float* ws, unsigned* tiles,
                                                 int split_len) {
    typedef Tile<BM, BN, WM, WN> TL;
    const Gather a = make_gather(dy, dy_rs, n, h, w, co, KS, nullptr, nullptr, 1);
    const Dense b = make_dense(wt, ci, co, co, KS * KS);
    const int M = n * h * w, m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    float acc[TL::MT][TL::NT][4] = {};
    const int K = KS * KS * co, k_lo = blockIdx.z * split_len, k_hi = min(K, k_lo + split_len);
    // No row cache: at the 128-register bound it spills on sm_86/89 (K is only 9 * 32 here anyway).
    tc_tile<BM, BN, WM, WN, true, true, false, TC_BWD_DATA_STAGES>(a, b, m0, n0, k_lo, k_hi, acc);
    if (ws && !split_fixup<BM, BN, WM, WN>(acc, ws, tiles, m0, n0, M, ci)) return;
UNROLL
    for (int nt = 0; nt < TL::NT; nt++) {
        float sums[2][2] = {};
UNROLL
        for (int mt = 0; mt < TL::MT; mt++)
UNROLL
            for (int r = 0; r < 4; r++) {
                int row, col;
                acc_coords<BM, BN, WM, WN>(mt, nt, r, &row, &col);
                row += m0, col += n0;
                if (row >= M || col >= ci) continue;
                float v = acc[mt][nt][r], xv = 0.0f;
                if (scale) {
                    xv = __bfloat162float(x[(long long)row * x_rs + col]);
                    if (xv * scale[col] + shift[col] <= 0.0f) v = 0.0f;
                }
                const float g = __bfloat162float(__float2bfloat16(v)), pg = post ? post[col] * g : g;
                bf16* out = dx + (long long)row * dx_rs + col;
                *out = __float2bfloat16(accumulate ? __bfloat162float(*out) + pg : pg);
                sums[r % 2][0] += g;
                sums[r % 2][1] += g * xv;
            }
        if (red) add_column_sums(sums, red, ci, n0 + (threadIdx.x / 32 % WN) * TL::WTN + nt * 8, ci);
    }
    if (done) bn_step_last(red, ci, M, post, coef, alpha, beta, dgamma, dbeta, mean, var, done);
}

// dw: [M, co] f32 += a^T[M, P] . dy[P, co] over the pixels [z * split_len, ...) (a: the im2col
// operand of the forward, P output pixels by M = k*k*c; dy row stride dy_rs).
template <int BM, int BN, int WM, int WN, class OA>
__device__ __forceinline__ void tc_bwd_weight(float* dw, const OA& a, int P, int M, const bf16* dy, int dy_rs, int co,
                                              int split_len) {
    typedef Tile<BM, BN, WM, WN> TL;
    const Dense b = make_dense(dy, P, co, dy_rs, 1);
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int k_lo = blockIdx.z * split_len, k_hi = min(P, k_lo + split_len);
    float acc[TL::MT][TL::NT][4] = {};
    tc_tile<BM, BN, WM, WN, false, false, false, TC_STAGES>(a, b, m0, n0, k_lo, k_hi, acc);
    if (k_lo < k_hi) add_tile<BM, BN, WM, WN>(acc, dw, m0, n0, M, co);
}

// dw: [KS, KS, c, co] f32 += (d conv_KS / d wt)(pre(x), dy) over pixels [z * split_len, ...).
template <int BM, int BN, int WM, int WN, int KS>
__device__ __forceinline__ void conv_tc_bwd_weight(float* dw, const bf16* x, int x_rs, const float* scale,
                                                   const float* shift, const bf16* dy, int dy_rs, int n, int h,
                                                   int w, int c, int co, int split_len) {
    const Gather a = make_gather(x, x_rs, n, h, w, c, KS, scale, shift, 0);
    tc_bwd_weight<BM, BN, WM, WN>(dw, a, n * h * w, KS * KS * c, dy, dy_rs, co, split_len);
}

// Entry points. Shapes: x: [n, h, w, c] bf16 with row stride x_rs (a channel prefix); y, dy:
// [n, h, w, co] bf16 with row stride y_rs / dy_rs (channel slices); wt: [k, k, c, co] bf16;
// scale, shift: [c] f32, or both null (no BN + ReLU); dw: [k, k, c, co] f32; stats: null or
// [2, co] f32 += per-channel (sum y, sum y^2); red: null or [2, c] f32 += (sum g, sum g * x) of
// the masked data gradient g; post: null or [c] f32 factors of the stored data gradient.
// Dynamic shared bytes: 2 stages of [outer][inner + 8] bf16 per operand (gpu/ops/conv_tc.rs smem).

// gamma ... done: the CoefStep of the BN that reads y next (done null: none; see coef_step_last);
// ws, tiles: null, or [n*h*w, co] f32 partial sums and [gridDim.x * gridDim.y] arrival counts, zero
// (split-K over gridDim.z chunks of split_len, a multiple of 32, of the k*k*c reduction; the last
// block of each tile stores it, see split_fixup).
// Grid (ceil(n*h*w / 128), ceil(co / 128), splits), block 256, 37888 shared bytes.
extern "C" __global__ void __launch_bounds__(WIDE_THREADS, 2)
    conv1x1_tc_fwd_bf16(bf16* __restrict__ y, int y_rs, const bf16* __restrict__ x, int x_rs,
                        const bf16* __restrict__ wt, const float* scale, const float* shift, int n, int h, int w,
                        int c, int co, float* stats, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* mean, float* var, float* run_mean, float* run_var,
                        float unbias, int next_c, float* next_scale, float* next_shift, unsigned* done, float* ws,
                        unsigned* tiles, int split_len) {
    const CoefStep step{gamma, beta, mean, var, run_mean, run_var, unbias, next_c, next_scale, next_shift, done};
    conv_tc_fwd<WIDE, 1>(y, y_rs, x, x_rs, wt, scale, shift, n, h, w, c, co, stats, step, ws, tiles,
                           split_len);
}

// Grid (ceil(n*h*w / 128), ceil(co / 32), splits), block 128, 25600 shared bytes.
extern "C" __global__ void __launch_bounds__(NARROW_THREADS)
    conv3x3_tc_fwd_bf16(bf16* __restrict__ y, int y_rs, const bf16* __restrict__ x, int x_rs,
                        const bf16* __restrict__ wt, const float* scale, const float* shift, int n, int h, int w,
                        int c, int co, float* stats, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* mean, float* var, float* run_mean, float* run_var,
                        float unbias, int next_c, float* next_scale, float* next_shift, unsigned* done, float* ws,
                        unsigned* tiles, int split_len) {
    const CoefStep step{gamma, beta, mean, var, run_mean, run_var, unbias, next_c, next_scale, next_shift, done};
    conv_tc_fwd<NARROW, 3>(y, y_rs, x, x_rs, wt, scale, shift, n, h, w, c, co, stats, step, ws, tiles,
                           split_len);
}

// dx: [n, h, w, c] bf16 (row stride dx_rs), overwritten (accumulate = 0) or added to; x, scale,
// shift: the forward's input and BN + ReLU, for its mask (scale null: no mask; x unused); post:
// null or [c] f32 factors of the stored gradient; red: null or [2, c] f32 += (sum g, sum g * x);
// done: null, or (with red) the BN backward's per-channel step from red, into coef or (deferred)
// alpha, beta, and dgamma, dbeta, from mean, var (bn_step_last; red then left zero); ws, tiles:
// null, or split-K over gridDim.z chunks of split_len of the k*k*co reduction, as in the forward
// (ws: [n*h*w, c] f32).
// Grid (ceil(n*h*w / 128), ceil(c / 128), splits), block 256, 61440 shared bytes.
extern "C" __global__ void __launch_bounds__(WIDE_THREADS, 2)
    conv1x1_tc_bwd_data_bf16(bf16* dx, int dx_rs, int accumulate, const bf16* __restrict__ dy, int dy_rs,
                             const bf16* __restrict__ wt, const bf16* __restrict__ x, int x_rs, const float* scale,
                             const float* shift, int n, int h, int w, int c, int co, float* red, const float* post,
                             float* coef, float* alpha, float* beta, float* dgamma, float* dbeta,
                             const float* __restrict__ mean, const float* __restrict__ var, unsigned* done,
                             float* ws, unsigned* tiles, int split_len) {
    conv_tc_bwd_data<WIDE, 1>(dx, dx_rs, accumulate, dy, dy_rs, wt, x, x_rs, scale, shift, n, h, w, c, co,
                                          red, post, coef, alpha, beta, dgamma, dbeta, mean, var, done, ws, tiles,
                                          split_len);
}

// As conv1x1_tc_bwd_data_bf16, for the 3x3/1 pad 1 convolution.
extern "C" __global__ void __launch_bounds__(WIDE_THREADS, 2)
    conv3x3_tc_bwd_data_bf16(bf16* dx, int dx_rs, int accumulate, const bf16* __restrict__ dy, int dy_rs,
                             const bf16* __restrict__ wt, const bf16* __restrict__ x, int x_rs, const float* scale,
                             const float* shift, int n, int h, int w, int c, int co, float* red, const float* post,
                             float* coef, float* alpha, float* beta, float* dgamma, float* dbeta,
                             const float* __restrict__ mean, const float* __restrict__ var, unsigned* done,
                             float* ws, unsigned* tiles, int split_len) {
    conv_tc_bwd_data<WIDE, 3>(dx, dx_rs, accumulate, dy, dy_rs, wt, x, x_rs, scale, shift, n, h, w, c, co,
                                          red, post, coef, alpha, beta, dgamma, dbeta, mean, var, done, ws, tiles,
                                          split_len);
}

// dw += over pixels split into gridDim.z chunks of split_len (a multiple of 32).
// Grid (ceil(c / 128), ceil(co / 128), ceil(n*h*w / split_len)), block 256, 34816 shared bytes.
extern "C" __global__ void __launch_bounds__(WIDE_THREADS, 2)
    conv1x1_tc_bwd_weight_bf16(float* dw, const bf16* __restrict__ x, int x_rs, const float* scale,
                               const float* shift, const bf16* __restrict__ dy, int dy_rs, int n, int h, int w, int c,
                               int co, int split_len) {
    conv_tc_bwd_weight<WIDE, 1>(dw, x, x_rs, scale, shift, dy, dy_rs, n, h, w, c, co, split_len);
}

// Grid (ceil(9*c / 128), ceil(co / 32), ceil(n*h*w / split_len)), block 128, 22528 shared bytes.
extern "C" __global__ void __launch_bounds__(NARROW_THREADS)
    conv3x3_tc_bwd_weight_bf16(float* dw, const bf16* __restrict__ x, int x_rs, const float* scale,
                               const float* shift, const bf16* __restrict__ dy, int dy_rs, int n, int h, int w, int c,
                               int co, int split_len) {
    conv_tc_bwd_weight<NARROW, 3>(dw, x, x_rs, scale, shift, dy, dy_rs, n, h, w, c, co, split_len);
}

// Any square window, stride and padding (the stem: 7x7/2 pad 3 on 3 channels), element-by-element
// im2col loads, a 128x64 tile (4 warps as 2x2, warp tile 64x32: DenseNet's stem has 64 outputs);
// 126-127 registers at __launch_bounds__(ANY_THREADS, 4) (158 unbounded), no spills: 4 blocks per SM.
// y: [n, ho, wo, co] bf16 (row stride y_rs) = conv(pre(x), wt), ho = (h + 2 pad - k) / stride + 1;
// x: [n, h, w, c] bf16 (row stride x_rs); wt: [k, k, c, co] bf16; stats: null or [2, co] f32 +=
// per-channel (sum y, sum y^2); gamma ... done: the CoefStep of the BN that reads y next (done null:
// none). No split-K (the stem's grid is large).
// Grid (ceil(n*ho*wo / 128), ceil(co / 64)), block 128, 29696 shared bytes.
extern "C" __global__ void __launch_bounds__(ANY_THREADS, 4)
    convkxk_tc_fwd_bf16(bf16* __restrict__ y, int y_rs, const bf16* __restrict__ x, int x_rs,
                        const bf16* __restrict__ wt, const float* scale, const float* shift, int n, int h, int w,
                        int c, int co, int k, int stride, int pad, float* stats, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* mean, float* var, float* run_mean, float* run_var,
                        float unbias, int next_c, float* next_scale, float* next_shift, unsigned* done) {
    const Strided a = make_strided(x, x_rs, n, h, w, c, k, stride, pad, scale, shift);
    const int K = k * k * c;
    const CoefStep step{gamma, beta, mean, var, run_mean, run_var, unbias, next_c, next_scale, next_shift, done};
    tc_fwd<ANY, false>(a, n * a.ho * a.wo, K, y, y_rs, wt, co, stats, step, nullptr, nullptr, K);
}

// dw: [k, k, c, co] f32 += (d conv / d wt)(pre(x), dy) over the output pixels split into gridDim.z
// chunks of split_len (a multiple of 32); x, scale, shift, k, stride, pad as in the forward; dy:
// [n, ho, wo, co] bf16 (row stride dy_rs).
// Grid (ceil(k*k*c / 128), ceil(co / 64), ceil(n*ho*wo / split_len)), block 128, 26624 shared bytes.
extern "C" __global__ void __launch_bounds__(ANY_THREADS, 4)
    convkxk_tc_bwd_weight_bf16(float* dw, const bf16* __restrict__ x, int x_rs, const float* scale,
                               const float* shift, const bf16* __restrict__ dy, int dy_rs, int n, int h, int w, int c,
                               int co, int k, int stride, int pad, int split_len) {
    const Strided a = make_strided(x, x_rs, n, h, w, c, k, stride, pad, scale, shift);
    tc_bwd_weight<ANY>(dw, a, n * a.ho * a.wo, k * k * c, dy, dy_rs, co, split_len);
}
