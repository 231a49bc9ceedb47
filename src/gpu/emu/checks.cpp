// Device memory and the emulator's three checkers, fed by the kernels' instrumented accesses.
//
// build.rs compiles the kernels with the host compiler's thread-sanitizer instrumentation but
// links no sanitizer runtime: the __tsan_* hooks it calls are defined here. Each access outside
// the running fiber's own stack (a kernel's locals) is classified as device memory (the arena
// below), static or dynamic shared memory, or neither, and then:
// - memcheck: device bytes must lie in a live allocation, shared bytes inside the block's static
//   + dynamic shared memory (dynamic: exactly the launch's bytes; static: the section holding
//   every kernel's __shared__ variables, so an overrun of one static variable into the next is
//   not seen), and every access must be naturally aligned;
// - initcheck: a device byte read must have been written since its allocation (by a copy, a
//   memset or a kernel's store; fresh allocations are also poisoned with 0xff);
// - racecheck: a shared byte accessed by two threads of a block, one of them writing, with no
//   __syncthreads between them (nor, within a warp, a collective both take part in: __syncwarp,
//   a shuffle, a vote, mma.sync, ldmatrix) is a hazard, unless both are atomics; a device byte
//   stored plainly by one block and read, stored or updated atomically by another block of the
//   same launch is a race; and in a programmatic dependent launch (kPdl), a device byte that a
//   thread reads before its pdl_wait() (griddepcontrol.wait) and the previous kernel in the stream
//   wrote, or that it writes there and the previous kernel read or wrote, is a race between the
//   two kernels. That is as if the dependent kernel's code before its wait ran before the previous
//   kernel ran at all, the most a GPU may overlap them (each kernel triggers its dependents only
//   after its own wait, so no kernel older than the previous one is still running).
// The first error fails the launch with one message; the kernel never runs on.
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "internal.h"

extern "C" char __start_mura_shared[] __attribute__((weak));
extern "C" char __stop_mura_shared[] __attribute__((weak));

