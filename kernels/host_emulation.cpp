// Test-only: nca_step.cu's kernels run on the host through cuda_host_shim.h (see there).
//
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DNCA_C=16 -DNCA_IN=3 -DNCA_H=64 host_emulation.cpp
#include "cuda_host_shim.h"
#include "nca_step.cu"

extern "C" int nca_emu_weights_size() { return (int)(sizeof(nca_weights) / sizeof(float)); }

extern "C" void nca_emu_set_weights(const float* w, int n) { std::memcpy(nca_weights, w, sizeof(float) * n); }

#define EMU_ENTRY(NAME, T)                                                                                  \
    extern "C" void emu_##NAME(unsigned grid, const T* img, const T* state, T* out, nca_i64 batch, nca_i64 nz, \
                               nca_i64 ny, nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key,        \
                               nca_u32 thresh) {                                                            \
        nca_emu_launch(grid, NCA_BLOCK, [=] { NAME(img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh); }); \
    }

EMU_ENTRY(nca_step_2d_f32, float)
EMU_ENTRY(nca_step_2d_bf16, nca_bf16)
EMU_ENTRY(nca_step_3d_f32, float)
EMU_ENTRY(nca_step_3d_bf16, nca_bf16)
