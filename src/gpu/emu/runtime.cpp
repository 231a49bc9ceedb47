// The emulator's runtime: fibers, the block scheduler, barriers and warp collectives.
//
// A launch runs its blocks one after another on the calling OS thread (callers serialise
// launches). Each CUDA thread of a block is a fiber with its own guard-paged stack, switched by a
// small hand-written x86-64 context switch (glibc's swapcontext makes a syscall per switch).
// Errors in kernel code (a bad warp mask, a divergent barrier, and what checks.cpp finds) abandon
// the launch and come back as an error string, never as an abort.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
#define MURA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MURA_ASAN 1
#endif
#endif
#ifdef MURA_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

// ---- context switch ----------------------------------------------------------------------------
// mura_switch(save, to): push callee-saved registers and the FP control words, store rsp in
// *save, load `to`, pop the same. A new fiber's stack is laid out so that the final `ret` lands in
// mura_fiber_entry with r12 = argument and r13 = function.
extern "C" void mura_switch(void** save, void* to);
extern "C" void mura_fiber_entry();
asm(R"(
.text
.globl mura_switch
.type mura_switch,@function
mura_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size mura_switch,.-mura_switch
.globl mura_fiber_entry
.type mura_fiber_entry,@function
mura_fiber_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
.size mura_fiber_entry,.-mura_fiber_entry
)");

extern "C" char __start_mura_shared[] __attribute__((weak));
extern "C" char __stop_mura_shared[] __attribute__((weak));

namespace mura_emu {

// An asynchronous 16-byte global -> shared copy in flight (cp.async): the source is read when it
// is issued, the destination written only when the thread waits for its group (cp_async_wait), so
// a kernel that reads shared memory before waiting sees what was there before, as it may on a GPU.
// `group`: the commit group it belongs to (the number of commits before it was issued).
struct CpAsync {
    void* dst;
    unsigned group;
    unsigned char bytes[16];
};
constexpr unsigned kMaxCpAsync = 64;  // in flight per thread

struct ThreadCtx {
    uint3 tid;
    unsigned lane;
    unsigned cp_pending, cp_groups;  // copies in flight; groups committed
    CpAsync cp[kMaxCpAsync];
};

Running g_run;
ThreadCtx* g_thread;  // the running fiber's thread
uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;

uint3 thread_idx() { return g_thread->tid; }
uint3 block_idx() { return g_block_idx; }
dim3 block_dim() { return g_block_dim; }
dim3 grid_dim() { return g_grid_dim; }

const char* thread_str(unsigned tid, int slot) {
    static char buf[4][40];
    const unsigned x = g_block_dim.x, y = g_block_dim.y;
    snprintf(buf[slot & 3], sizeof buf[0], "(%u,%u,%u)", tid % x, tid / x % y, tid / (x * y));
    return buf[slot & 3];
}

namespace {

enum class St { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
    ThreadCtx ctx;
    void* sp;
    St st;
    Site site;   // barrier or collective being waited at
    Op op;
    unsigned mask;
    Lane* lane;  // this lane's operands while at a collective
    char* stack;
};

struct Launch {
    void (*tramp)(void**);
    void** params;
    Fiber fibers[kMaxThreads];
    unsigned n = 0, live = 0, at_barrier = 0;
    unsigned arrived[kMaxThreads / 32];  // per warp: lanes waiting at a collective
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
    bool failed = false;
    bool err_has_block = false;  // (kernel_error's messages name the block before the source line)
    char err[1024];
    unsigned char* dyn = nullptr;  // kDynRegion bytes, mapped once
    unsigned dyn_bytes = 0;
    // Odd blocks (by blockIdx.x + y + z) run adversarially: cp.async copies land as issued, and
    // each warp, last first, runs until all its threads block at a barrier or finish before the
    // next warp starts, so a warp overwriting a stage that another warp still reads shows. Even
    // blocks run the warps in lockstep with copies landing only at their wait, so a thread
    // reading a stage before waiting for it shows. (Correct code gives the same values both
    // ways, up to the order of float atomics.)
    bool adversary = false;
#ifdef MURA_ASAN
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
};
Launch L;
char* g_stacks[kMaxThreads];  // allocated on first use, kept for later launches

void fail(const char* fmt, ...) {
    if (L.failed) return;
    L.failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L.err, sizeof L.err, fmt, ap);
    va_end(ap);
}

bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0); }

