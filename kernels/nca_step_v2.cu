// Fused NCA step, kernel v2 (bfloat16 state): fc0 and fc1 on tensor cores, the neighbourhood
// staged in shared memory per block tile.
//
// Compiled at run time by NVRTC (napari_octreenca/backends/cuda/nvrtc.py, variant "v2") for
// sm_80 and newer. CI runs this exact source on the host through cuda_host_shim.h, which
// emulates mma.sync from the PTX ISA's fragment layouts (tests/test_kernel_host.py).
//
// Per block (NCA2_THREADS threads = 4 warps) and tile of cells (2D: 8 x 32, 3D: 4 x 4 x 8):
//   1. the tile plus a one-cell halo (reflected at the image borders, each axis on its own) is
//      loaded into shared memory as float32, all C channels [image | state], coalesced along x;
//   2. each warp takes its share of the tile's cells, copies the cells that do not fire (exact)
//      and compacts the firing ones (ballot) into groups of 16 = the M of one mma tile;
//   3. per group, each lane computes exactly the inputs its A fragments hold: the centre values
//      and the depthwise perception (float32 from shared memory) of 2 cells x 4 channels,
//      rounded to bf16; fc0 is (2C -> H) mma.sync m16n8k16 bf16 with float32 accumulation,
//      started from the fc0 bias; ReLU; the accumulators are re-packed in registers as fc1's A
//      fragments (an m16n8 C fragment pair is an m16k16 A fragment), rounded to bf16; fc1 is
//      (H -> C - IN) mma.sync; the residual adds the exact old state and rounds once to bf16.
//
// Numerics (the reference is the torch path in bf16; tests/test_kernel_host.py has an exact
// model of it): x, perception, fc0/fc1 weights and the hidden vector are bf16 as the matmul
// inputs; perception, accumulation, biases and the residual are float32; one rounding at the
// store. A float32 state uses kernel v1 (tensor cores with bf16 inputs cannot give 1e-5).
//
// Weights: `wpack` points at a per-launch device buffer (made by backends/cuda/fragments.py
// for each level run, so concurrent runs never share one), copied into shared memory by each
// block: fc0 B fragments, fc1 B fragments (bf16 pairs, in each lane's register order), the fc0
// bias, the conv weights and the conv bias (float32). Layout: nca2_layout below.
//
// Launch: blockDim.x = NCA2_THREADS, any gridDim.x (grid-stride loop over tiles); arguments
// (img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh, wpack) as in kernel v1.
#include "nca_common.cuh"

#define NCA2_THREADS 128
#define NCA2_WARPS (NCA2_THREADS / 32)
// Resident blocks per SM the register budget is cut for: ptxas (nvcc 13.0) then uses 80 registers
// in 3D and 79-80 in 2D (v1: 128-130 in 3D on sm_90), without spilling on sm_90 (sm_80 3D spills
// 32 bytes); 6 x 31 KB of shared memory fit an SM: 768 threads per SM.
#define NCA2_MIN_BLOCKS 6

#define NCA2_ROUND_UP(a, b) (((a) + (b) - 1) / (b) * (b))

// Padded matrix sizes: fc0 input 2C -> multiple of 16 (mma K), hidden H -> multiple of 16 (fc0
// N and fc1 K), output C - IN -> multiple of 8 (fc1 N). Padding rows/columns are zero.
template <int DIMS>
struct nca2_layout {
    static const int C = NCA_C, IN = NCA_IN, H = NCA_H, CU = NCA_C - NCA_IN;
    static const int K = DIMS == 2 ? 9 : 27;
    static const int K0 = NCA2_ROUND_UP(2 * NCA_C, 16);
    static const int HP = NCA2_ROUND_UP(NCA_H, 16);
    static const int NP = NCA2_ROUND_UP(NCA_C - NCA_IN, 8);
    static const int KS0 = K0 / 16, NT0 = HP / 8;  // fc0: k-steps, n-tiles
    static const int KS1 = HP / 16, NT1 = NP / 8;  // fc1: k-steps, n-tiles
    // Word offsets in the packed buffer (32-bit words).
    static const int w0 = 0;                          // [KS0][NT0][32 lanes][2] bf16x2
    static const int w1 = w0 + KS0 * NT0 * 64;        // [KS1][NT1][32 lanes][2] bf16x2
    static const int b0 = w1 + KS1 * NT1 * 64;        // [HP] float
    static const int cw = b0 + HP;                    // [C][K] float
    static const int cb = cw + C * K;                 // [C] float
    static const int words = cb + C;
    // Tile (cells) and halo (cells + 1 on each side; 2D: no z halo).
    static const int TZ = DIMS == 2 ? 1 : 4, TY = DIMS == 2 ? 8 : 4, TX = DIMS == 2 ? 32 : 8;
    static const int HZ = DIMS == 2 ? 1 : TZ + 2, HY = TY + 2, HX = TX + 2;
    static const int HALO = HZ * HY * HX;
    static const int CELLS = TZ * TY * TX;
    static const int PER_WARP = CELLS / NCA2_WARPS;  // a multiple of 32
};

