"""Run the CUDA kernels' per-cell code (kernels/nca_common.cuh) as host C++ against the torch path.

The harness (kernels/host_harness.cpp) is compiled with g++ into a shared library and called
through ctypes on random weights and states, 2D and 3D, odd, non-square and size-1/size-2 axes,
non-zero origins: every cell of such small blocks is a face, edge or corner cell, so a wrong
neighbour at any border shows. The whole kernels of nca_step.cu (warp compaction of the firing
cells, grid-stride loop) also run on the host through kernels/cuda_host_shim.h.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_octreenca.backends.base import LevelRun, fire_params
from napari_octreenca.backends.torch_backend import TorchBackend
from napari_octreenca.nca.firemask import base_key, fire_mask_numpy, fire_mask_torch, mix32
from napari_octreenca.nca.packing import layout_size, pack_weights
from napari_octreenca.nca.step import pad_reflect, step_differentiable
from napari_octreenca.nca.weights import BackboneNCA
from napari_octreenca.resources import resource_path

CONFIGS = [(16, 3, 64), (10, 1, 24)]  # (channels, input_channels, hidden)


def _compile(tmp: Path, c: int, cin: int, h: int) -> ctypes.CDLL:
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler (g++) to build the kernel host harness")
    src = resource_path("kernels") / "host_harness.cpp"
    lib = tmp / f"harness_{c}_{cin}_{h}.so"
    cmd = [
        gxx,
        "-O1",
        "-std=c++14",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Werror",
        "-shared",
        "-fPIC",
        f"-DNCA_C={c}",
        f"-DNCA_IN={cin}",
        f"-DNCA_H={h}",
        str(src),
        "-o",
        str(lib),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    dll = ctypes.CDLL(str(lib))
    i64, u32, p = ctypes.c_longlong, ctypes.c_uint32, ctypes.c_void_p
    for dims in (2, 3):
        for dt in ("f32", "bf16"):
            fn = getattr(dll, f"nca_host_step_{dims}d_{dt}")
            fn.restype = i64
            fn.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64, u32, u32]
    dll.nca_host_layout_size.argtypes = [ctypes.c_int]
    dll.nca_host_mix32.restype = u32
    dll.nca_host_mix32.argtypes = [u32]
    dll.nca_host_fires.argtypes = [ctypes.c_int, u32, u32, i64, i64, i64]
    return dll


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: "C{}-in{}-H{}".format(*c))
def harness(request, tmp_path_factory) -> tuple[ctypes.CDLL, tuple[int, int, int]]:
    return _compile(tmp_path_factory.mktemp("harness"), *request.param), request.param


def random_level(c: int, cin: int, h: int, dims: int, seed: int) -> BackboneNCA:
    torch.manual_seed(seed)
    nca = BackboneNCA(c, h, cin, dims)
    with torch.no_grad():
        for p in nca.parameters():
            p.copy_(torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5))
    return nca


def host_step(dll, nca, image, state, run: LevelRun, step: int, dtype=torch.float32) -> tuple[torch.Tensor, int]:
    dims = nca.spatial_dims
    img = image.to(dtype).contiguous()
    st = state.to(dtype).contiguous()
    out = torch.full_like(st, float("nan"))  # poisoned: a cell the harness skips shows as NaN
    w = pack_weights(nca)
    sp = tuple(st.shape[2:])
    nz, ny, nx = ((1,) + sp) if dims == 2 else sp
    origin = run.origin or (0,) * dims
    oz, oy, ox = ((0,) + tuple(origin)) if dims == 2 else tuple(origin)
    key, thresh = fire_params(run, step)
    name = f"nca_host_step_{dims}d_{'f32' if dtype == torch.float32 else 'bf16'}"
    fired = getattr(dll, name)(
        img.data_ptr(), st.data_ptr(), out.data_ptr(), w.data_ptr(), st.shape[0], nz, ny, nx, oz, oy, ox, key, thresh
    )
    return out, fired


def torch_step(nca, image, state, run: LevelRun, step: int) -> torch.Tensor:
    mask = None
    if run.fire_rate < 1:
        origin = run.origin or (0,) * nca.spatial_dims
        mask = fire_mask_torch(tuple(state.shape[2:]), origin, run.seed, run.level, step, run.fire_rate)
        mask = mask[None, None].to(state.dtype)
    with torch.no_grad():
        return step_differentiable(nca, image, state, mask)


SHAPES_2D = [(1, 1), (1, 6), (2, 2), (2, 5), (3, 7), (8, 3), (5, 9)]
SHAPES_3D = [(1, 1, 1), (1, 2, 3), (2, 2, 2), (3, 1, 4), (2, 5, 3), (5, 4, 3), (4, 6, 7)]


@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D, ids=lambda s: "x".join(map(str, s)))
def test_host_kernel_matches_torch_fp32(harness, shape) -> None:
    dll, (c, cin, h) = harness
    dims = len(shape)
    nca = random_level(c, cin, h, dims, seed=len(shape) * 100 + sum(shape))
    g = torch.Generator().manual_seed(sum(shape))
    batch = 2
    image = torch.randn((batch, cin) + shape, generator=g)
    state = torch.randn((batch, c - cin) + shape, generator=g)
    origin = tuple(3 * i + 1 for i in range(dims))
    for fire_rate in (0.5, 1.0):
        run = LevelRun(level=2, steps=1, seed=12345, fire_rate=fire_rate, origin=origin)
        ref = torch_step(nca, image, state, run, step=4)
        out, fired = host_step(dll, nca, image, state, run, step=4)
        assert not torch.isnan(out).any(), "the harness left cells unwritten"
        assert (out - ref).abs().max().item() < 1e-5
        mask = fire_mask_torch(shape, origin, 12345, 2, 4, fire_rate)
        assert fired == batch * int(mask.sum())
        # Cells that do not fire keep their exact old value.
        keep = ~mask.expand_as(out[:, 0])
        for ch in range(c - cin):
            assert torch.equal(out[:, ch][keep], state[:, ch][keep])


@pytest.mark.parametrize("dims", [2, 3])
def test_host_kernel_detects_wrong_border(harness, dims) -> None:
    """A zero-padded (not reflected) reference must differ at the borders: the test has teeth."""
    dll, (c, cin, h) = harness
    shape = (5, 6) if dims == 2 else (3, 4, 5)
    nca = random_level(c, cin, h, dims, seed=7)
    image, state = torch.randn((1, cin) + shape), torch.randn((1, c - cin) + shape)
    run = LevelRun(level=0, steps=1, seed=1, fire_rate=1.0)
    out, _ = host_step(dll, nca, image, state, run, step=0)
    from napari_octreenca.nca.step import nca_delta

    with torch.no_grad():
        full = torch.cat([image, state], 1)
        zero_pad = torch.nn.functional.pad(full, (1, 1) * dims)
        wrong = state + nca_delta(nca, zero_pad)
        right = state + nca_delta(nca, pad_reflect(full, 1))
    diff_wrong = (out - wrong).abs().amax(dim=1)[0]
    assert (out - right).abs().max().item() < 1e-5
    border = torch.ones(shape, dtype=torch.bool)
    border[(slice(1, -1),) * dims] = False
    assert (diff_wrong[border] > 1e-4).all()
    assert diff_wrong[~border].max().item() < 1e-5


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5)], ids=["2d", "3d"])
def test_host_kernel_bf16(harness, shape) -> None:
    """bfloat16 storage: float32 maths on the bf16 values, one rounding at the store."""
    dll, (c, cin, h) = harness
    dims = len(shape)
    nca = random_level(c, cin, h, dims, seed=3)
    image = torch.randn((1, cin) + shape).bfloat16()
    state = torch.randn((1, c - cin) + shape).bfloat16()
    run = LevelRun(level=1, steps=1, seed=99, fire_rate=0.5, origin=(2,) * dims)
    out, _ = host_step(dll, nca, image, state, run, step=0, dtype=torch.bfloat16)
    ref = torch_step(nca, image.float(), state.float(), run, step=0).bfloat16()
    assert out.dtype == torch.bfloat16
    # Both round the same float32 value once; float32 summation order may flip the last bit.
    rel = ((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-2)).max().item()
    assert rel <= 2**-7
    # And the layer-wise torch path in bf16 agrees to bf16 accuracy.
    torch_bf16 = TorchBackend().run_level(nca, image, state.clone(), LevelRun(1, 1, 99, 0.5, (2,) * dims))
    rel_t = ((out.float() - torch_bf16.float()).abs() / torch_bf16.float().abs().clamp_min(1.0)).max().item()
    assert rel_t < 5e-2


def test_hash_and_layout_match_engine(harness) -> None:
    dll, (c, cin, h) = harness
    for v in (0, 1, 0xDEADBEEF, 0xFFFFFFFF, 12345678):
        assert dll.nca_host_mix32(v) == mix32(v)
    assert dll.nca_host_layout_size(2) == layout_size(2, c, cin, h)
    assert dll.nca_host_layout_size(3) == layout_size(3, c, cin, h)
    # Large global coordinates (beyond 2^31) hash like the engine's int64 torch code.
    key = base_key(2**33 + 5, 3, 17)
    thresh = 1 << 23
    for z, y, x in [(0, 0, 0), (5, 2**31 + 3, 7), (2**32 + 9, 1, 2**34 + 1)]:
        want3 = fire_mask_numpy((1, 1, 1), (z, y, x), 2**33 + 5, 3, 17, 0.5)[0, 0, 0]
        want2 = fire_mask_numpy((1, 1), (y, x), 2**33 + 5, 3, 17, 0.5)[0, 0]
        assert bool(dll.nca_host_fires(3, key, thresh, z, y, x)) == bool(want3)
        assert bool(dll.nca_host_fires(2, key, thresh, 0, y, x)) == bool(want2)


# -- the whole CUDA kernels (nca_step.cu) on the host, through kernels/cuda_host_shim.h ----------


def _compile_emulation(tmp: Path, c: int, cin: int, h: int) -> ctypes.CDLL:
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler (g++) to build the kernel emulation")
    src = resource_path("kernels") / "host_emulation.cpp"
    lib = tmp / f"emulation_{c}_{cin}_{h}.so"
    cmd = [
        gxx,
        "-std=c++20",
        "-O1",
        "-pthread",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Werror",
        "-shared",
        "-fPIC",
        f"-DNCA_C={c}",
        f"-DNCA_IN={cin}",
        f"-DNCA_H={h}",
        str(src),
        "-o",
        str(lib),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 and "barrier" in done.stderr:
        pytest.skip(f"the C++ compiler lacks C++20 <barrier>: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    dll = ctypes.CDLL(str(lib))
    i64, u32, p = ctypes.c_longlong, ctypes.c_uint32, ctypes.c_void_p
    for dims in (2, 3):
        for dt in ("f32", "bf16"):
            fn = getattr(dll, f"emu_nca_step_{dims}d_{dt}")
            fn.restype = None
            fn.argtypes = [ctypes.c_uint, p, p, p, i64, i64, i64, i64, i64, i64, i64, u32, u32, p]
    dll.nca_emu_weights_size.argtypes = [ctypes.c_int]
    dll.emu_launch_params.argtypes = [ctypes.c_int, ctypes.c_uint, p]
    dll.emu_launch_params.restype = None
    return dll


@pytest.fixture(scope="module")
def emulation(tmp_path_factory) -> ctypes.CDLL:
    return _compile_emulation(tmp_path_factory.mktemp("emulation"), 16, 3, 64)


def emulated_step(dll, nca, image, state, run: LevelRun, step: int, grid: int | None = None, dtype=torch.float32):
    from napari_octreenca.backends.cuda.backend import grid_size

    dims = nca.spatial_dims
    img, st = image.to(dtype).contiguous(), state.to(dtype).contiguous()
    out = torch.full_like(st, float("nan"))  # poisoned: unwritten cells show
    w = pack_weights(nca)
    assert dll.nca_emu_weights_size(dims) == w.numel()
    sp = tuple(st.shape[2:])
    nz, ny, nx = ((1,) + sp) if dims == 2 else sp
    origin = run.origin or (0,) * dims
    oz, oy, ox = ((0,) + tuple(origin)) if dims == 2 else tuple(origin)
    key, thresh = fire_params(run, step)
    grid = grid or grid_size(st.shape[0] * nz * ny * nx)
    name = f"emu_nca_step_{dims}d_{'f32' if dtype == torch.float32 else 'bf16'}"
    getattr(dll, name)(
        grid,
        img.data_ptr(),
        st.data_ptr(),
        out.data_ptr(),
        st.shape[0],
        nz,
        ny,
        nx,
        oz,
        oy,
        ox,
        key,
        thresh,
        w.data_ptr(),
    )
    return out


@pytest.mark.parametrize(
    "shape,grid",
    [((5, 9), None), ((33, 20), 1), ((1, 1), None), ((3, 5, 4), None), ((7, 6, 9), 1), ((2, 1, 3), None)],
    ids=["2d", "2d-grid-stride", "2d-1x1", "3d", "3d-grid-stride", "3d-thin"],
)
def test_cuda_kernel_emulated_matches_torch(emulation, shape, grid) -> None:
    dims = len(shape)
    nca = random_level(16, 3, 64, dims, seed=3 + sum(shape))
    g = torch.Generator().manual_seed(sum(shape))
    image, state = torch.randn((2, 3) + shape, generator=g), torch.randn((2, 13) + shape, generator=g)
    for fire_rate in (0.5, 1.0):
        run = LevelRun(level=3, steps=1, seed=77, fire_rate=fire_rate, origin=tuple(range(2, 2 + dims)))
        out = emulated_step(emulation, nca, image, state, run, step=2, grid=grid)
        assert not torch.isnan(out).any(), "the kernel left cells unwritten"
        ref = torch_step(nca, image, state, run, step=2)
        assert (out - ref).abs().max().item() < 1e-5


def test_cuda_kernel_emulated_bf16(emulation) -> None:
    nca = random_level(16, 3, 64, 2, seed=8)
    image, state = torch.randn(1, 3, 6, 11).bfloat16(), torch.randn(1, 13, 6, 11).bfloat16()
    run = LevelRun(level=0, steps=1, seed=4, fire_rate=0.5)
    out = emulated_step(emulation, nca, image, state, run, step=0, dtype=torch.bfloat16)
    via_harness_ref = torch_step(nca, image.float(), state.float(), run, step=0).bfloat16()
    rel = ((out.float() - via_harness_ref.float()).abs() / via_harness_ref.float().abs().clamp_min(1e-2)).max()
    assert rel.item() <= 2**-7


@pytest.mark.parametrize("dims,dtype", [(2, torch.float32), (3, torch.bfloat16)], ids=["2d-f32", "3d-bf16"])
def test_backend_launch_arguments_match_the_kernel_signature(emulation, dims, dtype) -> None:
    """The argument block the CUDA backend hands cuLaunchKernel, read the way the driver reads it.

    Each step's weights travel inside its own argument block (no shared __constant__ array): two
    levels launched back to back with different weights each compute with their own.
    """
    from napari_octreenca.backends.cuda.backend import check_launch, grid_size, host_weights, launch_args

    shape = (6, 11) if dims == 2 else (3, 5, 4)
    g = torch.Generator().manual_seed(5)
    image = torch.randn((2, 3) + shape, generator=g).to(dtype)
    state = torch.randn((2, 13) + shape, generator=g).to(dtype)
    run = LevelRun(level=1, steps=1, seed=9, fire_rate=0.5, origin=(4,) * dims)
    key, thresh = fire_params(run, 0)
    sizes = (2,) + (((1,) + shape) if dims == 2 else shape) + (((0,) + run.origin) if dims == 2 else run.origin)
    entry = (dims - 2) * 2 + (dtype == torch.bfloat16)
    outs, blocks = [], []
    for seed in (1, 2):  # both argument blocks exist before either "launch" runs
        nca = random_level(16, 3, 64, dims, seed=seed)
        out = torch.full_like(state, float("nan"))
        check_launch(nca, image, state, out)
        params, keep = launch_args(image, state, out, sizes, key, thresh, host_weights(nca))
        outs.append((nca, out))
        blocks.append((params, keep))
    for (params, _), (nca, out) in zip(blocks, outs):
        emulation.emu_launch_params(entry, grid_size(state[:, 0].numel()), params)
        ref = torch_step(nca, image.float(), state.float(), run, step=0)
        assert not torch.isnan(out.float()).any(), "the kernel left cells unwritten"
        if dtype == torch.float32:
            assert (out - ref).abs().max().item() < 1e-5
        else:
            rel = ((out.float() - ref.bfloat16().float()).abs() / ref.abs().clamp_min(1e-2)).max().item()
            assert rel <= 2**-7
    assert (outs[0][1].float() - outs[1][1].float()).abs().max().item() > 1e-2  # the two weights differ


# -- kernel v2 (nca_step_v2.cu: tensor-core fc0/fc1, shared-memory tile) on the host ---------------


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"C{c[0]}-in{c[1]}-H{c[2]}")
def emulation_v2(request, tmp_path_factory) -> tuple[ctypes.CDLL, tuple[int, int, int]]:
    dll = _compile_emulation(tmp_path_factory.mktemp("emulation_v2"), *request.param)
    i64, u32, p = ctypes.c_longlong, ctypes.c_uint32, ctypes.c_void_p
    for dims in (2, 3):
        fn = getattr(dll, f"emu_nca2_step_{dims}d_bf16")
        fn.restype = None
        fn.argtypes = [ctypes.c_uint, p, p, p, i64, i64, i64, i64, i64, i64, i64, u32, u32, p]
    dll.nca2_emu_layout.argtypes = [ctypes.c_int, p]
    dll.nca2_emu_layout.restype = None
    return dll, request.param


def v2_model_step(nca, image, state, run: LevelRun, step: int) -> torch.Tensor:
    """Kernel v2's numerics in torch (fragments.reference_step_v2) with the run's fire mask."""
    from napari_octreenca.backends.cuda.fragments import reference_step_v2

    origin = run.origin or (0,) * nca.spatial_dims
    mask = fire_mask_torch(tuple(state.shape[2:]), origin, run.seed, run.level, step, run.fire_rate)
    return reference_step_v2(nca, image, state, mask[None, None])


def v2_emulated_step(dll, nca, image, state, run: LevelRun, step: int, grid: int | None = None) -> torch.Tensor:
    from napari_octreenca.backends.cuda.fragments import layout_of, pack_v2

    dims = nca.spatial_dims
    img, st = image.bfloat16().contiguous(), state.bfloat16().contiguous()
    out = torch.full_like(st, float("nan"))  # poisoned: unwritten cells show
    words = torch.from_numpy(pack_v2(nca).view(np.int32))
    sp = tuple(st.shape[2:])
    nz, ny, nx = ((1,) + sp) if dims == 2 else sp
    origin = run.origin or (0,) * dims
    oz, oy, ox = ((0,) + tuple(origin)) if dims == 2 else tuple(origin)
    key, thresh = fire_params(run, step)
    tz, ty, tx = layout_of(nca).tile
    tiles = st.shape[0] * -(-nz // tz) * -(-ny // ty) * -(-nx // tx)
    getattr(dll, f"emu_nca2_step_{dims}d_bf16")(
        grid or tiles,
        img.data_ptr(),
        st.data_ptr(),
        out.data_ptr(),
        st.shape[0],
        nz,
        ny,
        nx,
        oz,
        oy,
        ox,
        key,
        thresh,
        words.data_ptr(),
    )
    return out


def test_v2_weight_layout_matches_the_kernel(emulation_v2) -> None:
    from napari_octreenca.backends.cuda.fragments import layout_of

    dll, (c, cin, h) = emulation_v2
    for dims in (2, 3):
        lay = layout_of(random_level(c, cin, h, dims, seed=0))
        got = (ctypes.c_longlong * 13)()
        dll.nca2_emu_layout(dims, got)
        want = [lay.words, lay.w0, lay.w1, lay.b0, lay.cw, lay.cb, lay.ks0, lay.nt0, lay.ks1, lay.nt1, *lay.tile]
        assert list(got) == want


V2_SHAPES = [
    ((1, 1), None),
    ((3, 7), None),
    ((9, 33), None),
    ((17, 5), 1),
    ((1, 1, 1), None),
    ((2, 5, 3), None),
    ((5, 5, 9), None),
    ((3, 1, 4), 1),
]


@pytest.mark.parametrize(
    "shape,grid", V2_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
)
def test_v2_emulated_equals_its_bf16_model_and_the_torch_path(emulation_v2, shape, grid) -> None:
    """Every face, edge and corner (shapes cross the 8x32 / 4x4x8 tiles; grid 1 = grid-stride loop)."""
    dll, (c, cin, h) = emulation_v2
    dims = len(shape)
    nca = random_level(c, cin, h, dims, seed=11 + sum(shape))
    g = torch.Generator().manual_seed(sum(shape))
    image = torch.randn((2, cin) + shape, generator=g).bfloat16()
    state = torch.randn((2, c - cin) + shape, generator=g).bfloat16()
    for fire_rate in (0.5, 1.0):
        run = LevelRun(level=2, steps=1, seed=31, fire_rate=fire_rate, origin=tuple(range(5, 5 + dims)))
        out = v2_emulated_step(dll, nca, image, state, run, step=3, grid=grid)
        assert not torch.isnan(out.float()).any(), "the kernel left cells unwritten"
        model = v2_model_step(nca, image, state, run, step=3).float()
        diff = (out.float() - model).abs()
        # Within one bf16 rounding of the model (float32 summation order may flip the last bit) ...
        assert (diff <= 2**-7 * model.abs() + 1e-6).all(), diff.max().item()
        # ... and bit-equal nearly everywhere: a fragment-layout mistake would show everywhere.
        assert (diff == 0).float().mean().item() > 0.97
        mask = fire_mask_torch(shape, run.origin, 31, 2, 3, fire_rate)
        keep = ~mask.expand_as(out[:, 0])
        for ch in range(c - cin):
            assert torch.equal(out[:, ch][keep], state[:, ch][keep])
        # Against the float32 torch path: bf16 accuracy.
        ref = torch_step(nca, image.float(), state.float(), run, step=3)
        rel = ((out.float() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
        assert rel < 5e-2


def test_v2_detects_a_wrong_fragment_layout(emulation_v2) -> None:
    """The emulation has teeth: fc0 fragments packed with the two halves swapped give wrong results."""
    from napari_octreenca.backends.cuda import fragments

    dll, (c, cin, h) = emulation_v2
    nca = random_level(c, cin, h, 2, seed=4)
    image, state = torch.randn(1, cin, 6, 10).bfloat16(), torch.randn(1, c - cin, 6, 10).bfloat16()
    run = LevelRun(level=0, steps=1, seed=2, fire_rate=1.0)
    model = v2_model_step(nca, image, state, run, step=0).float()
    real = fragments.b_fragments

    def swapped(matrix, ks, nt):
        f = real(matrix, ks, nt)
        return ((f >> 16) | (f << 16)) & 0xFFFFFFFF

    fragments.b_fragments = swapped
    try:
        bad = v2_emulated_step(dll, nca, image, state, run, step=0)
    finally:
        fragments.b_fragments = real
    assert (bad.float() - model).abs().max().item() > 1e-2


@pytest.mark.parametrize("dims", [2, 3])
def test_backend_v2_launch_arguments_match_the_kernel_signature(emulation, dims) -> None:
    """The v2 argument block (last argument: a pointer to this run's weight buffer), read like the driver."""
    from napari_octreenca.backends.cuda.backend import check_launch, launch_args
    from napari_octreenca.backends.cuda.fragments import pack_v2

    shape = (9, 35) if dims == 2 else (5, 3, 9)
    nca = random_level(16, 3, 64, dims, seed=21)
    g = torch.Generator().manual_seed(1)
    image, state = (
        torch.randn((2, 3) + shape, generator=g).bfloat16(),
        torch.randn((2, 13) + shape, generator=g).bfloat16(),
    )
    out = torch.full_like(state, float("nan"))
    run = LevelRun(level=1, steps=1, seed=9, fire_rate=0.5, origin=(4,) * dims)
    key, thresh = fire_params(run, 0)
    sizes = (2,) + (((1,) + shape) if dims == 2 else shape) + (((0,) + run.origin) if dims == 2 else run.origin)
    words = torch.from_numpy(pack_v2(nca).view(np.int32))
    check_launch(nca, image, state, out)
    params, _keep = launch_args(image, state, out, sizes, key, thresh, ctypes.c_void_p(words.data_ptr()))
    emulation.emu_launch_params(
        4 if dims == 2 else 5, 3, params
    )  # _keep holds the argument objects  # 3 blocks: grid-stride over the tiles
    assert not torch.isnan(out.float()).any()
    model = v2_model_step(nca, image, state, run, step=0).float()
    assert ((out.float() - model).abs() <= 2**-7 * model.abs() + 1e-6).all()


@pytest.mark.parametrize("case", ["he_epidermis-ihc", "brain_mri-itk"])
def test_v2_emulated_on_real_data_with_bundled_models(case, tmp_path) -> None:
    """Kernel v2 (emulated) with a bundled model's real weights on a real image, after a few real steps.

    2D: he_epidermis's finest level on a crop of scikit-image's immunohistochemistry section; 3D:
    brain_mri's finest level on a crop of the ITK T1 MRI. The state comes from the torch path
    (bf16), so its values are the ones a real run meets; one v2 step must equal its bf16 model.
    """
    from napari_octreenca.nca.registry import open_model
    from napari_octreenca.run.inputs import prepare

    name, _ = case.split("-")
    model = open_model(name, "cpu")
    cfg = model.config
    if cfg.spatial_dims == 2:
        skdata = pytest.importorskip("skimage.data")
        raw = np.ascontiguousarray(skdata.immunohistochemistry()[200:224, 150:190])
        x, _ = prepare(raw, cfg, "YXC")
    else:
        from helpers import ITK_DATA, need_file

        nib = pytest.importorskip("nibabel")
        path = need_file(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", "apt-get install insighttoolkit5-examples")
        vol = np.asarray(nib.load(str(path)).dataobj)[50:58, 60:69, 28:35]
        x, _ = prepare(np.ascontiguousarray(vol), cfg, "ZYX")
    nca = model.levels[0]
    dll = _compile_emulation(tmp_path, nca.channels, nca.input_channels, nca.fc0.out_channels)
    i64, u32, p = ctypes.c_longlong, ctypes.c_uint32, ctypes.c_void_p
    fn = getattr(dll, f"emu_nca2_step_{cfg.spatial_dims}d_bf16")
    fn.restype = None
    fn.argtypes = [ctypes.c_uint, p, p, p, i64, i64, i64, i64, i64, i64, i64, u32, u32, p]
    image = x.bfloat16()
    state = torch.zeros((1, nca.channels - nca.input_channels) + tuple(x.shape[2:]), dtype=torch.bfloat16)
    state = TorchBackend().run_level(nca, image, state, LevelRun(level=0, steps=6, seed=3, fire_rate=cfg.fire_rate))
    assert state.float().abs().max().item() > 1e-3  # the model has moved the state
    run = LevelRun(level=0, steps=1, seed=3, fire_rate=cfg.fire_rate)
    out = v2_emulated_step(dll, nca, image, state, run, step=6)
    model_out = v2_model_step(nca, image, state, run, step=6).float()
    assert not torch.isnan(out.float()).any()
    assert ((out.float() - model_out).abs() <= 2**-7 * model_out.abs() + 1e-6).all()
    ref = torch_step(nca, image.float(), state.float(), run, step=6)
    assert ((out.float() - ref).abs() / ref.abs().clamp_min(1.0)).max().item() < 5e-2