const char* base(const char* path) {
    const char* s = strrchr(path, '/');
    return s ? s + 1 : path;
}

// Switch from the running fiber back to the scheduler. `finished` fibers never come back.
void yield(bool finished = false) {
    Fiber* f = L.cur;
#ifdef MURA_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(finished ? nullptr : &fake, L.sched_stack_bottom,
                                   L.sched_stack_size);
    mura_switch(&f->sp, L.sched_sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    (void)finished;
    mura_switch(&f->sp, L.sched_sp);
#endif
}

void fiber_main(void*) {
#ifdef MURA_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &L.sched_stack_bottom, &L.sched_stack_size);
#endif
    L.tramp(L.params);
    L.cur->st = St::Done;
    L.live--;
    yield(true);
    __builtin_trap();
}

void resume(Fiber* f) {
    L.cur = f;
    g_thread = &f->ctx;
    g_run.tid = (unsigned)(f - L.fibers);
    g_run.stack_lo = (uintptr_t)f->stack;
#ifdef MURA_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f->stack, kStack);
    mura_switch(&L.sched_sp, f->sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    mura_switch(&L.sched_sp, f->sp);
#endif
}

char* stack_for(unsigned i) {
    if (!g_stacks[i]) {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* m = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return nullptr;
        mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
        g_stacks[i] = (char*)m + page;
    }
    return g_stacks[i];
}

void init_fiber(Fiber* f, unsigned i) {
    f->stack = stack_for(i);
    uint64_t* top = (uint64_t*)(f->stack + kStack - 16);  // 16-aligned: rsp after the `ret`
    uint64_t* sp = top - 8;
    uint32_t csr[2] = {0, 0};
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    memcpy(&sp[0], csr, 8);
    sp[1] = 0;                             // r15
    sp[2] = 0;                             // r14
    sp[3] = (uint64_t)(void*)&fiber_main;  // r13: function
    sp[4] = 0;                             // r12: argument
    sp[5] = 0;                             // rbx
    sp[6] = 0;                             // rbp
    sp[7] = (uint64_t)(void*)&mura_fiber_entry;
    f->sp = sp;
    f->st = St::Runnable;
}

__attribute__((no_sanitize_address)) void poison(char* p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (char)0xff;  // NaN as float/bf16, -1 as int
}

// Whether [p, p + bytes) lies in the block's static or dynamic shared memory.
bool in_shared(const void* p, unsigned bytes) {
    const char* d = (const char*)p;
    return (d >= __start_mura_shared && d + bytes <= __stop_mura_shared) ||
           (d >= (const char*)L.dyn && d + bytes <= (const char*)L.dyn + L.dyn_bytes);
}

// Why nobody can run: a barrier that some threads will never reach, or a collective whose lanes
// will never all arrive.
void diagnose_deadlock() {
    for (unsigned i = 0; i < L.n; i++) {
        Fiber& f = L.fibers[i];
        if (f.st == St::AtBarrier) {
            unsigned done = 0;
            for (unsigned j = 0; j < L.n; j++) done += L.fibers[j].st == St::Done;
            fail("divergent __syncthreads at %s:%d: %u of %u threads wait there, %u exited", base(f.site.file),
                 f.site.line, L.at_barrier, L.n, done);
            return;
        }
        if (f.st == St::AtWarp) {
            unsigned warp = i / 32;
            for (unsigned l = 0; l < 32; l++) {
                if (!(f.mask >> l & 1)) continue;
                Fiber& g = L.fibers[warp * 32 + l];
                if (g.st != St::AtWarp) {
                    fail("warp collective at %s:%d (mask 0x%08x) waits for lane %u, which %s", base(f.site.file),
                         f.site.line, f.mask, l, g.st == St::Done ? "exited" : "waits at __syncthreads");
                    return;
                }
            }
        }
    }
    fail("emulator deadlock");
}

bool run_block() {
    L.live = L.n;
    L.at_barrier = 0;
    memset(L.arrived, 0, sizeof L.arrived);
    for (unsigned i = 0; i < L.n; i++) {
        Fiber& f = L.fibers[i];
        unsigned x = g_block_dim.x, y = g_block_dim.y;
        f.ctx.tid = uint3{i % x, (i / x) % y, i / (x * y)};
        f.ctx.lane = i % 32;
        f.ctx.cp_pending = f.ctx.cp_groups = 0;  // (copies never waited for died with their block)
        init_fiber(&f, i);
    }
    while (L.live > 0) {
        bool ran = false;
        if (!L.adversary) {
            for (unsigned i = 0; i < L.n && !L.failed; i++) {
                if (L.fibers[i].st != St::Runnable) continue;
                resume(&L.fibers[i]);
                ran = true;
            }
        } else {
            for (unsigned w = (L.n + 31) / 32; w-- > 0 && !L.failed;) {
                for (bool more = true; more && !L.failed;) {
                    more = false;
                    for (unsigned i = w * 32; i < L.n && i < w * 32 + 32 && !L.failed; i++) {
                        if (L.fibers[i].st != St::Runnable) continue;
                        resume(&L.fibers[i]);
                        ran = more = true;
                    }
                }
            }
        }
        if (L.failed) return false;
        if (!ran) {
            diagnose_deadlock();
            return false;
        }
    }
    prof::flush_block();
    return true;
}

}  // namespace

