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
// Each operand tile is staged in shared memory in its memory order ([outer][inner] bf16, the
// 16-byte chunks of each row XOR-swizzled: stage_at) and read with ldmatrix or ldmatrix.trans
// (fragment layouts: kernels/mma.cuh). K advances in slices of BK = 32 through shared-memory
// stages (2; 3 for the data gradients): the raw operand chunks (weights, dy: no transform) go by
// cp.async straight into a later stage, the transformed or irregular ones (BN + ReLU, padding,
// sizes not multiples of 8) through registers, loaded before the current stage's mmas and stored
// after them, so global latency overlaps the tensor cores (see tc_tile). The epilogues write
// their outputs through the same shared memory, in whole 16-byte chunks of rows (OutTile).
//
// Tile shapes (per block; BK = 32; the types Wide, Narrow and Any below, sized in consts.cuh),
// chosen for DenseNet's O = 128 bottleneck and O = 32 growth:
//   Wide:   128x128, 8 warps as 2x4, warp tile 64x32 (4x4 mma tiles, 64 f32 accumulators/thread).
//           Per K-slice: 128*128*32*2 = 1.05 MFLOP for (128+128)*32*2 = 16 KB of operands from
//           global/L2 (64 FLOP/B). 2 blocks (16 warps) per SM (__launch_bounds__(Wide::THREADS, 2)).
//           Used by: 1x1 forward (N = O = 128, K = C = 64..1k+), 1x1 backward-data (N = C, K = 128:
//           only 4 K-slices, so prologue/epilogue weigh), 3x3 backward-data (N = C = 128,
//           K = 9*32), 1x1 backward-weight (M = C, N = 128, K = pixels, split).
//   Narrow: 128x32, 4 warps as 4x1, warp tile 32x32 (2x4 mma tiles, 32 accumulators/thread).
//           Per K-slice: 128*32*32*2 = 262 KFLOP for (128+32)*32*2 = 10 KB (26 FLOP/B: N = 32 caps
//           the reuse of A); 4 blocks (16 warps) per SM. Used by the 3x3 forward (N = O = 32,
//           K = 9*128 = 36 K-slices) and 3x3 backward-weight (M = 9*C, N = 32, K = pixels, split).
//   Any:    128x64, 8 warps as 4x2, warp tile 32x32 (the stem's 64 outputs); 2 blocks per SM.
// Each kernel's dynamic shared memory is one constant of consts.cuh (TC_SHARED_*, which the Rust
// launchers pass), checked here against its derivation (the Shared* types below).
// Split-K (gridDim.z chunks of split_len pixels, a multiple of BK) for both weight gradients, whose
// K = n*h*w is huge and M*N small; f32 partial sums are added with atomicAdd
// (src/gpu/ops/conv_tc.rs aims at a full wave of the device's SMs, chunks of >= 512 pixels unless
// the grid would not reach one block per SM). The forwards split K = k*k*c the same way when their
// grid is too small to fill the GPU (DenseNet-169's blocks 3 and 4 at batch 64: 98 and 25 row
// tiles for 132 SMs; src/gpu/ops/conv_tc.rs aims at 2 (Wide) or 4 (Narrow) blocks per SM of the
// device, chunks of >= 4 K-slices, shorter only where the grid would not reach one block per SM),
// and so do the data gradients, into an f32 workspace: the last block of each tile to add its
// partial sums takes them back and runs the epilogue (split_fixup), so a split costs no launch of
// its own. Every entry point is launched as a programmatic dependent launch (sm_90): tc_tile waits
// for the previous kernel (pdl_wait) before its first load. What is left to tune on a GPU:
// docs/architecture.md, "Tensor-core kernels".
#include "bn_step.cuh"
#include "consts.cuh"
#include "mma.cuh"

typedef __nv_bfloat16 bf16;

// The K-slice, stages and block tiles live in kernels/consts.cuh (the Rust launchers size grids and
// shared memory from the same values). The data gradients' operands (dy, weights) both go by
// cp.async, in TC_BWD_DATA_STAGES = 3 stages; the other kernels keep TC_STAGES = 2 (their BN + ReLU
// operand goes through registers, which more stages would not help).
constexpr int BK = TC_BK;

// A block tile: BM x BN outputs computed by WM x WN warps, each a WTM x WTN warp tile of MT x NT
// mma tiles (16 x 8).
template <int BM_, int BN_, int WM_, int WN_>
struct Tile {
    static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, THREADS = WM * WN * 32;
    static constexpr int WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NT = WTN / 8;
};
typedef Tile<TC_WIDE_BM, TC_WIDE_BN, TC_WIDE_WM, TC_WIDE_WN> Wide;
typedef Tile<TC_NARROW_BM, TC_NARROW_BN, TC_NARROW_WM, TC_NARROW_WN> Narrow;
typedef Tile<TC_ANY_BM, TC_ANY_BN, TC_ANY_WM, TC_ANY_WN> Any;

// A thread's accumulators of a tile: acc[mt][nt][r], r as the mma's C/D registers (mma.cuh).
#define ACC(TL) float acc[TL::MT][TL::NT][4]

// Loop unrolling for nvcc (the emulator's C++ compiler does not know the pragma).
#ifdef MURA_EMU
#define UNROLL
#else
#define UNROLL _Pragma("unroll")
#endif

// 8 bf16 (16 bytes): the unit of every operand load and output store, one 16-byte access (nvcc
// moves an aligned 16-byte struct with one ld/st .v4; under the emulator the four words are one
// host vector, so that its host compiler moves them with one 16-byte access too, as the profile
// then counts, and not word by word).
#ifdef MURA_EMU
typedef unsigned ChunkWords __attribute__((vector_size(16)));
#else
typedef unsigned ChunkWords[4];
#endif
struct __align__(16) Chunk {
    ChunkWords u;
};

// 4 bf16 (8 bytes), moved with one access as Chunk is.
#ifdef MURA_EMU
typedef unsigned DwordWords __attribute__((vector_size(8)));
#else
typedef unsigned DwordWords[2];
#endif
struct __align__(8) Dword {
    DwordWords u;
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
    // Null, or (the weight gradients, whose stage columns are the same kidx in every K-slice) the
    // stage columns' scale and shift in shared memory, loaded once per tile (see bn_cache).
    const float* coef;
};

