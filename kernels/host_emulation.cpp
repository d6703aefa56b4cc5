// Test-only: nca_step.cu's kernels run on the host through cuda_host_shim.h (see there).
//
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DNCA_C=16 -DNCA_IN=3 -DNCA_H=64 host_emulation.cpp
#include "cuda_host_shim.h"
#include "nca_step.cu"

extern "C" int nca_emu_weights_size(int dims) {
    return dims == 2 ? (int)(sizeof(nca_weights<2>) / sizeof(float)) : (int)(sizeof(nca_weights<3>) / sizeof(float));
}

// Explicit arguments; the weights (a flat float array) become the by-value struct.
#define EMU_ENTRY(NAME, DIMS, T)                                                                            \
    extern "C" void emu_##NAME(unsigned grid, const T* img, const T* state, T* out, nca_i64 batch, nca_i64 nz, \
                               nca_i64 ny, nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key,        \
                               nca_u32 thresh, const float* w) {                                            \
        nca_weights<DIMS> weights;                                                                          \
        std::memcpy(weights.w, w, sizeof(weights));                                                         \
        nca_emu_launch(grid, NCA_BLOCK,                                                                     \
                       [=] { NAME(img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh, weights); }); \
    }

EMU_ENTRY(nca_step_2d_f32, 2, float)
EMU_ENTRY(nca_step_2d_bf16, 2, nca_bf16)
EMU_ENTRY(nca_step_3d_f32, 3, float)
EMU_ENTRY(nca_step_3d_bf16, 3, nca_bf16)

// The driver's view: `args` is cuLaunchKernel's kernelParams (one pointer per parameter, each
// read with the parameter's own type), so the backend's argument packing is tested against the
// kernel signature itself.
template <int DIMS, typename T>
static void emu_from_params(unsigned grid, void** a) {
    const T* img = *(const T* const*)a[0];
    const T* state = *(const T* const*)a[1];
    T* out = *(T* const*)a[2];
    nca_i64 v[7];
    for (int i = 0; i < 7; ++i) v[i] = *(const nca_i64*)a[3 + i];
    const nca_u32 key = *(const nca_u32*)a[10], thresh = *(const nca_u32*)a[11];
    const nca_weights<DIMS> weights = *(const nca_weights<DIMS>*)a[12];
    void (*kernel)(const T*, const T*, T*, nca_i64, nca_i64, nca_i64, nca_i64, nca_i64, nca_i64, nca_i64, nca_u32,
                   nca_u32, nca_weights<DIMS>);
    if constexpr (DIMS == 2) {
        if constexpr (sizeof(T) == 4) kernel = nca_step_2d_f32; else kernel = nca_step_2d_bf16;
    } else {
        if constexpr (sizeof(T) == 4) kernel = nca_step_3d_f32; else kernel = nca_step_3d_bf16;
    }
    nca_emu_launch(grid, NCA_BLOCK, [=] { kernel(img, state, out, v[0], v[1], v[2], v[3], v[4], v[5], v[6], key, thresh, weights); });
}

// Kernel v2 (declared further down): its last argument is a pointer to the weight buffer.
template <int DIMS>
static void emu2_from_params(unsigned grid, void** a);

// entry: 0 = 2d_f32, 1 = 2d_bf16, 2 = 3d_f32, 3 = 3d_bf16 (the order of nvrtc.ENTRY_POINTS);
// 4 = v2 2d_bf16, 5 = v2 3d_bf16.
extern "C" void emu_launch_params(int entry, unsigned grid, void** args) {
    switch (entry) {
        case 0: emu_from_params<2, float>(grid, args); break;
        case 1: emu_from_params<2, nca_bf16>(grid, args); break;
        case 2: emu_from_params<3, float>(grid, args); break;
        case 3: emu_from_params<3, nca_bf16>(grid, args); break;
        case 4: emu2_from_params<2>(grid, args); break;
        default: emu2_from_params<3>(grid, args); break;
    }
}

// -- kernel v2 (nca_step_v2.cu): tensor-core fc0/fc1 through the emulated mma.sync ---------------
#include "nca_step_v2.cu"

#define EMU2_ENTRY(NAME)                                                                                     \
    extern "C" void emu_##NAME(unsigned grid, const nca_bf16* img, const nca_bf16* state, nca_bf16* out,      \
                               nca_i64 batch, nca_i64 nz, nca_i64 ny, nca_i64 nx, nca_i64 oz, nca_i64 oy,     \
                               nca_i64 ox, nca_u32 key, nca_u32 thresh, const nca_u32* wpack) {               \
        nca_emu_launch(grid, NCA2_THREADS,                                                                   \
                       [=] { NAME(img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh, wpack); });   \
    }

EMU2_ENTRY(nca2_step_2d_bf16)
EMU2_ENTRY(nca2_step_3d_bf16)

template <int DIMS>
static void emu2_from_params(unsigned grid, void** a) {
    const nca_bf16* img = *(const nca_bf16* const*)a[0];
    const nca_bf16* state = *(const nca_bf16* const*)a[1];
    nca_bf16* out = *(nca_bf16* const*)a[2];
    nca_i64 v[7];
    for (int i = 0; i < 7; ++i) v[i] = *(const nca_i64*)a[3 + i];
    const nca_u32 key = *(const nca_u32*)a[10], thresh = *(const nca_u32*)a[11];
    const nca_u32* wpack = *(const nca_u32* const*)a[12];
    auto kernel = DIMS == 2 ? nca2_step_2d_bf16 : nca2_step_3d_bf16;
    nca_emu_launch(grid, NCA2_THREADS, [=] { kernel(img, state, out, v[0], v[1], v[2], v[3], v[4], v[5], v[6], key, thresh, wpack); });
}

// The packed-weight layout and tile of kernel v2, for the Python packer's test:
// [words, w0, w1, b0, cw, cb, KS0, NT0, KS1, NT1, TZ, TY, TX].
template <int DIMS>
static void nca2_layout_fill(long long* v) {
    typedef nca2_layout<DIMS> L;
    const long long vals[] = {L::words, L::w0, L::w1, L::b0, L::cw, L::cb, L::KS0, L::NT0, L::KS1, L::NT1, L::TZ, L::TY, L::TX};
    for (int i = 0; i < 13; ++i) v[i] = vals[i];
}
extern "C" void nca2_emu_layout(int dims, long long* v) {
    if (dims == 2) nca2_layout_fill<2>(v); else nca2_layout_fill<3>(v);
}
