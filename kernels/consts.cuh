// Constants shared by the kernels and their Rust launchers, defined here once: build.rs reads every
// `constexpr` line of this file and generates the same constants in Rust (`mura::consts`),
// so a tile size or a stage count changed here changes both sides. One `constexpr TYPE NAME = LITERAL;`
// per line (int or double).
#pragma once

// ---- batch norm (PyTorch's defaults) ----------------------------------------------------------------
constexpr double BN_EPS = 1e-5;       // added to the variance
constexpr double BN_MOMENTUM = 0.1;   // running = (1 - momentum) * running + momentum * batch

// ---- CUDA-core convolutions (kernels/conv.cu) ---------------------------------------------------------
constexpr int CONV_TILE = 64;         // a block's output tile: CONV_TILE x CONV_TILE (GEMM M x N)
constexpr int CONV_TK = 16;           // reduction slice
constexpr int CONV_SROW = 68;         // a shared tile row: 64 + 4 (fewer bank conflicts)
constexpr int CONV_THREADS = 256;

// ---- tensor-core convolutions (kernels/conv_tc.cu) ----------------------------------------------------
constexpr int TC_BK = 32;             // K-slice of every tile
constexpr int TC_STAGES = 2;          // shared-memory stages of the forwards and weight gradients
constexpr int TC_BWD_DATA_STAGES = 3; // ... of the data gradients (both operands by cp.async)
// Block tiles: BM x BN outputs computed by WM x WN warps.
constexpr int TC_WIDE_BM = 128;       // "wide": 1x1 forward, both data gradients, 1x1 weight gradient
constexpr int TC_WIDE_BN = 128;
constexpr int TC_WIDE_WM = 2;
constexpr int TC_WIDE_WN = 4;
constexpr int TC_NARROW_BM = 128;     // "narrow": the 3x3 forward and weight gradient (N = growth 32)
constexpr int TC_NARROW_BN = 32;
constexpr int TC_NARROW_WM = 4;
constexpr int TC_NARROW_WN = 1;
constexpr int TC_ANY_BM = 128;        // any window (the stem: 64 outputs), 8 warps
constexpr int TC_ANY_BN = 64;
constexpr int TC_ANY_WM = 4;
constexpr int TC_ANY_WN = 2;
// Dynamic shared bytes of each tensor-core kernel: its stages (and, the forwards and data gradients,
// their output tile, in the same space; the weight gradients, their BN coefficients behind them).
// kernels/conv_tc.cu checks each against its derivation at compile time.
constexpr int TC_SHARED_FWD_WIDE = 32768;           // conv1x1_tc_fwd: 2 stages; the 128x128 output tile
constexpr int TC_SHARED_FWD_NARROW = 20480;         // conv3x3_tc_fwd: 2 stages
constexpr int TC_SHARED_FWD_ANY = 24576;            // convkxk_tc_fwd: 2 stages
constexpr int TC_SHARED_BWD_DATA = 49152;           // conv1x1/3x3_tc_bwd_data: 3 stages
constexpr int TC_SHARED_BWD_WEIGHT_WIDE = 34048;    // conv1x1_tc_bwd_weight: 2 stages + 1,280 B of BN coefficients
constexpr int TC_SHARED_BWD_WEIGHT_NARROW = 21760;  // conv3x3_tc_bwd_weight
constexpr int TC_SHARED_BWD_WEIGHT_ANY = 33088;     // convkxk_tc_bwd_weight: + 7,232 B of input patch