void kernel_error(const char* fmt, ...) {
    if (!L.failed) {
        L.failed = true;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(L.err, sizeof L.err, fmt, ap);
        va_end(ap);
        const size_t n = strlen(L.err);
        snprintf(L.err + n, sizeof L.err - n, " (block %u,%u,%u)%s", g_block_idx.x, g_block_idx.y, g_block_idx.z,
                 source_of(g_run.pc));
        L.err_has_block = true;
    }
    yield();
    __builtin_trap();  // (a failed launch never resumes its fibers)
}

// ---- asynchronous copies (cp.async) ------------------------------------------------------------
// The global read happens at issue and the shared write when the copy lands; each is an access
// of the issuing thread for the checkers (the write also at issue: from then on it may land).

void cp_async_issue(void* dst, const void* src) {
    ThreadCtx* t = g_thread;
    const void* pc = __builtin_return_address(0);
    if (g_run.flags) {
        access((uintptr_t)src, 16, Kind::CpAsyncLoad, pc, g_run.tid);
        access((uintptr_t)dst, 16, Kind::CpAsyncStore, pc, g_run.tid);
    }
    if ((((uintptr_t)dst | (uintptr_t)src) & 15) != 0 || !in_shared(dst, 16)) {
        fail("cp.async from %p to %p: both must be 16-byte aligned, the destination in shared memory", src,
             dst);
        return;
    }
    if (L.adversary) {  // landed at once: a wait never brings stale data back
        memcpy(dst, src, 16);
        return;
    }
    if (t->cp_pending == kMaxCpAsync) {
        fail("more than %u cp.async copies in flight in one thread", kMaxCpAsync);
        return;
    }
    CpAsync& c = t->cp[t->cp_pending++];
    c.dst = dst;
    c.group = t->cp_groups;
    memcpy(c.bytes, src, 16);
}

void cp_async_commit() { g_thread->cp_groups++; }

// cp.async.wait_group N: the copies of every committed group but the newest N land (in issue
// order); those of the newest N, and copies not committed yet, stay in flight.
void cp_async_wait(unsigned newest_pending) {
    ThreadCtx* t = g_thread;
    const unsigned done = t->cp_groups > newest_pending ? t->cp_groups - newest_pending : 0;
    unsigned kept = 0;
    for (unsigned i = 0; i < t->cp_pending; i++) {
        if (t->cp[i].group < done) {
            if (g_run.flags)
                access((uintptr_t)t->cp[i].dst, 16, Kind::CpAsyncStore, __builtin_return_address(0), g_run.tid);
            memcpy(t->cp[i].dst, t->cp[i].bytes, 16);
        } else
            t->cp[kept++] = t->cp[i];
    }
    t->cp_pending = kept;
}

namespace {
// ---- warp collectives --------------------------------------------------------------------------
const char* op_name(Op op) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp", "mma.sync",
                                  "ldmatrix.x1", "ldmatrix.x2", "ldmatrix.x4", "ldmatrix.x2.trans",
                                  "ldmatrix.x4.trans"};
    return names[(int)op];
}