__device__ __forceinline__ Gather make_gather(const bf16* x, int rs, int n, int h, int w, int c, int ks,
                                              const float* scale, const float* shift, int flip) {
    return Gather{x, scale, shift, rs, n, h, w, c, ks, flip, aligned16(x) && rs % 8 == 0 && c % 8 == 0, nullptr};
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
__device__ __forceinline__ const float* op_coef(const Gather& g) { return g.coef; }
__device__ __forceinline__ const float* op_coef(const Dense&) { return nullptr; }
__device__ __forceinline__ const float* op_coef(const Strided&) { return nullptr; }

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

// Shared-memory layout of every stage and of the epilogues' output tile: a [rows][INNER] bf16
// matrix without padding, whose 16-byte chunks (8 bf16) are XOR-swizzled within each row. Chunk j
// of row r sits at chunk slot r * CPR + (j ^ swz(r)), CPR = INNER / 8 chunks a row. The 32 banks
// are 8 chunk slots of 16 bytes (a 128-byte line holds 128 / (16 * CPR) rows), and swz(r)
// numbers a row's line among 8 consecutive lines (taken mod CPR when CPR < 8), so that:
//   - the 8 rows r0 .. r0 + 7 (r0 % 8 == 0) of one logical chunk, which an ldmatrix 8x8 matrix
//     reads, fall in 8 different bank groups: conflict-free, as the PTX ISA's ldmatrix needs;
//   - 8 consecutive chunks in row order (a quarter-warp's 16-byte stores, each of the stagers'
//     chunks and the output tile's), too: one row's 8 chunks, or 2 (4) rows of 4 (2) chunks;
//   - the mma fragment's 4-byte pairs (rows g and g + 8 of 8 lanes groups, OutTile::put) cover
//     the 32 banks once per row group of 8.
// (Padding each row by 16 bytes instead keeps ldmatrix conflict-free but puts a quarter-warp's
// chunk stores two to a bank: 2 ways.) Returns the element offset of chunk j of row r.
template <int INNER>
__device__ __forceinline__ int stage_at(int r, int j) {
    constexpr int CPR = INNER / 8;
    static_assert(CPR == 4 || CPR == 8 || CPR == 16, "stage rows of 32, 64 or 128 bf16");
    constexpr int ROWS_PER_LINE = CPR < 8 ? 8 / CPR : 1, SWZ = (CPR < 8 ? CPR : 8) - 1;
    return (r * CPR + (j ^ ((r / ROWS_PER_LINE) & SWZ))) * 8;
}

// One operand's share of a [OUTER][INNER] stage tile, 8-element chunks spread over THREADS threads
// (chunk e: row e / CPR, chunk e % CPR of it). `fetch` starts the loads of the stage at (o0, i0)
// (outer coordinates >= o_hi read as 0): raw aligned chunks by cp.async into `dst`, the others
// into registers, which `commit` stores.
template <int OUTER, int INNER, int THREADS>
struct Stager {
    static constexpr int CHUNKS = OUTER * INNER / 8, CPT = (CHUNKS + THREADS - 1) / THREADS, CPR = INNER / 8;
    Chunk v[CPT];
    unsigned in_regs = 0;  // (set by every stage_fetch before its stage_commit)
    Pix rows[CPT];  // the chunks' outer coordinates, when they are the same for every K-slice
};

// Decomposes the outer coordinates o0 + ... of this thread's chunks once (for stage_fetch<true>).
template <int OUTER, int INNER, int THREADS, class Op>
__device__ __forceinline__ void stage_rows(Stager<OUTER, INNER, THREADS>& s, const Op& op, int o0) {
    typedef Stager<OUTER, INNER, THREADS> S;
UNROLL
    for (int c = 0; c < S::CPT; c++) s.rows[c] = pix_of(op, o0 + (threadIdx.x + c * THREADS) / S::CPR);
}

// Words between the rows of the weight gradients' shared copy of their BN coefficients (bn_cache).
constexpr int BN_COEF_ROW = 20;

// Chunk (8 bf16) of raw at BN + ReLU: from the per-channel arrays at channel ch (global memory), or
// (coef: bn_cache's) from the shared copy, at the stage's column chunk q.
template <int INNER>
__device__ __forceinline__ Chunk bn_relu_chunk(Chunk raw, const float* scale, const float* shift, int ch,
                                               const float* coef, int q) {
    Chunk out;
UNROLL
    for (int j = 0; j < 4; j++) {
        float a, b;
        if (coef) {
            constexpr int R = BN_COEF_ROW;
            a = bn_relu(lo_of(raw.u[j]), coef[(2 * j) * R + q], coef[(8 + 2 * j) * R + q]);
            b = bn_relu(hi_of(raw.u[j]), coef[(2 * j + 1) * R + q], coef[(9 + 2 * j) * R + q]);
        } else {
            a = bn_relu(lo_of(raw.u[j]), scale[ch + 2 * j], shift[ch + 2 * j]);
            b = bn_relu(hi_of(raw.u[j]), scale[ch + 2 * j + 1], shift[ch + 2 * j + 1]);
        }
        out.u[j] = pack2(a, b);
    }
    return out;
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
        const int oo = e / S::CPR, q = e % S::CPR, outer = o0 + oo, inner = i0 + q * 8;
        const bf16* src = nullptr;
        int ch = 0;
        const int how = outer < o_hi ? chunk_src(op, FIXED_ROWS ? s.rows[c] : pix_of(op, outer), inner, &src, &ch) : 0;
        if (how == 1 && !scale) {
            cp_async_16(dst + stage_at<INNER>(oo, q), src);
            continue;
        }
        s.in_regs |= 1u << c;
        if (how == 0) {
            s.v[c] = Chunk{{0u, 0u, 0u, 0u}};
        } else if (how == 1) {
            s.v[c] = bn_relu_chunk<INNER>(*reinterpret_cast<const Chunk*>(src), scale, shift, ch, op_coef(op), q);
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
        *reinterpret_cast<Chunk*>(dst + stage_at<INNER>(e / S::CPR, e % S::CPR)) = s.v[c];
    }
}

// The any-window weight gradient's im2col operand (the stem: 7x7/2 pad 3 on 3 channels) through a
// patch of the input in shared memory. Element by element, the m-contiguous operand's loads touch
// 15% of the sectors they fetch: a chunk's 8 kidx are 8 (kx, ci) of one pixel's window, 2 bytes
// each, and the lanes of a request sit 16 bytes apart across 7 window rows. Instead, for each
// K-slice (32 consecutive output pixels, in at most PATCH_OUT_ROWS output rows) the block first
// copies the input-row segments those pixels' windows cover into the patch, 8 bytes a lane in
// row order, and the chunks are then gathered from it. One patch row per (output row, window
// row ky0 + i) the block's kidx need: global elements from the dword holding the segment's first
// element on, at PATCH_ROW elements a row. Slices that do not fit (more output rows, a wider
// segment), and inputs that are not dense channels on 8-byte boundaries, load element by element.
constexpr int PATCH_OUT_ROWS = 2, PATCH_ROWS = 16, PATCH_ROW = 224;
struct Patched {
    Strided g;
    bf16* patch;  // shared [PATCH_ROWS][PATCH_ROW]
    int ky0, nky;  // the window rows of the block's kidx: ky0 .. ky0 + nky - 1
    int total;     // elements of x: n*h*w*c
    bool dense;    // x 8-byte aligned, row stride == c
};

template <class TL>
__device__ __forceinline__ Patched make_patched(const Strided& g, bf16* patch) {
    const int kc = g.ks * g.c, m0 = blockIdx.x * TL::BM, ky0 = m0 / kc;
    const int ky1 = min(g.ks - 1, (m0 + TL::BM - 1) / kc);
    const bool dense = g.rs == g.c && (reinterpret_cast<unsigned long long>(g.x) & 7) == 0;
    return Patched{g, patch, ky0, ky1 - ky0 + 1, g.n * g.h * g.w * g.c, dense};
}
__device__ __forceinline__ Pix pix_of(const Patched&, int p) { return Pix{p, 0}; }

// One slice's patch geometry: output rows g0 .. g0 + rows - 1 (row id b * ho + oy) hold its
// pixels o0 .. last; fits: the patch applies.
struct PatchSlice {
    int g0, rows, o0, last;
    bool fits;
};

// The input row, the clipped columns [ix_lo, ix_hi] and the first dword of patch row (r, i).
struct PatchRow {
    int base, ix_lo, ix_hi, d_lo;  // base: element of (b, iy, 0, 0); d_lo: dword index in x
    bool valid;                    // iy inside the image and some column left
};

__device__ __forceinline__ PatchRow patch_row(const Patched& a, const PatchSlice& sl, int r, int i) {
    const Strided& g = a.g;
    const int gr = sl.g0 + r, b = gr / g.ho, oy = gr % g.ho;
    const int oxa = r == 0 ? sl.o0 % g.wo : 0, oxb = r == sl.rows - 1 ? sl.last % g.wo : g.wo - 1;
    const int iy = oy * g.stride - g.pad + a.ky0 + i;
    const int ix_lo = max(0, oxa * g.stride - g.pad), ix_hi = min(g.w - 1, oxb * g.stride - g.pad + g.ks - 1);
    const int base = (b * g.h + iy) * g.w * g.c;
    return PatchRow{base, ix_lo, ix_hi, (base + ix_lo * g.c) / 4, iy >= 0 && iy < g.h && ix_lo <= ix_hi};
}

__device__ __forceinline__ PatchSlice patch_slice(const Patched& a, int o0, int o_hi) {
    const Strided& g = a.g;
    const int end = min(o_hi, g.n * g.ho * g.wo), last = min(o0 + BK, end) - 1;
    PatchSlice sl{o0 / g.wo, last / g.wo - o0 / g.wo + 1, o0, last, a.dense && last >= o0};
    sl.fits = sl.fits && sl.rows <= PATCH_OUT_ROWS && sl.rows * a.nky <= PATCH_ROWS;
    // The widest segment: a whole slice's windows in one output row.
    sl.fits = sl.fits && ((min(BK, g.wo) - 1) * g.stride + g.ks) * g.c + 6 <= PATCH_ROW;
    return sl;
}

// Copies the slice's segments into the patch (every thread of the block), and each patch row's
// offset (element (b, iy, ix, ci) of row j sits at offs[j] + ix * c + ci), then waits for all.
template <int THREADS>
__device__ __forceinline__ void patch_load(const Patched& a, const PatchSlice& sl, int* offs) {
    const int c = a.g.c;
    for (int j = 0; j < sl.rows * a.nky; j++) {
        const PatchRow pr = patch_row(a, sl, j / a.nky, j % a.nky);
        if (threadIdx.x == 0) offs[j] = pr.base - 4 * pr.d_lo;
        if (!pr.valid) continue;
        const int d_hi = (pr.base + (pr.ix_hi + 1) * c - 1) / 4;
        bf16* const row = a.patch + j * PATCH_ROW;
        for (int d = pr.d_lo + threadIdx.x; d <= d_hi; d += THREADS) {
            bf16* const to = row + 4 * (d - pr.d_lo);
            if (4 * d + 3 < a.total) {
                *reinterpret_cast<Dword*>(to) = *reinterpret_cast<const Dword*>(a.g.x + 4 * d);
            } else {
                for (int e = 0; e < 4 && 4 * d + e < a.total; e++) to[e] = a.g.x[4 * d + e];
            }
        }
    }
    __syncthreads();
}

// Element kidx of the window at (iy0, ix0) = (oy, ox) * stride - pad of a pixel in the slice's
// output row r, from the patch (0 in the padding and past k*k*c).
__device__ __forceinline__ float patch_at(const Patched& a, const int* offs, int r, int iy0, int ix0, int kidx) {
    const Strided& g = a.g;
    const int ci = kidx % g.c, tap = kidx / g.c, ky = tap / g.ks, iy = iy0 + ky, ix = ix0 + tap - ky * g.ks;
    if (kidx >= g.ks * g.ks * g.c || iy < 0 || ix < 0 || iy >= g.h || ix >= g.w) return 0.0f;
    const int j = r * a.nky + ky - a.ky0;
    return bnrelu(__bfloat162float(a.patch[j * PATCH_ROW + offs[j] + ix * g.c + ci]), g.scale, g.shift, ci);
}

// stage_fetch of the patched operand: the patch, then each chunk gathered from it into registers
// (every chunk goes through registers; stage_commit stores them). Every thread must call it.
template <bool FIXED_ROWS, int OUTER, int INNER, int THREADS>
__device__ __forceinline__ void stage_fetch(Stager<OUTER, INNER, THREADS>& s, const Patched& a, int o0, int i0,
                                            int o_hi, bf16*) {
    typedef Stager<OUTER, INNER, THREADS> S;
    const Strided& g = a.g;
    const PatchSlice sl = patch_slice(a, o0, o_hi);
    int* const offs = reinterpret_cast<int*>(a.patch + PATCH_ROWS * PATCH_ROW);
    if (sl.fits) patch_load<THREADS>(a, sl, offs);
    s.in_regs = 0;
UNROLL
    for (int c = 0; c < S::CPT; c++) {
        const int e = threadIdx.x + c * THREADS;
        if (S::CHUNKS % THREADS != 0 && e >= S::CHUNKS) break;
        const int p = o0 + e / S::CPR, kidx = i0 + (e % S::CPR) * 8;
        s.in_regs |= 1u << c;
        s.v[c] = Chunk{{0u, 0u, 0u, 0u}};
        if (p >= o_hi) continue;
        if (!sl.fits) {
UNROLL
            for (int j = 0; j < 4; j++)
                s.v[c].u[j] = pack2(strided_at(g, p, kidx + 2 * j), strided_at(g, p, kidx + 2 * j + 1));
            continue;
        }
        if (p > sl.last) continue;
        const int row = p / g.wo, r = row - sl.g0, iy0 = row % g.ho * g.stride - g.pad;
        const int ix0 = (p - row * g.wo) * g.stride - g.pad;
UNROLL
        for (int j = 0; j < 4; j++)
            s.v[c].u[j] = pack2(patch_at(a, offs, r, iy0, ix0, kidx + 2 * j),
                                patch_at(a, offs, r, iy0, ix0, kidx + 2 * j + 1));
    }
}

// Shared-memory bytes of a tile's STAGES stages ([outer][inner] bf16 per operand: BM x BK and
// BK x BN elements whichever their order), of its output tile ([BM][BN] bf16, OutTile) and of the
// weight gradients' BN coefficients (bn_cache); each kernel's total is its TC_SHARED_* constant.
template <class TL, int STAGES>
struct Stages {
    static constexpr int A_ELEMS = TL::BM * BK, B_ELEMS = BK * TL::BN, BYTES = STAGES * (A_ELEMS + B_ELEMS) * 2;
};
template <class TL>
struct OutBytes {
    static constexpr int BYTES = TL::BM * TL::BN * 2;
};
template <class TL>
struct CoefBytes {
    static constexpr int BYTES = 2 * 8 * BN_COEF_ROW * 4;
};
// The any-window weight gradient's patch and its rows' offsets.
constexpr int PATCH_BYTES = PATCH_ROWS * PATCH_ROW * 2 + PATCH_ROWS * 4;
template <int A, int B>
struct MaxOf {
    static constexpr int V = A > B ? A : B;
};
static_assert(TC_SHARED_FWD_WIDE == MaxOf<Stages<Wide, TC_STAGES>::BYTES, OutBytes<Wide>::BYTES>::V, "");
static_assert(TC_SHARED_FWD_NARROW == MaxOf<Stages<Narrow, TC_STAGES>::BYTES, OutBytes<Narrow>::BYTES>::V, "");
static_assert(TC_SHARED_FWD_ANY == MaxOf<Stages<Any, TC_STAGES>::BYTES, OutBytes<Any>::BYTES>::V, "");
static_assert(TC_SHARED_BWD_DATA == MaxOf<Stages<Wide, TC_BWD_DATA_STAGES>::BYTES, OutBytes<Wide>::BYTES>::V, "");
static_assert(TC_SHARED_BWD_WEIGHT_WIDE == Stages<Wide, TC_STAGES>::BYTES + CoefBytes<Wide>::BYTES, "");
static_assert(TC_SHARED_BWD_WEIGHT_NARROW == Stages<Narrow, TC_STAGES>::BYTES + CoefBytes<Narrow>::BYTES, "");
static_assert(TC_SHARED_BWD_WEIGHT_ANY == Stages<Any, TC_STAGES>::BYTES + CoefBytes<Any>::BYTES + PATCH_BYTES, "");

// The block tile engine: acc += A[m0 .. m0+BM, k_lo .. k_hi] . B[k_lo .. k_hi, n0 .. n0+BN] with
// TL's warps, through STAGES shared-memory stages (Stages<TL, STAGES>). A_KC: A's inner
// (contiguous) index is k (outer m), else m (outer k); B_KC: B's inner index is k (outer n), else
// n (outer k). CACHE_A (with A_KC): decompose A's rows once per tile instead of once per K-slice
// (a few registers more).
//
// Pipeline: K-slice kt + STAGES - 1 is loaded while slice kt is multiplied, into the stage slice
// kt - 1 used. Its raw chunks go by cp.async, one commit group per slice, waited for STAGES - 1
// slices later (cp.async.wait_group STAGES - 2), so with STAGES > 2 their global latency spans
// several slices' mmas; its transformed chunks (BN + ReLU, padding, odd sizes) are loaded into
// registers before the mmas and stored after them. One barrier per slice: after it, slice kt's
// stage is complete (every thread waited for its own copies) and every thread is done with slice
// kt - 1's, which the loads issued next overwrite.
//
// Fragments (mma.cuh): the warp's A tile mt (rows r .. r + 15) is one ldmatrix_x4 whose matrices
// 0..3 are a0..a3, (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15):
// lane l gives row r + l % 16 of chunk kk / 8 + l / 16 (k-contiguous A), or, transposed, k-row
// kk + 8 (l / 16) + l % 8 of chunk r / 8 + (l / 8) % 2 (m-contiguous A). B's tiles nt and nt + 1
// (columns c .. c + 15) are one ldmatrix_x4: matrix j is b(j % 2) of tile nt + j / 2.
template <class TL, bool A_KC, bool B_KC, bool CACHE_A, int STAGES, class OA, class OB>
__device__ __forceinline__ void tc_tile(const OA& a, const OB& b, int m0, int n0, int k_lo, int k_hi, ACC(TL)) {
    static_assert(STAGES >= 2, "the pipeline needs two stages at least");
    typedef Stages<TL, STAGES> SM;
    constexpr int AO = A_KC ? TL::BM : BK, AI = A_KC ? BK : TL::BM, BO = B_KC ? TL::BN : BK,
                  BI = B_KC ? BK : TL::BN;
    MURA_DYN_SHARED(bf16, smem);
    bf16* const as = smem;                        // STAGES stages of SM::A_ELEMS
    bf16* const bs = smem + STAGES * SM::A_ELEMS;  // STAGES stages of SM::B_ELEMS
    Stager<AO, AI, TL::THREADS> sa;
    Stager<BO, BI, TL::THREADS> sb;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp / TL::WN) * TL::WTM, wn = (warp % TL::WN) * TL::WTN;
    const int big = 0x7fffffff;
    // Stage coordinates of K-slice k0: (outer origin, inner origin, outer bound).
#define A_AT(k0) (A_KC ? m0 : (k0)), (A_KC ? (k0) : m0), (A_KC ? big : k_hi)
#define B_AT(k0) (B_KC ? n0 : (k0)), (B_KC ? (k0) : n0), (B_KC ? big : k_hi)
    const int nk = (k_hi - k_lo + BK - 1) / BK;
    if (CACHE_A) stage_rows(sa, a, m0);  // (B is never a Gather: its rows cost nothing to recompute)
    pdl_wait();  // everything above is arithmetic; the loads below may read the previous kernel's output
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
                    ldmatrix_x4(af[mt], A + stage_at<BK>(r + lane % 16, kk / 8 + lane / 16));
                else
                    ldmatrix_x4_trans(af[mt],
                                      A + stage_at<TL::BM>(kk + (lane / 16) * 8 + lane % 8, r / 8 + (lane / 8) % 2));
            }