namespace mura_emu {
namespace {

// ---- device memory -----------------------------------------------------------------------------
// One reserved range of address space, allocated bottom up and never reused (a freed
// allocation's addresses stay freed), each allocation 256-byte aligned (as cudaMalloc) and
// followed by a redzone, so that an overrun lands in no neighbour. Per device byte: a state byte
// (addressable, written) and, for the global race check, a tag pair valid for one launch.
constexpr uint8_t kAddressable = 1, kWritten = 2;
constexpr size_t kPage = 4096;

struct Arena {
    uintptr_t base = 0;
    size_t size = 0;
    uint8_t* state = nullptr;         // [size]
    uint16_t* tags = nullptr;         // [size]: storing block's tag | reading block's tag << 8
    uint32_t* page_launch = nullptr;  // [size / kPage]: the launch the page's tags belong to
    uintptr_t top = 0;                // the next free address
    uint8_t* pdl = nullptr;           // [size]: what the last two launches did to the byte (kPdl*)
    uint32_t* pdl_page = nullptr;     // [size / kPage]: the g_pdl_clock of the page's kPdlCur* bits
};
Arena g_arena;

struct Alloc {
    size_t size;
    uint64_t id;  // 1, 2, ... in allocation order
    bool freed;
};
std::mutex g_alloc_mutex;  // allocation calls come from any thread, launches from one at a time
std::map<uintptr_t, Alloc> g_allocs;  // by base address; freed ones stay, for messages
uint64_t g_alloc_count;

void* reserve(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}

// Reserves the arena and its shadows: 1 TiB of device addresses, less where the OS refuses.
bool arena_init() {
    for (size_t size = size_t(1) << 40; size >= size_t(1) << 32; size >>= 1) {
        void* base = reserve(size);
        void* state = reserve(size);
        void* tags = reserve(2 * size);
        void* pages = reserve(size / kPage * 4);
        void* pdl = reserve(size);
        void* pdl_pages = reserve(size / kPage * 4);
        if (base && state && tags && pages && pdl && pdl_pages) {
            g_arena = Arena{(uintptr_t)base, size, (uint8_t*)state, (uint16_t*)tags, (uint32_t*)pages,
                            (uintptr_t)base, (uint8_t*)pdl, (uint32_t*)pdl_pages};
            return true;
        }
        if (base) munmap(base, size);
        if (state) munmap(state, size);
        if (tags) munmap(tags, 2 * size);
        if (pages) munmap(pages, size / kPage * 4);
        if (pdl) munmap(pdl, size);
        if (pdl_pages) munmap(pdl_pages, size / kPage * 4);
    }
    return false;
}

// Zeroes [p, p + n) and gives its whole pages back to the OS.
void discard(void* p, size_t n) {
    uintptr_t a = (uintptr_t)p, lo = (a + kPage - 1) & ~(kPage - 1), hi = (a + n) & ~(kPage - 1);
    if (lo >= hi) {
        memset(p, 0, n);
        return;
    }
    memset(p, 0, lo - a);
    memset((void*)hi, 0, a + n - hi);
    madvise((void*)lo, hi - lo, MADV_DONTNEED);
}

// The allocation holding device address `a`, or the nearest one (before or after it).
const std::pair<const uintptr_t, Alloc>* nearest_alloc(uintptr_t a) {
    auto next = g_allocs.upper_bound(a);
    if (next == g_allocs.begin()) return next == g_allocs.end() ? nullptr : &*next;
    auto prev = std::prev(next);
    if (a < prev->first + prev->second.size || next == g_allocs.end()) return &*prev;
    return a - (prev->first + prev->second.size) <= next->first - a ? &*prev : &*next;
}

// "at offset N of allocation #I (S bytes at 0x...)", with where `a` lies relative to it.
void describe_global(char* out, size_t len, uintptr_t a, unsigned bytes) {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto* al = nearest_alloc(a);
    if (!al) {
        snprintf(out, len, "in no allocation (none made yet)");
        return;
    }
    const uintptr_t base = al->first;
    const Alloc& x = al->second;
    const long long off = (long long)(a - base);
    int n = snprintf(out, len, "at offset %lld of allocation #%llu (%zu bytes at %#lx%s)", off,
                     (unsigned long long)x.id, x.size, (unsigned long)base, x.freed ? ", freed" : "");
    if (n < 0 || (size_t)n >= len) return;
    if (off < 0)
        snprintf(out + n, len - n, ": %lld bytes before its start", -off);
    else if ((size_t)off >= x.size)
        snprintf(out + n, len - n, ": %lld bytes past its end", off - (long long)x.size);
    else if ((size_t)off + bytes > x.size)
        snprintf(out + n, len - n, ": running %zu bytes past its end", (size_t)off + bytes - x.size);
}

// ---- shared memory -----------------------------------------------------------------------------
// Static __shared__ variables live in the mura_shared section (cuda_emu.h); dynamic shared
// memory is the first dyn_bytes of a kDynRegion buffer. A shared byte's offset: static ones
// first, then dynamic ones from dyn_base().
size_t static_shared_bytes() { return (size_t)(__stop_mura_shared - __start_mura_shared); }
size_t dyn_base() { return (static_shared_bytes() + 15) & ~size_t(15); }

const char* space_of(size_t off) { return off < dyn_base() ? "static" : "dynamic"; }
size_t offset_in_space(size_t off) { return off < dyn_base() ? off : off - dyn_base(); }

// The racecheck state of a 4-byte shared word: its last write (thread, barrier epoch, warp-sync
// count, atomic?, which of its bytes) and its two most recent readers from different warps (and
// their bytes). A field whose epoch is not the current one is stale: a barrier (or another
// block) came between. (Two threads writing different bytes of one word in one epoch: only the
// later write is kept, so a hazard with the earlier one's bytes can go unseen.)
struct SharedRec {
    uint32_t w_epoch, w_sync, r_epoch, r_sync, r2_epoch, r2_sync;
    uint16_t w_tid, r_tid, r2_tid;
    uint8_t w_bytes;  // bit i: byte i written; bit 4: by an atomic
    uint8_t r_bytes;  // bits 0-3: r's bytes; 4-7: r2's
};
constexpr uint8_t kAtomicBit = 16;
constexpr size_t kSharedWords = (99 * 1024) / 4 + 1;  // dynamic shared memory's, static ones added
SharedRec* g_shared;  // [static words + kSharedWords]
uint32_t g_epoch;     // +1 at every block start and every completed __syncthreads
uint32_t g_sync;      // +1 at every completed warp collective
uint32_t g_full_sync[kMaxThreads / 32];  // per warp: g_sync at its last whole-warp collective
uint32_t g_pair_sync[kMaxThreads / 32][32][32];  // ... at the last partial one two lanes shared

// ---- global races ------------------------------------------------------------------------------
// A block's tag is its linear index mod 254, plus 1 (0: none; 255: several blocks read the
// byte). Blocks 254 apart share a tag, so a race between them goes unseen.
constexpr uint8_t kManyBlocks = 255;
uint32_t g_launch_id;
uint8_t g_tag;
uint64_t g_tag_block[256];  // the latest block (linear) with each tag in this launch

const char* block_str(uint64_t linear) {
    static char buf[48];
    const dim3 g = grid_dim();
    snprintf(buf, sizeof buf, "(%llu,%llu,%llu)", (unsigned long long)(linear % g.x),
             (unsigned long long)(linear / g.x % g.y), (unsigned long long)(linear / g.x / g.y));
    return buf;
}

const char* kind_str(Kind k) {
    switch (k) {
    case Kind::Load: return "read";
    case Kind::Store: return "write";
    case Kind::Atomic: return "atomic";
    case Kind::CpAsyncLoad: return "cp.async read";
    case Kind::CpAsyncStore: return "cp.async write";
    case Kind::LdMatrix: return "ldmatrix row read";
    }
    return "?";
}

[[noreturn]] void global_race(uintptr_t a, unsigned bytes, Kind k, unsigned tid, uint8_t other, const char* what) {
    char where[256];
    describe_global(where, sizeof where, a, bytes);
    char other_s[64];
    if (other == kManyBlocks)
        snprintf(other_s, sizeof other_s, "other blocks");
    else
        snprintf(other_s, sizeof other_s, "block %s", block_str(g_tag_block[other]));
    kernel_error("racecheck: global memory race: thread %s's %u-byte %s at %#lx (%s) %s %s in this launch, "
                 "and blocks are not ordered",
                 thread_str(tid), bytes, kind_str(k), (unsigned long)a, where, what, other_s);
}

void check_global_race(uintptr_t a, unsigned bytes, Kind k, unsigned tid) {
    const size_t off = a - g_arena.base;
    for (size_t page = off / kPage; page <= (off + bytes - 1) / kPage; page++) {
        if (g_arena.page_launch[page] == g_launch_id) continue;
        memset(g_arena.tags + page * kPage, 0, kPage * sizeof(uint16_t));
        g_arena.page_launch[page] = g_launch_id;
    }
    const uint8_t me = g_tag;
    for (unsigned i = 0; i < bytes; i++) {
        uint16_t& t = g_arena.tags[off + i];
        const uint8_t w = (uint8_t)t, r = (uint8_t)(t >> 8);
        if (w && w != me) global_race(a, bytes, k, tid, w, "touches bytes stored by");
        if (k == Kind::Store) {
            if (r && r != me) global_race(a, bytes, k, tid, r, "stores bytes read by");
            t = (uint16_t)(me | r << 8);
        } else {
            t = (uint16_t)(w | (r == 0 || r == me ? me : kManyBlocks) << 8);
        }
    }
}

// ---- programmatic dependent launches ----------------------------------------------------------
// Per device byte, what the current launch (kPdlCur*) and the previous kernel of the same stream
// (kPdlPrev*) did to it. A page's bits belong to the launch of its pdl_page clock (every launch
// gets a new one; a page holds one allocation's data only, so one stream's launches touch it) and
// move to "previous" when the stream's next launch first touches the page: g_prev_clock, the
// clock of the stream's previous launch, 0 when a copy or memset came between (the kernel after
// one cannot overlap the kernel before it; src/gpu/emu.rs keeps each stream's).
constexpr uint8_t kPdlCurW = 1, kPdlCurR = 2, kPdlPrevW = 4, kPdlPrevR = 8;
uint32_t g_pdl_clock, g_prev_clock;
char g_kernel[128], g_prev_kernel[128];  // the current launch's kernel and the previous one's
bool g_waited[kMaxThreads];              // per thread of the running block: past its pdl_wait()

[[noreturn]] void pdl_race(uintptr_t a, unsigned bytes, Kind k, unsigned tid, bool prev_wrote) {
    char where[256];
    describe_global(where, sizeof where, a, bytes);
    kernel_error("racecheck: programmatic dependent launch race: thread %s's %u-byte %s at %#lx (%s), before "
                 "its griddepcontrol.wait (pdl_wait), touches bytes the previous kernel, %s, %s; %s may run "
                 "while %s still does",
                 thread_str(tid), bytes, kind_str(k), (unsigned long)a, where, g_prev_kernel,
                 prev_wrote ? "writes" : "reads", g_kernel, g_prev_kernel);
}

void pdl_track(uintptr_t a, unsigned bytes, Kind k, unsigned tid) {
    const size_t off = a - g_arena.base;
    for (size_t page = off / kPage; page <= (off + bytes - 1) / kPage; page++) {
        uint32_t& clock = g_arena.pdl_page[page];
        if (clock == g_pdl_clock) continue;
        uint8_t* p = g_arena.pdl + page * kPage;
        if (g_prev_clock != 0 && clock == g_prev_clock)
            for (size_t i = 0; i < kPage; i++) p[i] = (uint8_t)((p[i] & (kPdlCurW | kPdlCurR)) << 2);
        else
            memset(p, 0, kPage);
        clock = g_pdl_clock;
    }
    const bool early = (g_run.flags & kPdl) && !g_waited[tid];
    const uint8_t mine = (writes(k) ? kPdlCurW : 0) | (reads(k) ? kPdlCurR : 0);
    for (unsigned i = 0; i < bytes; i++) {
        uint8_t& b = g_arena.pdl[off + i];
        if (early && (b & kPdlPrevW)) pdl_race(a, bytes, k, tid, true);
        if (early && writes(k) && (b & kPdlPrevR)) pdl_race(a, bytes, k, tid, false);
        b |= mine;
    }
}

// ---- memcheck and initcheck of device memory ---------------------------------------------------
bool all_set(const uint8_t* s, unsigned n, uint8_t bit) {
    for (unsigned i = 0; i < n; i++)
        if (!(s[i] & bit)) return false;
    return true;
}

[[noreturn]] void bad_global(uintptr_t a, unsigned bytes, Kind k, unsigned tid, const char* what) {
    char where[256];
    describe_global(where, sizeof where, a, bytes);
    kernel_error("%s: %u-byte %s at %#lx %s, by thread %s", what, bytes, kind_str(k), (unsigned long)a, where,
                 thread_str(tid));
}

void global_access(uintptr_t a, unsigned bytes, Kind k, const void* pc, unsigned tid) {
    const unsigned f = g_run.flags;
    uint8_t* s = g_arena.state + (a - g_arena.base);
    if (f & kMemcheck) {
        if (!all_set(s, bytes, kAddressable)) bad_global(a, bytes, k, tid, "memcheck: out of bounds");
        if (a & (bytes - 1)) bad_global(a, bytes, k, tid, "memcheck: misaligned");
    }
    if (f & kInitcheck) {
        if (reads(k) && !all_set(s, bytes, kWritten))
            bad_global(a, bytes, k, tid, "initcheck: read of device memory nothing wrote (no copy, memset or store)");
        if (writes(k))
            for (unsigned i = 0; i < bytes; i++) s[i] |= kWritten;
    }
    if (f & kRacecheck) check_global_race(a, bytes, k, tid), pdl_track(a, bytes, k, tid);
    if ((f & kProfile) && k != Kind::CpAsyncStore) prof::record(tid, pc, a, bytes, k, false);
}

// ---- racecheck of shared memory ----------------------------------------------------------------
// Whether thread `u`'s access at (epoch, sync) is ordered before thread `t`'s now.
inline __attribute__((always_inline)) bool ordered(unsigned u, uint32_t epoch, uint32_t sync, unsigned t) {
    if (epoch != g_epoch || u == t) return true;
    if (u / 32 != t / 32) return false;
    const unsigned w = t / 32;
    return std::max(g_full_sync[w], g_pair_sync[w][u % 32][t % 32]) > sync;
}

[[noreturn]] void shared_hazard(size_t off, Kind k, unsigned tid, unsigned other, bool other_wrote,
                                bool other_atomic) {
    const char* kind = !reads(k) || k == Kind::Atomic ? (other_wrote ? "write-after-write" : "write-after-read")
                                                      : "read-after-write";
    kernel_error("racecheck: shared memory hazard (%s) at %s shared offset %zu: thread %s's %s and thread %s's "
                 "earlier %s with no __syncthreads between them%s",
                 kind, space_of(off), offset_in_space(off), thread_str(tid, 0), kind_str(k), thread_str(other, 1),
                 other_wrote ? (other_atomic ? "atomic" : "write") : "read",
                 tid / 32 == other / 32 ? " (same warp, and no __syncwarp or other collective of both either)" : "");
}

// Racecheck of the bytes `mask` of shared word `word` by thread t.
void race_shared_word(size_t word, uint8_t mask, Kind k, unsigned t) {
    SharedRec& r = g_shared[word];
    const size_t off = 4 * word + __builtin_ctz(mask);
    const bool atomic = k == Kind::Atomic;
    if ((r.w_bytes & mask) && !ordered(r.w_tid, r.w_epoch, r.w_sync, t) && !(atomic && (r.w_bytes & kAtomicBit)))
        shared_hazard(off, k, t, r.w_tid, true, r.w_bytes & kAtomicBit);
    if (writes(k)) {
        if ((r.r_bytes & mask) && !ordered(r.r_tid, r.r_epoch, r.r_sync, t)) shared_hazard(off, k, t, r.r_tid, false, false);
        if ((r.r_bytes >> 4 & mask) && !ordered(r.r2_tid, r.r2_epoch, r.r2_sync, t))
            shared_hazard(off, k, t, r.r2_tid, false, false);
        const bool same = r.w_epoch == g_epoch && r.w_tid == t;
        r.w_bytes = (uint8_t)((same ? r.w_bytes & 15 : 0) | mask | (atomic ? kAtomicBit : 0));
        r.w_tid = (uint16_t)t, r.w_epoch = g_epoch, r.w_sync = g_sync;
        return;
    }
    // A read: remember it, and a reader of another warp in the same epoch too.
    if (r.r_epoch == g_epoch && r.r_tid == t) {
        r.r_bytes |= mask, r.r_sync = g_sync;
        return;
    }
    uint8_t r2 = r.r_bytes >> 4;
    if (r.r_epoch == g_epoch && r.r_tid / 32 != t / 32)
        r.r2_tid = r.r_tid, r.r2_epoch = r.r_epoch, r.r2_sync = r.r_sync, r2 = r.r_bytes & 15;
    r.r_tid = (uint16_t)t, r.r_epoch = g_epoch, r.r_sync = g_sync;
    r.r_bytes = (uint8_t)(mask | r2 << 4);
}

// The shared-memory offset of [a, a + bytes), -1 when it is not shared memory at all; fails the
// launch when it starts in shared memory and runs past the end.
long long shared_offset(uintptr_t a, unsigned bytes, Kind k, unsigned tid) {
    const uintptr_t s0 = (uintptr_t)__start_mura_shared, ns = static_shared_bytes();
    const uintptr_t d0 = (uintptr_t)g_run.dyn;
    const char* space;
    size_t size, off;
    if (a - s0 < ns) {
        space = "static", size = ns, off = a - s0;
        if (off + bytes <= size) return (long long)off;
    } else if (d0 && a - d0 < kDynRegion) {
        space = "dynamic", size = g_run.dyn_bytes, off = a - d0;
        if (off + bytes <= size) return (long long)(dyn_base() + off);
    } else {
        return -1;
    }
    if (!(g_run.flags & kMemcheck)) return -1;
    kernel_error("memcheck: out of bounds: %u-byte %s at %s shared offset %zu, past the end of the block's %zu "
                 "bytes of %s shared memory, by thread %s",
                 bytes, kind_str(k), space, off, size, space, thread_str(tid));
}

void shared_access(size_t off, uintptr_t a, unsigned bytes, Kind k, const void* pc, unsigned tid) {
    const unsigned f = g_run.flags;
    if ((f & kMemcheck) && (a & (bytes - 1)))
        kernel_error("memcheck: misaligned: %u-byte %s at %s shared offset %zu, by thread %s", bytes, kind_str(k),
                     space_of(off), offset_in_space(off), thread_str(tid));
    if (f & kRacecheck)
        for (size_t w = off / 4; w <= (off + bytes - 1) / 4; w++) {
            const size_t lo = std::max(off, 4 * w), hi = std::min(off + bytes, 4 * w + 4);
            race_shared_word(w, (uint8_t)(((1u << (hi - lo)) - 1) << (lo - 4 * w)), k, tid);
        }
    if ((f & kProfile) && k != Kind::CpAsyncStore && k != Kind::LdMatrix) prof::record(tid, pc, a, bytes, k, true);
}

// Every instrumented access outside the fiber's stack (and outside launches: none).
inline __attribute__((always_inline)) void hook(void* p, unsigned bytes, Kind k, const void* pc) {
    const uintptr_t a = (uintptr_t)p;
    if (!g_run.flags || a - g_run.stack_lo < kStack) return;
    access(a, bytes, k, pc, g_run.tid);
}

}  // namespace

void access(uintptr_t a, unsigned bytes, Kind k, const void* pc, unsigned tid) {
    g_run.pc = pc;
    if (a - g_arena.base < g_arena.size) return global_access(a, bytes, k, pc, tid);
    const long long off = shared_offset(a, bytes, k, tid);
    if (off >= 0) return shared_access((size_t)off, a, bytes, k, pc, tid);
    if (g_run.flags & kMemcheck)
        kernel_error("memcheck: %u-byte %s at %#lx is not device memory (no allocation of this emulator) nor "
                     "shared memory, by thread %s",
                     bytes, kind_str(k), (unsigned long)a, thread_str(tid));
}

const char* source_of(const void* pc) {
    static char out[256];
    Dl_info info;
    if (!pc || !dladdr(pc, &info) || !info.dli_fbase) return "";
    // A position-independent binary's addresses are offsets from where it was loaded.
    const bool pie = ((const Elf64_Ehdr*)info.dli_fbase)->e_type == ET_DYN;
    const uintptr_t at = (uintptr_t)pc - 1 - (pie ? (uintptr_t)info.dli_fbase : 0);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "addr2line -i -e /proc/%d/exe %#lx 2>/dev/null", (int)getpid(), (unsigned long)at);
    FILE* f = popen(cmd, "r");
    if (!f) return "";
    char line[512];
    size_t n = 0;
    out[0] = 0;
    for (int i = 0; fgets(line, sizeof line, f); i++) {
        line[strcspn(line, " \n")] = 0;  // (drops " (discriminator N)")
        const char* base = strrchr(line, '/') ? strrchr(line, '/') + 1 : line;
        if (base[0] == '?' || n >= sizeof out - 1) continue;
        n += snprintf(out + n, sizeof out - n, i == 0 ? " at %s" : i == 1 ? " (inlined from %s" : ", %s", base);
    }
    pclose(f);
    if (strchr(out, '(') && n < sizeof out - 1) snprintf(out + n, sizeof out - n, ")");
    return out;
}

