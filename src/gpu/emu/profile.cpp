// The profiler: what one launch asks of the memory system, counted as Nsight Compute counts it.
//
// Each lane logs its global and shared accesses (instruction address, address, width, kind).
// When lanes converge (a collective completes: its lanes; a __syncthreads or the block's end:
// all), their logs become warp-level instructions: the k-th execution of an instruction by each
// lane is one request of the warp (in convergent code the logs line up entry by entry). Per
// request: global, the distinct 32-byte sectors its lanes touch; shared, the wavefronts its
// banks need (32 banks of 4 bytes; 8-byte accesses in two half-warp phases, 16-byte ones in four
// quarter-warp phases; lanes reading the same word share it) against the ideal of one per phase.
// An ldmatrix is one request of one phase per 8x8 matrix (its 8 row addresses); an mma.sync one
// tensor instruction. See src/gpu/emu.rs `Counters` for the Nsight Compute metric of each count.
#include <algorithm>
#include <vector>

#include "internal.h"

namespace mura_emu {
namespace {

struct Entry {
    const void* pc;
    uintptr_t addr;
    uint8_t bytes;
    Kind kind;
    bool shared;
};

std::vector<Entry> g_log[kMaxThreads];  // per thread of the block, since it last converged
Counters* g_out;                        // this launch's counters (null: not profiling)

// Distinct 32-byte sectors of one request.
unsigned sectors(const Entry* const* es, unsigned n) {
    uintptr_t s[64];
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++)
        for (uintptr_t x = es[i]->addr >> 5; x <= (es[i]->addr + es[i]->bytes - 1) >> 5 && k < 64; x++) s[k++] = x;
    std::sort(s, s + k);
    return (unsigned)(std::unique(s, s + k) - s);
}

// Wavefronts of the accesses of one phase: the most distinct 4-byte words any bank serves.
unsigned phase_wavefronts(const uintptr_t* addr, const unsigned* bytes, unsigned n) {
    uint64_t bank_word[128];  // bank << 58 | word
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++)
        for (uintptr_t w = addr[i] >> 2; w <= (addr[i] + bytes[i] - 1) >> 2 && k < 128; w++)
            bank_word[k++] = (uint64_t)(w % 32) << 58 | (w & ((uint64_t(1) << 58) - 1));
    std::sort(bank_word, bank_word + k);
    k = (unsigned)(std::unique(bank_word, bank_word + k) - bank_word);
    unsigned best = 0;
    for (unsigned i = 0, run = 0; i < k; i++) {
        run = i > 0 && bank_word[i] >> 58 == bank_word[i - 1] >> 58 ? run + 1 : 1;
        best = std::max(best, run);
    }
    return best;
}

// Wavefronts (and the ideal count) of one shared request by lanes `lane[i]`.
void shared_wavefronts(const Entry* const* es, const unsigned* lane, unsigned n, uint64_t* wf, uint64_t* ideal) {
    unsigned width = 0;
    for (unsigned i = 0; i < n; i++) width = std::max(width, (unsigned)es[i]->bytes);
    const unsigned per_phase = width <= 4 ? 32 : width == 8 ? 16 : 8;
    for (unsigned p = 0; p < 32 / per_phase; p++) {
        uintptr_t addr[32];
        unsigned bytes[32], m = 0;
        for (unsigned i = 0; i < n; i++)
            if (lane[i] / per_phase == p) addr[m] = es[i]->addr, bytes[m++] = es[i]->bytes;
        if (m == 0) continue;
        *wf += phase_wavefronts(addr, bytes, m);
        *ideal += 1;
    }
}

// One warp-level instruction: the same instruction's k-th execution in each lane.
void request(const Entry* const* es, const unsigned* lane, unsigned n) {
    Counters& c = *g_out;
    uint64_t bytes = 0;
    for (unsigned i = 0; i < n; i++) bytes += es[i]->bytes;
    if (es[0]->shared) {
        switch (es[0]->kind) {
        case Kind::Load: c.sld_requests++, shared_wavefronts(es, lane, n, &c.sld_wavefronts, &c.sld_ideal); break;
        case Kind::Store: c.sst_requests++, shared_wavefronts(es, lane, n, &c.sst_wavefronts, &c.sst_ideal); break;
        case Kind::Atomic: c.satom_requests++; break;
        default: break;
        }
        return;
    }
    const unsigned s = sectors(es, n);
    switch (es[0]->kind) {
    case Kind::Load: c.gld_requests++, c.gld_sectors += s, c.gld_bytes += bytes; break;
    case Kind::Store: c.gst_requests++, c.gst_sectors += s, c.gst_bytes += bytes; break;
    case Kind::Atomic: c.gatom_requests++, c.gatom_sectors += s, c.gatom_bytes += bytes; break;
    case Kind::CpAsyncLoad: c.ldgsts_requests++, c.ldgsts_sectors += s, c.ldgsts_bytes += bytes; break;
    default: break;
    }
}