uint16_t lo16(uint32_t v) { return (uint16_t)(v & 0xffff); }
uint16_t hi16(uint32_t v) { return (uint16_t)(v >> 16); }
float bf(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

// D = A*B + C for one m16n8k16 tile, from the per-lane fragments of the PTX ISA's layout:
// g = lane/4, t = lane%4; A regs {a0..a3} hold (row g, cols 2t..2t+1), (row g+8, same cols),
// (row g, cols 2t+8..), (row g+8, cols 2t+8..); B regs {b0,b1} hold (rows 2t..2t+1, col g) and
// (rows 2t+8.., col g); C/D hold (row g, cols 2t..2t+1) and (row g+8, cols 2t..2t+1).
void mma_m16n8k16(Fiber* w) {
    float A[16][16], B[16][8], C[16][8];
    for (unsigned lane = 0; lane < 32; lane++) {
        const uint32_t* in = w[lane].lane->in;
        unsigned g = lane / 4, t = lane % 4;
        for (unsigned r = 0; r < 4; r++) {
            unsigned row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
            A[row][col] = bf(lo16(in[r]));
            A[row][col + 1] = bf(hi16(in[r]));
        }
        for (unsigned r = 0; r < 2; r++) {
            B[2 * t + r * 8][g] = bf(lo16(in[4 + r]));
            B[2 * t + r * 8 + 1][g] = bf(hi16(in[4 + r]));
        }
        for (unsigned r = 0; r < 4; r++) C[g + (r >> 1) * 8][2 * t + (r & 1)] = __uint_as_float(in[6 + r]);
    }
    for (unsigned lane = 0; lane < 32; lane++) {
        unsigned g = lane / 4, t = lane % 4;
        for (unsigned r = 0; r < 4; r++) {
            unsigned row = g + (r >> 1) * 8, col = 2 * t + (r & 1);
            float acc = C[row][col];
            for (unsigned k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
            w[lane].lane->out[r] = __float_as_uint(acc);
        }
    }
}

// ldmatrix .m8n8 .b16: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, for
// each matrix, the two elements at row l/4, columns 2(l%4)..+1 (transposed: column l/4, rows ..).
void ldmatrix(Fiber* w, unsigned nmat, bool trans) {
    const void* rows[32];
    const unsigned warp0 = (unsigned)(w - L.fibers);
    for (unsigned r = 0; r < 8 * nmat; r++) {
        rows[r] = w[r].lane->ptr;
        const uintptr_t a = (uintptr_t)rows[r];
        if ((a & 15) || !in_shared(rows[r], 16)) {
            g_run.pc = nullptr;
            kernel_error("ldmatrix row address %#lx of lane %u: must be 16-byte aligned, in shared memory",
                         (unsigned long)a, r);
        }
        if (g_run.flags) access(a, 16, Kind::LdMatrix, nullptr, warp0 + r);
    }
    prof::ldmatrix(rows, 8 * nmat);
    for (unsigned m = 0; m < nmat; m++) {
        uint16_t tile[8][8];
        for (unsigned r = 0; r < 8; r++) memcpy(tile[r], w[8 * m + r].lane->ptr, 16);
        for (unsigned lane = 0; lane < 32; lane++) {
            unsigned r = lane / 4, c = 2 * (lane % 4);
            uint16_t a = trans ? tile[c][r] : tile[r][c], b = trans ? tile[c + 1][r] : tile[r][c + 1];
            w[lane].lane->out[m] = (uint32_t)a | ((uint32_t)b << 16);
        }
    }
}

void complete(Fiber* w, Op op, unsigned mask) {
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; l++)
        if (mask >> l & 1) ballot |= (w[l].lane->in[0] != 0) << l;
    switch (op) {
    case Op::Mma: prof::mma(), mma_m16n8k16(w); return;
    case Op::LdMatrix1: ldmatrix(w, 1, false); return;
    case Op::LdMatrix2: ldmatrix(w, 2, false); return;
    case Op::LdMatrix4: ldmatrix(w, 4, false); return;
    case Op::LdMatrix2Trans: ldmatrix(w, 2, true); return;
    case Op::LdMatrix4Trans: ldmatrix(w, 4, true); return;
    default: break;
    }
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1)) continue;
        Lane* me = w[l].lane;
        int arg = (int)me->in[2], width = (int)me->in[3];
        if (op <= Op::ShflXor && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
            fail("%s at %s:%d: width %d is not a power of two <= 32", op_name(op), base(w[l].site.file),
                 w[l].site.line, width);
            return;
        }
        int seg = op <= Op::ShflXor ? (int)l / width * width : 0, src = (int)l;
        switch (op) {
        case Op::ShflIdx: src = seg + (arg & (width - 1)); break;
        case Op::ShflUp: src = (int)l - arg >= seg ? (int)l - arg : (int)l; break;
        case Op::ShflDown: src = (int)l + arg < seg + width ? (int)l + arg : (int)l; break;
        case Op::ShflXor: src = ((int)l ^ arg) < seg + width ? (int)l ^ arg : (int)l; break;
        case Op::Ballot: me->out[0] = ballot; continue;
        case Op::Any: me->out[0] = ballot != 0; continue;
        case Op::All: me->out[0] = ballot == mask; continue;
        default: continue;  // __syncwarp
        }
        if (!(mask >> src & 1)) {
            fail("%s at %s:%d: lane %u reads lane %d, which is not in mask 0x%08x", op_name(op),
                 base(w[l].site.file), w[l].site.line, l, src, mask);
            return;
        }
        me->out[0] = w[src].lane->in[0];
        me->out[1] = w[src].lane->in[1];
    }
}

}  // namespace