void atomic_access(const void* p, unsigned bytes, const void* pc) { hook((void*)p, bytes, Kind::Atomic, pc); }

void pdl_wait() { g_waited[g_run.tid] = true; }

namespace chk {

uint32_t launch_begin(const char* name, const char* prev_name, uint32_t prev_clock) {
    if (!g_shared) g_shared = (SharedRec*)calloc(dyn_base() / 4 + kSharedWords, sizeof(SharedRec));
    if (++g_pdl_clock == 0) {  // (after 2^32 launches: forget every page's bits)
        memset(g_arena.pdl_page, 0, g_arena.size / kPage * 4);
        g_pdl_clock = 1, prev_clock = 0;
    }
    g_prev_clock = prev_clock;
    snprintf(g_kernel, sizeof g_kernel, "%s", name);
    snprintf(g_prev_kernel, sizeof g_prev_kernel, "%s", prev_name ? prev_name : "");
    if (++g_launch_id == 0) {  // (after 2^32 launches: forget every page's tags)
        memset(g_arena.page_launch, 0xff, g_arena.size / kPage * 4);
        g_launch_id = 1;
    }
    return g_pdl_clock;
}

void block_begin() {
    if (g_epoch > 0xf0000000u || g_sync > 0xf0000000u) {  // start the clocks over
        memset(g_shared, 0, (dyn_base() / 4 + kSharedWords) * sizeof(SharedRec));
        memset(g_full_sync, 0, sizeof g_full_sync);
        memset(g_pair_sync, 0, sizeof g_pair_sync);
        g_epoch = g_sync = 0;
    }
    g_epoch++;
    memset(g_waited, 0, sizeof g_waited);
    g_tag = (uint8_t)(g_run.block_linear % 254 + 1);
    g_tag_block[g_tag] = g_run.block_linear;
}

void barrier() { g_epoch++; }

void warp_sync(unsigned warp, unsigned mask, bool whole_warp) {
    g_sync++;
    if (whole_warp) {
        g_full_sync[warp] = g_sync;
        return;
    }
    for (unsigned i = 0; i < 32; i++)
        if (mask >> i & 1)
            for (unsigned j = 0; j < 32; j++)
                if (mask >> j & 1) g_pair_sync[warp][i][j] = g_sync;
}

}  // namespace chk
}  // namespace mura_emu