// The logs of `lanes` (thread indices) as warp-level requests.
void flush(const unsigned* lanes, unsigned nl) {
    bool same = nl > 0;
    const size_t len = nl ? g_log[lanes[0]].size() : 0;
    for (unsigned i = 1; i < nl && same; i++) {
        const std::vector<Entry>& l = g_log[lanes[i]];
        same = l.size() == len;
        for (size_t j = 0; j < len && same; j++) same = l[j].pc == g_log[lanes[0]][j].pc;
    }
    const Entry* es[32];
    unsigned lane[32];
    if (same) {  // convergent code: entry j of every lane is one request
        for (size_t j = 0; j < len; j++) {
            for (unsigned i = 0; i < nl; i++) es[i] = &g_log[lanes[i]][j], lane[i] = lanes[i] % 32;
            request(es, lane, nl);
        }
    } else {  // divergent: group by (instruction, its k-th execution in the lane)
        struct Key {
            const void* pc;
            size_t k;
            unsigned lane;
            const Entry* e;
        };
        std::vector<Key> keys;
        for (unsigned i = 0; i < nl; i++) {
            std::vector<std::pair<const void*, size_t>> order;  // (pc, position)
            const std::vector<Entry>& l = g_log[lanes[i]];
            for (size_t j = 0; j < l.size(); j++) order.push_back({l[j].pc, j});
            std::stable_sort(order.begin(), order.end(),
                             [](const auto& a, const auto& b) { return a.first < b.first; });
            for (size_t j = 0, k = 0; j < order.size(); j++) {
                k = j > 0 && order[j].first == order[j - 1].first ? k + 1 : 0;
                keys.push_back(Key{order[j].first, k, lanes[i] % 32, &l[order[j].second]});
            }
        }
        std::sort(keys.begin(), keys.end(), [](const Key& a, const Key& b) {
            return a.pc != b.pc ? a.pc < b.pc : a.k != b.k ? a.k < b.k : a.lane < b.lane;
        });
        for (size_t j = 0; j < keys.size();) {
            unsigned n = 0;
            for (size_t i = j; i < keys.size() && keys[i].pc == keys[j].pc && keys[i].k == keys[j].k && n < 32; i++)
                es[n] = keys[i].e, lane[n++] = keys[i].lane;
            request(es, lane, n);
            j += n;
        }
    }
    for (unsigned i = 0; i < nl; i++) g_log[lanes[i]].clear();
}

}  // namespace

namespace prof {

void launch_begin(Counters* out) {
    g_out = out;
    for (std::vector<Entry>& l : g_log) l.clear();  // (a failed launch leaves logs behind)
}

void record(unsigned tid, const void* pc, uintptr_t addr, unsigned bytes, Kind kind, bool shared) {
    g_log[tid].push_back(Entry{pc, addr, (uint8_t)bytes, kind, shared});
}

void flush_lanes(unsigned warp, unsigned mask) {
    if (!g_out) return;
    unsigned lanes[32], n = 0;
    for (unsigned l = 0; l < 32; l++)
        if ((mask >> l & 1) && warp * 32 + l < g_run.nthreads) lanes[n++] = warp * 32 + l;
    flush(lanes, n);
}

void flush_block() {
    if (!g_out) return;
    for (unsigned w = 0; w * 32 < g_run.nthreads; w++) flush_lanes(w, 0xffffffffu);
}

void ldmatrix(const void* const rows[], unsigned nrows) {
    if (!g_out) return;
    g_out->ldsm_requests++;
    for (unsigned m = 0; m < nrows / 8; m++) {
        uintptr_t addr[8];
        unsigned bytes[8];
        for (unsigned r = 0; r < 8; r++) addr[r] = (uintptr_t)rows[8 * m + r], bytes[r] = 16;
        g_out->ldsm_wavefronts += phase_wavefronts(addr, bytes, 8);
        g_out->ldsm_ideal++;
    }
}

void mma() {
    if (g_out) g_out->hmma++;
}

}  // namespace prof
}  // namespace mura_emu
