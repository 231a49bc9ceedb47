// The emulator and kernels/testing/selftest.cu under AddressSanitizer, run by tests/device/emu.rs:
// `emu-asan ok` must exit 0 (fiber switching is clean under ASan); `emu-asan oob` writes one
// element past a heap buffer from a kernel and must die with an ASan report.
#include "testing/selftest.cu"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

extern "C" int mura_emu_launch(const char* name, const char* prev_name, uint32_t prev_clock, uint32_t* clock,
                               void (*tramp)(void**), void** params, const unsigned grid[3],
                               const unsigned block[3], unsigned dyn_shared_bytes, unsigned flags,
                               void* counters, char* err, size_t errlen);

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: emu-asan ok|oob\n");
        return 2;
    }
    int n = 1000, extra = strcmp(argv[1], "oob") == 0 ? 1 : 0;
    float* out = (float*)malloc(sizeof(float) * n);
    void* params[] = {&out, &n, &extra};
    const unsigned grid[3] = {4, 1, 1}, block[3] = {128, 1, 1};
    char err[512];
    uint32_t clock = 0;
    if (mura_emu_launch("selftest_oob_fwd_f32", nullptr, 0, &clock, &mura_emu::trampoline<selftest_oob_fwd_f32>,
                        params, grid, block, 0, 0, nullptr, err, sizeof err)) {
        fprintf(stderr, "launch failed: %s\n", err);
        return 3;
    }
    for (int i = 0; i < n; i++)
        if (out[i] != (float)i) {
            fprintf(stderr, "wrong value at %d\n", i);
            return 4;
        }
    free(out);
    printf("ok\n");
    return 0;
}