void syncthreads(Site s) {
    Fiber* f = L.cur;
    f->st = St::AtBarrier;
    f->site = s;
    if (++L.at_barrier == L.live) {
        chk::barrier();
        prof::flush_block();
        for (unsigned i = 0; i < L.n; i++) {
            Fiber& g = L.fibers[i];
            if (g.st != St::AtBarrier) continue;
            if (!same_site(g.site, s)) {
                fail("divergent __syncthreads: threads wait at %s:%d and at %s:%d", base(s.file), s.line,
                     base(g.site.file), g.site.line);
                yield();
                return;
            }
            g.st = St::Runnable;
        }
        L.at_barrier = 0;
        return;
    }
    yield();
}

unsigned char* dyn_shared() { return L.dyn; }

void warp_op(Op op, unsigned mask, Lane* lane, Site s) {
    Fiber* f = L.cur;
    unsigned me = f->ctx.lane, warp = (unsigned)(f - L.fibers) / 32;
    Fiber* w = &L.fibers[warp * 32];
    unsigned lanes = L.n - warp * 32 < 32 ? L.n - warp * 32 : 32;
    bool aligned = op >= Op::Mma;  // mma/ldmatrix: .aligned, the whole warp
    if (aligned) mask = 0xffffffffu;
    f->st = St::AtWarp;
    f->site = s;
    f->op = op;
    f->mask = mask;
    f->lane = lane;
    if (!(mask >> me & 1))
        fail("%s at %s:%d: calling lane %u is not in mask 0x%08x", op_name(op), base(s.file), s.line, me, mask);
    else if (lanes < 32 && (mask >> lanes) != 0)
        fail("%s at %s:%d: mask 0x%08x names lanes that do not exist (warp has %u threads)", op_name(op),
             base(s.file), s.line, mask, lanes);
    if (L.failed) {
        yield();
        return;
    }
    // Cheap check per arrival: agree with one lane of the mask that is already waiting. Once the
    // whole mask has arrived, check every lane, then complete the collective for all of them.
    unsigned& arrived = L.arrived[warp];
    arrived |= 1u << me;
    unsigned others = arrived & mask & ~(1u << me);
    bool all = (arrived & mask) == mask;
    auto agrees = [&](unsigned l) {  // false after reporting why lane l disagrees
        Fiber& g = w[l];
        if (g.st == St::AtWarp && g.op == op && g.mask == mask && same_site(g.site, s)) return true;
        if (g.st == St::AtWarp)
            fail("divergent warp collective: lane %u is at %s (%s:%d, mask 0x%08x), lane %u at %s (%s:%d, "
                 "mask 0x%08x)",
                 me, op_name(op), base(s.file), s.line, mask, l, op_name(g.op), base(g.site.file), g.site.line,
                 g.mask);
        else
            fail("%s at %s:%d (mask 0x%08x): lane %u %s", op_name(op), base(s.file), s.line, mask, l,
                 g.st == St::Done ? "has exited" : g.st == St::AtBarrier ? "waits at __syncthreads" : "has not arrived");
        return false;
    };
    if (!all) {
        if (others) agrees((unsigned)__builtin_ctz(others));
        yield();
        return;
    }
    for (unsigned l = 0; l < 32; l++) {
        if ((mask >> l & 1) && l != me && !agrees(l)) {
            yield();
            return;
        }
    }
    arrived &= ~mask;
    prof::flush_lanes(warp, mask);
    complete(w, op, mask);
    const unsigned existing = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    chk::warp_sync(warp, mask, (mask & existing) == existing);
    for (unsigned l = 0; l < 32; l++)
        if (mask >> l & 1) w[l].st = St::Runnable;
    if (L.failed) yield();
}

}  // namespace mura_emu