using namespace mura_emu;

// ---- the device memory API of src/gpu/emu.rs ---------------------------------------------------

// A new allocation of `bytes` (poisoned with 0xff when `poison`), or 0 with a message in `err`.
// Returns 0 with a message in `err` on failure, and `*out_of_space` = 1 when the failure is the
// arena being used up (the device's memory, as the Rust side reports it).
extern "C" uint64_t mura_emu_alloc(size_t bytes, int poison, int* out_of_space, char* err, size_t errlen) {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    *out_of_space = 0;
    if (!g_arena.base && !arena_init()) {
        snprintf(err, errlen, "cannot reserve address space for device memory");
        return 0;
    }
    const size_t n = bytes ? bytes : 1, align = n >= 65536 ? kPage : 256;
    const size_t redzone = std::clamp(n / 4, kPage, size_t(1) << 20);
    const uintptr_t p = (g_arena.top + align - 1) & ~(uintptr_t)(align - 1);
    if (n > g_arena.size || p + n + redzone > g_arena.base + g_arena.size) {  // (no wrap-around)
        *out_of_space = 1;
        snprintf(err, errlen, "out of device address space (%zu GiB, never reused) allocating %zu bytes",
                 g_arena.size >> 30, bytes);
        return 0;
    }
    g_arena.top = p + n + redzone;
    memset(g_arena.state + (p - g_arena.base), kAddressable, bytes);
    if (poison) memset((void*)p, 0xff, bytes);
    g_allocs[p] = Alloc{bytes, ++g_alloc_count, false};
    return p;
}

