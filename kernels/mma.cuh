// Tensor-core and async-copy wrappers (sm_80+). Under the emulator each is a warp collective
// implemented in src/gpu/emu/runtime.cpp from the PTX ISA's fragment layouts, which are these
// (PTX ISA: "Matrix Fragments for mma.m16n8k16" with .bf16, and ldmatrix), with g = lane / 4
// (the lane's group) and t = lane % 4; a register of two bf16 holds the lower column (row) in its
// low half:
//   A, 16 x 16 bf16 (m by k), 4 registers:
//     a0: row g,     columns 2t, 2t + 1          a1: row g + 8, columns 2t, 2t + 1
//     a2: row g,     columns 2t + 8, 2t + 9      a3: row g + 8, columns 2t + 8, 2t + 9
//   B, 16 x 8 bf16 (k by n), 2 registers:
//     b0: rows 2t, 2t + 1 of column g            b1: rows 2t + 8, 2t + 9 of column g
//   C and D, 16 x 8 f32, 4 registers:
//     c0, c1: row g, columns 2t, 2t + 1          c2, c3: row g + 8, columns 2t, 2t + 1
//   ldmatrix .m8n8 .b16 (x1, x2, x4 matrices): lanes 8m .. 8m + 7 give the addresses of rows 0..7
//     of matrix m (16 bytes each, 16-byte aligned, in shared memory; other lanes' are ignored);
//     register m of each lane receives row g, columns 2t, 2t + 1 of matrix m, or with .trans
//     column g, rows 2t, 2t + 1 (the matrix transposed).
// So an 8 x 8 quarter of a tile stored row by row is one fragment register as ldmatrix gives it:
// an x4 of A's four quarters (rows 0-7 / 8-15 by k 0-7 / 8-15) gives a0..a3; of a k-major
// (n-contiguous) B, the .trans gives b0, b1; of an n-major (k-contiguous) B, the plain load does.
// kernels/conv_tc.cu's tile loop (tc_tile) and epilogues (acc_coords, out_put) use these layouts.
#pragma once
#include "common.cuh"

// d = a * b + c for one 16x8x16 tile (fragments as above). The whole warp must call it.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2],
                                                  const float c[4]) {
#ifdef MURA_EMU
    mura_emu::Lane l{};
    for (int i = 0; i < 4; i++) l.in[i] = a[i];
    for (int i = 0; i < 2; i++) l.in[4 + i] = b[i];
    for (int i = 0; i < 4; i++) l.in[6 + i] = __float_as_uint(c[i]);
    mura_emu::warp_op(mura_emu::Op::Mma, FULL_MASK, &l, MURA_SITE);
    for (int i = 0; i < 4; i++) d[i] = __uint_as_float(l.out[i]);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// ldmatrix .m8n8 .b16 from shared memory (layout above): this lane's row address, r[m] its
// register of matrix m.
#ifdef MURA_EMU
#define MURA_LDMATRIX(fn, N, OP, PTX)                                   \
    __device__ __forceinline__ void fn(unsigned r[N], const void* smem_row) { \
        mura_emu::Lane l{};                                             \
        l.ptr = smem_row;                                               \
        mura_emu::warp_op(mura_emu::Op::OP, FULL_MASK, &l, MURA_SITE);  \
        for (int i = 0; i < N; i++) r[i] = l.out[i];                    \
    }
#else
#define MURA_LDMATRIX(fn, N, OP, PTX)                                             \
    __device__ __forceinline__ void fn(unsigned r[N], const void* smem_row) {     \
        unsigned addr = (unsigned)__cvta_generic_to_shared(smem_row);             \
        MURA_LDMATRIX_ASM_##N(PTX)                                                \
    }
#define MURA_LDMATRIX_ASM_1(PTX) asm volatile(PTX " {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
#define MURA_LDMATRIX_ASM_2(PTX) asm volatile(PTX " {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#define MURA_LDMATRIX_ASM_4(PTX)                                      \
    asm volatile(PTX " {%0,%1,%2,%3}, [%4];\n"                        \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) \
                 : "r"(addr));
#endif
MURA_LDMATRIX(ldmatrix_x1, 1, LdMatrix1, "ldmatrix.sync.aligned.m8n8.x1.shared.b16")
MURA_LDMATRIX(ldmatrix_x2, 2, LdMatrix2, "ldmatrix.sync.aligned.m8n8.x2.shared.b16")
MURA_LDMATRIX(ldmatrix_x4, 4, LdMatrix4, "ldmatrix.sync.aligned.m8n8.x4.shared.b16")
MURA_LDMATRIX(ldmatrix_x2_trans, 2, LdMatrix2Trans, "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16")
MURA_LDMATRIX(ldmatrix_x4_trans, 4, LdMatrix4Trans, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")

// 16-byte global -> shared copy that completes when its group is waited for (cp_async_commit
// closes a group, cp_async_wait_group<N> waits for all but the newest N committed groups,
// cp_async_wait_all commits and waits for everything; the emulator writes shared memory only
// then). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#ifdef MURA_EMU
    mura_emu::cp_async_issue(smem, gmem);
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef MURA_EMU
    mura_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
#ifdef MURA_EMU
    mura_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait_group<0>();
}