// ---------------------------------------------------------------------------------------------
// Tensor-core primitive. On the device, PTX mma.sync; on the host (tests), the shim's emulation.
NCA_HD nca_u32 nca2_pack_bf16x2(float lo, float hi) {
    // Round to nearest even like nca_store; the element with the lower index in the low half.
    nca_u32 a = nca_float_to_bits(lo), b = nca_float_to_bits(hi);
    a = ((a & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC00000u : a + 0x7FFFu + ((a >> 16) & 1u);
    b = ((b & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC00000u : b + 0x7FFFu + ((b >> 16) & 1u);
    return (a >> 16) | (b & 0xFFFF0000u);
}

#if defined(NCA_HOST_EMULATION)
// d = a (16x16, row) * b (16x8, col) + c, bf16 inputs, float32 accumulation (cuda_host_shim.h).
#define nca2_mma_16816 nca_emu_mma_16816
#else
__device__ __forceinline__ void nca2_mma_16816(float d[4], const nca_u32 a[4], const nca_u32 b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
#endif

// One input feature of the fc0 matrix for a cell at halo position `pos`: column k of
// [x (C) | perception (C) | zero padding].
template <int DIMS>
__device__ __forceinline__ float nca2_feature(const float* halo, const float* wsm, int pos, int k) {
    typedef nca2_layout<DIMS> L;
    if (k < L::C) return halo[k * L::HALO + pos];
    if (k >= 2 * L::C) return 0.0f;
    const int c = k - L::C;
    const float* src = halo + c * L::HALO;
    const float* w = wsm + L::cw + c * L::K;
    float acc = wsm[L::cb + c];
#pragma unroll
    for (int dz = 0; dz < (DIMS == 3 ? 3 : 1); ++dz) {
#pragma unroll
        for (int dy = 0; dy < 3; ++dy) {
#pragma unroll
            for (int dx = 0; dx < 3; ++dx) {
                const int off = ((DIMS == 3 ? dz - 1 : 0) * L::HY + (dy - 1)) * L::HX + (dx - 1);
                acc += w[(dz * 3 + dy) * 3 + dx] * src[pos + off];
            }
        }
    }
    return acc;
}

template <int DIMS>
__device__ __forceinline__ void nca2_step_impl(const nca_bf16* __restrict__ img, const nca_bf16* __restrict__ state,
                                               nca_bf16* __restrict__ out, nca_i64 batch, nca_i64 nz, nca_i64 ny,
                                               nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key,
                                               nca_u32 thresh, const nca_u32* __restrict__ wpack) {
    typedef nca2_layout<DIMS> L;
    __shared__ float halo[L::C * L::HALO];
    __shared__ nca_u32 wsm_bits[L::words];
    __shared__ short slots[NCA2_WARPS][L::PER_WARP];
    const float* wsm = reinterpret_cast<const float*>(wsm_bits);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates (PTX: groupID, threadID_in_group)
    const nca_u32 below = (1u << lane) - 1u;

    for (int i = tid; i < L::words; i += NCA2_THREADS) wsm_bits[i] = wpack[i];

    const nca_i64 tiles_z = (nz + L::TZ - 1) / L::TZ, tiles_y = (ny + L::TY - 1) / L::TY;
    const nca_i64 tiles_x = (nx + L::TX - 1) / L::TX;
    const nca_i64 per_item = tiles_z * tiles_y * tiles_x;
    const nca_i64 plane = nz * ny * nx;

    for (nca_i64 tile = blockIdx.x; tile < batch * per_item; tile += gridDim.x) {
        const nca_i64 b = tile / per_item;
        nca_i64 rest = tile - b * per_item;
        const nca_i64 z0 = (rest / (tiles_y * tiles_x)) * L::TZ;
        rest %= tiles_y * tiles_x;
        const nca_i64 y0 = (rest / tiles_x) * L::TY, x0 = (rest % tiles_x) * L::TX;
        const nca_bf16* im = img + b * L::IN * plane;
        const nca_bf16* st = state + b * L::CU * plane;
        nca_bf16* ou = out + b * L::CU * plane;

        __syncthreads();  // the previous tile's halo (and, first time, the weights) are done with
        // 1. Tile + halo, reflected per axis; positions past the far border are clamped (their
        //    cells are not computed, the clamp only keeps the reads in bounds).
        for (int i = tid; i < L::C * L::HALO; i += NCA2_THREADS) {
            const int c = i / L::HALO, pos = i - c * L::HALO;
            const int hz = pos / (L::HY * L::HX), hy = (pos / L::HX) % L::HY, hx = pos % L::HX;
            nca_i64 z = DIMS == 3 ? nca_reflect(z0 + hz - 1, nz) : 0;
            nca_i64 y = nca_reflect(y0 + hy - 1, ny), x = nca_reflect(x0 + hx - 1, nx);
            z = z < 0 ? 0 : (z >= nz ? nz - 1 : z);
            y = y < 0 ? 0 : (y >= ny ? ny - 1 : y);
            x = x < 0 ? 0 : (x >= nx ? nx - 1 : x);
            const nca_i64 cell = (z * ny + y) * nx + x;
            halo[i] = c < L::IN ? nca_load(im, (nca_i64)c * plane + cell) : nca_load(st, (nca_i64)(c - L::IN) * plane + cell);
        }
        __syncthreads();

        // 2. This warp's cells: copy the ones that do not fire, compact the firing ones.
        int count = 0;
#pragma unroll
        for (int r = 0; r < L::PER_WARP / 32; ++r) {
            const int local = warp * L::PER_WARP + r * 32 + lane;
            const int lz = local / (L::TY * L::TX), ly = (local / L::TX) % L::TY, lx = local % L::TX;
            const nca_i64 z = z0 + lz, y = y0 + ly, x = x0 + lx;
            const bool valid = z < nz && y < ny && x < nx;
            bool fire = false;
            if (valid) {
                fire = nca_fires<DIMS>(key, thresh, oz + z, oy + y, ox + x);
                if (!fire) {
                    const nca_i64 cell = (z * ny + y) * nx + x;
                    for (int c = 0; c < L::CU; ++c) ou[(nca_i64)c * plane + cell] = st[(nca_i64)c * plane + cell];
                }
            }
            const nca_u32 m = __ballot_sync(0xFFFFFFFFu, fire);
            if (fire) slots[warp][count + __popc(m & below)] = (short)local;
            count += __popc(m);
        }
        __syncwarp();

        // 3. Groups of 16 firing cells: rows g and g + 8 of the mma tiles are this lane's.
        for (int base = 0; base < count; base += 16) {
            int pos[2];
            int local[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = base + g + 8 * h;
                local[h] = slots[warp][row < count ? row : base];  // a padding row repeats a real cell
                const int lz = local[h] / (L::TY * L::TX), ly = (local[h] / L::TX) % L::TY, lx = local[h] % L::TX;
                pos[h] = ((DIMS == 3 ? lz + 1 : 0) * L::HY + ly + 1) * L::HX + lx + 1;
            }
            // fc0 A fragments: reg j holds row (j & 1 ? g + 8 : g), columns 16 ks + 2t + (j >= 2 ? 8 : 0) + {0, 1}.
            nca_u32 a0[L::KS0][4];
#pragma unroll
            for (int ks = 0; ks < L::KS0; ++ks) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = 16 * ks + 2 * t + (j >= 2 ? 8 : 0);
                    const int p = pos[j & 1];
                    a0[ks][j] = nca2_pack_bf16x2(nca2_feature<DIMS>(halo, wsm, p, col),
                                                 nca2_feature<DIMS>(halo, wsm, p, col + 1));
                }
            }
            // fc0 -> ReLU; C fragment: c0, c1 = row g, columns 8 nt + 2t + {0, 1}; c2, c3 = row g + 8.
            float hid[L::NT0][4];
#pragma unroll
            for (int nt = 0; nt < L::NT0; ++nt) {
                const float bias0 = wsm[L::b0 + 8 * nt + 2 * t], bias1 = wsm[L::b0 + 8 * nt + 2 * t + 1];
                float acc[4] = {bias0, bias1, bias0, bias1};
#pragma unroll
                for (int ks = 0; ks < L::KS0; ++ks) {
                    const nca_u32* bf = wsm_bits + L::w0 + ((ks * L::NT0 + nt) * 32 + lane) * 2;
                    const nca_u32 bfrag[2] = {bf[0], bf[1]};
                    nca2_mma_16816(acc, a0[ks], bfrag, acc);
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) hid[nt][i] = acc[i] > 0.0f ? acc[i] : 0.0f;
            }
            // fc1: the C fragments of hidden n-tiles 2 ks and 2 ks + 1 are exactly the A fragment of k-step ks.
            float dx[L::NT1][4];
#pragma unroll
            for (int nt = 0; nt < L::NT1; ++nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) dx[nt][i] = 0.0f;
            }
#pragma unroll
            for (int ks = 0; ks < L::KS1; ++ks) {
                const nca_u32 a1[4] = {
                    nca2_pack_bf16x2(hid[2 * ks][0], hid[2 * ks][1]), nca2_pack_bf16x2(hid[2 * ks][2], hid[2 * ks][3]),
                    nca2_pack_bf16x2(hid[2 * ks + 1][0], hid[2 * ks + 1][1]),
                    nca2_pack_bf16x2(hid[2 * ks + 1][2], hid[2 * ks + 1][3])};
#pragma unroll
                for (int nt = 0; nt < L::NT1; ++nt) {
                    const nca_u32* bf = wsm_bits + L::w1 + ((ks * L::NT1 + nt) * 32 + lane) * 2;
                    const nca_u32 bfrag[2] = {bf[0], bf[1]};
                    nca2_mma_16816(dx[nt], a1, bfrag, dx[nt]);
                }
            }
            // Residual and store: d0, d1 -> row g, channels 8 nt + 2t + {0, 1}; d2, d3 -> row g + 8.
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (base + g + 8 * h >= count) continue;  // padding row
                const int lz = local[h] / (L::TY * L::TX), ly = (local[h] / L::TX) % L::TY, lx = local[h] % L::TX;
                const nca_i64 cell = ((z0 + lz) * ny + (y0 + ly)) * nx + (x0 + lx);
#pragma unroll
                for (int nt = 0; nt < L::NT1; ++nt) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int ch = 8 * nt + 2 * t + e;
                        if (ch < L::CU) {
                            const float old = halo[(L::IN + ch) * L::HALO + pos[h]];
                            nca_store(ou, (nca_i64)ch * plane + cell, old + dx[nt][2 * h + e]);
                        }
                    }
                }
            }
        }
        __syncwarp();
    }
}

#define NCA2_ENTRY(NAME, DIMS)                                                                            \
    extern "C" __global__ void __launch_bounds__(NCA2_THREADS, NCA2_MIN_BLOCKS)                           \
        NAME(const nca_bf16* img, const nca_bf16* state, nca_bf16* out, nca_i64 batch, nca_i64 nz,        \
             nca_i64 ny, nca_i64 nx, nca_i64 oz, nca_i64 oy, nca_i64 ox, nca_u32 key, nca_u32 thresh,     \
             const nca_u32* wpack) {                                                                      \
        nca2_step_impl<DIMS>(img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh, wpack);         \
    }

NCA2_ENTRY(nca2_step_2d_bf16, 2)
NCA2_ENTRY(nca2_step_3d_bf16, 3)