extern "C" void mura_emu_free(uint64_t p) {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.freed) return;
    it->second.freed = true;
    const size_t off = (uintptr_t)p - g_arena.base, n = it->second.size;
    discard(g_arena.state + off, n);
    discard((void*)(uintptr_t)p, n);
}

// [p, p + bytes) was written by the host (a copy or a memset): initialised.
extern "C" void mura_emu_written(uint64_t p, size_t bytes) {
    memset(g_arena.state + ((uintptr_t)p - g_arena.base), kAddressable | kWritten, bytes);
}

// ---- the hooks of the host compiler's thread-sanitizer instrumentation ------------------------
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define MURA_HOOKS(n)                                                                                      \
    void __tsan_read##n(void* p) { hook(p, n, Kind::Load, __builtin_return_address(0)); }            \
    void __tsan_write##n(void* p) { hook(p, n, Kind::Store, __builtin_return_address(0)); }          \
    void __tsan_unaligned_read##n(void* p) { hook(p, n, Kind::Load, __builtin_return_address(0)); } \
    void __tsan_unaligned_write##n(void* p) { hook(p, n, Kind::Store, __builtin_return_address(0)); }
MURA_HOOKS(1)
MURA_HOOKS(2)
MURA_HOOKS(4)
MURA_HOOKS(8)
MURA_HOOKS(16)
#undef MURA_HOOKS
// GCC reports an access it cannot prove aligned (or knows is not) as an "unaligned" or a range
// access: checked the same way, since on a GPU every access must be naturally aligned. A range of
// another size is a byte-by-byte access (kernels never copy device or shared memory in bulk;
// these are the zeroing of local arrays, which the first test dismisses).
void __tsan_read_range(void* p, size_t n) {
    if (!g_run.flags || (uintptr_t)p - g_run.stack_lo < kStack) return;
    if (n == 2 || n == 4 || n == 8 || n == 16) return hook(p, (unsigned)n, Kind::Load, __builtin_return_address(0));
    for (size_t i = 0; i < n; i++) hook((char*)p + i, 1, Kind::Load, __builtin_return_address(0));
}
void __tsan_write_range(void* p, size_t n) {
    if (!g_run.flags || (uintptr_t)p - g_run.stack_lo < kStack) return;
    if (n == 2 || n == 4 || n == 8 || n == 16) return hook(p, (unsigned)n, Kind::Store, __builtin_return_address(0));
    for (size_t i = 0; i < n; i++) hook((char*)p + i, 1, Kind::Store, __builtin_return_address(0));
}
// clang turns memcpy and friends into these.
void* __tsan_memcpy(void* d, const void* s, size_t n) {
    __tsan_read_range((void*)s, n);
    __tsan_write_range(d, n);
    return memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, size_t n) {
    __tsan_read_range((void*)s, n);
    __tsan_write_range(d, n);
    return memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, size_t n) {
    __tsan_write_range(d, n);
    return memset(d, c, n);
}
}