UNROLL
            for (int nt = 0; nt < TL::NT; nt += 2) {
                const int c = wn + nt * 8, j = lane / 8;
                unsigned r4[4];
                if (B_KC)
                    ldmatrix_x4(r4, B + stage_at<BK>(c + (j / 2) * 8 + lane % 8, kk / 8 + j % 2));
                else
                    ldmatrix_x4_trans(r4, B + stage_at<TL::BN>(kk + (j % 2) * 8 + lane % 8, c / 8 + j / 2));
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
    pdl_launch_dependents();   // the next kernel's blocks may start while the epilogues run
#undef A_AT
#undef B_AT
}

// Output coordinates of accumulator acc[mt][nt][r] of this thread: (row, column) in the block tile
// (the mma's C/D layout, mma.cuh: row g or g + 8, column 2t or 2t + 1 of the 16x8 tile).
template <class TL>
__device__ __forceinline__ void acc_coords(int mt, int nt, int r, int* row, int* col) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    *row = (warp / TL::WN) * TL::WTM + mt * 16 + lane / 4 + (r / 2) * 8;
    *col = (warp % TL::WN) * TL::WTN + nt * 8 + 2 * (lane % 4) + r % 2;
}

// A split-K block's partial sums: dst[(m0 + row) * ncols + n0 + col] += acc for the tile's outputs
// inside [0, nrows) x [0, ncols) (dst: [nrows, ncols] f32).
template <class TL>
__device__ __forceinline__ void add_tile(const ACC(TL), float* dst, int m0, int n0, int nrows, int ncols) {
UNROLL
    for (int mt = 0; mt < TL::MT; mt++)
UNROLL
        for (int nt = 0; nt < TL::NT; nt++)
UNROLL
            for (int r = 0; r < 4; r++) {
                int row, col;
                acc_coords<TL>(mt, nt, r, &row, &col);
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
template <class TL>
__device__ __forceinline__ bool split_fixup(ACC(TL), float* ws, unsigned* tiles, int m0, int n0, int nrows,
                                            int ncols) {
    // The block's flag in the first word of the stages' shared memory, which the barrier below
    // frees (the tile's mmas are done with it).
    MURA_DYN_SHARED(int, last);
    add_tile<TL>(acc, ws, m0, n0, nrows, ncols);
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
                acc_coords<TL>(mt, nt, r, &row, &col);
                row += m0, col += n0;
                const bool in = row < nrows && col < ncols;
                acc[mt][nt][r] = in ? atomicExch(ws + (long long)row * ncols + col, 0.0f) : 0.0f;
            }
    return true;
}

// An epilogue's output tile in shared memory: [BM][BN] bf16 laid out as the stages (stage_at), in
// the stages' space, which the tile's mmas (and split_fixup's flag) are done with once `open`'s
// barrier is passed. Each thread `put`s its accumulators' bf16 pairs (the mma's C layout: a warp's
// request is 8 rows of 4 pairs, conflict-free), then after `close`'s barrier the block writes the
// tile out in whole 16-byte chunks of rows (`write`), 8 outputs of one row a lane: a warp's
// request covers whole sectors, where the fragment itself would store 2 bytes a lane over 8 rows.
template <class TL>
struct OutTile {
    bf16* s;
};

template <class TL>
__device__ __forceinline__ OutTile<TL> out_open() {
    MURA_DYN_SHARED(bf16, smem);
    __syncthreads();
    return OutTile<TL>{smem};
}

// Outputs (row, col) and (row, col + 1) of the block tile (col even) as bf16 (lo, hi exact bf16
// values or rounded to nearest even); returns the pair as stored (pack2).
template <class TL>
__device__ __forceinline__ unsigned out_put(OutTile<TL> t, int row, int col, float lo, float hi) {
    const unsigned u = pack2(lo, hi);
    *reinterpret_cast<unsigned*>(t.s + stage_at<TL::BN>(row, col / 8) + col % 8) = u;
    return u;
}

// The tile's rows m0 + row < nrows, columns n0 + col < ncols, to dst: [nrows, row stride rs] bf16
// at column n0: store_chunk(f, out, v, col) for whole aligned chunks of 8 (v: 8 bf16 of the tile,
// out: their place in dst, col: the first's column in [0, ncols)), else store_elem(f, out, value,
// col) for each one.
template <class TL, class F>
__device__ __forceinline__ void out_write(OutTile<TL> t, bf16* dst, int rs, int m0, int n0, int nrows, int ncols,
                                          const F& f) {
    constexpr int CPR = TL::BN / 8, CHUNKS = TL::BM * CPR;
    static_assert(CHUNKS % TL::THREADS == 0, "whole rounds of chunks");
    __syncthreads();
    const bool vec = aligned16(dst) && rs % 8 == 0;
UNROLL
    for (int k = 0; k < CHUNKS / TL::THREADS; k++) {
        const int e = threadIdx.x + k * TL::THREADS;
        const int row = m0 + e / CPR, col = n0 + (e % CPR) * 8;
        if (row >= nrows || col >= ncols) continue;
        const Chunk v = *reinterpret_cast<const Chunk*>(t.s + stage_at<TL::BN>(e / CPR, e % CPR));
        bf16* const out = dst + (long long)row * rs + col;
        if (vec && col + 8 <= ncols) {
            store_chunk(f, out, v, col);
        } else {
UNROLL
            for (int i = 0; i < 8; i++)
                if (col + i < ncols) store_elem(f, out + i, i % 2 ? hi_of(v.u[i / 2]) : lo_of(v.u[i / 2]), col + i);
        }
    }
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

// The forward's store of its output tile: whole chunks as they are, single outputs rounded.
struct StoreY {};
__device__ __forceinline__ void store_chunk(const StoreY&, bf16* out, Chunk v, int) {
    *reinterpret_cast<Chunk*>(out) = v;
}
__device__ __forceinline__ void store_elem(const StoreY&, bf16* out, float v, int) { *out = __float2bfloat16(v); }

// y: [M, co] bf16 (row stride y_rs) = a[M, K] . wt[K, co] (a: the im2col operand of a forward);
// when stats is not null (stats: [2, co] f32), the per-channel sum and sum of squares of the
// stored y are added to it (the batch statistics of the BN that will read these channels).
// Split-K (ws not null, when M * co is too small a grid to fill the GPU): block z takes the K
// range [z * split_len, ...), and the last block of each tile finishes it (split_fixup; ws:
// [M, co] f32 and tiles: [gridDim.x * gridDim.y] unsigned, zero and left so). ws null: gridDim.z
// is 1. With step.done not null (and stats), the launch also finishes the coefficients of the BN
// that reads y next (coef_step_last).
template <class TL, bool CACHE_A, class OA>
__device__ __forceinline__ void tc_fwd(const OA& a, int M, int K, bf16* y, int y_rs, const bf16* wt, int co,
                                       float* stats, const CoefStep& step, float* ws, unsigned* tiles,
                                       int split_len) {
    const Dense b = make_dense(wt, K, co, co, 1);
    const int m0 = blockIdx.x * TL::BM, n0 = blockIdx.y * TL::BN;
    const int k_lo = blockIdx.z * split_len, k_hi = min(K, k_lo + split_len);
    float acc[TL::MT][TL::NT][4] = {};
    tc_tile<TL, true, false, CACHE_A, TC_STAGES>(a, b, m0, n0, k_lo, k_hi, acc);
    if (ws && !split_fixup<TL>(acc, ws, tiles, m0, n0, M, co)) return;
    const OutTile<TL> t = out_open<TL>();
UNROLL
    for (int nt = 0; nt < TL::NT; nt++) {
        float sums[2][2] = {};
UNROLL
        for (int mt = 0; mt < TL::MT; mt++)
UNROLL
            for (int r = 0; r < 4; r += 2) {
                int row, col;
                acc_coords<TL>(mt, nt, r, &row, &col);
                const unsigned u = out_put(t, row, col, acc[mt][nt][r], acc[mt][nt][r + 1]);
                if (m0 + row >= M) continue;
UNROLL
                for (int j = 0; j < 2; j++) {
                    if (n0 + col + j >= co) continue;
                    const float f = j ? hi_of(u) : lo_of(u);
                    sums[j][0] += f;
                    sums[j][1] += f * f;
                }
            }
        if (stats) add_column_sums(sums, stats, co, n0 + (threadIdx.x / 32 % TL::WN) * TL::WTN + nt * 8, co);
    }
    out_write(t, y, y_rs, m0, n0, M, co, StoreY{});
    if (step.done) coef_step_last(stats, co, M, step);
}

// y: [n, h, w, co] bf16 (row stride y_rs) = conv_KS(pre(x), wt) (KS = 1 or 3, stride 1, pad KS/2).
template <class TL, int KS>
__device__ __forceinline__ void conv_tc_fwd(bf16* y, int y_rs, const bf16* x, int x_rs, const bf16* wt,
                                            const float* scale, const float* shift, int n, int h, int w, int c,
                                            int co, float* stats, const CoefStep& step, float* ws,
                                            unsigned* tiles, int split_len) {
    const Gather a = make_gather(x, x_rs, n, h, w, c, KS, scale, shift, 0);
    tc_fwd<TL, true>(a, n * h * w, KS * KS * c, y, y_rs, wt, co, stats, step, ws, tiles, split_len);
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

// Four f32 (16 bytes).
struct __align__(16) Quad {
    float f[4];
};

// The data gradient's store of g (the tile, exact bf16 values): bf16(post * g), or added to what
// dx holds (accumulate), rounded once, whole chunks or single outputs alike.
struct StoreDx {
    const float* post;
    int accumulate;
};
__device__ __forceinline__ float store_value(const StoreDx& f, float g, float old, float p) {
    const float pg = f.post ? p * g : g;
    return f.accumulate ? old + pg : pg;
}
__device__ __forceinline__ void store_chunk(const StoreDx& f, bf16* out, Chunk v, int col) {
    Quad p[2] = {};
    if (f.post && aligned16(f.post)) {
        p[0] = reinterpret_cast<const Quad*>(f.post + col)[0];
        p[1] = reinterpret_cast<const Quad*>(f.post + col)[1];
    } else if (f.post) {
UNROLL
        for (int i = 0; i < 8; i++) p[i / 4].f[i % 4] = f.post[col + i];
    }
    const Chunk old = f.accumulate ? *reinterpret_cast<const Chunk*>(out) : Chunk{{0u, 0u, 0u, 0u}};
    Chunk o;
UNROLL
    for (int j = 0; j < 4; j++)
        o.u[j] = pack2(store_value(f, lo_of(v.u[j]), lo_of(old.u[j]), p[j / 2].f[(2 * j) % 4]),
                       store_value(f, hi_of(v.u[j]), hi_of(old.u[j]), p[j / 2].f[(2 * j + 1) % 4]));
    *reinterpret_cast<Chunk*>(out) = o;
}
__device__ __forceinline__ void store_elem(const StoreDx& f, bf16* out, float g, int col) {
    const float old = f.accumulate ? __bfloat162float(*out) : 0.0f;
    *out = __float2bfloat16(store_value(f, g, old, f.post ? f.post[col] : 1.0f));
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
template <class TL, int KS>
__device__ __forceinline__ void conv_tc_bwd_data(bf16* dx, int dx_rs, int accumulate, const bf16* dy, int dy_rs,
                                                 const bf16* wt, const bf16* x, int x_rs, const float* scale,
                                                 const float* shift, int n, int h, int w, int ci, int co,
                                                 float* red, const float* post, float* coef, float* alpha,
                                                 float* beta, float* dgamma, float* dbeta, const float* mean,
                                                 const float* var, unsigned* done, float* ws, unsigned* tiles,
                                                 int split_len) {
    const Gather a = make_gather(dy, dy_rs, n, h, w, co, KS, nullptr, nullptr, 1);
    const Dense b = make_dense(wt, ci, co, co, KS * KS);
    const int M = n * h * w, m0 = blockIdx.x * TL::BM, n0 = blockIdx.y * TL::BN;
    float acc[TL::MT][TL::NT][4] = {};
    const int K = KS * KS * co, k_lo = blockIdx.z * split_len, k_hi = min(K, k_lo + split_len);
    // No row cache: at the 128-register bound it spills on sm_86/89 (K is only 9 * 32 here anyway).
    tc_tile<TL, true, true, false, TC_BWD_DATA_STAGES>(a, b, m0, n0, k_lo, k_hi, acc);
    if (ws && !split_fixup<TL>(acc, ws, tiles, m0, n0, M, ci)) return;
    const OutTile<TL> t = out_open<TL>();
UNROLL
    for (int nt = 0; nt < TL::NT; nt++) {
        float sums[2][2] = {};
UNROLL
        for (int mt = 0; mt < TL::MT; mt++)
UNROLL
            for (int r = 0; r < 4; r += 2) {
                int row, col;
                acc_coords<TL>(mt, nt, r, &row, &col);
                float g[2] = {0.0f, 0.0f};
UNROLL
                for (int j = 0; j < 2; j++) {
                    const int grow = m0 + row, gcol = n0 + col + j;
                    if (grow >= M || gcol >= ci) continue;
                    float v = acc[mt][nt][r + j], xv = 0.0f;
                    if (scale) {
                        xv = __bfloat162float(x[(long long)grow * x_rs + gcol]);
                        if (xv * scale[gcol] + shift[gcol] <= 0.0f) v = 0.0f;
                    }
                    g[j] = __bfloat162float(__float2bfloat16(v));
                    sums[j][0] += g[j];
                    sums[j][1] += g[j] * xv;
                }
                out_put(t, row, col, g[0], g[1]);
            }
        if (red) add_column_sums(sums, red, ci, n0 + (threadIdx.x / 32 % TL::WN) * TL::WTN + nt * 8, ci);
    }
    out_write(t, dx, dx_rs, m0, n0, M, ci, StoreDx{post, accumulate});
    if (done) bn_step_last(red, ci, M, post, coef, alpha, beta, dgamma, dbeta, mean, var, done);
}

// The weight gradients' BN + ReLU coefficients, once per tile. The m-contiguous A operand's stage
// columns are the same kidx m0 .. m0 + BM - 1 in every K-slice, so their scale and shift (at
// channel kidx % c) are copied behind the stages into shared memory: [2][8][BN_COEF_ROW] f32,
// value i of column chunk q at [i][q]. A warp's lanes, one column chunk each, read consecutive
// words (bn_relu_chunk), and no lane loads scale and shift from global memory per element (16
// scalar loads per chunk, the same 16 sectors for every chunk of a stage row). The rows are
// BM / 8 + 4 = 20 words apart, so that the copy's stores (lane k: column k, value k % 8 of chunk
// k / 8) also fall in 32 different banks. Returns the copy (a Gather's coef).
template <class TL>
__device__ __forceinline__ const float* bn_cache(const float* scale, const float* shift, int c, int m0, int M) {
    static_assert(TL::BM / 8 + 4 == BN_COEF_ROW, "the copy's rows are BM / 8 + 4 words apart");
    MURA_DYN_SHARED(float, words);
    float* const coef = words + Stages<TL, TC_STAGES>::BYTES / 4;
    pdl_wait();  // (tc_tile waits too; the coefficients are read first)
    for (int i = threadIdx.x; i < 2 * TL::BM; i += TL::THREADS) {
        const int k = i % TL::BM, kidx = m0 + k;
        const float* src = i < TL::BM ? scale : shift;
        coef[((i / TL::BM) * 8 + k % 8) * BN_COEF_ROW + k / 8] = kidx < M ? src[kidx % c] : 0.0f;
    }
    __syncthreads();
    return coef;
}

// dw: [M, co] f32 += a^T[M, P] . dy[P, co] over the pixels [z * split_len, ...) (a: the im2col
// operand of the forward, P output pixels by M = k*k*c; dy row stride dy_rs).
template <class TL, class OA>
__device__ __forceinline__ void tc_bwd_weight(float* dw, const OA& a, int P, int M, const bf16* dy, int dy_rs, int co,
                                              int split_len) {
    const Dense b = make_dense(dy, P, co, dy_rs, 1);
    const int m0 = blockIdx.x * TL::BM, n0 = blockIdx.y * TL::BN;
    const int k_lo = blockIdx.z * split_len, k_hi = min(P, k_lo + split_len);
    float acc[TL::MT][TL::NT][4] = {};
    tc_tile<TL, false, false, false, TC_STAGES>(a, b, m0, n0, k_lo, k_hi, acc);
    if (k_lo < k_hi) add_tile<TL>(acc, dw, m0, n0, M, co);
}

// dw: [KS, KS, c, co] f32 += (d conv_KS / d wt)(pre(x), dy) over pixels [z * split_len, ...).
template <class TL, int KS>
__device__ __forceinline__ void conv_tc_bwd_weight(float* dw, const bf16* x, int x_rs, const float* scale,
                                                   const float* shift, const bf16* dy, int dy_rs, int n, int h,
                                                   int w, int c, int co, int split_len) {
    Gather a = make_gather(x, x_rs, n, h, w, c, KS, scale, shift, 0);
    if (scale) a.coef = bn_cache<TL>(scale, shift, c, blockIdx.x * TL::BM, KS * KS * c);
    tc_bwd_weight<TL>(dw, a, n * h * w, KS * KS * c, dy, dy_rs, co, split_len);
}

// Entry points. Shapes: x: [n, h, w, c] bf16 with row stride x_rs (a channel prefix); y, dy:
// [n, h, w, co] bf16 with row stride y_rs / dy_rs (channel slices); wt: [k, k, c, co] bf16;
// scale, shift: [c] f32, or both null (no BN + ReLU); dw: [k, k, c, co] f32; stats: null or
// [2, co] f32 += per-channel (sum y, sum y^2); red: null or [2, c] f32 += (sum g, sum g * x) of
// the masked data gradient g; post: null or [c] f32 factors of the stored data gradient.
// Dynamic shared memory: the TC_SHARED_* bytes of kernels/consts.cuh each names.

// gamma ... done: the CoefStep of the BN that reads y next (done null: none; see coef_step_last);
// ws, tiles: null, or [n*h*w, co] f32 partial sums and [gridDim.x * gridDim.y] arrival counts, zero
// (split-K over gridDim.z chunks of split_len, a multiple of 32, of the k*k*c reduction; the last
// block of each tile stores it, see split_fixup).
// Grid (ceil(n*h*w / 128), ceil(co / 128), splits), block 256, TC_SHARED_FWD_WIDE shared bytes.
extern "C" __global__ void __launch_bounds__(Wide::THREADS, 2)
    conv1x1_tc_fwd_bf16(bf16* __restrict__ y, int y_rs, const bf16* __restrict__ x, int x_rs,
                        const bf16* __restrict__ wt, const float* scale, const float* shift, int n, int h, int w,
                        int c, int co, float* stats, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* mean, float* var, float* run_mean, float* run_var,
                        float unbias, int next_c, float* next_scale, float* next_shift, unsigned* done, float* ws,
                        unsigned* tiles, int split_len) {
    const CoefStep step{gamma, beta, mean, var, run_mean, run_var, unbias, next_c, next_scale, next_shift, done};
    conv_tc_fwd<Wide, 1>(y, y_rs, x, x_rs, wt, scale, shift, n, h, w, c, co, stats, step, ws, tiles, split_len);
}

// Grid (ceil(n*h*w / 128), ceil(co / 32), splits), block 128, TC_SHARED_FWD_NARROW shared bytes.
extern "C" __global__ void __launch_bounds__(Narrow::THREADS)
    conv3x3_tc_fwd_bf16(bf16* __restrict__ y, int y_rs, const bf16* __restrict__ x, int x_rs,
                        const bf16* __restrict__ wt, const float* scale, const float* shift, int n, int h, int w,
                        int c, int co, float* stats, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* mean, float* var, float* run_mean, float* run_var,
                        float unbias, int next_c, float* next_scale, float* next_shift, unsigned* done, float* ws,
                        unsigned* tiles, int split_len) {
    const CoefStep step{gamma, beta, mean, var, run_mean, run_var, unbias, next_c, next_scale, next_shift, done};
    conv_tc_fwd<Narrow, 3>(y, y_rs, x, x_rs, wt, scale, shift, n, h, w, c, co, stats, step, ws, tiles, split_len);
}

// dx: [n, h, w, c] bf16 (row stride dx_rs), overwritten (accumulate = 0) or added to; x, scale,
// shift: the forward's input and BN + ReLU, for its mask (scale null: no mask; x unused); post:
// null or [c] f32 factors of the stored gradient; red: null or [2, c] f32 += (sum g, sum g * x);
// done: null, or (with red) the BN backward's per-channel step from red, into coef or (deferred)
// alpha, beta, and dgamma, dbeta, from mean, var (bn_step_last; red then left zero); ws, tiles:
// null, or split-K over gridDim.z chunks of split_len of the k*k*co reduction, as in the forward
// (ws: [n*h*w, c] f32).
// Grid (ceil(n*h*w / 128), ceil(c / 128), splits), block 256, TC_SHARED_BWD_DATA shared bytes.
extern "C" __global__ void __launch_bounds__(Wide::THREADS, 2)
    conv1x1_tc_bwd_data_bf16(bf16* dx, int dx_rs, int accumulate, const bf16* __restrict__ dy, int dy_rs,
                             const bf16* __restrict__ wt, const bf16* __restrict__ x, int x_rs, const float* scale,
                             const float* shift, int n, int h, int w, int c, int co, float* red, const float* post,
                             float* coef, float* alpha, float* beta, float* dgamma, float* dbeta,
                             const float* __restrict__ mean, const float* __restrict__ var, unsigned* done,
                             float* ws, unsigned* tiles, int split_len) {
    conv_tc_bwd_data<Wide, 1>(dx, dx_rs, accumulate, dy, dy_rs, wt, x, x_rs, scale, shift, n, h, w, c, co, red, post,
                              coef, alpha, beta, dgamma, dbeta, mean, var, done, ws, tiles, split_len);
}

// As conv1x1_tc_bwd_data_bf16, for the 3x3/1 pad 1 convolution.
extern "C" __global__ void __launch_bounds__(Wide::THREADS, 2)
    conv3x3_tc_bwd_data_bf16(bf16* dx, int dx_rs, int accumulate, const bf16* __restrict__ dy, int dy_rs,
                             const bf16* __restrict__ wt, const bf16* __restrict__ x, int x_rs, const float* scale,
                             const float* shift, int n, int h, int w, int c, int co, float* red, const float* post,
                             float* coef, float* alpha, float* beta, float* dgamma, float* dbeta,
                             const float* __restrict__ mean, const float* __restrict__ var, unsigned* done,
                             float* ws, unsigned* tiles, int split_len) {
    conv_tc_bwd_data<Wide, 3>(dx, dx_rs, accumulate, dy, dy_rs, wt, x, x_rs, scale, shift, n, h, w, c, co, red, post,
                              coef, alpha, beta, dgamma, dbeta, mean, var, done, ws, tiles, split_len);
}

// dw += over pixels split into gridDim.z chunks of split_len (a multiple of 32).
// Grid (ceil(c / 128), ceil(co / 128), ceil(n*h*w / split_len)), block 256, TC_SHARED_BWD_WEIGHT_WIDE
// shared bytes.
extern "C" __global__ void __launch_bounds__(Wide::THREADS, 2)
    conv1x1_tc_bwd_weight_bf16(float* dw, const bf16* __restrict__ x, int x_rs, const float* scale,
                               const float* shift, const bf16* __restrict__ dy, int dy_rs, int n, int h, int w, int c,
                               int co, int split_len) {
    conv_tc_bwd_weight<Wide, 1>(dw, x, x_rs, scale, shift, dy, dy_rs, n, h, w, c, co, split_len);
}

// Grid (ceil(9*c / 128), ceil(co / 32), ceil(n*h*w / split_len)), block 128,
// TC_SHARED_BWD_WEIGHT_NARROW shared bytes.
extern "C" __global__ void __launch_bounds__(Narrow::THREADS)
    conv3x3_tc_bwd_weight_bf16(float* dw, const bf16* __restrict__ x, int x_rs, const float* scale,
                               const float* shift, const bf16* __restrict__ dy, int dy_rs, int n, int h, int w, int c,
                               int co, int split_len) {
    conv_tc_bwd_weight<Narrow, 3>(dw, x, x_rs, scale, shift, dy, dy_rs, n, h, w, c, co, split_len);
}

// Any square window, stride and padding (the stem: 7x7/2 pad 3 on 3 channels), element-by-element
// im2col loads, a 128x64 tile (8 warps as 4x2, warp tile 32x32: DenseNet's stem has 64 outputs);
// 2 blocks per SM (__launch_bounds__(Any::THREADS, 2)).
// y: [n, ho, wo, co] bf16 (row stride y_rs) = conv(pre(x), wt), ho = (h + 2 pad - k) / stride + 1;
// x: [n, h, w, c] bf16 (row stride x_rs); wt: [k, k, c, co] bf16; stats: null or [2, co] f32 +=
// per-channel (sum y, sum y^2); gamma ... done: the CoefStep of the BN that reads y next (done null:
// none). No split-K (the stem's grid is large).
// Grid (ceil(n*ho*wo / 128), ceil(co / 64)), block 256, TC_SHARED_FWD_ANY shared bytes.
extern "C" __global__ void __launch_bounds__(Any::THREADS, 2)
    convkxk_tc_fwd_bf16(bf16* __restrict__ y, int y_rs, const bf16* __restrict__ x, int x_rs,
                        const bf16* __restrict__ wt, const float* scale, const float* shift, int n, int h, int w,
                        int c, int co, int k, int stride, int pad, float* stats, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* mean, float* var, float* run_mean, float* run_var,
                        float unbias, int next_c, float* next_scale, float* next_shift, unsigned* done) {
    const Strided a = make_strided(x, x_rs, n, h, w, c, k, stride, pad, scale, shift);
    const int K = k * k * c;
    const CoefStep step{gamma, beta, mean, var, run_mean, run_var, unbias, next_c, next_scale, next_shift, done};
    tc_fwd<Any, false>(a, n * a.ho * a.wo, K, y, y_rs, wt, co, stats, step, nullptr, nullptr, K);
}

// dw: [k, k, c, co] f32 += (d conv / d wt)(pre(x), dy) over the output pixels split into gridDim.z
// chunks of split_len (a multiple of 32); x, scale, shift, k, stride, pad as in the forward; dy:
// [n, ho, wo, co] bf16 (row stride dy_rs). The im2col operand goes through a patch of x in shared
// memory (Patched) where a K-slice's windows fit one.
// Grid (ceil(k*k*c / 128), ceil(co / 64), ceil(n*ho*wo / split_len)), block 256,
// TC_SHARED_BWD_WEIGHT_ANY shared bytes.
extern "C" __global__ void __launch_bounds__(Any::THREADS, 2)
    convkxk_tc_bwd_weight_bf16(float* dw, const bf16* __restrict__ x, int x_rs, const float* scale,
                               const float* shift, const bf16* __restrict__ dy, int dy_rs, int n, int h, int w, int c,
                               int co, int k, int stride, int pad, int split_len) {
    const Strided g = make_strided(x, x_rs, n, h, w, c, k, stride, pad, scale, shift);
    MURA_DYN_SHARED(bf16, smem);
    bf16* const patch = smem + (Stages<Any, TC_STAGES>::BYTES + CoefBytes<Any>::BYTES) / 2;
    tc_bwd_weight<Any>(dw, make_patched<Any>(g, patch), n * g.ho * g.wo, k * k * c, dy, dy_rs, co, split_len);
}