using namespace mura_emu;

// Run one launch to completion. Returns 0, or 1 with a message in `err`.
// Run one launch to completion with the checks and profiling of `flags` (internal.h; the counters
// of a profiled launch are added to *counters). Returns 0, or 1 with a message in `err`.
// What a launch may ask for (src/gpu/emu.rs `Model`).
extern "C" void mura_emu_limits(unsigned* max_threads, unsigned* max_dyn_shared) {
    *max_threads = kMaxThreads;
    *max_dyn_shared = kMaxDynShared;
}

// `name` is the kernel's; `prev_name`, `prev_clock` the previous kernel of its stream and the
// clock its launch returned in *clock (see chk::launch_begin).
extern "C" int mura_emu_launch(const char* name, const char* prev_name, uint32_t prev_clock, uint32_t* clock,
                               void (*tramp)(void**), void** params, const unsigned grid[3],
                               const unsigned block[3], unsigned dyn_shared_bytes, unsigned flags,
                               Counters* counters, char* err, size_t errlen) {
    unsigned n = block[0] * block[1] * block[2];
    L.failed = L.err_has_block = false;
    if (!L.dyn) {
        void* m = mmap(nullptr, kDynRegion, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) fail("cannot map dynamic shared memory");
        else L.dyn = (unsigned char*)m;
    }
    if (n == 0 || n > kMaxThreads || grid[0] * grid[1] * grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535 ||
        block[2] > 64) {
        fail("invalid launch: grid (%u,%u,%u), block (%u,%u,%u)", grid[0], grid[1], grid[2], block[0], block[1],
             block[2]);
    } else if (dyn_shared_bytes > kMaxDynShared) {
        fail("invalid launch: %u bytes of dynamic shared memory (over 99 KiB, the most sm_86/89 allow)",
             dyn_shared_bytes);
    }
    for (unsigned i = 0; i < n && !L.failed; i++)
        if (!stack_for(i)) fail("cannot map fiber stacks");
    if (!L.failed) {
        L.tramp = tramp;
        L.params = params;
        L.n = n;
        g_block_dim = dim3{block[0], block[1], block[2]};
        g_grid_dim = dim3{grid[0], grid[1], grid[2]};
        L.dyn_bytes = dyn_shared_bytes;
        g_run = Running{flags, 0, 0, n, L.dyn, dyn_shared_bytes, 0, nullptr};
        *clock = chk::launch_begin(name, prev_name, prev_clock);
        prof::launch_begin(flags & kProfile ? counters : nullptr);
        size_t shared = (size_t)(__stop_mura_shared - __start_mura_shared);
        for (unsigned z = 0; z < grid[2] && !L.failed; z++)
            for (unsigned y = 0; y < grid[1] && !L.failed; y++)
                for (unsigned x = 0; x < grid[0] && !L.failed; x++) {
                    g_block_idx = uint3{x, y, z};
                    g_run.block_linear = x + (uint64_t)grid[0] * (y + (uint64_t)grid[1] * z);
                    chk::block_begin();
                    L.adversary = ((x + y + z) & 1) != 0;
                    if (shared) poison(__start_mura_shared, shared);
                    poison((char*)L.dyn, dyn_shared_bytes);
                    run_block();
                }
        g_run.flags = 0;
        prof::launch_begin(nullptr);
        if (L.failed && !L.err_has_block) {
            size_t len = strlen(L.err);
            snprintf(L.err + len, sizeof L.err - len, " (block %u,%u,%u)", g_block_idx.x, g_block_idx.y,
                     g_block_idx.z);
        }
    }
    g_thread = nullptr;
    if (!L.failed) return 0;
    snprintf(err, errlen, "%s", L.err);
    return 1;
}
