// Tensor-core and async-copy wrappers (sm_80+). Under the emulator each is a warp collective
// implemented in src/gpu/emu/runtime.cpp from the PTX ISA's fragment layouts.
#pragma once
#include "common.cuh"

// d = a * b + c for one 16x8x16 tile: A 16x16 bf16 row-major fragment (4 regs of 2 bf16),
// B 16x8 bf16 column fragment (2 regs), C and D 16x8 f32 (4 regs). The whole warp must call it.
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

// ldmatrix .m8n8 .b16 from shared memory: lane i supplies the (16-byte aligned) address of row i%8
// of matrix i/8 (lanes beyond the matrices loaded are ignored); r[m] receives this lane's two
// elements of matrix m: row lane/4, columns 2*(lane%4) and +1; with .trans, column lane/4, rows
// 2*(lane%4) and +1.
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
