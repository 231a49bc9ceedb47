// What runtime.cpp (fibers, scheduler, collectives), checks.cpp (device memory, memcheck,
// initcheck, racecheck) and profile.cpp (memory-efficiency counters) share. None of these files
// is instrumented; only the kernels are (see cuda_emu.h).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "cuda_emu.h"

namespace mura_emu {

// What a launch checks and measures: mura_emu_launch's `flags` (src/gpu/emu.rs `Checks`).
// kPdl: the launch is a programmatic dependent one (src/gpu/mod.rs `Launch::pdl`): under
// racecheck, a thread's device accesses before its pdl_wait() must not touch what the previous
// kernel in the stream accessed (see checks.cpp).
enum : unsigned { kMemcheck = 1, kInitcheck = 2, kRacecheck = 4, kProfile = 8, kPdl = 16 };

constexpr unsigned kMaxThreads = 1024;
// The most dynamic shared memory a block may have on every GPU mura targets (sm_86/89: 99 KiB
// with the opt-in that src/gpu/cuda.rs makes for every kernel; sm_80 163, sm_90 227): a tile
// outgrowing it fails here, not first on a GPU.
constexpr unsigned kMaxDynShared = 99 * 1024;
constexpr size_t kStack = 256 * 1024;       // per fiber
constexpr size_t kDynRegion = 256 * 1024;   // dynamic shared memory (<= 99 KiB) and what follows it

// An access as the checkers and the profiler tell them apart. The cp.async ones are the global
// read at issue and the shared write when the copy lands; LdMatrix is one row of an ldmatrix.
enum class Kind : uint8_t { Load, Store, Atomic, CpAsyncLoad, CpAsyncStore, LdMatrix };

inline bool reads(Kind k) { return k != Kind::Store && k != Kind::CpAsyncStore; }
inline bool writes(Kind k) { return k == Kind::Store || k == Kind::Atomic || k == Kind::CpAsyncStore; }

// The running launch and fiber, as the memory hooks see them.
struct Running {
    unsigned flags;         // this launch's checks (0 outside launches)
    uintptr_t stack_lo;     // the running fiber's stack is [stack_lo, stack_lo + kStack)
    unsigned tid;           // the running fiber's thread, linear within the block
    unsigned nthreads;      // threads per block
    unsigned char* dyn;     // dynamic shared memory: dyn_bytes valid, kDynRegion mapped
    unsigned dyn_bytes;
    uint64_t block_linear;  // the running block, linear within the grid
    const void* pc;         // the instruction whose access is being checked, for messages
};
extern Running g_run;

// " at conv_tc.cu:262 (inlined from conv_tc.cu:343, ...)": the source line of the kernel's
// instruction `pc`, from the binary's debug information through addr2line; "" without either.
const char* source_of(const void* pc);
// "(x,y,z)" of linear thread `tid` of the running block (a static buffer per call slot 0..3).
const char* thread_str(unsigned tid, int slot = 0);
// Fails the launch with this message and switches away: the kernel never runs on.
[[noreturn]] void kernel_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Every access a kernel makes outside its own stack goes through here (checks.cpp): `tid` made
// it, at instruction `pc`.
void access(uintptr_t addr, unsigned bytes, Kind kind, const void* pc, unsigned tid);

namespace chk {  // checks.cpp, called by the runtime
// A new launch of kernel `name`, after `prev_name` (null: none) launched at clock `prev_clock`
// (0: a copy or memset came after it) in the same stream: global race tags start over; returns
// this launch's clock.
uint32_t launch_begin(const char* name, const char* prev_name, uint32_t prev_clock);
void block_begin();                             // (after g_run.block_linear is set)
void barrier();                                 // a __syncthreads completed
void warp_sync(unsigned warp, unsigned mask, bool whole_warp);  // a collective completed
}  // namespace chk

// The profiler's counters of one launch, summed over its blocks. Field order and meaning are
// src/gpu/emu.rs `Counters` (documented there, with the Nsight Compute metric of each).
struct Counters {
    uint64_t gld_requests, gld_sectors, gld_bytes;
    uint64_t gst_requests, gst_sectors, gst_bytes;
    uint64_t gatom_requests, gatom_sectors, gatom_bytes;
    uint64_t ldgsts_requests, ldgsts_sectors, ldgsts_bytes;
    uint64_t sld_requests, sld_wavefronts, sld_ideal;
    uint64_t sst_requests, sst_wavefronts, sst_ideal;
    uint64_t satom_requests;
    uint64_t ldsm_requests, ldsm_wavefronts, ldsm_ideal;
    uint64_t hmma;
};

namespace prof {  // profile.cpp
void launch_begin(Counters* out);
void record(unsigned tid, const void* pc, uintptr_t addr, unsigned bytes, Kind kind, bool shared);
void flush_lanes(unsigned warp, unsigned mask);  // these lanes have converged
void flush_block();                              // every thread converged (barrier, block end)
void ldmatrix(const void* const rows[], unsigned nrows);  // one ldmatrix, row addresses
void mma();                                      // one mma.sync
}  // namespace prof

}  // namespace mura_emu
